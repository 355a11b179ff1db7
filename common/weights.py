"""`forgelab weights`: which pretrained models some configs need, whether the local cache has them, how to get them.

    forgelab weights --config configs/trainer/gpu.yaml --config configs/item_detector/item_vitl14.yaml
    forgelab weights --config configs/inpaint_probe/probe.yaml --download      # fetch what is missing (online)

The configs are resolved by the same parser as the command they are for (`forgelab fit --print_config`, or the
project command a top-level `command:` names), so code defaults count too. Every part of the resolved config
whose `preset` is `pretrained` (weights) or `random` (config files only) is searched for the registry's model
names (common/backbones/registry.py); the exit code is 1 when anything is missing, so a job script can check
before it starts.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from common.backbones import registry
from common.backbones.presets import hub_cache_dir
from common.errors import ConfigError

# A value of `model_id: null` under these classes (or probe inpainter kinds) means this registry default.
IMPLICIT_MODEL: dict[str, str] = {
    "projects.inpaint_probe.diffusion_inpainter.DiffusionInpaintingFinetune": "sd.inpainting",
    "projects.fg_guidance.module.FineGrainedGuidance": "sd.text2img",
    "diffusion": "sd.inpainting",  # a probe inpainter of kind diffusion
}
# The one file whose presence says a snapshot of each family is there.
MARKER_FILE = {
    "transformers": "config.json",
    "diffusers": "model_index.json",
    "timm": "model.safetensors",
    "open_clip": "open_clip_model.safetensors",
}


@dataclass(frozen=True)
class Requirement:
    """One model a config needs: the registry entry, the revision asked for, and whether weights are needed."""

    entry: registry.ModelEntry
    revision: str | None
    weights: bool  # False for preset `random`: the config files are enough


@dataclass
class CacheStatus:
    cached: bool
    path: Path | None = None
    size_bytes: int = 0
    detail: str = ""


def resolve_config(config_files: Sequence[str]) -> dict[str, Any]:
    """The full config the command of these files would run with (defaults included), via its own parser."""
    from common.experiment.cli import main

    command = "fit"
    for path in config_files:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        command = loaded.get("command", command) if isinstance(loaded, dict) else command
    args = [command]
    for path in config_files:
        args += ["--config", str(path)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([*args, "--print_config"])
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                raise ConfigError(
                    f"cannot parse {' '.join(config_files)}: {err.getvalue().strip()}"
                ) from None
    return yaml.safe_load(out.getvalue()) or {}


def required_models(config: Any) -> list[Requirement]:
    """Registry models a resolved config loads, in order of first appearance, without duplicates."""
    found: dict[tuple[str, str | None], Requirement] = {}
    for name, revision, weights, family in _walk(config, preset=None, class_path=None, key=None):
        entry = registry.lookup(name) or unregistered(name, family)
        if not weights and entry.family in ("timm", "open_clip"):
            continue  # their random architectures are built from the library's code, no file needed
        key = (entry.name, revision)
        previous = found.get(key)
        found[key] = Requirement(entry, revision, weights or (previous.weights if previous else False))
    return list(found.values())


def unregistered(name: str, family: registry.Family) -> registry.ModelEntry:
    """A hub id a config names that the registry does not list (a user's own model): still checked."""
    return registry.ModelEntry(name, family, "", ("named by the config, not in forgelab's registry",), 0.0)


def _walk(node: Any, preset: str | None, class_path: str | None, key: str | None) -> Iterator[tuple]:
    """Yields (model name, revision, needs weights, family for an unregistered hub id)."""
    if isinstance(node, list):
        for item in node:
            yield from _walk(item, preset, class_path, key)
        return
    if isinstance(node, str):
        if preset in ("pretrained", "random"):
            if registry.lookup(node):
                yield node, None, preset == "pretrained", None
            elif (
                key == "captioner" and f"captioner.{node}" in registry.DEFAULTS
            ):  # fg_guidance's `captioner: blip`
                yield registry.default_id(f"captioner.{node}"), None, preset == "pretrained", None
        return
    if not isinstance(node, dict):
        return
    if isinstance(node.get("preset"), str):
        preset = node["preset"]
    class_path = node.get("class_path", class_path)
    active = preset in ("pretrained", "random")
    weights = preset == "pretrained"
    revision = node.get("revision") if isinstance(node.get("revision"), str) else None
    if key == "fid" and node.get("features") == "inception":  # `auto` falls back to substitute features
        yield registry.default_id("fid.inception"), None, True, None
    if active and "model_id" in node:
        model_id = node.get("model_id")
        diffusion = node.get("kind") == "diffusion" or IMPLICIT_MODEL.get(class_path or "", "").startswith(
            "sd."
        )
        if node.get("library") == "open_clip":
            yield registry.open_clip_name(model_id, node.get("pretrained")), revision, weights, "open_clip"
        elif model_id is None:
            role = None
            if key in ("captioner", "grounder") and f"{key}.{node.get('name')}" in registry.DEFAULTS:
                role = f"{key}.{node['name']}"
            elif node.get("kind") in IMPLICIT_MODEL:
                role = IMPLICIT_MODEL[node["kind"]]
            elif class_path in IMPLICIT_MODEL and node.get("base_weights") is None:
                role = IMPLICIT_MODEL[class_path]
            if role:
                yield registry.default_id(role), revision, weights, None
        elif (
            registry.lookup(model_id) or not Path(model_id).expanduser().exists()
        ):  # a local folder needs no hub
            yield model_id, revision, weights, "diffusers" if diffusion else "transformers"
    for child_key, value in node.items():
        if child_key in ("model_id", "revision", "class_path") or (
            child_key == "pretrained" and node.get("library") == "open_clip"
        ):
            continue  # handled above
        yield from _walk(value, preset, class_path, child_key)


def cache_status(requirement: Requirement) -> CacheStatus:
    """Whether the local Hugging Face cache (or torch hub's folder, for files) holds what the model needs."""
    entry = requirement.entry
    if entry.family == "file":
        import torch.hub

        path = Path(torch.hub.get_dir()) / "checkpoints" / entry.file_name
        return CacheStatus(path.is_file(), path, path.stat().st_size if path.is_file() else 0)
    from huggingface_hub import try_to_load_from_cache

    marker = MARKER_FILE[entry.family]
    revision = requirement.revision or entry.revision
    cache = hub_cache_dir()
    found = try_to_load_from_cache(entry.hub_repo, marker, cache_dir=cache, revision=revision)
    if entry.family == "open_clip" and not isinstance(found, str):
        found = try_to_load_from_cache(
            entry.hub_repo, "open_clip_pytorch_model.bin", cache_dir=cache, revision=revision
        )
    if not isinstance(found, str):
        return CacheStatus(False, detail=f"no {marker} for revision {revision or 'main'}")
    snapshot = Path(found).parent
    size = sum(p.stat().st_size for p in snapshot.rglob("*") if p.is_file())
    missing = _missing_weights(entry, snapshot) if requirement.weights else []
    if missing:
        return CacheStatus(False, snapshot, size, "config only, no weights: " + ", ".join(missing))
    return CacheStatus(True, snapshot, size)


def _missing_weights(entry: registry.ModelEntry, snapshot: Path) -> list[str]:
    """Parts of a snapshot with config files but no safetensors weights (a partial or config-only download)."""
    if entry.family == "diffusers":
        parts = ("unet", "vae", "text_encoder")
        return [part for part in parts if not list((snapshot / part).glob("*.safetensors"))]
    if entry.family == "transformers" and not list(snapshot.glob("*.safetensors")):
        return ["*.safetensors"]
    return []


def download_command(requirement: Requirement) -> str:
    """The shell command that fetches a missing model (what `--download` does)."""
    entry = requirement.entry
    if entry.family == "file":
        import torch.hub

        target = Path(torch.hub.get_dir()) / "checkpoints" / entry.file_name
        return (
            f"mkdir -p {shlex.quote(str(target.parent))} && curl -L -o {shlex.quote(str(target))} {entry.url}"
        )
    words = ["hf", "download", entry.hub_repo]
    revision = requirement.revision or entry.revision
    if revision:
        words += ["--revision", revision]
    if entry.exclude:
        words += ["--exclude", *entry.exclude]
    if os.environ.get("HF_HUB_CACHE"):
        words += ["--cache-dir", str(hub_cache_dir())]
    return " ".join(shlex.quote(word) for word in words)


def download(requirement: Requirement) -> None:
    entry = requirement.entry
    if entry.family == "file":
        import torch.hub

        target = Path(torch.hub.get_dir()) / "checkpoints" / entry.file_name
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(entry.url, str(target))  # writes a temporary file, then renames it
        return
    from huggingface_hub import snapshot_download

    snapshot_download(
        entry.hub_repo,
        revision=requirement.revision or entry.revision,
        cache_dir=hub_cache_dir(),
        ignore_patterns=list(entry.exclude),
    )


def _size(n_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


def report(requirements: Sequence[Requirement]) -> tuple[str, list[Requirement]]:
    """A Markdown table of the requirements and their cache status, and the list of missing ones."""
    lines = [
        f"Hugging Face cache: {hub_cache_dir()}",
        "",
        "| model | family | revision | needs | status | for |",
        "|---|---|---|---|---|---|",
    ]
    missing = []
    for requirement in requirements:
        entry, status = requirement.entry, cache_status(requirement)
        needs = "weights" if requirement.weights else "config files"
        revision = requirement.revision or entry.revision or "main"
        if status.cached:
            state = f"cached ({_size(status.size_bytes)})"
        else:
            state = f"MISSING (~{entry.size_gb:g} GB{'; ' + status.detail if status.detail else ''})"
            missing.append(requirement)
        note = f"; {entry.note}" if "mirror" in entry.note else ""
        lines.append(
            f"| {entry.name} | {entry.family} | {revision} | {needs} | {state} | {'; '.join(entry.roles)}{note} |"
        )
    if missing:
        lines += ["", "To fetch what is missing (on a machine with network access):", ""]
        lines += [f"    {download_command(r)}" for r in missing]
    return "\n".join(lines), missing


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="forgelab weights",
        description="List the pretrained models some configs need, check the local cache, print (or run) "
        "the downloads. Exit code 1 when something is missing.",
    )
    parser.add_argument("--config", action="append", required=True, help="config file (repeat, in run order)")
    parser.add_argument("--download", action="store_true", help="download what is missing (needs network)")
    args = parser.parse_args(argv)
    for path in args.config:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path} does not exist")
    requirements = required_models(resolve_config(args.config))
    if not requirements:
        print("These configs load no pretrained weights (every model is `tiny` or trained from scratch).")
        return
    table, missing = report(requirements)
    if missing and args.download:
        for requirement in missing:
            print(f"downloading {requirement.entry.name} ...", file=sys.stderr)
            download(requirement)
        table, missing = report(requirements)
    print(table)
    if missing:
        raise SystemExit(1)
