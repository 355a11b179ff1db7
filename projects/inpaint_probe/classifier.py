"""The real-vs-generated image classifier of paper 003 (Baek et al., "inpainting probe"), Sections 4-6.

A timm backbone (ConvNeXt-XL at 384 px in the paper; VGG-16, ResNet-50 and EfficientNet-B0 in the Table 3
ablation) fine-tuned end to end, global average pooling kept, and "only one dense layer with two nodes" at the end
with a sigmoid activation and binary cross-entropy, optimised with Adam (Sec. 4). Early stopping and checkpoint
selection use the validation set only (Sec. 5.3).

Two sigmoid outputs trained with BCE are the paper's choice (Keras' `Dense(2, activation="sigmoid")` with one-hot
targets): each node estimates P(class) independently. The score we threshold and rank is the "generated" node's
sigmoid, P(generated). `head="single_logit"` is the other common choice (CNNDetection, NPR, UniFD): one logit,
BCE against the 0/1 label, score = its sigmoid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from common.backbones import create_timm_classifier, timm_data_config
from common.experiment.reporting import image_grid, log_pil
from common.tasks import RealFakeTask


def two_node_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Paper 003 Sec. 4: BCE over two sigmoid nodes against one-hot targets (node 0 real, node 1 generated),
    averaged over nodes and batch, as Keras' binary_crossentropy on a (B, 2) output."""
    targets = F.one_hot(labels.long(), num_classes=2).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, targets)


def single_logit_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE of one logit per image against the 0/1 label (1 = generated), averaged over the batch; `logits` is
    (B,) or (B, 1). CNNDetection's and NPR's `BCEWithLogitsLoss` on `output.squeeze(1)`."""
    return F.binary_cross_entropy_with_logits(logits.reshape(-1), labels.to(logits.dtype).reshape(-1))


HEADS = ("two_node", "single_logit")


class RealFakeClassifier(RealFakeTask):
    """Fine-tuned timm classifier with the paper's two-node sigmoid head.

    Args:
        backbone: timm model name, e.g. convnext_xlarge.fb_in22k_ft_in1k_384 (paper), vgg16.tv_in1k,
            resnet50.tv_in1k, efficientnet_b0.ra_in1k.
        preset: "pretrained" (ImageNet weights; the paper's transfer learning), "random" or "tiny"
            (same class, small config, random weights: tests and the demo).
        checkpoint_path: optional local weights (.safetensors or a torch state dict) for the backbone.
        lr: Adam learning rate. weight_decay: Adam's L2 term (0 in the paper).
        freeze_backbone: train the dense layer only (the paper fine-tunes everything; kept for linear probes).
        head: "two_node" (the paper's two sigmoid nodes) or "single_logit" (one logit, BCE; CNNDetection).
        false_real_images: per generator, how many generated test images predicted real to show in
            `plots/test_false_real_<generator>.png` (Sec. 6, Figs. 7-8); 0 turns the grids off.
    """

    monitor = "val/loss"
    monitor_mode = "min"

    def __init__(
        self,
        backbone: str = "convnext_xlarge.fb_in22k_ft_in1k_384",
        preset: str = "pretrained",
        checkpoint_path: str | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        freeze_backbone: bool = False,
        drop_rate: float = 0.0,
        threshold: float = 0.5,
        false_real_images: int = 16,
        head: str = "two_node",
    ) -> None:
        super().__init__(threshold=threshold)
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        self.head = head
        if false_real_images < 0:
            raise ValueError(f"false_real_images must be >= 0, got {false_real_images}")
        self.false_real_images = false_real_images
        self._false_real: dict[str, list[tuple[torch.Tensor, str]]] = {}
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.save_hyperparameters(logger=False)  # loggers get the whole config once (RunConfigCallback)
        self.network = create_timm_classifier(
            backbone,
            preset=preset,
            num_classes=2 if head == "two_node" else 1,
            checkpoint_path=checkpoint_path,
            drop_rate=drop_rate,
        )
        data_config = timm_data_config(self.network)
        self.register_buffer("mean", torch.tensor(data_config["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data_config["std"]).view(1, 3, 1, 1), persistent=False)
        if freeze_backbone:
            classifier = self.network.get_classifier()
            for parameter in self.network.parameters():
                parameter.requires_grad_(False)
            for parameter in classifier.parameters():
                parameter.requires_grad_(True)

    def forward(self, batch: dict[str, Any] | torch.Tensor) -> torch.Tensor:
        images = batch["image"] if isinstance(batch, dict) else batch
        return self.network((images - self.mean) / self.std)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.head == "single_logit":
            return single_logit_bce(logits, labels)
        return two_node_bce(logits, labels)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits[:, 0] if self.head == "single_logit" else logits[:, 1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        parameters = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(
            parameters,
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            weight_decay=self.hparams.weight_decay,
        )

    # -- Sec. 6, Figs. 7-8: generated images the classifier calls real, per generator ---------------------------
    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._false_real = {}

    def test_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> torch.Tensor | None:
        scores = super().test_step(batch, batch_idx, dataloader_idx)
        if dataloader_idx == 0 and scores is not None and self.false_real_images:  # clean test images only
            self._collect_false_real(batch, scores.detach())
        return scores

    def _collect_false_real(self, batch: dict[str, Any], scores: torch.Tensor) -> None:
        names = self._generator_names()
        missed = (batch["label"] == 1) & (scores < self.threshold)
        for i in torch.nonzero(missed).flatten().tolist():
            g = int(batch["generator_id"][i])
            generator = names[g] if 0 <= g < len(names) else f"generator_{g}"
            shown = self._false_real.setdefault(generator, [])
            if len(shown) < self.false_real_images:
                caption = f"pred real, true gen\np={float(scores[i]):.2f} {Path(batch['path'][i]).name[:14]}"
                shown.append((batch["image"][i].detach().cpu(), caption))

    def report_test(
        self,
        report: dict[str, dict[str, float]],
        scores: torch.Tensor,
        labels: torch.Tensor,
        groups: torch.Tensor,
    ) -> None:
        super().report_test(report, scores, labels, groups)
        for generator, shown in sorted(self._false_real.items()):
            images, captions = zip(*shown, strict=True)
            log_pil(
                self.trainer,
                f"test/false_real_{generator}",
                image_grid(images, captions, columns=8),
                f"{generator}: generated images predicted real (paper 003 Figs. 7-8)",
            )
