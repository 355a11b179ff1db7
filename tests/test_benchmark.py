"""`forgelab benchmark`: the multi-method table and robustness curves against each run's own reports, a failed
detector as a row, reuse of finished runs, `forgelab compare --table` rebuilding the table, and UniFD reading
ITEM's feature cache (one in-process benchmark of ITEM and UniFD on a few toy images, shared by this module)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

import projects.item_detector.data as item_data
from common.errors import ConfigError
from common.experiment.benchmark import Benchmark, Detector, load_benchmark, write_tables
from common.experiment.detector_report import methods_table
from tests.cli_helpers import CONFIGS, run_cli, tiny_overrides

DETECTORS_SPEC = CONFIGS / "benchmarks" / "tables" / "detectors.yaml"
TOY = CONFIGS / "benchmarks" / "toy.yaml"
CONDITIONS = ["none", "blur:1", "jpeg:50"]


def _csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


def _percent(value: float) -> str:
    return str(round(100 * value, 2))


def _report(generators: dict[str, tuple[float, float, float]]) -> dict:
    """A test_metrics.json report: generator -> (real acc, fake acc, AP); acc = the mean of the two."""
    report = {
        g: {"n": 8.0, "real_acc": r, "fake_acc": f, "acc": (r + f) / 2, "ap": ap}
        for g, (r, f, ap) in generators.items()
    }
    report["mean"] = {
        k: sum(row[k] for row in report.values()) / len(generators) for k in report[next(iter(generators))]
    }
    report["pooled"] = dict(report["mean"])
    return report


def _synthetic_run(root: Path, name: str, report: dict, robustness: dict | None = None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"run": {"name": name, "group": "bench"}}))
    (run / "run.json").write_text(
        json.dumps({"name": name, "group": "bench", "outcome": "completed", "seed": 42})
    )
    (run / "test_metrics.json").write_text(json.dumps(report))
    if robustness is not None:
        (run / "test_robustness.json").write_text(json.dumps(robustness))
    return run


def _check_table_against_reports(table: list[dict[str, str]], reports: dict[str, dict]) -> None:
    """Every cell of the benchmark's table.csv against the run's own report, computed here."""
    by_method = {row["method"]: row for row in table}
    for method, report in reports.items():
        row = by_method[method]
        assert row["status"] == "completed"
        for generator in [g for g in report if g != "pooled"]:
            for metric, column in (("real_acc", "real ACC"), ("fake_acc", "fake ACC"), ("acc", "ACC")):
                assert row[f"{generator} {column}"] == _percent(report[generator][metric]), (
                    method,
                    generator,
                )
            ap_column = "mAP" if generator == "mean" else f"{generator} AP"
            assert row[ap_column] == _percent(report[generator]["ap"])


def test_tables_and_curves_are_each_runs_reports_and_compare_rebuilds_them(tmp_path) -> None:
    root = tmp_path / "runs" / "benchmarks" / "b" / "runs" / "p"
    reports = {
        "ITEM": _report({"gan": (0.9, 0.8, 0.95), "ldm": (0.7, 0.6, 0.75)}),
        "UniFD": _report({"gan": (1.0, 0.5, 0.9), "ldm": (0.8, 0.4, 0.6)}),
    }
    robustness = {
        "ITEM": {c: _report({"gan": (0.9, 0.8, 0.9 - 0.1 * i)}) for i, c in enumerate(CONDITIONS)},
        "UniFD": {c: _report({"gan": (0.9, 0.8, 0.8 - 0.2 * i)}) for i, c in enumerate(CONDITIONS[:2])},
    }
    state = {
        name: {"status": "trained", "run_dir": str(_synthetic_run(root, name, report, robustness[name]))}
        for name, report in reports.items()
    }
    state["NPR"] = {
        "status": "failed",
        "run_dir": str(root / "NPR"),
        "error": "ValueError: lr must be positive",
    }
    bench = Benchmark(
        "b", "B", "p", "b", 42, [], {}, [Detector(n, ["x.yaml"]) for n in ("ITEM", "NPR", "UniFD")]
    )
    out = tmp_path / "runs" / "benchmarks" / "b"
    printed = write_tables(bench, out, state)

    table = _csv(out / "table.csv")
    assert [r["method"] for r in table] == ["ITEM", "NPR", "UniFD"]  # the file's order, the failed one too
    _check_table_against_reports(table, reports)
    failed = table[1]
    assert failed["status"] == "failed: ValueError: lr must be positive" and failed["mAP"] == ""
    assert (
        "NPR (failed: ValueError: lr must be positive)" in printed
        and "NPR (failed" in (out / "table.md").read_text()
    )

    curves = _csv(out / "robustness.csv")
    assert [(r["perturbation"], r["level"]) for r in curves] == [("none", "-"), ("blur", "1"), ("jpeg", "50")]
    for method, conditions in robustness.items():
        for row, condition in zip(curves, CONDITIONS):
            expected = _percent(conditions[condition]["mean"]["ap"]) if condition in conditions else ""
            assert row[f"mean_ap_{method}"] == expected
    assert (out / "plots" / "robustness.png").stat().st_size > 0

    code, _out, err = run_cli(
        ["compare", str(out), "--table", str(DETECTORS_SPEC), "--out", str(tmp_path / "c")]
    )
    assert code == 0, err
    rebuilt = {r["method"]: r for r in _csv(tmp_path / "c" / "detectors.csv")}
    assert set(rebuilt) == {"ITEM", "UniFD"}  # a failed detector left no finished run to rebuild
    assert all(rebuilt[row["method"]] == row for row in table if row["method"] in rebuilt)


def test_reruns_resume_from_last_ckpt_start_over_without_one_and_refuse_changed_commands(
    tmp_path, monkeypatch
) -> None:
    """The rerun rules on stand-in runs (a fake `run_forgelab` writing what a finished fit writes)."""
    import common.experiment.benchmark as benchmark

    calls: list[list[str]] = []

    def fake_run(arguments: list[str], stderr=None) -> tuple[None, str]:
        calls.append(arguments)
        option = dict(a[2:].split("=", 1) for a in arguments if a.startswith("--run."))
        run = Path(option["run.root"]) / "p" / option["run.name"]
        run.mkdir(parents=True, exist_ok=True)
        (run / "run.json").write_text(json.dumps({"outcome": "completed", "seed": 3}))
        (run / "test_metrics.json").write_text(json.dumps(_report({"gan": (1.0, 1.0, 1.0)})))
        return None, "ok"

    monkeypatch.setattr(benchmark, "run_forgelab", fake_run)
    config = tmp_path / "c.yaml"
    config.write_text("{}")
    detectors = [Detector(n, [str(config)]) for n in ("resumed", "fresh", "missing")]
    detectors[2].configs = [str(tmp_path / "nope.yaml")]
    bench = Benchmark("b", "B", "p", "g", 3, [], {}, detectors, source=str(config))
    runner = benchmark.BenchmarkRun(bench, tmp_path / "runs")
    interrupted = runner.run_dir(detectors[0])
    (interrupted / "checkpoints").mkdir(parents=True)
    (interrupted / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (interrupted / "run.json").write_text(json.dumps({"outcome": "interrupted"}))
    stale = runner.run_dir(detectors[1])
    stale.mkdir(parents=True)
    (stale / "run.json").write_text(json.dumps({"outcome": "failed: boom"}))
    runner.run()
    state = runner.state
    assert calls[0][-1] == f"--ckpt_path={interrupted / 'checkpoints' / 'last.ckpt'}"
    assert state["resumed"]["status"] == "resumed" and state["fresh"]["status"] == "trained"
    assert not any(a.startswith("--ckpt_path") for a in calls[1])
    assert (
        json.loads((stale.with_name("fresh.failed-1") / "run.json").read_text())["outcome"] == "failed: boom"
    )
    assert state["missing"]["status"] == "failed" and "do not exist" in state["missing"]["error"]
    assert len(calls) == 2  # the missing config ran nothing
    runner = benchmark.BenchmarkRun(bench, tmp_path / "runs")  # a rerun: finished runs are skipped
    runner.run()
    assert len(calls) == 2 and runner.state["fresh"]["status"] == "reused"
    bench.seed = 4  # a finished detector's command changed
    with pytest.raises(ConfigError, match="arguments changed"):
        benchmark.BenchmarkRun(bench, tmp_path / "runs").run()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("detectors: []", "names no detectors"),
        ("detectors: [{name: a, config: x.yaml}, {name: a, config: y.yaml}]", "repeat"),
        ("detectors: [{name: 'a b', config: x.yaml}]", "may hold only"),
        ("detectors: [{name: a}]", "give config or configs"),
        ("detectors: [{name: a, config: x.yaml}]\nepochs: 3", "unknown keys ['epochs']"),
        (
            "run: {project: p, entity: e}\ndetectors: [{name: a, config: x.yaml}]",
            "run: takes project and group",
        ),
    ],
)
def test_bad_benchmark_files_are_one_clear_line(tmp_path, text, message) -> None:
    path = tmp_path / "bench.yaml"
    path.write_text(text)
    code, _out, err = run_cli(["benchmark", str(path)])
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("path", sorted((CONFIGS / "benchmarks").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_benchmark_files_commands_parse_with_the_cli(path) -> None:
    code, out, err = run_cli(["benchmark", str(path), "--dry-run"])
    assert code == 0, err
    bench = load_benchmark(path)
    assert out.count("forgelab fit --config") == len(bench.detectors)
    assert f"--run.group={bench.group}" in out and f"--seed_everything={bench.seed}" in out


def test_the_toy_benchmark_lists_every_detector_whose_configs_exist() -> None:
    bench = load_benchmark(TOY)
    assert [d.name for d in bench.detectors] == ["classifier", "ITEM", "UniFD", "CNNDetection", "NPR"]
    assert all(Path(c).is_file() for d in bench.detectors for c in [*bench.trainer, *d.configs])
    assert bench.group == "toy" and bench.seed == 42


# --- one benchmark through the real CLI (about 15 s: `make test-slow`; the fast test above builds the same tables
# from synthetic run directories) ----------------------------------------------------------------------------------


def _detector(name: str, config: Path, toy: Path, *extra: str) -> dict:
    """A benchmark entry running `config` on the few toy images of the CLI tests (tests/cli_helpers.py)."""
    overrides = dict(arg[2:].split("=", 1) for arg in tiny_overrides(config, toy))
    overrides.pop("data.init_args.test_perturbations")  # the benchmark's data: section sets them for all
    overrides |= dict(arg.split("=", 1) for arg in extra)
    overrides |= {"trainer.max_epochs": 2, "run.wandb": False}
    return {"name": name, "config": str(config), "overrides": overrides}


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def benchmark_runs(small_toy_world, tmp_path_factory) -> dict:
    """ITEM alone, then the same benchmark with UniFD and a broken detector added; the feature cache and
    extraction calls are recorded in between."""
    tmp = tmp_path_factory.mktemp("benchmark")
    cache = f"data.init_args.cache_dir={tmp / 'cache'}"  # fresh: ITEM's run extracts, UniFD's must not
    item = _detector("ITEM", CONFIGS / "item_detector" / "tiny.yaml", small_toy_world, cache)
    unifd = _detector("UniFD", CONFIGS / "item_detector" / "unifd_tiny.yaml", small_toy_world, cache)
    broken = _detector("broken", CONFIGS / "item_detector" / "unifd_tiny.yaml", small_toy_world, cache)
    broken["overrides"]["model.init_args.lr"] = -1.0
    base = {"name": "cli", "run": {"project": "bench", "group": "g"}, "seed": 7}
    base |= {
        "trainer": [str(CONFIGS / "trainer" / "cpu.yaml")],
        "data": {"test_perturbations": CONDITIONS[:2]},
    }
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump(base | {"detectors": [item]}))
    first = run_cli(["benchmark", str(path), f"--root={tmp / 'runs'}"])
    assert first[0] == 0, first[2]
    out = tmp / "runs" / "benchmarks" / "cli"
    item_checkpoints = _files(out / "runs" / "bench" / "ITEM" / "checkpoints")
    cache_files = _files(tmp / "cache")
    path.write_text(yaml.safe_dump(base | {"detectors": [item, unifd, broken]}))
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        real = item_data.ensure_features
        patch.setattr(item_data, "ensure_features", lambda *a, **k: calls.append(a) or real(*a, **k))
        second = run_cli(["benchmark", str(path), f"--root={tmp / 'runs'}"])
    assert second[0] == 0, second[2]
    return {
        "out": out,
        "printed": second[1],
        "extraction_calls": calls,
        "cache_before": cache_files,
        "cache_after": _files(tmp / "cache"),
        "item_checkpoints": (item_checkpoints, _files(out / "runs" / "bench" / "ITEM" / "checkpoints")),
        "tmp": tmp,
    }


@pytest.mark.slow
def test_unifd_after_item_reads_the_cache_and_extracts_nothing(benchmark_runs) -> None:
    assert benchmark_runs["cache_before"] and benchmark_runs["cache_after"] == benchmark_runs["cache_before"]
    assert benchmark_runs["extraction_calls"] == []
    state = json.loads((benchmark_runs["out"] / "benchmark.json").read_text())["detectors"]
    assert state["UniFD"]["status"] == "trained"


@pytest.mark.slow
def test_a_rerun_reuses_finished_runs_and_a_failing_detector_is_a_row(benchmark_runs) -> None:
    out = benchmark_runs["out"]
    state = json.loads((out / "benchmark.json").read_text())["detectors"]
    assert state["ITEM"]["status"] == "reused"
    before, after = benchmark_runs["item_checkpoints"]
    assert before and after == before  # not trained again
    assert state["broken"]["status"] == "failed" and "lr must be positive" in state["broken"]["error"]
    assert {entry["seed"] for name, entry in state.items() if name != "broken"} == {7}
    table = _csv(out / "table.csv")
    assert [r["method"] for r in table] == ["ITEM", "UniFD", "broken"]
    assert table[2]["status"].startswith("failed: ") and "lr must be positive" in table[2]["status"]
    assert "broken (failed: " in benchmark_runs["printed"] and "| ITEM |" in benchmark_runs["printed"]


@pytest.mark.slow
def test_the_benchmark_table_and_curves_are_the_runs_own_reports(benchmark_runs) -> None:
    out = benchmark_runs["out"]
    runs = out / "runs" / "bench"
    reports = {
        name: json.loads((runs / name / "test_metrics.json").read_text()) for name in ("ITEM", "UniFD")
    }
    _check_table_against_reports(_csv(out / "table.csv")[:2], reports)
    curves = _csv(out / "robustness.csv")
    assert [r["perturbation"] for r in curves] == ["none", "blur"]
    for name in reports:
        robustness = json.loads((runs / name / "test_robustness.json").read_text())
        assert [r[f"mean_ap_{name}"] for r in curves] == [
            _percent(robustness[c]["mean"]["ap"]) for c in CONDITIONS[:2]
        ]
    record = json.loads((runs / "UniFD" / "run.json").read_text())
    assert record["group"] == "g" and record["project"] == "bench" and record["seed"] == 7
    code, _out, err = run_cli(
        ["compare", str(out), "--table", str(DETECTORS_SPEC), "--out", str(benchmark_runs["tmp"] / "compare")]
    )
    assert code == 0, err
    rebuilt = {r["method"]: r for r in _csv(benchmark_runs["tmp"] / "compare" / "detectors.csv")}
    assert [rebuilt[r["method"]] for r in _csv(out / "table.csv")[:2]] == _csv(out / "table.csv")[:2]


def test_methods_table_marks_one_class_generators_and_leaves_missing_generators_empty() -> None:
    with_ldm = _report({"gan": (0.9, 0.8, 0.95), "ldm": (0.7, 0.6, 0.75)})
    with_ldm["ldm"] |= {"fake_acc": math.nan, "ap": math.nan}  # ldm's test images: real only
    without_ldm = _report({"gan": (1.0, 0.5, 0.9)})
    columns, rows, markdown = methods_table({"A": with_ldm, "B": without_ldm})
    assert columns[:6] == ["method", "status", "gan real ACC", "gan fake ACC", "gan ACC", "gan AP"]
    assert columns[6:10] == ["ldm real ACC", "ldm fake ACC", "ldm ACC", "ldm AP"] and columns[-1] == "mAP"
    assert rows[0][6:10] == [70.0, None, 65.0, None] and rows[1][6:10] == [None, None, None, None]
    assert "| A | 90.00 | 80.00 | 85.00 | 95.00 | 70.00 | - | 65.00 | n/a (one class) |" in markdown
    assert "leaves out ldm (only real)" in markdown
