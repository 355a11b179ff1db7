"""`ItemFeatures`: the datamodule of ITEM. Indexes real/generated images like `RealFakeFolder` (same roots,
manifests, `name=folder` roots, per-generator test sets), runs the frozen stage once per image into the
feature cache, and serves batches to the MLP head (and to UniFD) from the split's per-image view.

Batches are dicts: `global_image` (B, d) = I_0; `d_global` (B, d) = D_g (Eq. 4); `d_local` (B, d) = Eq. 7's
mean over the image's objects of D_l^i (Eq. 6; zero for an image without objects) and `n_objects` (B,), from
which `ItemDetector.distance` applies its `empty_local` policy; `label`, `generator_id`, `index`, `path`,
`caption`; and `skipped`, the (path, reason) of images of the batch that could not be decoded (counted by the
CLI's DataHealthCallback, as for RealFakeFolder). With `per_object_batches: true` they hold instead the cached
embeddings themselves: `global_image`, `global_text` (B, d) = I_0, T_0 and `local_image`, `local_text`
(B, K, d) = I_i, T_i padded to the batch's largest object count K with `local_mask` (B, K).

Cache-building path: with `extract_missing: true`, `setup` extracts what the cache lacks (under the cache's
lock), then builds the split's per-image view once from the verified shards (`view.py`; reused while the
split's entries and the stage are unchanged), so a batch only ever holds entries whose shard passed its
checksum. Training streams the view chunk by chunk (`ChunkSampler`: each epoch the chunk order, then the rows
within each chunk, are shuffled with `shuffle_seed + epoch`); the per-object embeddings stay on disk in the
shards, for analyses. With `extract_missing: false`, a miss is an error naming `forgelab extract`. With
`cache_dir: null` nothing is cached: the frozen stage runs on every batch of every epoch (the
UniversalFakeDetect way; for comparison and one-off runs) and its batches are reduced the same way.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import pil_to_tensor
from tqdm.auto import tqdm

from common.data.images import ImageDecodeError, SkipLog, load_rgb
from common.data.realfake import index_sources, stratified_split, subsample_per_label
from common.data.samples import DatasetLayoutError, Sample, index_image_folder
from common.distributed import Ranks, current_ranks
from common.errors import ConfigError
from common.perturbations import Perturbation
from projects.item_detector.cache import FeatureCache, FeatureTable, content_hashes, entry_key
from projects.item_detector.captioning import CaptionerConfig
from projects.item_detector.clip_encoders import ClipConfig
from projects.item_detector.frozen import FrozenStage
from projects.item_detector.grounding import GrounderConfig
from projects.item_detector.view import ChunkSampler, FeatureView, build_view, per_image_batch

log = logging.getLogger("forgelab.item")

# The paper's frozen models (frozen dataclasses: safe as shared defaults).
PAPER_CAPTIONER, PAPER_GROUNDER, PAPER_CLIP = CaptionerConfig(), GrounderConfig(), ClipConfig()
SPLITS_OF_STAGE = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


def load_image_tensor(path: str) -> torch.Tensor:
    """Decoded RGB image as a float (3, H, W) tensor in [0, 1] (raises ImageDecodeError)."""
    return pil_to_tensor(load_rgb(path)).float().div_(255.0)


class DecodeDataset(Dataset):
    """(sample, entry key, content hash) -> the decoded, perturbed image, or a skip record with the reason."""

    def __init__(self, items: Sequence[tuple[Sample, str, str]], perturbation: Perturbation) -> None:
        self.items = list(items)
        self.perturbation = perturbation

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample, key, content = self.items[index]
        try:
            image = load_image_tensor(sample.path)
        except ImageDecodeError as err:
            return {"sample": sample, "key": key, "skip": err.reason}
        # Noise is seeded by the content hash: the same image gets the same noise in every run and cache entry.
        return {"sample": sample, "key": key, "image": self.perturbation(image, seed_key=content)}


def _identity(batch: Any) -> Any:
    """DataLoader collate for datasets that build whole batches themselves (or lists of items)."""
    return batch


def _single_thread_worker(_: int) -> None:
    torch.set_num_threads(1)  # workers only decode; the models get the cores


def ensure_features(
    stage: FrozenStage,
    cache: FeatureCache,
    items: Sequence[tuple[Sample, str, str]],
    perturbation: Perturbation,
    batch_size: int = 16,
    shard_size: int = 1024,
    num_workers: int = 0,
    description: str = "extract",
    ranks: Ranks | None = None,
) -> dict[str, Any]:
    """Compute and commit the features of every (sample, key, content hash) the cache lacks.

    On several ranks (`ranks`, default: the current process group) every rank reads what the cache lacks, waits
    for the others to have read it, and takes its share of that list in whole batches (`Ranks.share_batches`:
    disjoint, deterministic, each batch the one a single process would run), so the ranks together compute each
    missing entry once, with the arithmetic of one process. Each rank commits a shard every `shard_size` of its
    images (under the cache's lock, held only for the commit), so an interrupted extraction resumes after the
    last committed shards, on any number of ranks. All ranks return together, with the counts of all of them
    (`images_per_s`: over all ranks).
    """
    ranks = ranks or current_ranks()
    keys = [key for _, key, _ in items]
    present, skipped = cache.status(keys)
    todo = list(
        {key: item for item in items if (key := item[1]) not in present and key not in skipped}.values()
    )
    ranks.barrier()  # every rank has its `todo` before any rank commits (else their lists could differ)
    stats: dict[str, Any] = {"requested": len(set(keys)), "cached": len(present) + len(skipped)}
    stats |= {"extracted": 0, "skipped": 0, "seconds": 0.0}
    if not todo:
        return stats
    share = [todo[i] for i in ranks.share_batches(len(todo), batch_size)]
    if share:
        stage.models()  # loading the models is not extraction time (every rank loads its own copy at once)
    ranks.barrier()
    start = time.perf_counter()
    mine = _extract_share(
        stage, cache, share, perturbation, batch_size, shard_size, num_workers, description, ranks.is_main
    )
    seconds = time.perf_counter() - start
    ranks.barrier()  # every share is committed before any rank reads the cache back
    elapsed = time.perf_counter() - start
    per_rank = ranks.gather({"extracted": mine[0], "skipped": mine[1], "seconds": seconds})
    stats["extracted"] = sum(r["extracted"] for r in per_rank)
    stats["skipped"] = sum(r["skipped"] for r in per_rank)
    stats["seconds"] = round(elapsed, 3)
    stats["images_per_s"] = round(len(todo) / max(elapsed, 1e-9), 2)
    if ranks.world_size > 1:
        stats["ranks"] = ranks.world_size
        stats["rank_seconds"] = [round(r["seconds"], 3) for r in per_rank]
    return stats


def _extract_share(
    stage: FrozenStage,
    cache: FeatureCache,
    share: Sequence[tuple[Sample, str, str]],
    perturbation: Perturbation,
    batch_size: int,
    shard_size: int,
    num_workers: int,
    description: str,
    progress_bar: bool = True,
) -> tuple[int, int]:
    """Extract one rank's items, committing every `shard_size`; returns (extracted, skipped)."""
    extracted = skipped_count = 0
    if not share:
        return extracted, skipped_count
    loader = DataLoader(
        DecodeDataset(share, perturbation),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_identity,
        worker_init_fn=_single_thread_worker if num_workers else None,
    )
    pending_keys: list[str] = []
    pending_features: list[Any] = []
    pending_skips: dict[str, str] = {}

    def commit() -> None:
        with cache.locked():
            cache.commit(FeatureTable.from_features(pending_keys, pending_features), pending_skips)
        pending_keys.clear(), pending_features.clear(), pending_skips.clear()

    with tqdm(
        total=len(share), desc=description, unit="img", disable=None if progress_bar else True, leave=False
    ) as progress:
        for batch in loader:
            good = [item for item in batch if "image" in item]
            pending_skips.update({item["key"]: item["skip"] for item in batch if "skip" in item})
            pending_features.extend(stage.run([g["image"] for g in good], [g["sample"] for g in good]))
            pending_keys.extend(g["key"] for g in good)
            extracted += len(good)
            skipped_count += len(batch) - len(good)
            if len(pending_keys) >= shard_size:
                commit()
            progress.update(len(batch))
    if pending_keys or pending_skips:
        commit()
    return extracted, skipped_count


class SplitDataset(Dataset):
    """A split's samples and labels; subclasses fetch the features of a batch (`__getitems__`, so a DataLoader
    gets a whole batch with a few tensor gathers) and `assemble` adds what every batch carries."""

    def __init__(self, samples: Sequence[Sample], generators: Sequence[str]) -> None:
        self.samples = list(samples)
        generator_index = {name: i for i, name in enumerate(generators)}
        self.labels = torch.tensor([s.label for s in self.samples], dtype=torch.long)
        self.generator_ids = torch.tensor([generator_index.get(s.generator, -1) for s in self.samples])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def dim(self) -> int | None:
        """The embedding size, None while unknown (no features)."""
        raise NotImplementedError

    def assemble(
        self, indices: Sequence[int], features: dict[str, Any], good: Sequence[int], reasons: dict[int, str]
    ) -> dict[str, Any]:
        """The batch of dataset `indices`: `features` of the `good` ones (in that order); the others are skips
        with their reason."""
        index = torch.tensor(list(good), dtype=torch.long)
        kept = set(good)
        return features | {
            "label": self.labels[index],
            "generator_id": self.generator_ids[index],
            "index": index,
            "path": [self.samples[i].path for i in good],
            "skipped": [(self.samples[i].path, reasons.get(i, "missing")) for i in indices if i not in kept],
        }


class FeatureDataset(SplitDataset):
    """A split served from its per-image view (`view.py`), streamed from disk: batches hold `global_image`,
    `d_global`, `d_local`, `n_objects` and `caption` per image; samples without features (undecodable) become
    skip records. `sampler()` gives the loader's order (`ChunkSampler`: chunk by chunk, shuffled for training)."""

    def __init__(
        self,
        samples: Sequence[Sample],
        keys: Sequence[str | None],
        view: FeatureView,
        skipped: dict[str, str],
        generators: Sequence[str],
    ) -> None:
        super().__init__(samples, generators)
        self.view = view
        row_of = view.row_of
        self.rows = torch.tensor([row_of.get(k, -1) if k else -1 for k in keys], dtype=torch.int64)
        self.skip_reasons = {i: skipped[k] for i, k in enumerate(keys) if k in skipped}

    @property
    def dim(self) -> int | None:
        return self.view.dim if len(self.view) else None

    def groups(self) -> list[torch.Tensor]:
        """Dataset indices per view chunk, in row order, then those without features."""
        have = torch.nonzero(self.rows >= 0).flatten()
        order = have[torch.argsort(self.rows[have], stable=True)]
        counts = torch.bincount(self.view.chunk_of(self.rows[order]), minlength=len(self.view.chunks))
        return [*torch.split(order, counts.tolist()), torch.nonzero(self.rows < 0).flatten()]

    def sampler(self, shuffle: bool, seed: int, pad: bool = True) -> ChunkSampler:
        return ChunkSampler(self.groups(), shuffle=shuffle, seed=seed, pad=pad)

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        rows = self.rows[torch.as_tensor(list(indices), dtype=torch.int64)]
        good = [i for i, row in zip(indices, rows.tolist(), strict=True) if row >= 0]
        if good:
            features = self.view.read(rows[rows >= 0])
        else:
            features = {
                name: torch.zeros(0, self.view.dim) for name in ("global_image", "d_global", "d_local")
            }
            features |= {"n_objects": torch.zeros(0, dtype=torch.int64), "caption": []}
        return self.assemble(indices, features, good, self.skip_reasons)


class ObjectFeatureDataset(SplitDataset):
    """A split's rows of an in-memory FeatureTable (every per-object embedding; `per_object_batches`): batches
    hold `global_image`, `global_text` (B, d) and `local_image`, `local_text` (B, K, d) padded to the batch's
    largest object count K with `local_mask` (B, K), for ablations needing another reduction over objects than
    Eq. 7's mean; or, with `per_object=False`, the per-image batches the view serves."""

    def __init__(
        self,
        samples: Sequence[Sample],
        keys: Sequence[str | None],
        table: FeatureTable,
        skipped: dict[str, str],
        generators: Sequence[str],
        per_object: bool = True,
    ) -> None:
        super().__init__(samples, generators)
        self.table, self.per_object = table, per_object
        self.rows = [table.key_index.get(k) if k else None for k in keys]
        self.skip_reasons = {i: skipped[k] for i, k in enumerate(keys) if k in skipped}

    @property
    def dim(self) -> int | None:
        return self.table.dim if len(self.table) else None

    def table_batch(self, table: FeatureTable, rows: Sequence[int]) -> dict[str, Any]:
        return table.batch(rows) if self.per_object else per_image_batch(table, rows)

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        good = [i for i in indices if self.rows[i] is not None]
        features = self.table_batch(self.table, [self.rows[i] for i in good])
        return self.assemble(indices, features, good, self.skip_reasons)


class RecomputeDataset(ObjectFeatureDataset):
    """No cache: decode and run the frozen stage for every batch, every epoch (the UniversalFakeDetect way)."""

    def __init__(
        self,
        samples: Sequence[Sample],
        contents: Sequence[str | None],
        stage: FrozenStage,
        perturbation: Perturbation,
        generators: Sequence[str],
        per_object: bool = False,
    ) -> None:
        super().__init__(samples, [None] * len(samples), FeatureTable.empty(), {}, generators, per_object)
        self.stage = stage
        self.decode = DecodeDataset([(s, c or "", c or "") for s, c in zip(samples, contents)], perturbation)
        self.readable = [c is not None for c in contents]

    @property
    def dim(self) -> int | None:
        return self.stage.feature_dim

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        decoded = {i: self.decode[i] for i in indices if self.readable[i]}
        good = [i for i, item in decoded.items() if "image" in item]
        features = self.stage.run([decoded[i]["image"] for i in good], [decoded[i]["sample"] for i in good])
        table = FeatureTable.from_features([decoded[i]["key"] for i in good], features)
        reasons = {i: item["skip"] for i, item in decoded.items() if "skip" in item}
        return self.assemble(indices, self.table_batch(table, range(len(good))), good, reasons)


class ItemFeatures(L.LightningDataModule):
    """ITEM's data: images -> frozen stage (cached) -> batches of CLIP embeddings. See the module docstring.

    Args:
        train_root, val_root, test_root, predict_root, val_fraction, split_seed, toy_world: as RealFakeFolder
            (folders in the CNNDetection layout, CSV/JSONL manifests, lists of them, `name=folder`).
        max_train_per_label: use at most this many real and this many generated training images (the paper
            trains on 4,000 + 4,000 ProGAN images); chosen deterministically, logged.
        captioner, grounder, clip: the frozen models (Eq. 1, 5, 2); see their configs.
        preset: pretrained | random | tiny, for all frozen models.
        device, dtype: where and in which precision the frozen stage runs (auto: GPU + float16 when present).
        test_perturbations: test conditions, e.g. [none, noise:0.001, ..., jpeg:25] (Fig. 4); applied to the
            image before captioning and embedding. Each becomes a test dataloader; the first is the main report.
        cache_dir: feature cache root (null: no cache, recompute every batch).
        extract_missing: extract what the cache lacks in `setup`; false makes a miss an error.
        extract_batch_size, extract_workers, shard_size: extraction batching, decoding processes, and images per
            committed shard (the unit of resumption).
        clip_batch_size: images/texts per CLIP forward during extraction.
        batch_size, eval_batch_size, num_workers: head training batches (reading the view is cheap: workers are
            rarely worth it; each would hold its own one-chunk buffer).
        view_chunk_rows: images per chunk file of the per-image view (the unit of reading and of the training
            shuffle; 8192 rows of d = 768 are 75 MB).
        shuffle_seed: seed of the training order (`ChunkSampler`: per epoch, the chunk order, then the rows
            within each chunk); None takes the run's `seed_everything` (PL_GLOBAL_SEED), else 0.
        per_object_batches: serve every per-object embedding (the shards' FeatureTable, in memory) instead of
            the per-image view, for an ablation needing another reduction over objects than Eq. 7's mean. The
            detector's options (`w_global`, `w_local`, `empty_local`) are all served by the view.
    """

    def __init__(
        self,
        train_root: str | list[str] | None = None,
        test_root: str | list[str] | None = None,
        val_root: str | list[str] | None = None,
        predict_root: str | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        max_train_per_label: int | None = None,
        captioner: CaptionerConfig = PAPER_CAPTIONER,
        grounder: GrounderConfig = PAPER_GROUNDER,
        clip: ClipConfig = PAPER_CLIP,
        preset: str = "pretrained",
        device: str = "auto",
        dtype: str = "auto",
        test_perturbations: list[str] | None = None,
        cache_dir: str | None = "cache/item_detector",
        extract_missing: bool = True,
        extract_batch_size: int = 16,
        extract_workers: int = 2,
        shard_size: int = 1024,
        clip_batch_size: int = 64,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        view_chunk_rows: int = 8192,
        shuffle_seed: int | None = None,
        per_object_batches: bool = False,
        toy_world: str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("batch_size", batch_size),
            ("extract_batch_size", extract_batch_size),
            ("shard_size", shard_size),
            ("clip_batch_size", clip_batch_size),
            ("view_chunk_rows", view_chunk_rows),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if num_workers < 0 or extract_workers < 0:
            raise ValueError("num_workers and extract_workers must be >= 0")
        if max_train_per_label is not None and max_train_per_label <= 0:
            raise ValueError(f"max_train_per_label must be positive, got {max_train_per_label}")
        conditions = [Perturbation.parse(spec).spec for spec in (test_perturbations or ["none"])]
        if len(set(conditions)) != len(conditions):
            raise ValueError(f"test_perturbations has repeats: {conditions}")
        self.train_root, self.val_root, self.test_root = train_root, val_root, test_root
        self.predict_root, self.toy_world = predict_root, toy_world
        self.val_fraction, self.split_seed, self.max_train_per_label = (
            val_fraction,
            split_seed,
            max_train_per_label,
        )
        self.test_conditions = conditions
        self.cache_dir, self.extract_missing = cache_dir, extract_missing
        self.extract_batch_size, self.extract_workers, self.shard_size = (
            extract_batch_size,
            extract_workers,
            shard_size,
        )
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers = num_workers
        self.view_chunk_rows, self.shuffle_seed = view_chunk_rows, shuffle_seed
        self.per_object_batches = per_object_batches
        self.stage = FrozenStage(captioner, grounder, clip, preset, device, dtype, clip_batch_size)
        self.skips = SkipLog("ItemFeatures")
        self.samples: dict[str, list[Sample]] = {}
        self.generators: list[str] = []
        self.datasets: dict[tuple[str, str], SplitDataset] = {}
        self.feature_health: dict[str, dict[str, int]] = {}
        self.extraction: dict[str, dict[str, Any]] = {}
        self._contents: dict[str, str | None] = {}

    # -- indexing -----------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.toy_world:
            from common.data.toy_world import ensure_toy_world

            ensure_toy_world(self.toy_world)

    def _index(self) -> None:
        if self.samples:
            return
        self.prepare_data()  # idempotent and lock-protected: every DDP rank may call it
        if self.train_root:
            train = index_sources(self.train_root, self.skips)
            if self.val_root:
                val = index_sources(self.val_root, self.skips)
            else:
                train, val = stratified_split(train, self.val_fraction, self.split_seed)
            if self.max_train_per_label:
                before = len(train)
                train = subsample_per_label(train, self.max_train_per_label, self.split_seed)
                log.info(
                    "ItemFeatures: training on %d of %d images (max_train_per_label)", len(train), before
                )
            if {s.label for s in train} != {0, 1}:
                raise DatasetLayoutError(
                    f"training data {self.train_root} needs both real and generated images"
                )
            self.samples["train"], self.samples["val"] = train, val
        if self.test_root:
            self.samples["test"] = index_sources(self.test_root, self.skips)
        if self.predict_root:
            self.samples["predict"] = index_image_folder(self.predict_root, self.skips)
        self.generators = sorted({s.generator for split in self.samples.values() for s in split})
        for split, members in self.samples.items():
            self.stage.check_samples(members)
            log.info("ItemFeatures %s: %d images", split, len(members))

    def has_split(self, split: str) -> bool:
        root = {
            "train": self.train_root,
            "val": self.train_root,
            "test": self.test_root,
            "predict": self.predict_root,
        }
        return bool(root.get(split))

    def skip_summary(self) -> dict[str, int]:
        return self.skips.summary()

    def _hashes(self, samples: Sequence[Sample]) -> list[str | None]:
        todo = [s.path for s in samples if s.path not in self._contents]
        self._contents.update(zip(todo, content_hashes(todo), strict=True))
        return [self._contents[s.path] for s in samples]

    # -- features -----------------------------------------------------------------------------------------------
    def conditions(self, split: str) -> list[str]:
        """Perturbations a split is seen under: the test conditions for test, clean otherwise."""
        return self.test_conditions if split == "test" else ["none"]

    def features(self, split: str, condition: str = "none") -> SplitDataset:
        """The split's features under `condition`, extracting what the cache lacks when allowed: its per-image
        view (built once from the shards, then streamed), or with `per_object_batches` every per-object
        embedding in memory."""
        if (split, condition) in self.datasets:
            return self.datasets[(split, condition)]
        self._index()
        if split not in self.samples:
            arg = {
                "train": "train_root",
                "val": "train_root",
                "test": "test_root",
                "predict": "predict_root",
            }[split]
            raise DatasetLayoutError(f"no {split} data: set data.init_args.{arg} in the config")
        samples = self.samples[split]
        perturbation = Perturbation.parse(condition)
        contents = self._hashes(samples)
        if self.cache_dir is None:
            dataset: SplitDataset = RecomputeDataset(
                samples, contents, self.stage, perturbation, self.generators, self.per_object_batches
            )
            self.datasets[(split, condition)] = dataset
            return dataset
        keys = [entry_key(c, self.stage.annotations(s)) if c else None for s, c in zip(samples, contents)]
        cache = FeatureCache(self.cache_dir, self.stage.descriptor(perturbation.spec))
        name = f"{split}/{condition}"
        wanted = [k for k in keys if k]
        for attempt in range(2):  # a shard found corrupt while reading is dropped: extract it again, once
            present, skipped = cache.status(wanted)
            missing = {k for k in wanted if k not in present and k not in skipped}
            if missing:
                self._extract_missing(name, cache, samples, keys, contents, missing, perturbation)
                skipped = cache.skipped(wanted)
            if self.per_object_batches:
                table, skipped = cache.load(wanted)  # read back verified, like any cached entry
                served: FeatureTable | FeatureView | None = table
                lacking = any(k not in table.key_index and k not in skipped for k in wanted)
            else:
                served = build_view(cache, [k for k in wanted if k not in skipped], self.view_chunk_rows)
                lacking = served is None
            if not lacking:
                break
            if attempt:
                raise RuntimeError(f"{name} entries are missing from {cache.dir} right after extraction")
        if isinstance(served, FeatureTable):
            dataset = ObjectFeatureDataset(samples, keys, served, skipped, self.generators)
            health, entries = served.flag_totals(), len(served)
        else:
            dataset = FeatureDataset(samples, keys, served, skipped, self.generators)
            health, entries = dict(served.flag_totals), len(served)
        self.datasets[(split, condition)] = dataset
        self.feature_health[name] = health | {"undecodable": len(skipped)}
        log.info("ItemFeatures %s: %d cached entries, %s", name, entries, self.feature_health[name])
        return dataset

    def _extract_missing(
        self,
        name: str,
        cache: FeatureCache,
        samples: Sequence[Sample],
        keys: Sequence[str | None],
        contents: Sequence[str | None],
        missing: set[str],
        perturbation: Perturbation,
    ) -> None:
        if not self.extract_missing:
            raise ConfigError(
                f"the feature cache {cache.dir} lacks {len(missing)} of {len(samples)} {name} images: run "
                f"`forgelab extract` with the same --config files first, or set "
                f"data.init_args.extract_missing=true"
            )
        items = [(s, k, c) for s, k, c in zip(samples, keys, contents) if k in missing]
        self.extraction[name] = ensure_features(
            self.stage,
            cache,
            items,
            perturbation,
            self.extract_batch_size,
            self.shard_size,
            self.extract_workers,
            description=f"ITEM features {name}",
        )
        log.info("ItemFeatures %s: extracted %s", name, self.extraction[name])

    @property
    def feature_dim(self) -> int | None:
        for dataset in self.datasets.values():
            if dataset.dim is not None:
                return dataset.dim
        return None

    def setup(self, stage: str | None = None) -> None:
        self._index()
        splits = SPLITS_OF_STAGE.get(stage or "", tuple(self.samples))
        for split in splits:
            if split in self.samples:
                for condition in self.conditions(split):
                    self.features(split, condition)
        if self.cache_dir is not None:
            self.stage.close()  # training needs the memory, not the frozen models

    # -- loaders ------------------------------------------------------------------------------------------------
    def _loader(self, split: str, condition: str = "none") -> DataLoader:
        train = split == "train"
        dataset = self.features(split, condition)
        sampler = None
        if isinstance(dataset, FeatureDataset):  # chunk by chunk; shuffled for training (see ChunkSampler)
            seed = self.shuffle_seed if self.shuffle_seed is not None else int(os.getenv("PL_GLOBAL_SEED", 0))
            sampler = dataset.sampler(shuffle=train, seed=seed, pad=split != "predict")
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train if sampler is None else None,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=_identity,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        loaders = [self._loader("test", condition) for condition in self.test_conditions]
        return loaders if len(loaders) > 1 else loaders[0]

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")
