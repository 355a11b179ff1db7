"""Runs made by `wandb agent` (a W&B server's sweep): real tiny `forgelab fit` runs in the environment the agent
gives them (WANDB_SWEEP_ID, WANDB_RUN_ID), then `forgelab compare --sweep/--group` on their run directories and
`forgelab sweep --best` on a stand-in for W&B's API (the real one needs a server)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.cli_helpers import CONFIGS, run_cli, tiny_overrides
from tests.conftest import REPO

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


# -- the best run of a server sweep -----------------------------------------------------------------------------
class FakeApi:
    """`wandb.Api()` as far as `forgelab sweep --best` uses it: `.sweep(path)` with `.config` (the sweep's
    definition) and `.best_run()` (a run with id, name, config, summary)."""

    def __init__(self, definition: dict, best: SimpleNamespace | None, error: Exception | None = None):
        self.definition, self.best, self.error, self.asked = definition, best, error, []

    def sweep(self, path: str) -> SimpleNamespace:
        self.asked.append(path)
        if self.error is not None:
            raise self.error
        return SimpleNamespace(id=path.rsplit("/", 1)[-1], config=self.definition, best_run=lambda: self.best)


def _server_sweep() -> dict:
    """classifier_tiny.yaml as the server holds it, with absolute config paths (the test runs elsewhere)."""
    definition = yaml.safe_load((CONFIGS / "sweeps" / "classifier_tiny.yaml").read_text())
    definition["command"] = [str(REPO / c) if c.startswith("configs/") else c for c in definition["command"]]
    return definition


def _use_api(monkeypatch: pytest.MonkeyPatch, api: FakeApi) -> None:
    import wandb

    monkeypatch.setattr(wandb, "Api", lambda *args, **kwargs: api)


def _rerun(config: Path, root: Path) -> dict:
    """`forgelab fit --config <config>` for one training step; the new run's config.yaml."""
    code, _, err = run_cli(
        [
            "fit",
            "--config",
            str(config),
            f"--run.root={root}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=1",
            "--trainer.limit_val_batches=1",
            "--run.test_after_fit=false",
        ]
    )
    assert code == 0, err
    (run_dir,) = (root / "inpaint_probe").iterdir()
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def test_best_of_a_server_sweep_is_the_best_runs_own_config(agent_runs, tmp_path, monkeypatch):
    """The agent ran the best run here: best_config.yaml is its run directory's config.yaml (found by the W&B
    run id run.json records), as a new run (the sweep's best_config.yaml re-runs: test_sweep.py)."""
    best = SimpleNamespace(
        id="wbrunA2", name="a2", config={"model.init_args.lr": 1.0e-3}, summary={"val/loss": 0.7}
    )
    api = FakeApi(_server_sweep(), best)
    _use_api(monkeypatch, api)
    out_file = tmp_path / "best.yaml"
    code, out, err = run_cli(
        [
            "sweep",
            "--best",
            "ent/inpaint_probe/swA",
            "--root",
            str(agent_runs / "runs"),
            "--out",
            str(out_file),
        ]
    )
    assert code == 0, err
    assert api.asked == ["ent/inpaint_probe/swA"]
    assert "a2" in out and "val/loss 0.7" in out
    assert f"forgelab fit --config {out_file}" in out.strip().splitlines()[-1]
    own = yaml.safe_load((agent_runs / "runs" / "inpaint_probe" / "a2" / "config.yaml").read_text())
    written = yaml.safe_load(out_file.read_text())
    assert written == own | {"run": own["run"] | {"name": None, "job_type": "train"}}
    assert str(agent_runs / "runs" / "inpaint_probe" / "a2") in out_file.read_text().splitlines()[0]


def test_best_of_a_server_sweep_run_elsewhere_is_resolved_from_its_command(
    tmp_path, monkeypatch, small_toy_world
):
    """The best run's directory is on another machine: the sweep's command with the run's swept values,
    resolved by the CLI's parser, is the config (in W&B's run config the values may still be wrapped)."""
    run_config = {
        "model.init_args.lr": {"value": 4.2e-3},
        "model.init_args.backbone": "vgg16.tv_in1k",
        "model.init_args.weight_decay": 1.0e-5,
        "trainer.max_epochs": 1,
        "model.lr": 4.2e-3,
    }
    best = SimpleNamespace(id="far", name="far-run", config=run_config, summary={})
    _use_api(monkeypatch, FakeApi(_server_sweep(), best))
    code, out, err = run_cli(["sweep", "--best", "ent/inpaint_probe/swZ", "--root", str(tmp_path / "runs")])
    assert code == 0, err
    out_file = tmp_path / "runs" / "sweeps" / "swZ" / "best_config.yaml"
    assert "far-run" in out and f"forgelab fit --config {out_file}" in out.strip().splitlines()[-1]
    written = yaml.safe_load(out_file.read_text())
    assert written["model"]["class_path"] == "projects.inpaint_probe.classifier.RealFakeClassifier"
    assert (
        written["model"]["init_args"]["lr"] == 4.2e-3
        and written["model"]["init_args"]["backbone"] == "vgg16.tv_in1k"
    )
    assert written["trainer"]["max_epochs"] == 1 and written["run"]["job_type"] == "train"
    assert "resolved from the sweep's command" in out_file.read_text().splitlines()[0]
    # point it at the small toy world (the shipped config reads data/toy_world) and run it
    small = written | {
        "data": written["data"]
        | {
            "init_args": written["data"]["init_args"]
            | {
                "toy_world": None,
                **{f"{s}_root": str(small_toy_world / "realfake" / s) for s in ("train", "val", "test")},
                "image_size": 32,
                "batch_size": 4,
                "num_workers": 0,
            }
        }
    }
    out_file.write_text(yaml.safe_dump(small))
    assert _rerun(out_file, tmp_path / "rerun")["model"]["init_args"]["lr"] == 4.2e-3


@pytest.mark.parametrize(
    ("api", "message"),
    [
        (
            FakeApi({}, None, error=ValueError("Could not find sweep")),
            "cannot read W&B sweep e/p/nope: Could not find sweep",
        ),
        (FakeApi(_server_sweep(), None), "sweep e/p/nope has no runs yet"),
    ],
)
def test_best_of_a_server_sweep_errors_are_one_line(monkeypatch, tmp_path, api, message):
    _use_api(monkeypatch, api)
    code, _, err = run_cli(["sweep", "--best", "e/p/nope", "--root", str(tmp_path)])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
