"""Closing the process's W&B run with the state the dashboard should show (import-light: no wandb import)."""

from __future__ import annotations

import sys


def finish_wandb_run(exit_code: int = 0) -> None:
    """Close the process's W&B run, if any, with `exit_code` (0 finished; non-zero failed, 255 for Ctrl-C as
    wandb's own exit hook records it). WandbLogger reuses an active `wandb.run`, which would merge the next run
    started in this process into this one, and an offline run's file is complete only once finished. `finish`
    returns before W&B's service has written the last records; `teardown` waits for it (and lets the next run
    in this process read the environment afresh, as `wandb agent` does between runs)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)
        wandb.teardown()
