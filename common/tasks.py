"""`RealFakeTask`: the LightningModule base of every real-vs-generated detector (torchgeo's "small base task").

Subclasses implement `forward(batch) -> logits` and `loss(logits, labels)` and `scores(logits) -> P(generated)`;
the base does the rest the same way for all of them:
  * validation metrics (per generator + mean) and the monitor used for checkpointing and early stopping;
  * test report: per-generator table (acc, real acc, fake acc, AP, AUROC, F1) as CSV/Markdown/W&B table, the
    Tables I-III-shaped table of the field's papers (`test_paper_tables`), ROC and PR curves, a grid of
    misclassified images, all in the run directory and on W&B;
  * robustness (ITEM Fig. 4, CNNDetection): when the datamodule names several `test_conditions` (clean first,
    then perturbations such as "jpeg:75") and gives one test dataloader per condition, the first is the report
    above and every condition gets its own metrics: `test_robustness.{md,csv,json}` (json = {condition:
    per-generator report as test_metrics.json}), `plots/test_robustness.png`, `test_robustness/<condition>/ap`;
  * predict: `predictions.csv` with path, score, predicted label, true label (when known).
Empty batches (every file of the batch failed to decode) are skipped, not fatal.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch

from common.experiment.detector_report import paper_tables, robustness_figure, robustness_table
from common.experiment.reporting import curves_figure, image_grid, log_figure, log_pil, log_table
from common.io import write_csv, write_json
from common.metrics import METRIC_NAMES, RealFakeMetrics, format_table


class RealFakeTask(L.LightningModule):
    """Base class; see module docstring. `monitor`/`monitor_mode` drive checkpoint selection (validation only);
    `method_name` names the row of the paper-shaped tables (default: the class name)."""

    monitor: str = "val/loss"
    monitor_mode: str = "min"
    method_name: str | None = None

    def __init__(self, threshold: float = 0.5, max_misclassified: int = 32) -> None:
        super().__init__()
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.threshold = threshold
        self.max_misclassified = max_misclassified
        self.val_metrics = RealFakeMetrics(threshold=threshold)
        self.test_metrics = RealFakeMetrics(threshold=threshold)
        self.conditions: list[str] = ["none"]  # test conditions; the first is test_metrics' report
        self.condition_metrics: list[RealFakeMetrics] = []  # one per further condition (not in state_dict)
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

    def test_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> torch.Tensor | None:
        """Metrics of the batch's condition (dataloader `dataloader_idx`); the misclassified grid shows clean
        images only. Returns the scores (None for an empty batch) for subclasses collecting more."""
        if dataloader_idx > len(self.condition_metrics):
            raise RuntimeError(
                f"test dataloader {dataloader_idx} has no condition: the datamodule names {len(self.conditions)} "
                f"test_conditions ({', '.join(self.conditions)}), one per test dataloader"
            )
        metrics = self.test_metrics if dataloader_idx == 0 else self.condition_metrics[dataloader_idx - 1]
        scores = self._eval_step(batch, metrics, "test")
        if scores is None or dataloader_idx != 0:
            return scores
        wrong = ((scores >= self.threshold).long() != batch["label"]) & (batch["label"] >= 0)
        for i in torch.nonzero(wrong).flatten().tolist():
            if len(self._misclassified) >= self.max_misclassified:
                break
            self._misclassified.append(self.misclassified_thumbnail(batch, i, float(scores[i])))
        return scores

    def misclassified_thumbnail(
        self, batch: dict[str, Any], i: int, score: float
    ) -> tuple[torch.Tensor, str]:
        """Image i of the batch and its caption (truth, generator, score, file) for the misclassified grid."""
        names = self._generator_names()
        truth = "fake" if int(batch["label"][i]) == 1 else "real"
        generator = names[int(batch["generator_id"][i])] if names else ""
        caption = f"{truth} {generator[:10]} p={score:.2f}\n{Path(batch['path'][i]).name[:18]}"
        return batch["image"][i].detach().cpu(), caption

    def on_test_epoch_start(self) -> None:
        names = self._generator_names()
        self.test_metrics.generator_names = names
        self._misclassified = []
        datamodule = getattr(self.trainer, "datamodule", None)
        self.conditions = list(getattr(datamodule, "test_conditions", None) or ["none"])
        self.condition_metrics = [
            RealFakeMetrics(names, self.threshold).to(self.device) for _ in self.conditions[1:]
        ]

    def on_test_epoch_end(self) -> None:
        report = self.test_metrics.compute()
        scores, labels, groups = self.test_metrics.gathered()
        self.test_metrics.reset()
        for generator, row in report.items():
            for name in METRIC_NAMES:
                if not math.isnan(row[name]):
                    self.log(f"test/{generator}/{name}", row[name], rank_zero_only=True)
        robustness = {}
        for condition, metrics in zip(self.conditions[1:], self.condition_metrics, strict=True):
            robustness[condition] = metrics.compute()  # all ranks: compute() gathers under DDP
            metrics.reset()
            value = robustness[condition]["mean"]["ap"]
            if not math.isnan(value):
                self.log(
                    f"test_robustness/{condition}/ap", value, rank_zero_only=True, add_dataloader_idx=False
                )
        if not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        self.report_test(report, scores, labels, groups)
        if robustness:
            self.report_robustness({self.conditions[0]: report, **robustness})

    def method_label(self) -> str:
        """The method's row name in the paper-shaped tables: `method_name` and the run's name."""
        return f"{self.method_name or type(self).__name__} ({Path(self.trainer.default_root_dir).name})"

    def report_test(
        self,
        report: dict[str, dict[str, float]],
        scores: torch.Tensor,
        labels: torch.Tensor,
        groups: torch.Tensor,
    ) -> None:
        """Tables (per generator; Tables I-III shape), curves and the misclassified grid (rank zero)."""
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
        columns, rows, markdown = paper_tables(report, self.method_label())
        log_table(self.trainer, "test/paper_tables", columns, rows, markdown=markdown)
        print(markdown + "\n")

    def report_robustness(self, reports: dict[str, dict[str, dict[str, float]]]) -> None:
        """ITEM Fig. 4 for this detector (rank zero): AP per condition as a table, JSON and plot. `reports` maps
        each test condition, clean first, to its per-generator report."""
        columns, rows, markdown = robustness_table(reports)
        log_table(self.trainer, "test/robustness", columns, rows, markdown=markdown)
        write_json(Path(self.trainer.default_root_dir) / "test_robustness.json", reports)
        log_figure(self.trainer, "test/robustness", robustness_figure(reports))
        print(markdown + "\n")

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
