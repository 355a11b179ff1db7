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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from common.experiment.configs import flatten_config
from common.experiment.env import RUN_DIR_ENV
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


def wandb_mode() -> str:
    """WANDB_MODE if the user set it; otherwise online when logged in (API key in env or ~/.netrc), else offline."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        credentials = netrc.netrc().authenticators(
            os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1]
        )
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        credentials = None
    return "online" if credentials else "offline"


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


def build_loggers(settings: RunSettings, run_dir: Path, record: dict[str, Any]) -> list[Logger]:
    """CSV always (the local source of truth); W&B when enabled, resuming the recorded W&B run id."""
    loggers: list[Logger] = [RunCSVLogger(save_dir=str(run_dir), name="", version="")]
    if settings.wandb:
        mode = wandb_mode()
        loggers.append(
            WandbLogger(
                project=settings.project,
                name=run_dir.name,
                id=record["wandb_id"],
                save_dir=str(run_dir),
                group=settings.group,
                job_type=settings.job_type,
                tags=list(settings.tags) or None,
                notes=settings.notes,
                mode=mode,
                resume="allow",
                log_model=False,
            )
        )
    return loggers


class RunConfigCallback(SaveConfigCallback):
    """Writes the resolved config into this run's directory (not the shared `trainer.log_dir`) and sends the same
    config, flattened, to W&B. Lightning's own callback writes one `config.yaml` shared by every run whose first
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
        config = self.parser.dump(self.config, skip_none=False, format="json")
        flat = flatten_config(json.loads(config))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(flat, allow_val_change=True)


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
    `SystemExit` (status 0), else `failed: <type>: <first line of the message>`."""
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
