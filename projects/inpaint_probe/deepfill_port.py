"""Published DeepFill v2 Places2 weights in forgelab's gated-convolution generator (paper 003's premise: the
inpainters it probes were trained on real photographs).

The weights are those of the community PyTorch port nipponjo/deepfillv2-pytorch, in its two state-dict layouts
(both `torch.load(path)["G"]`, cnum 48 = width 24 here):

* "tf" (`states_tf_places2.pth`): the authors' released TensorFlow Places2 model converted to PyTorch, for the
  port's `model/networks_tf.py`: flat keys `conv1.conv.weight`, `conv2_downsample...`, `xconv*` (refinement
  conv branch), `pmconv*` (attention branch), `allconv*`; TensorFlow "SAME" padding (on stride-2 layers the
  bottom/right get the extra row/column) and contextual attention without score propagation (fuse=False).
* "pt" (`states_pt_places2.pth`): the port's own training on Places2, for `model/networks.py`: nested keys
  `stage1.conv1.conv.weight`, `stage1.down_block1.conv1_downsample.conv.weight`, `stage2.b1_*` (conv branch),
  `stage2.b2_*` (attention branch); symmetric padding `dilation * (k - 1) / 2` and fuse=True.

Both are the same network layer for layer as `DeepFillV2Generator` (same in/out channels, gated halves in the same
order: feature first, gate second, as torch.split/chunk take them), so loading is a renaming. The files are
registered in common/backbones/registry.py (Google Drive, fetched by hand) and read from torch hub's checkpoints
folder unless a path is given; they are never downloaded here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.backbones import registry
from common.errors import ConfigError
from projects.inpaint_probe.gated_conv import DeepFillV2Generator, Padding

# The port's layer names in the order of forgelab's nn.Sequential children (see module docstring).
_BOTTLENECK_PT = [f"conv_bn{i}" for i in range(1, 8)]
_PT_LAYOUT: dict[str, list[str]] = {
    "coarse": [
        "stage1.conv1",
        "stage1.down_block1.conv1_downsample",
        "stage1.down_block1.conv2",
        "stage1.down_block2.conv1_downsample",
        "stage1.down_block2.conv2",
        *[f"stage1.{name}" for name in _BOTTLENECK_PT],
        "stage1.up_block1.conv1_upsample.conv",
        "stage1.up_block1.conv2",
        "stage1.up_block2.conv1_upsample.conv",
        "stage1.up_block2.conv2",
        "stage1.conv_to_rgb",
    ],
    "refine_conv": [
        "stage2.b1_conv1",
        "stage2.b1_down_block1.conv1_downsample",
        "stage2.b1_down_block1.conv2",
        "stage2.b1_down_block2.conv1_downsample",
        "stage2.b1_down_block2.conv2",
        *[f"stage2.b1_conv_bn{i}" for i in range(1, 6)],
    ],
    "refine_attention_in": [
        "stage2.b2_conv1",
        "stage2.b2_down_block1.conv1_downsample",
        "stage2.b2_down_block1.conv2",
        "stage2.b2_down_block2.conv1_downsample",
        "stage2.b2_down_block2.conv2",
        "stage2.b2_conv_bn1",
    ],
    "refine_attention_out": ["stage2.b2_conv_bn4", "stage2.b2_conv_bn5"],
    "refine_out": [
        "stage2.conv_bn6",
        "stage2.conv_bn7",
        "stage2.up_block1.conv1_upsample.conv",
        "stage2.up_block1.conv2",
        "stage2.up_block2.conv1_upsample.conv",
        "stage2.up_block2.conv2",
        "stage2.conv_to_rgb",
    ],
}
_TF_LAYOUT: dict[str, list[str]] = {
    "coarse": [
        "conv1",
        "conv2_downsample",
        "conv3",
        "conv4_downsample",
        "conv5",
        "conv6",
        *[f"conv{i}_atrous" for i in range(7, 11)],
        "conv11",
        "conv12",
        "conv13_upsample.conv",
        "conv14",
        "conv15_upsample.conv",
        "conv16",
        "conv17",
    ],
    "refine_conv": [
        "xconv1",
        "xconv2_downsample",
        "xconv3",
        "xconv4_downsample",
        "xconv5",
        "xconv6",
        *[f"xconv{i}_atrous" for i in range(7, 11)],
    ],
    "refine_attention_in": [
        "pmconv1",
        "pmconv2_downsample",
        "pmconv3",
        "pmconv4_downsample",
        "pmconv5",
        "pmconv6",
    ],
    "refine_attention_out": ["pmconv9", "pmconv10"],
    "refine_out": [
        "allconv11",
        "allconv12",
        "allconv13_upsample.conv",
        "allconv14",
        "allconv15_upsample.conv",
        "allconv16",
        "allconv17",
    ],
}


@dataclass(frozen=True)
class PortLayout:
    """One of the port's state-dict layouts and the generator options its weights were trained with."""

    name: str
    layers: Mapping[str, list[str]]
    padding: Padding
    fuse: bool
    marker: str  # a key only this layout has

    def generator(self, width: int = 24, attention: bool = True) -> DeepFillV2Generator:
        return DeepFillV2Generator(width, attention=attention, padding=self.padding, fuse=self.fuse)


LAYOUTS: dict[str, PortLayout] = {
    "tf": PortLayout("tf", _TF_LAYOUT, "tf_same", False, "conv2_downsample.conv.weight"),
    "pt": PortLayout("pt", _PT_LAYOUT, "symmetric", True, "stage1.conv1.conv.weight"),
}

# Registered published weight files (common/backbones/registry.py) and their layouts.
WEIGHT_LAYOUTS: dict[str, str] = {"deepfill_v2/places2-tf": "tf", "deepfill_v2/places2-pt": "pt"}


def port_key_map(layout: PortLayout) -> dict[str, str]:
    """{port key: forgelab key} for every weight and bias of the generator (each port layer holds its
    nn.Conv2d as `.conv`; forgelab's last layer of each decoder is a plain nn.Conv2d, its gated layers hold
    `.conv` too)."""
    reference = DeepFillV2Generator(2, attention=False)  # the module tree only; widths do not change names
    mapping: dict[str, str] = {}
    for branch, names in layout.layers.items():
        children = [
            (index, child)
            for index, child in enumerate(getattr(reference, branch))
            if any(True for _ in child.parameters())
        ]
        if len(children) != len(names):
            raise AssertionError(
                f"{layout.name} layout lists {len(names)} layers for {branch}, not {len(children)}"
            )
        for (index, child), name in zip(children, names):
            inner = "conv." if hasattr(child, "conv") else ""
            for param in ("weight", "bias"):
                mapping[f"{name}.conv.{param}"] = f"{branch}.{index}.{inner}{param}"
    return mapping


def detect_layout(state_dict: Mapping[str, Any]) -> PortLayout:
    """Which of the port's layouts `state_dict` has (by a key only that layout has)."""
    for layout in LAYOUTS.values():
        if layout.marker in state_dict:
            return layout
    sample = ", ".join(sorted(state_dict)[:3])
    raise ConfigError(
        f"not a DeepFill v2 state dict of the community port (no {' or '.join(m.marker for m in LAYOUTS.values())}; "
        f"keys start {sample})"
    )


def convert_port_state_dict(
    state_dict: Mapping[str, torch.Tensor], layout: PortLayout
) -> dict[str, torch.Tensor]:
    """Rename the port's generator weights to forgelab's; every key must map, none may be left out."""
    mapping = port_key_map(layout)
    unknown = sorted(set(state_dict) - set(mapping))
    missing = sorted(set(mapping) - set(state_dict))
    if unknown or missing:
        raise ConfigError(
            f"DeepFill v2 {layout.name} weights do not match the port's layout: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(unknown)} unexpected (e.g. {unknown[:2]})"
        )
    return {mapping[key]: value for key, value in state_dict.items()}


def read_port_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The generator's state dict from a port checkpoint (`{"G": ..., "D": ...}` or the bare G dict), read with
    weights_only=True. A missing file is one line naming the registry entry to fetch."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"DeepFill v2 weight file {path} does not exist: fetch it by hand (see `{registry.default_id('inpainter.deepfill_v2')}` "
            "in common/backbones/registry.py) or pass checkpoint_path"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights_only errors have no common base class
        raise ConfigError(
            f"{path} is not a readable torch checkpoint ({type(err).__name__}: {err})"
        ) from None
    state = checkpoint.get("G", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} holds no generator state dict (expected a mapping with 'G')")
    return dict(state)


def registered_weight_path(model_id: str) -> Path:
    """Where a registered DeepFill weight file is expected: torch hub's checkpoints folder, under its name."""
    entry = registry.get(model_id)
    if entry.family != "file" or entry.filename is None:
        raise ConfigError(f"{model_id!r} is not a registered DeepFill v2 weight file")
    return Path(torch.hub.get_dir()) / "checkpoints" / entry.filename


def load_port_generator(path: str | Path, width: int = 24, attention: bool = True) -> DeepFillV2Generator:
    """A `DeepFillV2Generator` built with the padding and attention options of the file's layout, holding the
    file's weights (loaded strictly: a shape mismatch is an error, never a silent partial load)."""
    state = read_port_checkpoint(path)
    layout = detect_layout(state)
    generator = layout.generator(width, attention)
    converted = convert_port_state_dict(state, layout)
    expected = generator.state_dict()
    wrong = [
        f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in converted.items()
        if v.shape != expected[k].shape
    ]
    if wrong:
        raise ConfigError(
            f"{path}: {len(wrong)} tensors do not fit a width-{width} DeepFill v2 (e.g. {wrong[0]}); the published "
            "weights are width 24 (cnum 48)"
        )
    generator.load_state_dict(converted, strict=True)
    return generator
