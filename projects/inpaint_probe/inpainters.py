"""The trainable inpainters of paper 003 Sec. 3 as LightningModules: Liu et al.'s partial-convolution U-Net and
Yu et al.'s DeepFill v2 (gated convolutions, SN-PatchGAN, manual optimisation for the GAN steps).

`InpaintingTask` is what both share and what the probe calls: `inpaint(image, hole)` pads to the network's
stride (the padding is marked as hole, so no network ever sees invented content as known), runs the network,
crops and composites (the known pixels are the original's, as I_comp of Liu et al. and DeepFill's output).
Validation logs the L1 error and PSNR of the composite against the original (the monitor for checkpoints:
`val/hole_l1`, the L1 error inside the hole) and a grid of original / masked / mask / result quadruples.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from common.backbones import load_local_weights
from common.backbones.presets import check_preset
from common.errors import ConfigError
from common.experiment.reporting import log_pil, log_table
from common.io import write_json
from projects.inpaint_probe.deepfill_port import (
    LAYOUTS,
    WEIGHT_LAYOUTS,
    detect_layout,
    load_port_generator,
    read_port_checkpoint,
    registered_weight_path,
)
from projects.inpaint_probe.gated_conv import DeepFillV2Generator, SNPatchGANDiscriminator
from projects.inpaint_probe.losses import (
    LIU_WEIGHTS,
    VGG16Features,
    composite,
    hinge_discriminator_loss,
    hinge_generator_loss,
    liu_loss_terms,
    liu_total_loss,
    two_stage_l1_loss,
)
from projects.inpaint_probe.masks import DEFAULT_BUCKET_EDGES, bucket_label, check_mask_batch
from projects.inpaint_probe.partial_conv import PConvUNet
from projects.inpaint_probe.quadruples import quadruple_sheet


def pad_to_multiple(
    image: torch.Tensor, hole: torch.Tensor, multiple: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Pad right/bottom to multiples of `multiple`; the padding is hole (to be filled), never known content."""
    h, w = image.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
        hole = F.pad(hole, (0, pad_w, 0, pad_h), value=1.0)
    return image, hole, (h, w)


def hole_l1(result: torch.Tensor, target: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """Mean absolute error inside the hole, per image: sum |r - t| * hole / (3 * sum(hole))."""
    error = ((result - target).abs() * hole).flatten(1).sum(1)
    return error / (3.0 * hole.flatten(1).sum(1).clamp(min=1.0))


def psnr(result: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image for [0, 1] images (dB)."""
    mse = (result - target).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return 10.0 * torch.log10(1.0 / mse)


class InpaintingTask(L.LightningModule):
    """Base of the trainable inpainters (see module docstring). Subclasses set `network_stride` and implement
    `predict_raw(image, hole) -> image` on stride-aligned [0, 1] tensors."""

    monitor = "val/hole_l1"
    monitor_mode = "min"
    display_name = "inpainter"

    def __init__(self, grid_images: int = 8) -> None:
        super().__init__()
        self.grid_images = grid_images
        self._grid: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._test_rows: list[tuple[float, float, float]] = []

    @property
    def network_stride(self) -> int:
        raise NotImplementedError

    def predict_raw(self, image: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def inpaint(self, image: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
        """Fill the holes of [0, 1] images (B, 3, H, W) of any size; known pixels are returned unchanged."""
        check_mask_batch(image, hole)
        padded, padded_hole, (h, w) = pad_to_multiple(image, hole, self.network_stride)
        raw = self.predict_raw(padded, padded_hole)[..., :h, :w].clamp(0.0, 1.0)
        return composite(raw, image, hole)

    # -- evaluation -------------------------------------------------------------------------------------------
    def _evaluate(
        self, batch: dict[str, Any], stage: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if batch["image"].shape[0] == 0:
            return None
        image, hole = batch["image"], batch["hole"]
        result = self.inpaint(image, hole)
        l1, quality = hole_l1(result, image, hole), psnr(result, image)
        size = image.shape[0]
        self.log(f"{stage}/hole_l1", l1.mean(), batch_size=size, sync_dist=True, prog_bar=stage == "val")
        self.log(f"{stage}/psnr", quality.mean(), batch_size=size, sync_dist=True)
        if len(self._grid) < self.grid_images:
            for i in range(min(size, self.grid_images - len(self._grid))):
                self._grid.append((image[i].cpu(), hole[i].cpu(), result[i].cpu()))
        return result, l1, quality

    def on_validation_epoch_start(self) -> None:
        self._grid = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if self._grid and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            log_pil(
                self.trainer, "val/quadruples", quadruple_sheet(self._grid), f"epoch {self.current_epoch}"
            )

    def on_test_epoch_start(self) -> None:
        self._grid, self._test_rows = [], []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        evaluated = self._evaluate(batch, "test")
        if evaluated is not None:
            _, l1, quality = evaluated
            ratios = batch["hole_ratio"].tolist()
            self._test_rows += list(zip(ratios, l1.tolist(), quality.tolist(), strict=True))

    def on_test_epoch_end(self) -> None:
        if not self.trainer.is_global_zero or not self._test_rows:
            return
        by_bucket: dict[str, list[tuple[float, float]]] = {}
        for ratio, l1, quality in self._test_rows:
            by_bucket.setdefault(bucket_label(ratio, DEFAULT_BUCKET_EDGES), []).append((l1, quality))
        order = [bucket_label((a + b) / 2) for a, b in itertools.pairwise(DEFAULT_BUCKET_EDGES)]
        by_bucket = {b: by_bucket[b] for b in order if b in by_bucket}
        by_bucket["all"] = [(l1, q) for _, l1, q in self._test_rows]
        rows = [
            [bucket, len(v), round(sum(a for a, _ in v) / len(v), 6), round(sum(b for _, b in v) / len(v), 4)]
            for bucket, v in by_bucket.items()
        ]
        lines = [
            f"**{self.display_name}: test by hole ratio (L1 in the hole, PSNR of the composite)**",
            "",
            "| hole ratio | n | L1 (hole) | PSNR (dB) |",
            "|---|---|---|---|",
            *(f"| {b} | {n} | {l1:.4f} | {p:.2f} |" for b, n, l1, p in rows),
        ]
        log_table(
            self.trainer, "test/by_hole_ratio", ["hole_ratio", "n", "hole_l1", "psnr"], rows, "\n".join(lines)
        )
        write_json(Path(self.trainer.default_root_dir) / "test_metrics.json", {r[0]: r[1:] for r in rows})
        if self._grid:
            log_pil(
                self.trainer, "test/quadruples", quadruple_sheet(self._grid), "original, masked, mask, result"
            )
        print("\n" + "\n".join(lines) + "\n")


def _check_deepfill_preset(preset: str, checkpoint_path: str | None, weights: str | None) -> None:
    check_preset(preset)
    if preset == "pretrained" and checkpoint_path is None and weights is None:
        raise ConfigError(
            "DeepFill v2 preset pretrained needs weights (a registered published file, e.g. "
            f"{', '.join(WEIGHT_LAYOUTS)}) or checkpoint_path (a `forgelab fit` run of "
            "configs/inpaint_probe/deepfill_v2.yaml); or use preset random (full size, from scratch) or tiny"
        )
    if weights is not None and weights not in WEIGHT_LAYOUTS:
        raise ConfigError(f"DeepFill v2 weights must be one of {', '.join(WEIGHT_LAYOUTS)}, got {weights!r}")


class PartialConvInpainter(InpaintingTask):
    """Liu et al. (2018): the partial-convolution U-Net trained with L_total (valid, hole, perceptual, style, TV).

    Args:
        preset: "pretrained" = the paper's network (8 levels, widths 64-512) with the ImageNet VGG-16 loss
            network; "random" = the same with a random VGG-16; "tiny" = 4 levels, widths 16-32, tiny VGG-16
            (tests and the demo).
        widths, kernel_sizes: override the encoder's widths and kernels.
        lr: Adam learning rate (the paper: 2e-4, then 5e-5 for fine-tuning with the encoder's BatchNorm frozen).
        freeze_encoder_bn: the paper's fine-tuning stage (BatchNorm statistics and affine terms of the encoder
            fixed, so holes do not bias the statistics).
        loss_weights: the five weights of L_total (default 1, 6, 0.05, 120, 0.1).
        checkpoint_path: local weights for the U-Net (a state dict or a checkpoint of this module).
    """

    display_name = "partial convolution (Liu et al. 2018)"

    def __init__(
        self,
        preset: str = "pretrained",
        widths: Sequence[int] | None = None,
        kernel_sizes: Sequence[int] | None = None,
        vgg: str = "vgg16.tv_in1k",
        lr: float = 2e-4,
        freeze_encoder_bn: bool = False,
        loss_weights: dict[str, float] | None = None,
        checkpoint_path: str | None = None,
        grid_images: int = 8,
    ) -> None:
        super().__init__(grid_images=grid_images)
        check_preset(preset)
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        weights = dict(LIU_WEIGHTS) | dict(loss_weights or {})
        if set(weights) != set(LIU_WEIGHTS):
            raise ValueError(
                f"loss_weights keys must be among {sorted(LIU_WEIGHTS)}, got {sorted(loss_weights or {})}"
            )
        self.save_hyperparameters(logger=False)  # loggers get the whole config once (RunConfigCallback)
        self.loss_weights = weights
        tiny = preset == "tiny"
        widths = widths or ((16, 32, 32, 32) if tiny else (64, 128, 256, 512, 512, 512, 512, 512))
        kernel_sizes = kernel_sizes or ((7, 5, 5, 3) if tiny else (7, 5, 5, 3, 3, 3, 3, 3))[: len(widths)]
        if len(kernel_sizes) != len(widths):
            raise ValueError(f"give one kernel size per width: {widths} vs {kernel_sizes}")
        self.network = PConvUNet(widths, kernel_sizes)
        if checkpoint_path is not None:
            load_local_weights(self.network, checkpoint_path)
        # The VGG-16 of the loss is built for training only and kept out of the state dict: it is fixed, it is
        # not part of the inpainter, and the probe loads checkpoints without it (and without its weights).
        self._loss_network: list[VGG16Features] = []
        self.vgg_name, self.vgg_preset = vgg, "tiny" if tiny else preset
        self.freeze_encoder_bn = freeze_encoder_bn
        if freeze_encoder_bn:
            for bn in self.network.encoder_batchnorms():
                bn.requires_grad_(False)

    @property
    def network_stride(self) -> int:
        return self.network.stride

    def setup(self, stage: str) -> None:
        if (
            stage == "fit" and not self._loss_network
        ):  # fails before the first step if the weights are missing
            self._loss_network.append(VGG16Features(self.vgg_name, preset=self.vgg_preset))

    def loss_network(self, device: torch.device) -> VGG16Features:
        if not self._loss_network:
            self.setup("fit")
        vgg = self._loss_network[0]
        if vgg.mean.device != device:
            vgg.to(device)
        return vgg

    def train(self, mode: bool = True) -> PartialConvInpainter:
        super().train(mode)
        if self.freeze_encoder_bn:
            for bn in self.network.encoder_batchnorms():
                bn.eval()
        return self

    def predict_raw(self, image: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
        out = self.network(image * 2.0 - 1.0, 1.0 - hole)  # the paper's M: 1 = valid
        return (out + 1.0) / 2.0

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if batch["image"].shape[0] == 0:
            return None
        image, hole = batch["image"], batch["hole"]
        padded, padded_hole, (h, w) = pad_to_multiple(image, hole, self.network_stride)
        output = self.predict_raw(padded, padded_hole)[..., :h, :w]
        terms = liu_loss_terms(output, image, hole, self.loss_network(image.device))
        loss = liu_total_loss(terms, self.loss_weights)
        size = image.shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=size)
        for name, value in terms.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=size)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.network.parameters() if p.requires_grad], lr=self.hparams.lr)


class DeepFillV2Inpainter(InpaintingTask):
    """Yu et al. (2019), DeepFill v2: gated-convolution coarse and refinement networks, SN-PatchGAN hinge loss,
    one discriminator step then one generator step per batch (Lightning manual optimisation), Adam lr 1e-4,
    betas (0.5, 0.999), generator loss = gan_weight * L_G + l1_weight * (L1 coarse + L1 refined).

    Args:
        preset: "random" (the paper's widths, trained from scratch), "tiny" (width 4, discriminator width 8), or
            "pretrained" with `weights` (published Places2 weights) or `checkpoint_path` (a forgelab checkpoint).
        width: generator width (channels after gating; the paper's cnum 48 = 24 here). disc_width: SN-PatchGAN's.
        attention: keep the contextual-attention branch (off only for ablations).
        weights: a registered published generator (deepfill_port.WEIGHT_LAYOUTS: "deepfill_v2/places2-tf", the
            authors' model, or "deepfill_v2/places2-pt"), read from torch hub's checkpoints folder, or from
            `checkpoint_path` when given; it also fixes `padding` and `fuse` to the ones those weights were
            trained with (loaded only with preset pretrained; the discriminator starts from scratch).
        padding: "symmetric" or "tf_same" (TensorFlow SAME); default: the weights' layout, else symmetric.
        fuse: contextual attention's score propagation; default: the weights' layout, else True.
    """

    display_name = "gated convolution (DeepFill v2, Yu et al. 2019)"

    def __init__(
        self,
        preset: str = "random",
        width: int | None = None,
        disc_width: int | None = None,
        attention: bool = True,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        l1_weight: float = 1.0,
        gan_weight: float = 1.0,
        checkpoint_path: str | None = None,
        grid_images: int = 8,
        weights: str | None = None,
        padding: str | None = None,
        fuse: bool | None = None,
    ) -> None:
        super().__init__(grid_images=grid_images)
        _check_deepfill_preset(preset, checkpoint_path, weights)
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if l1_weight < 0 or gan_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got l1 {l1_weight}, gan {gan_weight}")
        self.save_hyperparameters(logger=False)  # loggers get the whole config once (RunConfigCallback)
        self.automatic_optimization = False
        tiny = preset == "tiny"
        layout = LAYOUTS[WEIGHT_LAYOUTS[weights]] if weights is not None else None
        padding = padding or (layout.padding if layout else "symmetric")
        fuse = fuse if fuse is not None else (layout.fuse if layout else True)
        width = width or (4 if tiny else 24)
        self.generator = DeepFillV2Generator(width, attention=attention, padding=padding, fuse=fuse)
        self.discriminator = SNPatchGANDiscriminator(disc_width or (8 if tiny else 64))
        if layout is not None and preset == "pretrained":
            path = checkpoint_path or registered_weight_path(weights)
            published = load_port_generator(path, width, attention)
            if (published.padding, published.fuse) != (padding, fuse):
                raise ConfigError(
                    f"{path} has the port's {detect_layout(read_port_checkpoint(path)).name} layout, not the one "
                    f"of {weights}; name the matching weights"
                )
            self.generator.load_state_dict(published.state_dict())
        elif checkpoint_path is not None:
            load_local_weights(self.generator, checkpoint_path)

    @property
    def network_stride(self) -> int:
        return self.generator.stride

    def predict_raw(self, image: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
        _, refined = self.generator(image * 2.0 - 1.0, hole)
        return (refined + 1.0) / 2.0

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if batch["image"].shape[0] == 0:
            return
        g_opt, d_opt = self.optimizers()
        image, hole = batch["image"], batch["hole"]
        image, hole, _ = pad_to_multiple(image, hole, self.network_stride)
        real = image * 2.0 - 1.0
        coarse, refined = self.generator(real, hole)
        completed = composite(refined, real, hole)

        # one discriminator pass over real and completed images, as the official code (batch_pos_neg)
        scores = self.discriminator(torch.cat([real, completed.detach()]), torch.cat([hole, hole]))
        real_scores, fake_scores = scores.chunk(2)
        d_loss = hinge_discriminator_loss(real_scores, fake_scores)
        d_opt.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        d_opt.step()

        adversarial = hinge_generator_loss(self.discriminator(completed, hole))
        reconstruction = two_stage_l1_loss(coarse, refined, real)
        g_loss = self.hparams.gan_weight * adversarial + self.hparams.l1_weight * reconstruction
        g_opt.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        g_opt.step()

        size = image.shape[0]
        self.log("train/loss", g_loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=size)
        self.log("train/l1", reconstruction, on_step=True, on_epoch=True, batch_size=size)
        self.log("train/g_adv", adversarial, on_step=False, on_epoch=True, batch_size=size)
        self.log("train/d_loss", d_loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=size)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        betas = tuple(self.hparams.betas)
        return [
            torch.optim.Adam(self.generator.parameters(), lr=self.hparams.lr, betas=betas),
            torch.optim.Adam(self.discriminator.parameters(), lr=self.hparams.lr, betas=betas),
        ]
