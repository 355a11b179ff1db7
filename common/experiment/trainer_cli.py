"""`ForgelabCLI`: LightningCLI in subclass mode with forgelab's run directories, loggers and reports.

Kept apart from `common.experiment.cli` so that `forgelab --help` and the projects' own commands start without importing
Lightning.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from common.errors import ConfigError, ForgelabError
from common.experiment.parse_errors import one_line
from common.experiment.runs import (
    RUN_DIR_ENV,
    DataHealthCallback,
    RunConfigCallback,
    RunSettings,
    build_loggers,
    discard_failed_start,
    launch_rank,
    locate_trainer_run,
    record_outcome,
    run_dir_from_checkpoint,
    run_outcome,
    start_run_record,
)
from common.experiment.wandb_state import finish_wandb_run
from common.io import write_json

log = logging.getLogger("forgelab")


class ForgelabCLI(LightningCLI):
    """LightningCLI with per-run directories, CSV + W&B loggers, checkpointing on the model's validation monitor,
    a data-health report, and test-after-fit on the best validation checkpoint."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        self.run_dir: Path | None = None
        self.settings = RunSettings()
        self._new_run = False
        try:
            super().__init__(
                model_class=L.LightningModule,
                datamodule_class=L.LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                save_config_callback=RunConfigCallback,
                save_config_kwargs={"overwrite": True},
                seed_everything_default=True,
                parser_kwargs={"default_env": False, "exit_on_error": False},
                args=list(args) if args is not None else None,
                run=run,
            )
        except ArgumentError as err:  # jsonargparse's tree of a bad value (exit_on_error=False): one line
            raise ConfigError(one_line(str(err))) from None
        except BaseException as err:
            # Lightning marks the trainer interrupted for any error, and handles Ctrl-C by exiting with status 1:
            # only that exit is an interruption
            ctrl_c = isinstance(err, SystemExit) and self._trainer_interrupted()
            outcome = "interrupted" if ctrl_c else run_outcome(err)
            self._record_outcome(outcome)
            # W&B's run state comes from the exit code: 255 is what wandb's own hook gives a Ctrl-C
            finish_wandb_run(0 if outcome == "completed" else 255 if ctrl_c else 1)
            failed_start = outcome != "completed" and self._new_run and self.run_dir is not None
            if failed_start and launch_rank() == 0 and discard_failed_start(self.run_dir):
                log.info("removed %s: the run failed before writing anything", self.run_dir)
            raise
        if run:
            interrupted = self._trainer_interrupted()
            self._record_outcome("interrupted" if interrupted else "completed")
            finish_wandb_run(255 if interrupted else 0)

    def _trainer_interrupted(self) -> bool:
        return bool(getattr(getattr(self, "trainer", None), "interrupted", False))

    def _record_outcome(self, outcome: str) -> None:
        if self.run_dir is not None and launch_rank() == 0 and hasattr(self, "run_record"):
            record_outcome(self.run_dir, self.run_record, outcome)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(RunSettings, "run")

    # -- run directory ---------------------------------------------------------------------------------------
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        self.settings = RunSettings(**_as_dict(config.get("run")))
        if self.subcommand in ("validate", "test", "predict") and self.settings.job_type == "train":
            self.settings.job_type = self.subcommand
        model_class_path = (config.get("model") or {}).get("class_path") if config.get("model") else None
        ckpt_path = config.get("ckpt_path") if self.subcommand else None
        where = locate_trainer_run(self.settings, model_class_path, ckpt_path, self.subcommand or "fit")
        if self.subcommand:
            config["ckpt_path"] = (
                where.ckpt_path
            )  # a run name, or an agent's re-run, resolved to a checkpoint
        run_dir, resumed = where.run_dir, where.resumed
        self.run_dir, self._new_run = run_dir, not resumed
        os.environ[RUN_DIR_ENV] = str(run_dir.resolve())  # DDP children launched later inherit this run
        self.run_record = start_run_record(
            run_dir, self.settings, resumed, config.get("seed_everything"), sys.argv
        )
        if where.source is not None:
            self.run_record["source_checkpoint"] = where.source
            source_run = run_dir_from_checkpoint(where.source)
            if source_run is not None:
                self.run_record["source_run"] = str(source_run)
        if launch_rank() == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_dir / "run.json", self.run_record)
        log.info("run directory: %s (%s)", run_dir, "resumed" if resumed else "new")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, RuntimeError) as err:
            # jsonargparse wraps errors raised in __init__ of subclass-mode classes: surface the original one
            cause = _user_error_in_chain(err)
            if cause is not None:
                raise cause from None
            if isinstance(err, RuntimeError):
                raise
            raise ConfigError(f"invalid config: {err}") from err

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={}) or {}
        callbacks = list(trainer_config.get("callbacks") or [])
        if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            monitor = getattr(self.model, "monitor", None)
            callbacks.append(
                ModelCheckpoint(
                    dirpath=str(self.run_dir / "checkpoints"),
                    filename="best-epoch{epoch:03d}-step{step}" if monitor else "epoch{epoch:03d}-step{step}",
                    monitor=monitor,
                    mode=getattr(self.model, "monitor_mode", "min"),
                    save_last=True,
                    save_top_k=1,
                    auto_insert_metric_name=False,
                )
            )
        callbacks.append(DataHealthCallback())
        kwargs["callbacks"] = callbacks
        kwargs["default_root_dir"] = str(self.run_dir)
        logger = trainer_config.get("logger")
        if logger is None or logger is True:
            kwargs["logger"] = build_loggers(self.settings, self.run_dir, self.run_record)
        return super().instantiate_trainer(**kwargs)

    # -- after fit: test the best validation checkpoint ------------------------------------------------------
    def after_fit(self) -> None:
        trainer = self.trainer
        if trainer.interrupted:
            return
        has_test = getattr(self.datamodule, "has_split", lambda split: False)("test")
        if self.settings.test_after_fit and has_test:
            checkpoint = trainer.checkpoint_callback
            best = getattr(checkpoint, "best_model_path", "") if checkpoint else ""
            ckpt_path = best if best and not trainer.fast_dev_run else None
            if ckpt_path:
                log.info("testing the best validation checkpoint %s", ckpt_path)
            trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path, verbose=False)
        if trainer.is_global_zero:
            print(f"forgelab: run files in {self.run_dir}", file=sys.stderr)


def _user_error_in_chain(err: BaseException) -> BaseException | None:
    """The first ForgelabError or plain ValueError raised by our code in an exception's cause/context chain."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [err]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ForgelabError):
            return current
        if current is not err and type(current) is ValueError and _raised_by_us(current):
            return ConfigError(str(current))
        stack += [current.__cause__, current.__context__]
    return None


def _raised_by_us(err: BaseException) -> bool:
    """Whether the innermost frame of `err` is forgelab code (common/ or projects/)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename if tb is not None else ""
    return f"{os.sep}common{os.sep}" in filename or f"{os.sep}projects{os.sep}" in filename


def _as_dict(namespace: Any) -> dict[str, Any]:
    if namespace is None:
        return {}
    if hasattr(namespace, "as_dict"):
        return namespace.as_dict()
    return dict(namespace)
