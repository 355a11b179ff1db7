"""`UniFD` (Ojha et al., CVPR 2023, "Towards Universal Fake Image Detectors that Generalize Across Generative
Models"): a linear probe on the frozen CLIP ViT-L/14 image embedding.

UniFD's detector is `fc(encode_image(x))`: one `nn.Linear(768, 1)` over the raw CLIP image embedding (the
projected embedding, not L2-normalised: their `models/clip_models.py` feeds `encode_image`'s output straight
to the layer), BCE-with-logits on the one logit, Adam at lr 1e-4 (their `--optim adam` builds AdamW with
weight decay 0.0, which is Adam), the weight drawn from N(0, 0.02) (`init_gain`), and the checkpoint followed
by validation accuracy (their early stopping watches it).

The embedding is ITEM's `I_0` (Eq. 2): `ItemFeatures` caches exactly it as `batch["global_image"]`, so UniFD
reads ITEM's feature cache and never runs CLIP itself (configs/item_detector/unifd*.yaml have the same `data:`
section as ITEM's). The cost of that: no training-time augmentation. UniFD's released training code resizes
to 256, random-crops 224, flips, and blurs (sigma in [0, 3]) and JPEG-compresses (quality 30-100) each with
probability 0.5 (`blur_prob`, `jpg_prob` defaults inherited from CNNDetection); a cached embedding is one fixed
view of each image (the 224 centre crop, no resize), so none of that happens here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from common.tasks import RealFakeTask
from projects.item_detector.model import file_thumbnail


def linear_probe(in_features: int, init_std: float = 0.02) -> nn.Linear:
    """UniFD's classifier: one logit from the embedding, weight ~ N(0, init_std) (their init_gain; the bias keeps
    PyTorch's default init, as theirs does)."""
    layer = nn.Linear(in_features, 1)
    nn.init.normal_(layer.weight, 0.0, init_std)
    return layer


class UniFD(RealFakeTask):
    """UniFD's linear probe on the cached CLIP image embedding (see the module docstring).

    Args:
        lr: Adam learning rate (UniFD: 1e-4).
        init_std: standard deviation of the layer's initial weight (UniFD: 0.02).
        feature_dim: CLIP embedding size; None takes it from the datamodule (768 for ViT-L/14).
    """

    method_name = "UniFD"
    monitor = "val/acc"  # UniFD's early stopping follows validation accuracy
    monitor_mode = "max"

    def __init__(
        self,
        lr: float = 1e-4,
        init_std: float = 0.02,
        feature_dim: int | None = None,
        threshold: float = 0.5,
        max_misclassified: int = 32,
    ) -> None:
        super().__init__(threshold=threshold, max_misclassified=max_misclassified)
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if init_std <= 0:
            raise ValueError(f"init_std must be positive, got {init_std}")
        self.save_hyperparameters(logger=False)  # loggers get the whole config once (RunConfigCallback)
        self.fc: nn.Linear | None = linear_probe(feature_dim, init_std) if feature_dim is not None else None

    def configure_model(self) -> None:
        """Build the layer once the datamodule knows the embedding size (before any checkpoint loads)."""
        if self.fc is not None:
            return
        dim = getattr(getattr(self.trainer, "datamodule", None), "feature_dim", None)
        if dim is None:
            raise RuntimeError("UniFD needs feature_dim: set model.init_args.feature_dim or use ItemFeatures")
        self.hparams["feature_dim"] = (
            dim  # saved with checkpoints, so load_from_checkpoint rebuilds the layer
        )
        self.fc = linear_probe(dim, self.hparams.init_std)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.fc is None:
            raise RuntimeError(
                "the layer is built by configure_model(); run through a Trainer or set feature_dim"
            )
        return self.fc(batch["global_image"]).squeeze(-1)  # the raw embedding, as UniFD

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(logits, labels.float())

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.fc.parameters(), lr=self.hparams.lr)

    def misclassified_thumbnail(
        self, batch: dict[str, Any], i: int, score: float
    ) -> tuple[torch.Tensor, str]:
        """The image decoded from its file (batches hold embeddings), its truth and score."""
        truth = "fake" if int(batch["label"][i]) == 1 else "real"
        return file_thumbnail(batch["path"][i]), f"{truth} p={score:.2f}"
