"""Ranks for the jobs that are not a Trainer loop (ITEM's frozen-stage extraction, fg_guidance's augmentation, the
probe's inpainting): a disjoint, deterministic share of the work per rank, on Lightning's distributed engine.

`launch(trainer_section, fn, ...)` starts `fn` on every rank the trainer config gives, through Lightning Fabric
(the same accelerator/devices/num_nodes/strategy/plugins keys as the `trainer:` section of a fit config, so the
`ddp`, `ddp_sim` and `slurm` presets work unchanged: `ddp_spawn` starts the processes itself, `ddp` under torchrun
or srun takes the ranks from the launcher's variables). Inside, `current_ranks()` reads the process group that
Fabric (or a Trainer, when extraction runs inside `fit`) has set up, so the same code runs in one process, in
`forgelab extract` on N ranks and in a DDP fit's `setup`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from common.errors import ConfigError

log = logging.getLogger("forgelab.distributed")

T = TypeVar("T")

# The trainer keys that decide where processes run; the rest of a trainer section (epochs, precision, loggers)
# means nothing to a job without a training loop.
FABRIC_KEYS = ("accelerator", "devices", "num_nodes", "strategy", "plugins")


@dataclass(frozen=True)
class Ranks:
    """This process's rank among `world_size`, with the collective operations the jobs need."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> range:
        """This rank's items of n: every world_size-th from its rank, the split of Lightning's
        UnrepeatedDistributedSampler (written out: that sampler asserts when a rank gets no item, which happens
        for fewer items than ranks). Disjoint, together all n, and the same for any run with this world size."""
        return range(self.rank, n, self.world_size)

    def share_batches(self, n: int, batch_size: int) -> list[int]:
        """This rank's items of n in whole batches: batch b (items b*batch_size ...) goes to rank b mod world_size,
        so every batch holds the items one process's batch b holds, and a batched forward does the same
        arithmetic as in one process (bitwise equal results where the computation is deterministic)."""
        batches = range(0, n, batch_size)
        return [
            i for b in self.share(len(batches)) for i in range(batches[b], min(batches[b] + batch_size, n))
        ]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def gather(self, value: T) -> list[T]:
        """`value` of every rank, in rank order (picklable objects), on every rank."""
        if self.world_size == 1:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


def current_ranks() -> Ranks:
    """The ranks of the process group set up by Fabric or a Trainer; one rank when there is none."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def fabric_settings(trainer: dict[str, Any] | None) -> dict[str, Any]:
    """The keys of a config's `trainer:` section that Fabric takes, with plugins instantiated from their
    `class_path`/`init_args` form (through jsonargparse, as LightningCLI does for the Trainer)."""
    settings = {k: v for k, v in (trainer or {}).items() if k in FABRIC_KEYS and v is not None}
    plugins = settings.get("plugins")
    if plugins is not None:
        from jsonargparse import ArgumentParser
        from lightning.fabric.plugins.environments import ClusterEnvironment

        parser = ArgumentParser(exit_on_error=False)
        parser.add_argument("--plugins", type=list[ClusterEnvironment | str])
        listed = plugins if isinstance(plugins, list) else [plugins]
        parsed = parser.parse_object({"plugins": listed})
        settings["plugins"] = parser.instantiate(parsed).plugins
    return settings


def trainer_section(paths: Sequence[str]) -> dict[str, Any]:
    """The `trainer:` section of config files, later files overriding earlier keys (for the commands that take
    no full fit config, such as `forgelab augment --trainer-config`)."""
    import yaml

    section: dict[str, Any] = {}
    for path in paths:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read the trainer config {path}: {err}") from None
        if not isinstance(data, dict) or not isinstance(data.get("trainer", {}), dict):
            raise ConfigError(f"{path}: expected a mapping with a trainer: section")
        section |= data.get("trainer") or {}
    return section


def launch(trainer: dict[str, Any] | None, fn: Callable[..., T], *args: Any) -> T | None:
    """Run `fn(*args)` on every rank of the trainer section's settings (one process when it names none); returns
    what rank 0's `fn` returned (None on the other ranks of a launcher-started job)."""
    from lightning.fabric import Fabric

    settings = fabric_settings(trainer)
    # `devices: auto` (a section that names none) is one process here, not the Trainer's "every GPU": a one-off
    # command should start several processes, each loading its own models, only when a preset asks for them
    if settings.get("devices", "auto") == "auto":
        settings["devices"] = 1
    if settings["devices"] in (1, "1", [0]) and settings.get("num_nodes", 1) == 1:
        settings.pop("strategy", None)  # one process: no process group to set up
    fabric = Fabric(**settings)
    log.info("launching on %d rank(s) (%s)", fabric.world_size, type(fabric.strategy).__name__)
    return fabric.launch(_call, fn, *args)


def _call(fabric: Any, fn: Callable[..., T], *args: Any) -> T:
    """Fabric passes itself first; the jobs read their ranks from the process group (`current_ranks`)."""
    return fn(*args)


def split_evenly(items: Sequence[T], ranks: Ranks) -> list[T]:
    """This rank's share of `items` (see `Ranks.share`)."""
    return [items[i] for i in ranks.share(len(items))]
