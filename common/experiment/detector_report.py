"""Every detector's test tables and figures in the shapes of the field's papers (ITEM Tables I-III and Fig. 4,
CNNDetection, UniversalFakeDetect): ACC at 0.5 (real, generated, mean), AP per test generator and their mean;
AP under each perturbation and level of the robustness protocol.

Builders here are plain functions of metric reports (`common.metrics.RealFakeMetrics.compute()` output:
{generator: {acc, real_acc, fake_acc, ap, ...}, "mean": ..., "pooled": ...}); `common.tasks.RealFakeTask` and
the comparison commands write what they return with common.experiment.reporting (CSV + Markdown + W&B). One
method's tables (`paper_tables`, `accuracy_table`, `robustness_table`, `robustness_figure`) and several methods'
(`methods_table`, `methods_robustness_table`, `methods_robustness_figure`: `forgelab benchmark` and
`forgelab compare --table` with `shape: detectors`) share their rows, cells and panels.

A test generator whose subset holds one class only (all real or all generated) has no AP; the mean over
generators (`mAP`, `mean AP`) then leaves it out. That is never silent here: its AP cell reads "n/a (one class)"
in the Markdown (empty in CSV/W&B), a note under the table names it, and a warning is logged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from common.perturbations import Perturbation

Report = Mapping[str, Mapping[str, float]]
ONE_CLASS = "n/a (one class)"

log = logging.getLogger("forgelab.report")


def report_generators(report: Report) -> list[str]:
    """The test generators of a report, in its order (without the `mean` and `pooled` rows)."""
    return [name for name in report if name not in ("mean", "pooled")]


def percent(value: float | None) -> float | None:
    """A metric in % rounded to 2 decimals; None when undefined (NaN)."""
    return None if value is None or math.isnan(value) else round(100.0 * value, 2)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], note: str = "") -> str:
    """A titled Markdown table; numbers as %.2f, None as "-", strings as they are; `note` under it."""
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
    for name in report_generators(report):
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


def mark_one_class(
    values: Sequence[float | None], names: Sequence[str], excluded: Mapping[str, str]
) -> list[Any]:
    """Markdown cells of per-generator AP values: the generators left out of the mean say so."""
    return [ONE_CLASS if name in excluded else value for value, name in zip(values, names)]


def paper_tables(report: Report, method: str) -> tuple[list[str], list[list[Any]], str]:
    """Tables I, II and III of the paper for one method: ACC (at 0.5), AP and "ACC/AP", one column per test
    generator and the mean over generators (the paper's "Avg." / "mAP" / "Total Avg."). The returned rows (for
    CSV and W&B, numeric columns) hold Tables I and II; the Markdown holds all three."""
    generators = report_generators(report)
    columns = ["table", "method", *generators, "mean"]
    acc = [percent(report[g]["acc"]) for g in [*generators, "mean"]]
    ap = [percent(report[g]["ap"]) for g in [*generators, "mean"]]
    excluded = one_class_generators(report)
    shown_ap = mark_one_class(ap, [*generators, "mean"], excluded)
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
            accuracy_table(report, method, excluded, note),
        ]
    )
    return columns, rows, markdown


def _accuracy_headers(generators: Sequence[str]) -> list[str]:
    headers = []
    for name in [*generators, "mean"]:
        headers += [
            f"{name} real ACC",
            f"{name} fake ACC",
            f"{name} ACC",
            "mAP" if name == "mean" else f"{name} AP",
        ]
    return headers


def _accuracy_cells(
    report: Report, generators: Sequence[str], excluded: Mapping[str, str]
) -> tuple[list, list]:
    """(numeric cells, Markdown cells) of one method's row: real/fake/mean ACC and AP per generator, then the
    means; a generator the report lacks is None, one left out of the mean (one class) says so in Markdown."""
    numbers: list[Any] = []
    shown: list[Any] = []
    for name in [*generators, "mean"]:
        row = report.get(name, {})
        accs = [percent(row.get(k, math.nan)) for k in ("real_acc", "fake_acc", "acc")]
        ap = percent(row.get("ap", math.nan))
        numbers += [*accs, ap]
        shown += [*accs, ONE_CLASS if name in excluded else ap]
    return numbers, shown


ACCURACY_TITLE = "ACC real / generated / mean (%, threshold 0.5) and AP (%)"


def accuracy_table(
    report: Report, method: str, excluded: Mapping[str, str] | None = None, note: str | None = None
) -> str:
    """The detail behind Tables I-II, as CNNDetection and UniversalFakeDetect report it: per test generator
    the ACC on real images, on generated images and overall (at 0.5), and AP; then their means over generators.
    One row for `method` (Markdown; the numbers are in test_per_generator.csv too). `excluded` and `note`
    (the one-class generators and their note) are computed when not given."""
    generators = report_generators(report)
    if excluded is None:
        excluded = one_class_generators(report)
    if note is None:
        note = left_out_note(excluded, len(generators))
    _, shown = _accuracy_cells(report, generators, excluded)
    headers = ["method", *_accuracy_headers(generators)]
    return markdown_table(ACCURACY_TITLE, headers, [[method, *shown]], note)


def methods_table(methods: Mapping[str, Report | str]) -> tuple[list[str], list[list[Any]], str]:
    """`accuracy_table` for several methods on the same test generators (ITEM Tables I-II, one row per
    method): `methods` maps each method's row name to its test report, or to the error line of a run that
    failed (its row says so, its cells are empty). Columns are the union of the reports' generators in order
    of appearance; a generator one report lacks is empty in that row. Returns (CSV columns, numeric rows with a
    `status` column, Markdown)."""
    reports = {name: r for name, r in methods.items() if not isinstance(r, str)}
    generators = list(dict.fromkeys(g for r in reports.values() for g in report_generators(r)))
    excluded: dict[str, str] = {}
    for report in reports.values():
        excluded |= one_class_generators(report)
    headers = _accuracy_headers(generators)
    rows, shown_rows = [], []
    for name, report in methods.items():
        if isinstance(report, str):
            rows.append([name, f"failed: {report}", *[None] * len(headers)])
            shown_rows.append([f"{name} (failed: {report})", *[None] * len(headers)])
            continue
        numbers, shown = _accuracy_cells(report, generators, one_class_generators(report))
        rows.append([name, "completed", *numbers])
        shown_rows.append([name, *shown])
    note = left_out_note(excluded, len(generators))
    markdown = markdown_table(ACCURACY_TITLE, ["method", *headers], shown_rows, note)
    return ["method", "status", *headers], rows, markdown


# -- Fig. 4: robustness --------------------------------------------------------------------------------------


def condition_cells(spec: str) -> tuple[str, str]:
    """(perturbation kind, level as written in the tables) of a test condition; the clean one has level "-"."""
    condition = Perturbation.parse(spec)
    if condition.kind == "none":
        return condition.kind, "-"
    return condition.kind, Perturbation(condition.kind, condition.level).spec.split(":")[1]


def robustness_table(reports: Mapping[str, Report]) -> tuple[list[str], list[list[Any]], str]:
    """One row per test condition (perturbation kind and level, in the given order): AP per generator, mean AP
    and mean ACC (%). `reports` maps condition specs ("none", "jpeg:75", ...) to metric reports."""
    generators = sorted({g for report in reports.values() for g in report_generators(report)})
    columns = ["perturbation", "level", *[f"ap_{g}" for g in generators], "mean_ap", "mean_acc"]
    rows, shown = [], []
    excluded: dict[str, str] = {}
    for spec, report in reports.items():
        kind, level = condition_cells(spec)
        per_generator = [percent(report[g]["ap"]) if g in report else None for g in generators]
        means = [percent(report["mean"]["ap"]), percent(report["mean"]["acc"])]
        rows.append([kind, level, *per_generator, *means])
        one_class = one_class_generators(report)
        excluded |= one_class
        shown.append([kind, level, *mark_one_class(per_generator, generators, one_class), *means])
    headers = ["perturbation", "level", *[f"AP {g}" for g in generators], "mean AP", "mean ACC"]
    note = left_out_note(excluded, len(generators), "mean AP")
    return columns, rows, markdown_table("Fig. 4 shape: AP (%) under perturbations", headers, shown, note)


def methods_robustness_table(
    methods: Mapping[str, Mapping[str, Report]],
) -> tuple[list[str], list[list[Any]], str]:
    """Fig. 4 for several methods: one row per test condition (the union of the methods' conditions, in order
    of appearance), the mean AP (%) over generators of each method; empty where a method lacks the condition.
    `methods` maps each method's name to its {condition: report} (a run's test_robustness.json)."""
    specs = list(dict.fromkeys(spec for reports in methods.values() for spec in reports))
    rows = []
    for spec in specs:
        values = [
            percent(reports[spec]["mean"]["ap"]) if spec in reports else None for reports in methods.values()
        ]
        rows.append([*condition_cells(spec), *values])
    headers = ["perturbation", "level", *[f"{name} mean AP" for name in methods]]
    columns = ["perturbation", "level", *[f"mean_ap_{name}" for name in methods]]
    return columns, rows, markdown_table("Fig. 4 shape: mean AP (%) under perturbations", headers, rows)


KIND_TITLES = {"noise": "Gaussian noise (sigma)", "blur": "Gaussian blur (sigma)", "jpeg": "JPEG (quality)"}


def robustness_points(reports: Mapping[str, Report]) -> dict[str, list[tuple[str, Report]]]:
    """Per perturbation kind (noise, blur, jpeg: those present), the (x label, report) points of its curve:
    the clean condition first ("clean"), then the kind's levels in the given order."""
    parsed = {spec: Perturbation.parse(spec) for spec in reports}
    clean = next((reports[s] for s, p in parsed.items() if p.kind == "none"), None)
    points = {}
    for kind in KIND_TITLES:
        specs = [s for s, p in parsed.items() if p.kind == kind]
        if specs:
            start = [("clean", clean)] if clean is not None else []
            points[kind] = start + [(condition_cells(s)[1], reports[s]) for s in specs]
    return points


def _panels(kinds: Sequence[str]) -> tuple[Any, list[Any]]:
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(4.2 * max(1, len(kinds)), 3.6), squeeze=False)
    return fig, list(axes[0])


def _finish_panel(ax: Any, kind: str, labels: Sequence[str]) -> None:
    ax.set_xticks(np.arange(len(labels)), labels)
    ax.set(title=KIND_TITLES[kind], ylabel="AP (%)", ylim=(0, 101))
    ax.grid(alpha=0.3)


def robustness_figure(reports: Mapping[str, Report]) -> Any:
    """Fig. 4: one panel per perturbation kind, mean AP (and per generator, thin) against the level, with the
    clean condition as the first point of every panel."""
    points_by_kind = robustness_points(reports)
    fig, axes = _panels(list(points_by_kind))
    for ax, (kind, points) in zip(axes, points_by_kind.items()):
        x = np.arange(len(points))
        for generator in report_generators(points[0][1]):
            ap = [100 * r[generator]["ap"] if generator in r else np.nan for _, r in points]
            ax.plot(x, ap, linewidth=0.8, alpha=0.6, marker=".", label=generator)
        mean = [100 * r["mean"]["ap"] for _, r in points]
        ax.plot(x, mean, linewidth=2.2, color="black", marker="o", label="mean")
        _finish_panel(ax, kind, [label for label, _ in points])
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def methods_robustness_figure(methods: Mapping[str, Mapping[str, Report]]) -> Any:
    """Fig. 4 for several methods: one panel per perturbation kind, one line per method (its mean AP over
    generators) against the level, clean first; a level one method lacks is a gap in its line."""
    curves = {name: robustness_points(reports) for name, reports in methods.items()}
    kinds = [k for k in KIND_TITLES if any(k in c for c in curves.values())]
    fig, axes = _panels(kinds)
    for ax, kind in zip(axes, kinds):
        labels = list(dict.fromkeys(label for c in curves.values() for label, _ in c.get(kind, [])))
        for name, points in curves.items():
            by_label = {label: 100 * r["mean"]["ap"] for label, r in points.get(kind, [])}
            if by_label:
                values = [by_label.get(label, np.nan) for label in labels]
                ax.plot(np.arange(len(labels)), values, linewidth=1.8, marker="o", label=name)
        _finish_panel(ax, kind, labels)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig
