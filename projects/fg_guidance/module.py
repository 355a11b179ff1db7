"""FineGrainedGuidance: trains G_theta's LoRA adapters with the fine-grained loss (Sec. 3), manual optimisation.

One training step (the LightningModule only orchestrates; the maths is in losses.py, gradnorm.py, cycle.py):

1. x -> z_0 (VAE encoder, frozen) -> eps_T (DDIM inversion, no guidance, no gradients);
2. eps_T -> z_0_hat (reverse DDIM on the caption c, gradients only through the last K steps) -> x_hat (VAE
   decoder, frozen but differentiable);
3. x' = D_t(x_hat), a random temporal deterioration, and A_e(x_hat) for every environment e
   (degradations.py, differentiable, seeded per step);
4. the four terms on the frozen CLIP encoder (README "Equation -> function"):
   Eq. 2 over all pairs (x_hat_i, x_j) of the batch, y = same subclass;
   Eq. 3 between x_hat's MaskCLIP dense part patches and the embeddings of c's part phrases (images without
   2 usable pairs, and phrases past CLIP's 77 tokens, are warned about once and counted);
   Eq. 4 between f(x) and f(x'); Eq. 5 between f(x) and f(A_e(x_hat)), averaged over e;
5. GradNorm: ||grad L_i|| on x_hat (or on the LoRA weights), L_total = sum lambda_i L_i (Eq. 1) with the current
   lambdas, backward into theta only, then the lambdas' own GradNorm update (on the terms active on this batch).

Validation runs the cycle without gradients, re-captions x_hat with the frozen captioner (c_hat), and logs the
caption fidelity, the cycle's reconstruction error and a grid of x / x_hat / x' / A_e(x_hat) with c and c_hat.
``val/loss`` is Eq. 1 with the INITIAL lambdas, so epochs are comparable while GradNorm moves the weights;
``val/loss_paper`` is Eq. 1 with the paper's starting lambdas (PAPER_LAMBDAS), one scale for every run: the best
checkpoint is chosen on it, and sweeps over the starting lambdas compare trials on it.
At the end of fit the generator (LoRA weights + how to rebuild it) is exported to ``<run>/generator/`` for
`forgelab augment`, and the lambdas over time are written to ``lambdas.csv`` and plotted.
"""

from __future__ import annotations

import logging
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import lightning as L
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only

from common.backbones.registry import default_id
from common.errors import ConfigError
from common.experiment.reporting import image_grid, log_figure, log_pil
from common.io import write_csv, write_json
from projects.fg_guidance.captioning import Captioner, caption_fidelity
from projects.fg_guidance.cycle import FineGrainedGenerator, check_steps, resolve_frozen_dtype
from projects.fg_guidance.degradations import ENVIRONMENTS, TEMPORAL, apply_degradation, random_degradation
from projects.fg_guidance.encoders import FrozenCLIP, ImageFeatures, phrase_pairs
from projects.fg_guidance.gradnorm import GradNorm, task_gradient_norms
from projects.fg_guidance.losses import (
    LOSS_NAMES,
    contrastive_loss,
    detail_alignment_loss,
    environment_invariance_loss,
    temporal_consistency_loss,
    total_loss,
)

log = logging.getLogger("forgelab.fg_guidance")

# what Eq. 3 can skip: images with fewer than 2 pairs, phrases by reason (encoders.phrase_pairs)
DETAIL_SKIPS = (
    "images_without_pairs",
    "phrases_past_token_limit",
    "phrases_not_in_caption",
    "phrases_no_patch_coverage",
)

DROP_REASONS = {
    "past_token_limit": "lie past CLIP's {limit} text tokens in their caption",
    "not_in_caption": "do not occur in their caption",
    "no_patch_coverage": "have boxes that cover no patch",
}

PAPER_LAMBDAS = (
    1.0,
    1.5,
    0.35,
    0.35,
)  # lambda_ctr = 1, lambda_det in [1, 2], lambda_tmp, lambda_env in [0.2, 0.5]


class FineGrainedGuidance(L.LightningModule):
    """The fine-grained guidance generator and its training (see module docstring).

    Args:
        model_id: diffusers id of the base latent diffusion model (default: SD 2.1-base).
        preset: "pretrained" | "random" | "tiny", for the generator, CLIP and the captioner alike.
        base_weights: tiny preset only: folder of the toy world's fitted tiny diffusion model
            (projects.fg_guidance.toy_diffusion; fitted on first use); None keeps random weights.
        image_size: square side the cycle runs at (512 for SD 2.1-base; 32 for the toy model).
        lora_rank, lora_alpha: LoRA on the UNet attention projections to_q, to_k, to_v, to_out.0.
        num_inference_steps: T, DDIM steps of inversion and reconstruction.
        grad_steps: K, reverse steps that keep gradients (K <= T).
        activation_checkpointing: recompute each of the K UNet calls in the backward pass.
        clip_model_id: the frozen CLIP serving as f (pooled and patch embeddings) and g (token embeddings).
        captioner: "blip" | "blip2" | None (no re-captioning). captioner_id: its hub id (default per kind).
        caption_batches: validation batches that are re-captioned per epoch (captioning is slow).
        margin: m of Eq. 2 (on unit-norm embeddings, so D lies in [0, 2]). tau: temperature of Eq. 3.
        lambda_ctr, lambda_det, lambda_tmp, lambda_env: initial weights of Eq. 1 (the paper: 1, [1, 2], [0.2, 0.5],
            [0.2, 0.5]); four scalars rather than one list so a sweep can vary each.
        gradnorm, gradnorm_alpha, gradnorm_lr, gradnorm_reference_steps: GradNorm (False: fixed lambdas).
        gradnorm_on: "image" measures ||grad L_i|| on x_hat (cheap: only through CLIP); "lora" on theta.
        temporal, environments: degradation names sampled for Eq. 4 (one per image) and used for Eq. 5 (all).
        severity: range the degradation severities are drawn from.
        temporal_masked: Eq. 4 on patch embeddings weighted by the degradation mask (the paper's masked variant).
        env_as_positive: also treat f(A_e(x_hat_j)) as samples of x_j's subclass in Eq. 2 (the paper's option).
        lr, weight_decay, max_grad_norm: AdamW on the LoRA weights; gradient clipping (None: off).
        image_log_every_n_epochs: how often the validation grid is drawn.
        seed: seed of the per-step degradation generator.
        frozen_dtype: dtype of every frozen part (SD UNet/VAE/text encoder, CLIP f/g, the captioner), loaded so
            by `from_pretrained(dtype=...)`; the LoRA weights theta and GradNorm's lambdas stay fp32. Use
            bfloat16/float16 with a mixed-precision trainer (`precision: bf16-mixed`).
        revision: hub revision of model_id (the CLIP and captioner ids follow their repos' main or registry pin).
    """

    # checkpoints keep the best epoch on the one scale every run shares (configs/sweeps/fg_guidance.yaml ranks
    # trials with different starting lambdas on it too); with the paper's lambdas it equals val/loss
    monitor = "val/loss_paper"
    monitor_mode = "min"

    def __init__(
        self,
        model_id: str | None = None,
        preset: str = "pretrained",
        base_weights: str | None = None,
        image_size: int = 512,
        lora_rank: int = 4,
        lora_alpha: float = 4.0,
        num_inference_steps: int = 50,
        grad_steps: int = 1,
        activation_checkpointing: bool = True,
        clip_model_id: str = default_id("clip.fine_grained"),
        captioner: Literal["blip", "blip2"] | None = "blip",
        captioner_id: str | None = None,
        caption_batches: int = 1,
        margin: float = 1.0,
        tau: float = 0.07,
        lambda_ctr: float = PAPER_LAMBDAS[0],
        lambda_det: float = PAPER_LAMBDAS[1],
        lambda_tmp: float = PAPER_LAMBDAS[2],
        lambda_env: float = PAPER_LAMBDAS[3],
        gradnorm: bool = True,
        gradnorm_alpha: float = 1.5,
        gradnorm_lr: float = 0.025,
        gradnorm_reference_steps: int = 10,
        gradnorm_on: Literal["image", "lora"] = "image",
        temporal: tuple[str, ...] = tuple(TEMPORAL),
        environments: tuple[str, ...] = tuple(ENVIRONMENTS),
        severity: tuple[float, float] = (0.3, 0.8),
        temporal_masked: bool = False,
        env_as_positive: bool = False,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = 1.0,
        image_log_every_n_epochs: int = 1,
        seed: int = 0,
        frozen_dtype: Literal["float32", "float16", "bfloat16"] = "float32",
        revision: str | None = None,
    ) -> None:
        super().__init__()
        check_steps(num_inference_steps, grad_steps)
        lambdas = (lambda_ctr, lambda_det, lambda_tmp, lambda_env)
        if min(lambdas) <= 0:
            raise ConfigError(f"lambda_ctr/det/tmp/env must be positive, got {list(lambdas)}")
        for names, known, what in (
            (temporal, TEMPORAL, "temporal"),
            (environments, ENVIRONMENTS, "environments"),
        ):
            unknown = sorted(set(names) - set(known))
            if unknown or not names:
                raise ConfigError(f"{what} must be a non-empty list from {sorted(known)}, got {list(names)}")
        if not 0 <= severity[0] <= severity[1] <= 1:
            raise ConfigError(f"severity must be a range within [0, 1], got {severity}")
        if margin <= 0 or tau <= 0 or lr <= 0:
            raise ConfigError("margin, tau and lr must be positive")
        if gradnorm_on not in ("image", "lora"):
            raise ConfigError(f"gradnorm_on must be 'image' or 'lora', got {gradnorm_on!r}")
        self.save_hyperparameters(logger=False)  # loggers get the whole config once (RunConfigCallback)
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the trained weights (see on_save_checkpoint)

        if base_weights is not None and preset == "tiny":
            from projects.fg_guidance.toy_diffusion import ensure_toy_diffusion

            ensure_toy_diffusion(base_weights)
        self.generator = FineGrainedGenerator(
            model_id,
            preset,
            lora_rank,
            lora_alpha,
            image_size,
            base_weights=base_weights,
            frozen_dtype=frozen_dtype,
            revision=revision,
        )
        dtype = resolve_frozen_dtype(frozen_dtype)
        self.encoder = FrozenCLIP(clip_model_id, preset=preset, dtype=dtype)
        self.captioner = (
            Captioner(captioner, captioner_id, preset=preset, dtype=dtype) if captioner is not None else None
        )
        self.gradnorm = GradNorm(
            lambdas,
            alpha=gradnorm_alpha,
            lr=gradnorm_lr,
            reference_steps=gradnorm_reference_steps,
            enabled=gradnorm,
        )
        self.register_buffer("initial_lambdas", torch.tensor(lambdas, dtype=torch.float32), persistent=False)
        self.lambda_history: list[list[float]] = []
        # what Eq. 3 skipped over the whole fit (logged as train/detail_skipped_*, kept in checkpoints)
        self.detail_skips: Counter[str] = Counter()
        self.detail_steps = 0  # training steps on which Eq. 3 was active
        self._warned: set[str] = set()

    def setup(self, stage: str) -> None:
        data_size = getattr(getattr(self.trainer, "datamodule", None), "image_size", None)
        if data_size is not None and data_size != self.hparams.image_size:
            raise ConfigError(
                f"data.init_args.image_size={data_size} but model.init_args.image_size={self.hparams.image_size}: "
                "the generator runs (and is exported) at one size; set both to the same value"
            )

    # -- the loss ------------------------------------------------------------------------------------------------
    def _step_generator(self, stage: str) -> torch.Generator:
        """Degradations differ per step but are reproducible; validation always uses the same ones."""
        offset = 0 if stage == "val" else 1 + int(self.global_step)
        return torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + offset)

    def loss_terms(
        self, batch: dict[str, Any], x_hat: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The four terms of Eq. 1 for one batch, in LOSS_NAMES order, and what went into them."""
        hp = self.hparams
        x, labels = batch["image"], batch["label"].to(self.device)
        with torch.no_grad():
            f_x = self.encoder.image_features(x)
        f_hat = self.encoder.image_features(x_hat)
        b = len(x)

        # Eq. 4: a random deterioration of each generated image.
        (aged, mask), temporal_names = random_degradation(
            x_hat, list(hp.temporal), tuple(hp.severity), generator
        )
        f_aged = self.encoder.image_features(aged)
        temporal_active = True
        if hp.temporal_masked:
            weights = F.adaptive_avg_pool2d(mask, f_x.grid).flatten(1)
            l_temporal = temporal_consistency_loss(f_x.patches, f_aged.patches, weights)
            temporal_active = bool((weights.sum(-1) > 0).any())
        else:
            l_temporal = temporal_consistency_loss(f_x.pooled, f_aged.pooled)

        # Eq. 5: every environment, each image at its own random severity.
        low, high = hp.severity
        env_images, z_env = [], []
        for name in hp.environments:
            severity = low + (high - low) * torch.rand(b, generator=generator)
            relit = apply_degradation(name, x_hat, severity.to(x_hat), generator).image
            env_images.append(relit)
            z_env.append(self.encoder.image_embedding(relit))
        z_env_stack = torch.stack(z_env)
        l_env = environment_invariance_loss(f_x.pooled, z_env_stack)

        # Eq. 2: all pairs (x_hat_i, x_j), including the reconstruction with its own source; optionally also
        # (x_hat_i, A_e(x_hat_j)) with A_e(x_hat_j) counted as a sample of x_j's subclass.
        i = torch.arange(b, device=labels.device).repeat_interleave(b)
        j = torch.arange(b, device=labels.device).repeat(b)
        partners = [f_x.pooled] + (z_env if hp.env_as_positive else [])
        z_a = torch.cat([f_hat.pooled[i]] * len(partners))
        z_b = torch.cat([z[j] for z in partners])
        same = (labels[i] == labels[j]).long().repeat(len(partners))
        l_contrast = contrastive_loss(z_a, z_b, same, hp.margin)

        # Eq. 3: x_hat's dense patches under each part's boxes against the part phrase's text embedding.
        l_detail, pairs, skips = self._detail_term(batch, f_hat)

        terms = torch.stack([l_contrast, l_detail, l_temporal, l_env])
        aux = {
            "aged": aged,
            "temporal_names": temporal_names,
            "env_images": env_images,
            "detail_pairs": pairs,
            "detail_skips": skips,
            "parts": [l_contrast, l_detail, l_temporal, l_env],
            # which terms carried a signal on this batch (GradNorm starts and averages only those)
            "active": torch.tensor([True, pairs > 0, temporal_active, True]),
        }
        return terms, aux

    def _detail_term(
        self, batch: dict[str, Any], f_hat: ImageFeatures
    ) -> tuple[torch.Tensor, float, Counter[str]]:
        """Eq. 3 averaged over the images with at least 2 (patch, phrase) pairs, the pairs per image, and what
        was skipped: images without a detail term, phrases dropped (by reason; see encoders.phrase_pairs)."""
        image_size = tuple(batch["image"].shape[-2:])
        phrases = sorted({p for row in batch["phrases"] for p in row})
        embedded = dict(zip(phrases, self.encoder.text_embedding(phrases))) if phrases else {}
        visible = self.encoder.visible_chars(batch["caption"])
        losses, pairs, skips = [], 0, Counter()
        for i, caption in enumerate(batch["caption"]):
            boxes = batch["boxes"][i].tolist() if len(batch["boxes"][i]) else []
            found = phrase_pairs(
                f_hat.patches[i],
                f_hat.grid,
                embedded,
                caption,
                boxes,
                batch["phrases"][i],
                image_size,
                visible_chars=visible[i],
            )
            for reason, dropped in found.dropped.items():
                skips[f"phrases_{reason}"] += len(dropped)
                self._warn_once(
                    reason,
                    "Eq. 3: phrase(s) %s of %r %s and are left out (counted in */detail_skipped_phrases_%s; "
                    "warned once)",
                    dropped,
                    caption[:60],
                    DROP_REASONS[reason].format(limit=self.encoder.token_limit),
                    reason,
                )
            if len(found.used) >= 2:  # with one pair there is nothing to contrast against
                losses.append(detail_alignment_loss(found.z, found.t, self.hparams.tau))
                pairs += len(found.used)
            else:
                skips["images_without_pairs"] += 1
                self._warn_once(
                    "images_without_pairs",
                    "Eq. 3: %s has %d usable (box, phrase) pair(s); the detail term needs 2 and is 0 for it "
                    "(counted in */detail_skipped_images_without_pairs; warned once)",
                    batch.get("path", ["an image"] * len(batch["caption"]))[i],
                    len(found.used),
                )
        if not losses:
            return f_hat.pooled.new_zeros(()), 0.0, skips
        return torch.stack(losses).mean(), pairs / len(batch["caption"]), skips

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            if rank_zero_only.rank == 0:
                log.warning(message, *args)

    # -- training ------------------------------------------------------------------------------------------------
    def training_loss(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One training step's forward: the cycle, the four terms, Eq. 1 with the current lambdas, and the
        per-term gradient norms GradNorm needs (benchmarks/fg_cycle.py times exactly this plus the backward)."""
        hp = self.hparams
        out = self.generator.cycle(
            batch["image"],
            batch["caption"],
            hp.num_inference_steps,
            hp.grad_steps,
            activation_checkpointing=hp.activation_checkpointing,
        )
        terms, aux = self.loss_terms(batch, out["x_hat"], self._step_generator("train"))
        lambdas = self.gradnorm.lambdas.to(terms)
        shared = [out["x_hat"]] if hp.gradnorm_on == "image" else self.generator.lora_parameters()
        norms = task_gradient_norms(aux["parts"], shared)
        return {
            "loss": total_loss(terms, lambdas),
            "terms": terms,
            "lambdas": lambdas,
            "norms": norms,
            "aux": aux,
            "cycle": out,
        }

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if batch["label"].numel() == 0:  # every image of the batch failed to decode
            return None
        hp = self.hparams
        step = int(self.global_step)
        optimiser = self.optimizers()
        result = self.training_loss(batch)
        loss, terms, lambdas, aux, out = (result[k] for k in ("loss", "terms", "lambdas", "aux", "cycle"))

        optimiser.zero_grad()
        self.manual_backward(loss)
        if hp.max_grad_norm:
            self.clip_gradients(optimiser, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
        optimiser.step()
        gradnorm_log = self.gradnorm.step(terms.detach(), result["norms"], aux["active"])
        self.detail_skips.update(aux["detail_skips"])
        self.detail_steps += int(aux["detail_pairs"] > 0)

        size = len(batch["caption"])
        values = {"train/loss": loss, "train/loss_initial_lambdas": total_loss(terms, self.initial_lambdas)}
        for i, name in enumerate(LOSS_NAMES):
            values[f"train/{name}"] = terms[i]
            values[f"train/lambda_{name}"] = lambdas[i]
            values[f"train/gradnorm_G_{name}"] = gradnorm_log["G"][i]
            values[f"train/gradnorm_ratio_{name}"] = gradnorm_log["ratio"][i]
        values["train/gradnorm_loss"] = gradnorm_log["gradnorm_loss"]
        values["train/detail_pairs_per_image"] = aux["detail_pairs"]
        values["train/cycle_latent_error"] = _relative_error(out["latents_hat"], out["latents"])
        self.log_dict(
            {k: v.detach() if torch.is_tensor(v) else v for k, v in values.items()}, batch_size=size
        )
        self.log("train/total", loss.detach(), prog_bar=True, logger=False, batch_size=size)
        # running totals since the fit started (the last logged value, i.e. the W&B summary, is the run's count);
        # summed over DDP ranks
        totals = {"train/detail_active_steps": float(self.detail_steps)}
        for key in DETAIL_SKIPS:
            totals[f"train/detail_skipped_{key}"] = float(self.detail_skips[key])
        # captions cut at the text encoder's token limit since the generator was built (train and validation)
        totals["train/truncated_captions"] = float(self.generator.truncated_captions)
        self.log_dict(totals, batch_size=size, reduce_fx="sum", sync_dist=True)
        self.lambda_history.append([step, *lambdas.tolist()])

    # -- validation ----------------------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if batch["label"].numel() == 0:
            return
        hp = self.hparams
        out = self.generator.cycle(batch["image"], batch["caption"], hp.num_inference_steps, 0)
        terms, aux = self.loss_terms(batch, out["x_hat"], self._step_generator("val"))
        size = len(batch["caption"])
        values = {
            "val/loss": total_loss(terms, self.initial_lambdas),
            "val/loss_paper": total_loss(terms, terms.new_tensor(PAPER_LAMBDAS)),
        }
        for i, name in enumerate(LOSS_NAMES):
            values[f"val/{name}"] = terms[i]
        values["val/cycle_latent_error"] = _relative_error(out["latents_hat"], out["latents"])
        values["val/cycle_pixel_mae"] = (out["x_hat"] - batch["image"]).abs().mean()
        skips = {f"val/detail_skipped_{k}": float(aux["detail_skips"][k]) for k in DETAIL_SKIPS}
        self.log_dict(skips, batch_size=size, reduce_fx="sum", sync_dist=True)  # per validation epoch
        recaptions: list[str] = []
        if self.captioner is not None and batch_idx < hp.caption_batches:
            recaptions = self.captioner(out["x_hat"])
            embedded = self.encoder.text_embedding([*batch["caption"], *recaptions])
            fidelity = caption_fidelity(batch["caption"], recaptions, embedded)
            values["val/caption_token_f1"] = fidelity["token_f1"]
            values["val/caption_clip_cosine"] = fidelity["clip_cosine"]
            self._write_captions(batch, recaptions)
        self.log_dict(values, batch_size=size, sync_dist=True)
        if batch_idx == 0 and self.current_epoch % hp.image_log_every_n_epochs == 0:
            self._log_grid(batch, out["x_hat"], aux, recaptions)

    def _write_captions(self, batch: dict[str, Any], recaptions: list[str]) -> None:
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        from projects.fg_guidance.captioning import token_f1

        rows = [
            {"path": p, "c": c, "c_hat": h, "token_f1": token_f1(c, h)}
            for p, c, h in zip(batch["path"], batch["caption"], recaptions)
        ]
        write_json(
            Path(self.trainer.default_root_dir) / "captions" / f"epoch{self.current_epoch:03d}.json", rows
        )

    def _log_grid(
        self, batch: dict[str, Any], x_hat: torch.Tensor, aux: dict[str, Any], recaptions: list[str]
    ) -> None:
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        n = min(4, len(x_hat))
        wrap = lambda text: "\n".join(textwrap.wrap(text, 22)[:3])  # noqa: E731
        images, captions = [], []
        rows = [
            (batch["image"], [f"x: {c}" for c in batch["caption"]]),
            (x_hat, [f"x_hat: {c}" for c in (recaptions or ["(no captioner)"] * len(x_hat))]),
            (aux["aged"], [f"x': {name}" for name in aux["temporal_names"]]),
            (aux["env_images"][0], [f"A_e: {self.hparams.environments[0]}"] * len(x_hat)),
        ]
        for tensor, texts in rows:
            images += [tensor[i].detach().cpu() for i in range(n)]
            captions += [wrap(texts[i]) for i in range(n)]
        log_pil(self.trainer, "val/samples", image_grid(images, captions, columns=n, tile=128))

    # -- optimisation, checkpoints, export -------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.generator.lora_parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only what training changes (LoRA and GradNorm state): a Stable Diffusion checkpoint would
        otherwise carry 5 GB of frozen weights the model id already names."""
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if "lora_" in k or k.startswith("gradnorm.")
        }
        checkpoint["fg_detail_skips"] = {**self.detail_skips, "active_steps": self.detail_steps}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        counts = dict(checkpoint.get("fg_detail_skips", {}))
        self.detail_steps = int(counts.pop("active_steps", 0))
        self.detail_skips = Counter({k: int(v) for k, v in counts.items()})

    def on_train_end(self) -> None:
        if self.global_step > 0 and self.detail_steps == 0:
            self._warn_once(
                "never_active",
                "Eq. 3 (the detail term) was 0 on every one of the %d training steps: no training image had 2 "
                "usable (box, phrase) pairs (skips: %s)",
                int(self.global_step),
                dict(self.detail_skips) or "none",
            )

    def on_fit_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        run_dir = Path(self.trainer.default_root_dir)
        hp = self.hparams
        self.generator.save(
            run_dir / "generator",
            extra={
                "num_inference_steps": hp.num_inference_steps,
                "grad_steps": hp.grad_steps,
                "final_lambdas": dict(zip(LOSS_NAMES, self.gradnorm.lambdas.tolist())),
                "trained_steps": int(self.global_step),
            },
        )
        if self.lambda_history:
            write_csv(
                run_dir / "lambdas.csv", ["step", *[f"lambda_{n}" for n in LOSS_NAMES]], self.lambda_history
            )
            figure, axis = plt.subplots(figsize=(6, 3.5))
            steps = [row[0] for row in self.lambda_history]
            for i, name in enumerate(LOSS_NAMES):
                axis.plot(steps, [row[i + 1] for row in self.lambda_history], label=f"lambda_{name}")
            axis.set(xlabel="step", ylabel="lambda", title="GradNorm lambdas over training")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
            figure.tight_layout()
            log_figure(self.trainer, "train/lambdas", figure)
        log.info("generator exported to %s", run_dir / "generator")


def _relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """||estimate - reference|| / ||reference|| over the batch (the cycle's reconstruction error)."""
    return ((estimate - reference).norm() / reference.norm().clamp_min(1e-12)).detach()
