"""Indexing real/generated image collections into `Sample` records.

Two on-disk conventions are supported, the ones the field uses:

* the CNNDetection / UniversalFakeDetect folder layout `<root>/<generator>/[<class>/]0_real|1_fake/<images>`;
* a manifest (GRIP style) in CSV or JSONL with columns `path,label,generator[,caption][,subclass]` (JSONL may add
  `boxes` and `phrases`). Paths are relative to the manifest's folder unless absolute. `label` is 0/1 or
  real/fake (or a generator name, meaning fake, as GRIP's `typ` column).

Indexing never decodes images; it only checks names and sizes. Decoding failures are handled at load time.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from common.data.images import SkipLog, is_image_file
from common.errors import ForgelabError

log = logging.getLogger("forgelab.data")

REAL_DIR, FAKE_DIR = "0_real", "1_fake"
_MISNAMED = {"real", "fake", "0real", "1fake", "0-real", "1-fake", "reals", "fakes", "generated", "synthetic", "natural"}


@dataclass
class Sample:
    """One image and what is known about it. `label` is 0 real, 1 generated, -1 unknown (prediction)."""

    path: str
    label: int
    generator: str
    caption: str | None = None
    subclass: str | None = None
    boxes: list[list[float]] | None = None
    phrases: list[str] | None = None
    extra: dict = field(default_factory=dict)


class DatasetLayoutError(ForgelabError, ValueError):
    """The folder or manifest does not hold what the config says it holds."""


def index_source(source: str | Path, skips: SkipLog | None = None) -> list[Sample]:
    """Index a CNNDetection-style folder or a .csv/.jsonl manifest; errors name the path and what was expected.

    `<name>=<folder>` declares the folder to hold ONE generator called `name`, whose sub-folders are classes
    (CNNDetection's training folder: `progan=dataset/train` with `dataset/train/<class>/0_real|1_fake`).
    """
    generator = None
    if isinstance(source, str) and "=" in source and not Path(source).exists():
        generator, _, source = source.partition("=")
    source = Path(source)
    skips = skips or SkipLog(str(source))
    if not source.exists():
        raise DatasetLayoutError(f"data source {source} does not exist (cwd: {Path.cwd()})")
    if source.is_file():
        if source.suffix.lower() not in (".csv", ".jsonl"):
            raise DatasetLayoutError(f"{source}: a manifest must be .csv or .jsonl, got {source.suffix!r}")
        samples = read_manifest(source, skips)
    else:
        samples = index_realfake_folder(source, skips, generator=generator)
    if not samples:
        raise DatasetLayoutError(f"no usable images found in {source} ({skips.summary() or 'nothing to index'})")
    return samples


def index_realfake_folder(
    root: str | Path, skips: SkipLog | None = None, generator: str | None = None
) -> list[Sample]:
    """Walk `<root>/<generator>/[<class>/]0_real|1_fake/*`.

    `root` may also be a single generator folder (`<root>/0_real`, `<root>/1_fake`), whose name is then the
    generator. With `generator` given, the whole root is that generator and its first-level folders are classes.
    Files are sorted so the index, and hence any split of it, is the same on every machine.
    """
    root = Path(root)
    skips = skips or SkipLog(str(root))
    label_dirs: list[Path] = []
    for dirpath, dirnames, _ in os.walk(root, followlinks=True):
        dirnames.sort()
        here = Path(dirpath)
        if here.name in (REAL_DIR, FAKE_DIR):
            label_dirs.append(here)
            dirnames.clear()  # images live directly inside; nested label dirs are not a layout we define
        elif len(here.relative_to(root).parts) >= 4:
            dirnames.clear()
    if not label_dirs:
        _raise_layout_error(root)

    samples: list[Sample] = []
    for label_dir in label_dirs:
        relative = label_dir.relative_to(root).parts
        label = 0 if label_dir.name == REAL_DIR else 1
        if generator is not None:
            sample_generator, class_name = generator, (relative[0] if len(relative) > 1 else None)
        else:
            sample_generator = relative[0] if len(relative) > 1 else root.name
            class_name = relative[1] if len(relative) > 2 else None
        for entry in sorted(os.scandir(label_dir), key=lambda e: e.name):
            if not entry.is_file(follow_symlinks=True):
                continue
            if not is_image_file(entry.name):
                skips.record(entry.path, "not_an_image_extension")
                continue
            if entry.stat().st_size == 0:
                skips.record(entry.path, "empty")
                continue
            samples.append(Sample(entry.path, label, sample_generator, subclass=class_name))
    return samples


def _raise_layout_error(root: Path) -> None:
    names = sorted(p.name for p in root.rglob("*") if p.is_dir()) if root.is_dir() else []
    misnamed = sorted({n for n in names if n.lower() in _MISNAMED})
    hint = (
        f" Found folders named {misnamed}: rename them to {REAL_DIR!r} and {FAKE_DIR!r}."
        if misnamed
        else " Expected <root>/<generator>/[<class>/]0_real|1_fake/<images> or a .csv/.jsonl manifest."
    )
    if not names and root.is_dir() and not any(root.iterdir()):
        raise DatasetLayoutError(f"{root} is empty.{hint}")
    raise DatasetLayoutError(f"no {REAL_DIR}/{FAKE_DIR} folders under {root}.{hint}")


def _parse_label(value: object, where: str) -> tuple[int, str | None]:
    """Returns (label, generator implied by the label column or None)."""
    text = str(value).strip()
    lowered = text.lower()
    if lowered in ("0", "real", "0_real", "natural"):
        return 0, None
    if lowered in ("1", "fake", "1_fake", "generated", "synthetic"):
        return 1, None
    if lowered in ("-1", "", "unknown", "none"):
        return -1, None
    if lowered.replace(".", "", 1).isdigit():
        raise DatasetLayoutError(f"{where}: label {text!r} is not 0 or 1")
    return 1, text  # GRIP convention: the label column names the generator of a fake image


def read_manifest(path: str | Path, skips: SkipLog | None = None) -> list[Sample]:
    """Read a CSV or JSONL manifest (see module docstring)."""
    path = Path(path)
    skips = skips or SkipLog(str(path))
    base = path.parent
    rows: list[tuple[int, dict]] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise DatasetLayoutError(f"{path}: CSV header must contain 'path' (got {reader.fieldnames})")
            if "label" not in reader.fieldnames and "typ" not in reader.fieldnames:
                raise DatasetLayoutError(f"{path}: CSV header must contain 'label' (or GRIP's 'typ')")
            rows = [(i + 2, row) for i, row in enumerate(reader)]
    else:
        with open(path, encoding="utf-8") as handle:
            for i, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append((i, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise DatasetLayoutError(f"{path}:{i}: invalid JSON ({err.msg})") from None

    samples: list[Sample] = []
    for line_no, row in rows:
        where = f"{path}:{line_no}"
        raw_path = row.get("path") or row.get("filename")
        if not raw_path:
            raise DatasetLayoutError(f"{where}: missing 'path'")
        file_path = Path(raw_path) if os.path.isabs(raw_path) else base / raw_path
        label, implied_generator = _parse_label(row.get("label", row.get("typ", "")), where)
        generator = str(row.get("generator") or implied_generator or ("real" if label == 0 else "unknown"))
        if not is_image_file(file_path):
            skips.record(file_path, "not_an_image_extension")
            continue
        if not file_path.is_file():
            skips.record(file_path, "missing")
            continue
        if file_path.stat().st_size == 0:
            skips.record(file_path, "empty")
            continue
        boxes = row.get("boxes")
        phrases = row.get("phrases")
        if boxes is not None and phrases is not None and len(boxes) != len(phrases):
            raise DatasetLayoutError(f"{where}: {len(boxes)} boxes but {len(phrases)} phrases")
        known = {"path", "filename", "label", "typ", "generator", "caption", "subclass", "boxes", "phrases"}
        samples.append(
            Sample(
                str(file_path),
                label,
                generator,
                caption=(row.get("caption") or None),
                subclass=(row.get("subclass") or None),
                boxes=boxes,
                phrases=phrases,
                extra={k: v for k, v in row.items() if k not in known},
            )
        )
    return samples


def index_image_folder(root: str | Path, skips: SkipLog | None = None) -> list[Sample]:
    """Every image under `root` (recursive), for prediction. Labels come from 0_real/1_fake parents when present."""
    root = Path(root)
    skips = skips or SkipLog(str(root))
    if not root.exists():
        raise DatasetLayoutError(f"prediction folder {root} does not exist")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    samples = []
    for file in files:
        if not is_image_file(file):
            skips.record(file, "not_an_image_extension")
            continue
        if file.stat().st_size == 0:
            skips.record(file, "empty")
            continue
        parents = [p.name for p in file.relative_to(root).parents] if file != root else []
        label = 0 if REAL_DIR in parents else 1 if FAKE_DIR in parents else -1
        rel = file.relative_to(root).parts if file != root else (file.name,)
        generator = rel[0] if len(rel) > 1 and rel[0] not in (REAL_DIR, FAKE_DIR) else root.name
        samples.append(Sample(str(file), label, generator))
    if not samples:
        raise DatasetLayoutError(f"no images ({', '.join(sorted({'.png', '.jpg', '.jpeg', '.webp', '.bmp'}))}) in {root}")
    return samples
