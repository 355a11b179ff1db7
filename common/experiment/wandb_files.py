"""Reading W&B's offline run files (`wandb/offline-run-*/run-<id>.wandb`).

wandb >= 0.20 writes these from its Go core and ships no Python reader of them any more (the old
`wandb.sdk.internal.datastore` is gone), so the framing is read here and every record is parsed with wandb's own
protobuf `Record` class. The framing is LevelDB's log format behind a 7-byte W&B header: 32 KiB blocks of chunks,
each `crc32c (4) | length (2, LE) | type (1) | data`, type 1 a whole record, 2/3/4 its first/middle/last part.
Used to continue the step count of a resumed offline run (`runs.RunWandbLogger`) and by the tests.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_HEADER = b":W&B"
_HEADER_SIZE = 7
_BLOCK = 32 * 1024
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> Iterator[bytes]:
    """The records' bytes; a record cut short by a kill (the file's last one) is dropped."""
    offset, parts = _HEADER_SIZE, []
    while offset + _CHUNK_HEADER <= len(data):
        room = _BLOCK - offset % _BLOCK
        if room < _CHUNK_HEADER:  # a block's tail too short for a chunk header is padding
            offset += room
            continue
        length, kind = struct.unpack_from("<HB", data, offset + 4)
        if kind == 0 and length == 0:  # zero padding (preallocated or a torn tail)
            offset += room
            continue
        start = offset + _CHUNK_HEADER
        if start + length > len(data):
            return
        chunk = data[start : start + length]
        offset = start + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            parts = [chunk]
        elif kind == _MIDDLE:
            parts.append(chunk)
        elif kind == _LAST:
            yield b"".join([*parts, chunk])
            parts = []


def read_records(path: Path) -> list[Any]:
    """Every record of one `.wandb` file as `wandb.proto.wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if not data.startswith(_HEADER):
        raise ValueError(f"{path} is not a W&B run file (no {_HEADER!r} header)")
    records = []
    for payload in _payloads(data):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def history(path: Path) -> list[dict[str, Any]]:
    """The history rows of one run file: `{key: value}` with `_step`, in the order they were written."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def exit_code(path: Path) -> int | None:
    """The exit code the run file records (`wandb.finish(exit_code=...)`), None if it never finished."""
    codes = [r.exit.exit_code for r in read_records(path) if r.WhichOneof("record_type") == "exit"]
    return codes[-1] if codes else None


def config(path: Path) -> dict[str, Any]:
    """The run's config as W&B holds it: `{key: value}` after every config update in the file."""
    merged: dict[str, Any] = {}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind not in ("run", "config"):
            continue
        record_config = record.run.config if kind == "run" else record.config
        for item in record_config.update:
            merged[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        for item in record_config.remove:
            merged.pop(item.key or "/".join(item.nested_key), None)
    merged.pop("_wandb", None)
    return merged


def offline_run_files(wandb_dir: Path, run_id: str) -> list[Path]:
    """The `.wandb` files of every offline segment of run `run_id` under `wandb_dir`, oldest first."""
    return sorted(Path(wandb_dir).glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))


def last_step(wandb_dir: Path, run_id: str) -> int | None:
    """The largest `_step` any offline segment of `run_id` wrote, None when there is none."""
    steps = [row["_step"] for path in offline_run_files(wandb_dir, run_id) for row in history(path)]
    steps = [s for s in steps if isinstance(s, int)]
    return max(steps) if steps else None
