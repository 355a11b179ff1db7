"""The dataset on disk: `ToyWorldSpec`, folders, manifests, locking and atomic (re)generation.

Layout written by `generate_toy_world` (see the forgelab README)::

    <root>/toy_world.json                          spec, version, counts, catalogue, content hash (written last)
    <root>/parts/<split>/<subclass_dir>/<id>.png   split in train/val/test; subclass_dir = "<type>__<name>"
    <root>/parts/manifest.jsonl                    one record per image (path relative to <root>/parts)
    <root>/realfake/<split>/<generator>/0_real/<id>.png and 1_fake/<id>.png   (CNNDetection layout)
    <root>/realfake/<split>.csv                    path,label,generator,caption,subclass (path relative to realfake/)
    <root>/realfake/<split>.jsonl                  the same plus boxes, phrases, attributes and the scene

Determinism: each image draws from its own `np.random.Generator(PCG64)` seeded by (spec.seed, kind, split,
generator or subclass, index); the global RNGs are never used, PNGs are written with fixed options, and
the result does not depend on the number of worker processes.

Generation writes into a temporary sibling directory and `os.replace`s it into place under a file lock, so
a crash never leaves a half-written world and concurrent callers (DDP ranks, test workers) generate it once.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.data.toy_world.catalogue import CATALOGUE, PART_TYPES, SUBCLASS_IDS, get_subtype
from common.data.toy_world.generators import _FAKE_RENDERERS, GENERATOR_DESCRIPTIONS
from common.data.toy_world.rendering import render_scene, scene_annotations
from common.data.toy_world.scenes import sample_scene

LOGGER = logging.getLogger("forgelab.toy_world")
# Bump when the drawing code (catalogue, geometry, valves, scenes, rendering, generators) changes what a spec
# produces: the spec hash includes it, so cached worlds written by older code are regenerated instead of
# silently mixed with new ones.
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
META_FILE = "toy_world.json"
CSV_HEADER = ("path", "label", "generator", "caption", "subclass")
REAL_DIR, FAKE_DIR = "0_real", "1_fake"


@dataclass(frozen=True)
class ToyWorldSpec:
    """Every parameter of a toy world; its hash names the cached copy on disk.

    parts_*: images per subclass per split of the fine-grained set. realfake_*: real AND fake images per
    generator per split (each count is per label). supersample: anti-aliasing factor of the renderer.
    """

    image_size: int = 256
    supersample: int = 2
    parts_train: int = 10
    parts_val: int = 3
    parts_test: int = 3
    generators: tuple[str, ...] = ("toy_gan", "toy_ldm")
    realfake_train: int = 48
    realfake_val: int = 16
    realfake_test: int = 24
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "generators", tuple(self.generators))  # configs pass lists
        if self.image_size < 32 or self.image_size % 8:
            raise ValueError(
                f"image_size must be a multiple of 8 and >= 32 (toy_ldm's 8x latent), got {self.image_size}"
            )
        if not 1 <= self.supersample <= 4:
            raise ValueError(f"supersample must be 1-4, got {self.supersample}")
        counts = (
            self.parts_train,
            self.parts_val,
            self.parts_test,
            self.realfake_train,
            self.realfake_val,
            self.realfake_test,
        )
        if min(counts) < 0 or self.seed < 0:
            raise ValueError(f"counts and seed must be >= 0: {self}")
        unknown = sorted(set(self.generators) - set(_FAKE_RENDERERS))
        if unknown or len(set(self.generators)) != len(self.generators):
            raise ValueError(
                f"generators must be distinct names from {sorted(_FAKE_RENDERERS)}, got {self.generators}"
            )

    def parts_count(self, split: str) -> int:
        return {"train": self.parts_train, "val": self.parts_val, "test": self.parts_test}[split]

    def realfake_count(self, split: str) -> int:
        return {"train": self.realfake_train, "val": self.realfake_val, "test": self.realfake_test}[split]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["generators"] = list(self.generators)
        return d

    def spec_hash(self) -> str:
        """Hash of the spec and FORMAT_VERSION: a different hash means a different world on disk."""
        payload = json.dumps({"format_version": FORMAT_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _Task:
    kind: str  # "parts", "real" or "fake"
    split: str
    group: str  # subclass for parts, generator for realfake
    index: int
    path: str  # relative to the sub-root (parts/ or realfake/)


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    entropy = [seed] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def _tasks(spec: ToyWorldSpec) -> list[_Task]:
    tasks = []
    for split in SPLITS:
        for st in CATALOGUE:
            for i in range(spec.parts_count(split)):
                tasks.append(_Task("parts", split, st.subclass, i, f"{split}/{st.subclass_dir}/{i:05d}.png"))
    for split in SPLITS:
        for gen in spec.generators:
            for kind, label_dir in (("real", REAL_DIR), ("fake", FAKE_DIR)):
                for i in range(spec.realfake_count(split)):
                    tasks.append(_Task(kind, split, gen, i, f"{split}/{gen}/{label_dir}/{i:05d}.png"))
    return tasks


def _write_png(img: Image.Image, path: Path) -> None:
    # Fixed options and no metadata chunks: identical pixels give identical bytes. Sensor noise does not
    # compress anyway: level 1 is twice as fast as the default 6 for 12 % more bytes.
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", compress_level=1)


def _run_task(task: _Task, spec: ToyWorldSpec, root: str) -> dict[str, Any]:
    """Render one image, write it under `root`, and return its manifest record."""
    size = spec.image_size
    if task.kind == "parts":
        subtype = get_subtype(task.group)
        rng = _rng(spec.seed, "parts", task.split, task.group, task.index)
    else:
        rng = _rng(spec.seed, "realfake", task.split, task.group, task.kind, task.index)
        subtype = CATALOGUE[int(rng.integers(len(CATALOGUE)))]
    scene = sample_scene(subtype, rng)
    if task.kind == "fake":
        img = _FAKE_RENDERERS[task.group](scene, size, spec.supersample)
        boxes, phrases, caption = scene_annotations(scene, size)
    else:
        img, boxes, phrases, caption = render_scene(scene, size, supersample=spec.supersample)
    sub_root = "parts" if task.kind == "parts" else "realfake"
    _write_png(img, Path(root) / sub_root / task.path)
    record: dict[str, Any] = {"path": task.path}
    if task.kind != "parts":
        record.update(label=int(task.kind == "fake"), generator=task.group)
    record.update(
        caption=caption,
        subclass=subtype.subclass,
        subclass_id=SUBCLASS_IDS[subtype.subclass],
        part_type=subtype.part_type,
        attributes=subtype.attributes(),
        boxes=boxes,
        phrases=phrases,
        split=task.split,
        width=img.width,
        height=img.height,
        scene=scene.to_dict(),
    )
    return record


def _run_task_packed(args: tuple[_Task, ToyWorldSpec, str]) -> dict[str, Any]:
    return _run_task(*args)


def _default_workers(n_tasks: int) -> int:
    # Starting workers costs more than rendering a small world.
    if n_tasks < 96:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8))


def _content_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != META_FILE):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def _write_world(tmp: Path, spec: ToyWorldSpec, num_workers: int | None) -> dict[str, Any]:
    """Write the whole world into `tmp`; toy_world.json last. Returns the metadata."""
    tasks = _tasks(spec)
    workers = _default_workers(len(tasks)) if num_workers is None else max(1, num_workers)
    jobs = [(t, spec, str(tmp)) for t in tasks]
    if workers == 1:
        records = [_run_task_packed(j) for j in jobs]
    else:
        # fork on Linux: a spawned worker would re-import the caller's heavy modules (torch, lightning) for
        # seconds; the workers only run numpy and PIL, as DataLoader workers forked the same way do.
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        with multiprocessing.get_context(method).Pool(workers) as pool:
            records = pool.map(_run_task_packed, jobs, chunksize=max(1, len(jobs) // (workers * 8)))
    parts = [r for t, r in zip(tasks, records) if t.kind == "parts"]
    (tmp / "parts").mkdir(parents=True, exist_ok=True)  # also when a spec asks for no parts images
    _write_jsonl(tmp / "parts" / "manifest.jsonl", parts)
    counts: dict[str, Any] = {
        "parts": {},
        "realfake": {},
        "subclasses": len(CATALOGUE),
        "images": len(records),
    }
    for split in SPLITS:
        counts["parts"][split] = sum(r["split"] == split for r in parts)
        rf = [r for t, r in zip(tasks, records) if t.kind != "parts" and t.split == split]
        (tmp / "realfake").mkdir(parents=True, exist_ok=True)
        _write_jsonl(tmp / "realfake" / f"{split}.jsonl", rf)
        with open(tmp / "realfake" / f"{split}.csv", "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(CSV_HEADER)
            for r in rf:
                writer.writerow([r["path"], r["label"], r["generator"], r["caption"], r["subclass"]])
        counts["realfake"][split] = {
            g: {
                "real": sum(r["generator"] == g and r["label"] == 0 for r in rf),
                "fake": sum(r["generator"] == g and r["label"] == 1 for r in rf),
            }
            for g in spec.generators
        }
    meta = {
        "name": "forgelab toy world",
        "format_version": FORMAT_VERSION,
        "spec": spec.to_dict(),
        "spec_hash": spec.spec_hash(),
        "counts": counts,
        "subclasses": [
            {"id": i, "subclass": s.subclass, "dir": s.subclass_dir, **s.attributes()}
            for i, s in enumerate(CATALOGUE)
        ],
        "part_types": sorted(PART_TYPES),
        "generators": {g: GENERATOR_DESCRIPTIONS[g] for g in spec.generators},
        "content_hash": _content_hash(tmp),
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Exclusive fcntl lock on a file next to root; a second process waits here until the first is done."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            LOGGER.info("waiting for another process writing the toy world at %s", root)
            t0 = time.monotonic()
            fcntl.flock(fh, fcntl.LOCK_EX)
            LOGGER.info("lock on %s acquired after %.1f s", root, time.monotonic() - t0)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_meta(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_current(root: Path, spec: ToyWorldSpec) -> bool:
    meta = _read_meta(root)
    return meta is not None and meta.get("spec_hash") == spec.spec_hash()


def _generate_locked(root: Path, spec: ToyWorldSpec, num_workers: int | None) -> Path:
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not (root / META_FILE).exists())):
        # Never delete what we did not write: a complete toy world always has its toy_world.json.
        raise FileExistsError(
            f"{root} exists and is not a toy world (no {META_FILE}); refusing to replace it"
        )
    for stale in root.parent.glob(f".{root.name}.tmp-*"):  # left by a killed process; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.parent.glob(f".{root.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = root.parent / f".{root.name}.tmp-{tag}"
    tmp.mkdir()
    t0 = time.monotonic()
    try:
        meta = _write_world(tmp, spec, num_workers)
        old = root.parent / f".{root.name}.old-{tag}"
        if root.exists():
            os.replace(root, old)
        try:
            os.replace(tmp, root)
        except BaseException:
            if old.exists():
                os.replace(old, root)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    LOGGER.info(
        "generated toy world at %s: %d images, spec %s, in %.1f s",
        root,
        meta["counts"]["images"],
        meta["spec_hash"],
        time.monotonic() - t0,
    )
    return root


def generate_toy_world(
    root: str | Path, spec: ToyWorldSpec = ToyWorldSpec(), num_workers: int | None = None
) -> Path:
    """(Re)generate the toy world at `root`, replacing any previous one atomically.

    Written into a temporary sibling directory, then `os.replace`d into place: a crash or Ctrl-C never
    leaves a half-written world (an older complete world stays where it was). `num_workers` processes
    render in parallel (default: 1 for small worlds, else the available cores); the output is the same.
    """
    root = Path(root)
    with _locked(root):
        return _generate_locked(root, spec, num_workers)


def ensure_toy_world(
    root: str | Path = "data/toy_world", spec: ToyWorldSpec = ToyWorldSpec(), num_workers: int | None = None
) -> Path:
    """Return `root`, generating the toy world first if it is missing or was written from another spec.

    Safe under concurrency (DDP ranks, parallel test workers): the check-and-generate runs under a file
    lock next to root, so a second caller waits and then finds the world done.
    """
    root = Path(root)
    if _is_current(root, spec):
        LOGGER.info("toy world at %s is up to date (spec %s)", root, spec.spec_hash())
        return root
    with _locked(root):
        if _is_current(root, spec):
            LOGGER.info("toy world at %s was generated by another process (spec %s)", root, spec.spec_hash())
            return root
        reason = "missing" if _read_meta(root) is None else "written from another spec"
        LOGGER.info("toy world at %s is %s: generating (spec %s)", root, reason, spec.spec_hash())
        return _generate_locked(root, spec, num_workers)
