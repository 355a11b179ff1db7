"""`forgelab benchmark configs/benchmarks/<name>.yaml`: several detectors trained and tested on the same data, one
multi-method table in the shape of ITEM's Tables I-III (rows = methods, ACC real/fake/mean and AP per test
generator, their means) and the multi-method robustness curves (ITEM Fig. 4, one line per method).

A benchmark file (see configs/benchmarks/toy.yaml):

    name: toy                                  # default: the file's stem
    title: Detectors on the toy world
    run: {project: benchmarks, group: toy}     # W&B project and group of every run (group default: the name)
    seed: 42                                   # seed_everything of every run
    trainer: [configs/trainer/cpu.yaml]        # trainer configs, before each detector's own
    data: {batch_size: 32}                     # data.init_args of every detector (optional)
    detectors:
      - name: ITEM                             # the table's row and the run's name ([A-Za-z0-9_.-])
        config: configs/item_detector/tiny.yaml   # or configs: [a.yaml, b.yaml]
        overrides: {trainer.max_epochs: 5}     # any CLI key of the run (optional)

Each detector is one `forgelab fit` with `run.test_after_fit` (the best validation checkpoint is then tested in
the same run), run in this process through the CLI the sweep's checks use (`sweep.run_forgelab`), one after the
other, in `runs/benchmarks/<name>/runs/<project>/<detector>/`. Then, in `runs/benchmarks/<name>/`:

    benchmark.json       every detector's arguments, status (trained | resumed | reused | failed), error line,
                         seed, seconds and run directory
    table.md, table.csv  the multi-method table (read from each run's test_metrics.json)
    robustness.md/.csv   mean AP per test condition and method (each run's test_robustness.json), and
    plots/robustness.png one panel per perturbation kind, one line per method

A detector whose run fails is a row saying so, with its error line (its log: <run dir>/output.log, or
benchmark-logs/<detector>.log when it left no run directory), and the others still run. Running the command
again reuses every finished run (its test_metrics.json is read, nothing is trained: skip), resumes an
unfinished one (interrupted, or failed after its first epoch) from its last.ckpt, and starts one without a
checkpoint over (its old directory kept as `<detector>.failed-<n>`); a finished detector whose arguments changed
since is an error, not silently reused.
`forgelab compare runs/benchmarks/<name> --table configs/benchmarks/tables/detectors.yaml` rebuilds the table
from the run directories alone.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import yaml

from common.errors import ConfigError, ForgelabError
from common.experiment.compare import markdown_table as plain_table
from common.experiment.detector_report import (
    methods_robustness_figure,
    methods_robustness_table,
    methods_table,
)
from common.experiment.runs import read_run_record
from common.experiment.sweep import parse_with_cli, run_forgelab
from common.io import save_figure, write_csv, write_json, write_text

STATE = "benchmark.json"
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
KNOWN_KEYS = {"name", "title", "run", "seed", "trainer", "data", "detectors"}
DETECTOR_KEYS = {"name", "config", "configs", "overrides"}


@dataclass
class Detector:
    name: str
    configs: list[str]
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class Benchmark:
    """A benchmark file, validated."""

    name: str
    title: str
    project: str
    group: str
    seed: int
    trainer: list[str]
    data: dict[str, Any]
    detectors: list[Detector]
    source: str = ""


def _as_list(value: Any, what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{what} must be a file or a list of files, got {value!r}")


def load_benchmark(path: str | Path, name: str | None = None) -> Benchmark:
    """Read and check a benchmark file (keys, names, types); config files are checked when a detector runs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"benchmark file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"benchmark file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"benchmark file {path} must be a mapping (name, run, trainer, data, detectors)")
    unknown = set(data) - KNOWN_KEYS
    if unknown:
        raise ConfigError(
            f"benchmark file {path}: unknown keys {sorted(unknown)} (known: {sorted(KNOWN_KEYS)})"
        )
    name = str(name or data.get("name") or path.stem)
    if not NAME.match(name):
        raise ConfigError(f"benchmark name {name!r} may hold only letters, digits, '_', '.' and '-'")
    run = data.get("run") or {}
    if not isinstance(run, dict) or set(run) - {"project", "group"}:
        raise ConfigError(f"benchmark file {path}: run: takes project and group, got {run!r}")
    if not isinstance(data.get("data") or {}, dict):
        raise ConfigError(f"benchmark file {path}: data: maps data.init_args keys to values")
    detectors = []
    for i, entry in enumerate(data.get("detectors") or []):
        where = f"benchmark file {path}: detector {i + 1}"
        if not isinstance(entry, dict) or set(entry) - DETECTOR_KEYS or "name" not in entry:
            raise ConfigError(
                f"{where} must be a mapping of {sorted(DETECTOR_KEYS)} with a name, got {entry!r}"
            )
        if ("config" in entry) == ("configs" in entry):
            raise ConfigError(f"{where} ({entry['name']}): give config or configs (one of them)")
        detector_name = str(entry["name"])
        if not NAME.match(detector_name):
            raise ConfigError(f"{where}: name {detector_name!r} may hold only letters, digits, '_', '.', '-'")
        overrides = entry.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"{where} ({detector_name}): overrides maps CLI keys to values")
        configs = _as_list(entry.get("config", entry.get("configs")), f"{where} ({detector_name}) config")
        detectors.append(Detector(detector_name, configs, dict(overrides)))
    if not detectors:
        raise ConfigError(f"benchmark file {path} names no detectors")
    names = [d.name for d in detectors]
    if len(set(names)) != len(names):
        raise ConfigError(f"benchmark file {path}: detector names repeat: {names}")
    return Benchmark(
        name=name,
        title=str(data.get("title") or name),
        project=str(run.get("project") or "benchmarks"),
        group=str(run.get("group") or name),
        seed=int(data.get("seed", 42)),
        trainer=_as_list(data.get("trainer") or [], f"benchmark file {path}: trainer"),
        data=dict(data.get("data") or {}),
        detectors=detectors,
        source=str(path),
    )


def cli_value(value: Any) -> str:
    """A YAML value as jsonargparse reads it from `--key=<value>` (strings as they are, the rest as JSON)."""
    return value if isinstance(value, str) else json.dumps(value)


class BenchmarkRun:
    """The benchmark's directory, its state and the loop over its detectors."""

    def __init__(self, benchmark: Benchmark, root: str | Path = "runs") -> None:
        self.benchmark = benchmark
        self.directory = Path(root) / "benchmarks" / benchmark.name
        self.run_root = self.directory / "runs"
        state_path = self.directory / STATE
        self.state: dict[str, dict[str, Any]] = {}
        if state_path.is_file():
            self.state = json.loads(state_path.read_text()).get("detectors", {})

    def run_dir(self, detector: Detector) -> Path:
        return self.run_root / self.benchmark.project / detector.name

    def arguments(self, detector: Detector) -> list[str]:
        """`forgelab fit` of one detector: trainer configs, its configs, the data and its overrides, then the
        benchmark's run settings (they win: directory, W&B project and group, seed)."""
        bench = self.benchmark
        args = ["fit"]
        for config in [*bench.trainer, *detector.configs]:
            args += ["--config", config]
        args += [f"--data.init_args.{key}={cli_value(v)}" for key, v in bench.data.items()]
        args += [f"--{key}={cli_value(v)}" for key, v in detector.overrides.items()]
        return [
            *args,
            f"--seed_everything={bench.seed}",
            f"--run.root={self.run_root}",
            f"--run.project={bench.project}",
            f"--run.group={bench.group}",
            f"--run.name={detector.name}",
            "--run.test_after_fit=true",
        ]

    @staticmethod
    def finished(run_dir: Path) -> bool:
        return (
            read_run_record(run_dir).get("outcome") == "completed"
            and (run_dir / "test_metrics.json").is_file()
        )

    def save(self) -> None:
        bench = self.benchmark
        write_json(
            self.directory / STATE,
            {
                "name": bench.name,
                "source": bench.source,
                "project": bench.project,
                "group": bench.group,
                "seed": bench.seed,
                "detectors": self.state,
            },
        )

    def run_detector(self, detector: Detector) -> dict[str, Any]:
        """Train and test one detector (or reuse/resume its run); its state entry."""
        arguments = self.arguments(detector)
        run_dir = self.run_dir(detector)
        entry = {"arguments": arguments, "seed": self.benchmark.seed, "run_dir": str(run_dir)}
        previous = self.state.get(detector.name, {})
        if self.finished(run_dir):
            if previous.get("arguments") not in (None, arguments):
                raise ConfigError(
                    f"detector {detector.name}: its arguments changed since {run_dir} was trained; delete that "
                    "run directory to train it again, or give the benchmark another --name"
                )
            seed = read_run_record(run_dir).get("seed", self.benchmark.seed)
            return entry | {"status": "reused", "seed": seed, "seconds": previous.get("seconds")}
        missing = [c for c in [*self.benchmark.trainer, *detector.configs] if not Path(c).is_file()]
        if missing:
            return entry | {"status": "failed", "error": f"config file(s) do not exist: {', '.join(missing)}"}
        last = run_dir / "checkpoints" / "last.ckpt"
        resume = last.is_file() and previous.get("arguments") in (None, arguments)
        if run_dir.exists() and not resume:
            n = 1
            while run_dir.with_name(f"{run_dir.name}.failed-{n}").exists():
                n += 1
            run_dir.rename(run_dir.with_name(f"{run_dir.name}.failed-{n}"))
        print(
            f"benchmark {self.benchmark.name}: {detector.name} ({'resumed' if resume else 'training'})",
            flush=True,
        )
        start = time.perf_counter()
        errors = io.StringIO()
        problem, output = run_forgelab([*arguments, f"--ckpt_path={last}"] if resume else arguments, errors)
        seconds = round(time.perf_counter() - start, 1)
        logs = self.directory / "benchmark-logs"
        log = run_dir / "output.log" if run_dir.is_dir() else logs / f"{detector.name}.log"
        write_text(log, output + errors.getvalue())
        if problem is None and not self.finished(run_dir):
            problem = f"the run ended without a completed test report in {run_dir}"
        if problem is not None:
            return entry | {"status": "failed", "error": problem, "seconds": seconds, "log": str(log)}
        seed = read_run_record(run_dir).get("seed", self.benchmark.seed)
        return entry | {"status": "resumed" if resume else "trained", "seed": seed, "seconds": seconds}

    def run(self) -> str:
        """Every detector in order (state saved after each), then the tables and the figure; returns what to
        print."""
        self.directory.mkdir(parents=True, exist_ok=True)
        write_text(self.directory / "benchmark.yaml", Path(self.benchmark.source).read_text())
        for detector in self.benchmark.detectors:
            self.state[detector.name] = self.run_detector(detector)
            self.save()
        return write_tables(self.benchmark, self.directory, self.state)


def write_tables(benchmark: Benchmark, directory: Path, state: dict[str, dict[str, Any]]) -> str:
    """table.md/.csv, robustness.md/.csv and plots/robustness.png from the detectors' run directories (failed
    detectors as rows saying so); returns the Markdown printed."""
    methods: dict[str, Any] = {}
    robustness: dict[str, dict[str, Any]] = {}
    for detector in benchmark.detectors:
        entry = state[detector.name]
        run_dir = Path(entry["run_dir"])
        if entry["status"] == "failed":
            methods[detector.name] = entry["error"]
            continue
        methods[detector.name] = json.loads((run_dir / "test_metrics.json").read_text())
        if (run_dir / "test_robustness.json").is_file():
            robustness[detector.name] = json.loads((run_dir / "test_robustness.json").read_text())
    columns, rows, markdown = methods_table(methods)
    write_csv(directory / "table.csv", columns, rows)
    sections = [f"**{benchmark.title}** (benchmark {benchmark.name}, seed {benchmark.seed})", markdown]
    if robustness:
        columns, rows, curves = methods_robustness_table(robustness)
        write_csv(directory / "robustness.csv", columns, rows)
        write_text(directory / "robustness.md", curves + "\n")
        figure = methods_robustness_figure(robustness)
        save_figure(directory / "plots" / "robustness.png", figure)
        plt.close(figure)
        sections.append(curves)
    else:  # no detector has a robustness grid (any more): no curves left over from an earlier run
        for stale in ("robustness.csv", "robustness.md", "plots/robustness.png"):
            (directory / stale).unlink(missing_ok=True)
    header = ["detector", "status", "seed", "seconds", "run directory", "error"]
    runs = [
        [d.name, state[d.name]["status"], state[d.name].get("seed"), state[d.name].get("seconds"),
         state[d.name]["run_dir"], state[d.name].get("error", "")]
        for d in benchmark.detectors
    ]  # fmt: skip
    sections.append("**Runs**\n\n" + plain_table(header, runs, digits=1))
    write_text(directory / "table.md", "\n\n".join(sections[:2]) + "\n")
    return "\n\n".join(sections)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forgelab benchmark",
        description="Train and test several detectors on the same data (each a `forgelab fit` with test after "
        "fit, in one W&B group) and write the multi-method table (ITEM Tables I-III shape) and robustness curves "
        "into runs/benchmarks/<name>/; rerunning reuses finished runs.",
    )
    parser.add_argument("benchmark_file", help="a benchmark file, e.g. configs/benchmarks/toy.yaml")
    parser.add_argument(
        "--name", default=None, help="benchmark name and directory (default: the file's name:)"
    )
    parser.add_argument("--root", default="runs", help="the benchmark goes to <root>/benchmarks/<name>/")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print each detector's command and parse it with the CLI (--print_config); train nothing",
    )
    return parser


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    benchmark = load_benchmark(args.benchmark_file, args.name)
    runner = BenchmarkRun(benchmark, args.root)
    if args.dry_run:
        for detector in benchmark.detectors:
            arguments = runner.arguments(detector)
            print(shlex.join(["forgelab", *arguments]), flush=True)
            problem = parse_with_cli([*arguments, "--print_config"])
            if problem:
                raise ConfigError(f"detector {detector.name} would fail: {problem}")
        print(f"dry run: {len(benchmark.detectors)} detector commands parse; nothing was run")
        return
    print(runner.run())
    failed = [d.name for d in benchmark.detectors if runner.state[d.name]["status"] == "failed"]
    print(f"\nbenchmark tables: {runner.directory} (table.md, robustness.md, plots/robustness.png)")
    if failed and len(failed) == len(benchmark.detectors):
        raise ForgelabError(f"every detector of benchmark {benchmark.name} failed: {', '.join(failed)}")
    if failed:
        print(f"benchmark {benchmark.name}: {len(failed)} of {len(benchmark.detectors)} detectors failed "
              f"({', '.join(failed)}); their errors are in the table")  # fmt: skip
