"""`forgelab fg-table1`: Table 1 of the paper (subtype accuracy with and without the generative augmentation).

    forgelab fg-table1 --augmented data/fg_augmented/<name>/manifest.jsonl [--preset tiny] [--trainer.max_epochs=3 ...]

For every method (ResNet-101, FineLIP-style; configs/fg_guidance/subtype_*.yaml) it runs two `forgelab fit`
runs through the real CLI, identical except that the second appends the augmented set to the training split
(``data.init_args.extra_train_manifests``); any other ``--key=value`` option is passed to every fit. Each tests its best validation checkpoint on the untouched test split
and writes ``test_metrics.json``. The table, in the paper's shape:

    method | without (%) | with (%) | cost (ms)

is written to ``<run>/table1.csv`` and ``.md`` and logged to W&B (offline unless configured). "cost" is the mean
generation time of one augmented image, read from the augmented set's ``dataset.json`` (`forgelab augment`
measures it per image); the paper's cost column is the same for neither method, and does not say what it times
(README "Decisions"), so the classifiers' own inference time per image is also written, in ``runs.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import secrets
import sys
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.experiment.runs import RunSettings, build_loggers, recording_outcome, start_run_record
from common.io import write_json

log = logging.getLogger("forgelab.fg_guidance")

METHODS: dict[str, str] = {
    "ResNet-101": "configs/fg_guidance/subtype_resnet101.yaml",
    "FineLIP": "configs/fg_guidance/subtype_finelip.yaml",
}
COLUMNS = ("method", "without (%)", "with (%)", "cost (ms)")


class _Reporter:
    """What common.experiment.reporting needs from a trainer: the run directory and the loggers."""

    def __init__(self, root: Path, loggers: list[Any]) -> None:
        self.default_root_dir, self.loggers = str(root), loggers


def read_test_accuracy(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "test_metrics.json"
    if not path.is_file():
        raise ConfigError(f"{path} is missing: the fit in {run_dir} did not reach its test stage")
    return json.loads(path.read_text())


def augmentation_cost(manifest: Path) -> float:
    """Mean generation ms per augmented image (the augmented set's dataset.json, else its manifest rows)."""
    summary = manifest.parent / "dataset.json"
    if summary.is_file():
        value = json.loads(summary.read_text()).get("generation_ms_per_image")
        if value is not None:
            return float(value)
    costs = [
        json.loads(line).get("generation_ms") for line in manifest.read_text().splitlines() if line.strip()
    ]
    costs = [c for c in costs if c is not None]
    if not costs:
        raise ConfigError(f"{manifest} records no generation cost (write it with `forgelab augment`)")
    return sum(costs) / len(costs)


def table1_rows(results: dict[str, dict[str, float]], cost_ms: float) -> list[list[Any]]:
    """Rows of Table 1 from {method: {"without": acc, "with": acc}} (accuracies in [0, 1])."""
    return [
        [method, round(100 * r["without"], 2), round(100 * r["with"], 2), round(cost_ms, 1)]
        for method, r in results.items()
    ]


def markdown_table(columns: tuple[str, ...], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def run_fit(args: list[str]) -> None:
    """`forgelab fit <args>` in this process (LightningCLI reads sys.argv too: hide this command's own)."""
    from common.experiment.cli import main as forgelab

    saved = sys.argv[1:]
    sys.argv[1:] = []
    try:
        forgelab(["fit", *args])
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise ConfigError(f"`forgelab fit {' '.join(args)}` failed (exit {exit_.code})") from None
    finally:
        sys.argv[1:] = saved


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forgelab fg-table1", description=__doc__.split("\n\n")[0])
    parser.add_argument("--augmented", required=True, help="manifest.jsonl written by `forgelab augment`")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--trainer", default="configs/trainer/cpu.yaml", help="trainer preset")
    parser.add_argument("--preset", default=None, help="model preset for every method (e.g. tiny)")
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="*",
        default=[],
        help="extra `forgelab fit` arguments, e.g. --trainer.max_epochs=2",
    )
    parser.add_argument("--root", default="runs", help="parent folder of the runs")
    parser.add_argument("--name", default=None, help="table run name (default table1-<timestamp>)")
    parser.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=True)
    return parser


def main(argv: list[str]) -> None:
    """Entry point of `forgelab fg-table1`."""
    args, overrides = build_parser().parse_known_args(argv)
    unknown = [a for a in overrides if not a.startswith("--") or "=" not in a]
    if unknown:
        raise ConfigError(f"fg-table1 passes extra options to `forgelab fit` as --key=value; got {unknown}")
    augmented = Path(args.augmented)
    if not augmented.is_file():
        raise ConfigError(f"--augmented {augmented} does not exist: write it with `forgelab augment` first")
    cost = augmentation_cost(augmented)
    name = args.name or f"table1-{_dt.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    settings = RunSettings(project="fg_guidance", name=name, group="table1", job_type="table", root=args.root)
    settings.wandb = args.wandb
    table_dir = Path(args.root) / "fg_guidance" / name
    table_dir.mkdir(parents=True, exist_ok=True)

    results: dict[str, dict[str, float]] = {}
    runs: dict[str, Any] = {}
    for method in args.methods:
        for condition in ("without", "with"):
            run_name = f"{name}-{method.lower().replace('-', '')}-{condition}"
            fit_args = ["--config", args.trainer, "--config", METHODS[method], f"--run.name={run_name}"]
            fit_args += [
                f"--run.root={args.root}",
                f"--run.group={name}",
                f"--run.wandb={str(args.wandb).lower()}",
            ]
            fit_args += ["--run.test_after_fit=true"]
            if args.preset:
                fit_args.append(f"--model.init_args.preset={args.preset}")
            if condition == "with":
                fit_args.append(f"--data.init_args.extra_train_manifests=[{augmented}]")
            fit_args += overrides
            log.info("fg-table1: %s %s augmentation", method, condition)
            run_fit(fit_args)
            metrics = read_test_accuracy(Path(args.root) / "fg_guidance" / run_name)
            results.setdefault(method, {})[condition] = metrics["test/acc"]
            runs[f"{method}/{condition}"] = {"run": run_name, **metrics}

    rows = table1_rows(results, cost)
    record = start_run_record(table_dir, settings, False, None, ["forgelab", "fg-table1", *argv])
    write_json(table_dir / "run.json", record)
    write_json(
        table_dir / "runs.json", {"augmented": str(augmented), "cost_ms_per_image": cost, "runs": runs}
    )
    from common.experiment.reporting import log_table

    markdown = markdown_table(COLUMNS, rows)
    with recording_outcome(table_dir, record):
        loggers = build_loggers(settings, table_dir, record) if args.wandb else []
        log_table(_Reporter(table_dir, loggers), "table1", COLUMNS, rows, markdown=markdown)
        for logger in loggers:
            logger.finalize("success")
    print(markdown)
    print(f"fg-table1: {table_dir / 'table1.csv'}")
