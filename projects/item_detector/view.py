"""The per-image view of a split's cached features: what ITEM's head reads, streamed from disk.

Per image, ITEM's head needs only D_g (Eq. 4) and D_l (Eq. 7: the mean over the image's objects of Eq. 6), and
both are fixed once the frozen stage has run; UniFD and the Fig. 9 t-SNE read the raw I_0. The shards keep every
per-object embedding, for analyses; holding them all for a GenImage-size split (1.35M images, up to 8 objects)
would take ~75 GB. The view keeps, per image, `global_image` (I_0), `d_global`, `d_local` (float32, d each) and
`n_objects` (so that `empty_local` still decides D_l of images without objects): 9.2 GB for 1M images at
d = 768, read lazily. Layout, next to the shards it is built from::

    <cache_dir>/<stage_key[:16]>/views/<view_key[:16]>/view.json     chunks (rows, bytes, sha256), entry keys
                                                                     in row order, flag totals
    <cache_dir>/<stage_key[:16]>/views/<view_key[:16]>/chunk-00000.safetensors, ...

`view_key` hashes the stage key, the set of the split's entry keys (those with features), the chunk size and a
fingerprint of the code computing the view (this module, misalignment.py): another image set, an edited image,
another frozen stage or changed equations give another view. Views are derived data: `views/` may be deleted at
any time (a view no longer used is not deleted automatically).

Building: once, after extraction, from the verified shards (`FeatureCache.tables`, one shard in memory at a
time). Row i of that stream goes to chunk i mod C (C = ceil(rows / chunk_rows)), through append-only staging
files, so every chunk is a systematic sample of the whole split: an index sorted by label or generator still
gives mixed chunks, hence mixed batches. Chunks are written atomically (common.io) and `view.json` last, under
the view's lock (DDP ranks build once): a build killed between two files leaves no index, so nothing of it is
trusted, and the next build starts over. Opening checks the index and every chunk's size and header; a chunk's
sha256 is checked the first time a process reads it.

Reading: each read opens a chunk with safetensors' `safe_open` (a memory map) and closes it, so the pages it
touched leave the process's RSS. A contiguous row range (sequential evaluation) is read with `get_slice`;
scattered rows (shuffled training) load the whole chunk once into a one-chunk buffer that serves its next
batches. `ChunkSampler` orders a dataset so that reads come that way: see its docstring for the shuffle.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import math
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors
from torch.utils.data import DistributedSampler

from common.io import write_bytes, write_json
from projects.item_detector.cache import FeatureCache, FeatureTable
from projects.item_detector.misalignment import mean_object_distance, misalignment_vector
from projects.item_detector.provenance import source_fingerprint

log = logging.getLogger("forgelab.item")

VIEW_FORMAT = 1
COLUMNS = ("global_image", "d_global", "d_local")  # float32 (rows, d) each; and n_objects, int64 (rows,)
VIEW_SOURCES = ("projects/item_detector/view.py", "projects/item_detector/misalignment.py")


def per_image(table: FeatureTable) -> dict[str, torch.Tensor]:
    """Every row of `table` reduced to what the view stores: I_0, D_g (Eq. 4), the mean over the image's objects
    of D_l^i (Eq. 6, 7; zero without objects) and the object count."""
    counts = table.offsets[1:] - table.offsets[:-1]
    object_distances = misalignment_vector(table.local_image.float(), table.local_text.float())  # Eq. 6
    return {
        "global_image": table.global_image.float(),
        "d_global": misalignment_vector(table.global_image.float(), table.global_text.float()),  # Eq. 4
        "d_local": mean_object_distance(object_distances, counts),  # Eq. 7 before the empty-image fallback
        "n_objects": counts,
    }


def per_image_batch(table: FeatureTable, rows: Sequence[int]) -> dict[str, Any]:
    """`per_image` of the given rows and their captions: a batch as the view serves it."""
    part = table.select(rows)
    return per_image(part) | {"caption": part.captions}


@functools.lru_cache(maxsize=1)
def _code_fingerprint() -> str:
    return source_fingerprint(list(VIEW_SOURCES))


def view_key(stage_key: str, keys: Iterable[str], chunk_rows: int) -> str:
    """sha256 of what a view is computed from: the stage, the set of entry keys, the chunk size, the code."""
    header = {
        "format": VIEW_FORMAT,
        "stage": stage_key,
        "chunk_rows": chunk_rows,
        "code": _code_fingerprint(),
    }
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for key in sorted(set(keys)):
        digest.update(key.encode() + b"\n")
    return digest.hexdigest()


class ViewCorruptError(RuntimeError):
    pass


class FeatureView:
    """An opened view (see the module docstring): `read(rows)` returns rows' tensors and captions."""

    def __init__(self, directory: Path, index: dict[str, Any]) -> None:
        self.dir = directory
        self.key: str = index["view_key"]
        self.dim: int = index["dim"]
        self.keys: list[str] = index["keys"]
        self.flag_totals: dict[str, int] = index["flag_totals"]
        self.chunks: list[dict[str, Any]] = index["chunks"]
        sizes = torch.tensor([chunk["rows"] for chunk in self.chunks], dtype=torch.int64)
        self.starts = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
        self._row_of: dict[str, int] | None = None
        self._verified: set[int] = set()
        self._buffer: tuple[int, dict[str, torch.Tensor]] | None = None  # one whole chunk (scattered reads)
        self._captions: tuple[int, list[str]] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers: no buffer, no lookup table
        return self.__dict__ | {"_buffer": None, "_captions": None, "_row_of": None}

    @property
    def row_of(self) -> dict[str, int]:
        """Entry key -> row."""
        if self._row_of is None:
            self._row_of = {key: row for row, key in enumerate(self.keys)}
        return self._row_of

    def chunk_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The chunk holding each row."""
        return torch.searchsorted(self.starts[1:], rows, right=True)

    def read(self, rows: Sequence[int] | torch.Tensor) -> dict[str, Any]:
        """`global_image`, `d_global`, `d_local` (B, d), `n_objects` (B,) and `caption` of `rows`, in that order."""
        rows = torch.as_tensor(rows, dtype=torch.int64)
        out: dict[str, Any] = {name: torch.empty(len(rows), self.dim) for name in COLUMNS}
        out["n_objects"] = torch.empty(len(rows), dtype=torch.int64)
        captions = [""] * len(rows)
        chunk_ids = self.chunk_of(rows)
        for chunk in torch.unique(chunk_ids).tolist():
            positions = torch.nonzero(chunk_ids == chunk).flatten()
            local = rows[positions] - self.starts[chunk]
            part, chunk_captions = self._read_chunk(chunk, local)
            for name, values in part.items():
                out[name][positions] = values
            for position, row in zip(positions.tolist(), local.tolist(), strict=True):
                captions[position] = chunk_captions[row]
        out["caption"] = captions
        return out

    def _read_chunk(self, chunk: int, local: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[str]]:
        self._verify(chunk)
        if self._buffer is not None and self._buffer[0] == chunk:
            return {name: values[local] for name, values in self._buffer[1].items()}, self._chunk_captions(
                chunk
            )
        lo, hi = int(local.min()), int(local.max()) + 1
        with safe_open(self.dir / self.chunks[chunk]["name"], framework="pt") as handle:
            captions = self._chunk_captions(chunk, handle)
            if hi - lo <= 2 * len(local):  # a contiguous range (sequential reading): just these rows
                return {
                    name: handle.get_slice(name)[lo:hi][local - lo] for name in (*COLUMNS, "n_objects")
                }, captions
            tensors = {
                name: handle.get_tensor(name) for name in (*COLUMNS, "n_objects")
            }  # copies, then unmapped
        self._buffer = (chunk, tensors)
        return {name: values[local] for name, values in tensors.items()}, captions

    def _chunk_captions(self, chunk: int, handle: Any = None) -> list[str]:
        if self._captions is None or self._captions[0] != chunk:
            if handle is None:
                with safe_open(self.dir / self.chunks[chunk]["name"], framework="pt") as fresh:
                    return self._chunk_captions(chunk, fresh)
            self._captions = (chunk, json.loads(handle.metadata()["captions"]))
        return self._captions[1]

    def _verify(self, chunk: int) -> None:
        """The chunk's sha256 against the index, once per process (a streamed read: no RSS)."""
        if chunk in self._verified:
            return
        path = self.dir / self.chunks[chunk]["name"]
        with open(path, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        if digest != self.chunks[chunk]["sha256"]:
            (self.dir / "view.json").unlink(missing_ok=True)  # never trusted again: the next run rebuilds it
            raise ViewCorruptError(
                f"feature view chunk {path} is corrupt (checksum mismatch); the view was invalidated and the next "
                f"run rebuilds it from the cache's shards"
            )
        self._verified.add(chunk)


def open_view(directory: Path, key: str) -> FeatureView | None:
    """The view in `directory` if its index is complete and for `key` and every chunk has its recorded size and
    header; else None (absent, unfinished or foreign)."""
    try:
        index = json.loads((directory / "view.json").read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict) or index.get("format") != VIEW_FORMAT or index.get("view_key") != key:
        return None
    try:
        for number, chunk in enumerate(index["chunks"]):
            path = directory / chunk["name"]
            if path.stat().st_size != chunk["bytes"]:
                return None
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
            if (metadata.get("view_key"), metadata.get("chunk"), metadata.get("rows")) != (
                key,
                str(number),
                str(chunk["rows"]),
            ):
                return None
        if sum(chunk["rows"] for chunk in index["chunks"]) != len(index["keys"]):
            return None
    except Exception:  # OSError, KeyError, safetensors' own error on a bad header: not a usable view
        return None
    return FeatureView(directory, index)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_view(cache: FeatureCache, keys: Sequence[str], chunk_rows: int = 8192) -> FeatureView | None:
    """The view of entry `keys`: opened when built before, else built from the cache's verified shards.
    None when some of the keys have no features in the cache (never extracted, or in a shard found corrupt while
    building: the caller extracts them and asks again)."""
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    wanted = list(dict.fromkeys(keys))
    key = view_key(cache.key, wanted, chunk_rows)
    directory = cache.dir / "views" / key[:16]
    view = open_view(directory, key)
    if view is not None:
        return view
    directory.parent.mkdir(parents=True, exist_ok=True)
    with _locked(directory.parent / f"{key[:16]}.lock"):
        view = open_view(directory, key)  # another process may have built it while this one waited
        if view is not None:
            return view
        if directory.exists():
            log.info("feature view %s: removing an unfinished build", directory)
            shutil.rmtree(directory)
        directory.mkdir()
        try:
            complete = _write_view(cache, wanted, key, chunk_rows, directory)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        if not complete:
            shutil.rmtree(directory)
            return None
    view = open_view(directory, key)
    if view is None:
        raise RuntimeError(f"the feature view just built in {directory} does not open")
    return view


def _write_view(cache: FeatureCache, wanted: list[str], key: str, chunk_rows: int, directory: Path) -> bool:
    n_chunks = max(1, math.ceil(len(wanted) / chunk_rows))
    staging = directory / "staging"
    staging.mkdir()
    dealt, dim, flags = 0, 0, Counter()
    for table in cache.tables(wanted):
        reduced, dim = per_image(table), table.dim
        record = torch.cat(
            [reduced[name] for name in COLUMNS] + [reduced["n_objects"].unsqueeze(1).float()], dim=1
        ).numpy()
        target = (dealt + np.arange(len(table))) % n_chunks  # round-robin: chunks sample the whole split
        for chunk in np.unique(target).tolist():
            rows = np.nonzero(target == chunk)[0]
            with open(staging / f"{chunk}.bin", "ab") as handle:
                handle.write(record[rows].tobytes())
            with open(staging / f"{chunk}.jsonl", "a", encoding="utf-8") as handle:
                handle.write("".join(json.dumps([table.keys[r], table.captions[r]]) + "\n" for r in rows))
        dealt += len(table)
        flags.update(table.flag_totals())
    if dealt < len(wanted):
        return False
    chunks, keys_in_order = [], []
    for chunk in range(n_chunks if wanted else 0):
        records = np.fromfile(staging / f"{chunk}.bin", dtype=np.float32).reshape(-1, 3 * dim + 1)
        pairs = [json.loads(line) for line in (staging / f"{chunk}.jsonl").read_text("utf-8").splitlines()]
        tensors = {
            name: torch.from_numpy(records[:, i * dim : (i + 1) * dim].copy())
            for i, name in enumerate(COLUMNS)
        }
        tensors["n_objects"] = torch.from_numpy(records[:, 3 * dim].copy()).to(torch.int64)
        metadata = {
            "format": str(VIEW_FORMAT),
            "view_key": key,
            "chunk": str(chunk),
            "rows": str(len(pairs)),
            "captions": json.dumps([caption for _, caption in pairs]),
        }
        data = save_safetensors(tensors, metadata=metadata)
        name = f"chunk-{chunk:05d}.safetensors"
        write_bytes(directory / name, data)
        chunks.append(
            {"name": name, "rows": len(pairs), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        )
        keys_in_order += [entry for entry, _ in pairs]
        (staging / f"{chunk}.bin").unlink()
        (staging / f"{chunk}.jsonl").unlink()
        del records, tensors, data
    shutil.rmtree(staging)
    index = {
        "format": VIEW_FORMAT,
        "view_key": key,
        "stage_key": cache.key,
        "dim": dim,
        "chunk_rows": chunk_rows,
        "rows": len(keys_in_order),
        "chunks": chunks,
        "flag_totals": dict(flags),
        "keys": keys_in_order,
    }
    write_json(directory / "view.json", index)  # last: the view exists once this rename is done
    log.info("feature view %s: %d rows in %d chunks", directory, len(keys_in_order), len(chunks))
    return True


class ChunkSampler(DistributedSampler):
    """Dataset indices grouped by view chunk, so that a loader reads each chunk once per epoch.

    `groups` are the dataset indices of each chunk in row order (and last, those without features, served as
    skip records). The training shuffle is the streaming datasets' one (WebDataset, MosaicML streaming): each
    epoch permutes the order of the groups, then the indices within each group, with a generator seeded by
    `seed + epoch` (`set_epoch`, as DistributedSampler): a run is reproducible for a seed, every epoch differs,
    and memory holds one chunk. Since the view deals rows round-robin to its chunks, a chunk is a sample of the
    whole split and its batches mix labels and generators. Without `shuffle`: groups in order, rows in order.

    Under DDP each rank takes a contiguous block of the epoch's order, padded by repeating its start to equal
    lengths (as DistributedSampler; `pad=False` for predict). Being a DistributedSampler, Lightning calls its
    `set_epoch` and does not replace it by its own.
    """

    def __init__(
        self,
        groups: Sequence[torch.Tensor],
        shuffle: bool,
        seed: int = 0,
        pad: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if num_replicas is None:
            num_replicas = torch.distributed.get_world_size() if distributed else 1
        if rank is None:
            rank = torch.distributed.get_rank() if distributed else 0
        self.groups = [group.to(torch.int64) for group in groups if len(group)]
        self.size = sum(len(group) for group in self.groups)
        super().__init__(range(self.size), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.pad = pad

    def epoch_order(self) -> torch.Tensor:
        """Every index once, in this epoch's order (before the split between ranks)."""
        groups = self.groups
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
            groups = [group[torch.randperm(len(group), generator=generator)] for group in groups]
        return torch.cat(groups) if groups else torch.zeros(0, dtype=torch.int64)

    def _block(self) -> torch.Tensor:
        order = self.epoch_order()
        if not self.pad or not len(order):
            return torch.tensor_split(order, self.num_replicas)[self.rank]
        padded = order.repeat(math.ceil(self.total_size / len(order)))[: self.total_size]
        return padded[self.rank * self.num_samples : (self.rank + 1) * self.num_samples]

    def __iter__(self) -> Iterator[int]:
        return iter(self._block().tolist())

    def __len__(self) -> int:
        if self.pad:
            return self.num_samples
        return len(torch.tensor_split(torch.arange(self.size), self.num_replicas)[self.rank])
