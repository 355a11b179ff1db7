"""Captioned fine-grained images: image, attribute caption, subclass label, optional part boxes with phrases.

The record type of the fine-grained guidance generator (captions condition the diffusion model, subclasses
define the contrastive pairs, boxes/phrases give part-level detail) and of ITEM's oracle captions and boxes.
Read from a JSONL manifest, one object per image:

    {"path": "train/ball__brass_red_lever/00000.png", "caption": "...", "subclass": "ball/brass_red_lever",
     "split": "train", "boxes": [[x0, y0, x1, y1], ...], "phrases": ["red lever handle", ...], ...}

`path` is relative to the manifest's folder. `subclass_id` is taken from the manifest when present, else
assigned by sorted subclass name; the mapping is kept on the dataset (`classes`) so predictions can be named.
Boxes are in pixels of the stored image and are transformed with the image (resize, flip, rotation).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors

from common.data.collate import collate_with_skips
from common.data.images import ImageDecodeError, SkipLog, load_rgb
from common.data.samples import DatasetLayoutError
from common.transforms import AugmentConfig, build_eval_transform, build_train_transform


@dataclass
class CaptionedSample:
    path: str
    caption: str
    subclass: str
    split: str | None = None
    boxes: list[list[float]] = field(default_factory=list)
    phrases: list[str] = field(default_factory=list)
    subclass_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def read_captioned_manifest(path: str | Path, skips: SkipLog | None = None) -> list[CaptionedSample]:
    """Read a JSONL manifest; rows whose file is missing or empty are skipped and counted; bad rows are errors."""
    path = Path(path)
    skips = skips or SkipLog(str(path))
    if not path.is_file():
        raise DatasetLayoutError(f"captioned manifest {path} does not exist")
    samples = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetLayoutError(f"{where}: invalid JSON ({err.msg})") from None
            for key in ("path", "caption", "subclass"):
                if key not in row:
                    raise DatasetLayoutError(f"{where}: missing {key!r}")
            boxes, phrases = row.get("boxes") or [], row.get("phrases") or []
            if len(boxes) != len(phrases):
                raise DatasetLayoutError(f"{where}: {len(boxes)} boxes but {len(phrases)} phrases")
            if any(len(b) != 4 for b in boxes):
                raise DatasetLayoutError(f"{where}: boxes must be [x0, y0, x1, y1]")
            file = Path(row["path"]) if Path(row["path"]).is_absolute() else path.parent / row["path"]
            if not file.is_file():
                skips.record(file, "missing")
                continue
            if file.stat().st_size == 0:
                skips.record(file, "empty")
                continue
            known = {"path", "caption", "subclass", "split", "boxes", "phrases", "subclass_id"}
            samples.append(
                CaptionedSample(
                    path=str(file),
                    caption=str(row["caption"]),
                    subclass=str(row["subclass"]),
                    split=row.get("split"),
                    boxes=[[float(v) for v in b] for b in boxes],
                    phrases=[str(p) for p in phrases],
                    subclass_id=row.get("subclass_id"),
                    extra={k: v for k, v in row.items() if k not in known},
                )
            )
    return samples


def class_index(samples: Sequence[CaptionedSample]) -> list[str]:
    """Subclass names ordered by id: manifest ids when every sample has one and they agree, else sorted names."""
    ids = {s.subclass: s.subclass_id for s in samples}
    if all(i is not None for i in ids.values()) and len(set(ids.values())) == len(ids):
        return [name for name, _ in sorted(ids.items(), key=lambda kv: kv[1])]
    return sorted(ids)


class CaptionedDataset(Dataset):
    """Items: image (3, H, W) in [0, 1], caption, label (subclass id), subclass, boxes (K, 4) in output pixels,
    phrases, path, index. Undecodable files become `skip` records (see `collate_captioned`)."""

    def __init__(
        self,
        samples: Sequence[CaptionedSample],
        classes: Sequence[str],
        transform: Callable[[Any], torch.Tensor] | None = None,
        image_size: int | None = None,
    ) -> None:
        self.samples = list(samples)
        self.classes = list(classes)
        self.class_to_id = {name: i for i, name in enumerate(self.classes)}
        self.image_size = image_size
        self.transform = transform or build_eval_transform(image_size or 256, "resize")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        try:
            pil = load_rgb(sample.path)
        except ImageDecodeError as err:
            return {"skip": err.reason, "path": sample.path}
        # Boxes go through the same (torchvision v2) transform as the image, so flips/rotations/resizes move them too.
        boxes = tv_tensors.BoundingBoxes(
            torch.tensor(sample.boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=pil.size[::-1]
        )
        image, boxes = self.transform(pil, boxes)
        return {
            "image": image,
            "caption": sample.caption,
            "label": self.class_to_id.get(sample.subclass, -1),
            "subclass": sample.subclass,
            "boxes": boxes.as_subclass(torch.Tensor),
            "phrases": list(sample.phrases),
            "path": sample.path,
            "index": index,
        }


def collate_captioned(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images and labels; keep captions, boxes and phrases as per-image lists; report skipped files."""
    lists = ("caption", "subclass", "boxes", "phrases", "path")
    return collate_with_skips(items, {"image": (3, 1, 1)}, {"label": torch.long, "index": torch.long}, lists)


class CaptionedParts(L.LightningDataModule):
    """Fine-grained captioned images from a JSONL manifest with a `split` column (the toy world's
    `parts/manifest.jsonl`), or from separate manifests per split.

    Args:
        manifest: JSONL with train/val/test rows distinguished by `split`.
        train_manifest / val_manifest / test_manifest: separate manifests (override `manifest` for that split).
        image_size: square output side (resize; boxes are rescaled with it).
        augment: training augmentation (common.transforms.AugmentConfig); None disables it.
        extra_train_manifests: more training rows (e.g. a generated augmentation set), appended to train.
        toy_world: generate the embedded toy world at this path first if missing.
    """

    def __init__(
        self,
        manifest: str | None = None,
        train_manifest: str | None = None,
        val_manifest: str | None = None,
        test_manifest: str | None = None,
        extra_train_manifests: list[str] | None = None,
        image_size: int = 224,
        augment: AugmentConfig | None = None,
        batch_size: int = 32,
        num_workers: int = 4,
        toy_world: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not manifest and not train_manifest:
            raise ValueError("set data.init_args.manifest (with a split column) or data.init_args.train_manifest")
        self.save_hyperparameters(logger=False)  # loggers get the whole config once (RunConfigCallback)
        self.manifest, self.toy_world = manifest, toy_world
        self.split_manifests = {"train": train_manifest, "val": val_manifest, "test": test_manifest}
        self.extra_train_manifests = list(extra_train_manifests or [])
        self.image_size, self.augment = image_size, augment
        self.batch_size, self.num_workers = batch_size, num_workers
        self.skips = SkipLog("CaptionedParts")
        self.samples: dict[str, list[CaptionedSample]] = {}
        self.classes: list[str] = []

    def prepare_data(self) -> None:
        if self.toy_world:
            from common.data.toy_world import ensure_toy_world

            ensure_toy_world(self.toy_world)

    def setup(self, stage: str | None = None) -> None:
        if self.samples:
            return
        self.prepare_data()  # idempotent and lock-protected: every DDP rank may call it
        shared = read_captioned_manifest(self.manifest, self.skips) if self.manifest else []
        for split in ("train", "val", "test"):
            own = self.split_manifests[split]
            rows = read_captioned_manifest(own, self.skips) if own else [s for s in shared if s.split == split]
            if rows:
                self.samples[split] = rows
        for extra in self.extra_train_manifests:
            self.samples.setdefault("train", []).extend(read_captioned_manifest(extra, self.skips))
        if "train" not in self.samples:
            raise DatasetLayoutError(f"no training rows in {self.manifest or self.split_manifests['train']}")
        self.classes = class_index([s for rows in self.samples.values() for s in rows])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def has_split(self, split: str) -> bool:
        return split in self.samples or bool(self.split_manifests.get(split)) or bool(self.manifest)

    def skip_summary(self) -> dict[str, int]:
        return self.skips.summary()

    def dataset(self, split: str) -> CaptionedDataset:
        if split not in self.samples:
            raise DatasetLayoutError(f"no {split} rows: add a '{split}' split to the manifest or set {split}_manifest")
        train = split == "train"
        transform = (
            build_train_transform(self.image_size, "resize", self.augment)
            if train
            else build_eval_transform(self.image_size, "resize")
        )
        return CaptionedDataset(self.samples[split], self.classes, transform, self.image_size)

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=split == "train",
            num_workers=self.num_workers,
            collate_fn=collate_captioned,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
