"""The experiment loop off the happy path, through the real CLI: the debug preset, resuming by run name, `last`
and `wandb agent` re-runs, W&B run state on Ctrl-C and errors, W&B's own offline setting, offline resumption
with continuing steps, the config logged once, evaluations in their own runs, and failed starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from common.experiment import wandb_files
from tests.cli_helpers import CONFIGS, experiment_configs, run_cli, tiny_overrides

TINY = CONFIGS / "inpaint_probe" / "tiny.yaml"
CPU = CONFIGS / "trainer" / "cpu.yaml"
DEBUG = CONFIGS / "trainer" / "debug.yaml"
QUICK = ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--run.test_after_fit=false"]


def _fit(toy: Path, root: Path, *extra: str, command: str = "fit") -> tuple[int, str, str]:
    args = [command, "--config", str(CPU), "--config", str(TINY), *tiny_overrides(TINY, toy)]
    return run_cli([*args, f"--run.root={root}", *extra])


def _runs(root: Path) -> list[str]:
    base = root / "inpaint_probe"
    return sorted(p.name for p in base.iterdir()) if base.is_dir() else []


def _ckpt(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")


def _raise_at(error: str, batch: int = 1) -> str:
    spec = {"class_path": "tests.faults.RaiseAt", "init_args": {"error": error, "batch": batch}}
    return f"--trainer.callbacks+={json.dumps(spec)}"


def _offline_files(run: Path) -> list[Path]:
    record = json.loads((run / "run.json").read_text())
    return wandb_files.offline_run_files(run / "wandb", record["wandb_id"])


# 1 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", experiment_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_the_debug_preset_wins_over_every_experiment_config(config):
    code, out, err = run_cli(["fit", "--config", str(DEBUG), "--config", str(config), "--print_config"])
    assert code == 0, err
    printed = yaml.safe_load(out)
    assert printed["trainer"]["fast_dev_run"] == 2 and printed["trainer"]["accelerator"] == "cpu"
    assert printed["run"]["wandb"] is False
    assert "fast_dev_run" not in (yaml.safe_load(config.read_text()).get("trainer") or {})


def test_a_debug_run_of_a_many_epoch_config_takes_two_batches(small_toy_world, tmp_path):
    spy = {
        "class_path": "tests.faults.RaiseAt",
        "init_args": {"error": "RuntimeError", "epoch": 1, "batch": 0},
    }
    args = ["fit", "--config", str(DEBUG), "--config", str(TINY), *tiny_overrides(TINY, small_toy_world)]
    # tiny.yaml trains 12 epochs: under the debug preset a second epoch (where the spy raises) never starts
    code, _, err = run_cli([*args, f"--run.root={tmp_path}", f"--trainer.callbacks+={json.dumps(spy)}"])
    assert code == 0, err


# 2 ------------------------------------------------------------------------------------------------------------
def test_ckpt_path_last_with_an_existing_run_name_resumes_that_run(small_toy_world, tmp_path):
    base = ["--run.name=r", "--run.wandb=false", *QUICK]
    code, _, err = _fit(small_toy_world, tmp_path, "--trainer.max_epochs=1", *base)
    assert code == 0, err
    first = _ckpt(tmp_path / "inpaint_probe" / "r")
    code, _, err = _fit(small_toy_world, tmp_path, "--trainer.max_epochs=2", *base, "--ckpt_path=last")
    assert code == 0, err
    assert _runs(tmp_path) == ["r"]
    second = _ckpt(tmp_path / "inpaint_probe" / "r")
    assert second["epoch"] == first["epoch"] + 1 and second["global_step"] == 2 * first["global_step"]
    # a run name as ckpt_path resumes that run's last.ckpt too
    code, _, err = _fit(small_toy_world, tmp_path, "--trainer.max_epochs=3", *QUICK, "--ckpt_path=r")
    assert code == 0, err
    assert (
        _runs(tmp_path) == ["r"]
        and _ckpt(tmp_path / "inpaint_probe" / "r")["global_step"] == 3 * (first["global_step"])
    )
    record = json.loads((tmp_path / "inpaint_probe" / "r" / "run.json").read_text())
    assert [i["resumed"] for i in record["invocations"]] == [False, True, True]


def test_an_existing_run_name_without_a_checkpoint_is_refused(small_toy_world, tmp_path):
    base = ["--run.name=r", "--run.wandb=false", "--trainer.max_epochs=1", *QUICK]
    assert _fit(small_toy_world, tmp_path, *base)[0] == 0
    code, _, err = _fit(small_toy_world, tmp_path, *base)
    assert code == 2 and "exists" in err and "--ckpt_path last" in err
    assert _runs(tmp_path) == ["r"]


def test_ckpt_path_last_of_a_run_not_yet_started_trains_from_scratch(small_toy_world, tmp_path):
    code, _, err = _fit(
        small_toy_world, tmp_path, "--run.name=new", "--run.wandb=false", "--trainer.max_epochs=1", *QUICK,
        "--ckpt_path=last",
    )  # fmt: skip
    assert code == 0, err
    assert _runs(tmp_path) == ["new"] and _ckpt(tmp_path / "inpaint_probe" / "new")["epoch"] == 0


# 3, 7 ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("error", "exit_code", "outcome"), [("KeyboardInterrupt", 255, "interrupted"),
                                                            ("RuntimeError", 1, "failed: RuntimeError")])  # fmt: skip
def test_interrupted_and_failed_runs_show_so_on_wandb(
    small_toy_world, tmp_path, monkeypatch, error, exit_code, outcome
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    try:  # Lightning turns a Ctrl-C into exit status 1; a crash propagates with its traceback
        code, _, _ = _fit(small_toy_world, tmp_path, "--run.name=x", *QUICK, _raise_at(error))
    except RuntimeError:
        code = None
    assert code == (1 if error == "KeyboardInterrupt" else None)
    run = tmp_path / "inpaint_probe" / "x"
    (run_file,) = _offline_files(run)
    assert wandb_files.exit_code(run_file) == exit_code
    assert json.loads((run / "run.json").read_text())["outcome"].startswith(outcome)


def test_a_completed_run_finishes_with_exit_code_0_and_the_config_logged_once_nested(
    small_toy_world, tmp_path, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    # a sweep trial: W&B puts the sweep's parameters in the config under their dotted names
    params = tmp_path / "sweep_params.yaml"
    params.write_text(yaml.safe_dump({"model.init_args.lr": {"value": 0.001}}))
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(params))
    code, _, err = _fit(
        small_toy_world,
        tmp_path,
        "--run.name=c",
        "--trainer.max_epochs=1",
        *QUICK,
        "--model.init_args.lr=0.001",
    )
    assert code == 0, err
    (run_file,) = _offline_files(tmp_path / "inpaint_probe" / "c")
    assert wandb_files.exit_code(run_file) == 0
    config = wandb_files.config(run_file)
    model = config["model"]
    assert model["class_path"] == "projects.inpaint_probe.classifier.RealFakeClassifier"
    assert model["init_args"]["backbone"] == "resnet50.tv_in1k"
    assert config["model.init_args.lr"] == 0.001 and "lr" not in model["init_args"]  # once: the sweep's key
    assert config["run"]["tags"] == ["classifier", "resnet50_tiny_preset", "toy_world"]  # lists stay lists
    assert isinstance(config["data"]["init_args"]["augment"], dict)
    for lightning_hparam in ("lr", "backbone", "augment", "_instantiator", "model.backbone", "config"):
        assert lightning_hparam not in config


def test_every_module_keeps_its_hyperparameters_out_of_the_loggers():
    """Lightning's automatic hparams logging would send the config a second time, unprefixed."""
    repo = Path(__file__).resolve().parents[1]
    for path in [*repo.glob("common/**/*.py"), *repo.glob("projects/**/*.py")]:
        for line in path.read_text().splitlines():
            if "self.save_hyperparameters(" in line:
                assert "logger=False" in line, f"{path.relative_to(repo)}: {line.strip()}"


# 4 ------------------------------------------------------------------------------------------------------------
def test_wandb_offline_setting_is_honoured_when_credentials_exist(small_toy_world, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # credentials exist (never used: offline)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "20")
    env = {**os.environ, "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config")}
    wandb_cli = Path(sys.executable).with_name("wandb")
    # `wandb offline` writes the workspace settings (./wandb/settings) W&B reads when started from that folder
    subprocess.run([str(wandb_cli), "offline"], env=env, cwd=tmp_path, check=True, capture_output=True)
    monkeypatch.chdir(tmp_path)
    code, _, err = _fit(small_toy_world, tmp_path, "--run.name=o", "--trainer.max_epochs=1", *QUICK)
    assert code == 0, err
    (run_file,) = _offline_files(tmp_path / "inpaint_probe" / "o")
    assert wandb_files.exit_code(run_file) == 0


def test_without_credentials_or_a_mode_wandb_falls_back_to_offline(tmp_path, monkeypatch):
    from common.experiment.runs import wandb_mode

    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert wandb_mode() == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)  # what `wandb login` writes; netrc refuses a world-readable one
    assert wandb_mode() is None  # W&B decides (its settings, `wandb offline`)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() is None


# 5 ------------------------------------------------------------------------------------------------------------
def test_a_resumed_offline_run_continues_its_steps(small_toy_world, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    base = ["--run.name=s", *QUICK, "--trainer.log_every_n_steps=1"]
    assert _fit(small_toy_world, tmp_path, "--trainer.max_epochs=1", *base)[0] == 0
    code, _, err = _fit(small_toy_world, tmp_path, "--trainer.max_epochs=2", *base, "--ckpt_path=last")
    assert code == 0, err
    first, second = (wandb_files.history(p) for p in _offline_files(tmp_path / "inpaint_probe" / "s"))
    assert first and second
    assert min(r["_step"] for r in second) > max(r["_step"] for r in first)  # one history when both sync
    steps = [r["trainer/global_step"] for r in first + second if "trainer/global_step" in r]
    assert steps == sorted(steps) and max(steps) > max(
        r.get("trainer/global_step", 0) for r in first
    )  # the trainer's step continues too


# 6 ------------------------------------------------------------------------------------------------------------
def test_a_wandb_agent_rerun_resumes_the_run_holding_its_id(small_toy_world, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_RUN_ID", "preempted1")
    base = ["--run.wandb=false", *QUICK]
    assert _fit(small_toy_world, tmp_path, "--trainer.max_epochs=1", *base)[0] == 0
    (name,) = _runs(tmp_path)
    first = _ckpt(tmp_path / "inpaint_probe" / name)
    code, _, err = _fit(small_toy_world, tmp_path, "--trainer.max_epochs=2", *base)
    assert code == 0, err
    assert _runs(tmp_path) == [name]
    assert _ckpt(tmp_path / "inpaint_probe" / name)["global_step"] == 2 * first["global_step"]


# 8 ------------------------------------------------------------------------------------------------------------
def test_testing_a_checkpoint_writes_a_new_run_and_replaces_nothing(small_toy_world, tmp_path):
    code, _, err = _fit(
        small_toy_world, tmp_path, "--run.name=f", "--run.wandb=false", "--trainer.max_epochs=1"
    )
    assert code == 0, err
    fit_run = tmp_path / "inpaint_probe" / "f"
    before = {p.relative_to(fit_run): p.read_bytes() for p in fit_run.rglob("*") if p.is_file()}
    ckpt = fit_run / "checkpoints" / "last.ckpt"
    for _ in range(2):
        code, _, err = _fit(
            small_toy_world, tmp_path, "--run.wandb=false", f"--ckpt_path={ckpt}", command="test"
        )
        assert code == 0, err
    after = {p.relative_to(fit_run): p.read_bytes() for p in fit_run.rglob("*") if p.is_file()}
    assert after == before
    tests = [name for name in _runs(tmp_path) if name.startswith("f-test-")]
    assert len(tests) == 2
    for name in tests:
        record = json.loads((tmp_path / "inpaint_probe" / name / "run.json").read_text())
        assert record["source_checkpoint"] == str(ckpt.resolve()) and record["source_run"] == str(fit_run)
        assert record["job_type"] == "test"
        assert (tmp_path / "inpaint_probe" / name / "test_metrics.json").is_file()


# 9 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--trainer.max_epochs=abc", "trainer.max_epochs = abc: expected int or null"),
        ("--model.init_args.lr=abc", "model.init_args.lr = abc: expected float"),
        ("--data.init_args.resize=weird", "data.init_args.resize = weird: expected one of 'resize'"),
        ("--model.init_args.nokey=3", "model.init_args.nokey is not an argument of RealFakeClassifier"),
        ("--model.init_args.backbone=nonexistent_net", "backbone='nonexistent_net' is not a timm model"),
        ("--data.init_args.train_root=/nonexistent/forgelab", "does not exist"),
    ],
)
def test_a_failed_start_is_one_line_and_leaves_no_run(small_toy_world, tmp_path, override, message):
    code, _out, err = _fit(small_toy_world, tmp_path, "--trainer.fast_dev_run=true", override)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("forgelab: error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert "usage:" not in err and "Union" not in err and "Traceback" not in err
    assert _runs(tmp_path) == []


def test_last_prefers_a_newer_hpc_checkpoint_and_other_ranks_join_rank_0s_run(tmp_path, monkeypatch):
    """A SLURM pre-emption saves `<run>/hpc_ckpt_<n>.ckpt` after the last `last.ckpt`: resuming from `last`
    would repeat the steps between. Under srun every rank resolves the run itself: rank 1 joins rank 0's."""
    import os as _os

    from common.experiment.runs import RunSettings, locate_trainer_run

    for var in ("WANDB_RUN_ID", "RANK", "SLURM_PROCID", "FORGELAB_RUN_DIR"):
        monkeypatch.delenv(var, raising=False)
    settings = RunSettings(project="p", name="r", root=str(tmp_path))
    run = tmp_path / "p" / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert locate_trainer_run(settings, None, "last", "fit").ckpt_path == "last"
    (run / "hpc_ckpt_1.ckpt").write_bytes(b"")
    stamp = (run / "checkpoints" / "last.ckpt").stat().st_mtime + 5
    _os.utime(run / "hpc_ckpt_1.ckpt", (stamp, stamp))
    location = locate_trainer_run(settings, None, "last", "fit")
    assert location.ckpt_path == "hpc" and location.run_dir == run and location.resumed
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert locate_trainer_run(settings, None, None, "fit").run_dir == run  # no refusal on rank 1


@pytest.mark.parametrize(
    ("message", "line"),
    [
        ("Parser key \"config\": File does not exist: 'x.yaml'", "config: File does not exist: 'x.yaml'"),
        ("unrecognized arguments: fit --nonsense=1", "unrecognized arguments: fit --nonsense=1"),
        (
            "Parser key \"run.wandb\":\n  Expected a <class 'bool'>. Got value: maybe",
            "run.wandb = maybe: expected bool",
        ),
    ],
)
def test_parse_errors_in_other_shapes_stay_one_line(message, line):
    from common.experiment.parse_errors import one_line

    assert one_line(message) == line
