"""CNNDetection (Wang et al., CVPR 2020, "CNN-generated images are surprisingly easy to spot... for now").

An ImageNet ResNet-50 (`resnet50.tv_in1k`, the torchvision weights their code loads) fine-tuned end to end with ONE
logit and BCE, Adam lr 1e-4 (betas 0.9, 0.999), batch 64, on ProGAN's 20 LSUN classes. Their data pipeline is the
datamodule's (`common.data.RealFakeFolder` with `resize: random_crop`, `image_size: 224` and
`augment.blur_jpeg_p` 0.5 or 0.1: `common.transforms.BlurJpegAugment` on the full image, then a 224 random crop, a
horizontal flip; a centre crop at evaluation). Their learning-rate schedule (x0.1 when validation accuracy has not
improved for 5 epochs, stop below 1e-6) is `lr_plateau_patience` plus the config's early stopping.

The network and its training step are `RealFakeClassifier`'s with `head="single_logit"`; this class fixes the
paper's choices and names the row of the comparison tables.
"""

from __future__ import annotations

import torch

from projects.inpaint_probe.classifier import RealFakeClassifier


class CNNDetection(RealFakeClassifier):
    """Wang et al. 2020: ResNet-50, one logit, BCE, Adam; score = sigmoid(logit) = P(generated).

    Args:
        backbone: timm name (the paper: resnet50.tv_in1k). preset: pretrained | random | tiny.
        checkpoint_path: optional local weights for the backbone (e.g. a converted official checkpoint).
        lr, betas, weight_decay: Adam's (the paper: 1e-4, (0.9, 0.999), 0).
        lr_plateau_patience: epochs without a better `val/acc` before the learning rate is divided by 10
            (the paper: 5); None keeps it constant. min_lr: the floor of that schedule (the paper stops at 1e-6).
        false_real_images: generated test images predicted real shown per generator (0: off).
    """

    method_name = "CNNDetection"
    monitor = "val/loss"
    monitor_mode = "min"

    def __init__(
        self,
        backbone: str = "resnet50.tv_in1k",
        preset: str = "pretrained",
        checkpoint_path: str | None = None,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        lr_plateau_patience: int | None = 5,
        min_lr: float = 1e-6,
        threshold: float = 0.5,
        false_real_images: int = 16,
    ) -> None:
        if lr_plateau_patience is not None and lr_plateau_patience < 0:
            raise ValueError(f"lr_plateau_patience must be >= 0 or null, got {lr_plateau_patience}")
        super().__init__(
            backbone=backbone,
            preset=preset,
            checkpoint_path=checkpoint_path,
            lr=lr,
            weight_decay=weight_decay,
            betas=betas,
            threshold=threshold,
            false_real_images=false_real_images,
            head="single_logit",
        )

    def configure_optimizers(self) -> dict:
        optimizer = super().configure_optimizers()
        if self.hparams.lr_plateau_patience is None:
            return {"optimizer": optimizer}
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode="max",
            factor=0.1,
            patience=self.hparams.lr_plateau_patience,
            min_lr=self.hparams.min_lr,
        )
        # strict=False: val/acc is missing while validation has no labelled image of both classes
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": "val/acc", "strict": False},
        }
