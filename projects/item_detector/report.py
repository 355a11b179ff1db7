"""ITEM's tables and figures in the paper's shapes: Tables I-III (ACC / AP / ACC/AP per generator and their
mean), Fig. 4 (AP under each perturbation and level), Figs. 5, 7, 8 (AP of ablation variants), Fig. 9 (t-SNE of
the representation D, real vs generated, per generator).

Builders here are plain functions of metric reports (`common.metrics.RealFakeMetrics.compute()` output:
{generator: {acc, real_acc, fake_acc, ap, ...}, "mean": ..., "pooled": ...}); the model and the
`forgelab item-compare` command write what they return with common.experiment.reporting (CSV + Markdown + W&B).

A test generator whose subset holds one class only (all real or all generated) has no AP; the mean over
generators (`mAP`, `mean AP`) then leaves it out. That is never silent here: its AP cell reads "n/a (one class)"
in the Markdown (empty in CSV/W&B), a note under the table names it, and a warning is logged.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
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
from common.experiment.reporting import log_figure, log_table
from common.io import write_json
from common.perturbations import Perturbation

Report = Mapping[str, Mapping[str, float]]
ONE_CLASS = "n/a (one class)"

log = logging.getLogger("forgelab.item")


def _generators(report: Report) -> list[str]:
    return [name for name in report if name not in ("mean", "pooled")]


def _pct(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(100.0 * value, 2)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], note: str = "") -> str:
    lines = [f"**{title}**", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(v) if not isinstance(v, str) else v for v in row) + " |")
    if note:
        lines += ["", note]
    return "\n".join(lines)


def one_class_generators(report: Report, metric: str = "ap") -> dict[str, str]:
    """Generators whose `metric` is undefined because their test subset holds one class only (the mean over
    generators leaves them out): name -> "only real" / "only generated"."""
    out = {}
    for name in _generators(report):
        row = report[name]
        if row.get("n", 1.0) <= 0 or not math.isnan(row.get(metric, math.nan)):
            continue
        real, fake = (not math.isnan(row.get(k, math.nan)) for k in ("real_acc", "fake_acc"))
        out[name] = (
            "only real" if real and not fake else "only generated" if fake and not real else "one class"
        )
    return out


def left_out_note(excluded: Mapping[str, str], total: int, mean: str = "mAP") -> str:
    """The table note naming the generators a mean leaves out (empty when none is); logs a warning."""
    if not excluded:
        return ""
    names = ", ".join(f"{name} ({why})" for name, why in excluded.items())
    log.warning(
        "%s leaves out %d of %d test generators holding one class only: %s", mean, len(excluded), total, names
    )
    return (
        f"Note: {mean} is the mean over {total - len(excluded)} of {total} test generators; it leaves out "
        f"{names}, whose test images hold one class only."
    )


def _marked(values: Sequence[float | None], names: Sequence[str], excluded: Mapping[str, str]) -> list[Any]:
    """Markdown cells of per-generator AP values: the generators left out of the mean say so."""
    return [ONE_CLASS if name in excluded else value for value, name in zip(values, names)]


def paper_tables(report: Report, method: str) -> tuple[list[str], list[list[Any]], str]:
    """Tables I, II and III of the paper for one method: ACC (at 0.5), AP and "ACC/AP", one column per test
    generator and the mean over generators (the paper's "Avg." / "mAP" / "Total Avg."). The returned rows (for
    CSV and W&B, numeric columns) hold Tables I and II; the Markdown holds all three."""
    generators = _generators(report)
    columns = ["table", "method", *generators, "mean"]
    acc = [_pct(report[g]["acc"]) for g in [*generators, "mean"]]
    ap = [_pct(report[g]["ap"]) for g in [*generators, "mean"]]
    excluded = one_class_generators(report)
    shown_ap = _marked(ap, [*generators, "mean"], excluded)
    both = [f"{_cell(a)}/{p if isinstance(p, str) else _cell(p)}" for a, p in zip(acc, shown_ap)]
    rows = [["I: ACC", method, *acc], ["II: AP", method, *ap]]
    note = left_out_note(excluded, len(generators))
    markdown = "\n\n".join(
        [
            markdown_table(
                "Table I shape: ACC (%, threshold 0.5)", ["method", *generators, "Avg."], [[method, *acc]]
            ),
            markdown_table(
                "Table II shape: AP (%)", ["method", *generators, "mAP"], [[method, *shown_ap]], note
            ),
            markdown_table(
                "Table III shape: ACC/AP (%)", ["method", *generators, "Avg."], [[method, *both]], note
            ),
        ]
    )
    return columns, rows, markdown


# -- Fig. 4: robustness --------------------------------------------------------------------------------------


def robustness_table(reports: Mapping[str, Report]) -> tuple[list[str], list[list[Any]], str]:
    """One row per test condition (perturbation kind and level, in the given order): AP per generator, mean AP
    and mean ACC (%). `reports` maps condition specs ("none", "jpeg:75", ...) to metric reports."""
    generators = sorted({g for report in reports.values() for g in _generators(report)})
    columns = ["perturbation", "level", *[f"ap_{g}" for g in generators], "mean_ap", "mean_acc"]
    rows, shown = [], []
    excluded: dict[str, str] = {}
    for spec, report in reports.items():
        condition = Perturbation.parse(spec)
        level = (
            "-"
            if condition.kind == "none"
            else Perturbation(condition.kind, condition.level).spec.split(":")[1]
        )
        per_generator = [_pct(report[g]["ap"]) if g in report else None for g in generators]
        means = [_pct(report["mean"]["ap"]), _pct(report["mean"]["acc"])]
        rows.append([condition.kind, level, *per_generator, *means])
        one_class = one_class_generators(report)
        excluded |= one_class
        shown.append([condition.kind, level, *_marked(per_generator, generators, one_class), *means])
    headers = ["perturbation", "level", *[f"AP {g}" for g in generators], "mean AP", "mean ACC"]
    note = left_out_note(excluded, len(generators), "mean AP")
    return columns, rows, markdown_table("Fig. 4 shape: AP (%) under perturbations", headers, shown, note)


def robustness_figure(reports: Mapping[str, Report]) -> Any:
    """Fig. 4: one panel per perturbation kind, mean AP (and per generator, thin) against the level, with the
    clean condition as the first point of every panel."""
    parsed = {spec: Perturbation.parse(spec) for spec in reports}
    kinds = [k for k in ("noise", "blur", "jpeg") if any(p.kind == k for p in parsed.values())]
    clean = next((reports[s] for s, p in parsed.items() if p.kind == "none"), None)
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(4.2 * max(1, len(kinds)), 3.6), squeeze=False)
    titles = {"noise": "Gaussian noise (sigma)", "blur": "Gaussian blur (sigma)", "jpeg": "JPEG (quality)"}
    for ax, kind in zip(axes[0], kinds):
        specs = [s for s, p in parsed.items() if p.kind == kind]
        points = ([("clean", clean)] if clean is not None else []) + [
            (s.split(":")[1], reports[s]) for s in specs
        ]
        labels = [label for label, _ in points]
        x = np.arange(len(points))
        for generator in _generators(points[0][1]):
            ap = [100 * r[generator]["ap"] if generator in r else np.nan for _, r in points]
            ax.plot(x, ap, linewidth=0.8, alpha=0.6, marker=".", label=generator)
        ax.plot(
            x,
            [100 * r["mean"]["ap"] for _, r in points],
            linewidth=2.2,
            color="black",
            marker="o",
            label="mean",
        )
        ax.set_xticks(x, labels)
        ax.set(title=titles[kind], ylabel="AP (%)", ylim=(0, 101))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


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
    generators = sorted({g for report in variants.values() for g in _generators(report)})
    columns = ["variant", *generators, "mean"]
    rows, shown = [], []
    excluded: dict[str, str] = {}
    for name, r in variants.items():
        per_generator = [_pct(r[g][metric]) if g in r else None for g in generators]
        rows.append([name, *per_generator, _pct(r["mean"][metric])])
        one_class = one_class_generators(r, metric)
        excluded |= one_class
        shown.append([name, *_marked(per_generator, generators, one_class), _pct(r["mean"][metric])])
    note = left_out_note(excluded, len(generators), f"mean {metric.upper()}")
    return columns, rows, markdown_table(f"{title}: {metric.upper()} (%)", columns, shown, note)


def ablation_figure(variants: Mapping[str, Report], metric: str = "ap", title: str = "ablation") -> Any:
    """Grouped bars: per generator and the mean, one bar per variant."""
    generators = [*sorted({g for report in variants.values() for g in _generators(report)}), "mean"]
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
