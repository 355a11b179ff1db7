"""`forgelab sweep`: every sweep file passes W&B's own schema, its trial command (built as `wandb agent`
builds it, checked against the agent itself) parses with the real CLI, its metric is its model's checkpoint
monitor and the README lists it; the local controller (W&B's `sweeps` search, failures and exit codes,
hyperband, resuming, locking, dry runs, parallel trials) on a fast stand-in program; real tiny-classifier
trials with compare and best_config.yaml, and (slow) a 3-trial sweep end to end."""

from __future__ import annotations

import copy
import fcntl
import functools
import importlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import wandb
import yaml

from common.experiment import sweep as sweep_module
from common.experiment.sweep import SweepInterrupted, load_sweep_file, trial_command
from tests.cli_helpers import CONFIGS, run_cli, tiny_overrides
from tests.conftest import REPO

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import sweeps

SWEEP_FILES = sorted((CONFIGS / "sweeps").glob("*.yaml"))
PROGRAM = Path(__file__).with_name("sweep_program.py")
TINY = CONFIGS / "inpaint_probe" / "tiny.yaml"
CPU = CONFIGS / "trainer" / "cpu.yaml"


def _write(tmp_path: Path, definition: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(definition, sort_keys=False))
    return path


def _stand_in(parameters: dict, method: str = "grid", **extra) -> dict:
    """A sweep of the stand-in program (tests/sweep_program.py): val/loss = (x - 0.3)^2 + 1/(epoch + 1)."""
    return {
        "name": "stand_in",
        "method": method,
        "metric": {"name": "val/loss", "goal": "minimize"},
        "parameters": parameters,
        "command": ["${interpreter}", str(PROGRAM), "${args}"],
        **extra,
    }


def _state(root: Path, name: str = "stand_in") -> dict:
    return json.loads((root / "sweeps" / name / "sweep.json").read_text())


def _launches(trial_dir: Path) -> int:
    return sum(line.startswith("$ ") for line in (trial_dir / "output.log").read_text().splitlines())


@pytest.fixture
def fast_polling(monkeypatch):
    monkeypatch.setattr(sweep_module, "POLL_SECONDS", 0.05)


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


# -- the shipped sweep files ------------------------------------------------------------------------------------
def test_there_are_sweep_files():
    assert {p.stem for p in SWEEP_FILES} >= {"classifier_tiny", "classifier_lr_wd", "classifier_backbone"}


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_every_sweep_file_passes_wandbs_own_schema(path):
    definition = yaml.safe_load(path.read_text())
    assert sweeps.schema_violations_from_proposed_config(definition) == []
    sweeps.SweepConfig(definition)  # what wandb's controller runs before it creates a sweep
    assert load_sweep_file(path) == definition
    assert "${args}" in definition["command"] and definition["command"][:2] == ["forgelab", "fit"]


@functools.cache
def _printed_first_trial(path: Path) -> tuple[dict, str]:
    """The search's first suggestion for a sweep file and the real CLI's `--print_config` of the command
    `wandb agent` would run for it, from the repository root (parsed once per file for the tests below)."""
    definition = load_sweep_file(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        suggestion = sweeps.next_run(definition, [])
    params = {key: value["value"] for key, value in suggestion.config.items()}
    command = trial_command(definition, params)
    here = os.getcwd()
    os.chdir(REPO)
    try:
        code, out, err = run_cli([*command[command.index("fit") :], "--print_config"])
    finally:
        os.chdir(here)
    assert code == 0, err
    return params, out


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_every_sweep_file_trial_command_parses_with_the_swept_values(path):
    """The command `wandb agent` would run for the search's first suggestion is accepted by the real CLI, and
    every swept value lands where its parameter name says (the names are jsonargparse keys)."""
    params, out = _printed_first_trial(path)
    printed = yaml.safe_load(out)
    for key, value in params.items():
        if key == "config":  # the experiment config itself is swept (Table 3's backbones): its values win
            swept = yaml.safe_load((REPO / value).read_text())
            for section in ("model", "data"):
                for name, expected in ((swept.get(section) or {}).get("init_args") or {}).items():
                    if not isinstance(expected, dict):
                        assert printed[section]["init_args"][name] == expected, (section, name)
        elif isinstance(value, float):
            assert math.isclose(_get(printed, key), value, rel_tol=1e-6), key
        else:
            assert _get(printed, key) == value, key


def test_trial_command_is_wandb_agents_format():
    definition = _stand_in({"x": {"values": [1]}})
    definition["command"] = [
        "forgelab",
        "fit",
        "--config",
        "a.yaml",
        "${args}",
        "--trainer.fast_dev_run=true",
    ]
    command = trial_command(definition, {"model.init_args.lr": 0.001, "trainer.max_epochs": 3, "flag": True})
    assert command[-5:] == [
        "a.yaml",
        "--model.init_args.lr=0.001",
        "--trainer.max_epochs=3",
        "--flag=True",
        "--trainer.fast_dev_run=true",
    ]
    assert Path(command[0]).name == "forgelab" or command[1:3] == ["-m", "common.experiment.cli"]


def test_private_wandb_modules_are_used_only_with_a_reason():
    """sweep.py and compare.py may import from wandb's private modules (anything below `wandb.` that is not
    the package itself) only where the comment above the import says why no public API serves."""
    for source in ("sweep.py", "compare.py"):
        lines = (REPO / "common" / "experiment" / source).read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"\s*(from wandb\.\S+ import|import wandb\.)", line):
                above = lines[i - 1].strip()
                assert above.startswith("#") and "public" in above, f"{source}:{i + 1}: {line.strip()}"


def test_trial_command_is_what_the_real_wandb_agent_runs(tmp_path, monkeypatch):
    """wandb's own agent, fed a run command as its server would send it, builds the same command line as
    `trial_command` (macros, `${envvar:...}`, value formatting), up to the interpreter (the agent's `python`,
    this environment's Python here). Fails when a wandb release changes how the agent expands a command."""
    from wandb import wandb_agent

    launched: list[list[str]] = []

    class Recorder:
        def __init__(self, command=None, **kwargs):
            launched.append(command)

    for name, value in (("WANDB_DIR", str(tmp_path)), ("WANDB_SWEEP_ID", "s1"), ("SWEEP_MACRO_TEST", "v")):
        monkeypatch.setenv(name, value)
    for name in ("WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH"):  # the agent sets them; restored after the test
        monkeypatch.setenv(name, "")
    monkeypatch.setattr(wandb_agent, "AgentProcess", Recorder)
    template = ["${env}", "${interpreter}", "${program}", "--config", "a.yaml", "${args}", "${args_json}"]
    template += ["${envvar:SWEEP_MACRO_TEST}", "${args_no_boolean_flags}"]
    definition = _stand_in({"x": {"values": [1]}}, program="train.py") | {"command": template}
    params = {"model.init_args.lr": 0.00123, "trainer.max_epochs": 3, "flag": False, "name": "a b"}
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id="s1")
    agent._sweep_command = copy.deepcopy(template)
    agent._command_run(
        {"run_id": "r1", "program": "train.py", "args": {k: {"value": v} for k, v in params.items()}}
    )
    ours = ["python" if token == sys.executable else token for token in trial_command(definition, params)]
    assert launched == [ours]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"command": ["forgelab", "fit", "${args_no_hyphens}"]}, "jsonargparse rejects"),
        ({"command": ["forgelab", "fit", "--config", "x.yaml"]}, "has no `${args}`"),
        ({"parameters": {"model.init_args.lr": {"min": "1e-5", "max": 1.0e-3}}}, "write 1.0e-5"),
        ({"method": "annealing"}, "annealing"),
    ],
)
def test_bad_sweep_files_are_one_clear_line(tmp_path, change, message):
    definition = _stand_in({"x": {"values": [0.1]}}) | change
    code, _, err = run_cli(["sweep", str(_write(tmp_path, definition)), "--root", str(tmp_path)])
    assert code == 2 and message in err and "Traceback" not in err


def test_missing_config_files_are_reported_before_any_trial(tmp_path):
    definition = _stand_in({"x": {"values": [0.1]}})
    definition["command"] = ["forgelab", "fit", "--config", "configs/nope.yaml", "${args}"]
    code, _, err = run_cli(["sweep", str(_write(tmp_path, definition)), "--root", str(tmp_path)])
    assert code == 2 and "configs/nope.yaml" in err and "repository root" in err
    assert not (tmp_path / "sweeps").exists()


def test_a_trial_whose_program_cannot_start_is_a_failed_trial(tmp_path, fast_polling):
    """...and the sweep goes on to the next trial, as after a crash."""
    definition = _stand_in({"x": {"values": [0.1, 0.2]}})
    definition["command"] = [str(tmp_path / "not_a_program"), "${args}"]
    code, _, err = run_cli(["sweep", str(_write(tmp_path, definition)), "--root", str(tmp_path)])
    assert code == 2 and "all 2 trials of sweep stand_in failed" in err and "cannot start" in err
    trials = _state(tmp_path)["trials"]
    assert [t["state"] for t in trials] == ["failed", "failed"] and "not_a_program" in trials[1]["error"]


def test_random_sweep_without_count_or_run_cap_is_a_clear_error(tmp_path):
    definition = _stand_in({"x": {"min": 0.0, "max": 1.0}}, method="random")
    code, _, err = run_cli(["sweep", str(_write(tmp_path, definition)), "--root", str(tmp_path)])
    assert code == 2 and "--count" in err


# -- the local controller on the stand-in program ---------------------------------------------------------------
def test_grid_sweep_runs_each_point_once_and_records_the_metric(tmp_path, fast_polling):
    path = _write(tmp_path, _stand_in({"x": {"values": [0.1, 0.3, 0.5]}, "epochs": {"value": 3}}))
    code, out, err = run_cli(["sweep", str(path), "--root", str(tmp_path)])
    assert code == 0, err
    trials = _state(tmp_path)["trials"]
    assert [t["params"] for t in trials] == [{"x": x, "epochs": 3} for x in (0.1, 0.3, 0.5)]
    assert [t["state"] for t in trials] == ["finished"] * 3
    for trial in trials:  # min over epochs of (x - 0.3)^2 + 1/(e + 1): the last epoch
        assert trial["metric"] == pytest.approx((trial["params"]["x"] - 0.3) ** 2 + 1 / 3)
    assert "best: trial-001" in out
    compare = tmp_path / "sweeps" / "stand_in" / "compare"
    assert (compare / "compare.md").is_file() and (compare / "plots" / "metric_vs_params.png").is_file()
    code, out, err = run_cli(["sweep", str(path), "--root", str(tmp_path)])  # nothing left to do
    assert code == 0, err
    assert len(_state(tmp_path)["trials"]) == 3 and "grid is exhausted" in out


def test_a_failed_trial_is_recorded_and_the_sweep_goes_on(tmp_path, fast_polling):
    parameters = {"x": {"values": [0.1, 0.2, 0.5]}, "fail": {"values": ["false", "true"]}}
    path = _write(tmp_path, _stand_in(parameters))
    code, out, err = run_cli(["sweep", str(path), "--root", str(tmp_path), "--count", "4"])
    assert code == 0, err
    trials = _state(tmp_path)["trials"]
    assert len(trials) == 4 and {t["params"]["fail"] for t in trials} == {"true", "false"}
    for trial in trials:
        assert trial["state"] == ("failed" if trial["params"]["fail"] == "true" else "finished")
    failed = next(t for t in trials if t["state"] == "failed")
    assert failed["exit_code"] == 3 and "told to fail" in failed["error"]
    assert "failed (exit 3)" in out
    # some trials failed: the sweep still has results (exit 0), and its last line says which failed
    failed = [f"trial-{t['index']:03d}" for t in trials if t["state"] == "failed"]
    assert f"{len(failed)} of 4 trials failed ({', '.join(failed)})" in out.strip().splitlines()[-1]


def test_a_sweep_whose_trials_all_failed_exits_non_zero(tmp_path, fast_polling):
    """Fewer trials than the stop-early rule needs, all failed: no result, so not a success; and running the
    finished sweep again says so again."""
    path = _write(tmp_path, _stand_in({"x": {"values": [1, 2]}, "fail": {"value": "true"}}))
    for _ in range(2):
        code, _, err = run_cli(["sweep", str(path), "--root", str(tmp_path)])
        assert code != 0 and "all 2 trials of sweep stand_in failed" in err and "told to fail" in err
        assert len(err.strip().splitlines()) == 1
    assert [t["state"] for t in _state(tmp_path)["trials"]] == ["failed", "failed"]


def test_a_sweep_whose_first_trials_all_fail_stops(tmp_path, fast_polling):
    path = _write(tmp_path, _stand_in({"x": {"values": [1, 2, 3, 4, 5]}, "fail": {"value": "true"}}))
    code, _, err = run_cli(["sweep", str(path), "--root", str(tmp_path)])
    assert code == 2 and "first 3 trials" in err and "told to fail" in err
    assert len(_state(tmp_path)["trials"]) == 3


@pytest.mark.parametrize("method", ["random", "bayes"])
def test_random_and_bayes_search_are_seeded_and_stop_at_count(tmp_path, fast_polling, method):
    definition = _stand_in({"x": {"min": 0.0, "max": 1.0}, "epochs": {"value": 2}}, method=method)
    path = _write(tmp_path, definition)
    picks = []
    for root in (tmp_path / "a", tmp_path / "b"):
        code, _, err = run_cli(["sweep", str(path), "--root", str(root), "--count", "3", "--seed", "5"])
        assert code == 0, err
        trials = _state(root)["trials"]
        assert len(trials) == 3 and all(t["state"] == "finished" for t in trials)
        picks.append([t["params"]["x"] for t in trials])
    assert picks[0] == picks[1] and len(set(picks[0])) == 3 and all(0 <= x <= 1 for x in picks[0])


def test_hyperband_stops_a_trial_that_falls_behind(tmp_path, fast_polling):
    parameters = {"x": {"values": [0.3, 0.35, 0.9]}, "epochs": {"value": 12}, "sleep": {"value": 0.1}}
    definition = _stand_in(parameters, early_terminate={"type": "hyperband", "min_iter": 2, "eta": 2})
    code, out, err = run_cli(["sweep", str(_write(tmp_path, definition)), "--root", str(tmp_path)])
    assert code == 0, err
    trials = _state(tmp_path)["trials"]
    assert [t["state"] for t in trials] == ["finished", "finished", "stopped"]
    rows = (tmp_path / "sweeps" / "stand_in" / "trial-002" / "metrics.csv").read_text().splitlines()
    assert 1 + 2 <= len(rows) < 1 + 12  # stopped after the first band, before its last epoch
    assert "stopped early by hyperband" in out
    assert (
        "| trial-002 | stopped |" in (tmp_path / "sweeps" / "stand_in" / "compare" / "compare.md").read_text()
    )


def test_an_interrupted_sweep_resumes_where_it_stopped(tmp_path, fast_polling, monkeypatch):
    parameters = {"x": {"values": [0.1, 0.3, 0.5]}, "epochs": {"value": 4}, "sleep": {"value": 0.05}}
    path = _write(tmp_path, _stand_in(parameters))
    original = sweep_module.LocalSweep.should_stop_early

    def ctrl_c_during_the_second_trial(self, trial):
        if trial.index == 1:
            raise SweepInterrupted("SIGINT")
        return original(self, trial)

    monkeypatch.setattr(sweep_module.LocalSweep, "should_stop_early", ctrl_c_during_the_second_trial)
    code, _, err = run_cli(["sweep", str(path), "--root", str(tmp_path)])
    assert code == 130 and "run the same command to resume" in err
    assert [t["state"] for t in _state(tmp_path)["trials"]] == ["finished", "preempted"]

    monkeypatch.setattr(sweep_module.LocalSweep, "should_stop_early", original)
    code, _, err = run_cli(["sweep", str(path), "--root", str(tmp_path)])
    assert code == 0, err
    trials = _state(tmp_path)["trials"]
    assert [t["state"] for t in trials] == ["finished"] * 3
    assert [t["params"]["x"] for t in trials] == [0.1, 0.3, 0.5]  # the interrupted point, not a new one
    sweep_dir = tmp_path / "sweeps" / "stand_in"
    assert [_launches(sweep_dir / f"trial-00{i}") for i in range(3)] == [1, 2, 1]
    assert len(_state(tmp_path)["invocations"]) == 2


def test_a_trial_left_running_by_a_killed_sweep_process_starts_again(tmp_path, fast_polling):
    path = _write(tmp_path, _stand_in({"x": {"values": [0.1, 0.3]}, "epochs": {"value": 2}}))
    assert run_cli(["sweep", str(path), "--root", str(tmp_path)])[0] == 0
    # what a SIGKILLed sweep process leaves: a trial marked running whose process is gone
    dead = subprocess.Popen(["true"])
    dead.wait()
    state_path = tmp_path / "sweeps" / "stand_in" / "sweep.json"
    state = json.loads(state_path.read_text())
    state["trials"][1].update(state="running", pid=dead.pid, metric=None)
    state_path.write_text(json.dumps(state))
    code, _, err = run_cli(["sweep", str(path), "--root", str(tmp_path)])
    assert code == 0, err
    trials = _state(tmp_path)["trials"]
    assert [t["state"] for t in trials] == ["finished", "finished"] and trials[1]["attempts"] == 2
    assert trials[1]["metric"] == pytest.approx(0.5)


def _ran(root: Path, index: int) -> dict:
    return json.loads((root / "sweeps" / "stand_in" / f"trial-{index:03d}" / "ran.json").read_text())


def test_parallel_trials_run_at_once_one_per_gpu(tmp_path, fast_polling, monkeypatch):
    """--parallel 2 with two GPUs visible: two trials at a time, each seeing only its own GPU; the search still
    picks every trial (a grid: each point once) and the sweep ends as a sequential one does."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    parameters = {"x": {"values": [0.1, 0.3, 0.5, 0.7]}, "epochs": {"value": 4}, "sleep": {"value": 0.15}}
    path = _write(tmp_path, _stand_in(parameters))
    code, out, err = run_cli(["sweep", str(path), "--root", str(tmp_path), "--parallel", "2"])
    assert code == 0, err
    trials = _state(tmp_path)["trials"]
    assert sorted(t["params"]["x"] for t in trials) == [0.1, 0.3, 0.5, 0.7]
    assert [t["state"] for t in trials] == ["finished"] * 4
    ran = [_ran(tmp_path, i) for i in range(4)]
    assert ran[0]["start"] < ran[1]["end"] and ran[1]["start"] < ran[0]["end"]  # the first two overlapped
    assert {ran[0]["CUDA_VISIBLE_DEVICES"], ran[1]["CUDA_VISIBLE_DEVICES"]} == {"0", "1"}
    assert {r["CUDA_VISIBLE_DEVICES"] for r in ran} == {t["devices"] for t in trials} == {"0", "1"}
    assert "best: trial-001" in out


def test_parallel_trials_on_cpu_share_the_cores_and_too_many_is_a_clear_error(
    tmp_path, fast_polling, monkeypatch
):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU visible
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    path = _write(tmp_path, _stand_in({"x": {"values": [0.1, 0.3]}, "epochs": {"value": 2}}))
    code, _, err = run_cli(["sweep", str(path), "--root", str(tmp_path), "--parallel", str(cores + 1)])
    assert code == 2 and f"--parallel {cores + 1}" in err and f"{cores} CPU" in err
    assert not (tmp_path / "sweeps").exists()
    if cores < 2:
        pytest.skip("one CPU core: no two CPU trials at once")
    code, _, err = run_cli(["sweep", str(path), "--root", str(tmp_path), "--parallel", "2"])
    assert code == 0, err
    assert {_ran(tmp_path, i)["OMP_NUM_THREADS"] for i in range(2)} == {str(cores // 2)}
    assert {_ran(tmp_path, i)["CUDA_VISIBLE_DEVICES"] for i in range(2)} == {""}


def test_an_interrupted_parallel_sweep_resumes_every_running_trial(tmp_path, fast_polling, monkeypatch):
    """Ctrl-C while two trials run: both are stopped and recorded as pre-empted; the same command resumes
    them (the same points, not new ones), then starts the rest."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    parameters = {"x": {"values": [0.1, 0.3, 0.5]}, "epochs": {"value": 6}, "sleep": {"value": 0.1}}
    path = _write(tmp_path, _stand_in(parameters))
    original = sweep_module.LocalSweep.should_stop_early

    def ctrl_c_once_both_run(self, trial):
        if trial.index == 1:
            raise SweepInterrupted("SIGINT")
        return original(self, trial)

    monkeypatch.setattr(sweep_module.LocalSweep, "should_stop_early", ctrl_c_once_both_run)
    code, _, err = run_cli(["sweep", str(path), "--root", str(tmp_path), "--parallel", "2"])
    assert code == 130 and "--parallel 2" in err
    assert [t["state"] for t in _state(tmp_path)["trials"]] == ["preempted", "preempted"]
    monkeypatch.setattr(sweep_module.LocalSweep, "should_stop_early", original)
    code, _, err = run_cli(["sweep", str(path), "--root", str(tmp_path), "--parallel", "2"])
    assert code == 0, err
    trials = _state(tmp_path)["trials"]
    assert [t["state"] for t in trials] == ["finished"] * 3
    assert [t["params"]["x"] for t in trials] == [0.1, 0.3, 0.5]
    assert [_launches(tmp_path / "sweeps" / "stand_in" / f"trial-00{i}") for i in range(3)] == [2, 2, 1]


def test_a_changed_sweep_file_is_not_mixed_into_the_old_sweep(tmp_path, fast_polling):
    definition = _stand_in({"x": {"values": [0.1]}, "epochs": {"value": 1}})
    path = _write(tmp_path, definition)
    assert run_cli(["sweep", str(path), "--root", str(tmp_path)])[0] == 0
    changed = copy.deepcopy(definition)
    changed["parameters"]["x"]["values"] = [0.1, 0.2]
    _write(tmp_path, changed)
    code, _, err = run_cli(["sweep", str(path), "--root", str(tmp_path)])
    assert code == 2 and "different definition" in err and "--name" in err
    code, _, err = run_cli(["sweep", str(path), "--root", str(tmp_path), "--name", "stand_in_2"])
    assert code == 0, err


def test_one_sweep_process_per_sweep_directory(tmp_path):
    path = _write(tmp_path, _stand_in({"x": {"values": [0.1]}}))
    directory = tmp_path / "sweeps" / "stand_in"
    directory.mkdir(parents=True)
    with open(directory / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = run_cli(["sweep", str(path), "--root", str(tmp_path)])
    assert code == 2 and "being run by another process" in err


def test_dry_run_prints_every_trial_command_and_runs_nothing(tmp_path):
    path = _write(tmp_path, _stand_in({"x": {"values": [0.25, 0.5]}}))
    code, out, err = run_cli(["sweep", str(path), "--root", str(tmp_path), "--dry-run"])
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split() == [sys.executable, str(PROGRAM), "--x=0.25"]  # one command a line, as it runs
    assert lines[1].split() == [sys.executable, str(PROGRAM), "--x=0.5"]
    assert len(lines) == 3 and "2 trial commands" in lines[-1] and "nothing was run" in lines[-1]
    assert not (tmp_path / "sweeps").exists()


def test_dry_run_of_a_program_that_does_not_exist_fails(tmp_path):
    definition = _stand_in({"x": {"values": [0.25]}})
    definition["command"] = ["${interpreter}", "no_such_program.py", "${args}"]
    code, _, err = run_cli(["sweep", str(_write(tmp_path, definition)), "--dry-run"])
    assert code == 2 and "no_such_program.py" in err and len(err.strip().splitlines()) == 1


def test_dry_run_from_another_directory_fails_on_the_commands_relative_paths(tmp_path, monkeypatch):
    """The shipped files name their configs relative to the repository root: a dry run elsewhere parses the
    trial command as the trial would, and the parser's own error comes back as one line."""
    monkeypatch.chdir(tmp_path)
    sweep_file = CONFIGS / "sweeps" / "classifier_tiny.yaml"
    code, out, err = run_cli(["sweep", str(sweep_file), "--dry-run"])
    assert code == 2, out
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "trial-000" in err and "configs/trainer/cpu.yaml" in err and "does not exist" in err
    assert "repository root" in err and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("method", ["grid", "random"])
def test_dry_run_parses_every_value_a_trial_can_get(tmp_path, monkeypatch, method):
    """A value the CLI rejects fails the dry run, even when only a later trial would get it (every grid point,
    and every listed value of a random/bayes search, is parsed)."""
    monkeypatch.chdir(tmp_path)
    definition = yaml.safe_load((CONFIGS / "sweeps" / "classifier_tiny.yaml").read_text())
    definition["method"] = method
    definition["parameters"] = {
        "model.init_args.lr": {"value": 1.0e-3},
        "trainer.max_epochs": {"values": [1, 2, "many"]},
    }
    definition["command"] = [str(REPO / c) if c.startswith("configs/") else c for c in definition["command"]]
    code, out, err = run_cli(["sweep", str(_write(tmp_path, definition)), "--dry-run"])
    assert code == 2, out
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "trial-002" in err and "trainer.max_epochs" in err and "many" in err
    epochs = [
        arg for line in out.splitlines() for arg in line.split() if arg.startswith("--trainer.max_epochs")
    ]
    assert epochs == ["--trainer.max_epochs=1", "--trainer.max_epochs=2", "--trainer.max_epochs=many"]
    definition["parameters"]["trainer.max_epochs"]["values"] = [1, 2]
    code, out, err = run_cli(["sweep", str(_write(tmp_path, definition)), "--dry-run"])
    assert code == 0, err
    assert "2 trial commands parse with `forgelab fit`" in out.strip().splitlines()[-1]


# -- what `wandb agent` does to a run ---------------------------------------------------------------------------
def test_a_run_launched_by_wandb_agent_is_the_agents_run(small_toy_world, tmp_path, monkeypatch, request):
    """The agent's environment (sweep id, run id, parameter file) and its `--_wandb=` argument: W&B uses the
    agent's run id (over ours) and the CLI records that id, so run.json names the W&B run that exists."""
    params = tmp_path / "config-agentrun1.yaml"
    params.write_text("model.init_args.lr:\n  value: 0.003\n")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw33pid0")
    monkeypatch.setenv("WANDB_RUN_ID", "agentrun1")
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(params))
    wandb.teardown()  # a fresh W&B session reads the agent's environment (as the agent's fresh process does)
    request.addfinalizer(wandb.teardown)  # and the next test's session does not keep the sweep's settings
    args = ["fit", "--config", str(CPU), "--config", str(TINY), *tiny_overrides(TINY, small_toy_world)]
    args += [f"--run.root={tmp_path}", "--run.name=agent", "--run.test_after_fit=false"]
    args += ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    code, _, err = run_cli([*args, "--model.init_args.lr=0.003", "--_wandb=resume"])
    assert code == 0, err
    wandb.teardown()  # W&B's service writes the offline file asynchronously; shutting it down flushes it
    run = tmp_path / "inpaint_probe" / "agent"
    record = json.loads((run / "run.json").read_text())
    assert record["wandb_id"] == "agentrun1" and record["wandb_sweep_id"] == "sw33pid0"
    (offline,) = (run / "wandb").glob("offline-run-*-agentrun1")
    content = next(offline.glob("run-*.wandb")).read_bytes()
    assert b"sw33pid0" in content and b"model.init_args.lr" in content  # the sweep's own config key
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]["lr"] == 0.003


# -- the real thing: forgelab fit trials of the tiny classifier -------------------------------------------------
def _tiny_classifier_sweep(tmp_path: Path, toy: Path, lrs: list[float], *extra: str) -> Path:
    """classifier_tiny.yaml's command, on the small toy world, a grid over the learning rate."""
    definition = yaml.safe_load((CONFIGS / "sweeps" / "classifier_tiny.yaml").read_text())
    definition.pop("early_terminate")
    definition.pop("run_cap")
    definition["method"] = "grid"
    definition["parameters"] = {"model.init_args.lr": {"values": lrs}}
    definition["command"] = [
        *(str(REPO / c) if c.startswith("configs/") else c for c in definition["command"]),
        *tiny_overrides(TINY, toy),
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=4",
        *extra,
    ]
    return _write(tmp_path, definition, "classifier_tiny.yaml")


def test_real_fit_trials_land_in_the_sweep_compare_and_best_config(small_toy_world, tmp_path):
    """The fast variant (each real trial pays ~10 s of imports): one `forgelab fit` trial that trains and one
    whose value the model rejects; the sweep records both, compare and Table 3 read the real run files, and
    best_config.yaml re-runs the best trial (`_check_best_config`)."""
    path = _tiny_classifier_sweep(tmp_path, small_toy_world, [2.0e-3, -1.0])
    code, out, err = run_cli(["sweep", str(path), "--root", str(tmp_path)])
    assert code == 0, err
    sweep_out = out
    trials = _state(tmp_path, "classifier_tiny")["trials"]
    assert [t["state"] for t in trials] == ["finished", "failed"] and "lr must be positive" in trials[1][
        "error"
    ]
    assert trials[0]["metric"] is not None and "best: trial-000" in out
    trial = tmp_path / "sweeps" / "classifier_tiny" / "trial-000"
    record = json.loads((trial / "run.json").read_text())
    assert record["group"] == "classifier_tiny" and record["job_type"] == "sweep-trial"
    assert (trial / "test_metrics.json").is_file() and (trial / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "inpaint_probe").exists()  # every trial in the sweep's directory
    markdown = (tmp_path / "sweeps" / "classifier_tiny" / "compare" / "compare.md").read_text()
    assert "| trial-001 | failed | -1 |" in markdown and "| trial-000 | toy_gan |" in markdown
    table3 = CONFIGS / "inpaint_probe" / "tables" / "table3.yaml"
    code, out, err = run_cli(
        ["compare", str(tmp_path / "sweeps"), "--table", str(table3), "--out", str(tmp_path / "t")]
    )
    assert code == 0, err
    assert "| Models | Accuracy | F1-Score | AUC |" in out and "| ResNet-50 |" in out
    _check_best_config(tmp_path, sweep_out, best="trial-000", lr=2.0e-3)


def _check_best_config(tmp_path: Path, out: str, best: str, lr: float) -> None:
    """best_config.yaml is the best trial's resolved config.yaml (a new run: no name, no checkpoint, job type
    train), the sweep printed the command that re-runs it, `forgelab fit --config best_config.yaml` runs it,
    and `forgelab sweep --best <sweep dir>` writes it again."""
    sweep_dir = tmp_path / "sweeps" / "classifier_tiny"
    best_config = sweep_dir / "best_config.yaml"
    assert f"re-run it: forgelab fit --config {best_config}" in out
    written = yaml.safe_load(best_config.read_text())
    trial = yaml.safe_load((sweep_dir / best / "config.yaml").read_text())
    assert {k: v for k, v in written.items() if k != "run"} == {k: v for k, v in trial.items() if k != "run"}
    assert written["run"] == trial["run"] | {"name": None, "job_type": "train"}
    assert written["model"]["init_args"]["lr"] == lr
    best_config.unlink()
    code, _, err = run_cli(["sweep", "--best", str(sweep_dir)])
    assert code == 0, err
    assert yaml.safe_load(best_config.read_text()) == written
    rerun = tmp_path / "rerun"
    args = ["fit", "--config", str(best_config), f"--run.root={rerun}", "--trainer.max_epochs=1"]
    code, _, err = run_cli([*args, "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1"])
    assert code == 0, err
    (run_dir,) = (rerun / "inpaint_probe").iterdir()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"] == written["model"]
    assert json.loads((run_dir / "run.json").read_text())["outcome"] == "completed"


@pytest.mark.slow
def test_three_trial_sweep_of_the_tiny_classifier_end_to_end(small_toy_world, tmp_path):
    """Three real `forgelab fit` trials (one with a bad learning rate, which fails), in two invocations: the
    second continues the sweep without re-running anything; then `compare` and Table 3 from the sweep."""
    path = _tiny_classifier_sweep(tmp_path, small_toy_world, [2.0e-3, -1.0, 1.0e-3])
    code, _, err = run_cli(["sweep", str(path), "--root", str(tmp_path), "--count", "2"])
    assert code == 0, err
    assert [t["state"] for t in _state(tmp_path, "classifier_tiny")["trials"]] == ["finished", "failed"]
    code, out, err = run_cli(["sweep", str(path), "--root", str(tmp_path)])
    assert code == 0, err
    state = _state(tmp_path, "classifier_tiny")
    assert [t["state"] for t in state["trials"]] == ["finished", "failed", "finished"]
    assert "lr must be positive" in state["trials"][1]["error"]
    sweep_dir = tmp_path / "sweeps" / "classifier_tiny"
    for name in ("trial-000", "trial-002"):
        record = json.loads((sweep_dir / name / "run.json").read_text())
        assert record["group"] == "classifier_tiny" and record["job_type"] == "sweep-trial"
        assert len(record["invocations"]) == 1  # not re-run by the second invocation
        assert (sweep_dir / name / "test_metrics.json").is_file()
    assert not (tmp_path / "inpaint_probe").exists()  # every trial in the sweep's directory

    code, out, err = run_cli(["compare", str(sweep_dir)])
    assert code == 0, err
    markdown = (sweep_dir / "compare" / "compare.md").read_text()
    assert "| trial-001 | failed | -1 |" in markdown and "best val/loss" in markdown
    assert "| trial-000 | toy_gan |" in markdown  # the per-generator table
    assert (sweep_dir / "compare" / "plots" / "metric_vs_params.png").stat().st_size > 0
    assert (sweep_dir / "compare" / "plots" / "curves.png").stat().st_size > 0

    table3 = CONFIGS / "inpaint_probe" / "tables" / "table3.yaml"
    code, out, err = run_cli(
        ["compare", str(sweep_dir), "--table", str(table3), "--out", str(tmp_path / "t3")]
    )
    assert code == 0, err
    assert "| Models | Accuracy | F1-Score | AUC | runs |" in out and "| ResNet-50 |" in out
    assert "| 2 |" in (tmp_path / "t3" / "table3.md").read_text()  # both finished trials, averaged


@pytest.mark.slow
def test_two_real_fit_trials_at_once_on_cpu(small_toy_world, tmp_path, monkeypatch):
    """--parallel 2 with real `forgelab fit` trials of the tiny classifier on CPU: both run (each in its own
    run directory, with half the cores' threads), both are tested, and the sweep compares them."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPU cores")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    path = _tiny_classifier_sweep(tmp_path, small_toy_world, [2.0e-3, 1.0e-3], "--trainer.max_epochs=1")
    code, out, err = run_cli(["sweep", str(path), "--root", str(tmp_path), "--parallel", "2"])
    assert code == 0, err
    trials = _state(tmp_path, "classifier_tiny")["trials"]
    assert [t["state"] for t in trials] == ["finished", "finished"]
    assert trials[1]["started"] <= trials[0]["ended"]  # the second started before the first ended
    sweep_dir = tmp_path / "sweeps" / "classifier_tiny"
    for trial in ("trial-000", "trial-001"):
        assert (sweep_dir / trial / "test_metrics.json").is_file()
        assert json.loads((sweep_dir / trial / "run.json").read_text())["outcome"] == "completed"
    assert "| trial-000 |" in (sweep_dir / "compare" / "compare.md").read_text() and "re-run it:" in out


@pytest.mark.slow
def test_sweep_killed_mid_trial_resumes_from_the_trials_checkpoint(small_toy_world, tmp_path):
    """SIGKILL of the sweep process while a trial trains: the trial is told to stop (parent-death signal), and
    the same command resumes it from its last checkpoint in the same run directory."""
    path = _tiny_classifier_sweep(tmp_path, small_toy_world, [2.0e-3], "--trainer.max_epochs=4")
    command = [sys.executable, "-m", "common.experiment.cli", "sweep", str(path), "--root", str(tmp_path)]
    controller = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL)
    trial_dir = tmp_path / "sweeps" / "classifier_tiny" / "trial-000"
    deadline = time.monotonic() + 240
    while not (trial_dir / "checkpoints" / "last.ckpt").is_file():
        assert time.monotonic() < deadline and controller.poll() is None
        time.sleep(0.5)
    os.killpg(controller.pid, signal.SIGKILL)
    controller.wait()
    assert _state(tmp_path, "classifier_tiny")["trials"][0]["state"] == "running"
    code, _, err = run_cli(["sweep", str(path), "--root", str(tmp_path)])
    assert code == 0, err
    (trial,) = _state(tmp_path, "classifier_tiny")["trials"]
    assert trial["state"] == "finished" and trial["attempts"] == 2
    record = json.loads((trial_dir / "run.json").read_text())
    assert [i["resumed"] for i in record["invocations"]] == [False, True]
    assert any("--ckpt_path=" in a for a in record["invocations"][1]["argv"])
    assert (trial_dir / "test_metrics.json").is_file()


@pytest.mark.slow
def test_ddp_trials_share_one_run_directory_and_one_wandb_run(small_toy_world, tmp_path, monkeypatch):
    """A 2-process DDP trial (Lightning re-launches the same command for rank 1): one run directory, one
    offline W&B run in the sweep's group, nothing written elsewhere."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    ddp = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    path = _tiny_classifier_sweep(tmp_path, small_toy_world, [2.0e-3], "--trainer.max_epochs=1", *ddp)
    code, _, err = run_cli(["sweep", str(path), "--root", str(tmp_path)])
    assert code == 0, err
    sweep_dir = tmp_path / "sweeps" / "classifier_tiny"
    assert _state(tmp_path, "classifier_tiny")["trials"][0]["state"] == "finished"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["sweeps"]
    (offline_run,) = (sweep_dir / "trial-000" / "wandb").glob("offline-run-*")
    assert b"classifier_tiny" in next(offline_run.glob("run-*.wandb")).read_bytes()  # the group
    n_test = len(list((small_toy_world / "realfake" / "test").rglob("*.png")))
    metrics = json.loads((sweep_dir / "trial-000" / "test_metrics.json").read_text())
    assert metrics["pooled"]["n"] == n_test


# -- the sweep files agree with what they train and with the README --------------------------------------------
def _model_classes(path: Path) -> set[type]:
    """The LightningModule classes a sweep file's trials train: the class the real CLI resolves for the first
    suggestion's command (`_printed_first_trial`), and for a swept experiment config (`config: values:`) the
    class each listed config names."""
    definition = load_sweep_file(path)
    class_paths = {yaml.safe_load(_printed_first_trial(path)[1])["model"]["class_path"]}
    for config in (definition["parameters"].get("config") or {}).get("values") or []:
        class_paths.add(yaml.safe_load((REPO / config).read_text())["model"]["class_path"])
    classes = set()
    for class_path in class_paths:
        module, _, name = class_path.rpartition(".")
        classes.add(getattr(importlib.import_module(module), name))
    return classes


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_every_sweep_ranks_trials_on_the_checkpoint_monitor_of_the_model_it_trains(path):
    """The sweep's best trial is the one whose best checkpoint is best: the sweep metric (and goal) is the key
    (and mode) the trained model's checkpoints monitor. A model without a monitor keeps its last epoch (ITEM);
    its sweep may rank on any validation metric, never on a test one."""
    metric = load_sweep_file(path)["metric"]
    for model_class in _model_classes(path):
        if model_class.monitor is None:
            assert metric["name"].startswith("val/"), model_class
            continue
        assert metric["name"] == model_class.monitor, model_class
        goal = {"min": "minimize", "max": "maximize"}[model_class.monitor_mode]
        assert metric["goal"] == goal, model_class


def test_the_readme_lists_every_sweep_file():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Sweeps and comparing runs") :]
    section = section[: section.index("\n## ", 1)]
    table = [line for line in section.splitlines() if line.startswith("| `")]
    listed = {line.split("`")[1] for line in table}
    assert listed == {p.name for p in SWEEP_FILES}
