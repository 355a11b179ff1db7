"""The SLURM path: configs/trainer/slurm.yaml, scripts/slurm/train.sbatch, and what Lightning does with them.

No SLURM here: a job's environment variables are set by hand, GPUs are replaced by CPU processes, and `scontrol`
by a script that records its arguments.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from common.experiment.env import RUN_DIR_ENV
from tests.cli_helpers import run_cli
from tests.conftest import REPO

PRESET = REPO / "configs" / "trainer" / "slurm.yaml"
DDP_SIM = REPO / "configs" / "trainer" / "ddp_sim.yaml"
TINY = REPO / "configs" / "inpaint_probe" / "tiny.yaml"
SBATCH = REPO / "scripts" / "slurm" / "train.sbatch"
JOB_ID = "4242"

# variables that would make Lightning pick another cluster environment, or that a job's ranks set for each other
FOREIGN = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")
FOREIGN += ("NODE_RANK", "TORCHELASTIC_RUN_ID", RUN_DIR_ENV)


def slurm_job(nodes: int, tasks_per_node: int, rank: int, job_name: str = "forgelab") -> dict[str, str]:
    """The variables srun gives task `rank` of a job of `nodes` x `tasks_per_node` tasks on gpu[07-..]."""
    return {
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_JOB_NAME": job_name,
        "SLURM_NNODES": str(nodes),
        "SLURM_NTASKS": str(nodes * tasks_per_node),
        "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
        "SLURM_NODELIST": "gpu07" if nodes == 1 else f"gpu[07-{6 + nodes:02d}]",
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank % tasks_per_node),
        "SLURM_NODEID": str(rank // tasks_per_node),
    }


@pytest.fixture
def job_env(monkeypatch):
    """Sets a job's variables for the test (and clears those a previous run or another launcher left)."""

    def set_job(variables: dict[str, str]) -> None:
        # ForgelabCLI sets the run directory in os.environ for its DDP children: through monkeypatch, so that it
        # is gone after the test, not restored to a value from inside it
        monkeypatch.setenv(RUN_DIR_ENV, "")  # records "unset" (a delenv of an unset variable records nothing)
        monkeypatch.delenv(RUN_DIR_ENV)
        for name in FOREIGN:
            monkeypatch.delenv(name, raising=False)  # also restores what Lightning sets (MASTER_ADDR ...)
        for name in [n for n in os.environ if n.startswith("SLURM_")]:
            monkeypatch.delenv(name)
        for name, value in variables.items():
            monkeypatch.setenv(name, value)

    return set_job


def slurm_cli(tmp_path: Path, *overrides: str):
    """ForgelabCLI on the SLURM preset and the tiny classifier, on CPU, with every class instantiated (trainer
    included) but nothing run; data roots that do not exist are fine until setup."""
    from common.experiment.trainer_cli import ForgelabCLI

    missing = tmp_path / "no-data"
    args = [
        "--config", str(PRESET), "--config", str(TINY),
        "--trainer.accelerator=cpu", "--trainer.precision=32-true",
        f"--run.root={tmp_path / 'runs'}", "--run.wandb=false",
        "--data.init_args.toy_world=null", "--data.init_args.num_workers=0",
        f"--data.init_args.train_root={missing}", f"--data.init_args.val_root={missing}",
        f"--data.init_args.test_root={missing}",
        *overrides,
    ]  # fmt: skip
    return ForgelabCLI(args=args, run=False)


def sbatch_options() -> dict[str, str]:
    options = {}
    for line in SBATCH.read_text().splitlines():
        match = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?\s*$", line)
        if match:
            options[match[1]] = match[2] or ""
    return options


# -- the preset ------------------------------------------------------------------------------------------------
def test_slurm_preset_parses_with_a_project_config():
    code, out, err = run_cli(["fit", "--config", str(PRESET), "--config", str(TINY), "--print_config"])
    assert code == 0, err
    trainer = yaml.safe_load(out)["trainer"]
    assert (trainer["accelerator"], trainer["strategy"]) == ("gpu", "ddp")
    (plugin,) = trainer["plugins"]
    assert plugin["class_path"] == "lightning.fabric.plugins.environments.SLURMEnvironment"
    assert plugin["init_args"] == {"auto_requeue": True, "requeue_signal": "SIGUSR1"}
    # the preset's job shape is the template's
    options = sbatch_options()
    assert trainer["devices"] == int(options["ntasks-per-node"]) == int(options["gres"].rsplit(":", 1)[1])
    assert trainer["num_nodes"] == int(options["nodes"])


@pytest.mark.parametrize("rank", [0, 1])
def test_trainer_from_the_preset_takes_ranks_and_main_node_from_a_two_task_job(rank, job_env, tmp_path):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    job_env(slurm_job(nodes=2, tasks_per_node=1, rank=rank))
    cli = slurm_cli(tmp_path, "--trainer.devices=1", "--trainer.num_nodes=2")
    trainer = cli.trainer
    environment = trainer.strategy.cluster_environment
    assert type(environment) is SLURMEnvironment  # the preset's instance, not one Lightning detected
    assert environment.auto_requeue and environment.requeue_signal is signal.SIGUSR1
    assert type(trainer.strategy).__name__ == "DDPStrategy"
    # Lightning's launcher starts no processes of its own: srun started one per task
    assert trainer.strategy.launcher.cluster_environment is environment
    assert environment.creates_processes_externally
    ranks = (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank)
    assert ranks == (2, rank, 0, rank)
    assert trainer.is_global_zero == (rank == 0)
    assert environment.main_address == "gpu07"  # first node of gpu[07-08]
    # every rank derives the same port from the job id
    assert environment.main_port == 15000 + int(JOB_ID[-4:])
    # every rank (and the requeued job) names the run after the job; only rank 0 writes it
    assert cli.run_dir.name == f"RealFakeClassifier-{JOB_ID}"
    assert (cli.run_dir / "run.json").is_file() == (rank == 0)


def test_a_requeued_job_finds_the_same_run_directory(job_env, tmp_path, monkeypatch):
    job_env(slurm_job(nodes=1, tasks_per_node=1, rank=0))
    first = slurm_cli(tmp_path, "--trainer.devices=1", "--trainer.num_nodes=1").run_dir
    monkeypatch.delenv(RUN_DIR_ENV)  # a new job, not a DDP child of the first
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    again = slurm_cli(tmp_path, "--trainer.devices=1", "--trainer.num_nodes=1").run_dir
    assert again == first and first.name.endswith(f"-{JOB_ID}")


def test_preset_that_does_not_match_the_job_shape_stops_with_lightnings_hint(job_env, tmp_path):
    """Lightning checks devices and num_nodes against the job when `fit` starts, before any process group."""
    job_env(slurm_job(nodes=1, tasks_per_node=2, rank=0))  # the preset says 4 tasks per node on 2 nodes
    args = ["fit", "--config", str(PRESET), "--config", str(TINY), "--trainer.accelerator=cpu",
            f"--run.root={tmp_path / 'runs'}", "--run.wandb=false", "--data.init_args.toy_world=null",
            f"--data.init_args.train_root={tmp_path}", f"--data.init_args.val_root={tmp_path}"]  # fmt: skip
    with pytest.raises(ValueError, match=r"--ntasks-per-node=2.*HINT: Set `devices=2`"):
        run_cli(args)
    assert list((tmp_path / "runs").glob("*/*")) == []  # a failed start leaves no run directory behind


# -- what Lightning does on the requeue signal ---------------------------------------------------------------
class _SignalsAt:
    """Sends this process SIGUSR1 after step `usr1` (what SLURM sends before the time limit) and SIGTERM after
    step `term` (what `scontrol requeue` sends the running job)."""

    def __init__(self, usr1: int, term: int) -> None:
        import lightning as L

        class Callback(L.Callback):
            def on_train_batch_end(self_, trainer, *args) -> None:
                if trainer.global_step == usr1:
                    os.kill(os.getpid(), signal.SIGUSR1)
                if trainer.global_step == term:
                    os.kill(os.getpid(), signal.SIGTERM)

        self.callback = Callback()


class _StartStep:
    def __init__(self) -> None:
        import lightning as L

        steps: list[int] = []

        class Callback(L.Callback):
            def on_train_start(self_, trainer, pl_module) -> None:
                steps.append(trainer.global_step)

        self.steps = steps
        self.callback = Callback()


def _trainer(root: Path, environment, *callbacks, max_steps: int = 12):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, every_n_train_steps=4)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        plugins=[environment],
        callbacks=[checkpoint, *callbacks],
        default_root_dir=str(root),
        max_steps=max_steps,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_requeue_signal_saves_an_hpc_checkpoint_requeues_and_last_resumes_from_last_ckpt(
    job_env, tmp_path, monkeypatch
):
    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    job_env(slurm_job(nodes=1, tasks_per_node=1, rank=0))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    # the plugin as the preset builds it
    cli = slurm_cli(tmp_path, "--trainer.devices=1", "--trainer.num_nodes=1")
    environment = cli.trainer.strategy.cluster_environment
    root = tmp_path / "run"

    handlers = (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM))
    trainer = _trainer(root, environment, _SignalsAt(usr1=5, term=6).callback)
    with pytest.raises(SIGTERMException):
        trainer.fit(BoringModel())
    assert trainer.interrupted
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == handlers  # restored

    # SIGUSR1: a checkpoint of step 5 in the run directory, then `scontrol requeue <job id>` from rank 0
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", JOB_ID]
    hpc = root / "hpc_ckpt_1.ckpt"
    assert torch.load(hpc, weights_only=False)["global_step"] == 5
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4

    # the requeued job, with the template's --ckpt_path last: ModelCheckpoint's last.ckpt, not the newer hpc one
    start = _StartStep()
    _trainer(root, environment, start.callback).fit(BoringModel(), ckpt_path="last")
    assert start.steps == [4]
    # without --ckpt_path Lightning itself picks the newest hpc checkpoint under SLURM
    start = _StartStep()
    _trainer(root, environment, start.callback, max_steps=14).fit(BoringModel())
    assert start.steps == [5]


# -- the ddp_sim preset (2 CPU processes) where SLURM's variables are set ---------------------------------------
SPAWN_SCRIPT = textwrap.dedent(
    """
    import sys
    import yaml
    import lightning as L
    from lightning.pytorch.cli import instantiate_class
    from lightning.pytorch.demos.boring_classes import BoringModel

    class Report(BoringModel):
        def on_fit_start(self):
            env = type(self.trainer.strategy.cluster_environment).__name__
            print(f"rank {self.trainer.global_rank}/{self.trainer.world_size} {env}", flush=True)

    if __name__ == "__main__":
        config = yaml.safe_load(open(sys.argv[1]))["trainer"]
        if sys.argv[3] == "without-plugins":
            config.pop("plugins")
        config["plugins"] = [instantiate_class((), spec) for spec in config.get("plugins", [])]
        trainer = L.Trainer(**config, max_steps=2, limit_val_batches=0, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, default_root_dir=sys.argv[2])
        trainer.fit(Report())
        print("fit done", flush=True)
    """
)


def _run_ddp_sim(tmp_path: Path, variables: dict[str, str], plugins: bool) -> subprocess.CompletedProcess:
    """Fit a BoringModel in a fresh process with the ddp_sim preset's trainer settings (with or without its
    `plugins`) and the given environment."""
    script = tmp_path / "spawn.py"
    script.write_text(SPAWN_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in FOREIGN}
    env |= variables | {"PYTHONPATH": str(REPO)}
    mode = "with-plugins" if plugins else "without-plugins"
    return subprocess.run(
        [sys.executable, str(script), str(DDP_SIM), str(tmp_path / "root"), mode],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip


@pytest.mark.slow
def test_lightning_alone_runs_ddp_spawn_in_a_slurm_job_as_two_rank_zeros(tmp_path):
    """Why ddp_sim names its cluster environment: started by hand inside a job (a batch script without srun),
    Lightning sees SLURM_NTASKS, uses SLURMEnvironment, whose ranks are SLURM's (task 0) whatever process
    ddp_spawn started, and the two processes fail to meet as two rank 0s on the job's port."""
    out = _run_ddp_sim(tmp_path, slurm_job(nodes=1, tasks_per_node=2, rank=0), plugins=False)
    assert out.returncode != 0
    assert out.stderr.count("GLOBAL_RANK: 0, MEMBER: 1/2") == 2, out.stderr[-3000:]
    assert "EADDRINUSE" in out.stderr or "address already in use" in out.stderr
    assert "fit done" not in out.stdout


@pytest.mark.slow
def test_lightning_alone_ignores_slurm_in_a_job_named_interactive(tmp_path):
    """Lightning's own escape hatch: a job named `interactive` or `bash` (what `srun --pty bash` gives) is not
    treated as a SLURM launch."""
    variables = slurm_job(nodes=1, tasks_per_node=2, rank=0, job_name="interactive")
    out = _run_ddp_sim(tmp_path, variables, plugins=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rank 0/2 LightningEnvironment" in out.stdout and "rank 1/2 LightningEnvironment" in out.stdout


@pytest.mark.slow
def test_ddp_sim_preset_takes_its_own_ranks_inside_a_slurm_job(tmp_path):
    out = _run_ddp_sim(tmp_path, slurm_job(nodes=1, tasks_per_node=2, rank=0), plugins=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rank 0/2 LightningEnvironment" in out.stdout and "rank 1/2 LightningEnvironment" in out.stdout
    assert "fit done" in out.stdout


# -- the sbatch template -----------------------------------------------------------------------------------------
@pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")
def test_sbatch_template_is_valid_bash():
    out = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


def test_sbatch_template_requeues_on_sigusr1_and_resumes_from_last():
    text = SBATCH.read_text()
    options = sbatch_options()
    assert options["signal"] == "SIGUSR1@90"  # to the job step's tasks, where Lightning listens (no `B:`)
    assert "requeue" in options and options["open-mode"] == "append"
    assert re.fullmatch(r"gpu:\d+", options["gres"]) and options["nodes"].isdigit()
    # every #SBATCH line comes before the first command (sbatch stops reading them there)
    lines = [line for line in text.splitlines() if line.strip()]
    first_command = next(i for i, line in enumerate(lines[1:], 1) if not line.startswith("#"))
    assert all(not line.startswith("#SBATCH") for line in lines[first_command:])
    command = " ".join(text.split("srun forgelab fit", 1)[1].split("\\\n"))
    assert "--config configs/trainer/slurm.yaml" in command and '--config "$CONFIG"' in command
    assert "--ckpt_path last" in command
    assert "--trainer.devices" in command and "SLURM_NTASKS_PER_NODE" in command
    assert '--trainer.num_nodes "${SLURM_NNODES}"' in command
    # the requeue signal the template asks for is the one the preset tells Lightning to handle
    plugin = yaml.safe_load(PRESET.read_text())["trainer"]["plugins"][0]
    assert options["signal"].split("@")[0] == plugin["init_args"]["requeue_signal"]
