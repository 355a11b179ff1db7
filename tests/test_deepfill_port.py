"""Published DeepFill v2 weights (the community port's state-dict layouts) in forgelab's generator, and
TensorFlow's SAME padding on stride-2 gated convolutions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.backbones import registry
from common.errors import ConfigError
from projects.inpaint_probe.deepfill_port import (
    LAYOUTS,
    WEIGHT_LAYOUTS,
    convert_port_state_dict,
    load_port_generator,
    port_key_map,
    registered_weight_path,
)
from projects.inpaint_probe.gated_conv import DeepFillV2Generator, GatedConv2d, tf_same_pad
from projects.inpaint_probe.inpainters import DeepFillV2Inpainter

CNUM = 48  # the published models


def _pt_table(c: int) -> list[tuple[str, int, int, int, int, int, str]]:
    """The port's model/networks.py Generator, written out: (name, in, out, kernel, stride, rate, activation)."""
    rows = [("stage1.conv1", 5, c // 2, 5, 1, 1, "elu")]
    rows += [("stage1.down_block1.conv1_downsample", c // 2, c, 3, 2, 1, "elu")]
    rows += [("stage1.down_block1.conv2", c, c, 3, 1, 1, "elu")]
    rows += [("stage1.down_block2.conv1_downsample", c, 2 * c, 3, 2, 1, "elu")]
    rows += [("stage1.down_block2.conv2", 2 * c, 2 * c, 3, 1, 1, "elu")]
    rates = {1: 1, 2: 2, 3: 4, 4: 8, 5: 16, 6: 1, 7: 1}
    rows += [(f"stage1.conv_bn{i}", 2 * c, 2 * c, 3, 1, r, "elu") for i, r in rates.items()]
    up = [
        ("up_block1.conv1_upsample.conv", 2 * c, c),
        ("up_block1.conv2", c, c),
        ("up_block2.conv1_upsample.conv", c, c // 2),
        ("up_block2.conv2", c // 2, c // 4),
    ]
    rows += [(f"stage1.{n}", i, o, 3, 1, 1, "elu") for n, i, o in up]
    rows += [("stage1.conv_to_rgb", c // 4, 3, 3, 1, 1, "none")]
    rows += [("stage2.b1_conv1", 3, c // 2, 5, 1, 1, "elu")]
    rows += [("stage2.b1_down_block1.conv1_downsample", c // 2, c // 2, 3, 2, 1, "elu")]
    rows += [("stage2.b1_down_block1.conv2", c // 2, c, 3, 1, 1, "elu")]
    rows += [("stage2.b1_down_block2.conv1_downsample", c, c, 3, 2, 1, "elu")]
    rows += [("stage2.b1_down_block2.conv2", c, 2 * c, 3, 1, 1, "elu")]
    rows += [(f"stage2.b1_conv_bn{i}", 2 * c, 2 * c, 3, 1, rates[i], "elu") for i in range(1, 6)]
    rows += [("stage2.b2_conv1", 3, c // 2, 5, 1, 1, "elu")]
    rows += [("stage2.b2_down_block1.conv1_downsample", c // 2, c // 2, 3, 2, 1, "elu")]
    rows += [("stage2.b2_down_block1.conv2", c // 2, c, 3, 1, 1, "elu")]
    rows += [("stage2.b2_down_block2.conv1_downsample", c, 2 * c, 3, 2, 1, "elu")]
    rows += [("stage2.b2_down_block2.conv2", 2 * c, 2 * c, 3, 1, 1, "elu")]
    rows += [("stage2.b2_conv_bn1", 2 * c, 2 * c, 3, 1, 1, "relu")]
    rows += [(f"stage2.b2_conv_bn{i}", 2 * c, 2 * c, 3, 1, 1, "elu") for i in (4, 5)]
    rows += [
        ("stage2.conv_bn6", 4 * c, 2 * c, 3, 1, 1, "elu"),
        ("stage2.conv_bn7", 2 * c, 2 * c, 3, 1, 1, "elu"),
    ]
    rows += [(f"stage2.{n}", i, o, 3, 1, 1, "elu") for n, i, o in up]
    rows += [("stage2.conv_to_rgb", c // 4, 3, 3, 1, 1, "none")]
    return rows


def _tf_table(c: int) -> list[tuple[str, int, int, int, int, int, str]]:
    """The port's model/networks_tf.py Generator (flat names), written out."""
    rows = [("conv1", 5, c // 2, 5, 1, 1, "elu"), ("conv2_downsample", c // 2, c, 3, 2, 1, "elu")]
    rows += [("conv3", c, c, 3, 1, 1, "elu"), ("conv4_downsample", c, 2 * c, 3, 2, 1, "elu")]
    rows += [("conv5", 2 * c, 2 * c, 3, 1, 1, "elu"), ("conv6", 2 * c, 2 * c, 3, 1, 1, "elu")]
    rows += [(f"conv{i}_atrous", 2 * c, 2 * c, 3, 1, r, "elu") for i, r in zip(range(7, 11), (2, 4, 8, 16))]
    rows += [("conv11", 2 * c, 2 * c, 3, 1, 1, "elu"), ("conv12", 2 * c, 2 * c, 3, 1, 1, "elu")]
    rows += [("conv13_upsample.conv", 2 * c, c, 3, 1, 1, "elu"), ("conv14", c, c, 3, 1, 1, "elu")]
    rows += [("conv15_upsample.conv", c, c // 2, 3, 1, 1, "elu"), ("conv16", c // 2, c // 4, 3, 1, 1, "elu")]
    rows += [("conv17", c // 4, 3, 3, 1, 1, "none")]
    for branch in ("xconv", "pmconv"):
        rows += [(f"{branch}1", 3, c // 2, 5, 1, 1, "elu")]
        rows += [
            (f"{branch}2_downsample", c // 2, c // 2, 3, 2, 1, "elu"),
            (f"{branch}3", c // 2, c, 3, 1, 1, "elu"),
        ]
    rows += [("xconv4_downsample", c, c, 3, 2, 1, "elu"), ("xconv5", c, 2 * c, 3, 1, 1, "elu")]
    rows += [("xconv6", 2 * c, 2 * c, 3, 1, 1, "elu")]
    rows += [(f"xconv{i}_atrous", 2 * c, 2 * c, 3, 1, r, "elu") for i, r in zip(range(7, 11), (2, 4, 8, 16))]
    rows += [("pmconv4_downsample", c, 2 * c, 3, 2, 1, "elu"), ("pmconv5", 2 * c, 2 * c, 3, 1, 1, "elu")]
    rows += [("pmconv6", 2 * c, 2 * c, 3, 1, 1, "relu")]
    rows += [("pmconv9", 2 * c, 2 * c, 3, 1, 1, "elu"), ("pmconv10", 2 * c, 2 * c, 3, 1, 1, "elu")]
    rows += [("allconv11", 4 * c, 2 * c, 3, 1, 1, "elu"), ("allconv12", 2 * c, 2 * c, 3, 1, 1, "elu")]
    rows += [("allconv13_upsample.conv", 2 * c, c, 3, 1, 1, "elu"), ("allconv14", c, c, 3, 1, 1, "elu")]
    rows += [("allconv15_upsample.conv", c, c // 2, 3, 1, 1, "elu")]
    rows += [("allconv16", c // 2, c // 4, 3, 1, 1, "elu"), ("allconv17", c // 4, 3, 3, 1, 1, "none")]
    return rows


def _state_dict(table) -> dict[str, torch.Tensor]:
    """Random tensors with the port's key names and shapes (gated layers hold 2 x out filters)."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, cin, cout, k, _stride, _rate, act in table:
        filters = cout if act == "none" else 2 * cout
        state[f"{name}.conv.weight"] = torch.randn(filters, cin, k, k, generator=gen) * 0.05
        state[f"{name}.conv.bias"] = torch.randn(filters, generator=gen) * 0.05
    return state


@pytest.fixture(scope="module")
def port_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepfill_port")
    files = {}
    for name, table in (("pt", _pt_table(CNUM)), ("tf", _tf_table(CNUM))):
        state = _state_dict(table)
        path = root / f"states_{name}_places2.pth"
        torch.save({"G": state, "D": {"conv1.weight": torch.zeros(1)}}, path)  # the port also stores D
        files[name] = (path, state, table)
    return files


@pytest.mark.parametrize("layout", ["pt", "tf"])
def test_every_port_key_maps_onto_the_matching_layer(port_files, layout):
    path, state, table = port_files[layout]
    generator = load_port_generator(path)
    assert generator.padding == LAYOUTS[layout].padding and generator.fuse == LAYOUTS[layout].fuse
    mapping = port_key_map(LAYOUTS[layout])
    assert set(mapping) == set(state)  # every key of the port's generator, and nothing else
    ours = generator.state_dict()
    assert set(mapping.values()) == set(ours)  # every forgelab tensor is filled
    modules = dict(generator.named_modules())
    for name, cin, _cout, k, stride, rate, act in table:
        target = mapping[f"{name}.conv.weight"]
        assert torch.equal(ours[target], state[f"{name}.conv.weight"]), name
        assert torch.equal(ours[target.replace("weight", "bias")], state[f"{name}.conv.bias"]), name
        layer = modules[target.rsplit(".", 1)[0].removesuffix(".conv")]
        conv = layer.conv if isinstance(layer, GatedConv2d) else layer
        assert (conv.in_channels, conv.kernel_size, conv.stride, conv.dilation) == (
            cin,
            (k, k),
            (stride,) * 2,
            (rate,) * 2,
        ), name
        assert (layer.activation if isinstance(layer, GatedConv2d) else "none") == act, name


def test_loaded_published_layout_runs_and_inpainter_uses_it(port_files):
    path, _, _ = port_files["tf"]
    module = DeepFillV2Inpainter(
        preset="pretrained", weights="deepfill_v2/places2-tf", checkpoint_path=str(path)
    )
    assert module.generator.padding == "tf_same" and module.generator.fuse is False
    assert torch.equal(
        module.generator.coarse[1].conv.weight, port_files["tf"][1]["conv2_downsample.conv.weight"]
    )
    image, hole = torch.rand(1, 3, 32, 32), torch.zeros(1, 1, 32, 32)
    hole[..., 8:20, 10:22] = 1
    out = module.inpaint(image, hole)
    assert out.shape == image.shape and torch.equal(out * (1 - hole), image * (1 - hole))
    with pytest.raises(ConfigError, match="layout"):  # a pt file named as the tf weights
        DeepFillV2Inpainter(
            preset="pretrained", weights="deepfill_v2/places2-tf", checkpoint_path=str(port_files["pt"][0])
        )


def test_missing_weight_file_and_bad_state_dicts_are_one_line_errors(tmp_path, port_files, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match="does not exist") as err:
        DeepFillV2Inpainter(preset="pretrained", weights="deepfill_v2/places2-pt")
    assert "\n" not in str(err.value) and "states_pt_places2.pth" in str(err.value)
    with pytest.raises(ConfigError, match="needs weights"):
        DeepFillV2Inpainter(preset="pretrained")
    state = dict(port_files["pt"][1])
    state.pop("stage2.b2_conv_bn4.conv.bias")
    state["stage2.extra.conv.weight"] = torch.zeros(1)
    with pytest.raises(ConfigError, match=r"1 missing .* 1 unexpected"):
        convert_port_state_dict(state, LAYOUTS["pt"])
    with pytest.raises(ConfigError, match="width-4"):
        load_port_generator(port_files["pt"][0], width=4)


def test_registered_weight_files_name_their_layout_and_location(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    for model_id in WEIGHT_LAYOUTS:
        entry = registry.get(model_id)
        assert entry.family == "file" and entry.url and entry.filename.endswith(".pth")
        assert registered_weight_path(model_id) == tmp_path / "checkpoints" / entry.filename
    assert registry.default_id("inpainter.deepfill_v2") in WEIGHT_LAYOUTS


def test_tf_same_padding_on_a_stride_2_layer_matches_a_hand_computed_example():
    """4x4 input 0..15, 3x3 all-ones kernel, stride 2. TensorFlow SAME: out 2x2, total padding
    (2 - 1) * 2 + 3 - 4 = 1 per axis, all of it bottom/right, so output (i, j) sums rows 2i..2i+2 and
    columns 2j..2j+2 of the input zero-extended below/right:
    [[0+1+2+4+5+6+8+9+10, 2+3+6+7+10+11], [8+9+10+12+13+14, 10+11+14+15]] = [[45, 39], [66, 50]]."""
    x = torch.arange(16.0).view(1, 1, 4, 4)
    layer = GatedConv2d(1, 1, 3, stride=2, padding="tf_same")
    with torch.no_grad():
        layer.conv.weight.fill_(1.0)
        layer.conv.bias.zero_()
    expected = torch.tensor([[45.0, 39.0], [66.0, 50.0]])
    pre = layer.pre_activation(x)
    assert torch.equal(pre[0, 0], expected) and torch.equal(pre[0, 1], expected)  # feature and gate halves
    assert torch.allclose(layer(x)[0, 0], F.elu(expected) * torch.sigmoid(expected))
    explicit = F.conv2d(F.pad(x, (0, 1, 0, 1)), torch.ones(1, 1, 3, 3), stride=2)
    assert torch.equal(explicit[0, 0], expected)
    symmetric = GatedConv2d(1, 1, 3, stride=2)  # PyTorch's padding=1: same size, other values
    with torch.no_grad():
        symmetric.conv.weight.fill_(1.0)
        symmetric.conv.bias.zero_()
    assert symmetric.pre_activation(x).shape == pre.shape and not torch.equal(
        symmetric.pre_activation(x), pre
    )
    # odd sizes pad evenly, and stride-1 (dilated) layers pad as the symmetric rule
    assert tf_same_pad(torch.zeros(1, 1, 5, 5), 3, 2).shape[-2:] == (7, 7)
    assert tf_same_pad(torch.zeros(1, 1, 6, 6), 3, 1, dilation=4).shape[-2:] == (14, 14)


def test_tf_same_generator_keeps_sizes():
    generator = DeepFillV2Generator(4, padding="tf_same", fuse=False)
    coarse, refined = generator(torch.rand(1, 3, 24, 40) * 2 - 1, torch.zeros(1, 1, 24, 40))
    assert coarse.shape == refined.shape == (1, 3, 24, 40)
