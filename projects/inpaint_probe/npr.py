"""NPR (Tan et al., CVPR 2024, "Rethinking the Up-Sampling Operations in CNN-based Generative Network for
Generalizable Deepfake Detection"): the neighbouring-pixel-relationship residual and its small ResNet.

Up-sampling layers (nearest, transposed convolutions, bilinear) make the pixels of each small block depend on one
another in a way camera images do not. NPR exposes that local correlation by subtracting from the image its own
nearest-neighbour down- then up-sampled copy (`npr_residual`, 2x2 blocks); a ResNet that keeps only its first two
stages (`NPRNet`) is trained from scratch on that residual, one logit, BCE.

What the authors' code does (github.com/chuangchuangtan/NPR-DeepfakeDetection, networks/resnet.py, commit
5dffad0): `NPR = x - interpolate(interpolate(x, scale_factor=0.5, mode="nearest"), scale_factor=2,
mode="nearest")` (both with `recompute_scale_factor=True`) on the ImageNet-normalised image, then
`conv1(NPR * 2/3)`; conv1 is a 3x3 convolution of stride 2 with 64 channels, then batch norm, ReLU, a 3x3
stride-2 max-pool, layer1 and layer2 of a ResNet-50 (Bottleneck blocks, [3, 4]), global average pooling and
`fc1 = Linear(512, 1)`. Training (their README/train.py): Adam lr 2e-4, the learning rate x0.8 every 10 epochs
(`--delr_freq 10`), batch 32. `NPRNet` (preset `full`) and `NPRDetector` do all of that; the stem stride is 2 as
in their code (a stride of 1 would keep full resolution through the stem at 4x the compute).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck

from common.tasks import RealFakeTask
from projects.inpaint_probe.classifier import single_logit_bce

NPRPreset = Literal["full", "tiny"]

# The ImageNet statistics their data pipeline normalises with before the residual (data/datasets.py).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# preset -> (stem width, Bottleneck planes of layer1 and layer2, blocks of each); `full` is the authors' network.
NPR_PRESETS: dict[str, tuple[int, tuple[int, int], tuple[int, int]]] = {
    "full": (64, (64, 128), (3, 4)),
    "tiny": (16, (16, 24), (1, 1)),
}


def npr_residual(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """NPR = x - up_nearest(down_nearest(x)) over `factor` x `factor` blocks of a batch (N, C, H, W).

    Nearest down-sampling by `factor` keeps the top-left pixel of every block (torch's nearest rule, source index
    floor(i * factor)) and nearest up-sampling copies it back over the block, so the residual is 0 at each
    block's top-left pixel and the difference to it elsewhere: exactly the authors' double `interpolate`.

    Sizes that are not a multiple of `factor` are cropped to one (the last H % factor rows and W % factor
    columns dropped), the choice of the commented-out lines of the authors' `forward` (their active code fails
    on odd sizes: the round trip returns H - 1 rows). Cropping, not padding, so no artificial rows of zero
    residual appear at the border of odd-sized images. The output is (N, C, H - H % factor, W - W % factor).
    """
    if x.dim() != 4:
        raise ValueError(f"npr_residual expects a batch (N, C, H, W), got shape {tuple(x.shape)}")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
        raise ValueError(f"NPR factor must be an integer >= 2, got {factor!r}")
    height, width = x.shape[-2:]
    if height < factor or width < factor:
        raise ValueError(
            f"npr_residual needs images of at least {factor} x {factor} pixels, got {height} x {width}"
        )
    x = x[..., : height - height % factor, : width - width % factor]
    height, width = x.shape[-2:]
    down = F.interpolate(x, size=(height // factor, width // factor), mode="nearest")
    return x - F.interpolate(down, size=(height, width), mode="nearest")


class NPRNet(nn.Module):
    """The authors' ResNet on the NPR residual: conv 3x3 stride 2 - BN - ReLU - max-pool 3x3/2, two ResNet-50
    stages of Bottleneck blocks (layer2 of stride 2), global average pooling, one linear logit (`fc`).

    `forward` takes an ImageNet-normalised image (B, 3, H, W) and returns logits (B, 1); the residual (x 2/3, as
    their code) is taken inside. Initialised as their code: Kaiming normal (fan out) convolutions, BN 1 and 0.
    """

    def __init__(
        self,
        stem_width: int = 64,
        widths: tuple[int, int] = (64, 128),
        blocks: tuple[int, int] = (3, 4),
        npr_factor: int = 2,
    ) -> None:
        super().__init__()
        if len(widths) != 2 or len(blocks) != 2 or min(stem_width, *widths, *blocks) < 1:
            raise ValueError(f"NPRNet needs two stages of positive widths and blocks, got {widths}, {blocks}")
        self.npr_factor = npr_factor
        self.conv1 = nn.Conv2d(3, stem_width, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1, channels = _stage(stem_width, widths[0], blocks[0], stride=1)
        self.layer2, channels = _stage(channels, widths[1], blocks[1], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, 1)
        self.num_features = channels
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def features(self, residual: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, num_features) of an (already scaled) residual: stem, layer1, layer2, pooling."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(residual))))
        x = self.layer2(self.layer1(x))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(npr_residual(x, self.npr_factor) * (2.0 / 3.0)))


def _stage(in_channels: int, planes: int, blocks: int, stride: int) -> tuple[nn.Sequential, int]:
    """`blocks` Bottleneck blocks of `planes` (output 4 x planes); the first projects the shortcut."""
    out_channels = planes * Bottleneck.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(out_channels),
        )
    layers = [Bottleneck(in_channels, planes, stride, downsample)]
    layers += [Bottleneck(out_channels, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers), out_channels


def create_npr_network(preset: NPRPreset = "full") -> NPRNet:
    """`full`: the authors' network (64-wide stem, layer1 / layer2 of 64 / 128 planes with 3 / 4 blocks,
    fc 512 -> 1); `tiny`: the same class and code path, narrow, one block per stage (tests, the toy world)."""
    if preset not in NPR_PRESETS:
        raise ValueError(f"NPR preset must be one of {', '.join(NPR_PRESETS)}, got {preset!r}")
    stem_width, widths, blocks = NPR_PRESETS[preset]
    return NPRNet(stem_width, widths, blocks)


class NPRDetector(RealFakeTask):
    """NPR trained from scratch: `NPRNet` on the ImageNet-normalised image, one logit, BCE, Adam.

    Args:
        preset: "full" (the authors' network) or "tiny" (same class, narrow; tests and the toy world). There are
            no pretrained weights: NPR is trained from scratch.
        lr: Adam learning rate (the paper: 2e-4). betas, weight_decay: Adam's (their code: 0.9, 0.999; none).
        lr_step_epochs, lr_gamma: the learning rate is multiplied by `lr_gamma` every `lr_step_epochs` epochs
            (their code: 0.8 every 10); None keeps it constant.
    The score is sigmoid(logit) = P(generated).
    """

    monitor = "val/loss"
    monitor_mode = "min"
    method_name = "NPR"

    def __init__(
        self,
        preset: NPRPreset = "full",
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        lr_step_epochs: int | None = 10,
        lr_gamma: float = 0.8,
        threshold: float = 0.5,
    ) -> None:
        super().__init__(threshold=threshold)
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if lr_step_epochs is not None and lr_step_epochs < 1:
            raise ValueError(f"lr_step_epochs must be >= 1 or null, got {lr_step_epochs}")
        if not 0.0 < lr_gamma <= 1.0:
            raise ValueError(f"lr_gamma must be in (0, 1], got {lr_gamma}")
        self.save_hyperparameters(logger=False)  # loggers get the whole config once (RunConfigCallback)
        self.network = create_npr_network(preset)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, batch: dict[str, Any] | torch.Tensor) -> torch.Tensor:
        images = batch["image"] if isinstance(batch, dict) else batch
        return self.network((images - self.mean) / self.std)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return single_logit_bce(logits, labels)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.reshape(-1))

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.Adam(
            self.parameters(),
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            weight_decay=self.hparams.weight_decay,
        )
        if self.hparams.lr_step_epochs is None:
            return {"optimizer": optimizer}
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=self.hparams.lr_step_epochs, gamma=self.hparams.lr_gamma
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
