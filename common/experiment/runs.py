"""Run directories, loggers and the run's record of itself.

Every run owns `runs/<project>/<name>/`:
    config.yaml        the full resolved config (re-runnable with `forgelab fit --config config.yaml`)
    run.json           name, project, group, W&B id, seed, command lines, git commit, outcome of each invocation
    metrics.csv        everything logged (CSVLogger)
    checkpoints/       last.ckpt and the best checkpoint by the model's validation monitor
    wandb/             the W&B run files (offline runs sync later with `wandb sync`)
    data_health.json   files skipped and why
Resuming with `--ckpt_path runs/<project>/<name>/checkpoints/last.ckpt` continues in the same directory and the
same W&B run.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import logging
import netrc
import os
import re
import secrets
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.logger import _add_prefix  # what WandbLogger.log_metrics itself uses
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from common.errors import ConfigError
from common.experiment.configs import wandb_config
from common.experiment.env import RUN_DIR_ENV
from common.experiment.wandb_files import last_step
from common.io import atomic_open, write_json, write_text

log = logging.getLogger("forgelab")


@dataclass
class RunSettings:
    """Where a run is written and how it is grouped on W&B dashboards.

    Args:
        project: project folder and W&B project (e.g. inpaint_probe, item_detector, fg_guidance).
        name: run name; default `<model>-<YYYYmmdd-HHMMSS>-<4 hex>`.
        group: W&B group, e.g. the experiment or sweep this run belongs to.
        job_type: W&B job type (train, eval, sweep-trial ...).
        tags: W&B tags: method, backbone, data.
        notes: free text shown on the W&B run page.
        root: parent folder of all projects' runs.
        wandb: log to W&B (offline unless WANDB_MODE=online or the user is logged in).
        test_after_fit: after `fit`, test the best validation checkpoint when test data is configured.
    """

    project: str = "forgelab"
    name: str | None = None
    group: str | None = None
    job_type: str = "train"
    tags: list[str] = field(default_factory=list)
    notes: str | None = None
    root: str = "runs"
    wandb: bool = True
    test_after_fit: bool = True


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


def default_run_name(model_class_path: str | None) -> str:
    """`<model>-<timestamp>-<random>`; a scheduler's job id replaces the random part so that every rank launched
    by torchrun or srun derives the same name without talking to the others."""
    model = _slug((model_class_path or "run").rsplit(".", 1)[-1])
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    launch = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
    if launch and launch != "none":
        return f"{model}-{_slug(launch)}"
    return f"{model}-{stamp}-{secrets.token_hex(2)}"


def run_dir_from_checkpoint(ckpt_path: str | None) -> Path | None:
    """`runs/<project>/<name>/checkpoints/x.ckpt` -> `runs/<project>/<name>` (resume continues in place)."""
    if not ckpt_path or ckpt_path in ("best", "last", "hpc", "registry"):
        return None
    path = Path(ckpt_path).resolve()
    if path.parent.name == "checkpoints" and (path.parent.parent / "run.json").is_file():
        return path.parent.parent
    return None


def resolve_run_dir(
    settings: RunSettings, model_class_path: str | None, ckpt_path: str | None
) -> tuple[Path, bool]:
    """Return (run_dir, resumed). Order: a DDP parent's choice, the checkpoint's run, then a new directory."""
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited:
        return Path(inherited), (Path(inherited) / "run.json").is_file()
    resumed = run_dir_from_checkpoint(ckpt_path)
    if resumed is not None:
        return resumed, True
    base = Path(settings.root) / _slug(settings.project)
    name = _slug(settings.name) if settings.name else default_run_name(model_class_path)
    run_dir = base / name
    if settings.name and run_dir.exists() and (run_dir / "run.json").exists():
        suffix = 1
        while (base / f"{name}-{suffix}").exists():
            suffix += 1
        run_dir = base / f"{name}-{suffix}"
    return run_dir, False


CHECKPOINT_KEYWORDS = ("last", "best", "hpc", "registry")


@dataclass
class RunLocation:
    """Where a trainer command writes, and the checkpoint Lightning is given.

    Attributes:
        run_dir: the run directory.
        resumed: whether it continues an existing run (same directory, same W&B id).
        ckpt_path: what Lightning's `ckpt_path` becomes (a run name resolved to its checkpoint).
        source: the checkpoint an evaluation (validate/test/predict) reads, recorded in its run.json.
    """

    run_dir: Path
    resumed: bool
    ckpt_path: str | None
    source: str | None = None


def launch_rank() -> int:
    """This process's global rank as its launcher (torchrun, srun, a DDP parent) set it; 0 when launched alone.
    Read before Lightning's trainer exists, which is when run directories are chosen."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def find_run_by_wandb_id(base: Path, wandb_id: str) -> Path | None:
    """The run directory under `base` whose run.json records W&B id `wandb_id` (newest if several)."""
    found = [
        p.parent for p in base.glob("*/run.json") if read_run_record(p.parent).get("wandb_id") == wandb_id
    ]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _named_run(base: Path, name: str) -> Path | None:
    """A run given by name (`runs/<project>/<name>`) or by its directory path."""
    for candidate in (base / name, Path(name)):
        if (candidate / "run.json").is_file():
            return candidate
    return None


def _run_checkpoint(run: Path, prefer_best: bool) -> Path:
    checkpoints = run / "checkpoints"
    best = sorted(checkpoints.glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
    if prefer_best and best:
        return best[-1]
    if (checkpoints / "last.ckpt").is_file():
        return checkpoints / "last.ckpt"
    raise ConfigError(f"run {run} has no checkpoints/last.ckpt to {'test' if prefer_best else 'resume'}")


def _new_run_dir(base: Path, name: str | None, model_class_path: str | None) -> Path:
    """A new run directory; an explicit name that already holds a run is refused, never silently renamed."""
    if name is None:
        return base / default_run_name(model_class_path)
    run_dir = base / _slug(name)
    # under srun/torchrun every rank resolves the directory itself: the others join the one rank 0 created
    if (run_dir / "run.json").is_file() and launch_rank() == 0:
        outcome = read_run_record(run_dir).get("outcome", "unknown")
        raise ConfigError(
            f"run.name={name}: {run_dir} exists (outcome: {outcome}); resume it with --ckpt_path last, "
            "or choose another --run.name"
        )
    return run_dir


def locate_trainer_run(
    settings: RunSettings, model_class_path: str | None, ckpt_path: str | None, subcommand: str
) -> RunLocation:
    """The run directory of `forgelab fit|validate|test|predict` and the checkpoint it loads.

    fit resumes a run in place when `ckpt_path` is one of its checkpoints, the name of a run (`runs/<project>/`
    or a path: its `last.ckpt`), or Lightning's `last`/`hpc` together with an existing `run.name` (or the
    scheduler-derived default name); without `ckpt_path` a `WANDB_RUN_ID` (set by `wandb agent` when it
    re-runs a pre-empted run) resumes the run that recorded it from its `last.ckpt`. validate/test/predict
    always write a new run (`<source run>-<command>-<time>`) recording the checkpoint it evaluates, so nothing
    the training run wrote is replaced. (Lightning's own `version_N` directories cannot be found by run name or
    W&B id, which is what resuming needs; "last"/"hpc" themselves are resolved by Lightning.)
    """
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited:  # a DDP parent (or a sweep) chose the directory
        return RunLocation(Path(inherited), (Path(inherited) / "run.json").is_file(), ckpt_path)
    base = Path(settings.root) / _slug(settings.project)
    keyword = ckpt_path in CHECKPOINT_KEYWORDS
    if subcommand != "fit":
        source_run = run_dir_from_checkpoint(ckpt_path)
        if ckpt_path and not keyword and not Path(ckpt_path).is_file():
            named = _named_run(base, ckpt_path)
            if named is None:
                raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file, nor a run under {base}")
            source_run, ckpt_path = named, str(_run_checkpoint(named, prefer_best=True))
        name = settings.name
        if name is None and source_run is not None:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            name = f"{source_run.name}-{subcommand}-{stamp}-{secrets.token_hex(2)}"
        source = str(Path(ckpt_path).resolve()) if ckpt_path and not keyword else ckpt_path
        return RunLocation(_new_run_dir(base, name, model_class_path), False, ckpt_path, source)
    if ckpt_path and not keyword:
        if Path(ckpt_path).is_file():
            resumed = run_dir_from_checkpoint(ckpt_path)
            if resumed is not None:
                return RunLocation(resumed, True, ckpt_path)
            # weights from outside any run (e.g. a downloaded checkpoint): a new run starts from them
            return RunLocation(_new_run_dir(base, settings.name, model_class_path), False, ckpt_path)
        named = _named_run(base, ckpt_path)
        if named is None:
            raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file, nor a run under {base}")
        return RunLocation(named, True, str(_run_checkpoint(named, prefer_best=False)))
    agent_id = os.environ.get("WANDB_RUN_ID")
    if ckpt_path is None and agent_id and settings.name is None:
        previous = find_run_by_wandb_id(base, agent_id)
        if previous is not None:
            log.info("W&B run id %s: resuming %s from its last checkpoint", agent_id, previous)
            return RunLocation(previous, True, "last")
    if keyword:  # Lightning's own keywords: "last" and "hpc" look in this run's checkpoint directory
        run_dir = base / _slug(settings.name or default_run_name(model_class_path))
        if (run_dir / "run.json").is_file():
            return RunLocation(run_dir, True, _newest_of_last_and_hpc(run_dir, ckpt_path))
        log.info("ckpt_path=%s: no run %s yet, so it starts from scratch", ckpt_path, run_dir)
        return RunLocation(run_dir, False, None if ckpt_path in ("last", "hpc") else ckpt_path)
    return RunLocation(_new_run_dir(base, settings.name, model_class_path), False, None)


def _newest_of_last_and_hpc(run_dir: Path, ckpt_path: str) -> str:
    """`last`, or `hpc` when a SLURM pre-emption saved an HPC checkpoint (`<run>/hpc_ckpt_<n>.ckpt`) after the
    last one: Lightning's `last` looks only at ModelCheckpoint's files, and would repeat the steps between."""
    if ckpt_path != "last":
        return ckpt_path
    hpc = list(run_dir.glob("hpc_ckpt_*.ckpt"))
    last = list((run_dir / "checkpoints").glob("last*.ckpt"))
    if hpc and max(p.stat().st_mtime for p in hpc) > max((p.stat().st_mtime for p in last), default=0.0):
        return "hpc"
    return ckpt_path


def discard_failed_start(run_dir: Path) -> bool:
    """Remove a new run's directory that a failed start left holding only its own record (run.json, the
    config): nothing was trained or written, and an empty run would only clutter `forgelab compare`."""
    if not run_dir.is_dir() or any(p.name not in ("run.json", "config.yaml") for p in run_dir.iterdir()):
        return False
    for path in run_dir.iterdir():
        path.unlink()
    run_dir.rmdir()
    return True


def wandb_mode() -> str | None:
    """The `mode` to give W&B: None (W&B decides from WANDB_MODE, `wandb offline`/`wandb online` and its
    settings files) when the user set WANDB_MODE or has credentials; `offline` when neither, where an online
    start would fail for want of an API key."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return None
    host = os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1].rstrip("/")
    try:
        credentials = netrc.netrc().authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        credentials = None
    return None if credentials else "offline"


def read_run_record(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "run.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv when it starts; a resumed run appends to it."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as handle:
                self.metrics_keys = sorted(next(csv.reader(handle), []))

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        with atomic_open(self.metrics_file_path) as handle:
            writer = csv.DictWriter(handle, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)


class RunCSVLogger(CSVLogger):
    """`<run>/metrics.csv`, continued (not overwritten) when the run is resumed."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment


class RunWandbLogger(WandbLogger):
    """Lightning's WandbLogger whose W&B step continues across resumptions of an offline run.

    Online, W&B resumes the step from its server; an offline segment cannot ask, starts at 0, and `wandb sync`
    would then write the second segment's history over the first. Each log therefore names its step: one past
    the last step the run's earlier offline segments wrote (read from their files), never below W&B's own
    counter. (The config reaches W&B once, from `RunConfigCallback`: modules save their hyperparameters with
    `logger=False`.)
    """

    def __init__(self, *args: Any, start_step: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._next_step = start_step

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        metrics = _add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR)
        if step is not None:
            metrics = dict(metrics, **{"trainer/global_step": step})
        wandb_step = max(self._next_step, self.experiment.step)
        self.experiment.log(metrics, step=wandb_step)
        self._next_step = wandb_step + 1


def build_loggers(settings: RunSettings, run_dir: Path, record: dict[str, Any]) -> list[Logger]:
    """CSV always (the local source of truth); W&B when enabled, resuming the recorded W&B run id."""
    loggers: list[Logger] = [RunCSVLogger(save_dir=str(run_dir), name="", version="")]
    if settings.wandb:
        last = last_step(run_dir / "wandb", record["wandb_id"]) if (run_dir / "wandb").is_dir() else None
        loggers.append(
            RunWandbLogger(
                project=settings.project,
                name=run_dir.name,
                id=record["wandb_id"],
                save_dir=str(run_dir),
                group=settings.group,
                job_type=settings.job_type,
                tags=list(settings.tags) or None,
                notes=settings.notes,
                mode=wandb_mode(),
                resume="allow",
                log_model=False,
                start_step=0 if last is None else last + 1,
            )
        )
    return loggers


class RunConfigCallback(SaveConfigCallback):
    """Writes the resolved config into this run's directory (not the shared `trainer.log_dir`) and sends the same
    config, nested as jsonargparse names it (`model.init_args.lr`), to W&B. Lightning's own callback writes one `config.yaml` shared by every run whose first
    logger is W&B and sends nothing to W&B (Lightning#19728)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            run_dir = Path(trainer.default_root_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            target = run_dir / self.config_filename
            if target.exists():  # a resumed run keeps the original and records what this invocation used
                n = 1
                while (run_dir / f"config.resume{n}.yaml").exists():
                    n += 1
                target = run_dir / f"config.resume{n}.yaml"
            text = self.parser.dump(self.config, skip_none=False)
            write_text(target, text)
            self.save_config(trainer, pl_module, stage)
        self.already_saved = trainer.strategy.broadcast(True)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = json.loads(self.parser.dump(self.config, skip_none=False, format="json"))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run_config = logger.experiment.config
                # a sweep's parameters are already in the config under their dotted names: keep those
                nested = wandb_config(config, exclude=set(run_config.keys()))
                run_config.update(nested, allow_val_change=True)


class DataHealthCallback(Callback):
    """Counts files skipped while indexing and while decoding (reported by batches under `skipped`), writes
    `data_health.json` in the run directory, logs the counts to W&B's summary and prints one summary line."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}  # path -> reason; a bad file met every epoch is one skipped file

    def _record(self, batch: Any) -> None:
        if isinstance(batch, dict):
            for path, reason in batch.get("skipped", ()):
                if path not in self.reasons:
                    self.reasons[path] = reason
                    log.warning("skipped %s (%s)", path, reason)

    @property
    def counts(self) -> Counter[str]:
        return Counter(self.reasons.values())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._record(batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._record(batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._record(batch)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._record(batch)

    def summary(self, trainer: L.Trainer) -> dict[str, Any]:
        indexing = {}
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "skip_summary"):
            indexing = datamodule.skip_summary()
        examples: dict[str, list[str]] = {}
        for path, reason in self.reasons.items():
            if len(examples.setdefault(reason, [])) < 10:
                examples[reason].append(path)
        return {"indexing": indexing, "decoding": dict(self.counts), "examples": examples}

    def _gather(self) -> None:
        """Under DDP each rank saw its own batches: merge every rank's skips (a collective: all ranks call it)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[dict[str, str] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.reasons)
            for reasons in gathered:
                for path, reason in (reasons or {}).items():
                    self.reasons.setdefault(path, reason)

    def _report(self, trainer: L.Trainer) -> None:
        self._gather()
        if not trainer.is_global_zero:
            return
        summary = self.summary(trainer)
        write_json(Path(trainer.default_root_dir) / "data_health.json", summary)
        total = sum(summary["indexing"].values()) + sum(summary["decoding"].values())
        if total:
            print(
                f"forgelab: skipped {total} file(s): indexing {summary['indexing'] or {}}, "
                f"decoding {summary['decoding'] or {}} (see data_health.json)",
                file=sys.stderr,
            )
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                for phase in ("indexing", "decoding"):
                    for reason, count in summary[phase].items():
                        logger.experiment.summary[f"data/skipped_{phase}_{reason}"] = count

    def on_fit_end(self, trainer, pl_module) -> None:
        self._report(trainer)

    def on_test_end(self, trainer, pl_module) -> None:
        self._report(trainer)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._report(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._report(trainer)


def run_outcome(err: BaseException) -> str:
    """How an exception ended a run, for run.json: `interrupted` for Ctrl-C, `completed` for a clean
    `SystemExit` (status 0), else `failed: <type>: <first line of the message>`.

    W&B records the same through the exit code given to `wandb.finish` (its run state) and Lightning through
    `trainer.state.status`; run.json keeps it too because `forgelab compare` reads runs offline, without W&B,
    and the error's first line is what a reader of a run directory needs."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    if isinstance(err, SystemExit) and not err.code:
        return "completed"
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"failed: {type(err).__name__}" + (f": {message[:300]}" if message else "")


def record_outcome(run_dir: Path, record: dict[str, Any], outcome: str) -> None:
    """Close the record's last invocation with how it ended (`completed`, `interrupted`, `failed: ...`) and
    rewrite run.json, so a run directory left by a failed run says so (`forgelab compare` shows it)."""
    record["invocations"][-1]["outcome"] = outcome
    record["outcome"] = outcome
    try:
        write_json(run_dir / "run.json", record)
    except OSError as err:  # never hide the run's own error behind this one
        log.warning("could not record the run's outcome in %s: %s", run_dir, err)


@contextlib.contextmanager
def recording_outcome(run_dir: Path, record: dict[str, Any]) -> Iterator[None]:
    """`record_outcome` for the block: `completed` if it returns, the error (re-raised) if it raises."""
    try:
        yield
    except BaseException as err:
        record_outcome(run_dir, record, run_outcome(err))
        raise
    record_outcome(run_dir, record, "completed")


def start_run_record(
    run_dir: Path, settings: RunSettings, resumed: bool, seed: Any, argv: list[str]
) -> dict[str, Any]:
    """Create or extend run.json; returns the record (with the W&B id to reuse)."""
    record = read_run_record(run_dir) if resumed else {}
    record.setdefault("name", run_dir.name)
    record.setdefault("project", settings.project)
    # `wandb agent` assigns the run id (and W&B uses it over ours): record the id the run really has
    record.setdefault("wandb_id", os.environ.get("WANDB_RUN_ID") or secrets.token_hex(4))
    if os.environ.get("WANDB_SWEEP_ID"):
        record["wandb_sweep_id"] = os.environ["WANDB_SWEEP_ID"]
    record.setdefault("created", _dt.datetime.now().isoformat(timespec="seconds"))
    record["group"] = settings.group
    record["job_type"] = settings.job_type
    record["tags"] = list(settings.tags)
    record["seed"] = seed
    record["git_commit"] = git_commit()
    record.setdefault("invocations", []).append(
        {"argv": argv, "at": _dt.datetime.now().isoformat(timespec="seconds"), "resumed": resumed}
    )
    return record
