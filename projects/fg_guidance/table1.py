"""`forgelab fg-table1`: Table 1 of the paper (subtype accuracy with and without the generative augmentation).

    forgelab fg-table1 --augmented data/fg_augmented/<name>/manifest.jsonl [--seeds 0 1 2] [--parallel 2]
        [--preset tiny] [--trainer.max_epochs=N ...] [--set --key=value ...]

For every method (ResNet-101, FineLIP-style; configs/fg_guidance/subtype_*.yaml) and every seed it runs two
`forgelab fit` runs through the real CLI that differ in one thing, the training data: the second appends the
augmented set (``data.init_args.extra_train_manifests``). Both take the same number of optimiser steps and
validate at the same steps: the "without" run trains as configured (``max_epochs``, or ``--steps``), and the
"with" run, whose epoch is longer, gets ``max_steps`` = the steps the "without" run took and
``val_check_interval`` = its batches per epoch (``check_val_every_n_epoch=null``): same seed, same steps, same
validation points. Each tests its best validation checkpoint on the
untouched test split and writes ``test_metrics.json``. Any other ``--key=value`` option (or those after
``--set``) is passed to every fit.

The table, in the paper's shape with what makes it readable (``<run>/table1.md``; ``table1.csv`` and the W&B
table hold the same numbers as separate mean/std columns):

    method | without (%) | with (%) | gain (pp) | aug (%) | aug per subclass (%) | steps | seeds |
    generation (ms/img) | classifier (ms/img)

accuracies are mean +- sample std over the seeds; "aug" is the augmented set's size over the training set's
(per subclass: min-max, equal under ``forgelab augment --balance proportional``); "generation" is the generator's
ms per augmented image (``dataset.json``, timed by `forgelab augment` after a warm-up), "classifier" the method's
own inference ms per image (each run times its first test batch after warm-up, CUDA-synchronised; the mean over
the method's runs). The paper's single "Cost (ms)" column does not say which of the two it times (README).
``--parallel N`` runs N (without, with) pairs at once in forked children, one GPU each when GPUs are visible,
else an equal share of the CPU cores (as `forgelab sweep --parallel`); CPU timings then share the machine.
``--method-config METHOD=YAML`` adds a config to one method's fits (the toy world's Table 1 uses
configs/fg_guidance/tables/table1_toy_*.yaml). Pairs finished are kept in ``<run>/pairs/``; running the command again
under the same ``--name`` reuses them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import secrets
import statistics
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
COLUMNS = (
    "method",
    "without (%)",
    "with (%)",
    "gain (pp)",
    "aug (%)",
    "aug per subclass (%)",
    "steps",
    "seeds",
    "generation (ms/img)",
    "classifier (ms/img)",
)
CSV_COLUMNS = (
    "method",
    "without_mean",
    "without_std",
    "with_mean",
    "with_std",
    "gain_pp",
    "aug_percent",
    "aug_subclass_min_percent",
    "aug_subclass_max_percent",
    "steps",
    "seeds",
    "generation_ms_per_image",
    "classifier_ms_per_image",
)


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


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1; None for one value)."""
    if not values:
        raise ValueError("no values")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def augmentation_fraction(without: dict[str, Any], with_: dict[str, Any]) -> dict[str, float | None]:
    """The augmented share of the training set, overall and per subclass (min, max), from two runs'
    ``test_metrics.json`` (``train_images``, ``train_by_class``), in %."""
    base, grown = without.get("train_images"), with_.get("train_images")
    if not base or grown is None:
        return {"overall": None, "min": None, "max": None}
    by_base, by_grown = without.get("train_by_class") or {}, with_.get("train_by_class") or {}
    per_class = [100 * (by_grown.get(name, 0) - n) / n for name, n in by_base.items() if n]
    return {
        "overall": 100 * (grown - base) / base,
        "min": min(per_class) if per_class else None,
        "max": max(per_class) if per_class else None,
    }


def summarise(method: str, pairs: list[dict[str, Any]], generation_ms: float) -> dict[str, Any]:
    """One method's Table 1 entry from its (without, with) pairs, one per seed."""
    without = [100 * p["without"]["test/acc"] for p in pairs]
    with_ = [100 * p["with"]["test/acc"] for p in pairs]
    timings = [
        p[c]["inference_ms_per_image"]
        for p in pairs
        for c in ("without", "with")
        if p[c].get("inference_ms_per_image")
    ]
    fraction = augmentation_fraction(pairs[0]["without"], pairs[0]["with"])
    return {
        "method": method,
        "without": mean_std(without),
        "with": mean_std(with_),
        "gain": statistics.fmean(w - wo for w, wo in zip(with_, without)),
        "aug": fraction,
        "steps": sorted(
            {p["without"].get("train_steps") for p in pairs} | {p["with"].get("train_steps") for p in pairs},
            key=str,
        ),
        "seeds": [p["seed"] for p in pairs],
        "generation_ms": generation_ms,
        "classifier_ms": statistics.fmean(timings) if timings else None,
    }


def _pm(stat: tuple[float, float | None]) -> str:
    mean, std = stat
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _num(value: float | None, digits: int = 1) -> Any:
    return "n/a" if value is None else round(value, digits)


def table1_rows(entries: list[dict[str, Any]]) -> tuple[list[list[Any]], list[list[Any]]]:
    """(Markdown rows in COLUMNS, numeric rows in CSV_COLUMNS) of Table 1 from `summarise` entries."""
    shown, numeric = [], []
    for e in entries:
        aug = e["aug"]
        per_class = "n/a" if aug["min"] is None else f"{aug['min']:.0f}-{aug['max']:.0f}"
        steps = "/".join(str(s) for s in e["steps"])
        seeds = ",".join(str(s) for s in e["seeds"])
        shown.append(
            [
                e["method"],
                _pm(e["without"]),
                _pm(e["with"]),
                f"{e['gain']:+.2f}",
                _num(aug["overall"]),
                per_class,
                steps,
                seeds,
                _num(e["generation_ms"]),
                _num(e["classifier_ms"], 2),
            ]
        )
        numeric.append(
            [
                e["method"],
                round(e["without"][0], 4),
                None if e["without"][1] is None else round(e["without"][1], 4),
                round(e["with"][0], 4),
                None if e["with"][1] is None else round(e["with"][1], 4),
                round(e["gain"], 4),
                aug["overall"],
                aug["min"],
                aug["max"],
                steps,
                seeds,
                e["generation_ms"],
                e["classifier_ms"],
            ]
        )
    return shown, numeric


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


def step_matched(without: dict[str, Any]) -> list[str]:
    """Trainer options that give a run the optimiser steps and validation points of ``without``'s fit (read from
    its test_metrics.json): ``max_steps`` = its steps, validation every its-batches-per-epoch batches."""
    steps, per_epoch = without.get("train_steps"), without.get("train_batches_per_epoch")
    if not steps or not per_epoch:
        raise ConfigError("the run without augmentation recorded no train_steps/train_batches_per_epoch")
    return [
        "--trainer.max_epochs=-1",
        f"--trainer.max_steps={steps}",
        "--trainer.check_val_every_n_epoch=null",
        f"--trainer.val_check_interval={per_epoch}",
    ]


def fit_arguments(
    args: argparse.Namespace, method: str, seed: int, condition: str, run_name: str, table_name: str
) -> list[str]:
    """The `forgelab fit` arguments of one run of the table (before step matching)."""
    fit_args = ["--config", args.trainer, "--config", METHODS[method]]
    for extra in args.method_configs.get(method, []):
        fit_args += ["--config", extra]
    fit_args.append(f"--run.name={run_name}")
    fit_args += [
        f"--run.root={args.root}",
        f"--run.group={table_name}",
        f"--run.wandb={str(args.wandb).lower()}",
        "--run.test_after_fit=true",
        f"--seed_everything={seed}",
    ]
    if args.preset:
        fit_args.append(f"--model.init_args.preset={args.preset}")
    if condition == "with":
        fit_args.append(f"--data.init_args.extra_train_manifests=[{args.augmented}]")
    if args.steps is not None:
        fit_args += ["--trainer.max_epochs=-1", f"--trainer.max_steps={args.steps}"]
    return fit_args + args.fit_overrides


def pair_file(args: argparse.Namespace, table_name: str, method: str, seed: int) -> Path:
    return (
        Path(args.root)
        / "fg_guidance"
        / table_name
        / "pairs"
        / f"{method.lower().replace('-', '')}-s{seed}.json"
    )


def run_pair(args: argparse.Namespace, method: str, seed: int, table_name: str) -> dict[str, Any]:
    """The (without, with) runs of one method and seed, the second step-matched to the first; the result is
    written to `pair_file` (atomically) and reused when the table is run again under the same name."""
    done = pair_file(args, table_name, method, seed)
    if done.is_file():
        log.info("fg-table1: %s seed %d already done (%s)", method, seed, done)
        return json.loads(done.read_text())
    result: dict[str, Any] = {"method": method, "seed": seed}
    for condition in ("without", "with"):
        run_name = f"{table_name}-{method.lower().replace('-', '')}-s{seed}-{condition}"
        fit_args = fit_arguments(args, method, seed, condition, run_name, table_name)
        if condition == "with":
            fit_args += step_matched(result["without"])
        log.info("fg-table1: %s seed %d, %s augmentation", method, seed, condition)
        run_fit(fit_args)
        metrics = read_test_accuracy(Path(args.root) / "fg_guidance" / run_name)
        result[condition] = {"run": run_name, **metrics}
    steps = {result[c].get("train_steps") for c in ("without", "with")}
    if len(steps) != 1:
        log.warning("fg-table1: %s seed %d: the two runs took %s optimiser steps", method, seed, steps)
    write_json(done, result)
    return result


def _pair_in_child(
    args: argparse.Namespace, job: tuple[str, int], table_name: str, env: dict[str, str]
) -> None:
    """A forked child: its device share, its own log file, one pair; the exit code tells the parent."""
    method, seed = job
    os.environ.update(env)  # before anything touches CUDA: the parent never initialises it
    if "OMP_NUM_THREADS" in env:
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    log_path = pair_file(args, table_name, method, seed).with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab", buffering=0) as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    logging.basicConfig(level=logging.INFO, force=True)
    try:
        run_pair(args, method, seed, table_name)
    except BaseException:
        logging.getLogger("forgelab.fg_guidance").exception("fg-table1: %s seed %d failed", method, seed)
        os._exit(1)
    os._exit(0)


def run_pairs_forked(
    args: argparse.Namespace, jobs: list[tuple[str, int]], table_name: str
) -> list[dict[str, Any]]:
    """``--parallel N``: N pairs at once, each in a child forked from this process, so the children start with
    torch and Lightning already imported (a fresh `forgelab fit` process spends ~10 s importing them). Each child
    gets a slot of `trial_slots` (one GPU, or a share of the CPU cores). Forked rather than spawned, from this
    single-threaded process before any CUDA or OpenMP use."""
    import multiprocessing
    from multiprocessing.connection import wait

    from common.experiment.sweep import trial_slots

    context = multiprocessing.get_context("fork")
    free = trial_slots(args.parallel)
    pending, running = list(jobs), {}
    failed: list[str] = []
    while pending or running:
        while pending and free:
            job, env = pending.pop(0), free.pop(0)
            child = context.Process(target=_pair_in_child, args=(args, job, table_name, env), daemon=False)
            child.start()
            running[child.sentinel] = (child, job, env)
        for sentinel in wait(list(running)):
            child, job, env = running.pop(sentinel)
            child.join()
            free.append(env)
            if child.exitcode != 0:
                log_path = pair_file(args, table_name, *job).with_suffix(".log")
                failed.append(f"{job[0]} seed {job[1]} (exit {child.exitcode}, log: {log_path})")
    if failed:
        raise ConfigError(f"fg-table1: {len(failed)} pair(s) failed: {'; '.join(failed)}")
    return [json.loads(pair_file(args, table_name, *job).read_text()) for job in jobs]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forgelab fg-table1", description=__doc__.split("\n\n")[0])
    parser.add_argument("--augmented", required=True, help="manifest.jsonl written by `forgelab augment`")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2], help="one (without, with) pair each"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimiser steps of every run (default: the configured epochs)",
    )
    parser.add_argument("--parallel", type=int, default=1, help="(without, with) pairs run at once")
    parser.add_argument(
        "--method-config",
        action="append",
        default=[],
        metavar="METHOD=YAML",
        help="one more --config for one method's fits (after its own; e.g. the toy world's sizes and lr)",
    )
    parser.add_argument("--trainer", default="configs/trainer/cpu.yaml", help="trainer preset")
    parser.add_argument("--preset", default=None, help="model preset for every method (e.g. tiny)")
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="*",
        default=[],
        help="extra `forgelab fit` arguments, e.g. --set --trainer.max_epochs=2 (bare --key=value works too)",
    )
    parser.add_argument("--root", default="runs", help="parent folder of the runs")
    parser.add_argument("--name", default=None, help="table run name (default table1-<timestamp>)")
    parser.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=True)
    return parser


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """This command's options; every ``--key=value`` it does not know (or given after ``--set``) goes to each
    fit, in order, as ``args.fit_overrides``."""
    parser = build_parser()
    # `--set --trainer.max_epochs=2`: argparse would read the value as an option; take what follows --set here
    if "--set" in argv:
        at = argv.index("--set")
        own, after = argv[:at], argv[at + 1 :]
        args, unknown = parser.parse_known_args(own)
        args.overrides = after
    else:
        args, unknown = parser.parse_known_args(argv)
    args.fit_overrides = [*unknown, *args.overrides]
    bad = [a for a in args.fit_overrides if not a.startswith("--") or "=" not in a]
    if bad:
        raise ConfigError(f"fg-table1 passes extra options to `forgelab fit` as --key=value; got {bad}")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        raise ConfigError(f"--seeds must be distinct, got {args.seeds}")
    args.method_configs = {}
    for item in args.method_config:
        method, sep, path = item.partition("=")
        if not sep or method not in METHODS:
            raise ConfigError(
                f"--method-config takes METHOD=YAML with METHOD in {list(METHODS)}, got {item!r}"
            )
        if not Path(path).is_file():
            raise ConfigError(f"--method-config {item}: {path} does not exist")
        args.method_configs.setdefault(method, []).append(path)
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    return args


def main(argv: list[str]) -> None:
    """Entry point of `forgelab fg-table1`."""
    args = parse_arguments(argv)
    augmented = Path(args.augmented)
    if not augmented.is_file():
        raise ConfigError(f"--augmented {augmented} does not exist: write it with `forgelab augment` first")
    generation_ms = augmentation_cost(augmented)
    if args.parallel < 1:
        raise ConfigError(f"--parallel must be at least 1, got {args.parallel}")
    name = args.name or f"table1-{_dt.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    settings = RunSettings(project="fg_guidance", name=name, group="table1", job_type="table", root=args.root)
    settings.wandb = args.wandb
    table_dir = Path(args.root) / "fg_guidance" / name
    table_dir.mkdir(parents=True, exist_ok=True)

    jobs = [(method, seed) for method in args.methods for seed in args.seeds]
    if args.parallel == 1:
        pairs = [run_pair(args, method, seed, name) for method, seed in jobs]
    else:
        pairs = run_pairs_forked(args, jobs, name)
    entries = [
        summarise(method, [p for p in pairs if p["method"] == method], generation_ms)
        for method in args.methods
    ]
    shown, numeric = table1_rows(entries)
    record = start_run_record(table_dir, settings, False, None, ["forgelab", "fg-table1", *argv])
    write_json(table_dir / "run.json", record)
    write_json(
        table_dir / "runs.json",
        {
            "augmented": str(augmented),
            "generation_ms_per_image": generation_ms,
            "seeds": args.seeds,
            "pairs": pairs,
        },
    )
    from common.experiment.reporting import log_table

    markdown = markdown_table(COLUMNS, shown)
    with recording_outcome(table_dir, record):
        loggers = build_loggers(settings, table_dir, record) if args.wandb else []
        log_table(_Reporter(table_dir, loggers), "table1", CSV_COLUMNS, numeric, markdown=markdown)
        for logger in loggers:
            logger.finalize("success")
    print(markdown)
    print(f"fg-table1: {table_dir / 'table1.csv'}")
