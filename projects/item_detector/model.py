"""`ItemDetector`: ITEM's trainable part, read as Algorithm 1 lines 4-9 on cached frozen features.

forward(batch): D_g (Eq. 4) and D_l^i (Eq. 6) by `misalignment_vector`, D_l (Eq. 7), D = w1 D_g + w2 D_l (Eq. 8),
logits = MLP(D) (Eq. 9); the loss is Eq. 10. The datamodule's per-image view holds D_g and Eq. 7's mean already
(computed once, when the view is built). Only the head has parameters (AdamW, lr 1e-3, weight decay 1e-3, 50
epochs, as the paper). The frozen models never enter this module: they live in the datamodule's cached
stage, so "only the head trains" holds by construction.

RealFakeTask writes the per-generator report, the paper-shaped Tables I-III and, when the datamodule has
several test conditions, the Fig. 4 robustness table and plot, as for every detector; ITEM adds the Fig. 9
t-SNE of D (with the CLIP image embedding, UniFD's representation, for comparison). `predict` writes path,
caption, score, label.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import WandbLogger
from torchvision.transforms.functional import pil_to_tensor

from common.data.images import ImageDecodeError, load_rgb
from common.experiment.reporting import log_figure
from common.io import write_csv, write_json
from common.tasks import RealFakeTask
from projects.item_detector.head import MisalignmentHead, fake_probability, item_bce
from projects.item_detector.misalignment import (
    EmptyLocal,
    empty_local_fallback,
    hierarchical_distance,
    local_distance,
    misalignment_vector,
    with_fallback,
)
from projects.item_detector.report import tsne_figure


def file_thumbnail(path: str, size: int = 128) -> torch.Tensor:
    """A (3, size, size) thumbnail decoded from the image file (batches of cached features hold no pixels);
    black when the file no longer decodes."""
    try:
        return pil_to_tensor(load_rgb(path).resize((size, size))).float() / 255
    except ImageDecodeError:
        return torch.zeros(3, size, size)


class ItemDetector(RealFakeTask):
    """ITEM's MLP head on the hierarchical misalignment D.

    Args:
        hidden_features: width of the MLP's hidden layer (not given in the paper).
        w_global, w_local: w1, w2 of Eq. 8 (1.0, 1.0 in the paper; (1, 0) global-only, (0, 1) local-only).
        empty_local: D_l of an image where nothing was grounded: "global" (D_l = D_g: the whole image is its
            only object; default) or "zero".
        dropout: dropout before the last layer (0 in the paper).
        lr, weight_decay: AdamW (1e-3, 1e-3 in the paper).
        feature_dim: CLIP embedding size; None takes it from the datamodule (768 for ViT-L/14).
        tsne_max_points: images per generator shown in the Fig. 9 t-SNE (0 disables the figure).
    """

    method_name = "ITEM"
    monitor = None  # the paper trains 50 epochs and uses the last head; validation metrics are logged only

    def __init__(
        self,
        hidden_features: int = 512,
        w_global: float = 1.0,
        w_local: float = 1.0,
        empty_local: EmptyLocal = "global",
        dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 1e-3,
        feature_dim: int | None = None,
        tsne_max_points: int = 500,
        threshold: float = 0.5,
        max_misclassified: int = 32,
    ) -> None:
        super().__init__(threshold=threshold, max_misclassified=max_misclassified)
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if w_global < 0 or w_local < 0 or w_global + w_local == 0:
            raise ValueError(f"w_global and w_local must be >= 0 and not both 0, got {w_global}, {w_local}")
        empty_local_fallback(torch.zeros(1), empty_local)  # validates the policy name
        self.save_hyperparameters(logger=False)  # loggers get the whole config once (RunConfigCallback)
        self.head: MisalignmentHead | None = None
        if feature_dim is not None:
            self.head = MisalignmentHead(feature_dim, hidden_features, dropout)
        self._tsne: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._captions: dict[str, str] = {}

    def configure_model(self) -> None:
        """Build the head once the datamodule knows the CLIP embedding size (before any checkpoint loads)."""
        if self.head is not None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        dim = getattr(datamodule, "feature_dim", None)
        if dim is None:
            raise RuntimeError(
                "ItemDetector needs feature_dim: set model.init_args.feature_dim or use ItemFeatures"
            )
        self.hparams["feature_dim"] = dim  # saved with checkpoints, so load_from_checkpoint rebuilds the head
        self.head = MisalignmentHead(dim, self.hparams.hidden_features, self.hparams.dropout)

    # -- Algorithm 1, lines 4-9 ------------------------------------------------------------------------------
    def distance(self, batch: dict[str, Any]) -> torch.Tensor:
        """D of Eq. 8, from the per-image view's D_g, mean D_l^i and object count (the default batches), or
        from the CLIP embeddings themselves (`per_object_batches`: I_0, T_0 and the padded I_i, T_i)."""
        if "d_local" in batch:  # Eq. 4, 6 and Eq. 7's mean were computed once, when the view was built
            d_global = batch["d_global"]
            fallback = empty_local_fallback(d_global, self.hparams.empty_local)
            d_local = with_fallback(batch["d_local"], batch["n_objects"], fallback)  # Eq. 7
        else:
            d_global = misalignment_vector(batch["global_image"], batch["global_text"])  # Eq. 4
            d_objects = misalignment_vector(batch["local_image"], batch["local_text"])  # Eq. 6
            fallback = empty_local_fallback(d_global, self.hparams.empty_local)
            d_local = local_distance(d_objects, batch["local_mask"], fallback)  # Eq. 7
        return hierarchical_distance(d_global, d_local, self.hparams.w_global, self.hparams.w_local)  # Eq. 8

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.head is None:
            raise RuntimeError(
                "the head is built by configure_model(); run through a Trainer or set feature_dim"
            )
        return self.head(self.distance(batch))  # Eq. 9

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return item_bce(logits, labels)  # Eq. 10 (batch mean)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return fake_probability(logits)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.head.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )

    # -- test: per-generator report, robustness conditions, t-SNE ------------------------------------------------
    def on_fit_start(self) -> None:
        self._report_feature_health()

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._tsne = []
        self._report_feature_health()

    def test_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> torch.Tensor | None:
        """The base test step (metrics per condition, misclassified grid), and D of the clean images for Fig. 9."""
        scores = super().test_step(batch, batch_idx, dataloader_idx)
        if scores is not None and dataloader_idx == 0 and self.hparams.tsne_max_points > 0:
            self._tsne.append(
                (
                    self.distance(batch).detach().cpu(),
                    batch["global_image"].detach().cpu(),
                    batch["label"].cpu(),
                    batch["generator_id"].cpu(),
                )
            )
        return scores

    def misclassified_thumbnail(
        self, batch: dict[str, Any], i: int, score: float
    ) -> tuple[torch.Tensor, str]:
        """A misclassified image (decoded from its file: batches hold embeddings) with its truth, score and (start
        of) caption, for the report's grid."""
        truth = "fake" if int(batch["label"][i]) == 1 else "real"
        return file_thumbnail(batch["path"][i]), f"{truth} p={score:.2f}\n{batch['caption'][i][:20]}"

    def report_test(
        self,
        report: dict[str, dict[str, float]],
        scores: torch.Tensor,
        labels: torch.Tensor,
        groups: torch.Tensor,
    ) -> None:
        """The base report (per generator, Tables I-III shape), then the Fig. 9 t-SNE."""
        super().report_test(report, scores, labels, groups)
        if self._tsne and self.hparams.tsne_max_points > 0:
            distances, images, tsne_labels, tsne_groups = (torch.cat(parts) for parts in zip(*self._tsne))
            figure = tsne_figure(
                {"ITEM D": distances, "CLIP image (UniFD)": images},
                tsne_labels,
                tsne_groups,
                self.test_metrics.generator_names,
                self.hparams.tsne_max_points,
            )
            log_figure(self.trainer, "test/tsne", figure)

    def _report_feature_health(self) -> None:
        """ITEM's input checks per split (empty or overlong captions, no objects, boxes outside the image) and
        what extraction cost, from the datamodule: `frozen_stage.json` next to data_health.json, and the checks
        in the W&B summary."""
        datamodule = getattr(self.trainer, "datamodule", None)
        health = getattr(datamodule, "feature_health", None)
        if not health or not self.trainer.is_global_zero:
            return
        record = {"cache_dir": datamodule.cache_dir, "health": health, "extraction": datamodule.extraction}
        write_json(Path(self.trainer.default_root_dir) / "frozen_stage.json", record)
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                for split, counts in health.items():
                    for flag, count in counts.items():
                        logger.experiment.summary[f"data/{split}/{flag}"] = count

    # -- predict: path, caption, score, label --------------------------------------------------------------------
    def predict_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Any] | None:
        if self._is_empty(batch):
            return None
        scores = self.scores(self(batch)).detach().float().cpu()
        for path, caption, score, label in zip(
            batch["path"], batch["caption"], scores.tolist(), batch["label"].tolist()
        ):
            self._predictions.append((path, caption, score, int(score >= self.threshold), label))
        return {"path": batch["path"], "score": scores}

    def on_predict_epoch_end(self) -> None:
        rank = self.trainer.global_rank
        name = "predictions.csv" if self.trainer.world_size == 1 else f"predictions.rank{rank}.csv"
        path = Path(self.trainer.default_root_dir) / name
        rows = [(f, c, f"{s:.6f}", p, t if t >= 0 else "") for f, c, s, p, t in self._predictions]
        write_csv(path, ("path", "caption", "score", "predicted_label", "true_label"), rows)
        if self.trainer.is_global_zero:
            print(f"forgelab: wrote {len(self._predictions)} predictions to {path}")
