"""The on-disk cache of ITEM's frozen stage: captions, phrases, boxes and CLIP embeddings, computed once per image.

Layout, one directory per frozen-stage configuration (models and their weights' revision, preset, dtype,
preprocessing, perturbation, library versions, extraction-code fingerprint, FEATURE_VERSION; `stage_key` hashes
`FrozenStage.descriptor`)::

    <cache_dir>/<stage_key[:16]>/manifest.json       the descriptor, and per shard: sha256, size, entry keys
    <cache_dir>/<stage_key[:16]>/shards/<sha256[:24]>.safetensors
    <cache_dir>/<stage_key[:16]>/views/<view_key[:16]>/...   per-image views of splits, built from the shards
                                                           (view.py): what training streams

The shards hold every per-object embedding, for analyses; `FeatureCache.tables` reads them one shard at a time
(the view builder), `load` all at once (small splits, `per_object_batches`).

An entry is keyed by the image's content hash (sha256 of the file bytes), combined with the manifest
annotations an oracle reads (caption, boxes) when one is used. Editing an image, or its oracle caption,
changes its key: the old entry is never served for it.

Never stale, never half-written:
  * a shard is written to a temporary file, fsynced and renamed (common.io), then committed by rewriting the
    manifest the same way; the manifest is the index, so a shard the manifest does not list (a crash between
    the two renames) is ignored and deleted by the next writer;
  * each shard also carries its own index entry in its metadata (stage key, entry keys, the skips committed
    with it), so an unreadable manifest is rebuilt from the shards that verify instead of emptying the cache;
  * every read checks the shard's sha256 against the manifest and its stage key against the directory's; a
    shard that fails is dropped from the manifest and deleted, and its entries become misses, recomputed by the
    next extraction;
  * a writer holds an exclusive file lock on the directory while it writes a shard and commits it (two
    extractions, the ranks of a distributed one: each computes its share unlocked and commits its own shards);
    an entry another writer committed meanwhile is not committed twice. Readers need no lock, as the manifest
    and shards only ever change by atomic renames.
Images that cannot be decoded are recorded in the manifest's `skipped` with the reason, so they are counted,
not retried, until their content changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from common.io import write_bytes, write_json
from projects.item_detector.frozen import FLAG_NAMES, ImageFeatures

log = logging.getLogger("forgelab.item")

CACHE_FORMAT = 1


def stage_key(descriptor: dict[str, Any]) -> str:
    """sha256 of the descriptor's canonical JSON."""
    return hashlib.sha256(json.dumps(descriptor, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def content_hash(path: str | Path) -> str:
    """sha256 of the file's bytes."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def content_hashes(paths: Sequence[str], workers: int = 4) -> list[str | None]:
    """`content_hash` of every path (threads: hashing releases the GIL), None for files that cannot be read."""

    def one(path: str) -> str | None:
        try:
            return content_hash(path)
        except OSError:
            return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, paths))


def entry_key(content: str, annotations: dict[str, Any] | None = None) -> str:
    """The content hash alone, or combined with the oracle annotations the features were computed from."""
    if not annotations:
        return content
    payload = content + "\n" + json.dumps(annotations, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class FeatureTable:
    """Frozen features of N images in columns; object rows of image i are `offsets[i]:offsets[i + 1]`."""

    keys: list[str]
    captions: list[str]
    phrases: list[list[str]]
    global_image: torch.Tensor  # (N, d)
    global_text: torch.Tensor  # (N, d)
    local_image: torch.Tensor  # (M, d)
    local_text: torch.Tensor  # (M, d)
    boxes: torch.Tensor  # (M, 4)
    box_scores: torch.Tensor  # (M,)
    offsets: torch.Tensor  # (N + 1,) int64
    flags: torch.Tensor  # (N, len(FLAG_NAMES)) int64
    key_index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.key_index = {key: i for i, key in enumerate(self.keys)}

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def dim(self) -> int:
        return int(self.global_image.shape[1])

    @classmethod
    def from_features(cls, keys: Sequence[str], features: Sequence[ImageFeatures]) -> FeatureTable:
        counts = [len(f.phrases) for f in features]
        dim = features[0].global_image.shape[-1] if features else 0

        def stack(tensors: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
            return torch.cat(tensors).float() if tensors else torch.zeros(shape)

        return cls(
            keys=list(keys),
            captions=[f.caption for f in features],
            phrases=[list(f.phrases) for f in features],
            global_image=stack([f.global_image.reshape(1, -1) for f in features], (0, dim)),
            global_text=stack([f.global_text.reshape(1, -1) for f in features], (0, dim)),
            local_image=stack([f.local_image.reshape(-1, dim) for f in features], (0, dim)),
            local_text=stack([f.local_text.reshape(-1, dim) for f in features], (0, dim)),
            boxes=stack([f.boxes.reshape(-1, 4) for f in features], (0, 4)),
            box_scores=stack([f.box_scores.reshape(-1) for f in features], (0,)),
            offsets=torch.tensor([0, *counts], dtype=torch.int64).cumsum(0),
            flags=torch.tensor(
                [[int(f.flags.get(name, 0)) for name in FLAG_NAMES] for f in features], dtype=torch.int64
            ).reshape(len(features), len(FLAG_NAMES)),
        )

    def select(self, rows: Sequence[int]) -> FeatureTable:
        """The given rows, in that order."""
        rows = list(rows)
        starts, ends = self.offsets[:-1], self.offsets[1:]
        object_rows = [torch.arange(int(starts[r]), int(ends[r])) for r in rows]
        objects = torch.cat(object_rows) if object_rows else torch.zeros(0, dtype=torch.int64)
        counts = torch.tensor([int(ends[r] - starts[r]) for r in rows], dtype=torch.int64)
        index = torch.tensor(rows, dtype=torch.int64)
        return FeatureTable(
            keys=[self.keys[r] for r in rows],
            captions=[self.captions[r] for r in rows],
            phrases=[self.phrases[r] for r in rows],
            global_image=self.global_image[index],
            global_text=self.global_text[index],
            local_image=self.local_image[objects],
            local_text=self.local_text[objects],
            boxes=self.boxes[objects],
            box_scores=self.box_scores[objects],
            offsets=torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]),
            flags=self.flags[index],
        )

    @classmethod
    def concat(cls, tables: Sequence[FeatureTable]) -> FeatureTable:
        tables = [t for t in tables if len(t)]
        if not tables:
            return cls.empty()
        shifts = [0]
        for table in tables[:-1]:
            shifts.append(shifts[-1] + int(table.offsets[-1]))
        return cls(
            keys=[k for t in tables for k in t.keys],
            captions=[c for t in tables for c in t.captions],
            phrases=[p for t in tables for p in t.phrases],
            global_image=torch.cat([t.global_image for t in tables]),
            global_text=torch.cat([t.global_text for t in tables]),
            local_image=torch.cat([t.local_image for t in tables]),
            local_text=torch.cat([t.local_text for t in tables]),
            boxes=torch.cat([t.boxes for t in tables]),
            box_scores=torch.cat([t.box_scores for t in tables]),
            offsets=torch.cat(
                [torch.zeros(1, dtype=torch.int64)] + [t.offsets[1:] + s for t, s in zip(tables, shifts)]
            ),
            flags=torch.cat([t.flags for t in tables]),
        )

    @classmethod
    def empty(cls) -> FeatureTable:
        return cls.from_features([], [])

    def flag_totals(self) -> dict[str, int]:
        return {name: int(self.flags[:, i].sum()) for i, name in enumerate(FLAG_NAMES)}

    def batch(self, rows: Sequence[int]) -> dict[str, Any]:
        """Stacked global embeddings and object embeddings padded to the batch's largest object count K
        (K >= 1), with `local_mask` marking real objects."""
        rows = list(rows)
        index = torch.tensor(rows, dtype=torch.int64)
        starts, ends = self.offsets[index], self.offsets[index + 1]
        counts = ends - starts
        k = max(1, int(counts.max())) if rows else 1
        positions = torch.arange(k)
        mask = positions.unsqueeze(0) < counts.unsqueeze(1)
        gather = (starts.unsqueeze(1) + positions.unsqueeze(0)).clamp_max(max(0, len(self.local_image) - 1))
        dim = self.global_image.shape[1]
        if len(self.local_image):
            local_image = self.local_image[gather] * mask.unsqueeze(-1)
            local_text = self.local_text[gather] * mask.unsqueeze(-1)
        else:
            local_image = local_text = torch.zeros(len(rows), k, dim)
        return {
            "global_image": self.global_image[index],
            "global_text": self.global_text[index],
            "local_image": local_image,
            "local_text": local_text,
            "local_mask": mask,
            "caption": [self.captions[r] for r in rows],
        }

    # -- safetensors ------------------------------------------------------------------------------------------
    def to_bytes(self, key_of_stage: str, skipped: dict[str, str] | None = None) -> bytes:
        """A safetensors shard whose metadata is enough to rebuild the cache's manifest entry for it."""
        tensors = {
            "global_image": self.global_image.contiguous(),
            "global_text": self.global_text.contiguous(),
            "local_image": self.local_image.contiguous(),
            "local_text": self.local_text.contiguous(),
            "boxes": self.boxes.contiguous(),
            "box_scores": self.box_scores.contiguous(),
            "offsets": self.offsets.contiguous(),
            "flags": self.flags.contiguous(),
        }
        metadata = {
            "format": str(CACHE_FORMAT),
            "stage_key": key_of_stage,
            "keys": json.dumps(self.keys),
            "captions": json.dumps(self.captions),
            "phrases": json.dumps(self.phrases),
            "flag_names": json.dumps(list(FLAG_NAMES)),
            "skipped": json.dumps(skipped or {}),
        }
        return save_safetensors(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes, metadata: dict[str, str]) -> FeatureTable:
        tensors = load_safetensors(data)
        keys = json.loads(metadata["keys"])
        table = cls(
            keys=keys,
            captions=json.loads(metadata["captions"]),
            phrases=json.loads(metadata["phrases"]),
            **{name: tensors[name] for name in _TENSORS},
        )
        if json.loads(metadata["flag_names"]) != list(FLAG_NAMES):
            raise ValueError("flag names differ from this version's")
        n = len(keys)
        if not (
            len(table.captions)
            == len(table.phrases)
            == table.global_image.shape[0]
            == table.flags.shape[0]
            == n
            and table.offsets.shape[0] == n + 1
            and int(table.offsets[-1]) == table.local_image.shape[0] == table.local_text.shape[0]
        ):
            raise ValueError("inconsistent shard: row counts differ between columns")
        return table


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's header (8-byte little-endian length, then JSON)."""
    length = int.from_bytes(data[:8], "little")
    if not 0 < length <= len(data) - 8:
        raise ValueError("bad header length")
    return json.loads(data[8 : 8 + length]).get("__metadata__") or {}


_TENSORS = (
    "global_image",
    "global_text",
    "local_image",
    "local_text",
    "boxes",
    "box_scores",
    "offsets",
    "flags",
)


class CorruptShardError(Exception):
    pass


class FeatureCache:
    """Shards of `FeatureTable`s for one frozen-stage configuration; see the module docstring."""

    def __init__(self, root: str | Path, descriptor: dict[str, Any]) -> None:
        self.descriptor = descriptor
        self.key = stage_key(descriptor)
        self.dir = Path(root) / self.key[:16]
        self.shard_dir = self.dir / "shards"
        self.manifest_path = self.dir / "manifest.json"
        self.dropped_shards = 0  # shards found corrupt and dropped by this object
        self._holding_lock = False

    # -- manifest ---------------------------------------------------------------------------------------------
    def _empty_manifest(self) -> dict[str, Any]:
        return {
            "format": CACHE_FORMAT,
            "stage_key": self.key,
            "descriptor": self.descriptor,
            "shards": {},
            "skipped": {},
        }

    def _committed_manifest(self) -> tuple[dict[str, Any] | None, str | None]:
        """(the manifest on disk, None), or (None, why it cannot be used)."""
        try:
            manifest = json.loads(self.manifest_path.read_bytes())
        except (OSError, ValueError) as err:  # ValueError: bad JSON, or bytes that are not UTF-8
            return None, f"unreadable manifest ({type(err).__name__}: {err})"
        if (
            not isinstance(manifest, dict)
            or manifest.get("stage_key") != self.key
            or manifest.get("format") != CACHE_FORMAT
        ):
            return None, "manifest of another configuration"
        return manifest, None

    def read_manifest(self) -> dict[str, Any]:
        """The committed index. An unreadable or foreign manifest is rebuilt from the shards' own metadata and
        rewritten, so no committed shard is lost (or deleted as uncommitted by the next writer)."""
        if not self.manifest_path.is_file():
            return self._empty_manifest()
        manifest, problem = self._committed_manifest()
        if manifest is not None:
            return manifest
        with self.locked():
            manifest, problem = self._committed_manifest()  # another writer may have rebuilt it meanwhile
            if manifest is not None:
                return manifest
            manifest = self._rebuilt_manifest()
            log.warning(
                "feature cache %s: %s; rebuilt it from %d shards (%d entries)",
                self.dir,
                problem,
                len(manifest["shards"]),
                sum(len(record["keys"]) for record in manifest["shards"].values()),
            )
            write_json(self.manifest_path, manifest)
        return manifest

    def _rebuilt_manifest(self) -> dict[str, Any]:
        """The index recovered from every shard that verifies: its name is its sha256 prefix, and its metadata
        carries the stage key, the entry keys and the skips committed with it. Others stay unlisted (garbage)."""
        manifest = self._empty_manifest()
        paths = sorted(self.shard_dir.glob("*.safetensors")) if self.shard_dir.is_dir() else []
        for path in paths:
            try:
                data = path.read_bytes()
                digest = hashlib.sha256(data).hexdigest()
                metadata = safetensors_metadata(data)
                if (
                    path.name != f"{digest[:24]}.safetensors"
                    or metadata.get("stage_key") != self.key
                    or metadata.get("format") != str(CACHE_FORMAT)
                ):
                    continue
                keys = json.loads(metadata["keys"])
                skipped = json.loads(metadata.get("skipped", "{}"))
            except (OSError, ValueError, KeyError):
                continue
            manifest["shards"][path.name] = {"sha256": digest, "bytes": len(data), "keys": keys}
            manifest["skipped"].update(skipped)
        return manifest

    def status(self, keys: Sequence[str]) -> tuple[set[str], dict[str, str]]:
        """(keys with committed features, keys recorded as undecodable -> reason)."""
        manifest = self.read_manifest()
        present = {k for shard in manifest["shards"].values() for k in shard["keys"]}
        wanted = set(keys)
        skipped = {k: r for k, r in manifest["skipped"].items() if k in wanted}
        return present & wanted, skipped

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive writer lock (re-entrant within this object); on entry, leftovers of interrupted writers are
        removed."""
        if self._holding_lock:
            yield
            return
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            self._holding_lock = True
            try:
                self._collect_garbage()
                yield
            finally:
                self._holding_lock = False
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _collect_garbage(self) -> None:
        listed = set(self.read_manifest()["shards"])
        for path in self.shard_dir.iterdir():
            if path.name not in listed:
                log.info("feature cache %s: removing uncommitted file %s", self.dir, path.name)
                path.unlink(missing_ok=True)

    def commit(self, table: FeatureTable, skipped: dict[str, str] | None = None) -> str | None:
        """Write `table` (and `skipped`, also in the shard's metadata) as a new shard and add it to the manifest.
        Call under `locked()`."""
        manifest = self.read_manifest()
        committed = {k for record in manifest["shards"].values() for k in record["keys"]}
        if any(k in committed for k in table.keys):  # computed by another writer too: keep one copy
            table = table.select([i for i, k in enumerate(table.keys) if k not in committed])
        name = None
        if len(table) or skipped:
            data = table.to_bytes(self.key, skipped)
            digest = hashlib.sha256(data).hexdigest()
            name = f"{digest[:24]}.safetensors"
            write_bytes(self.shard_dir / name, data)
            manifest["shards"][name] = {"sha256": digest, "bytes": len(data), "keys": table.keys}
        manifest["skipped"].update(skipped or {})
        manifest["descriptor"] = self.descriptor
        write_json(self.manifest_path, manifest)
        return name

    def _drop_shard(self, name: str, reason: str) -> None:
        log.warning(
            "feature cache %s: shard %s is %s; dropping it (its entries will be recomputed)",
            self.dir,
            name,
            reason,
        )
        self.dropped_shards += 1
        with self.locked():
            manifest = self.read_manifest()
            if manifest["shards"].pop(name, None) is not None:
                write_json(self.manifest_path, manifest)
            (self.shard_dir / name).unlink(missing_ok=True)

    def _read_shard(self, name: str, record: dict[str, Any]) -> FeatureTable:
        path = self.shard_dir / name
        try:
            data = path.read_bytes()
        except OSError as err:
            raise CorruptShardError(f"unreadable ({err})") from None
        if len(data) != record["bytes"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise CorruptShardError("corrupt (checksum mismatch)")
        try:
            metadata = safetensors_metadata(data)
            if metadata.get("stage_key") != self.key:
                raise CorruptShardError("from another configuration (stage key mismatch)")
            table = FeatureTable.from_bytes(data, metadata)
        except CorruptShardError:
            raise
        except Exception as err:  # safetensors raises its own error types on a bad header
            raise CorruptShardError(f"unparseable ({type(err).__name__}: {err})") from None
        if table.keys != record["keys"]:
            raise CorruptShardError("inconsistent with the manifest (different entries)")
        return table

    def tables(self, keys: Sequence[str]) -> Iterator[FeatureTable]:
        """Verified features of the requested keys that are cached, one shard at a time (in manifest order,
        each key once, the shard's rows in its order), so that a caller streaming over a large split holds one
        shard in memory. Corrupt shards are dropped; their keys are then absent."""
        manifest = self.read_manifest()
        wanted = set(keys)
        for name, record in manifest["shards"].items():
            hits = [k for k in record["keys"] if k in wanted]
            if not hits:
                continue
            try:
                table = self._read_shard(name, record)
            except CorruptShardError as err:
                self._drop_shard(name, str(err))
                continue
            wanted.difference_update(hits)
            yield table if len(hits) == len(table) else table.select([table.key_index[k] for k in hits])

    def skipped(self, keys: Sequence[str]) -> dict[str, str]:
        """The recorded skips (undecodable images) among `keys`."""
        wanted = set(keys)
        return {k: r for k, r in self.read_manifest()["skipped"].items() if k in wanted}

    def load(self, keys: Sequence[str]) -> tuple[FeatureTable, dict[str, str]]:
        """Verified features of the requested keys that are cached (one row per distinct key, in first-seen
        order), and the recorded skips among them, all in memory (every per-object embedding: for analyses
        and small splits; training streams the per-image view of `view.py`). Corrupt shards are dropped;
        their keys are then absent."""
        wanted = dict.fromkeys(keys)
        table = FeatureTable.concat(list(self.tables(list(wanted))))
        order = [table.key_index[k] for k in wanted if k in table.key_index]
        return table.select(order), self.skipped(list(wanted))
