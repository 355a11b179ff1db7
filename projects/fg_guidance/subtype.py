"""Subtype classifiers of Table 1 (Sec. 4.1): ResNet-101 and a FineLIP-style fine-grained CLIP classifier.

Both train on the captioned fine-grained set (common.data.CaptionedParts), with or without the generated
augmentation set (`forgelab augment`, appended through ``data.init_args.extra_train_manifests``), and report
subtype accuracy on the test split; `forgelab fg-table1` runs and collects them.

* ``ResNetSubtypeClassifier``: timm ResNet-101 (``resnet101.tv_in1k``; ImageNet weights, or the tiny preset of
  the same class offline) fine-tuned end to end with cross-entropy over the subclasses.
* ``FineLIPClassifier``: FineLIP (Asokan et al. 2025) has no public code; what we built from its description
  (README "FineLIP-style classifier"):
  1. long-text CLIP: the text tower's 77 absolute position embeddings stretched to 248 the Long-CLIP way
     (`stretch_position_embeddings`: the first 20 kept, the rest linearly interpolated 4x), so a fine-grained
     class description is not truncated at 77 tokens;
  2. token-level late interaction (`late_interaction_scores`): an image scores a class description by the
     mean, over the description's tokens, of the best cosine with any image patch (FILIP / ColBERT "MaxSim"),
     instead of one pooled image-text cosine, so each attribute word can find its part;
  3. trained as a classifier: the logits are those scores over every subclass description, times CLIP's
     learnable logit scale, with cross-entropy (FineLIP's image-text contrastive loss with the class texts as
     the candidate set). FineLIP's token aggregation and triplet term are not reproduced.
  The class description of a subclass is its most frequent training caption.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from common.backbones import create_clip, create_timm_classifier, timm_data_config
from common.backbones.registry import default_id
from common.errors import ConfigError
from common.io import write_json

LONG_CLIP_KEEP, LONG_CLIP_FACTOR = 20, 4  # Long-CLIP: 77 -> 20 + 57 * 4 = 248 positions


def stretch_position_embeddings(
    weight: torch.Tensor, keep: int = LONG_CLIP_KEEP, factor: int = LONG_CLIP_FACTOR
) -> torch.Tensor:
    """Long-CLIP's knowledge-preserving stretch of absolute position embeddings (L, d) -> (keep + (L - keep) *
    factor, d): rows < ``keep`` unchanged (short captions behave as before); row keep + factor * j + k for
    k = 0..factor-1 is (1 - k / factor) * w[keep + j] + (k / factor) * w[keep + j + 1], and past the last row the
    last difference is extrapolated."""
    length = weight.shape[0]
    if not 0 < keep < length or factor < 1:
        raise ValueError(f"need 0 < keep < {length} and factor >= 1, got keep={keep}, factor={factor}")
    tail = weight[keep:]
    following = torch.cat([tail[1:], (2 * tail[-1] - tail[-2]).unsqueeze(0)])
    steps = torch.arange(factor, dtype=weight.dtype, device=weight.device).view(1, factor, 1) / factor
    stretched = tail.unsqueeze(1) * (1 - steps) + following.unsqueeze(1) * steps
    return torch.cat([weight[:keep], stretched.reshape(-1, weight.shape[1])])


def late_interaction_scores(
    patches: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor
) -> torch.Tensor:
    """Token-level late interaction: s(i, c) = mean over the valid tokens t of description c of
    max over patches p of <z_ip, t_ct>. ``patches`` (B, P, d), ``tokens`` (C, L, d), ``token_mask`` (C, L) -> (B, C).
    Inputs are expected unit-norm (then each term is a cosine)."""
    sims = torch.einsum("bpd,cld->bclp", patches, tokens).amax(-1)  # (B, C, L): best patch per token
    mask = token_mask.to(sims.dtype).unsqueeze(0)
    return (sims * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def inference_ms_per_image(
    model: nn.Module, images: torch.Tensor, warmup: int = 2, repeats: int = 5
) -> float:
    """Wall-clock ms per image of ``model(images)`` (no grad, eval mode): ``warmup`` untimed calls first (kernel
    selection, allocator, lazy init), then the mean of ``repeats`` timed calls; on CUDA the device is synchronised
    before each clock read, so queued kernels are counted."""
    if warmup < 0 or repeats < 1 or len(images) == 0:
        raise ValueError(f"need warmup >= 0, repeats >= 1 and images, got {warmup}, {repeats}, {len(images)}")
    cuda = images.device.type == "cuda"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(warmup):
                model(images)
            if cuda:
                torch.cuda.synchronize(images.device)
            start = time.perf_counter()
            for _ in range(repeats):
                model(images)
            if cuda:
                torch.cuda.synchronize(images.device)
            seconds = time.perf_counter() - start
    finally:
        model.train(was_training)
    return 1000 * seconds / (repeats * len(images))


def class_descriptions(samples: list[Any], classes: list[str]) -> list[str]:
    """One text per subclass: its most frequent training caption (ties: the first seen)."""
    captions: dict[str, Counter[str]] = {name: Counter() for name in classes}
    for sample in samples:
        if sample.subclass in captions:
            captions[sample.subclass][sample.caption] += 1
    missing = [name for name, counts in captions.items() if not counts]
    if missing:
        raise ConfigError(
            f"no training caption for subclass(es) {missing[:5]}: every class needs a description"
        )
    return [captions[name].most_common(1)[0][0] for name in classes]


class SubtypeTask(L.LightningModule):
    """Shared orchestration: cross-entropy on subclass ids, accuracy, per-image inference time, test JSON."""

    monitor = "val/acc"
    monitor_mode = "max"

    def __init__(self, num_classes: int, lr: float, weight_decay: float) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
        if lr <= 0:
            raise ConfigError(f"lr must be positive, got {lr}")
        self.num_classes = num_classes
        self.metrics = nn.ModuleDict(
            {
                f"{split}_acc": MulticlassAccuracy(num_classes, average="micro")
                for split in ("train", "val", "test")
            }
        )
        self.test_images = 0
        self.timing_batch: torch.Tensor | None = None  # the first test batch, timed at the end of the test
        self.fit_steps: dict[str, int] = {}  # optimiser steps and batches per epoch of the fit (on_train_end)

    def setup(self, stage: str) -> None:
        data = getattr(self.trainer, "datamodule", None)
        found = getattr(data, "num_classes", None)
        if found is not None and found != self.num_classes:
            raise ConfigError(
                f"the data has {found} subclasses but model.init_args.num_classes={self.num_classes}; set them equal"
            )

    def _step(self, batch: dict[str, Any], split: str) -> torch.Tensor | None:
        if batch["label"].numel() == 0:
            return None
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"])
        self.metrics[f"{split}_acc"](logits.argmax(-1), batch["label"])
        size = len(batch["label"])
        self.log(f"{split}/loss", loss, batch_size=size, prog_bar=split != "test")
        self.log(f"{split}/acc", self.metrics[f"{split}_acc"], batch_size=size, prog_bar=split != "train")
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def on_train_end(self) -> None:
        self.fit_steps = {
            "train_steps": int(self.trainer.global_step),
            "train_batches_per_epoch": int(self.trainer.num_training_batches),
        }

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "test")
        self.test_images += len(batch["label"])
        if self.timing_batch is None and len(batch["label"]):
            self.timing_batch = batch["image"]

    def on_test_epoch_end(self) -> None:
        """`<run>/test_metrics.json`: what `forgelab fg-table1` collects: accuracy, the classifier's own inference
        ms per image (`inference_ms_per_image` on the first test batch, after warm-up), the optimiser steps and
        batches per epoch of the fit (to match steps between runs) and the training set's size."""
        if not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        acc = self.metrics["test_acc"].compute()
        timing = self.timing_batch
        data = getattr(self.trainer, "datamodule", None)
        train_rows = getattr(data, "samples", {}).get("train")
        write_json(
            Path(self.trainer.default_root_dir) / "test_metrics.json",
            {
                "test/acc": float(acc),
                "test_images": self.test_images,
                "inference_ms_per_image": None if timing is None else inference_ms_per_image(self, timing),
                **self.fit_steps,
                "train_images": None if train_rows is None else len(train_rows),
                "train_by_class": None
                if train_rows is None
                else dict(Counter(s.subclass for s in train_rows)),
            },
        )
        self.timing_batch = None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class ResNetSubtypeClassifier(SubtypeTask):
    """Table 1's ResNet-101 row: a timm classifier fine-tuned end to end on subclass ids.

    Args:
        backbone: timm name (the paper: ResNet-101, ``resnet101.tv_in1k``).
        preset: "pretrained" | "random" | "tiny".
        num_classes: subclasses (24 in the toy world).
        lr, weight_decay: AdamW.
    """

    def __init__(
        self,
        backbone: str = "resnet101.tv_in1k",
        preset: str = "pretrained",
        num_classes: int = 24,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
    ) -> None:
        super().__init__(num_classes, lr, weight_decay)
        self.save_hyperparameters(logger=False)  # loggers get the whole config once (RunConfigCallback)
        self.model = create_timm_classifier(backbone, preset=preset, num_classes=num_classes)
        config = timm_data_config(self.model)
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config["std"]).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


class FineLIPClassifier(SubtypeTask):
    """Table 1's FineLIP row, FineLIP-style (module docstring): long-text CLIP + token-level late interaction.

    Args:
        clip_model_id: CLIP to start from (the tiny preset builds the same class offline).
        preset: "pretrained" | "random" | "tiny".
        num_classes: subclasses.
        max_text_tokens: position embeddings after the stretch (248 = Long-CLIP's; must equal
            20 + (77 - 20) * factor for the 77-position CLIP text tower).
        freeze_text: keep the text tower frozen (only the image tower and logit scale train).
        image_size: the side the image tower sees; None = the CLIP's own input size (images of another size are
            resized to it). A different size keeps every pixel and interpolates the vision position embeddings
            (transformers' `interpolate_pos_encoding`, as for CLIP fine-tuned at higher resolution), so a 64 px
            image gives the tiny preset's 8 px patches an 8x8 grid instead of 4x4.
        lr, weight_decay: AdamW.
    """

    def __init__(
        self,
        clip_model_id: str = default_id("clip.fine_grained"),
        preset: str = "pretrained",
        num_classes: int = 24,
        max_text_tokens: int = 248,
        freeze_text: bool = False,
        image_size: int | None = None,
        lr: float = 1e-5,
        weight_decay: float = 1e-4,
    ) -> None:
        super().__init__(num_classes, lr, weight_decay)
        if image_size is not None and image_size < 1:
            raise ConfigError(f"image_size must be a positive number of pixels or null, got {image_size}")
        self.save_hyperparameters(logger=False)  # loggers get the whole config once (RunConfigCallback)
        model, processor = create_clip(clip_model_id, preset=preset)
        self.clip = model.train()
        self.tokenizer = processor.tokenizer
        old = self.clip.text_model.embeddings.position_embedding.weight.data
        factor, remainder = divmod(max_text_tokens - LONG_CLIP_KEEP, old.shape[0] - LONG_CLIP_KEEP)
        if remainder or factor < 1:
            raise ConfigError(
                f"max_text_tokens must be {LONG_CLIP_KEEP} + {old.shape[0] - LONG_CLIP_KEEP} * k (e.g. 248), "
                f"got {max_text_tokens}"
            )
        self._stretch(stretch_position_embeddings(old, LONG_CLIP_KEEP, factor))
        if freeze_text:
            self.clip.text_model.requires_grad_(False)
            self.clip.text_projection.requires_grad_(False)
        crop = processor.image_processor.crop_size
        self.clip_size = int(crop["height"])  # the side the position embeddings were trained for
        self.input_size = self.clip_size if image_size is None else int(image_size)
        patch = self.clip.config.vision_config.patch_size
        if self.input_size % patch:
            raise ConfigError(
                f"image_size must be a multiple of the CLIP patch size {patch}, got {self.input_size}"
            )
        image_processor = processor.image_processor
        self.register_buffer(
            "mean", torch.tensor(image_processor.image_mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(image_processor.image_std).view(1, 3, 1, 1), persistent=False
        )
        self.descriptions: list[str] = []
        self.truncated_descriptions = 0
        # the encoded class descriptions, reused while the text tower cannot change (module docstring)
        self._text_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def _stretch(self, weight: torch.Tensor) -> None:
        embeddings = self.clip.text_model.embeddings
        length = weight.shape[0]
        embeddings.position_embedding = nn.Embedding(length, weight.shape[1], _weight=weight.clone())
        embeddings.register_buffer("position_ids", torch.arange(length).unsqueeze(0), persistent=False)
        self.clip.config.text_config.max_position_embeddings = length
        self.tokenizer.model_max_length = length

    def setup(self, stage: str) -> None:
        super().setup(stage)
        data = getattr(self.trainer, "datamodule", None)
        if not self.descriptions:
            if data is None or "train" not in getattr(data, "samples", {}):
                raise ConfigError("FineLIPClassifier needs a CaptionedParts datamodule (class descriptions)")
            self.descriptions = class_descriptions(data.samples["train"], data.classes)

    def encode_descriptions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, L, d) unit-norm projected token embeddings of the class descriptions and their (C, L) mask
        (padding and the start token excluded)."""
        limit = self.tokenizer.model_max_length
        full = self.tokenizer(self.descriptions, truncation=False)["input_ids"]
        self.truncated_descriptions = sum(len(ids) > limit for ids in full)
        encoded = self.tokenizer(
            self.descriptions, padding=True, truncation=True, max_length=limit, return_tensors="pt"
        ).to(self.mean.device)
        states = self.clip.text_model(
            input_ids=encoded.input_ids, attention_mask=encoded.attention_mask
        ).last_hidden_state
        tokens = F.normalize(self.clip.text_projection(states), dim=-1)
        mask = encoded.attention_mask.clone()
        mask[:, 0] = 0
        return tokens, mask

    def image_patches(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(
                images, size=(self.input_size, self.input_size), mode="bilinear", antialias=True
            )
        vision = self.clip.vision_model(
            pixel_values=(images - self.mean) / self.std,
            interpolate_pos_encoding=self.input_size != self.clip_size,
        )
        states = self.clip.vision_model.post_layernorm(vision.last_hidden_state)  # CLS + patches
        return F.normalize(self.clip.visual_projection(states), dim=-1)

    def class_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode_descriptions`, encoded once and reused while the text tower cannot change: under no_grad
        (validation, test, predict, timing) or with ``freeze_text``. A trainable text tower is re-encoded every
        training step (its gradients flow through the descriptions), and the cache is dropped after each
        optimiser step and at the start of each evaluation epoch."""
        reusable = not torch.is_grad_enabled() or self.hparams.freeze_text
        if reusable and self._text_cache is not None and self._text_cache[0].device == self.mean.device:
            return self._text_cache
        tokens, mask = self.encode_descriptions()
        self._text_cache = (tokens.detach(), mask) if reusable else None
        return tokens, mask

    def clear_text_cache(self) -> None:
        self._text_cache = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.hparams.freeze_text:
            self.clear_text_cache()

    def on_validation_epoch_start(self) -> None:
        self.clear_text_cache()

    def on_test_epoch_start(self) -> None:
        self.clear_text_cache()

    def on_predict_epoch_start(self) -> None:
        self.clear_text_cache()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.descriptions:
            raise ConfigError("no class descriptions: call setup() with a CaptionedParts datamodule first")
        tokens, mask = self.class_text()
        scores = late_interaction_scores(self.image_patches(images), tokens, mask)
        return self.clip.logit_scale.exp().clamp(max=100) * scores

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["descriptions"] = list(self.descriptions)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.descriptions = list(checkpoint.get("descriptions", []))
        self.clear_text_cache()
