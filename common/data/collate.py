"""Batching items of which some failed to decode: the datamodules' shared collate.

A dataset returns `{"skip": reason, "path": ...}` for a file it could not use instead of raising (a run never
dies mid-epoch on one bad file). The collate stacks the good items and lists the others under `skipped`, which
`common.callbacks.DataHealthCallback` counts; a batch of only bad files is an empty batch of the right shapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def collate_with_skips(
    items: list[dict[str, Any]],
    stacked: Mapping[str, tuple[int, ...]],
    scalars: Mapping[str, torch.dtype],
    lists: Sequence[str],
) -> dict[str, Any]:
    """Stack `stacked` tensors (their per-item shape when the batch is empty), make `scalars` 1-D tensors of
    the given dtype, keep `lists` as per-item lists, and add `skipped`: (path, reason) of each skipped item."""
    good = [item for item in items if "skip" not in item]
    batch: dict[str, Any] = {}
    for key, empty_shape in stacked.items():
        batch[key] = torch.stack([item[key] for item in good]) if good else torch.empty(0, *empty_shape)
    for key, dtype in scalars.items():
        batch[key] = torch.tensor([item[key] for item in good], dtype=dtype)
    for key in lists:
        batch[key] = [item[key] for item in good]
    batch["skipped"] = [(item["path"], item["skip"]) for item in items if "skip" in item]
    return batch
