"""Batches for the generator: a few subclasses with several images each, so Eq. 2 always has pairs of both kinds.

With 24 subclasses and shuffled batches of 4, two images of one subclass would meet in a batch about once in
eight batches, and Eq. 2's "same subclass" term would hardly ever fire. `SubclassBatchSampler` draws P
subclasses and M images of each (the "PK" batches of metric learning). A subclass with a single image can
only pair its reconstruction with itself (x_hat_i, x_i): it is kept, and named in a warning.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from common.data.captioned import CaptionedParts, collate_captioned
from common.errors import ConfigError

log = logging.getLogger("forgelab.fg_guidance")


class SubclassBatchSampler(Sampler[list[int]]):
    """Batches of ``subclasses_per_batch`` subclasses x up to ``images_per_subclass`` images each.

    Deterministic per (seed, epoch); under DDP each rank takes every world_size-th batch of the same sequence.
    An epoch has len(labels) // batch_size batches, so it sees about as many images as a plain epoch.
    """

    def __init__(
        self, labels: Sequence[int], subclasses_per_batch: int, images_per_subclass: int, seed: int = 0
    ) -> None:
        if subclasses_per_batch < 1 or images_per_subclass < 1:
            raise ConfigError("subclasses_per_batch and images_per_subclass must be >= 1")
        self.by_class: dict[int, list[int]] = {}
        for index, label in enumerate(labels):
            self.by_class.setdefault(int(label), []).append(index)
        self.classes = sorted(self.by_class)
        self.p = min(subclasses_per_batch, len(self.classes))
        self.m = images_per_subclass
        self.seed, self.epoch = seed, 0
        self.num_batches = max(1, len(labels) // (self.p * self.m))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shard(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __len__(self) -> int:
        rank, world = self._shard()
        return len(range(rank, self.num_batches, world))

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1  # a fresh order next epoch even if nobody calls set_epoch
        rank, world = self._shard()
        for b in range(self.num_batches):
            classes = rng.choice(self.classes, size=self.p, replace=False)
            batch = []
            for c in classes:
                members = self.by_class[int(c)]
                batch += rng.choice(members, size=min(self.m, len(members)), replace=False).tolist()
            if b % world == rank:
                yield batch


class FineGrainedPairs(CaptionedParts):
    """CaptionedParts whose training batches are P subclasses x M images (see module docstring).

    Args:
        subclasses_per_batch: P. images_per_subclass: M. The training batch size is P * M; ``batch_size`` is
            used for validation and test.
        sampler_seed: seed of the batch composition.
        Everything else as CaptionedParts (manifest, image_size, toy_world ...).
    """

    def __init__(
        self,
        *args: object,
        subclasses_per_batch: int = 2,
        images_per_subclass: int = 2,
        sampler_seed: int = 0,
        **kwargs: object,
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if subclasses_per_batch < 1 or images_per_subclass < 1:
            raise ConfigError("subclasses_per_batch and images_per_subclass must be >= 1")
        self.subclasses_per_batch = subclasses_per_batch
        self.images_per_subclass = images_per_subclass
        self.sampler_seed = sampler_seed

    def setup(self, stage: str | None = None) -> None:
        already = bool(self.samples)
        super().setup(stage)
        if already:
            return
        counts = Counter(sample.subclass for sample in self.samples["train"])
        singles = sorted(name for name, n in counts.items() if n < 2)
        if len(singles) == len(counts):
            raise ConfigError(
                "every subclass of the training set has a single image: the contrastive term (Eq. 2) needs at "
                "least one subclass with two images to form a positive pair of different photographs"
            )
        if singles:
            log.warning(
                "%d subclass(es) have a single training image and no positive pair of different images for "
                "Eq. 2 (only reconstruction vs source): %s",
                len(singles),
                ", ".join(singles[:10]) + (" ..." if len(singles) > 10 else ""),
            )
        self.single_image_subclasses = singles

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        labels = [dataset.class_to_id[s.subclass] for s in dataset.samples]
        sampler = SubclassBatchSampler(
            labels, self.subclasses_per_batch, self.images_per_subclass, seed=self.sampler_seed
        )
        return DataLoader(
            dataset, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=collate_captioned
        )
