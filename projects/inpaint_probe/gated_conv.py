"""Gated convolution and DeepFill v2 (Yu et al. 2019, "Free-Form Image Inpainting with Gated Convolution"):
the coarse-to-fine generator with a dilated bottleneck and contextual attention, and the SN-PatchGAN
discriminator.

Layer by layer as the authors' released TensorFlow model (`inpaint_model.py` of DeepFill v2), with one naming
change: `width` is the number of channels a gated layer OUTPUTS (the official `cnum = 48` counts the convolution's
filters before they are split into feature and gate halves, so width 24 is the paper's model). Images enter and
leave the networks in [-1, 1]; the hole mask is (B, 1, H, W) with 1 in the hole.
"""

from __future__ import annotations

import itertools
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


def gated_activation(feature: torch.Tensor, gating: torch.Tensor, activation: str = "elu") -> torch.Tensor:
    """Yu et al. (2019) Sec. 3.1: O = φ(Feature) ⊙ σ(Gating), with Feature = W_f * I and Gating = W_g * I, φ = ELU
    (ReLU in the layer before contextual attention, as the official model)."""
    phi = F.elu(feature) if activation == "elu" else F.relu(feature)
    return phi * torch.sigmoid(gating)


Padding = Literal["symmetric", "tf_same"]
PADDINGS: tuple[str, ...] = ("symmetric", "tf_same")


def tf_same_pad(x: torch.Tensor, kernel: int, stride: int, dilation: int = 1) -> torch.Tensor:
    """Zero-pad (B, C, H, W) as TensorFlow's padding="SAME": output size ceil(size / stride), the total padding
    max((out - 1) * stride + dilation * (kernel - 1) + 1 - size, 0) split with the extra pixel at the bottom/right.
    On an even input a 3x3 stride-2 layer pads (0, 1): nothing on top/left, one row/column on the bottom/right
    (a symmetric padding of 1 gives the same size but samples the image one pixel shifted)."""
    effective = dilation * (kernel - 1) + 1
    top, bottom = _same_pad(x.shape[2], effective, stride)
    left, right = _same_pad(x.shape[3], effective, stride)
    return F.pad(x, (left, right, top, bottom))


class GatedConv2d(nn.Module):
    """One convolution with 2 x `out_ch` filters split into the feature and the gate of `gated_activation`.

    padding "symmetric": `dilation * (kernel - 1) / 2` on every side (PyTorch ports, e.g. the community port's
    `networks.py`); "tf_same": TensorFlow's "SAME" (`tf_same_pad`), as the authors' released model: it differs
    from the symmetric one on stride-2 layers only, where TensorFlow pads the bottom/right more.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int = 3,
        stride: int = 1,
        dilation: int = 1,
        activation: str = "elu",
        padding: Padding = "symmetric",
    ) -> None:
        super().__init__()
        if activation not in ("elu", "relu"):
            raise ValueError(f"activation must be elu or relu, got {activation!r}")
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
        self.padding = padding
        symmetric = dilation * (kernel - 1) // 2 if padding == "symmetric" else 0
        self.conv = nn.Conv2d(in_ch, 2 * out_ch, kernel, stride, symmetric, dilation)
        self.activation = activation

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution's 2 x out_ch outputs (feature and gating halves) with this layer's padding."""
        if self.padding == "tf_same":
            x = tf_same_pad(x, self.conv.kernel_size[0], self.conv.stride[0], self.conv.dilation[0])
        return self.conv(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feature, gating = self.pre_activation(x).chunk(2, dim=1)
        return gated_activation(feature, gating, self.activation)


class GatedUpConv2d(GatedConv2d):
    """DeepFill's `gen_deconv`: nearest-neighbour upsampling x2, then a 3x3 gated convolution."""

    def __init__(self, in_ch: int, out_ch: int, padding: Padding = "symmetric") -> None:
        super().__init__(in_ch, out_ch, 3, 1, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.interpolate(x, scale_factor=2, mode="nearest"))


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) along one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _patches(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, C, k, k): every `kernel` patch at `stride` with 'SAME' padding (zeros)."""
    top, bottom = _same_pad(x.shape[2], kernel, stride)
    left, right = _same_pad(x.shape[3], kernel, stride)
    cols = F.unfold(F.pad(x, (left, right, top, bottom)), kernel, stride=stride)  # (B, C*k*k, L)
    b, c = x.shape[:2]
    return cols.view(b, c, kernel, kernel, -1).permute(0, 4, 1, 2, 3)


def _fuse(scores: torch.Tensor, fg_hw: tuple[int, int], bg_hw: tuple[int, int], k: int = 3) -> torch.Tensor:
    """Attention propagation: sum the scores of neighbouring foreground positions matched with the
    correspondingly neighbouring background patches (an identity kernel on the (fg, bg) score matrix), along
    rows then columns. scores (L_bg, h, w) -> (L_bg, h, w)."""
    (h, w), (bh, bw) = fg_hw, bg_hw
    eye = torch.eye(k, dtype=scores.dtype, device=scores.device).view(1, 1, k, k)
    y = scores.permute(1, 2, 0).reshape(1, 1, h * w, bh * bw)
    y = F.conv2d(y, eye, padding=k // 2)
    y = y.view(h, w, bh, bw).permute(1, 0, 3, 2).reshape(1, 1, w * h, bw * bh)
    y = F.conv2d(y, eye, padding=k // 2)
    y = y.view(w, h, bw, bh).permute(1, 0, 3, 2).reshape(h, w, bh * bw)
    return y.permute(2, 0, 1)


def contextual_attention(
    foreground: torch.Tensor,
    background: torch.Tensor,
    hole: torch.Tensor,
    patch_size: int = 3,
    rate: int = 2,
    softmax_scale: float = 10.0,
    fuse: bool = True,
) -> torch.Tensor:
    """Contextual attention (Yu et al. 2018, "Generative Image Inpainting with Contextual Attention", Sec. 4.1),
    the refinement network's attention branch in DeepFill v2.

    At 1/`rate` resolution, every foreground position is matched against every 3x3 background patch that lies
    wholly outside the hole by cosine similarity s = <f, b / ||b||>; the scores are propagated (`_fuse`), turned
    into attention by softmax(10 s) over the valid patches, and the output is the attention-weighted sum of the
    corresponding 2*rate x 2*rate full-resolution background patches (a transposed convolution), divided by 4
    for their overlap. `hole` is (B, 1, H, W) at the features' resolution.
    """
    b, _c, h, w = foreground.shape
    kernel = 2 * rate
    raw = _patches(background, kernel, rate)  # (B, L, C, 2r, 2r): what is pasted
    fg = F.interpolate(foreground, scale_factor=1 / rate, mode="nearest")
    bg = F.interpolate(background, scale_factor=1 / rate, mode="nearest")
    small_hole = F.interpolate(hole, size=bg.shape[-2:], mode="nearest")
    patches = _patches(bg, patch_size, 1)  # (B, L, C, 3, 3): what is matched
    hole_patches = _patches(small_hole, patch_size, 1)  # (B, L, 1, 3, 3)
    usable = (hole_patches.flatten(2).amax(dim=2) == 0).to(fg.dtype).view(b, -1, 1, 1)  # (B, L, 1, 1)
    if raw.shape[1] != patches.shape[1]:
        raise ValueError(f"contextual attention needs H and W divisible by {rate}, got {h}x{w}")
    outputs = []
    for i in range(b):
        weights = patches[i]
        norms = weights.flatten(1).norm(dim=1).clamp(min=1e-4).view(-1, 1, 1, 1)
        scores = F.conv2d(fg[i : i + 1], weights / norms, padding=patch_size // 2)[0]  # (L, h', w')
        if fuse:
            scores = _fuse(scores, tuple(fg.shape[-2:]), tuple(bg.shape[-2:]))
        scores = scores * usable[i]
        attention = torch.softmax(scores * softmax_scale, dim=0) * usable[i]
        pasted = F.conv_transpose2d(attention.unsqueeze(0), raw[i], stride=rate, padding=(kernel - rate) // 2)
        outputs.append(pasted[..., :h, :w] / 4.0)
    return torch.cat(outputs, 0)


class DeepFillV2Generator(nn.Module):
    """The coarse network and the two-branch refinement network of DeepFill v2 (gated convolutions throughout).

    forward(image, hole) with image in [-1, 1] (any values in the hole) returns (coarse, refined), both in
    [-1, 1]. H and W must be multiples of 8 (two stride-2 layers, then contextual attention at rate 2).
    """

    stride = 8

    def __init__(
        self, width: int = 24, attention: bool = True, padding: Padding = "symmetric", fuse: bool = True
    ) -> None:
        super().__init__()
        if width < 2 or width % 2:
            raise ValueError(f"width must be an even number >= 2, got {width}")
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
        w = width
        self.attention = attention
        self.padding = padding
        self.fuse = fuse  # attention propagation; the community port's TF-weights model runs without it
        conv = partial(GatedConv2d, padding=padding)
        self.coarse = nn.Sequential(
            conv(5, w, 5),
            conv(w, 2 * w, 3, 2),
            conv(2 * w, 2 * w, 3),
            conv(2 * w, 4 * w, 3, 2),
            conv(4 * w, 4 * w, 3),
            conv(4 * w, 4 * w, 3),
            *self._dilated_bottleneck(4 * w, padding),
            conv(4 * w, 4 * w, 3),
            conv(4 * w, 4 * w, 3),
            *self._decoder(4 * w, w, padding),
        )
        self.refine_conv = nn.Sequential(
            conv(3, w, 5),
            conv(w, w, 3, 2),
            conv(w, 2 * w, 3),
            conv(2 * w, 2 * w, 3, 2),
            conv(2 * w, 4 * w, 3),
            conv(4 * w, 4 * w, 3),
            *self._dilated_bottleneck(4 * w, padding),
        )
        self.refine_attention_in = nn.Sequential(
            conv(3, w, 5),
            conv(w, w, 3, 2),
            conv(w, 2 * w, 3),
            conv(2 * w, 4 * w, 3, 2),
            conv(4 * w, 4 * w, 3),
            conv(4 * w, 4 * w, 3, activation="relu"),
        )
        self.refine_attention_out = nn.Sequential(conv(4 * w, 4 * w, 3), conv(4 * w, 4 * w, 3))
        self.refine_out = nn.Sequential(
            conv(8 * w, 4 * w, 3), conv(4 * w, 4 * w, 3), *self._decoder(4 * w, w, padding)
        )

    @staticmethod
    def _dilated_bottleneck(ch: int, padding: Padding = "symmetric") -> list[nn.Module]:
        """Four 3x3 gated convolutions with dilation 2, 4, 8, 16: a large receptive field at 1/4 resolution."""
        return [GatedConv2d(ch, ch, 3, dilation=d, padding=padding) for d in (2, 4, 8, 16)]

    @staticmethod
    def _decoder(ch: int, w: int, padding: Padding = "symmetric") -> list[nn.Module]:
        """Two gated up-convolutions back to full resolution and a plain 3x3 output convolution + tanh
        (stride 1 everywhere: "SAME" and symmetric padding agree)."""
        return [
            GatedUpConv2d(ch, 2 * w, padding),
            GatedConv2d(2 * w, 2 * w, 3, padding=padding),
            GatedUpConv2d(2 * w, w, padding),
            GatedConv2d(w, w // 2, 3, padding=padding),
            nn.Conv2d(w // 2, 3, 3, 1, 1),
            nn.Tanh(),
        ]

    def forward(self, image: torch.Tensor, hole: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if image.shape[-1] % self.stride or image.shape[-2] % self.stride:
            raise ValueError(
                f"DeepFill v2 needs H and W divisible by {self.stride}, got {tuple(image.shape[-2:])}; pad first"
            )
        incomplete = image * (1.0 - hole)
        ones = torch.ones_like(hole)
        coarse = self.coarse(torch.cat([incomplete, ones, ones * hole], 1))
        pasted = coarse * hole + incomplete * (1.0 - hole)
        hallucinated = self.refine_conv(pasted)
        x = self.refine_attention_in(pasted)
        if self.attention:
            x = contextual_attention(
                x, x, F.interpolate(hole, size=x.shape[-2:], mode="nearest"), fuse=self.fuse
            )
        x = self.refine_attention_out(x)
        refined = self.refine_out(torch.cat([hallucinated, x], 1))
        return coarse, refined


class SNPatchGANDiscriminator(nn.Module):
    """Yu et al. (2019) Sec. 3.2: six 5x5 stride-2 convolutions with spectral normalisation and LeakyReLU(0.2)
    (widths 64, 128, 256, 256, 256, 256 for `width` 64) on [image, hole mask]; every element of the last feature
    map is the score of one receptive-field patch ("a GAN loss on each patch")."""

    def __init__(self, width: int = 64, in_channels: int = 4) -> None:
        super().__init__()
        channels = [in_channels, width, 2 * width, 4 * width, 4 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(channels):
            layers += [spectral_norm(nn.Conv2d(a, b, 5, 2, 2)), nn.LeakyReLU(0.2)]
        self.layers = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] and (B, 1, H, W) -> (B, N) patch scores."""
        return self.layers(torch.cat([image, hole], 1)).flatten(1)
