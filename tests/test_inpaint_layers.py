"""Paper 003 inpainters: the defining equations of partial convolution (Liu et al. 2018, Eq. 1-2), gated
convolution (Yu et al. 2019), contextual attention, and every loss term, against hand computations and naive
re-implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from projects.inpaint_probe.gated_conv import (
    DeepFillV2Generator,
    GatedConv2d,
    SNPatchGANDiscriminator,
    contextual_attention,
    gated_activation,
)
from projects.inpaint_probe.losses import (
    LIU_WEIGHTS,
    VGG16Features,
    composite,
    gram_matrix,
    hinge_discriminator_loss,
    hinge_generator_loss,
    hole_loss,
    liu_loss_terms,
    liu_total_loss,
    perceptual_loss,
    style_loss,
    total_variation_loss,
    two_stage_l1_loss,
    valid_loss,
)
from projects.inpaint_probe.partial_conv import PConvUNet, partial_conv2d

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]).view(1, 1, 3, 3)
VALID = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]).view(1, 1, 3, 3)
W = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0], [3.0, 0.0, 1.0]]).view(1, 1, 3, 3)
B = torch.tensor([0.5])


# --- partial convolution (Liu et al. Eq. 1 and 2) -------------------------------------------------------------


def test_partial_conv_renormalises_by_the_valid_fraction_of_the_window_hand_example():
    out, new_valid = partial_conv2d(X, VALID, W, B)
    # W^T (X ⊙ M) = 1*1 + 3*7 + 1*9 = 31; sum(1)/sum(M) = 9/6; + b
    assert out.item() == pytest.approx(31 * 9 / 6 + 0.5)
    assert new_valid.item() == 1.0


def test_partial_conv_with_zero_padding_counts_the_padding_as_invalid_hand_example():
    out, new_valid = partial_conv2d(X, VALID, W, B, padding=1)
    # top-left window: valid inputs 1 (under W[1,1]=1), 2 (W[1,2]=0), 4 (W[2,1]=0): 1 * 9/3 + b
    assert out[0, 0, 0, 0].item() == pytest.approx(1 * 9 / 3 + 0.5)
    # bottom-right window: 5 and 6 are holes, the rest padding, except 8 (under W[1,0]=0) and 9 (W[1,1]=1)
    assert out[0, 0, 2, 2].item() == pytest.approx(9 * 9 / 2 + 0.5)
    assert torch.equal(new_valid, torch.ones(1, 1, 3, 3))


def test_partial_conv_outputs_zero_and_keeps_the_hole_where_no_input_is_valid():
    valid = torch.zeros(1, 1, 5, 5)
    valid[..., 0, 0] = 1
    out, new_valid = partial_conv2d(torch.randn(1, 1, 5, 5), valid, W, B, padding=1)
    expected_mask = torch.zeros(1, 1, 5, 5)
    expected_mask[..., :2, :2] = 1  # Eq. 2: windows that see the one valid pixel
    assert torch.equal(new_valid, expected_mask)
    assert torch.all(out[new_valid == 0] == 0)  # not even the bias where sum(M) = 0


def _naive_partial_conv(x, valid, weight, bias):
    """Eq. 1-2 window by window on an already padded input and mask (float64)."""
    c_out, c_in, k, _ = weight.shape
    h, w = x.shape[-2] - k + 1, x.shape[-1] - k + 1
    out = torch.zeros(x.shape[0], c_out, h, w, dtype=torch.float64)
    mask = torch.zeros(x.shape[0], 1, h, w, dtype=torch.float64)
    for n in range(x.shape[0]):
        for i in range(h):
            for j in range(w):
                window_x = x[n, :, i : i + k, j : j + k].double()
                window_m = valid[n, :, i : i + k, j : j + k].double()
                count = window_m.sum()
                if count > 0:
                    mask[n, 0, i, j] = 1
                    for o in range(c_out):
                        value = (weight[o].double() * window_x * window_m).sum() * (c_in * k * k) / count
                        out[n, o, i, j] = value + bias[o]
    return out, mask


def test_partial_conv_matches_a_naive_loop_with_per_channel_masks():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 6, generator=generator)
    valid = (torch.rand(2, 3, 6, 6, generator=generator) > 0.6).float()
    weight = torch.randn(2, 3, 3, 3, generator=generator)
    bias = torch.randn(2, generator=generator)
    out, new_valid = partial_conv2d(x, valid, weight, bias, padding=1)
    pad = torch.nn.functional.pad
    expected, expected_mask = _naive_partial_conv(
        pad(x, (1, 1, 1, 1)), pad(valid, (1, 1, 1, 1)), weight, bias
    )
    assert torch.allclose(out.double(), expected, atol=1e-4)
    assert torch.equal(new_valid.double(), expected_mask)


def test_pconv_unet_output_does_not_depend_on_hole_pixel_values():
    """Partial convolutions condition only on valid pixels (Liu et al. Fig. 2g: 'agnostic to hole values')."""
    net = PConvUNet((8, 16, 16), (7, 5, 3)).eval()
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    hole = torch.zeros(2, 1, 32, 32)
    hole[..., 8:20, 10:26] = 1
    scribbled = image * (1 - hole) + hole * torch.randn_like(image) * 100
    with torch.no_grad():
        assert torch.allclose(net(image, 1 - hole), net(scribbled, 1 - hole), atol=1e-5)


def test_pconv_unet_refuses_sizes_off_its_stride():
    with pytest.raises(ValueError, match="divisible by 8"):
        PConvUNet((8, 8, 8), (3, 3, 3))(torch.rand(1, 3, 20, 24), torch.ones(1, 1, 20, 24))


# --- gated convolution (Yu et al. 2019) -----------------------------------------------------------------------


def test_gated_activation_is_elu_of_feature_times_sigmoid_of_gate_hand_values():
    feature = torch.tensor([-1.0, 0.0, 2.0])
    gate = torch.tensor([0.0, 3.0, -2.0])
    expected = [
        (math.exp(-1) - 1) * 0.5,
        0.0,
        2.0 / (1 + math.exp(2.0)),
    ]
    assert gated_activation(feature, gate).tolist() == pytest.approx(expected, abs=1e-6)


def test_gated_conv_layer_splits_one_convolution_into_feature_and_gate():
    layer = GatedConv2d(1, 1, kernel=1)
    with torch.no_grad():
        layer.conv.weight.copy_(torch.tensor([2.0, -1.0]).view(2, 1, 1, 1))
        layer.conv.bias.copy_(torch.tensor([0.1, 0.3]))
    x = torch.tensor([-1.0, 0.0, 0.5, 2.0]).view(1, 1, 2, 2)
    expected = []
    for v in x.flatten().tolist():
        f, g = 2 * v + 0.1, -v + 0.3
        elu = f if f > 0 else math.exp(f) - 1
        expected.append(elu / (1 + math.exp(-g)))
    assert layer(x).flatten().tolist() == pytest.approx(expected, abs=1e-6)


def test_contextual_attention_with_sharp_softmax_and_no_hole_reconstructs_the_background():
    """Each position attends to its own patch (the cosine score peaks there) and the transposed convolution of
    the 4x4 raw patches at stride 2, divided by 4, pastes every interior pixel back exactly."""
    background = torch.rand(1, 5, 16, 16, generator=torch.Generator().manual_seed(1))
    out = contextual_attention(
        background, background, torch.zeros(1, 1, 16, 16), softmax_scale=1e4, fuse=False
    )
    assert out.shape == background.shape
    assert torch.allclose(out[..., 1:-1, 1:-1], background[..., 1:-1, 1:-1], atol=1e-4)


def test_contextual_attention_never_copies_from_patches_touching_the_hole():
    background = torch.rand(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    hole = torch.zeros(2, 1, 16, 16)
    hole[..., 4:10, 6:12] = 1
    background = background * (1 - hole) + 1000 * hole  # any copy from the hole would show
    out = contextual_attention(background, background, hole)
    assert out.max() <= 1.0 + 1e-5


def test_deepfill_generator_shapes_range_and_hole_value_independence():
    net = DeepFillV2Generator(width=4).eval()
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    hole = torch.zeros(2, 1, 32, 32)
    hole[..., 5:20, 3:17] = 1
    with torch.no_grad():
        coarse, refined = net(image, hole)
        _, refined_scribbled = net(image * (1 - hole) + 50 * hole, hole)
    assert coarse.shape == refined.shape == image.shape
    assert coarse.abs().max() <= 1 and refined.abs().max() <= 1  # tanh outputs
    assert torch.allclose(refined, refined_scribbled, atol=1e-5)  # the input is image * (1 - hole)


def test_deepfill_v2_full_size_generator_has_the_papers_4_1m_parameters():
    assert round(sum(p.numel() for p in DeepFillV2Generator(24).parameters()) / 1e6, 1) == 4.1


def test_sn_patchgan_scores_one_value_per_patch_and_is_spectrally_normalised():
    disc = SNPatchGANDiscriminator(width=8)
    scores = disc(torch.rand(2, 3, 64, 64), torch.zeros(2, 1, 64, 64))
    assert scores.shape == (2, 32 * 1 * 1)  # six stride-2 layers: 64 -> 1, 4 * width channels
    first = disc.layers[0]
    disc.eval()
    sigma = torch.linalg.matrix_norm(first.weight.flatten(1), ord=2)
    assert sigma.item() == pytest.approx(1.0, abs=0.05)


# --- losses -----------------------------------------------------------------------------------------------------


def _pixels():
    out = torch.tensor([[0.5, 1.0], [0.0, 0.0]]).expand(1, 3, 2, 2)
    gt = torch.tensor([[0.0, 0.0], [0.0, 1.0]]).expand(1, 3, 2, 2)
    hole = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    return out, gt, hole


def test_hole_and_valid_losses_hand_example():
    out, gt, hole = _pixels()
    assert hole_loss(out, gt, hole).item() == pytest.approx((0.5 + 1.0) / 4)
    assert valid_loss(out, gt, hole).item() == pytest.approx((1.0 + 0.0) / 4)
    assert torch.equal(composite(out, gt, hole)[0, 0], torch.tensor([[0.5, 0.0], [0.0, 0.0]]))


def test_gram_and_style_loss_match_numpy():
    rng = np.random.default_rng(0)
    f, g = rng.normal(size=(2, 4, 3, 5)), rng.normal(size=(2, 4, 3, 5))

    def gram(a):
        flat = a.reshape(2, 4, 15)
        return np.einsum("bci,bdi->bcd", flat, flat) / (4 * 3 * 5)

    assert np.allclose(gram_matrix(torch.tensor(f)).numpy(), gram(f))
    expected = np.abs(gram(f) - gram(g)).mean()  # 1/(C C) ||.||_1, averaged over the batch
    assert style_loss([torch.tensor(f)], [torch.tensor(g)]).item() == pytest.approx(expected)


def test_perceptual_loss_sums_out_and_comp_terms_over_layers():
    a, c, g = [torch.full((1, 2, 2, 2), 3.0)], [torch.full((1, 2, 2, 2), 1.5)], [torch.ones(1, 2, 2, 2)]
    assert perceptual_loss(a * 2, c * 2, g * 2).item() == pytest.approx(2 * (2.0 + 0.5))


def test_total_variation_is_restricted_to_the_dilated_hole_hand_example():
    comp = torch.arange(16.0).view(1, 1, 4, 4)
    hole = torch.zeros(1, 1, 4, 4)
    hole[..., 0, 0] = 1  # P = the top-left 2x2 block
    # horizontal pairs in P: 2 x |1|, vertical: 2 x |4|; N = 16
    assert total_variation_loss(comp, hole).item() == pytest.approx((2 * 1 + 2 * 4) / 16)


def test_liu_total_loss_uses_the_papers_weights():
    assert LIU_WEIGHTS == {"valid": 1.0, "hole": 6.0, "perceptual": 0.05, "style": 120.0, "tv": 0.1}
    terms = {
        k: torch.tensor(v)
        for k, v in zip(["valid", "hole", "perceptual", "style_out", "style_comp", "tv"], range(1, 7))
    }
    assert liu_total_loss(terms).item() == pytest.approx(1 + 6 * 2 + 0.05 * 3 + 120 * (4 + 5) + 0.1 * 6)


def test_hinge_losses_hand_example():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3)
    assert hinge_generator_loss(fake).item() == pytest.approx(1 / 3)
    target = torch.zeros(1, 3, 2, 2)
    assert two_stage_l1_loss(target + 0.5, target - 0.25, target).item() == pytest.approx(0.75)


def test_vgg_features_are_pool1_to_pool3_frozen_and_stay_in_eval_mode():
    vgg = VGG16Features(preset="tiny")
    vgg.train()
    assert not vgg.training and not any(p.requires_grad for p in vgg.parameters())
    features = vgg(torch.rand(2, 3, 32, 32))
    assert [f.shape[-1] for f in features] == [16, 8, 4]
    assert [f.shape[1] for f in features] == [8, 16, 32]  # VGG-16's 64/128/256 at the tiny preset's 1/8 width


def test_liu_loss_terms_are_zero_for_a_perfect_output_and_positive_otherwise():
    vgg = VGG16Features(preset="tiny")
    image = torch.rand(2, 3, 32, 32)
    hole = torch.zeros(2, 1, 32, 32)
    hole[..., 8:16, 8:16] = 1
    perfect = liu_loss_terms(image, image, hole, vgg)
    assert all(v.item() == pytest.approx(0.0, abs=1e-6) for k, v in perfect.items() if k != "tv")
    wrong = liu_loss_terms(image.flip(-1), image, hole, vgg)
    assert all(v.item() > 0 for v in wrong.values())
