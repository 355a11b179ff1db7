"""`forgelab augment`: the generative augmentation of Sec. 4 with a trained fine-grained guidance generator.

    forgelab augment --generator runs/fg_guidance/<run>/generator \\
        --manifest data/toy_world/parts/manifest.jsonl --out data/fg_augmented/<name> --fraction 0.5

For ``fraction`` x the training set (the paper: +50 %), a source image is chosen (``--balance proportional``, the
default: ``fraction`` x each subclass's own images, so every subclass grows by the same factor; ``balanced``: the
same number for every subclass), inverted with its own caption and regenerated (`FineGrainedGenerator
.edit`) with a prompt of one of three kinds, in turn:

* ``view``: the caption plus a viewpoint ("seen from the left", ...), the paper's multi-view variants (Fig. 3);
* ``deterioration``: the caption plus a temporal condition ("with rust spots", ...), Eq. 4's x';
* ``environment``: the caption plus a lighting condition ("under strong glare", ...), Eq. 5's A_e(x).

Output, a dataset `common.data.CaptionedParts` reads through ``extra_train_manifests``::

    <out>/images/<subclass_dir>/<id>.png
    <out>/manifest.jsonl   path (relative), caption (the prompt), subclass, subclass_id, split=train, boxes and
                           phrases (scaled from the source; dropped for view variants, whose geometry moves),
                           provenance: source, kind, prompt, seed, checkpoint (+ sha256), steps, strength,
                           guidance, generation_ms
    <out>/dataset.json     counts, mean generation cost (ms/image), generator, arguments

Every file is written atomically; the manifest is rewritten after each batch, so an interrupted run resumes
where it stopped (same arguments: the plan is deterministic). Sources that fail to decode are skipped and counted.

``--realfake-root`` also writes the detectors' generated half in the CNNDetection layout
(`<root>/<split>/fg_guidance/0_real|1_fake`): for ``--realfake-per-split`` images of each split, the real image
(resized to the generator's size, so size cannot give a fake away) and its regeneration from its own caption.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from common.data.captioned import CaptionedSample, read_captioned_manifest
from common.data.images import ImageDecodeError, SkipLog, load_rgb
from common.distributed import current_ranks, launch, trainer_section
from common.errors import ConfigError
from common.io import save_image, write_json, write_text
from projects.fg_guidance.captioning import to_pil
from projects.fg_guidance.cycle import LORA_FILE, FineGrainedGenerator

log = logging.getLogger("forgelab.fg_guidance")

PROMPTS: dict[str, tuple[str, ...]] = {
    "view": ("seen from the left", "seen from the right", "seen from above", "seen from a low angle"),
    "deterioration": (
        "with rust spots",
        "with faded paint",
        "with tarnished dark metal",
        "with rust streaks",
    ),
    "environment": ("under strong glare", "in low light", "overexposed in bright sunlight", "in dim light"),
}
KINDS = tuple(PROMPTS)
REALFAKE_GENERATOR = "fg_guidance"


@dataclass
class Job:
    """One image to synthesize: everything its output depends on (so a resumed run makes the same image)."""

    id: str
    source: CaptionedSample
    kind: str
    prompt: str
    seed: int


def variant_prompt(caption: str, kind: str, index: int) -> str:
    """The source caption plus the ``index``-th condition of ``kind`` (cycling)."""
    if kind not in PROMPTS:
        raise ConfigError(f"unknown prompt kind {kind!r}; choose from {list(PROMPTS)}")
    conditions = PROMPTS[kind]
    return f"{caption.rstrip('. ')}, {conditions[index % len(conditions)]}"


BALANCES = ("proportional", "balanced")


def class_quotas(counts: dict[str, int], fraction: float, balance: str = "proportional") -> dict[str, int]:
    """Images to generate per subclass, floor(fraction * N) in all. ``proportional`` (the paper's "+50 %" read per
    class, the default): subclass c gets fraction * n_c, rounded by largest remainder (ties: sorted name) so the
    total is exact; every subclass grows by the same factor. ``balanced``: every subclass the same number (+-1, the
    first names in sorted order take the remainder), so small subclasses grow far more than ``fraction``."""
    if balance not in BALANCES:
        raise ConfigError(f"--balance must be one of {list(BALANCES)}, got {balance!r}")
    names = sorted(counts)
    total = int(fraction * sum(counts.values()))
    if balance == "balanced":
        share, extra = divmod(total, len(names))
        return {name: share + (i < extra) for i, name in enumerate(names)}
    exact = {name: fraction * counts[name] for name in names}
    quotas = {name: int(value) for name, value in exact.items()}
    by_remainder = sorted(names, key=lambda name: (-(exact[name] - quotas[name]), name))
    for name in by_remainder[: total - sum(quotas.values())]:
        quotas[name] += 1
    return quotas


def plan_jobs(
    samples: list[CaptionedSample],
    fraction: float,
    kinds: tuple[str, ...],
    seed: int,
    balance: str = "proportional",
) -> list[Job]:
    """floor(fraction * N) jobs, ``class_quotas`` per subclass: sources interleaved over the subclasses that still
    have quota (shuffled within each, seeded; a source is reused only when a quota exceeds its subclass, which
    ``balanced`` allows), prompt kinds in turn, one seed per job. Deterministic for the arguments."""
    if not 0 < fraction <= 0.5:
        raise ConfigError(f"--fraction must be in (0, 0.5] (the paper augments by +50 %), got {fraction}")
    if not kinds:
        raise ConfigError("at least one prompt kind is needed")
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[CaptionedSample]] = defaultdict(list)
    for sample in samples:
        by_class[sample.subclass].append(sample)
    queues = {
        name: [members[i] for i in rng.permutation(len(members))]
        for name, members in sorted(by_class.items())
    }
    quotas = class_quotas({name: len(queue) for name, queue in queues.items()}, fraction, balance)
    jobs: list[Job] = []
    for round_ in range(max(quotas.values(), default=0)):
        for name, queue in queues.items():
            if round_ >= quotas[name]:
                continue
            source = queue[round_ % len(queue)]
            kind = kinds[len(jobs) % len(kinds)]
            prompt = variant_prompt(source.caption, kind, len(jobs) // len(kinds))
            jobs.append(Job(f"aug{len(jobs):05d}", source, kind, prompt, int(seed * 1_000_003 + len(jobs))))
    return jobs


def load_source(path: str, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(3, size, size) float image in [0, 1] (antialiased bicubic resize) and the original (width, height)."""
    pil = load_rgb(path)
    original = pil.size
    pil = pil.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float() / 255, original


def scale_boxes(boxes: list[list[float]], original: tuple[int, int], size: int) -> list[list[float]]:
    sx, sy = size / original[0], size / original[1]
    return [
        [round(b[0] * sx, 2), round(b[1] * sy, 2), round(b[2] * sx, 2), round(b[3] * sy, 2)] for b in boxes
    ]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Synthesizer:
    """The generator and the settings of `FineGrainedGenerator.edit`, timed per image."""

    def __init__(
        self, generator_dir: str, steps: int | None, strength: float, guidance: float, eta: float, device: str
    ) -> None:
        self.generator = FineGrainedGenerator.load(generator_dir).to(device)
        self.device = device
        self.steps = steps or int(self.generator.config.get("num_inference_steps", 50))
        if not 0 < strength <= 1:
            raise ConfigError(f"--strength must be in (0, 1], got {strength}")
        self.strength, self.guidance, self.eta = strength, guidance, eta
        lora = Path(generator_dir) / LORA_FILE
        self.checkpoint = {"generator": str(Path(generator_dir)), "lora_sha256": file_sha256(lora)}
        self.warmed_up = False

    @property
    def size(self) -> int:
        return self.generator.image_size

    def __call__(
        self, images: torch.Tensor, sources: list[str], prompts: list[str], seeds: list[int]
    ) -> tuple[list[Image.Image], float]:
        """Variants of a batch and the wall time per image in ms. The first call of a Synthesizer first makes one
        untimed variant (warm-up: lazy initialisation, allocator, kernel selection); on CUDA the device is
        synchronised before each clock read."""
        if not self.warmed_up and len(images):
            self._edit(images[0], sources[0], prompts[0], seeds[0])
            self.warmed_up = True
        self._synchronize()
        start = time.perf_counter()
        # one call per image: each has its own seed (DDIM with eta > 0 draws noise) and a batch of 1 keeps the
        # per-image cost honest
        outputs = [self._edit(*job) for job in zip(images, sources, prompts, seeds)]
        self._synchronize()
        ms = 1000 * (time.perf_counter() - start) / max(1, len(prompts))
        return to_pil(torch.cat(outputs)), ms

    def _edit(self, image: torch.Tensor, source: str, prompt: str, seed: int) -> torch.Tensor:
        rng = torch.Generator(device="cpu").manual_seed(seed)
        return self.generator.edit(
            image[None].to(self.device),
            [source],
            [prompt],
            self.steps,
            strength=self.strength,
            guidance_scale=self.guidance,
            eta=self.eta,
            generator=rng,
        )

    def _synchronize(self) -> None:
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _part_manifests(manifest: Path) -> list[Path]:
    """The per-rank manifests of a (possibly interrupted) run: `manifest.part-<rank>.jsonl`."""
    return sorted(manifest.parent.glob(f"{manifest.stem}.part-*.jsonl"))


def _read_done(manifest: Path) -> dict[str, dict[str, Any]]:
    """Every finished image: the merged manifest's rows and those of per-rank manifests an interrupted run left."""
    done: dict[str, dict[str, Any]] = {}
    for path in (manifest, *_part_manifests(manifest)):
        done |= {row["id"]: row for row in _read_rows(path)}
    return done


def _write_manifest(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def _merge_manifests(manifest: Path, jobs: list[Job]) -> list[dict[str, Any]]:
    """Fold the per-rank manifests into the manifest, rows in plan order (what one process writes), then remove
    them: the merged file is written (atomically) before any part is deleted, so a kill loses no row."""
    done = _read_done(manifest)
    rows = [done[job.id] for job in jobs if job.id in done]
    _write_manifest(manifest, rows)
    for part in _part_manifests(manifest):
        part.unlink(missing_ok=True)
    return rows


def augment(args: argparse.Namespace) -> Path:
    """Synthesize the planned variants into ``args.out`` (resuming a partial run); returns the manifest path.

    On several ranks (`common.distributed`: `--trainer-config` names them) every rank plans the same jobs and reads
    the same finished ones, takes its share of the rest in whole batches (`Ranks.share_batches`), writes its images and its own manifest
    `manifest.part-<rank>.jsonl` after each batch; rank 0 merges them into `manifest.jsonl` in plan order, so the
    result is what one process writes, and an interrupted run resumes on any number of ranks."""
    ranks = current_ranks()
    samples = [s for s in read_captioned_manifest(args.manifest) if s.split == args.split]
    if not samples:
        raise ConfigError(f"{args.manifest} has no rows with split={args.split!r}")
    synth = Synthesizer(args.generator, args.steps, args.strength, args.guidance, args.eta, args.device)
    jobs = plan_jobs(samples, args.fraction, tuple(args.kinds), args.seed, args.balance)
    if args.limit is not None:
        jobs = jobs[: args.limit]
    out = Path(args.out)
    manifest = out / "manifest.jsonl"
    done = _read_done(manifest)
    if done and ranks.is_main:
        log.info("augment: resuming, %d of %d images already in %s", len(done), len(jobs), manifest)
    todo = [job for job in jobs if job.id not in done]
    ranks.barrier()  # every rank has read what is done before rank 0 folds the old parts in
    if ranks.is_main:
        _merge_manifests(manifest, jobs)
    ranks.barrier()  # ... and before any rank writes its own part
    share = [todo[i] for i in ranks.share_batches(len(todo), args.batch_size)]
    part = manifest.with_name(f"{manifest.stem}.part-{ranks.rank}.jsonl")
    mine: list[dict[str, Any]] = []
    skips = SkipLog("augment")
    for start in range(0, len(share), args.batch_size):
        batch = share[start : start + args.batch_size]
        loaded = []
        for job in batch:
            try:
                loaded.append((job, *load_source(job.source.path, synth.size)))
            except ImageDecodeError as error:
                skips.record(job.source.path, error.reason)
        if not loaded:
            continue
        images = torch.stack([image for _, image, _ in loaded])
        with torch.no_grad():
            variants, ms = synth(
                images,
                [job.source.caption for job, _, _ in loaded],
                [job.prompt for job, _, _ in loaded],
                [job.seed for job, _, _ in loaded],
            )
        for (job, _, original), variant in zip(loaded, variants):
            relative = Path("images") / job.source.subclass.replace("/", "__") / f"{job.id}.png"
            save_image(out / relative, variant)
            keep_boxes = job.kind != "view"
            mine.append(
                {
                    "id": job.id,
                    "path": str(relative),
                    "caption": job.prompt,
                    "subclass": job.source.subclass,
                    "subclass_id": job.source.subclass_id,
                    "split": "train",
                    "boxes": scale_boxes(job.source.boxes, original, synth.size) if keep_boxes else [],
                    "phrases": list(job.source.phrases) if keep_boxes else [],
                    "provenance": {
                        "source": job.source.path,
                        "source_caption": job.source.caption,
                        "kind": job.kind,
                        "prompt": job.prompt,
                        "seed": job.seed,
                        **synth.checkpoint,
                        "steps": synth.steps,
                        "strength": synth.strength,
                        "guidance": synth.guidance,
                        "eta": synth.eta,
                    },
                    "generation_ms": round(ms, 2),
                }
            )
        _write_manifest(part, mine)
        log.info("augment: rank %d: %d / %d images (%.0f ms/image)", ranks.rank, len(mine), len(share), ms)
    skipped = ranks.gather(skips.summary())
    ranks.barrier()  # every part is written
    if not ranks.is_main:
        return manifest
    rows = _merge_manifests(manifest, jobs)
    skip_counts: Counter[str] = Counter()
    for counts in skipped:
        skip_counts.update(counts)
    summary = {
        "images": len(rows),
        "source_images": len(samples),
        "fraction": len(rows) / len(samples),
        "balance": args.balance,
        "by_subclass": {
            name: {"source": n, "generated": sum(r["subclass"] == name for r in rows)}
            for name, n in sorted(Counter(s.subclass for s in samples).items())
        },
        "by_kind": {kind: sum(r["provenance"]["kind"] == kind for r in rows) for kind in KINDS},
        "generation_ms_per_image": float(np.mean([r["generation_ms"] for r in rows])) if rows else None,
        "image_size": synth.size,
        "skipped": dict(skip_counts),
        "ranks": ranks.world_size,
        **synth.checkpoint,
        "arguments": {k: v for k, v in vars(args).items() if k != "func"},
    }
    write_json(out / "dataset.json", summary)
    if args.realfake_root:
        write_realfake(synth, args.manifest, Path(args.realfake_root), args.realfake_per_split, args.seed)
    return manifest


def write_realfake(synth: Synthesizer, manifest: str, root: Path, per_split: int, seed: int) -> None:
    """`<root>/<split>/fg_guidance/0_real|1_fake/<name>.png` for the first ``per_split`` images of each split (the
    real image at the generator's size, and its regeneration from its own caption); existing pairs are kept."""
    samples = read_captioned_manifest(manifest)
    for split in ("train", "val", "test"):
        rows = [s for s in samples if s.split == split][:per_split]
        for i, sample in enumerate(rows):
            name = f"{split}_{i:05d}.png"
            real = root / split / REALFAKE_GENERATOR / "0_real" / name
            fake = root / split / REALFAKE_GENERATOR / "1_fake" / name
            if real.is_file() and fake.is_file():
                continue
            try:
                image, _ = load_source(sample.path, synth.size)
            except ImageDecodeError as error:
                log.warning("augment: realfake skips %s (%s)", sample.path, error.reason)
                continue
            with torch.no_grad():
                (variant,), _ = synth(image[None], [sample.caption], [sample.caption], [seed * 7919 + i])
            save_image(real, to_pil(image[None])[0])
            save_image(fake, variant)
        log.info(
            "augment: real/fake %s: %d pairs under %s", split, len(rows), root / split / REALFAKE_GENERATOR
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forgelab augment",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--generator", required=True, help="<run>/generator folder exported by the fit")
    parser.add_argument("--manifest", default="data/toy_world/parts/manifest.jsonl", help="captioned JSONL")
    parser.add_argument("--split", default="train", help="split of the manifest to augment")
    parser.add_argument("--out", default=None, help="output dataset folder (or --root + --name)")
    parser.add_argument("--root", default="runs", help="with --name: write to <root>/fg_guidance/<name>")
    parser.add_argument("--name", default=None, help="with --root: write to <root>/fg_guidance/<name>")
    parser.add_argument(
        "--fraction", type=float, default=0.5, help="images to add, as a fraction of the split"
    )
    parser.add_argument(
        "--balance",
        default="proportional",
        choices=BALANCES,
        help="per subclass: fraction x its own images (proportional) or the same number each (balanced)",
    )
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--limit", type=int, default=None, help="stop after this many images (smoke runs)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps T (default: the generator's)")
    parser.add_argument(
        "--strength", type=float, default=0.6, help="fraction of T inverted before regenerating"
    )
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance to the prompt")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic given the prompt)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="images per manifest checkpoint")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--realfake-root", default=None, help="also write <root>/<split>/fg_guidance/0_real|1_fake"
    )
    parser.add_argument("--realfake-per-split", type=int, default=16)
    parser.add_argument(
        "--trainer-config",
        action="append",
        default=[],
        help="config file(s) whose trainer: section says on how many ranks to run, as for fit "
        "(configs/trainer/ddp.yaml: every GPU of the node; ddp_sim.yaml: two CPU processes); repeatable",
    )
    return parser


def main(argv: list[str]) -> None:
    """Entry point of `forgelab augment`."""
    args = build_parser().parse_args(argv)
    if args.out is None:
        if args.name is None:
            raise ConfigError("set --out, or --name (and --root) to write to <root>/fg_guidance/<name>")
        args.out = str(Path(args.root) / "fg_guidance" / args.name)
    if args.manifest.startswith("data/toy_world"):
        from common.data.toy_world import ensure_toy_world

        ensure_toy_world("data/toy_world")
    manifest = launch(trainer_section(args.trainer_config), augment, args)
    if manifest is None:  # a rank > 0 of a launcher-started job: rank 0 reports
        return
    summary = json.loads((manifest.parent / "dataset.json").read_text())
    print(
        f"augment: {summary['images']} images (+{100 * summary['fraction']:.0f} % of {summary['source_images']}), "
        f"{summary['generation_ms_per_image'] or 0:.0f} ms/image -> {manifest}"
    )
