"""`RealFakeTask`: the LightningModule base of every real-vs-generated detector (torchgeo's "small base task").

Subclasses implement `forward(batch) -> logits` and `loss(logits, labels)` and `scores(logits) -> P(generated)`;
the base does the rest the same way for all of them:
  * validation metrics (per generator + mean) and the monitor used for checkpointing and early stopping;
  * test report: per-generator table (acc, real acc, fake acc, AP, AUROC, F1) as CSV/Markdown/W&B table, ROC and
    PR curves, a grid of misclassified images, all in the run directory and on W&B;
  * predict: `predictions.csv` with path, score, predicted label, true label (when known).
Empty batches (every file of the batch failed to decode) are skipped, not fatal.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch

from common.experiment.reporting import curves_figure, image_grid, log_figure, log_pil, log_table
from common.io import write_csv, write_json
from common.metrics import METRIC_NAMES, RealFakeMetrics, format_table


class RealFakeTask(L.LightningModule):
    """Base class; see module docstring. `monitor`/`monitor_mode` drive checkpoint selection (validation only)."""

    monitor: str = "val/loss"
    monitor_mode: str = "min"

    def __init__(self, threshold: float = 0.5, max_misclassified: int = 32) -> None:
        super().__init__()
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.threshold = threshold
        self.max_misclassified = max_misclassified
        self.val_metrics = RealFakeMetrics(threshold=threshold)
        self.test_metrics = RealFakeMetrics(threshold=threshold)
        self._misclassified: list[tuple[torch.Tensor, str]] = []
        self._predictions: list[tuple[str, float, int, int]] = []

    # -- to implement ------------------------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- helpers -----------------------------------------------------------------------------------------------
    def _generator_names(self) -> list[str]:
        datamodule = getattr(self.trainer, "datamodule", None)
        return list(getattr(datamodule, "generators", []) or [])

    @staticmethod
    def _is_empty(batch: dict[str, Any]) -> bool:
        return batch["label"].numel() == 0

    # -- steps -------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if self._is_empty(batch):
            return None
        logits = self(batch)
        loss = self.loss(logits, batch["label"])
        accuracy = ((self.scores(logits) >= self.threshold).long() == batch["label"]).float().mean()
        size = batch["label"].numel()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=size)
        self.log("train/acc", accuracy, on_step=False, on_epoch=True, batch_size=size)
        return loss

    def _eval_step(self, batch: dict[str, Any], metrics: RealFakeMetrics, stage: str) -> torch.Tensor | None:
        if self._is_empty(batch):
            return None
        logits = self(batch)
        scores = self.scores(logits)
        labelled = batch["label"] >= 0
        if labelled.any():
            loss = self.loss(logits[labelled], batch["label"][labelled])
            self.log(f"{stage}/loss", loss, batch_size=int(labelled.sum()), sync_dist=True)
        metrics.update(scores, batch["label"], batch["generator_id"], batch["index"])
        return scores

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        report = self.val_metrics.compute()
        self.val_metrics.reset()
        for name in METRIC_NAMES:
            value = report["mean"][name]
            if not math.isnan(value):
                self.log(f"val/{name}", value, prog_bar=name in ("acc", "ap"))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        scores = self._eval_step(batch, self.test_metrics, "test")
        if scores is None or len(self._misclassified) >= self.max_misclassified:
            return
        wrong = ((scores >= self.threshold).long() != batch["label"]) & (batch["label"] >= 0)
        for i in torch.nonzero(wrong).flatten().tolist():
            if len(self._misclassified) >= self.max_misclassified:
                break
            truth = "fake" if int(batch["label"][i]) == 1 else "real"
            generator = (
                self._generator_names()[int(batch["generator_id"][i])] if self._generator_names() else ""
            )
            caption = f"{truth} {generator[:10]} p={float(scores[i]):.2f}\n{Path(batch['path'][i]).name[:18]}"
            self._misclassified.append((batch["image"][i].detach().cpu(), caption))

    def on_test_epoch_start(self) -> None:
        self.test_metrics.generator_names = self._generator_names()
        self._misclassified = []

    def on_test_epoch_end(self) -> None:
        report = self.test_metrics.compute()
        scores, labels, groups = self.test_metrics.gathered()
        self.test_metrics.reset()
        for generator, row in report.items():
            for name in METRIC_NAMES:
                if not math.isnan(row[name]):
                    self.log(f"test/{generator}/{name}", row[name], rank_zero_only=True)
        if not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        self.report_test(report, scores, labels, groups)

    def report_test(
        self,
        report: dict[str, dict[str, float]],
        scores: torch.Tensor,
        labels: torch.Tensor,
        groups: torch.Tensor,
    ) -> None:
        """Tables, curves and the misclassified grid (rank zero)."""
        columns = ["generator", "n", *METRIC_NAMES]
        rows = [
            [
                name,
                int(row["n"]),
                *(round(row[m], 6) if not math.isnan(row[m]) else None for m in METRIC_NAMES),
            ]
            for name, row in report.items()
            if name != "pooled"
        ]
        markdown = format_table(
            report, columns=METRIC_NAMES, title=f"{type(self).__name__}: test (%, threshold 0.5)"
        )
        log_table(self.trainer, "test/per_generator", columns, rows, markdown=markdown)
        write_json(Path(self.trainer.default_root_dir) / "test_metrics.json", report)
        labelled = labels >= 0
        names = self.test_metrics.generator_names
        log_figure(
            self.trainer,
            "test/curves",
            curves_figure(scores[labelled], labels[labelled], groups[labelled], names),
        )
        if self._misclassified:
            images, captions = zip(*self._misclassified, strict=True)
            log_pil(
                self.trainer, "test/misclassified", image_grid(images, captions), "misclassified test images"
            )
        print("\n" + markdown + "\n")

    # -- predict -------------------------------------------------------------------------------------------------
    def on_predict_epoch_start(self) -> None:
        self._predictions = []

    def predict_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Any] | None:
        if self._is_empty(batch):
            return None
        scores = self.scores(self(batch)).detach().float().cpu()
        for path, score, label in zip(batch["path"], scores.tolist(), batch["label"].tolist(), strict=True):
            self._predictions.append((path, score, int(score >= self.threshold), label))
        return {"path": batch["path"], "score": scores}

    def on_predict_epoch_end(self) -> None:
        rank = self.trainer.global_rank
        name = "predictions.csv" if self.trainer.world_size == 1 else f"predictions.rank{rank}.csv"
        path = Path(self.trainer.default_root_dir) / name
        rows = [(f, f"{s:.6f}", p, t if t >= 0 else "") for f, s, p, t in self._predictions]
        write_csv(path, ("path", "score", "predicted_label", "true_label"), rows)
        if self.trainer.is_global_zero:
            print(f"forgelab: wrote {len(self._predictions)} predictions to {path}")
