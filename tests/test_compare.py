"""`forgelab compare`: tables (config differences, best/final metric, test metrics per generator), plots and
paper-shaped tables from run directories written by hand, so every expected number is known."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from common.experiment.compare import (
    Comparison,
    collect,
    load_run_dir,
    load_table_spec,
    metric_goal,
    read_metrics_csv,
    record_from_wandb_run,
    render_table_spec,
)
from common.experiment.runs import recording_outcome, run_outcome
from tests.cli_helpers import CONFIGS, run_cli

TABLE3 = CONFIGS / "inpaint_probe" / "tables" / "table3.yaml"


def _report(acc: float, f1: float, auroc: float) -> dict:
    row = {"n": 48.0, "acc": acc, "real_acc": acc, "fake_acc": acc, "ap": auroc, "auroc": auroc, "f1": f1}
    return row


def make_run(
    root: Path,
    name: str,
    *,
    lr: float,
    backbone: str,
    val_losses: list[float],
    gan: tuple[float, float, float] = (0.9, 0.9, 0.95),
    ldm: tuple[float, float, float] = (0.7, 0.6, 0.8),
    group: str = "table3",
) -> Path:
    """A run directory as `forgelab fit` writes it (config.yaml, run.json, metrics.csv, test_metrics.json)."""
    run = root / name
    run.mkdir(parents=True)
    config = {
        "seed_everything": 42,
        "model": {
            "class_path": "projects.inpaint_probe.classifier.RealFakeClassifier",
            "init_args": {"lr": lr, "backbone": backbone},
        },
        "data": {"class_path": "common.data.RealFakeFolder", "init_args": {"image_size": 224}},
        "run": {"name": name, "group": group, "root": str(root)},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "run.json").write_text(json.dumps({"name": name, "group": group}))
    lines = ["epoch,step,train/loss_epoch,val/loss,val/acc"]
    for epoch, loss in enumerate(val_losses):
        lines.append(f"{epoch},{10 * epoch + 9},{loss + 0.1},,")  # train row
        lines.append(f"{epoch},{10 * epoch + 9},,{loss},{1 - loss}")  # validation row
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    report = {"toy_gan": _report(*gan), "toy_ldm": _report(*ldm)}
    report["mean"] = {k: (report["toy_gan"][k] + report["toy_ldm"][k]) / 2 for k in report["toy_gan"]}
    report["mean"]["n"] = 96.0
    report["pooled"] = dict(report["mean"])
    (run / "test_metrics.json").write_text(json.dumps(report))
    return run


@pytest.fixture
def three_runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs" / "inpaint_probe"
    make_run(root, "vgg", lr=1e-4, backbone="vgg16.tv_in1k", val_losses=[0.6, 0.4, 0.5])
    make_run(
        root,
        "convnext",
        lr=1e-4,
        backbone="convnext_xlarge.fb_in22k_ft_in1k_384",
        val_losses=[0.5, 0.2, 0.3],
        gan=(1.0, 1.0, 1.0),
        ldm=(0.98, 0.96, 0.99),
    )
    make_run(root, "other", lr=3e-4, backbone="resnet50.tv_in1k", val_losses=[0.7, 0.65], group="elsewhere")
    return root


def test_metric_goal_knows_losses_and_distances():
    assert [metric_goal(m) for m in ("val/loss", "test/fid", "niqe", "val/auroc", "test/mean/acc")] == [
        "minimize",
        "minimize",
        "minimize",
        "maximize",
        "maximize",
    ]


def test_metrics_csv_being_written_is_read_without_its_broken_cells(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,val/loss\n0,9,0.5\n1,19,\n2,29,0.3\n3,3")  # last line cut mid-write
    rows = read_metrics_csv(path)
    assert rows[:3] == [
        {"epoch": 0.0, "step": 9.0, "val/loss": 0.5},
        {"epoch": 1.0, "step": 19.0},
        {"epoch": 2.0, "step": 29.0, "val/loss": 0.3},
    ]
    assert read_metrics_csv(tmp_path / "missing.csv") == []


def test_table_shows_differing_config_best_and_final_metric_and_test_means(three_runs, tmp_path):
    records, infos = collect([three_runs])
    records = [r for r in records if r.group == "table3"]
    comparison = Comparison.build(records, infos)
    assert comparison.metric == "val/loss" and comparison.goal == "minimize"
    assert comparison.other_keys == ["model.backbone"]  # lr, image size, seed are the same; names are ignored
    header, rows = comparison.main_table()
    assert header[:5] == ["run", "model.backbone", "best val/loss", "epoch", "final val/loss"]
    assert rows[0][:5] == [
        "convnext",
        "convnext_xlarge.fb_in22k_ft_in1k_384",
        0.2,
        1,
        0.3,
    ]  # sorted: best first
    assert rows[1][:5] == ["vgg", "vgg16.tv_in1k", 0.4, 1, 0.5]
    acc = header.index("test/mean/acc")
    assert rows[1][acc] == pytest.approx((0.9 + 0.7) / 2)
    generators = comparison.generator_table()
    assert generators[0] == ["run", "generator", "n", "acc", "real_acc", "fake_acc", "ap", "auroc", "f1"]
    assert [r[:2] for r in generators[1]] == [["convnext", g] for g in ("toy_gan", "toy_ldm", "mean")] + [
        ["vgg", g] for g in ("toy_gan", "toy_ldm", "mean")
    ]


def test_run_outcomes_show_as_states_and_failed_runs_leave_the_paper_tables(three_runs):
    record = json.loads((three_runs / "vgg" / "run.json").read_text())
    (three_runs / "vgg" / "run.json").write_text(json.dumps(record | {"outcome": "completed"}))
    record = json.loads((three_runs / "convnext" / "run.json").read_text())
    failed = record | {"outcome": "failed: RuntimeError: CUDA out of memory"}
    (three_runs / "convnext" / "run.json").write_text(json.dumps(failed))
    records = [r for r in collect([three_runs])[0] if r.group == "table3"]
    assert {r.name: r.state for r in records} == {"vgg": "finished", "convnext": "failed"}
    header, rows = Comparison.build(records, []).main_table()
    assert header[1] == "state" and {row[0]: row[1] for row in rows} == {
        "vgg": "finished",
        "convnext": "failed",
    }
    code, _, err = run_cli(
        [
            "compare",
            str(three_runs),
            "--group",
            "table3",
            "--table",
            str(TABLE3),
            "--out",
            str(three_runs / "t3"),
        ]
    )
    assert code == 0, err
    lines = [
        line for line in (three_runs / "t3" / "table3.md").read_text().splitlines() if line.startswith("|")
    ]
    rows = [line.split("|")[1].strip() for line in lines[2:]]
    assert rows == ["VGG-16"]  # the failed ConvNeXt-XL run is not a row
    assert run_outcome(KeyboardInterrupt()) == "interrupted"
    assert run_outcome(ValueError("lr must be positive\nmore")) == "failed: ValueError: lr must be positive"
    assert run_outcome(SystemExit(0)) == "completed" and run_outcome(SystemExit(2)) == "failed: SystemExit: 2"


def test_recording_outcome_closes_the_invocation_and_keeps_the_error(tmp_path):
    record = {"name": "r", "invocations": [{"argv": ["fit"]}]}
    with recording_outcome(tmp_path, record):
        pass
    assert json.loads((tmp_path / "run.json").read_text())["invocations"][0]["outcome"] == "completed"
    record["invocations"].append({"argv": ["fit", "--resume"]})
    with pytest.raises(RuntimeError, match="disk full"), recording_outcome(tmp_path, record):
        raise RuntimeError("disk full")
    written = json.loads((tmp_path / "run.json").read_text())
    assert [i["outcome"] for i in written["invocations"]] == ["completed", "failed: RuntimeError: disk full"]
    assert written["outcome"] == "failed: RuntimeError: disk full"


def test_compare_command_writes_markdown_csv_and_plots(three_runs, tmp_path):
    out = tmp_path / "out"
    code, printed, err = run_cli(["compare", str(three_runs), "--out", str(out), "--metric", "val/acc"])
    assert code == 0, err
    markdown = (out / "compare.md").read_text()
    assert "sorted by best val/acc (maximize)" in markdown and "| other |" in markdown
    assert "**Test metrics per generator**" in markdown and "| vgg | toy_ldm | 48 | 0.7000 |" in markdown
    assert (
        (out / "compare.csv")
        .read_text()
        .splitlines()[0]
        .startswith("run,model.backbone,model.lr,run.group,best val/acc")
    )
    assert (out / "per_generator.csv").is_file()
    for plot in ("metric_vs_params.png", "curves.png"):
        assert (out / "plots" / plot).stat().st_size > 5000, plot
        assert f"plots/{plot}" in markdown
    assert "| convnext |" in printed


def test_group_filter_selects_runs(three_runs, tmp_path):
    code, printed, err = run_cli(
        ["compare", str(three_runs), "--group", "elsewhere", "--out", str(tmp_path / "o")]
    )
    assert code == 0, err
    assert "| other |" in printed and "| vgg |" not in printed


def test_table3_spec_gives_the_papers_rows_and_columns(three_runs, tmp_path):
    # a second VGG run (another seed): the row is the mean of both, and says so
    make_run(
        three_runs,
        "vgg-seed2",
        lr=1e-4,
        backbone="vgg16.tv_in1k",
        val_losses=[0.5],
        gan=(0.8, 0.7, 0.9),
        ldm=(0.6, 0.5, 0.7),
    )
    out = tmp_path / "t3"
    code, printed, err = run_cli(
        ["compare", str(three_runs), "--group", "table3", "--table", str(TABLE3), "--out", str(out)]
    )
    assert code == 0, err
    table = (out / "table3.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert lines[0] == "| Models | Accuracy | F1-Score | AUC | runs |"
    vgg_acc = ((0.9 + 0.7) / 2 + (0.8 + 0.6) / 2) / 2
    vgg_f1 = ((0.9 + 0.6) / 2 + (0.7 + 0.5) / 2) / 2
    vgg_auc = ((0.95 + 0.8) / 2 + (0.9 + 0.7) / 2) / 2
    assert (
        lines[2] == f"| VGG-16 | {vgg_acc:.4f} | {vgg_f1:.4f} | {vgg_auc:.4f} | 2 |"
    )  # the paper's row order
    assert lines[3] == "| ConvNeXt-XL | 0.9900 | 0.9800 | 0.9950 | 1 |"
    assert "Paper 003 Table 3" in printed and (out / "table3.csv").is_file()


def test_table3_for_one_generator_and_unknown_generators(three_runs):
    records, _ = collect([three_runs])
    spec = load_table_spec(TABLE3)
    _, header, rows = render_table_spec(spec, records, generator="toy_gan")
    assert header == ["Models", "Accuracy", "F1-Score", "AUC"]
    assert rows[0] == ["VGG-16", 0.9, 0.9, 0.95] and rows[1][0] == "ResNet-50"
    code, _, err = run_cli(["compare", str(three_runs), "--table", str(TABLE3), "--generator", "sd2"])
    assert code == 2 and "no test results for generator 'sd2'" in err and "toy_gan" in err


def test_bad_table_specs_and_empty_folders_are_one_clear_line(tmp_path, three_runs):
    spec = tmp_path / "bad.yaml"
    spec.write_text("row: model.backbone\ncolumns: {Accuracy: test/mean/acc}\nrows: 3\n")
    code, _, err = run_cli(["compare", str(three_runs), "--table", str(spec)])
    assert code == 2 and "unknown keys ['rows']" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["compare", str(tmp_path / "empty")])
    assert code == 2 and "no run directories" in err and "Traceback" not in err
    code, _, err = run_cli(["compare"])
    assert code == 2 and "--wandb" in err


def test_a_wandb_run_reads_like_its_run_directory(three_runs):
    """The W&B reader (online only) feeds the same record: flat config, history rows, summary -> test report."""
    local = load_run_dir(three_runs / "vgg")
    summary = dict(local.summary)
    for generator, row in local.test_report.items():
        summary.update({f"test/{generator}/{k}": v for k, v in row.items() if k != "n"})
    fake = SimpleNamespace(
        name="vgg",
        config={**local.config, "_wandb": {"x": 1}},
        summary={**summary, "_runtime": 3.0, "_step": 7},
        state="finished",
        group="table3",
        url="https://wandb.ai/e/p/runs/abc",
        history=lambda samples, pandas: [{**row, "_step": i} for i, row in enumerate(local.history)],
    )
    remote = record_from_wandb_run(fake)
    assert remote.config == local.config and remote.history == local.history
    assert remote.best("val/loss", "minimize") == local.best("val/loss", "minimize") == (0.4, 1.0)
    for key in ("test/mean/acc", "test/toy_gan/f1", "val/acc"):
        assert remote.value(key) == pytest.approx(local.value(key)), key
