"""`RealFakeFolder`: the real-vs-generated datamodule shared by the classifier and the detectors.

Train and validation come from one root (a separate `val_root`, or a deterministic stratified split of the
training root), test from another; each sample keeps its generator name so test metrics can be reported per
generator and as a mean, the way every paper of the field tabulates them.

Batches are dicts:
    image (B, 3, H, W) float in [0, 1], label (B,) long, generator_id (B,) long, index (B,) long,
    path list[str], and `skipped`: list of (path, reason) for samples of this batch that could not be decoded.
`generator_id` indexes `datamodule.generators`, one sorted vocabulary over all splits, so ids mean the same in
every stage and on every rank.

Robustness (ITEM Fig. 4, CNNDetection): `test_perturbations` gives one test dataloader per condition, clean
first, and `test_conditions` names them for `common.tasks.RealFakeTask`. As for `test_perturbation`, the
perturbation is applied to the image as stored, the field's protocol (CNNDetection; ITEM perturbs the original
image before its preprocessing too): the full decoded image in [0, 1] is perturbed first (JPEG of the whole
image, blur with the image's own borders), then the evaluation resize or crop and, in the model, the
normalisation. Noise is seeded per file path, so every run sees the same pixels.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import pil_to_tensor

from common.data.collate import collate_with_skips
from common.data.images import ImageDecodeError, SkipLog, load_rgb
from common.data.samples import DatasetLayoutError, Sample, index_image_folder, index_source
from common.perturbations import Perturbation, parse_test_conditions
from common.transforms import AugmentConfig, ResizeMode, build_eval_transform, build_train_transform

log = logging.getLogger("forgelab.data")


class RealFakeDataset(Dataset):
    """Decodes `samples` lazily; a file that fails to decode becomes a `skip` record, never an exception."""

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[Any], torch.Tensor],
        generators: Sequence[str],
        perturbation: str | None = None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.generator_index = {name: i for i, name in enumerate(generators)}
        self.perturbation = Perturbation.parse(perturbation)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        try:
            image = load_rgb(sample.path)
        except ImageDecodeError as err:
            return {"skip": err.reason, "path": sample.path}
        if self.perturbation.kind != "none":  # the stored image, before the evaluation geometry
            image = self.perturbation(pil_to_tensor(image).float().div_(255.0), seed_key=sample.path)
        image = self.transform(image)
        return {
            "image": image,
            "label": sample.label,
            "generator_id": self.generator_index.get(sample.generator, -1),
            "index": index,
            "path": sample.path,
        }


def collate_skipping(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the decodable items; report the others under `skipped` so a callback can count them."""
    long = torch.long
    scalars = {"label": long, "generator_id": long, "index": long}
    return collate_with_skips(items, {"image": (3, 1, 1)}, scalars, ("path",))


def index_sources(sources: str | Sequence[str], skips: SkipLog) -> list[Sample]:
    """Index one source or concatenate several (each must hold usable images)."""
    if isinstance(sources, (str, Path)):
        return index_source(sources, skips)
    if not sources:
        raise DatasetLayoutError("an empty list of data roots was given")
    return [sample for source in sources for sample in index_source(source, skips)]


def subsample_per_label(samples: Sequence[Sample], per_label: int, seed: int) -> list[Sample]:
    """At most `per_label` samples of each label, chosen by a hash of (seed, path): deterministic, spread over
    the classes of a folder, and stable when files are added. Keeps the input order."""
    chosen: set[str] = set()
    for label in sorted({s.label for s in samples}):
        members = [s for s in samples if s.label == label]
        ranked = sorted(members, key=lambda s: hashlib.sha1(f"{seed}:{s.path}".encode()).hexdigest())
        chosen |= {s.path for s in ranked[:per_label]}
    return [s for s in samples if s.path in chosen]


def stratified_split(
    samples: Sequence[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Split by a hash of (seed, path) within each (generator, label) stratum: stable when files are added."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    strata: dict[tuple[str, int], list[Sample]] = {}
    for sample in samples:
        strata.setdefault((sample.generator, sample.label), []).append(sample)
    train, val = [], []
    for members in strata.values():
        ranked = sorted(members, key=lambda s: hashlib.sha1(f"{seed}:{s.path}".encode()).hexdigest())
        n_val = max(1, round(len(ranked) * val_fraction)) if len(ranked) > 1 else 0
        val.extend(ranked[:n_val])
        train.extend(ranked[n_val:])
    return train, val


class RealFakeFolder(L.LightningDataModule):
    """Real-vs-generated images from CNNDetection-style folders or CSV/JSONL manifests.

    Args:
        train_root: folder or manifest for training (and validation when `val_root` is None), or a list of them
            (e.g. the toy world plus a generated set written elsewhere); the same for val_root and test_root.
        test_root: folder(s) or manifest(s) for testing; generator sub-folders become the per-generator report.
        val_root: separate validation folder(s)/manifest(s). When None, `val_fraction` of `train_root` is held out.
        predict_root: any folder of images (labels read from 0_real/1_fake parents when present).
        image_size: side of the square network input (the paper: 384 for ConvNeXt-XL).
        resize: "resize" (the paper's choice: whole image rescaled), "center_crop" or "random_crop"
            (CNNDetection's choice: crops keep the generator's pixel statistics).
        augment: training augmentation (paper 003 Sec. 4); None disables it.
        test_perturbation: one condition for val/test/predict, e.g. "jpeg:75" (see common.perturbations): the
            whole evaluation under it, applied to the full stored image before the evaluation resize or crop.
        test_perturbations: the robustness protocol: test conditions, e.g. [none, noise:0.001, ..., jpeg:25]
            (configs/inpaint_probe/data/robustness.yaml); "none" (clean) first and the main test report, each a
            test dataloader of its own; validation and predict stay clean. Not together with
            `test_perturbation` (one is a single evaluation condition, the other the test grid): set one.
        max_train_per_label: train on at most this many real and this many generated images, chosen by a hash
            of (split_seed, path) after the validation split (`subsample_per_label`, ItemFeatures' rule: one
            benchmark can give every detector ITEM's 4,000 + 4,000 ProGAN images); None uses them all.
        toy_world: when set, the embedded toy world is generated at this path if missing before indexing.
    """

    def __init__(
        self,
        train_root: str | list[str] | None = None,
        test_root: str | list[str] | None = None,
        val_root: str | list[str] | None = None,
        predict_root: str | None = None,
        image_size: int = 384,
        resize: ResizeMode = "resize",
        augment: AugmentConfig | None = None,
        test_perturbation: str | None = None,
        test_perturbations: list[str] | None = None,
        val_fraction: float = 0.1,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        split_seed: int = 0,
        max_train_per_label: int | None = None,
        toy_world: str | None = None,
    ) -> None:
        super().__init__()
        if max_train_per_label is not None and max_train_per_label <= 0:
            raise ValueError(f"max_train_per_label must be positive or null, got {max_train_per_label}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        # fail at config time, not at the first test batch
        single = Perturbation.parse(test_perturbation).spec
        if test_perturbations is not None and test_perturbation is not None:
            raise ValueError(
                "set either test_perturbation (one condition for val/test/predict) or test_perturbations "
                f"(the test grid), not both: got {test_perturbation!r} and {test_perturbations!r}"
            )
        conditions = parse_test_conditions(test_perturbations) if test_perturbations is not None else [single]
        self.save_hyperparameters(logger=False)  # loggers get the whole config once (RunConfigCallback)
        self.train_root, self.val_root, self.test_root = train_root, val_root, test_root
        self.predict_root = predict_root
        self.image_size, self.resize = image_size, resize
        self.augment = augment
        self.test_perturbation = test_perturbation
        self.test_conditions = conditions  # one test dataloader each; the first is the main report
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.max_train_per_label = max_train_per_label
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.toy_world = toy_world
        self.skips = SkipLog("RealFakeFolder")
        self.samples: dict[str, list[Sample]] = {}
        self.generators: list[str] = []

    def prepare_data(self) -> None:
        if self.toy_world:
            from common.data.toy_world import ensure_toy_world

            ensure_toy_world(self.toy_world)

    def _index(self) -> None:
        if self.samples:
            return
        if (
            self.toy_world
        ):  # prepare_data runs on rank 0 only; other ranks wait on the same lock-protected call
            from common.data.toy_world import ensure_toy_world

            ensure_toy_world(self.toy_world)
        if self.train_root:
            train = index_sources(self.train_root, self.skips)
            if self.val_root:
                self.samples["train"], self.samples["val"] = train, index_sources(self.val_root, self.skips)
            else:
                self.samples["train"], self.samples["val"] = stratified_split(
                    train, self.val_fraction, self.split_seed
                )
            if not self.samples["train"]:
                raise DatasetLayoutError(
                    f"training set from {self.train_root} is empty after the validation split"
                )
            if self.max_train_per_label:
                before = len(self.samples["train"])
                self.samples["train"] = subsample_per_label(
                    self.samples["train"], self.max_train_per_label, self.split_seed
                )
                log.info(
                    "RealFakeFolder: training on %d of %d images (max_train_per_label)",
                    len(self.samples["train"]),
                    before,
                )
            labels = {s.label for s in self.samples["train"]}
            if labels != {0, 1}:
                raise DatasetLayoutError(
                    f"training data {self.train_root} has labels {sorted(labels)}: both 0_real and 1_fake are needed"
                )
        if self.test_root:
            self.samples["test"] = index_sources(self.test_root, self.skips)
        if self.predict_root:
            self.samples["predict"] = index_image_folder(self.predict_root, self.skips)
        self.generators = sorted({s.generator for split in self.samples.values() for s in split})
        for split, members in self.samples.items():
            per_gen: dict[str, int] = {}
            for s in members:
                per_gen[s.generator] = per_gen.get(s.generator, 0) + 1
            log.info("RealFakeFolder %s: %d images %s", split, len(members), per_gen)
        if self.skips.total:
            log.warning(
                "RealFakeFolder skipped %d files while indexing: %s", self.skips.total, self.skips.summary()
            )

    def setup(self, stage: str | None = None) -> None:
        self._index()

    def has_split(self, split: str) -> bool:
        """Whether the config names data for `split` (train/val come from train_root)."""
        root = {
            "train": self.train_root,
            "val": self.train_root,
            "test": self.test_root,
            "predict": self.predict_root,
        }
        return bool(root.get(split))

    def generator_names(self, split: str) -> list[str]:
        """Sorted generator names present in `split`."""
        return sorted({s.generator for s in self.samples.get(split, [])})

    def skip_summary(self) -> dict[str, int]:
        return self.skips.summary()

    def _dataset(self, split: str, condition: str | None = None) -> RealFakeDataset:
        """The split's dataset; `condition` (test only) overrides `test_perturbation`."""
        if split not in self.samples:
            root_arg = {
                "train": "train_root",
                "val": "train_root",
                "test": "test_root",
                "predict": "predict_root",
            }
            raise DatasetLayoutError(f"no {split} data: set data.init_args.{root_arg[split]} in the config")
        if split == "train":
            transform = build_train_transform(self.image_size, self.resize, self.augment)
            perturbation = None
        else:
            transform = build_eval_transform(self.image_size, self.resize)
            perturbation = self.test_perturbation if condition is None else condition
        return RealFakeDataset(self.samples[split], transform, self.generators, perturbation)

    def _loader(self, split: str, shuffle: bool, condition: str | None = None) -> DataLoader:
        return DataLoader(
            self._dataset(split, condition),
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=collate_skipping,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        """One loader per test condition (a list when there are several, clean first)."""
        loaders = [self._loader("test", False, condition) for condition in self.test_conditions]
        return loaders if len(loaders) > 1 else loaders[0]

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)
