"""`InpaintingImages`: images + hole masks for training and validating the inpainters.

The inpainters of the paper are trained on real photographs only (Liu et al.: Places2/CelebA/ImageNet; DeepFill
v2: Places2/CelebA-HQ), and that is the premise of the probe: models trained on real data meet generated data at
test time. On the toy world the training images are the real renders of `parts/` (the real half of `realfake/` is
drawn from the same renderer and is what the probe tests on).

Batches are dicts: image (B, 3, S, S) in [0, 1], hole (B, 1, S, S) with 1 in the hole, hole_ratio (B,), index,
path, and `skipped` (list of (path, reason)) for files that failed to decode, which DataHealthCallback counts.
Training masks are fresh every time (drawn from torch's RNG, so `seed_everything` and the worker seeds fix
them); validation and test masks are a function of (mask_seed, split, index): the same every epoch and run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from common.data.collate import collate_with_skips
from common.data.images import ImageDecodeError, SkipLog, is_image_file, load_rgb
from common.data.realfake import stratified_split
from common.data.samples import DatasetLayoutError, Sample
from projects.inpaint_probe.masks import MaskConfig, hole_ratio, mask_rng, sample_mask, to_tensor

log = logging.getLogger("forgelab.data")

FitMode = Literal["crop", "resize"]


def index_images(roots: str | Sequence[str], skips: SkipLog) -> list[Sample]:
    """Every image file under each root (recursive, sorted); a missing or image-less root is a clear error."""
    roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
    if not roots:
        raise DatasetLayoutError("an empty list of image folders was given")
    samples: list[Sample] = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise DatasetLayoutError(
                f"image folder {root} does not exist or is not a folder (cwd: {Path.cwd()})"
            )
        found = 0
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if not is_image_file(name):
                    skips.record(path, "not_an_image_extension")
                elif path.stat().st_size == 0:
                    skips.record(path, "empty")
                else:
                    samples.append(Sample(str(path), -1, root.name))
                    found += 1
        if not found:
            raise DatasetLayoutError(f"no images (.png .jpg .jpeg .webp .bmp) under {root}")
    return samples


def fit_image(image: Image.Image, size: int, mode: FitMode, train: bool) -> torch.Tensor:
    """PIL RGB -> (3, size, size) float in [0, 1].

    "crop" keeps the pixels as they are (a random crop for training, the centre crop otherwise; images smaller
    than `size` are reflect-padded), which is what an inpainter sees at its native resolution. "resize" rescales
    the whole image.
    """
    if size <= 0:
        raise ValueError(f"image_size must be positive, got {size}")
    ops: list[Any] = [v2.ToImage()]
    if mode == "resize":
        ops.append(v2.Resize((size, size), antialias=True))
    elif mode == "crop":
        width, height = image.size
        if width < size or height < size:
            pad_w, pad_h = max(0, size - width), max(0, size - height)
            # reflect padding needs the image to be larger than the pad; tiny images fall back to edge padding
            pad_mode = "reflect" if pad_w < width and pad_h < height else "edge"
            ops.append(
                v2.Pad(
                    [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], padding_mode=pad_mode
                )
            )
        ops.append(v2.RandomCrop(size) if train else v2.CenterCrop(size))
        if train:
            ops.append(v2.RandomHorizontalFlip())
    else:
        raise ValueError(f"fit mode must be crop or resize, got {mode!r}")
    ops.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(ops)(image)


class InpaintingDataset(Dataset):
    """Decodes lazily; a file that fails to decode becomes a `skip` record, never an exception."""

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int,
        fit: FitMode,
        mask: MaskConfig,
        train: bool,
        mask_seed: int = 0,
        split: str = "val",
    ) -> None:
        self.samples = list(samples)
        self.image_size, self.fit, self.mask, self.train = image_size, fit, mask, train
        self.mask_seed, self.split = mask_seed, split

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        try:
            image = fit_image(load_rgb(sample.path), self.image_size, self.fit, self.train)
        except ImageDecodeError as err:
            return {"skip": err.reason, "path": sample.path}
        if self.train:  # torch's RNG: seeded by seed_everything and Lightning's worker seeding
            rng = mask_rng(int(torch.randint(0, 2**62, ()).item()))
        else:
            rng = mask_rng(self.mask_seed, self.split, index)
        hole = to_tensor(sample_mask(self.image_size, self.image_size, self.mask, rng))
        return {
            "image": image,
            "hole": hole,
            "hole_ratio": hole_ratio(hole),
            "index": index,
            "path": sample.path,
        }


def collate_inpainting(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the decodable items; report the others under `skipped`."""
    stacked = {"image": (3, 1, 1), "hole": (1, 1, 1)}
    return collate_with_skips(items, stacked, {"hole_ratio": torch.float32, "index": torch.long}, ("path",))


class InpaintingImages(L.LightningDataModule):
    """Folders of (real) images, with masks drawn per `mask` (training) and `eval_mask` (validation/test).

    Args:
        train_root: folder(s) of training images (recursive). Validation comes from `val_root`, or from a
            deterministic `val_fraction` of train_root.
        val_root, test_root: folder(s) of validation/test images.
        image_size: side of the square crops (Liu et al.: 512; DeepFill v2: 256).
        fit: "crop" (native pixels, random crop when training) or "resize".
        mask: training masks (DeepFill v2 trains on free-form strokes united with a rectangle).
        eval_mask: validation/test masks (default: the training kind), fixed by `mask_seed`.
        toy_world: when set, the embedded toy world is generated at this path if missing.
    """

    def __init__(
        self,
        train_root: str | list[str] | None = None,
        val_root: str | list[str] | None = None,
        test_root: str | list[str] | None = None,
        image_size: int = 256,
        fit: FitMode = "crop",
        mask: MaskConfig | None = None,
        eval_mask: MaskConfig | None = None,
        mask_seed: int = 0,
        val_fraction: float = 0.1,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        split_seed: int = 0,
        toy_world: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        if fit not in ("crop", "resize"):
            raise ValueError(f"fit must be crop or resize, got {fit!r}")
        self.save_hyperparameters(logger=False)  # loggers get the whole config once (RunConfigCallback)
        self.train_root, self.val_root, self.test_root = train_root, val_root, test_root
        self.image_size, self.fit = image_size, fit
        self.mask = mask or MaskConfig()
        self.eval_mask = eval_mask or self.mask
        self.mask_seed, self.val_fraction, self.split_seed = mask_seed, val_fraction, split_seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.toy_world = toy_world
        self.skips = SkipLog("InpaintingImages")
        self.samples: dict[str, list[Sample]] = {}

    def prepare_data(self) -> None:
        if self.toy_world:
            from common.data.toy_world import ensure_toy_world

            ensure_toy_world(self.toy_world)

    def setup(self, stage: str | None = None) -> None:
        if self.samples:
            return
        self.prepare_data()  # other ranks: the toy world's lock makes this a wait, not a second generation
        if self.train_root:
            train = index_images(self.train_root, self.skips)
            if self.val_root:
                self.samples["train"], self.samples["val"] = train, index_images(self.val_root, self.skips)
            else:
                self.samples["train"], self.samples["val"] = stratified_split(
                    train, self.val_fraction, self.split_seed
                )
        if self.test_root:
            self.samples["test"] = index_images(self.test_root, self.skips)
        for split, members in self.samples.items():
            log.info("InpaintingImages %s: %d images", split, len(members))

    def has_split(self, split: str) -> bool:
        root = {"train": self.train_root, "val": self.train_root, "test": self.test_root}
        return bool(root.get(split))

    def skip_summary(self) -> dict[str, int]:
        return self.skips.summary()

    def _loader(self, split: str) -> DataLoader:
        if split not in self.samples:
            arg = {"train": "train_root", "val": "train_root", "test": "test_root"}.get(split, split)
            raise DatasetLayoutError(f"no {split} data: set data.init_args.{arg} in the config")
        train = split == "train"
        dataset = InpaintingDataset(
            self.samples[split],
            self.image_size,
            self.fit,
            self.mask if train else self.eval_mask,
            train=train,
            mask_seed=self.mask_seed,
            split=split,
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            num_workers=self.num_workers,
            collate_fn=collate_inpainting,
            drop_last=False,
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
