"""Partial convolution (Liu et al. 2018, "Image Inpainting for Irregular Holes Using Partial Convolutions") and
the paper's U-Net of partial convolutions.

Liu et al. write the mask M with 1 for VALID pixels; this file follows the paper and calls it `valid`
(`valid = 1 - hole` in this project's hole-mask convention, see masks.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def partial_conv2d(
    x: torch.Tensor,
    valid: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Liu et al. (2018) Eq. 1 and Eq. 2: the partial convolution and its mask update.

    x' = W^T (X ⊙ M) * sum(1)/sum(M) + b   where sum(M) > 0, else 0          (Eq. 1)
    m' = 1                                  where sum(M) > 0, else 0          (Eq. 2)

    sum(1) is the size of the sliding window over all input channels (C_in * kh * kw) and sum(M) the number of
    valid inputs in it, so the output is re-normalised to the amount of valid input. Zero padding counts as
    invalid ("partial convolution based padding"). `valid` is (B, 1, H, W) (shared by all channels) or
    (B, C_in, H, W) (per channel, as after a skip concatenation); the updated mask is (B, 1, H', W').
    """
    in_channels, kh, kw = weight.shape[1], weight.shape[2], weight.shape[3]
    if x.shape[1] != in_channels:
        raise ValueError(f"x has {x.shape[1]} channels, the weight expects {in_channels}")
    if valid.shape[1] not in (1, in_channels) or valid.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"valid mask {tuple(valid.shape)} does not fit input {tuple(x.shape)}")
    valid = valid.to(x.dtype)
    raw = F.conv2d(x * valid, weight, None, stride, padding, dilation)
    # sum(M), (B, 1, H', W'); a mask shared by all channels counts each valid pixel C_in times
    ones = torch.ones(1, valid.shape[1], kh, kw, dtype=x.dtype, device=x.device)
    valid_count = F.conv2d(valid, ones, None, stride, padding, dilation) * (in_channels // valid.shape[1])
    new_valid = (valid_count > 0.5).to(x.dtype)  # counts are integers; 0.5 guards float rounding
    window = float(in_channels * kh * kw)  # sum(1)
    ratio = window / valid_count.clamp(min=1.0) * new_valid
    out = raw * ratio
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out * new_valid, new_valid


class PartialConv2d(nn.Conv2d):
    """nn.Conv2d whose forward is `partial_conv2d`: (x, valid) -> (x', valid')."""

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return partial_conv2d(
            x, valid, self.weight, self.bias, self.stride[0], self.padding[0], self.dilation[0]
        )


class PConvBlock(nn.Module):
    """PConv -> optional BatchNorm -> activation (one row of Liu et al.'s architecture table)."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int, bn: bool, activation: nn.Module | None
    ) -> None:
        super().__init__()
        self.conv = PartialConv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, bias=not bn)
        self.bn = nn.BatchNorm2d(out_ch) if bn else None
        self.activation = activation

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, valid = self.conv(x, valid)
        if self.bn is not None:
            x = self.bn(x)
        if self.activation is not None:
            x = self.activation(x)
        return x, valid


class PConvUNet(nn.Module):
    """Liu et al. (2018) Sec. 3.2 U-Net: every convolution a partial convolution.

    Encoder PConv1..PConvN: stride 2, kernels 7, 5, 5, 3, 3, ... (the paper: widths 64, 128, 256, 512 x 5),
    BatchNorm except on PConv1, ReLU. Decoder: nearest-neighbour upsampling x2, concatenation of the skip's
    features AND masks (channel-wise), PConv 3x3, BatchNorm, LeakyReLU(0.2); the last layer takes the input image
    and mask as its skip and outputs 3 channels with no BatchNorm or activation.

    forward(image, valid) takes the network's input image (here in [-1, 1]) and the valid mask (B, 1, H, W); H and
    W must be multiples of `stride` (2^depth); the inpainting modules pad to it.
    """

    def __init__(
        self,
        widths: Sequence[int] = (64, 128, 256, 512, 512, 512, 512, 512),
        kernel_sizes: Sequence[int] = (7, 5, 5, 3, 3, 3, 3, 3),
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(widths) != len(kernel_sizes) or len(widths) < 2:
            raise ValueError(
                f"need one kernel size per encoder width (>= 2 layers): {widths}, {kernel_sizes}"
            )
        self.widths = tuple(widths)
        self.encoder = nn.ModuleList()
        previous = in_channels
        for i, (width, kernel) in enumerate(zip(widths, kernel_sizes)):
            self.encoder.append(PConvBlock(previous, width, kernel, 2, bn=i > 0, activation=nn.ReLU()))
            previous = width
        # decoder layer j upsamples the deeper output and concatenates encoder output depth-2-j (then the input)
        skips = [*reversed(widths[:-1]), in_channels]
        self.decoder = nn.ModuleList()
        for j, skip in enumerate(skips):
            last = j == len(skips) - 1
            out = in_channels if last else skip
            self.decoder.append(
                PConvBlock(
                    previous + skip,
                    out,
                    3,
                    1,
                    bn=not last,
                    activation=None if last else nn.LeakyReLU(0.2),
                )
            )
            previous = out

    @property
    def stride(self) -> int:
        return 2 ** len(self.widths)

    def encoder_batchnorms(self) -> list[nn.BatchNorm2d]:
        return [block.bn for block in self.encoder if block.bn is not None]

    def forward(self, image: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if image.shape[-1] % self.stride or image.shape[-2] % self.stride:
            raise ValueError(
                f"PConvUNet needs H and W divisible by {self.stride}, got {tuple(image.shape[-2:])}; pad first"
            )
        features: list[tuple[torch.Tensor, torch.Tensor]] = [(image, valid)]
        x, m = image, valid
        for block in self.encoder:
            x, m = block(x, m)
            features.append((x, m))
        features.pop()  # the bottleneck is not a skip
        for block in self.decoder:
            skip_x, skip_m = features.pop()
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            m = F.interpolate(m, scale_factor=2, mode="nearest")
            # per-channel masks: each part of the concatenation keeps its own validity
            mask = torch.cat(
                [m.expand(-1, x.shape[1], -1, -1), skip_m.expand(-1, skip_x.shape[1], -1, -1)], 1
            )
            x, m = block(torch.cat([x, skip_x], 1), mask)
        return x
