"""A local Hugging Face cache in the hub's layout, holding small random-weight checkpoints under the registry's ids.

transformers tests its `from_pretrained` paths with tiny random checkpoints published under real-looking repo ids;
offline, the same works from a cache laid out like the hub's:
`<cache>/models--<org>--<name>/snapshots/<commit>/...` and `refs/main` holding the commit. With `HF_HUB_CACHE`
pointing here and `HF_HUB_OFFLINE=1`, `preset: pretrained` runs the exact code a GPU user runs (the same
`from_pretrained` calls, processors and configs read from files), only with small weights.

- transformers and diffusers models: each factory's tiny preset (same class, small config), written with
  `save_pretrained`, processors and tokenizers included;
- torch-fidelity's Inception-v3 (FID): the real architecture with random weights, in torch hub's checkpoints
  folder under the fixture's TORCH_HOME (`torch_home/`), where a download would have put it;
- DeepFill v2's published generators: the full-size network with random weights in the community port's
  state-dict layout (`{"G": ...}` under the port's key names), in the same checkpoints folder;
- timm: timm resolves `resnet50.tv_in1k` to the hub repo `timm/resnet50.tv_in1k` and loads its
  `model.safetensors` into the real architecture, so these are the real architectures with random weights
  (stored in fp16; timm copies them into the fp32 model). EfficientNet-B0 is small enough for the fast tier; the
  others (ResNet-50/101, VGG-16) and open_clip's CLIP RN50 are the `full` tier, for the slow tests. ConvNeXt-XL
  (350M parameters) is not written at all: a slow test builds it with random weights instead.

The cache is built once per builder version (a hash of this file and the factory modules it saves) into
`~/.cache/forgelab/` (or $FORGELAB_HUB_FIXTURE_ROOT) and reused by later test sessions and clones.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch

from common.backbones import registry
from tests.conftest import REPO

# Files whose content decides what the fixture holds: a change to any of them builds a new cache.
_BUILDER_SOURCES = (
    "tests/hub_cache.py",
    "common/backbones/transformers_models.py",
    "common/backbones/diffusion_models.py",
    "common/backbones/tokenizers.py",
    "common/backbones/timm_models.py",
    "common/backbones/registry.py",
    "projects/inpaint_probe/deepfill_port.py",
)
LIGHT_TIMM = ("efficientnet_b0.ra_in1k",)
HEAVY_TIMM = ("resnet50.tv_in1k", "resnet101.tv_in1k", "vgg16.tv_in1k")
TOO_LARGE = ("convnext_xlarge.fb_in22k_ft_in1k_384",)  # a slow test builds it with random weights instead


def builder_hash() -> str:
    digest = hashlib.sha256()
    for source in _BUILDER_SOURCES:
        digest.update((REPO / source).read_bytes())
    return digest.hexdigest()[:16]


def fake_commit(repo: str) -> str:
    """A 40-hex commit id per repo and builder version, as a real snapshot folder is named."""
    return hashlib.sha1(f"{builder_hash()}:{repo}".encode()).hexdigest()


def snapshot_dir(cache: Path, repo: str) -> Path:
    """Create `models--org--name/refs/main` -> commit and return the empty snapshot folder of that commit."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    commit = fake_commit(repo)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def _save_transformers(cache: Path, entry: registry.ModelEntry) -> None:
    from common import backbones

    model, processor = getattr(backbones, entry.factory)(entry.name, preset="tiny")
    snapshot = snapshot_dir(cache, entry.hub_repo)
    model.save_pretrained(snapshot, safe_serialization=True)
    processor.save_pretrained(snapshot)


def _save_diffusers(cache: Path, entry: registry.ModelEntry) -> None:
    from common.backbones import build_pipeline, create_diffusion_components

    inpainting = "inpainting" in entry.name
    components = create_diffusion_components(entry.name, preset="tiny", inpainting=inpainting)
    pipeline = build_pipeline(components, "inpaint" if inpainting else "text2img")
    pipeline.save_pretrained(snapshot_dir(cache, entry.hub_repo), safe_serialization=True)


def _save_timm(cache: Path, entry: registry.ModelEntry) -> None:
    import timm

    model = timm.create_model(entry.name, pretrained=False)  # the real architecture and its 1000-class head
    state = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    snapshot = snapshot_dir(cache, entry.hub_repo)
    safetensors.torch.save_file(state, str(snapshot / "model.safetensors"))


def _save_open_clip(cache: Path, entry: registry.ModelEntry) -> None:
    import open_clip

    model_name, _tag = entry.name.split("/")
    model = open_clip.create_model(model_name, pretrained=None)
    state = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    safetensors.torch.save_file(
        state, str(snapshot_dir(cache, entry.hub_repo) / "open_clip_model.safetensors")
    )


def torch_home(cache: Path) -> Path:
    """The TORCH_HOME of the fixture: torch hub's checkpoints folder for the files outside the hub."""
    return cache / "torch_home"


def _save_file(cache: Path, entry: registry.ModelEntry) -> None:
    """torch-fidelity's Inception-v3 (FID) as a state dict of the real architecture with random weights, where
    torch hub's download would have put it; DeepFill v2's published generators in the port's layout."""
    from unittest import mock

    if entry.factory.endswith("deepfill_port.load_port_generator"):
        from projects.inpaint_probe.deepfill_port import LAYOUTS, WEIGHT_LAYOUTS, port_key_map

        layout = LAYOUTS[WEIGHT_LAYOUTS[entry.name]]
        ours = layout.generator().state_dict()
        state = {port: ours[key] for port, key in port_key_map(layout).items()}
        target = torch_home(cache) / "hub" / "checkpoints" / entry.file_name
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"G": state}, target)
        return

    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    # Build the architecture without the download its constructor starts, then save its (random) weights.
    with (
        mock.patch.object(fidelity, "load_state_dict_from_url", return_value={}),
        mock.patch.object(fidelity.FeatureExtractorInceptionV3, "load_state_dict"),
    ):
        model = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    target = torch_home(cache) / "hub" / "checkpoints" / entry.file_name
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), target)


_SAVERS: dict[str, Callable[[Path, registry.ModelEntry], None]] = {
    "file": _save_file,
    "transformers": _save_transformers,
    "diffusers": _save_diffusers,
    "timm": _save_timm,
    "open_clip": _save_open_clip,
}


def entries(tier: str) -> list[registry.ModelEntry]:
    """The registry entries a tier holds: `light` (fast tests) or `full` (light + the heavy real architectures)."""
    chosen = []
    for entry in registry.MODELS:
        if (
            entry.family in ("transformers", "diffusers", "file")
            or entry.name in LIGHT_TIMM
            or (tier == "full" and (entry.name in HEAVY_TIMM or entry.family == "open_clip"))
        ):
            chosen.append(entry)
    return chosen


def build(cache: Path, tier: str) -> Path:
    """Write the tier's checkpoints into a fresh cache folder (into a temporary sibling, renamed when complete,
    so an interrupted build is never mistaken for a finished one)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=cache.name + ".tmp-", dir=cache.parent))
    for entry in entries(tier):
        _SAVERS[entry.family](staging, entry)
    try:
        staging.rename(cache)
    except OSError:  # another session finished the same build first
        shutil.rmtree(staging, ignore_errors=True)
    return cache


def hub_cache(tier: str = "light") -> Path:
    """The fixture cache of `tier`, built on first use."""
    root = Path(os.environ.get("FORGELAB_HUB_FIXTURE_ROOT", Path.home() / ".cache" / "forgelab"))
    cache = root / f"hub-fixture-{tier}-{builder_hash()}"
    if not cache.is_dir():
        build(cache, tier)
    cache.touch()  # marks it in use; other versions unused for a day are pruned (another clone may be on one)
    for old in root.glob("hub-fixture-*"):
        if old != cache and time.time() - old.stat().st_mtime > 86400:
            shutil.rmtree(old, ignore_errors=True)
    return cache
