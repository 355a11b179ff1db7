"""`forgelab compare <run or sweep dirs...>`: one table and a few plots for a set of runs, with no server.

    forgelab compare runs/sweeps/classifier_tiny                 # a sweep (forgelab sweep): its trials
    forgelab compare runs/inpaint_probe --group table3           # every run below a folder, one W&B group
    forgelab compare runs/inpaint_probe/run-a runs/inpaint_probe/run-b
    forgelab compare runs/sweeps/classifier_table3 --table configs/inpaint_probe/tables/table3.yaml
    forgelab compare --sweep <W&B sweep id>                      # runs of `wandb agent` below runs/
    forgelab compare --group table3                              # one group's runs below runs/
    forgelab compare --wandb <entity>/<project> --sweep <id>     # the same from W&B's server (online)

Writes `<out>/compare.md` (and .csv): one row per run with the config keys that differ between the runs (the
swept parameters first), the best and final value of the chosen metric (default: the sweep's metric, else
val/loss) and the test metrics (mean over generators), plus a per-generator test table when the runs have one;
`<out>/plots/metric_vs_params.png` (the metric against each swept parameter) and `<out>/plots/curves.png`
(learning curves overlaid). `--table <spec.yaml>` adds a paper-shaped table (rows named by a config key, named
metric columns; see configs/inpaint_probe/tables/table3.yaml).

Everything is read from the run directories forgelab writes (config.yaml, run.json, metrics.csv,
test_metrics.json; a sweep's sweep.json), so it works on offline runs and on a laptop holding copied run folders.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import yaml
from matplotlib.ticker import MaxNLocator

from common.errors import ConfigError, ForgelabError
from common.experiment.configs import flatten_config
from common.io import save_figure, write_csv, write_text

SWEEP_STATE = "sweep.json"  # a sweep directory's state (common/experiment/sweep.py)

# config keys that differ between any two runs without saying anything about them
IGNORED_KEYS = {"run.name", "run.root", "run.notes", "ckpt_path", "trainer.default_root_dir"}
# metric names whose lower values are better; every other metric is better higher
LOWER_IS_BETTER = ("loss", "fid", "fd_", "err", "niqe", "lpips", "mse", "kid", "ece")
# what a table spec can be: named metric columns, or the detectors' table of `forgelab benchmark`
TABLE_SHAPES = ("columns", "detectors")
# test report entries that are not generators
NOT_GENERATORS = ("mean", "pooled")


def metric_goal(name: str) -> str:
    """ "minimize" for losses, errors and distances (FID, NIQE ...), "maximize" for the rest."""
    return "minimize" if any(word in name.lower() for word in LOWER_IS_BETTER) else "maximize"


def display_key(key: str) -> str:
    """`model.init_args.lr` (a jsonargparse key, as swept) -> `model.lr` (the flat key on dashboards)."""
    return ".".join(part for part in key.split(".") if part != "init_args")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_metrics_csv(path: str | Path) -> list[dict[str, float]]:
    """metrics.csv rows as {column: value}, empty cells left out. Tolerates a file being written right now (a
    running trial): a cell that is not a number is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            values = {}
            for key, text in row.items():
                if key is None or text in (None, ""):
                    continue
                try:
                    values[key] = float(text)
                except (TypeError, ValueError):
                    continue
            if values:
                rows.append(values)
    return rows


# -- runs -------------------------------------------------------------------------------------------------------
@dataclass
class RunRecord:
    """What a comparison needs from one run, whether read from its directory or from W&B."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)  # flat keys, as sent to W&B (model.backbone ...)
    history: list[dict[str, float]] = field(default_factory=list)  # metrics.csv rows / W&B history
    summary: dict[str, float] = field(default_factory=dict)  # last value of every metric
    test_report: dict[str, dict[str, float]] = field(default_factory=dict)  # generator -> metric -> value
    state: str = ""  # sweep trials: finished | stopped | failed | running ...
    params: dict[str, Any] = field(default_factory=dict)  # swept values (sweep trials)
    group: str | None = None
    sweep_id: str | None = None  # W&B's sweep id (runs of `wandb agent`), or the `forgelab sweep` name
    path: str = ""

    def value(self, key: str) -> float | None:
        """A final scalar: `test/<generator>/<metric>` from the test report, anything else from the summary."""
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "test" and parts[1] in self.test_report:
            found = self.test_report[parts[1]].get(parts[2])
            if found is not None and _is_number(found):
                return float(found)
        found = self.summary.get(key)
        return float(found) if found is not None and _is_number(found) else None

    def curve(self, metric: str) -> list[tuple[float, float]]:
        """(epoch, value) of every logged value of `metric` (the row index when there is no epoch)."""
        return [
            (row.get("epoch", float(i)), row[metric]) for i, row in enumerate(self.history) if metric in row
        ]

    def best(self, metric: str, goal: str) -> tuple[float, float] | None:
        """(best value, its epoch)."""
        points = self.curve(metric)
        if not points:
            return None
        epoch, value = (min if goal == "minimize" else max)(points, key=lambda p: p[1])
        return value, epoch

    def param(self, key: str) -> Any:
        if key in self.params:
            return self.params[key]
        return self.config.get(display_key(key), self.config.get(key))


def summary_of(history: Iterable[dict[str, float]]) -> dict[str, float]:
    summary: dict[str, float] = {}
    for row in history:
        summary.update(row)
    return summary


def report_from_summary(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """`test/<generator>/<metric>` keys -> {generator: {metric: value}} (for runs without test_metrics.json)."""
    report: dict[str, dict[str, float]] = {}
    for key, value in summary.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "test" and _is_number(value):
            report.setdefault(parts[1], {})[parts[2]] = float(value)
    return report


def load_run_dir(path: str | Path) -> RunRecord:
    """A forgelab run directory: config.yaml, run.json, metrics.csv, test_metrics.json (each optional)."""
    path = Path(path)
    config: dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        try:
            config = flatten_config(yaml.safe_load((path / "config.yaml").read_text()) or {})
        except yaml.YAMLError:
            config = {}
    record_path = path / "run.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    history = read_metrics_csv(path / "metrics.csv")
    summary = summary_of(history)
    report: dict[str, dict[str, float]] = report_from_summary(summary)
    if (path / "test_metrics.json").is_file():
        loaded = json.loads((path / "test_metrics.json").read_text())
        report = {g: {k: v for k, v in row.items() if _is_number(v)} for g, row in loaded.items()}
    return RunRecord(
        name=record.get("name", path.name),
        config=config,
        history=history,
        summary=summary,
        test_report=report,
        group=record.get("group", config.get("run.group")),
        sweep_id=record.get("wandb_sweep_id"),
        path=str(path),
        state=_state_of(record.get("outcome", "")),
    )


def _state_of(outcome: str) -> str:
    """A run.json outcome in the words of sweep states: finished, failed, interrupted (empty when unknown)."""
    return "finished" if outcome == "completed" else outcome.split(":")[0]


def load_sweep_dir(path: str | Path) -> tuple[list[RunRecord], dict[str, Any]]:
    """A `forgelab sweep` directory: every trial (failed ones too) with its state and swept values."""
    path = Path(path)
    state = json.loads((path / SWEEP_STATE).read_text())
    records = []
    for trial in state.get("trials", []):
        name = f"trial-{int(trial['index']):03d}"
        record = load_run_dir(path / name)
        record.name, record.state, record.params = (
            name,
            trial.get("state", ""),
            dict(trial.get("params") or {}),
        )
        record.group = record.sweep_id = state.get("name", path.name)
        records.append(record)
    definition = state.get("definition") or {}
    return records, sweep_info(state.get("name", path.name), definition)


def sweep_info(name: str, definition: dict[str, Any]) -> dict[str, Any]:
    """What a comparison needs from a sweep definition: its metric, and which parameters vary and how."""
    metric = definition.get("metric") or {}
    parameters = definition.get("parameters") or {}
    return {
        "name": name,
        "metric": metric.get("name"),
        "goal": metric.get("goal"),
        "parameters": [
            k for k, spec in parameters.items() if not (isinstance(spec, dict) and "value" in spec)
        ],
        "categorical": [k for k, spec in parameters.items() if isinstance(spec, dict) and "values" in spec],
        "log": [k for k, spec in parameters.items() if "log" in str((spec or {}).get("distribution", ""))],
    }


def collect(paths: Sequence[str | Path]) -> tuple[list[RunRecord], list[dict[str, Any]]]:
    """Runs and sweeps at or below each path (a sweep's trials are read through the sweep)."""
    records: list[RunRecord] = []
    infos: list[dict[str, Any]] = []
    for root in map(Path, paths):
        if not root.exists():
            raise ForgelabError(f"{root} does not exist")
        found_before = len(records)
        for directory, subdirs, files in os.walk(root):
            subdirs.sort()
            if SWEEP_STATE in files:
                sweep_records, info = load_sweep_dir(directory)
                records += sweep_records
                infos.append(info)
                subdirs.clear()
            elif "run.json" in files or (directory == str(root) and "metrics.csv" in files):
                records.append(load_run_dir(directory))
                subdirs.clear()
            else:
                subdirs[:] = [d for d in subdirs if d not in ("wandb", "checkpoints", "plots", "compare")]
        if len(records) == found_before:
            raise ForgelabError(f"no run directories (run.json) or sweeps ({SWEEP_STATE}) at or below {root}")
    return records, infos


# -- W&B --------------------------------------------------------------------------------------------------------
def record_from_wandb_run(run: Any) -> RunRecord:
    """A `wandb.Api()` run as a RunRecord (its flat config, sampled history and summary)."""
    config = {k: v for k, v in dict(run.config).items() if not str(k).startswith("_")}
    rows = run.history(samples=2000, pandas=False)
    history = [
        {k: float(v) for k, v in row.items() if not str(k).startswith("_") and _is_number(v)} for row in rows
    ]
    summary = {
        k: float(v) for k, v in dict(run.summary).items() if not str(k).startswith("_") and _is_number(v)
    }
    return RunRecord(
        name=run.name,
        config=config,
        history=[row for row in history if row],
        summary=summary,
        test_report=report_from_summary(summary),
        state=str(run.state),
        group=getattr(run, "group", None),
        sweep_id=getattr(getattr(run, "sweep", None), "id", None),
        path=getattr(run, "url", ""),
    )


def load_wandb(
    path: str, sweep: str | None = None, group: str | None = None
) -> tuple[list[RunRecord], list[dict]]:
    """Runs of a W&B project (`entity/project`), one sweep or one group of it. Needs W&B online (`wandb login`);
    the offline equivalent is the local run directories."""
    import wandb

    try:
        api = wandb.Api()
        if sweep:
            sweep_obj = api.sweep(f"{path}/{sweep}")
            runs = list(sweep_obj.runs)
            infos = [sweep_info(sweep, dict(sweep_obj.config))]
            parameters = infos[0]["parameters"]
        else:
            runs = list(api.runs(path, filters={"group": group} if group else None))
            infos, parameters = [], []
    except Exception as err:  # wandb's CommError/UsageError/ValueError when offline or not logged in
        raise ForgelabError(
            f"cannot read W&B project {path}: {err} (online and `wandb login` needed)"
        ) from None
    records = [record_from_wandb_run(run) for run in runs]
    for record in records:
        record.params = {key: record.config[key] for key in parameters if key in record.config}
    return records, infos


# -- tables -----------------------------------------------------------------------------------------------------
def _format(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return f"{value:.{digits}f}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.3g}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_format(v, digits).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines)


def differing_keys(records: Sequence[RunRecord]) -> list[str]:
    """Config keys whose values are not the same in every run (runs without a config are left out)."""
    configs = [r.config for r in records if r.config]
    if len(configs) < 2:
        return []
    keys = sorted(set().union(*configs))
    out = []
    for key in keys:
        if key in IGNORED_KEYS or "__path__" in key:
            continue
        values = {json.dumps(c.get(key), sort_keys=True, default=str) for c in configs}
        if len(values) > 1:
            out.append(key)
    return out


def final_test_columns(records: Sequence[RunRecord]) -> list[str]:
    """`test/mean/<metric>` when the runs have a per-generator test report, else the plain `test/<metric>`s."""
    ordered: list[str] = []
    for record in records:
        for metric in record.test_report.get("mean", {}):
            if metric != "n" and f"test/mean/{metric}" not in ordered:
                ordered.append(f"test/mean/{metric}")
    if ordered:
        return ordered
    keys = {k for r in records for k in r.summary if k.startswith("test/") and k.count("/") == 1}
    return sorted(keys)


@dataclass
class Comparison:
    """The choices a comparison is made of (metric, its goal, the parameters, the columns)."""

    records: list[RunRecord]
    metric: str | None
    goal: str
    params: list[str]
    other_keys: list[str]
    tests: list[str]
    categorical: set[str] = field(default_factory=set)
    log_scale: set[str] = field(default_factory=set)  # parameters searched on a log scale

    @classmethod
    def build(
        cls,
        records: Sequence[RunRecord],
        infos: Sequence[dict[str, Any]] = (),
        metric: str | None = None,
        goal: str | None = None,
    ) -> Comparison:
        records = list(records)
        sweep_metrics = {i.get("metric") for i in infos if i.get("metric")}
        if metric is None and len(sweep_metrics) == 1:
            metric = next(iter(sweep_metrics))
        logged = {k for r in records for row in r.history for k in row}
        if metric is None:
            metric = (
                "val/loss"
                if "val/loss" in logged
                else next((k for k in sorted(logged) if k.startswith("val/")), None)
            )
        if goal is None:
            goal = next((i["goal"] for i in infos if i.get("metric") == metric and i.get("goal")), None)
        goal = goal or (metric_goal(metric) if metric else "minimize")
        params: list[str] = []
        categorical: set[str] = set()
        log_scale: set[str] = set()
        for info in infos:
            params += [p for p in info.get("parameters", []) if p not in params]
            categorical |= set(info.get("categorical", []))
            log_scale |= set(info.get("log", []))
        shown = {display_key(p) for p in params}
        other = [k for k in differing_keys(records) if k not in shown]
        return cls(records, metric, goal, params, other, final_test_columns(records), categorical, log_scale)

    def sort_key(self, record: RunRecord) -> tuple[int, float]:
        best = record.best(self.metric, self.goal) if self.metric else None
        if best is None:
            return 1, 0.0
        return 0, best[0] if self.goal == "minimize" else -best[0]

    def labels(self) -> dict[int, str]:
        names = [r.name for r in self.records]
        unique = len(set(names)) == len(names)
        return {id(r): r.name if unique or not r.group else f"{r.group}/{r.name}" for r in self.records}

    def main_table(self) -> tuple[list[str], list[list[Any]]]:
        header = ["run"]
        with_state = any(r.state for r in self.records)
        if with_state:
            header.append("state")
        header += [display_key(p) for p in self.params] + self.other_keys
        if self.metric:
            header += [f"best {self.metric}", "epoch", f"final {self.metric}"]
        header += self.tests
        labels = self.labels()
        rows = []
        for record in sorted(self.records, key=self.sort_key):
            row: list[Any] = [labels[id(record)]]
            if with_state:
                row.append(record.state or "")
            row += [_param_text(record.param(p)) for p in self.params]
            row += [record.config.get(k) for k in self.other_keys]
            if self.metric:
                best = record.best(self.metric, self.goal)
                points = record.curve(self.metric)
                row += [
                    best[0] if best else None,
                    int(best[1]) if best else None,
                    points[-1][1] if points else None,
                ]
            row += [record.value(k) for k in self.tests]
            rows.append(row)
        return header, rows

    def generator_table(self) -> tuple[list[str], list[list[Any]]]:
        """run x generator rows of the test report (empty when no run has more than the mean)."""
        metrics: list[str] = []
        for record in self.records:
            for generator, row in record.test_report.items():
                if generator not in NOT_GENERATORS:
                    metrics += [m for m in row if m not in metrics]
        if not metrics:
            return [], []
        labels = self.labels()
        rows = []
        for record in sorted(self.records, key=self.sort_key):
            generators = [g for g in record.test_report if g not in NOT_GENERATORS]
            for generator in [*generators, "mean"] if generators else []:
                values = record.test_report.get(generator, {})
                rows.append([labels[id(record)], generator, *(values.get(m) for m in metrics)])
        header = ["run", "generator", *metrics]
        return header, [
            [int(v) if h == "n" and v is not None else v for h, v in zip(header, r)] for r in rows
        ]


def _param_text(value: Any) -> Any:
    """Parameter values keep their significant digits (a learning rate of 0.00037 is not 0.0004)."""
    return f"{value:.4g}" if isinstance(value, float) else value


# -- plots ------------------------------------------------------------------------------------------------------
def _numeric(values: Sequence[Any]) -> bool:
    return all(_is_number(v) for v in values)


def metric_vs_params_figure(comparison: Comparison, keys: Sequence[str]) -> Any | None:
    """One panel per parameter that varies: the best value of the metric of each run against the run's value.
    Values from a `values:` list (and strings) are categories; continuous ones spanning decades get a log axis."""
    metric = comparison.metric
    if not metric:
        return None
    points: dict[str, list[tuple[Any, float, bool]]] = {key: [] for key in keys}
    for record in comparison.records:
        best = record.best(metric, comparison.goal)
        if best is None:
            continue
        for key in keys:
            value = record.param(key) if key in comparison.params else record.config.get(key)
            if value is not None:
                points[key].append((value, best[0], record.state == "stopped"))
    keys = [k for k in keys if len({json.dumps(x, default=str) for x, _, _ in points[k]}) > 1]
    if not keys:
        return None
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        xs, ys, stopped = zip(*points[key])
        if _numeric(xs) and key not in comparison.categorical:
            positions = list(xs)
            low, high = min(xs), max(xs)
            positive = [x for x in xs if x > 0]
            if low > 0 and (high / low >= 20 or key in comparison.log_scale):
                ax.set_xscale("log")
            elif low == 0 and positive and max(positive) / min(positive) >= 20:
                ax.set_xscale("symlog", linthresh=min(positive))
        else:
            ordered = sorted(set(xs), key=lambda x: (not _is_number(x), x if _is_number(x) else str(x)))
            labels = [_param_text(x) if _is_number(x) else str(x) for x in ordered]
            positions = [ordered.index(x) for x in xs]
            ax.set_xticks(range(len(ordered)))
            ax.set_xticklabels(
                [str(c) if len(str(c)) <= 18 else str(c)[:16] + ".." for c in labels],
                rotation=30,
                ha="right",
                fontsize=7,
            )
            ax.set_xlim(-0.5, len(ordered) - 0.5)
        done = [i for i, s in enumerate(stopped) if not s]
        early = [i for i, s in enumerate(stopped) if s]
        ax.scatter([positions[i] for i in done], [ys[i] for i in done], label="finished")
        if early:
            ax.scatter(
                [positions[i] for i in early], [ys[i] for i in early], marker="x", label="stopped early"
            )
            ax.legend(fontsize=7)
        ax.set(xlabel=display_key(key), ylabel=f"best {metric}")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(f"{metric} ({comparison.goal}) against each parameter", fontsize=10)
    fig.tight_layout()
    return fig


def curves_figure(comparison: Comparison) -> Any | None:
    """The metric (and the losses) per epoch, one line per run."""
    logged = {k for r in comparison.records for row in r.history for k in row}
    metrics = [
        m for m in dict.fromkeys([comparison.metric, "val/loss", "train/loss_epoch"]) if m and m in logged
    ]
    if not metrics:
        return None
    labels = comparison.labels()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for record in comparison.records:
            points = record.curve(metric)
            if points:
                style = "--" if record.state == "stopped" else "-"
                ax.plot(*zip(*points), style, marker="o", markersize=3, label=labels[id(record)])
        ax.set(xlabel="epoch", ylabel=metric, title=metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles, names = axes.flat[0].get_legend_handles_labels()
    if handles and len(handles) <= 16:
        axes.flat[-1].legend(handles, names, fontsize=7, loc="best")
    fig.tight_layout()
    return fig


# -- paper-shaped tables ----------------------------------------------------------------------------------------
@dataclass
class TableSpec:
    """A paper table as data: rows named by a config key, named metric columns (see table3.yaml); or, with
    `shape: detectors`, the detectors' table of `forgelab benchmark` (configs/benchmarks/tables/detectors.yaml:
    ACC real/fake/mean and AP per test generator and their means, one row per detector)."""

    name: str
    title: str
    row: str
    columns: dict[str, str]
    shape: str = "columns"
    row_header: str = "run"
    row_names: dict[str, str] = field(default_factory=dict)
    generator: str = "mean"
    digits: int = 4


def load_table_spec(path: str | Path) -> TableSpec:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"table spec {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    shape = str(data.get("shape", "columns"))
    if shape not in TABLE_SHAPES:
        raise ConfigError(f"table spec {path}: shape must be one of {', '.join(TABLE_SHAPES)}, got {shape}")
    missing = [k for k in ("row", "columns") if k not in data and (k == "row" or shape == "columns")]
    if missing:
        raise ConfigError(f"table spec {path} lacks {', '.join(missing)}")
    if shape == "columns" and (not isinstance(data["columns"], dict) or not data["columns"]):
        raise ConfigError(
            f"table spec {path}: columns must map a header to a metric, e.g. Accuracy: test/{{generator}}/acc"
        )
    known = {"name", "title", "row", "columns", "row_header", "row_names", "generator", "digits", "shape"}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"table spec {path}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    return TableSpec(
        name=str(data.get("name", path.stem)),
        title=str(data.get("title", path.stem)),
        row=str(data["row"]),
        columns={str(k): str(v) for k, v in (data.get("columns") or {}).items()},
        shape=shape,
        row_header=str(data.get("row_header", "run")),
        row_names={str(k): str(v) for k, v in (data.get("row_names") or {}).items()},
        generator=str(data.get("generator", "mean")),
        digits=int(data.get("digits", 4)),
    )


def _row_name(spec: TableSpec, value: Any) -> str:
    text = str(value)
    return spec.row_names.get(text) or spec.row_names.get(text.split(".")[0]) or text


def render_table_spec(
    spec: TableSpec, records: Sequence[RunRecord], generator: str | None = None
) -> tuple[str, list[str], list[list[Any]]]:
    """One row per distinct value of `spec.row` (runs sharing it, e.g. seeds, are averaged and counted)."""
    if spec.shape == "detectors":
        return render_detectors_table(spec, records)
    generator = generator or spec.generator
    available = sorted({g for r in records for g in r.test_report})
    keys = {header: metric.format(generator=generator) for header, metric in spec.columns.items()}
    if any("{generator}" in m for m in spec.columns.values()) and available and generator not in available:
        raise ForgelabError(
            f"no test results for generator '{generator}'; the runs have: {', '.join(available)}"
        )
    grouped: dict[str, list[RunRecord]] = {}
    for record in records:
        if record.state in ("failed", "running", "pending", "preempted"):
            continue
        value = record.param(spec.row) if record.param(spec.row) is not None else record.config.get(spec.row)
        if value is None or not any(record.value(k) is not None for k in keys.values()):
            continue
        grouped.setdefault(_row_name(spec, value), []).append(record)
    if not grouped:
        raise ForgelabError(
            f"no run has both '{spec.row}' in its config and any of {', '.join(keys.values())} (finished runs only)"
        )
    order = list(dict.fromkeys(spec.row_names.values()))
    names = sorted(
        grouped, key=lambda n: (order.index(n) if n in order else len(order), list(grouped).index(n))
    )
    repeated = any(len(grouped[n]) > 1 for n in names)
    header = [spec.row_header, *spec.columns] + (["runs"] if repeated else [])
    rows = []
    for name in names:
        row: list[Any] = [name]
        for key in keys.values():
            values = [v for v in (r.value(key) for r in grouped[name]) if v is not None]
            row.append(sum(values) / len(values) if values else None)
        if repeated:
            row.append(len(grouped[name]))
        rows.append(row)
    subset = f" (test subset: {generator})" if any("{generator}" in m for m in spec.columns.values()) else ""
    note = "\n\nRows averaged over the runs counted in `runs`." if repeated else ""
    markdown = f"**{spec.title}**{subset}\n\n" + markdown_table(header, rows, spec.digits) + note
    return markdown, header, rows


def render_detectors_table(
    spec: TableSpec, records: Sequence[RunRecord]
) -> tuple[str, list[str], list[list[Any]]]:
    """`shape: detectors`: the finished runs' test reports (test_metrics.json) as `forgelab benchmark`'s table,
    by the same function (`detector_report.methods_table`); runs sharing a row name are averaged."""
    from common.experiment.detector_report import methods_table

    grouped: dict[str, list[RunRecord]] = {}
    for record in records:
        value = record.param(spec.row)
        if record.state == "finished" and value is not None and record.test_report:
            grouped.setdefault(_row_name(spec, value), []).append(record)
    if not grouped:
        raise ForgelabError(f"no finished run has both '{spec.row}' in its config and a test report")
    order = list(dict.fromkeys(spec.row_names.values()))
    names = sorted(grouped, key=lambda n: (order.index(n) if n in order else len(order), n))
    reports = {name: mean_report([r.test_report for r in grouped[name]]) for name in names}
    _columns, rows, markdown = methods_table(reports)
    counts = {name: len(grouped[name]) for name in names if len(grouped[name]) > 1}
    note = f"\n\nRows averaged over several runs: {counts}." if counts else ""
    return f"**{spec.title}**\n\n{markdown}{note}", _columns, rows


def mean_report(reports: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Metric by metric mean of several test reports (a metric some report lacks is averaged over the others)."""
    out: dict[str, dict[str, float]] = {}
    for generator in dict.fromkeys(g for r in reports for g in r):
        metrics = dict.fromkeys(m for r in reports for m in r.get(generator, {}))
        values = {m: [r[generator][m] for r in reports if m in r.get(generator, {})] for m in metrics}
        out[generator] = {m: sum(v) / len(v) for m, v in values.items()}
    return out


# -- the whole comparison ---------------------------------------------------------------------------------------
def compare_runs(
    records: Sequence[RunRecord],
    out: str | Path,
    sweeps_info: Sequence[dict[str, Any]] = (),
    metric: str | None = None,
    goal: str | None = None,
    table: TableSpec | None = None,
    generator: str | None = None,
) -> str:
    """Write compare.md/.csv, per_generator.csv and the plots into `out`; returns the Markdown to print."""
    if not records:
        raise ForgelabError("nothing to compare: no runs")
    out = Path(out)
    comparison = Comparison.build(records, sweeps_info, metric, goal)
    header, rows = comparison.main_table()
    write_csv(out / "compare.csv", header, rows)
    order = f", sorted by best {comparison.metric} ({comparison.goal})" if comparison.metric else ""
    main = f"**{len(records)} runs{order}**\n\n" + markdown_table(header, rows)
    sections = [main]
    generator_header, generator_rows = comparison.generator_table()
    if generator_rows:
        write_csv(out / "per_generator.csv", generator_header, generator_rows)
        sections.append(
            "**Test metrics per generator**\n\n" + markdown_table(generator_header, generator_rows)
        )
    printed = list(sections)
    if table is not None:
        spec_markdown, spec_header, spec_rows = render_table_spec(table, records, generator)
        write_csv(out / f"{table.name}.csv", spec_header, spec_rows)
        write_text(out / f"{table.name}.md", spec_markdown + "\n")
        sections.insert(0, spec_markdown)
        printed = [spec_markdown, main]
    plots = []
    figure = metric_vs_params_figure(comparison, (comparison.params or comparison.other_keys)[:9])
    if figure is not None:
        save_figure(out / "plots" / "metric_vs_params.png", figure)
        plt.close(figure)
        plots.append("plots/metric_vs_params.png")
    figure = curves_figure(comparison)
    if figure is not None:
        save_figure(out / "plots" / "curves.png", figure)
        plt.close(figure)
        plots.append("plots/curves.png")
    sources = sorted({r.path for r in records if r.path})
    footer = "Runs: " + ", ".join(f"`{s}`" for s in sources[:20]) + (" ..." if len(sources) > 20 else "")
    images = "\n".join(f"![{p}]({p})" for p in plots)
    write_text(out / "compare.md", "\n\n".join([*sections, images, footer]).strip() + "\n")
    return "\n\n".join(printed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forgelab compare",
        description="Compare runs: a Markdown table (config differences, best/final metric, test metrics per "
        "generator) and plots (metric against each swept parameter, learning curves), from run or sweep "
        "directories, or from a W&B project when online.",
    )
    parser.add_argument(
        "paths", nargs="*", help="run directories, sweep directories, or folders holding them"
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default: <sweep>/compare, else runs/compare/<time>)"
    )
    parser.add_argument(
        "--metric", default=None, help="the metric to rank by (default: the sweep's, else val/loss)"
    )
    parser.add_argument(
        "--goal", choices=("minimize", "maximize"), default=None, help="default: from the metric's name"
    )
    parser.add_argument(
        "--group", default=None, help="only runs of this group (run.group / W&B group); no paths: below runs/"
    )
    parser.add_argument(
        "--table", default=None, help="a paper-table spec, e.g. configs/inpaint_probe/tables/table3.yaml"
    )
    parser.add_argument(
        "--generator", default=None, help="the test subset of --table (default: the spec's, mean)"
    )
    parser.add_argument(
        "--wandb", default=None, metavar="ENTITY/PROJECT", help="read runs from W&B instead (online)"
    )
    parser.add_argument(
        "--sweep",
        default=None,
        help="only runs of this sweep: a W&B sweep id (or entity/project/id; runs of `wandb agent` record it in "
        "run.json) or a `forgelab sweep` name; no paths: below runs/. With --wandb: a sweep of that project",
    )
    return parser


def select(records: list[RunRecord], sweep: str | None, group: str | None, where: str) -> list[RunRecord]:
    """The runs of one sweep and/or one group; a one-line error naming the sweeps or groups there are."""
    if sweep:
        sweep_id = sweep.rstrip("/").rsplit("/", 1)[-1]  # entity/project/<id> as W&B prints it
        found = [r for r in records if r.sweep_id == sweep_id]
        if not found:
            known = ", ".join(sorted({r.sweep_id for r in records if r.sweep_id})) or "none"
            raise ForgelabError(f"no runs of sweep '{sweep_id}' below {where} (sweeps there: {known})")
        records = found
    if group:
        found = [r for r in records if r.group == group]
        if not found:
            known = ", ".join(sorted({str(r.group) for r in records if r.group})) or "none"
            raise ForgelabError(f"no runs in group '{group}' below {where} (groups there: {known})")
        records = found
    return records


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    if args.paths and args.wandb:
        raise ConfigError("give run/sweep directories, or --wandb <entity>/<project> (not both)")
    if not args.paths and not args.wandb and not (args.sweep or args.group):
        raise ConfigError(
            "give run/sweep directories, --sweep <id> or --group <group> (runs below runs/), "
            "or --wandb <entity>/<project>"
        )
    if args.wandb:
        records, infos = load_wandb(args.wandb, sweep=args.sweep, group=args.group)
    else:
        paths = args.paths or ["runs"]
        records, infos = collect(paths)
        records = select(records, args.sweep, args.group, ", ".join(paths))
        if args.sweep or args.group:  # only the sweeps whose trials are still in the comparison
            names = {r.sweep_id for r in records}
            infos = [info for info in infos if info.get("name") in names]
    if not records:
        raise ForgelabError("no runs to compare" + (f" in group '{args.group}'" if args.group else ""))
    table = load_table_spec(args.table) if args.table else None
    if args.out:
        out = Path(args.out)
    elif len(args.paths) == 1 and (Path(args.paths[0]) / SWEEP_STATE).is_file():
        out = Path(args.paths[0]) / "compare"
    elif args.sweep and not args.wandb:
        out = Path("runs") / "compare" / f"sweep-{args.sweep.rstrip('/').rsplit('/', 1)[-1]}"
    elif args.group and not args.wandb and not args.paths:
        out = Path("runs") / "compare" / f"group-{args.group}"
    else:
        out = Path("runs") / "compare" / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    print(compare_runs(records, out, infos, args.metric, args.goal, table, args.generator))
    print(f"\ncomparison: {out / 'compare.md'}" + (f", {out / (table.name + '.md')}" if table else ""))
