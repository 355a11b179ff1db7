"""Runs made by `wandb agent` (a W&B server's sweep): real tiny `forgelab fit` runs in the environment the agent
gives them (WANDB_SWEEP_ID, WANDB_RUN_ID), then `forgelab compare --sweep/--group` on their run directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli_helpers import CONFIGS, run_cli, tiny_overrides

TINY = CONFIGS / "inpaint_probe" / "tiny.yaml"
CPU = CONFIGS / "trainer" / "cpu.yaml"

# name -> (WANDB_SWEEP_ID, WANDB_RUN_ID, learning rate, extra arguments)
AGENT_RUNS = {
    "a1": ("swA", "wbrunA1", 2.0e-3, []),
    "a2": ("swA", "wbrunA2", 1.0e-3, []),
    "b1": ("swB", "wbrunB1", 1.0e-3, ["--run.group=other"]),
}


def _fit_args(toy: Path, root: Path, *extra: str) -> list[str]:
    args = ["fit", "--config", str(CPU), "--config", str(TINY), *tiny_overrides(TINY, toy)]
    args += [f"--run.root={root}", "--run.test_after_fit=false", "--run.wandb=false"]
    return [*args, "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", *extra]


@pytest.fixture(scope="module")
def agent_runs(small_toy_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding `runs/inpaint_probe/{a1,a2,b1}`: three 1-epoch runs of the tiny classifier, as the agent
    launches them (two of sweep swA, one of sweep swB in another group)."""
    base = tmp_path_factory.mktemp("agent")
    for name, (sweep_id, run_id, lr, extra) in AGENT_RUNS.items():
        with pytest.MonkeyPatch.context() as env:
            env.setenv("WANDB_SWEEP_ID", sweep_id)
            env.setenv("WANDB_RUN_ID", run_id)
            args = _fit_args(small_toy_world, base / "runs", f"--run.name={name}", "--trainer.max_epochs=1")
            code, _, err = run_cli([*args, f"--model.init_args.lr={lr}", *extra])
        assert code == 0, err
        assert json.loads((base / "runs" / "inpaint_probe" / name / "run.json").read_text())["wandb_sweep_id"]
    return base


def _rows(markdown: str) -> list[str]:
    """The run names of the first table of a comparison."""
    table = markdown[markdown.index("| run |") :].split("\n\n")[0].splitlines()[2:]
    return sorted(line.split("|")[1].strip() for line in table)


def test_compare_selects_an_agents_runs_by_sweep_id(agent_runs, monkeypatch):
    monkeypatch.chdir(agent_runs)  # no paths: the runs below ./runs
    code, out, err = run_cli(["compare", "--sweep", "swA"])
    assert code == 0, err
    assert _rows(out) == ["a1", "a2"]
    markdown = (agent_runs / "runs" / "compare" / "sweep-swA" / "compare.md").read_text()
    assert "model.lr" in markdown.splitlines()[2]  # the swept value differs between the two: a column
    code, out, err = run_cli(["compare", "runs/inpaint_probe", "--sweep", "entity/inpaint_probe/swB"])
    assert code == 0, err
    assert _rows(out) == ["b1"]  # a W&B sweep path names the same sweep
    code, _, err = run_cli(["compare", "--sweep", "nope"])
    assert code == 2 and "no runs of sweep 'nope'" in err and "swA, swB" in err


def test_compare_selects_runs_by_group_with_no_paths(agent_runs, monkeypatch):
    monkeypatch.chdir(agent_runs)
    code, out, err = run_cli(["compare", "--group", "other"])
    assert code == 0, err
    assert _rows(out) == ["b1"]
    code, out, err = run_cli(["compare", "--group", "tiny", "--sweep", "swA", "--out", "o"])
    assert code == 0, err
    assert _rows(out) == ["a1", "a2"] and (agent_runs / "o" / "compare.md").is_file()
