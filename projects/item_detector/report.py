"""ITEM's own figures: Fig. 9 (t-SNE of the representation D, real vs generated, per generator) and Figs. 5, 7, 8
(AP of ablation variants across runs, `forgelab item-compare`). Tables I-III and Fig. 4 are every detector's:
they live in common.experiment.detector_report (re-exported here) and `RealFakeTask` writes them.

A test generator whose subset holds one class only has no AP; the ablation table marks it "n/a (one class)" and
names it in a note, as the common tables do.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from common.errors import ConfigError
from common.experiment.detector_report import (
    ONE_CLASS,
    Report,
    left_out_note,
    mark_one_class,
    markdown_table,
    one_class_generators,
    paper_tables,
    percent,
    report_generators,
    robustness_figure,
    robustness_table,
)
from common.experiment.reporting import log_figure, log_table
from common.io import write_json

# Tables I-III and Fig. 4 moved to common (every detector writes them); the names stay importable from here.
__all__ = [
    "ONE_CLASS",
    "ablation_figure",
    "ablation_table",
    "compare_main",
    "paper_tables",
    "read_test_metrics",
    "robustness_figure",
    "robustness_table",
    "tsne_figure",
    "tsne_points",
]

# -- Fig. 9: t-SNE ---------------------------------------------------------------------------------------------


def tsne_points(features: torch.Tensor, seed: int = 0) -> np.ndarray:
    """2-D t-SNE (sklearn; PCA initialisation, perplexity capped for small sets) of (n, d) features.

    sklearn's Barnes-Hut gradient runs OpenMP threads; on a shared or busy CPU they spin against each other and
    a 500-point embedding takes minutes instead of seconds, so it runs on one thread.
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = int(features.shape[0])
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))
    with threadpool_limits(limits=1, user_api="openmp"):
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
            features.detach().float().cpu().numpy()
        )


def tsne_figure(
    representations: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    groups: torch.Tensor,
    names: Sequence[str],
    max_points: int = 500,
    seed: int = 0,
) -> Any:
    """Fig. 9: one row per representation (ITEM's D, and e.g. the CLIP image embedding UniFD classifies), one
    column per generator, real (blue) vs generated (red). Subsets above `max_points` are subsampled
    (deterministically) and say so in their title."""
    group_ids = [g for g in torch.unique(groups).tolist() if g >= 0]
    fig, axes = plt.subplots(
        len(representations),
        max(1, len(group_ids)),
        figsize=(3.4 * max(1, len(group_ids)), 3.2 * len(representations)),
        squeeze=False,
    )
    generator = torch.Generator().manual_seed(seed)
    for col, group in enumerate(group_ids):
        members = torch.nonzero((groups == group) & (labels >= 0)).flatten()
        shown = members
        if len(members) > max_points:
            shown = members[torch.randperm(len(members), generator=generator)[:max_points]].sort().values
        name = names[group] if 0 <= group < len(names) else f"generator_{group}"
        for row, (title, features) in enumerate(representations.items()):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            subset = f"{len(shown)} of {len(members)}" if len(shown) < len(members) else f"n={len(members)}"
            ax.set_title(f"{title}: {name} ({subset})", fontsize=8)
            if len(shown) < 5:
                ax.text(0.5, 0.5, "too few images", ha="center", va="center", transform=ax.transAxes)
                continue
            points = tsne_points(features[shown], seed)
            real = (labels[shown] == 0).numpy()
            ax.scatter(points[real, 0], points[real, 1], s=6, c="tab:blue", label="real")
            ax.scatter(points[~real, 0], points[~real, 1], s=6, c="tab:red", label="generated")
    for ax in axes.flat:
        if ax.collections:  # the first panel with points gets the legend
            ax.legend(fontsize=7, loc="best")
            break
    fig.tight_layout()
    return fig


# -- Figs. 5, 7, 8: ablations across runs ---------------------------------------------------------------------


def ablation_table(
    variants: Mapping[str, Report], metric: str = "ap", title: str = "ablation"
) -> tuple[list[str], list[list[Any]], str]:
    """One row per variant (run), one column per test generator and the mean, values `metric` in %."""
    generators = sorted({g for report in variants.values() for g in report_generators(report)})
    columns = ["variant", *generators, "mean"]
    rows, shown = [], []
    excluded: dict[str, str] = {}
    for name, r in variants.items():
        per_generator = [percent(r[g][metric]) if g in r else None for g in generators]
        rows.append([name, *per_generator, percent(r["mean"][metric])])
        one_class = one_class_generators(r, metric)
        excluded |= one_class
        shown.append(
            [name, *mark_one_class(per_generator, generators, one_class), percent(r["mean"][metric])]
        )
    note = left_out_note(excluded, len(generators), f"mean {metric.upper()}")
    return columns, rows, markdown_table(f"{title}: {metric.upper()} (%)", columns, shown, note)


def ablation_figure(variants: Mapping[str, Report], metric: str = "ap", title: str = "ablation") -> Any:
    """Grouped bars: per generator and the mean, one bar per variant."""
    generators = [*sorted({g for report in variants.values() for g in report_generators(report)}), "mean"]
    width = 0.8 / max(1, len(variants))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(generators) * max(1, len(variants)) * 0.5 + 3), 3.8))
    x = np.arange(len(generators))
    for i, (name, report) in enumerate(variants.items()):
        values = [100 * report[g][metric] if g in report else np.nan for g in generators]
        ax.bar(x + (i - (len(variants) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, generators)
    ax.set(title=title, ylabel=f"{metric.upper()} (%)", ylim=(0, 105))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def read_test_metrics(run_dir: Path) -> dict[str, dict[str, float]]:
    path = run_dir / "test_metrics.json"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: test the run first (forgelab fit ... tests after fitting)")
    return json.loads(path.read_text())


def compare_main(argv: list[str]) -> None:
    """`forgelab item-compare`: the ablation figures (Figs. 5, 7, 8) from the test reports of several runs."""
    parser = argparse.ArgumentParser(
        prog="forgelab item-compare",
        description="Table and bar chart (CSV, Markdown, PNG, W&B) of several ITEM runs' test reports.",
    )
    parser.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="NAME=RUN_DIR",
        help="a variant: name=runs/item_detector/<run>",
    )
    parser.add_argument("--title", default="ITEM ablation")
    parser.add_argument(
        "--metric", default="ap", choices=["ap", "acc", "auroc", "real_acc", "fake_acc", "f1"]
    )
    parser.add_argument(
        "--out", required=True, help="directory for the table and figure (a run-like directory)"
    )
    parser.add_argument("--no-wandb", action="store_true", help="do not log to W&B")
    args = parser.parse_args(argv)
    variants: dict[str, dict[str, dict[str, float]]] = {}
    for item in args.run:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--run expects NAME=RUN_DIR, got {item!r}")
        variants[name] = read_test_metrics(Path(path))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loggers = []
    if not args.no_wandb:
        from lightning.pytorch.loggers import WandbLogger

        from common.experiment.runs import wandb_mode

        loggers.append(
            WandbLogger(
                project="item_detector",
                name=out.name,
                save_dir=str(out),
                mode=wandb_mode(),
                job_type="figure",
            )
        )
    target = SimpleNamespace(default_root_dir=str(out), loggers=loggers)
    columns, rows, markdown = ablation_table(variants, args.metric, args.title)
    log_table(target, "ablation", columns, rows, markdown=markdown)
    log_figure(target, "ablation", ablation_figure(variants, args.metric, args.title))
    write_json(
        out / "run.json",
        {"command": ["item-compare", *argv], "runs": dict(item.partition("=")[::2] for item in args.run)},
    )
    print(markdown)
    print(f"forgelab: ablation table and figure in {out}")
