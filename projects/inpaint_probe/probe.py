"""`forgelab probe`: paper 003 Sec. 3 and 5.2. Inpaint a real set and generated sets with the same masks, and
measure how well each inpainter does on each (Table 2: FID and NIQE; Figs. 1-4: original / masked / mask /
result quadruples).

    forgelab probe --config configs/inpaint_probe/probe_tiny.yaml \\
        --checkpoints.partial_conv=runs/inpaint_probe/<run>/checkpoints/last.ckpt --run.name=my-probe

For every inpainter and set, image i always gets mask i (drawn from `mask_seed`, or the i-th file of
`mask_dir`), so the sets differ only in their images. Per image: the composite result, NIQE of the result and
of the original, the L1 error in the hole and PSNR. Per hole-ratio bucket and over all images: FID between the
originals and the results of that set (features extracted once; see fid.py; `fd_randconv`, never "fid", on the
substitute features; n/a for cells of at most d images, `fid.min_images`) and mean NIQE. Written to
`runs/<project>/<name>/`: table2.md/.csv (buckets x sets, per inpainter), table2_per_image.md, per_image.csv,
plots/ (FID and NIQE by bucket, NIQE vs hole ratio, the quadruple sheets), results/<inpainter>/<set>/*.png,
report.json, data_health.json, and the same tables, plots and summary values on W&B (offline by default).
"""

from __future__ import annotations

import itertools
import logging
import math
import pickle
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import matplotlib

matplotlib.use("Agg")
import lightning as L
import matplotlib.pyplot as plt
import numpy as np
import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from PIL import Image

from common.distributed import Ranks, current_ranks, launch
from common.errors import ConfigError
from common.experiment.configs import wandb_config
from common.experiment.reporting import log_figure, log_pil, log_table
from common.experiment.runs import (
    RunSettings,
    build_loggers,
    recording_outcome,
    resolve_run_dir,
    start_run_record,
)
from common.io import save_image, write_csv, write_json, write_text
from projects.inpaint_probe.data import FitMode, fit_image, index_images
from projects.inpaint_probe.fid import (
    FeatureMode,
    build_feature_extractor,
    extract_features,
    frechet_distance,
)
from projects.inpaint_probe.inpainters import DeepFillV2Inpainter, PartialConvInpainter, hole_l1, psnr
from projects.inpaint_probe.masks import (
    DEFAULT_BUCKET_EDGES,
    MaskConfig,
    MaskError,
    bucket_label,
    hole_ratio,
    load_mask,
    mask_rng,
    sample_mask,
    to_tensor,
)
from projects.inpaint_probe.niqe import ColorMode, ImageTooSmallForNIQE, niqe
from projects.inpaint_probe.quadruples import quadruple_sheet

log = logging.getLogger("forgelab.inpaint_probe")

InpainterKind = Literal["partial_conv", "gated_conv", "diffusion"]


@dataclass
class ProbeSet:
    """One column group of Table 2: a name, folder(s) of images (searched recursively), real or generated."""

    name: str
    roots: list[str]
    real: bool = False


@dataclass
class InpainterSpec:
    """One inpainter. partial_conv / gated_conv: a checkpoint of `forgelab fit` with the matching config.
    diffusion: Stable Diffusion inpainting (model_id, preset, prompt, steps, guidance_scale, seed)."""

    name: str
    kind: InpainterKind
    checkpoint: str | None = None
    model_id: str | None = None
    preset: str = "pretrained"
    prompt: str = ""
    steps: int = 25
    guidance_scale: float = 1.0  # guidance needs a prompt: with "" it changes nothing and doubles the cost
    seed: int = 0
    revision: str | None = None


@dataclass
class FIDSettings:
    """features: "inception" (torch-fidelity weights required), "substitute" (random features), or "auto"
    (Inception when its weights are on disk, else the substitute, named `fd_randconv` in every output).
    min_images: the smallest number of images per set a cell's distance is reported for (n/a below); None =
    the feature dimension + 1 (2049 for Inception, 993 for the substitute), so that both covariances can be full
    rank. Lower it deliberately (e.g. 10 for the paper's per-set numbers): the values are then biased and noisy."""

    features: FeatureMode = "auto"
    inception_weights: str | None = None
    min_images: int | None = None

    def __post_init__(self) -> None:
        if self.min_images is not None and self.min_images < 2:
            raise ValueError(
                f"fid.min_images must be >= 2 (a covariance needs two images), got {self.min_images}"
            )


@dataclass
class ProbeConfig:
    """Everything `forgelab probe` needs; see the module docstring."""

    sets: list[ProbeSet] = field(default_factory=list)
    inpainters: list[InpainterSpec] = field(default_factory=list)
    checkpoints: dict[str, str] = field(default_factory=dict)
    n_images: int = 10
    image_size: int = 256
    fit: FitMode = "crop"
    mask: MaskConfig = field(default_factory=MaskConfig)
    mask_seed: int = 0
    mask_dir: str | None = None
    bucket_edges: list[float] = field(default_factory=lambda: list(DEFAULT_BUCKET_EDGES))
    fid: FIDSettings = field(default_factory=FIDSettings)
    niqe_color: ColorMode = "gray"
    batch_size: int = 4
    grid_images: int = 4
    save_results: bool = True
    plots: bool = True
    device: str = "auto"
    toy_world: str | None = None

    def __post_init__(self) -> None:
        if self.n_images < 1:
            raise ValueError(f"n_images must be >= 1, got {self.n_images}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        names = [s.name for s in self.sets]
        if len(set(names)) != len(names):
            raise ValueError(f"set names must be unique, got {names}")
        names = [i.name for i in self.inpainters]
        if len(set(names)) != len(names):
            raise ValueError(f"inpainter names must be unique, got {names}")
        unknown = sorted(set(self.checkpoints) - set(names))
        if unknown:
            raise ValueError(f"checkpoints given for unknown inpainters {unknown}; inpainters are {names}")
        bucket_label(0.5, self.bucket_edges)  # validates the edges


@dataclass
class ImageSet:
    name: str
    real: bool
    images: torch.Tensor  # (N, 3, S, S) in [0, 1]
    paths: list[str]


@dataclass
class Reporter:
    """What common.experiment.reporting needs from a trainer: the run directory and the loggers."""

    default_root_dir: str
    loggers: list[Any]


class SkipCounter:
    """Counts problems by kind and reason (decoding, masks, NIQE) with the first few paths of each."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = {}
        self.examples: dict[str, list[str]] = {}

    def add(self, kind: str, reason: str, where: str) -> None:
        bucket = self.counts.setdefault(kind, {})
        bucket[reason] = bucket.get(reason, 0) + 1
        examples = self.examples.setdefault(f"{kind}/{reason}", [])
        if len(examples) < 10:
            examples.append(where)
        if bucket[reason] <= 3:
            log.warning("probe: %s %s: %s", kind, reason, where)


# -- inputs -------------------------------------------------------------------------------------------------------


def load_set(spec: ProbeSet, n: int, size: int, fit: FitMode, skips: SkipCounter) -> ImageSet:
    """The first `n` usable images of a set, sorted by path, as (n, 3, size, size)."""
    from common.data.images import ImageDecodeError, SkipLog, load_rgb

    index_skips = SkipLog(f"probe set {spec.name}")
    samples = index_images(spec.roots, index_skips)
    for reason, count in index_skips.summary().items():
        for _ in range(count):
            skips.add("indexing", reason, spec.name)
    images, paths = [], []
    for sample in samples:
        if len(images) == n:
            break
        try:
            picture = load_rgb(sample.path)
        except ImageDecodeError as err:
            skips.add("decoding", err.reason, sample.path)
            continue
        if fit == "crop" and min(picture.size) < size:
            # padding would invent content that the inpainter and NIQE would then score
            skips.add("decoding", "smaller_than_image_size", sample.path)
            continue
        images.append(fit_image(picture, size, fit, train=False))
        paths.append(sample.path)
    if not images:
        raise ConfigError(f"set {spec.name!r}: no usable image of at least {size} px in {spec.roots}")
    return ImageSet(spec.name, spec.real, torch.stack(images), paths)


def probe_masks(config: ProbeConfig, n: int, skips: SkipCounter) -> list[torch.Tensor]:
    """Mask i for image i of every set: drawn from (mask_seed, i), or the i-th usable file of `mask_dir`."""
    size = config.image_size
    if config.mask_dir is None:
        return [
            to_tensor(sample_mask(size, size, config.mask, mask_rng(config.mask_seed, "probe", i)))
            for i in range(n)
        ]
    from common.data.images import SkipLog

    masks = []
    for sample in index_images(config.mask_dir, SkipLog("probe masks")):
        try:
            mask, notes = load_mask(sample.path, (size, size))
        except MaskError as err:
            skips.add("masks", err.reason, sample.path)
            continue
        for note in notes:
            skips.add("masks", note, sample.path)  # handled, but counted so a wrong mask folder is visible
        masks.append(to_tensor(mask))
        if len(masks) == n:
            break
    if not masks:
        raise ConfigError(f"mask_dir {config.mask_dir}: no usable mask (see the warnings above)")
    if len(masks) < n:
        log.warning("probe: only %d usable masks for %d images: masks are reused in order", len(masks), n)
        masks = [masks[i % len(masks)] for i in range(n)]
    return masks


def build_inpainter(spec: InpainterSpec, checkpoint: str | None, device: torch.device) -> Any:
    """An object with `inpaint(image, hole)` and `display_name`, in eval mode on `device`."""
    if spec.kind == "diffusion" and not checkpoint:
        from projects.inpaint_probe.diffusion_inpainter import DiffusionInpainter

        inpainter = DiffusionInpainter(
            spec.model_id, spec.preset, spec.prompt, spec.steps, spec.guidance_scale, spec.seed, spec.revision
        )
        inpainter.pipeline.to(device)
        return inpainter
    if (
        spec.kind == "diffusion"
    ):  # a `forgelab fit` of diffusion_inpaint*.yaml: its sampling settings are the spec's
        from projects.inpaint_probe.diffusion_inpainter import DiffusionInpaintingFinetune

        sampling = {"steps": spec.steps, "guidance_scale": spec.guidance_scale, "seed": spec.seed}
        return _load_inpainter(DiffusionInpaintingFinetune, spec, checkpoint, sampling).to(device)
    module_class = {"partial_conv": PartialConvInpainter, "gated_conv": DeepFillV2Inpainter}.get(spec.kind)
    if module_class is None:
        raise ConfigError(
            f"inpainter {spec.name!r}: unknown kind {spec.kind!r} (partial_conv, gated_conv, diffusion)"
        )
    return _load_inpainter(module_class, spec, checkpoint).to(device)


# the tiny training config of each kind, named in the error for a missing checkpoint
_TINY_CONFIG = {
    "partial_conv": "partial_conv_tiny.yaml",
    "gated_conv": "deepfill_v2_tiny.yaml",
    "diffusion": "diffusion_inpaint_tiny.yaml",
}


def _load_inpainter(
    module_class: type[L.LightningModule],
    spec: InpainterSpec,
    checkpoint: str | None,
    overrides: dict[str, Any] | None = None,
) -> L.LightningModule:
    """Build `module_class` from a checkpoint's saved hyper-parameters (plus `overrides`), then its weights: data
    only (weights_only), and exactly the keys the module saves (all of them, or `trained_keys()` for modules
    whose checkpoints leave frozen pretrained parts out)."""
    if not checkpoint:
        raise ConfigError(
            f"inpainter {spec.name!r} ({spec.kind}) needs a checkpoint: train one with `forgelab fit --config "
            f"configs/trainer/cpu.yaml --config configs/inpaint_probe/{_TINY_CONFIG[spec.kind]}` and pass "
            f"--checkpoints.{spec.name}=runs/inpaint_probe/<run>/checkpoints/last.ckpt"
        )
    path = Path(checkpoint)
    if not path.is_file():
        raise ConfigError(f"inpainter {spec.name!r}: checkpoint {path} does not exist")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        # LightningCLI adds `_class_path`/`_instantiator`; the weights come from this file, not checkpoint_path
        hparams = {k: v for k, v in saved["hyper_parameters"].items() if not k.startswith("_")}
        if "checkpoint_path" in hparams:
            hparams["checkpoint_path"] = None
        if hparams.get("preset") == "pretrained" and not hasattr(module_class, "trained_keys"):
            # every weight is in this file: fetching pretrained ones (or, for DeepFill v2, demanding a
            # checkpoint_path) would only precede overwriting them; `random` is the same architecture
            hparams["preset"] = "random"
        module = module_class(**{**hparams, **(overrides or {})})
        expected = module.trained_keys() if hasattr(module, "trained_keys") else set(module.state_dict())
        if set(saved["state_dict"]) != expected:
            missing, extra = (
                sorted(expected - set(saved["state_dict"])),
                sorted(set(saved["state_dict"]) - expected),
            )
            raise KeyError(f"missing {missing[:3]}, unexpected {extra[:3]}")
        module.load_state_dict(saved["state_dict"], strict=False)
    except (KeyError, RuntimeError, TypeError, ValueError, pickle.UnpicklingError) as err:
        reason = " ".join(str(err).split())[:300]
        raise ConfigError(
            f"{path} is not a {module_class.__name__} checkpoint ({type(err).__name__}: {reason})"
        ) from None
    return module.eval()


# -- measurements ---------------------------------------------------------------------------------------------------


def safe_niqe(image: torch.Tensor, color: ColorMode, skips: SkipCounter, where: str) -> float:
    """NIQE of a [0, 1] (3, H, W) image as saved (uint8); NaN (counted) when too small or undefined."""
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    try:
        value = niqe(array, color)
    except ImageTooSmallForNIQE:
        skips.add("niqe", "smaller_than_192px", where)
        return math.nan
    if math.isnan(value):
        skips.add("niqe", "undefined", where)
    return value


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _fmt(value: float, digits: int) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _round(value: float, digits: int = 4) -> float:
    return value if math.isnan(value) else round(value, digits)  # NaN stays NaN ("nan" in the CSVs)


# -- the run --------------------------------------------------------------------------------------------------------


def run_probe(
    config: ProbeConfig, settings: RunSettings, config_text: str, argv: Sequence[str]
) -> Path | None:
    """Everything of the module docstring; returns the run directory (None on ranks other than 0)."""
    torch.set_grad_enabled(False)
    if config.toy_world:
        from common.data.toy_world import ensure_toy_world

        ensure_toy_world(config.toy_world)
    if not config.sets or not config.inpainters:
        raise ConfigError("the probe needs at least one entry in `sets` and one in `inpainters`")
    device = resolve_device(config.device)
    ranks = current_ranks()
    if not ranks.is_main:  # the other ranks inpaint their shares; rank 0 scores, reports and keeps the run
        _probe(config, settings, None, {}, device, ranks)
        return None
    run_dir, resumed = resolve_run_dir(settings, "probe", None)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = start_run_record(run_dir, settings, resumed, config.mask_seed, list(argv))
    write_json(run_dir / "run.json", record)
    write_text(run_dir / "config.yaml", config_text)
    if ranks.world_size > 1:
        record["ranks"] = ranks.world_size
    with recording_outcome(run_dir, record):
        _probe(config, settings, run_dir, record, device, ranks)
    print(f"forgelab: run files in {run_dir}", file=sys.stderr)
    return run_dir


def _probe(
    config: ProbeConfig,
    settings: RunSettings,
    run_dir: Path | None,
    record: dict[str, Any],
    device: torch.device,
    ranks: Ranks,
) -> None:
    """On several ranks every rank loads the same sets and masks and inpaints its share (`inpaint_set`); rank 0
    (the one with a `run_dir`) scores, writes and logs everything."""
    if run_dir is None:
        sets, masks, _ = _sets_and_masks(config, SkipCounter())
        for spec in config.inpainters:
            inpainter = build_inpainter(spec, config.checkpoints.get(spec.name, spec.checkpoint), device)
            for image_set in sets:
                inpaint_set(inpainter, image_set.images, masks, config.batch_size, device, ranks)
        return
    reporter = Reporter(str(run_dir), build_loggers(settings, run_dir, record) if settings.wandb else [])
    for logger in reporter.loggers:
        logger.log_hyperparams(wandb_config({"probe": asdict(config)}))
    skips = SkipCounter()
    timings: dict[str, float] = {}

    # 1. the sets (same number of images in each) and mask i for image i of every set
    start = time.perf_counter()
    sets, masks, n = _sets_and_masks(config, skips)
    ratios = [float(hole_ratio(m)) for m in masks]
    buckets = [bucket_label(r, config.bucket_edges) for r in ratios]
    timings["load"] = time.perf_counter() - start

    # 2. what does not depend on the inpainter: FID features and NIQE of the originals
    start = time.perf_counter()
    extractor, fid_info = build_feature_extractor(config.fid.features, config.fid.inception_weights)
    extractor = extractor.to(device)
    min_images = fid_info.min_images(config.fid.min_images)
    if n < min_images:
        log.warning(
            "probe: %s is n/a: %d images per set, fewer than fid.min_images=%d (%d-d features)",
            fid_info.label,
            n,
            min_images,
            fid_info.dim,
        )
    originals = {
        s.name: Scores(
            extract_features(extractor, s.images),
            [
                safe_niqe(img, config.niqe_color, skips, f"{s.name}/original/{i}")
                for i, img in enumerate(s.images)
            ],
        )
        for s in sets
    }
    timings["originals"] = time.perf_counter() - start

    # 3. every inpainter on every set, scored per image and per bucket
    start = time.perf_counter()
    per_image: list[dict[str, Any]] = []
    bucket_rows: list[dict[str, Any]] = []
    speeds: dict[str, float] = {}
    display: dict[str, str] = {}
    prediction_types: dict[str, str] = {}
    for spec in config.inpainters:
        inpainter = build_inpainter(spec, config.checkpoints.get(spec.name, spec.checkpoint), device)
        display[spec.name] = getattr(inpainter, "display_name", spec.kind)
        sampler = getattr(
            inpainter, "sampler", inpainter
        )  # a fine-tune samples through its DiffusionInpainter
        if hasattr(sampler, "prediction_type"):
            prediction_types[spec.name] = sampler.prediction_type
        seconds = 0.0
        for image_set in sets:
            tick = time.perf_counter()
            results = inpaint_set(inpainter, image_set.images, masks, config.batch_size, device, ranks)
            seconds += time.perf_counter() - tick
            scores = Scores(
                extract_features(extractor, results),
                [
                    safe_niqe(img, config.niqe_color, skips, f"{spec.name}/{image_set.name}/{i}")
                    for i, img in enumerate(results)
                ],
            )
            rows = score_rows(
                spec.name, image_set, results, masks, ratios, buckets, originals[image_set.name], scores
            )
            per_image += rows
            bucket_rows += bucket_table_rows(
                rows, originals[image_set.name], scores, config.bucket_edges, fid_info.metric, min_images
            )
            save_outputs(reporter, config, spec.name, display[spec.name], image_set, masks, ratios, results)
        speeds[spec.name] = len(sets) * n / max(seconds, 1e-9)
        del inpainter
    timings["inpainting_and_scores"] = time.perf_counter() - start

    # 4. tables, plots, report
    report = write_reports(reporter, config, sets, bucket_rows, per_image, fid_info, display, min_images)
    report.update(
        {
            "n_images_per_set": n,
            "image_size": config.image_size,
            "device": str(device),
            "sets": {s.name: {"real": s.real, "paths": s.paths} for s in sets},
            "masks": {
                "source": config.mask_dir or f"{config.mask.kind}, seed {config.mask_seed}",
                "hole_ratios": ratios,
            },
            "inpainting_images_per_second": speeds,
            "prediction_types": prediction_types,  # what each diffusion inpainter's UNet predicts
            "timings_seconds": timings,
            "skipped": skips.counts,
        }
    )
    write_json(run_dir / "report.json", report)
    write_json(run_dir / "data_health.json", {"counts": skips.counts, "examples": skips.examples})
    summary = {
        f"{r['inpainter']}/{r['set']}/{metric}": r[metric]
        for r in bucket_rows
        if r["bucket"] == "all"
        for metric in (fid_info.metric, "niqe", "niqe_original", "hole_l1", "psnr")
        if not math.isnan(r[metric])
    }
    for logger in reporter.loggers:
        logger.log_metrics(summary, step=0)
        logger.finalize("success")
    if skips.counts:
        print(f"forgelab probe: skipped or adjusted {skips.counts} (see data_health.json)", file=sys.stderr)


def _sets_and_masks(config: ProbeConfig, skips: SkipCounter) -> tuple[list[ImageSet], torch.Tensor, int]:
    """The sets cut to the same number n of images, and mask i for image i of every set (deterministic: every
    rank loads the same)."""
    sets = [load_set(s, config.n_images, config.image_size, config.fit, skips) for s in config.sets]
    n = min(len(s.images) for s in sets)
    if n < config.n_images:
        log.warning("probe: using %d images per set (the smallest set has %d usable images)", n, n)
    for image_set in sets:
        image_set.images, image_set.paths = image_set.images[:n], image_set.paths[:n]
    return sets, torch.stack(probe_masks(config, n, skips)), n


@dataclass
class Scores:
    """Per image of one set: FID features (N, d) and NIQE values."""

    features: torch.Tensor
    niqe: list[float]


def resolve_device(name: str) -> torch.device:
    """ "auto" = the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"probe.device is {name!r} but CUDA is not available; use cpu or auto")
    return device


def inpaint_set(
    inpainter: Any,
    images: torch.Tensor,
    masks: torch.Tensor,
    batch_size: int,
    device: torch.device,
    ranks: Ranks | None = None,
) -> torch.Tensor:
    """The inpainter's composites for all images, in batches, back on the CPU. On several ranks each inpaints
    its whole batches (`Ranks.share_batches`: the batches one process runs, so a seeded sampler draws the same
    noise for every image) and every rank receives all composites, in image order."""
    ranks = ranks or Ranks()
    mine = ranks.share_batches(images.shape[0], batch_size)
    parts = [
        inpainter.inpaint(images[index].to(device), masks[index].to(device)).cpu()
        for index in (torch.tensor(mine[i : i + batch_size]) for i in range(0, len(mine), batch_size))
    ]
    if ranks.world_size == 1:
        return torch.cat(parts)
    gathered = ranks.gather((mine, torch.cat(parts) if parts else None))
    shape = next(results.shape[1:] for _, results in gathered if results is not None)
    composites = torch.empty((images.shape[0], *shape))
    for indices, results in gathered:
        if indices:
            composites[torch.tensor(indices)] = results
    return composites


def score_rows(
    inpainter: str,
    image_set: ImageSet,
    results: torch.Tensor,
    masks: torch.Tensor,
    ratios: list[float],
    buckets: list[str],
    original: Scores,
    scores: Scores,
) -> list[dict[str, Any]]:
    """One row per image: hole ratio and bucket, NIQE of the result and the original, L1 in the hole, PSNR."""
    l1s = hole_l1(results, image_set.images, masks).tolist()
    psnrs = psnr(results, image_set.images).tolist()
    return [
        {
            "inpainter": inpainter,
            "set": image_set.name,
            "real": image_set.real,
            "image": i + 1,
            "path": image_set.paths[i],
            "hole_ratio": round(ratios[i], 4),
            "bucket": buckets[i],
            "niqe": scores.niqe[i],
            "niqe_original": original.niqe[i],
            "hole_l1": l1s[i],
            "psnr": psnrs[i],
        }
        for i in range(len(ratios))
    ]


def bucket_table_rows(
    rows: list[dict[str, Any]],
    original: Scores,
    scores: Scores,
    edges: Sequence[float],
    metric: str = "fid",
    min_images: int = 2,
) -> list[dict[str, Any]]:
    """Table 2 cells of one (inpainter, set): per hole-ratio bucket present, then all images. The Fréchet
    distance between the originals and the results of the bucket under the key `metric` ("fid", or
    "fd_randconv" on the substitute features), NaN below `min_images` images; means of the per-image values."""
    present = sorted({r["bucket"] for r in rows}, key=_bucket_order(edges))
    cells = []
    for bucket in [*present, "all"]:
        chosen = [i for i, r in enumerate(rows) if bucket in ("all", r["bucket"])]
        cells.append(
            {
                "inpainter": rows[0]["inpainter"],
                "bucket": bucket,
                "set": rows[0]["set"],
                "real": rows[0]["real"],
                "n": len(chosen),
                metric: frechet_distance(original.features[chosen], scores.features[chosen], min_images),
                **{
                    key: _nanmean([rows[i][key] for i in chosen])
                    for key in ("niqe", "niqe_original", "hole_l1", "psnr")
                },
            }
        )
    return cells


def save_outputs(
    reporter: Reporter,
    config: ProbeConfig,
    inpainter: str,
    title: str,
    image_set: ImageSet,
    masks: torch.Tensor,
    ratios: list[float],
    results: torch.Tensor,
) -> None:
    """The result images (optional) and the quadruple sheet of the first `grid_images` (Figs. 1-4)."""
    if config.save_results:
        folder = Path(reporter.default_root_dir) / "results" / inpainter / image_set.name
        for i, result in enumerate(results):
            save_image(folder / f"{i + 1:04d}_{Path(image_set.paths[i]).stem}.png", _to_pil(result))
    k = min(config.grid_images, results.shape[0])
    if k:
        quads = [(image_set.images[i], masks[i], results[i]) for i in range(k)]
        captions = [f"{image_set.name} #{i + 1} hole {100 * ratios[i]:.0f}%" for i in range(k)]
        log_pil(
            reporter,
            f"quadruples/{inpainter}/{image_set.name}",
            quadruple_sheet(quads, captions, columns=k, tile=min(128, config.image_size)),
            f"{title} on {image_set.name}: original, masked, mask, result",
        )


def _bucket_order(edges: Sequence[float]):
    labels = [bucket_label((a + b) / 2, edges) for a, b in itertools.pairwise(edges)]
    return lambda label: labels.index(label)


def _to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


# -- tables and plots -----------------------------------------------------------------------------------------------


def write_reports(
    reporter: Reporter,
    config: ProbeConfig,
    sets: Sequence[ImageSet],
    bucket_rows: list[dict[str, Any]],
    per_image: list[dict[str, Any]],
    fid_info: Any,
    display: dict[str, str],
    min_images: int = 2,
) -> dict[str, Any]:
    """Table 2 by bucket (CSV + Markdown + W&B), the per-image table, plots; returns the report's core."""
    fd, label = fid_info.metric, fid_info.label
    fid_line = f"{label} features: {fid_info.name} ({fid_info.note})" + (
        ""
        if fid_info.comparable
        else f" — {label} is a Fréchet distance, **not comparable to published FID**"
    )
    fid_line += f"; n/a for cells of fewer than {min_images} images per set ({fid_info.dim}-d features)."
    niqe_line = f"NIQE: Mittal et al. 2013, MATLAB-release pristine model, {config.niqe_color} luminance, 96-px blocks."
    sections, per_image_sections = [], []
    for name, title in display.items():
        rows = [r for r in bucket_rows if r["inpainter"] == name]
        order = list(dict.fromkeys(r["bucket"] for r in rows))
        header = ["hole ratio", "n"] + [
            f"{'real' if s.real else 'generated'}: {s.name} {metric}"
            for s in sets
            for metric in (f"{label} ↓", "NIQE ↓")
        ]
        lines = [
            f"**Table 2 (paper 003) — {title}: {label} ↓ and NIQE ↓ of the inpainted images, by hole ratio**",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for bucket in order:
            cells = {r["set"]: r for r in rows if r["bucket"] == bucket}
            n = cells[sets[0].name]["n"]
            label = "All images" if bucket == "all" else bucket
            values = [v for s in sets for v in (_fmt(cells[s.name][fd], 2), _fmt(cells[s.name]["niqe"], 4))]
            lines.append(f"| {label} | {n} | " + " | ".join(values) + " |")
        originals = " · ".join(
            f"{s.name} {_fmt(next(r['niqe_original'] for r in rows if r['set'] == s.name and r['bucket'] == 'all'), 4)}"
            for s in sets
        )
        lines += ["", f"NIQE of the originals (before inpainting): {originals}.", fid_line, niqe_line]
        sections.append("\n".join(lines))
        per_image_sections.append(_per_image_markdown(name, title, sets, per_image))
        if config.plots:
            log_figure(reporter, f"by_bucket_{name}", _bucket_figure(rows, sets, order, title, fid_info))
    if config.plots:
        log_figure(reporter, "niqe_vs_hole_ratio", _scatter_figure(per_image, sets, display))

    columns = ["inpainter", "bucket", "set", "real", "n", fd, "niqe", "niqe_original", "hole_l1", "psnr"]
    table = [[_round(r[c]) if isinstance(r[c], float) else r[c] for c in columns] for r in bucket_rows]
    log_table(reporter, "table2", columns, table, markdown="\n\n".join(sections))
    image_columns = list(per_image[0]) if per_image else []
    write_csv(
        Path(reporter.default_root_dir) / "per_image.csv",
        image_columns,
        [[_round(r[c], 6) if isinstance(r[c], float) else r[c] for c in image_columns] for r in per_image],
    )
    write_text(
        Path(reporter.default_root_dir) / "table2_per_image.md", "\n\n".join(per_image_sections) + "\n"
    )
    print("\n" + "\n\n".join(sections) + "\n")
    return {"frechet_distance": {**asdict(fid_info), "min_images": min_images}, "inpainters": display}


def _per_image_markdown(
    name: str, title: str, sets: Sequence[ImageSet], per_image: list[dict[str, Any]]
) -> str:
    """The paper's rows Image1..ImageN: NIQE per image (FID needs a set of images; see the bucket table)."""
    rows = [r for r in per_image if r["inpainter"] == name]
    header = ["image", "hole ratio"] + [f"{s.name} NIQE ↓" for s in sets]
    lines = [
        f"**{title}: NIQE ↓ per image**",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for index in sorted({r["image"] for r in rows}):
        cells = {r["set"]: r for r in rows if r["image"] == index}
        ratio = next(iter(cells.values()))["hole_ratio"]
        lines.append(
            f"| Image{index} | {100 * ratio:.1f}% | "
            + " | ".join(_fmt(cells[s.name]["niqe"], 4) for s in sets)
            + " |"
        )
    averages = [_fmt(_nanmean([r["niqe"] for r in rows if r["set"] == s.name]), 4) for s in sets]
    lines.append("| Average | | " + " | ".join(averages) + " |")
    return "\n".join(lines)


def _bucket_figure(
    rows: list[dict[str, Any]], sets: Sequence[ImageSet], order: list[str], title: str, fid_info: Any
) -> Any:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(order))
    width = 0.8 / max(1, len(sets))
    for k, image_set in enumerate(sets):
        cells = {r["bucket"]: r for r in rows if r["set"] == image_set.name}
        for ax, metric in zip(axes, (fid_info.metric, "niqe")):
            values = [cells[b][metric] for b in order]
            ax.bar(x + (k - (len(sets) - 1) / 2) * width, values, width, label=image_set.name)
    fid_label = fid_info.label + ("" if fid_info.comparable else f" ({fid_info.name})")
    for ax, label in zip(axes, (fid_label, "NIQE")):
        ax.set_xticks(x, ["all" if b == "all" else b for b in order], rotation=30)
        ax.set(xlabel="hole ratio", ylabel=f"{label} (lower is better)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _scatter_figure(
    per_image: list[dict[str, Any]], sets: Sequence[ImageSet], display: dict[str, str]
) -> Any:
    fig, axes = plt.subplots(1, len(display), figsize=(5.5 * len(display), 4), squeeze=False)
    for ax, (name, title) in zip(axes[0], display.items()):
        for image_set in sets:
            rows = [r for r in per_image if r["inpainter"] == name and r["set"] == image_set.name]
            ax.scatter([r["hole_ratio"] for r in rows], [r["niqe"] for r in rows], s=14, label=image_set.name)
        ax.set(title=title, xlabel="hole ratio", ylabel="NIQE of the result (lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# -- command line ---------------------------------------------------------------------------------------------------


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="forgelab probe",
        description="Inpaint real and generated sets with the same masks; FID and NIQE per set (paper 003 Table 2).",
        default_env=False,
    )
    parser.add_argument(
        "--config", action=ActionConfigFile, help="a YAML config (configs/inpaint_probe/probe*.yaml)"
    )
    parser.add_argument(
        "--command", type=Literal["probe"], default="probe", help="marks the YAML as a probe config"
    )
    parser.add_class_arguments(ProbeConfig, "probe")
    parser.add_class_arguments(RunSettings, "run")
    # a trainer preset says on how many ranks to inpaint (common.distributed; configs/trainer/ddp.yaml,
    # ddp_sim.yaml ...), as for fit and extract; the Trainer itself is never built
    parser.add_class_arguments(L.Trainer, "trainer", instantiate=False, fail_untyped=False)
    parser.add_argument(
        "--seed_everything", type=bool | int, default=True, help="accepted from trainer presets"
    )
    parser.set_defaults({"run.project": "inpaint_probe", "run.job_type": "probe"})
    return parser


def main(argv: Sequence[str]) -> None:
    """`forgelab probe ...` (entry point of the `forgelab.commands` group): on the ranks of the trainer section."""
    trainer = build_parser().parse_args(list(argv)).trainer.as_dict()
    launch(trainer, _main_on_rank, list(argv))


def _main_on_rank(argv: list[str]) -> None:
    parser = build_parser()
    namespace = parser.parse_args(list(argv))
    config_text = parser.dump(namespace, skip_none=False)
    try:
        objects = parser.instantiate(namespace)
    except ValueError as err:
        raise ConfigError(f"invalid probe config: {err}") from None
    settings = objects.run if isinstance(objects.run, RunSettings) else RunSettings(**dict(objects.run))
    run_probe(objects.probe, settings, config_text, ["forgelab", "probe", *argv])
