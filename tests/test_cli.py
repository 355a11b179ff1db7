"""Every shipped config through the real `forgelab` CLI: print_config, fast_dev_run on tiny presets, run
directories, resume, predict, clear errors, W&B offline."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from common.experiment import wandb_files
from tests.cli_helpers import (
    COMMAND_OVERRIDES,
    CONFIGS,
    TRAINER_PRESETS,
    command_configs,
    command_of,
    experiment_configs,
    run_cli,
    tiny_overrides,
)

TINY = CONFIGS / "inpaint_probe" / "tiny.yaml"
CPU = CONFIGS / "trainer" / "cpu.yaml"


def _fit_args(toy: Path, run_root: Path, *extra: str, config: Path = TINY) -> list[str]:
    return [
        "fit",
        "--config",
        str(CPU),
        "--config",
        str(config),
        *tiny_overrides(config, toy),
        f"--run.root={run_root}",
        *extra,
    ]


def _only_run(root: Path) -> Path:
    (run,) = [p for p in root.glob("*/*") if p.is_dir()]
    return run


@pytest.mark.parametrize("config", experiment_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_print_config_works_for_every_experiment_config(config):
    code, out, err = run_cli(
        [
            "fit",
            "--config",
            str(CONFIGS / "trainer" / "default.yaml"),
            "--config",
            str(config),
            "--print_config",
        ]
    )
    assert code == 0, err
    printed = yaml.safe_load(out)
    assert printed["model"]["class_path"] and printed["data"]["class_path"]
    assert printed["seed_everything"] == 42


@pytest.mark.parametrize("preset", TRAINER_PRESETS, ids=lambda p: p.stem)
def test_every_trainer_preset_stacks_with_a_project_config(preset):
    code, out, err = run_cli(["fit", "--config", str(preset), "--config", str(TINY), "--print_config"])
    assert code == 0, err
    assert yaml.safe_load(out)["trainer"]["accelerator"] in ("auto", "cpu", "gpu")


def _overlay_base(overlay: Path) -> Path:
    """The project's first non-tiny config the overlay is written for: same command, and for data overlays the
    overlay's datamodule class (when it names one) with every key the overlay sets."""
    command = command_of(overlay)
    candidates = command_configs() if command else experiment_configs()
    data = yaml.safe_load(overlay.read_text()).get("data") or {}
    keys = set(data.get("init_args") or {})
    for path in candidates:
        if path.parent != overlay.parent.parent or "tiny" in path.stem or command_of(path) != command:
            continue
        if command:
            return path
        base = yaml.safe_load(path.read_text())["data"]
        if data.get("class_path", base["class_path"]) == base["class_path"] and keys <= set(
            base["init_args"]
        ):
            return path
    raise AssertionError(f"no config in {overlay.parent.parent} for overlay {overlay}")


def test_every_data_overlay_stacks(tmp_path):
    for overlay in sorted(CONFIGS.rglob("data/*.yaml")):
        base = _overlay_base(overlay)
        command = command_of(overlay) or "fit"
        code, out, err = run_cli([command, "--config", str(base), "--config", str(overlay), "--print_config"])
        assert code == 0, (overlay, err)
        data = yaml.safe_load(overlay.read_text())
        printed = yaml.safe_load(out)
        section = "probe" if command == "probe" else "data"
        expected = data[section] if command == "probe" else data["data"]["init_args"]
        printed = printed[section] if command == "probe" else printed["data"]["init_args"]
        assert _contains(printed, expected), overlay


def _contains(printed, expected) -> bool:
    """Whether every value the overlay sets appears in the printed config (which adds the defaults)."""
    if isinstance(expected, dict):
        return isinstance(printed, dict) and all(_contains(printed.get(k), v) for k, v in expected.items())
    if isinstance(expected, list):
        return (
            isinstance(printed, list)
            and len(printed) == len(expected)
            and all(map(_contains, printed, expected))
        )
    return printed == expected


@pytest.mark.parametrize("config", command_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_command_config_prints_and_runs_on_tiny_presets(
    config, small_toy_world, tiny_inpainter_checkpoints, tmp_path
):
    command = command_of(config)
    code, out, err = run_cli([command, "--config", str(config), "--print_config"])
    assert code == 0, err
    assert yaml.safe_load(out)["command"] == command
    overrides = COMMAND_OVERRIDES[command](config, small_toy_world, tiny_inpainter_checkpoints)
    code, _out, err = run_cli([command, "--config", str(config), *overrides, f"--run.root={tmp_path}"])
    assert code == 0, err
    (run,) = [p for p in tmp_path.glob("*/*") if p.is_dir()]
    assert (run / "report.json").is_file()
    assert json.loads((run / "run.json").read_text())["outcome"] == "completed"


@pytest.mark.parametrize("config", experiment_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_experiment_config_runs_fast_dev_run_on_tiny_presets(config, small_toy_world, tmp_path):
    code, _out, err = run_cli(
        _fit_args(small_toy_world, tmp_path, "--trainer.fast_dev_run=true", config=config)
    )
    assert code == 0, err
    record = json.loads((_only_run(tmp_path) / "run.json").read_text())  # fast_dev_run writes no config/ckpt
    assert record["seed"] == 42


def test_fit_writes_a_complete_run_directory_and_tests_the_best_checkpoint(small_toy_world, tmp_path):
    code, out, err = run_cli(
        _fit_args(
            small_toy_world, tmp_path, "--trainer.max_epochs=2", "--run.name=full", "--seed_everything=7"
        )
    )
    assert code == 0, err
    run = tmp_path / "inpaint_probe" / "full"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["seed_everything"] == 7 and config["model"]["init_args"]["preset"] == "tiny"
    record = json.loads((run / "run.json").read_text())
    assert record["seed"] == 7 and record["project"] == "inpaint_probe" and record["group"] == "tiny"
    assert record["outcome"] == record["invocations"][-1]["outcome"] == "completed"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert any(r.get("val/loss") for r in rows) and any(r.get("train/loss_epoch") for r in rows)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "checkpoints").glob("best-*.ckpt"))
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert set(metrics) == {"toy_gan", "toy_ldm", "mean", "pooled"}
    table = (run / "test_per_generator.md").read_text()
    assert "| toy_gan |" in table and "| mean |" in table
    assert (run / "plots" / "test_curves.png").is_file()
    assert "| mean |" in out  # the table is printed


def test_two_runs_get_separate_directories(small_toy_world, tmp_path):
    for _ in range(2):
        code, _, err = run_cli(_fit_args(small_toy_world, tmp_path, "--trainer.fast_dev_run=true"))
        assert code == 0, err
    runs = sorted(p for p in (tmp_path / "inpaint_probe").iterdir())
    assert len(runs) == 2 and all((r / "run.json").is_file() for r in runs)


def test_resume_from_checkpoint_continues_the_same_run(small_toy_world, tmp_path):
    base = ["--run.name=resumable", "--run.test_after_fit=false"]
    code, _, err = run_cli(_fit_args(small_toy_world, tmp_path, "--trainer.max_epochs=1", *base))
    assert code == 0, err
    run = tmp_path / "inpaint_probe" / "resumable"
    first = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    code, _, err = run_cli(
        _fit_args(
            small_toy_world,
            tmp_path,
            "--trainer.max_epochs=2",
            *base,
            f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        )
    )
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "inpaint_probe").iterdir()) == ["resumable"]  # no new run
    second = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert second["epoch"] > first["epoch"] and second["global_step"] == 2 * first["global_step"]
    record = json.loads((run / "run.json").read_text())
    assert [i["resumed"] for i in record["invocations"]] == [False, True]
    assert [i["outcome"] for i in record["invocations"]] == ["completed", "completed"]
    epochs = {r["epoch"] for r in csv.DictReader((run / "metrics.csv").open())}
    assert {"0", "1"} <= epochs  # the CSV continues instead of starting over
    assert (run / "config.resume1.yaml").is_file()


def test_predict_writes_path_score_label_csv(small_toy_world, tmp_path):
    folder = small_toy_world / "realfake" / "test" / "toy_gan"
    code, _, err = run_cli(
        [
            "predict",
            "--config",
            str(CPU),
            "--config",
            str(TINY),
            *tiny_overrides(TINY, small_toy_world),
            f"--data.init_args.predict_root={folder}",
            f"--run.root={tmp_path}",
        ]
    )
    assert code == 0, err
    rows = list(csv.DictReader((_only_run(tmp_path) / "predictions.csv").open()))
    assert len(rows) == len(list(folder.rglob("*.png")))
    assert all(0.0 <= float(r["score"]) <= 1.0 and r["predicted_label"] in ("0", "1") for r in rows)
    assert {r["true_label"] for r in rows} == {"0", "1"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--data.init_args.batch_size=0", "batch_size must be positive"),
        ("--model.init_args.lr=-1", "lr must be positive"),
        ("--data.init_args.test_perturbation=sharpen:3", "unknown perturbation"),
        ("--data.init_args.train_root=/nonexistent/forgelab", "does not exist"),
    ],
)
def test_bad_config_values_are_one_clear_line(small_toy_world, tmp_path, override, message):
    code, _, err = run_cli(_fit_args(small_toy_world, tmp_path, override, "--trainer.fast_dev_run=true"))
    assert code == 2
    assert message in err and "Traceback" not in err
    assert list(tmp_path.glob("*/*")) == []  # a failed start leaves no run directory behind


def test_unavailable_pretrained_weights_are_one_clear_line(small_toy_world, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    args = _fit_args(
        small_toy_world, tmp_path, "--trainer.fast_dev_run=true", "--model.init_args.preset=pretrained"
    )
    code, _, err = run_cli(args)
    assert code == 2
    backbone = yaml.safe_load(TINY.read_text())["model"]["init_args"]["backbone"]
    assert f"Cannot load pretrained weights for '{backbone}'" in err and "preset: tiny" in err
    assert "Traceback" not in err and "Union" not in err


def test_wandb_agent_argument_is_tolerated(small_toy_world, tmp_path):
    code, _, err = run_cli(
        _fit_args(small_toy_world, tmp_path, "--trainer.fast_dev_run=true", "--_wandb=resume")
    )
    assert code == 0, err


def test_overview_lists_commands():
    code, out, _ = run_cli([])
    assert code == 0 and "fit" in out and "predict" in out


def test_wandb_offline_run_receives_the_full_config(small_toy_world, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    code, _, err = run_cli(_fit_args(small_toy_world, tmp_path, "--trainer.max_epochs=1", "--run.name=wb"))
    assert code == 0, err
    (run_file,) = (tmp_path / "inpaint_probe" / "wb" / "wandb").glob("offline-run-*/run-*.wandb")
    config = wandb_files.config(run_file)
    assert config["model"]["init_args"]["backbone"] and config["data"]["init_args"]["image_size"] == 32
    assert config["seed_everything"] == 42
    assert b"test/per_generator" in run_file.read_bytes()  # the per-generator table


@pytest.mark.slow
def test_ddp_sim_two_processes_fit_and_test(small_toy_world, tmp_path):
    code, _out, err = run_cli(
        [
            "fit",
            "--config",
            str(CONFIGS / "trainer" / "ddp_sim.yaml"),
            "--config",
            str(TINY),
            *tiny_overrides(TINY, small_toy_world),
            f"--run.root={tmp_path}",
            "--trainer.max_epochs=1",
            "--run.name=ddp",
        ]
    )
    assert code == 0, err
    run = tmp_path / "inpaint_probe" / "ddp"
    metrics = json.loads((run / "test_metrics.json").read_text())
    n_test = len(list((small_toy_world / "realfake" / "test").rglob("*.png")))
    assert metrics["pooled"]["n"] == n_test  # every test image once, despite the sampler's padding
    assert sorted(p.name for p in (tmp_path / "inpaint_probe").iterdir()) == ["ddp"]
