"""The inpainters' training objectives, one pure function per term.

Liu et al. (2018), "Image Inpainting for Irregular Holes Using Partial Convolutions", Sec. 3 "Loss Functions":
    L_total = L_valid + 6 L_hole + 0.05 L_perceptual + 120 (L_style_out + L_style_comp) + 0.1 L_tv
Yu et al. (2019), "Free-Form Image Inpainting with Gated Convolution" (DeepFill v2), Sec. 3.2: SN-PatchGAN hinge
losses, plus the pixel-wise L1 reconstruction loss of both stages (weights 1 and 1 in the official code).

Images are (B, 3, H, W) in [0, 1]; `hole` is (B, 1, H, W) with 1 in the hole (Liu et al.'s M is 1 - hole).
Norms follow the paper: ||.||_1 / N with N the number of elements of one image (C*H*W), averaged over the batch,
which is the mean absolute value over the whole tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.backbones import create_timm_classifier, timm_data_config

LIU_WEIGHTS: dict[str, float] = {"valid": 1.0, "hole": 6.0, "perceptual": 0.05, "style": 120.0, "tv": 0.1}


def composite(output: torch.Tensor, target: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """I_comp (Liu et al. Sec. 3): the network output in the hole, the ground truth elsewhere."""
    return hole * output + (1.0 - hole) * target


def hole_loss(output: torch.Tensor, target: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """Liu et al. L_hole = 1/N_Igt ||(1 - M) ⊙ (I_out - I_gt)||_1."""
    return (hole * (output - target)).abs().mean()


def valid_loss(output: torch.Tensor, target: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """Liu et al. L_valid = 1/N_Igt ||M ⊙ (I_out - I_gt)||_1."""
    return ((1.0 - hole) * (output - target)).abs().mean()


def perceptual_loss(
    out_features: Sequence[torch.Tensor],
    comp_features: Sequence[torch.Tensor],
    gt_features: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Liu et al. L_perceptual = sum_p ||Ψ_p(I_out) - Ψ_p(I_gt)||_1 / N_Ψp + ||Ψ_p(I_comp) - Ψ_p(I_gt)||_1 / N_Ψp,
    with Ψ_p the VGG-16 pool1..pool3 activations."""
    return sum(
        (o - g).abs().mean() + (c - g).abs().mean()
        for o, c, g in zip(out_features, comp_features, gt_features, strict=True)
    )


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """K_p Ψ_p^T Ψ_p with K_p = 1 / (C_p H_p W_p): (B, C, H, W) -> (B, C, C)."""
    b, c, h, w = features.shape
    flat = features.reshape(b, c, h * w)
    return flat @ flat.transpose(1, 2) / (c * h * w)


def style_loss(features: Sequence[torch.Tensor], gt_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Liu et al. L_style_out (features of I_out) or L_style_comp (of I_comp):
    sum_p 1/(C_p C_p) || K_p (Ψ_p^T Ψ_p - Ψ_p,gt^T Ψ_p,gt) ||_1."""
    return sum(
        (gram_matrix(f) - gram_matrix(g)).abs().mean() for f, g in zip(features, gt_features, strict=True)
    )


def dilated_hole_region(hole: torch.Tensor) -> torch.Tensor:
    """P: the hole dilated by one pixel (3x3 square structuring element)."""
    return F.max_pool2d(hole, kernel_size=3, stride=1, padding=1)


def total_variation_loss(comp: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """Liu et al. L_tv = sum_{(i,j),(i,j+1) in P} |I_comp[i,j+1] - I_comp[i,j]| / N_Icomp
    + sum_{(i,j),(i+1,j) in P} |I_comp[i+1,j] - I_comp[i,j]| / N_Icomp, P the 1-pixel dilation of the hole."""
    region = dilated_hole_region(hole)
    n = comp[0].numel()
    horizontal = region[..., :, 1:] * region[..., :, :-1] * (comp[..., :, 1:] - comp[..., :, :-1]).abs()
    vertical = region[..., 1:, :] * region[..., :-1, :] * (comp[..., 1:, :] - comp[..., :-1, :]).abs()
    return (horizontal.flatten(1).sum(1) + vertical.flatten(1).sum(1)).mean() / n


def liu_total_loss(
    terms: Mapping[str, torch.Tensor], weights: Mapping[str, float] = LIU_WEIGHTS
) -> torch.Tensor:
    """Liu et al. L_total = L_valid + 6 L_hole + 0.05 L_perceptual + 120 (L_style_out + L_style_comp) + 0.1 L_tv."""
    return (
        weights["valid"] * terms["valid"]
        + weights["hole"] * terms["hole"]
        + weights["perceptual"] * terms["perceptual"]
        + weights["style"] * (terms["style_out"] + terms["style_comp"])
        + weights["tv"] * terms["tv"]
    )


def hinge_discriminator_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """Yu et al. (2019) Sec. 3.2, SN-PatchGAN: L_D = E[ReLU(1 - D(x))] + E[ReLU(1 + D(G(z)))], every patch
    score of the discriminator's output map counted as one GAN sample."""
    return F.relu(1.0 - real_scores).mean() + F.relu(1.0 + fake_scores).mean()


def hinge_generator_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """Yu et al. (2019) Sec. 3.2: L_G = -E[D(G(z))]."""
    return -fake_scores.mean()


def two_stage_l1_loss(coarse: torch.Tensor, refined: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DeepFill v2's reconstruction term ("ae_loss", l1_loss_alpha = 1): the mean absolute error of the coarse
    and of the refined output over the whole image."""
    return (coarse - target).abs().mean() + (refined - target).abs().mean()


class VGG16Features(nn.Module):
    """Frozen VGG-16 pool1, pool2, pool3 activations (Ψ_p of Liu et al.'s perceptual and style losses), built by
    common.backbones.create_timm_classifier: ImageNet weights with preset "pretrained", the same layer pattern at
    1/8 width with "tiny". Input: images in [0, 1]; ImageNet normalisation happens here."""

    def __init__(self, name: str = "vgg16.tv_in1k", preset: str = "pretrained", n_pools: int = 3) -> None:
        super().__init__()
        model = create_timm_classifier(name, preset=preset, num_classes=0)
        config = timm_data_config(model)
        layers: list[nn.Module] = []
        self.taps: list[int] = []
        for layer in model.features:
            layers.append(layer)
            if isinstance(layer, nn.MaxPool2d):
                self.taps.append(len(layers) - 1)
                if len(self.taps) == n_pools:
                    break
        if len(self.taps) < n_pools:
            raise ValueError(f"{name} has fewer than {n_pools} pooling layers")
        self.layers = nn.Sequential(*layers)  # the rest of VGG (pool4, pool5, the 4096-wide MLP) is dropped
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config["std"]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VGG16Features:
        return super().train(
            False
        )  # a loss network: never in training mode, whatever the module around it does

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        x = (image - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out


def liu_loss_terms(
    output: torch.Tensor, target: torch.Tensor, hole: torch.Tensor, vgg: nn.Module
) -> dict[str, torch.Tensor]:
    """Every term of Liu et al.'s loss for one batch (VGG features of I_out, I_comp and I_gt computed once)."""
    comp = composite(output, target, hole)
    batch = output.shape[0]
    features = vgg(torch.cat([output, comp, target], 0))
    out_f = [f[:batch] for f in features]
    comp_f = [f[batch : 2 * batch] for f in features]
    gt_f = [f[2 * batch :] for f in features]
    return {
        "valid": valid_loss(output, target, hole),
        "hole": hole_loss(output, target, hole),
        "perceptual": perceptual_loss(out_f, comp_f, gt_f),
        "style_out": style_loss(out_f, gt_f),
        "style_comp": style_loss(comp_f, gt_f),
        "tv": total_variation_loss(comp, hole),
    }
