"""timm image classifiers (the real-vs-fake table's backbones), with a tiny preset of the same class.

A tiny model is built by the same timm entrypoint (or the same builder, where the entrypoint pins the widths)
with small depths and widths, so code paths that depend on the class (feature_info, heads, reset_classifier)
are exercised by the tests exactly as with the full model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from timm.models import build_model_with_cfg, model_entrypoint, split_model_name_tag
from timm.models.efficientnet import _gen_efficientnet
from timm.models.vgg import VGG
from timm.models.vgg import cfgs as vgg_cfgs
from torch import nn

from common.backbones.presets import (
    Preset,
    check_preset,
    hub_cache_dir,
    pretrained_unavailable,
    seeded,
)
from common.backbones.registry import default_revision
from common.errors import ConfigError

# The classifiers of ITEM's comparison table; every convnext_*, vgg*, resnet* (timm.models.resnet) and
# efficientnet_b*/l2 name has a tiny preset too.
TIMM_CLASSIFIERS: tuple[str, ...] = (
    "convnext_xlarge.fb_in22k_ft_in1k_384",
    "vgg16.tv_in1k",
    "resnet50.tv_in1k",
    "efficientnet_b0.ra_in1k",
    "resnet101.tv_in1k",
)


def create_timm_classifier(
    name: str,
    *,
    preset: Preset = "pretrained",
    num_classes: int = 2,
    checkpoint_path: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """Build the timm classifier ``name`` with a fresh ``num_classes`` head.

    ``pretrained`` loads timm's weights (from the Hugging Face cache or the network) and raises
    PretrainedUnavailableError when it cannot; ``random`` is the full architecture, randomly initialised;
    ``tiny`` is the same class with small depths/widths and seeded random weights, offline and fast.
    ``checkpoint_path`` then loads a local state dict (ours, or a Lightning checkpoint of a module holding the
    classifier); with it, ``pretrained`` downloads nothing, since every weight is replaced anyway. The model is
    returned in train mode, as timm builds it: it is the part that gets trained. ``revision`` pins a commit of
    the weights' hub repository (default: the registry's pinned revision, if any).
    """
    check_preset(preset)
    arch, _ = split_model_name_tag(name)
    if not timm.is_model(arch):
        near = timm.list_models(f"{arch[:5]}*")[:5]
        raise ConfigError(
            f"backbone={name!r} is not a timm model; allowed: any timm.list_models() name"
            + (f", e.g. {', '.join(near)}" if near else f", e.g. {', '.join(TIMM_CLASSIFIERS)}")
        )
    if preset == "tiny":
        with seeded():
            model = _create_tiny(name, num_classes=num_classes, **timm_kwargs)
    elif preset == "pretrained" and checkpoint_path is None:
        revision = revision or default_revision(name)
        if revision:  # timm reads a revision from the hub id's "@<revision>" suffix
            pretrained_cfg = timm.models.get_pretrained_cfg(name)
            hub_id = pretrained_cfg.hf_hub_id if pretrained_cfg is not None else None
            if not hub_id:
                raise ConfigError(f"{name!r} has no hub repository, so it cannot take a revision")
            timm_kwargs["pretrained_cfg_overlay"] = {"hf_hub_id": f"{hub_id.split('@')[0]}@{revision}"}
        try:
            model = timm.create_model(
                name, pretrained=True, num_classes=num_classes, cache_dir=hub_cache_dir(), **timm_kwargs
            )
        except OSError as error:  # hub and URL download errors; a bad name or tag stays timm's RuntimeError
            pretrained_cfg = timm.models.get_pretrained_cfg(name)
            hub_repo = pretrained_cfg.hf_hub_id if pretrained_cfg is not None else None
            raise pretrained_unavailable(name, error, repo_id=hub_repo) from None
    else:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **timm_kwargs)
    if checkpoint_path is not None:
        load_local_weights(model, checkpoint_path)
    return model


def _create_tiny(name: str, *, num_classes: int, **timm_kwargs: Any) -> nn.Module:
    """The same architecture class as ``name`` with small depths and widths, chosen per family.

    ``timm_kwargs`` override the family's tiny settings (e.g. ``layers=(1, 2, 1, 1)``).
    """
    arch, _ = split_model_name_tag(name)
    family_module = model_entrypoint(arch).__module__  # also rejects unknown names with timm's own message
    if arch.startswith("convnext"):
        tiny = {"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128), "ls_init_value": 1.0}
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **(tiny | timm_kwargs))
    if arch.startswith("resnet") and family_module == "timm.models.resnet":
        # resnetv2_* and the CLIP/byobnet "resnet" names are other classes with other arguments.
        # Widths are multiples of 32 so the GroupNorm variants (resnet50_gn) build too.
        tiny = {"layers": (1, 1, 1, 1), "channels": (32, 32, 64, 64), "stem_width": 32}
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **(tiny | timm_kwargs))
    if arch.startswith("vgg"):
        # The VGG entrypoints pin the layer widths (vgg.cfgs), so build the VGG class directly from the same
        # layer pattern at 1/8 width, with a 64-wide hidden head instead of 4096.
        narrow_cfg = [v if v == "M" else v // 8 for v in vgg_cfgs[arch.split("_")[0]]]
        tiny: dict[str, Any] = {"mlp_ratio": 64 / 4096}
        if arch.endswith("_bn"):
            tiny["norm_layer"] = nn.BatchNorm2d
        return build_model_with_cfg(
            VGG,
            arch,
            pretrained=False,
            model_cfg=narrow_cfg,
            feature_cfg={"flatten_sequential": True, "out_indices": (0, 1, 2, 3, 4, 5)},
            num_classes=num_classes,
            **(tiny | timm_kwargs),
        )
    if re.fullmatch(r"efficientnet_(b\d|l2)", arch):
        # The entrypoints pin the width/depth multipliers; timm's generator for the B-series takes them.
        tiny = {"channel_multiplier": 0.25, "depth_multiplier": 0.25}
        return _gen_efficientnet(arch, pretrained=False, num_classes=num_classes, **(tiny | timm_kwargs))
    raise ValueError(
        f"No tiny preset for timm model {name!r}. Tiny presets exist for convnext_*, vgg*, resnet* "
        f"(timm.models.resnet) and efficientnet_b0..b8/l2; use preset 'random' for a full-size random model."
    )


def load_local_weights(model: nn.Module, checkpoint_path: str | os.PathLike[str]) -> None:
    """Load a local state dict into ``model``, strictly, so untrained weights are never evaluated by accident.

    Accepts ``.safetensors``, a plain ``torch.save``'d state dict, or a Lightning checkpoint (its
    ``state_dict``; the keys under the attribute holding the classifier, e.g. ``model.``, are used). Loading
    uses ``weights_only=True``: a checkpoint is data, never code to run.
    """
    path = Path(checkpoint_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path} (checkpoint_path must be a local file)")
    if path.suffix == ".safetensors":
        state_dict: Any = safetensors.torch.load_file(str(path), device="cpu")
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state_dict, Mapping) and isinstance(state_dict.get("state_dict"), Mapping):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")

    expected = model.state_dict()
    state_dict = _select_model_weights(dict(state_dict), set(expected))
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(
        f"{key}: {tuple(state_dict[key].shape)} vs {tuple(expected[key].shape)}"
        for key in set(expected) & set(state_dict)
        if state_dict[key].shape != expected[key].shape
    )
    if missing or unexpected or wrong_shape:
        problems = [
            f"{label} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", wrong_shape),
            )
            if keys
        ]
        raise ValueError(
            f"Checkpoint {path} does not match {type(model).__name__}: "
            + "; ".join(problems)
            + ". Check the model name, preset and num_classes the checkpoint was trained with."
        )
    model.load_state_dict(state_dict, strict=True)


def _select_model_weights(
    state_dict: dict[str, torch.Tensor], model_keys: set[str]
) -> dict[str, torch.Tensor]:
    """The part of ``state_dict`` meant for the model, with the model's own key names.

    In a Lightning checkpoint the classifier's keys sit under the attribute holding it (``model.``), possibly
    beside other modules' keys (a frozen encoder, a loss buffer): take the prefix under which every model key is
    found, and every key under it, so extra keys there are still reported. Without such a prefix, strip the one
    all keys share, so the mismatch report names keys as the model does.
    """
    anchor = min(model_keys)
    prefixes = {key.removesuffix(anchor) for key in state_dict if key == anchor or key.endswith("." + anchor)}
    complete = sorted(p for p in prefixes if all(p + key in state_dict for key in model_keys))
    if len(complete) > 1:
        raise ValueError(f"The checkpoint holds several copies of the model's weights, under {complete}")
    prefix = complete[0] if complete else _shared_prefix(list(state_dict))
    return {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}


def _shared_prefix(keys: list[str]) -> str:
    """The leading dotted components all keys share (``module.``, ``model.``), keeping one per key."""
    parts = [key.split(".") for key in keys]
    depth = 0
    while parts and all(len(p) > depth + 1 and p[depth] == parts[0][depth] for p in parts):
        depth += 1
    return "".join(part + "." for part in parts[0][:depth]) if parts else ""


def timm_data_config(model: nn.Module) -> dict[str, Any]:
    """Input size, mean, std, interpolation and crop the model's pretrained weights expect (timm's resolution).

    Tiny models keep the full name's pretrained config, so the data pipeline is the one the real model gets.
    """
    return timm.data.resolve_data_config(model=model)
