"""Real-vs-generated metrics, per generator and as a mean over generators (CNNDetection/ITEM table shape).

Reported for every generator subset g:
    acc       accuracy at the fixed 0.5 threshold (never tuned on test data)
    real_acc  accuracy on real images (specificity)      fake_acc  accuracy on generated images (recall)
    ap        average precision (threshold-free; the 0.5 threshold is miscalibrated off-distribution)
    auroc     area under the ROC curve                   f1        F1 of the generated class at 0.5
and `mean` = the unweighted mean over generators, as the papers' "mean" column. A subset holding one class only
has undefined ap/auroc (NaN), left out of the mean.

`RealFakeMetrics` keeps scores, labels, generator ids and dataset indices as concatenated states, so under DDP
`compute()` sees every sample; the indices remove the duplicates a DistributedSampler pads the last batch with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    binary_average_precision,
    binary_f1_score,
)
from torchmetrics.utilities import dim_zero_cat

METRIC_NAMES: tuple[str, ...] = ("acc", "real_acc", "fake_acc", "ap", "auroc", "f1")


def binary_report(scores: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> dict[str, float]:
    """All metrics of the module docstring for one subset. `scores` are P(generated) in [0, 1]."""
    scores = scores.detach().float().cpu()
    labels = labels.detach().long().cpu()
    n = int(labels.numel())
    report: dict[str, float] = {"n": float(n)}
    if n == 0:
        return report | {name: math.nan for name in METRIC_NAMES}
    predicted = (scores >= threshold).long()
    real, fake = labels == 0, labels == 1
    report["acc"] = float(binary_accuracy(scores, labels, threshold=threshold))
    report["real_acc"] = float((predicted[real] == 0).float().mean()) if real.any() else math.nan
    report["fake_acc"] = float((predicted[fake] == 1).float().mean()) if fake.any() else math.nan
    both = bool(real.any() and fake.any())
    report["ap"] = float(binary_average_precision(scores, labels)) if both else math.nan
    report["auroc"] = float(binary_auroc(scores, labels)) if both else math.nan
    report["f1"] = float(binary_f1_score(scores, labels, threshold=threshold)) if fake.any() else math.nan
    return report


def mean_report(per_group: dict[str, dict[str, float]]) -> dict[str, float]:
    """Unweighted mean over groups, ignoring NaN entries (a metric undefined for a group)."""
    out: dict[str, float] = {"n": float(sum(r.get("n", 0.0) for r in per_group.values()))}
    for name in METRIC_NAMES:
        values = [r[name] for r in per_group.values() if name in r and not math.isnan(r[name])]
        out[name] = sum(values) / len(values) if values else math.nan
    return out


class RealFakeMetrics(Metric):
    """Accumulates (score, label, generator id, index) and reports `binary_report` per generator and the mean."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, generator_names: Sequence[str] = (), threshold: float = 0.5) -> None:
        super().__init__()
        self.generator_names = list(generator_names)
        self.threshold = threshold
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("groups", default=[], dist_reduce_fx="cat")
        self.add_state("indices", default=[], dist_reduce_fx="cat")

    def update(
        self,
        scores: torch.Tensor,
        labels: torch.Tensor,
        groups: torch.Tensor,
        indices: torch.Tensor | None = None,
    ) -> None:
        if indices is None:
            indices = torch.full_like(labels, -1)
        self.scores.append(scores.detach().float().flatten())
        self.labels.append(labels.detach().long().flatten())
        self.groups.append(groups.detach().long().flatten())
        self.indices.append(indices.detach().long().flatten())

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scores, labels, groups) over all processes, each dataset index counted once."""
        if isinstance(self.scores, list) and not self.scores:  # after a DDP sync the states are tensors
            empty = torch.empty(0)
            return empty, empty.long(), empty.long()
        scores, labels = dim_zero_cat(self.scores), dim_zero_cat(self.labels)
        groups, indices = dim_zero_cat(self.groups), dim_zero_cat(self.indices)
        known = indices >= 0
        if known.any():
            order = torch.argsort(indices, stable=True)
            sorted_idx = indices[order]
            first = torch.ones_like(sorted_idx, dtype=torch.bool)
            first[1:] = sorted_idx[1:] != sorted_idx[:-1]
            keep = torch.zeros_like(known)
            keep[order[first]] = True
            keep |= ~known
            scores, labels, groups = scores[keep], labels[keep], groups[keep]
        return scores, labels, groups

    def name_of(self, group: int) -> str:
        return self.generator_names[group] if 0 <= group < len(self.generator_names) else f"generator_{group}"

    def compute(self) -> dict[str, dict[str, float]]:
        scores, labels, groups = self.gathered()
        labelled = labels >= 0
        scores, labels, groups = scores[labelled], labels[labelled], groups[labelled]
        per_group = {
            self.name_of(int(g)): binary_report(scores[groups == g], labels[groups == g], self.threshold)
            for g in torch.unique(groups).tolist()
        }
        result = dict(sorted(per_group.items()))
        result["mean"] = mean_report(per_group)
        result["pooled"] = binary_report(scores, labels, self.threshold)
        return result


def format_table(
    report: dict[str, dict[str, float]],
    columns: Sequence[str] = ("acc", "real_acc", "fake_acc", "ap"),
    title: str = "",
) -> str:
    """Markdown table: one row per generator then `mean`, one column per metric (values in %)."""
    header = "| generator | n | " + " | ".join(columns) + " |"
    lines = [f"**{title}**", ""] if title else []
    lines += [header, "|" + "---|" * (len(columns) + 2)]
    for name, row in report.items():
        if name == "pooled":
            continue
        cells = [f"{100 * row[c]:.2f}" if not math.isnan(row.get(c, math.nan)) else "n/a" for c in columns]
        lines.append(f"| {name} | {int(row.get('n', 0))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
