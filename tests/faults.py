"""A callback that raises on a chosen training batch: a Ctrl-C or a crash mid-run, through the real CLI
(`--trainer.callbacks+=tests.faults.RaiseAt`)."""

from __future__ import annotations

import lightning as L

ERRORS = {"KeyboardInterrupt": KeyboardInterrupt, "RuntimeError": RuntimeError}


class RaiseAt(L.Callback):
    """Raise `error` (KeyboardInterrupt or RuntimeError) at training batch `batch` of epoch `epoch`."""

    def __init__(self, error: str = "KeyboardInterrupt", epoch: int = 0, batch: int = 1) -> None:
        self.error, self.epoch, self.batch = ERRORS[error], epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise self.error(f"raised by the test at epoch {self.epoch}, batch {self.batch}")
