"""GradNorm (Chen et al., ICML 2018): the paper's "employ GradNorm to adaptively rescale the lambda values".

Each task i has a weight w_i (the lambdas of Eq. 1). On a shared tensor W, G_i = ||grad_W (w_i L_i)|| =
w_i ||grad_W L_i||. Tasks that train slower than average (a larger loss ratio r_i = (L_i / L_i(0)) /
mean_j (L_j / L_j(0))) should get a larger share of the gradient: the target is mean(G) * r_i^alpha, held
constant, and the weights follow the gradient of L_grad = sum_i |G_i - target_i|.

Choices (see README):
* W is the generated image x_hat by default: the gradient of each term with respect to x_hat only runs through
  the frozen image encoder, not back through the UNet (FIELD_NOTES: gradients through a whole UNet are costly).
  The module can also measure on the LoRA weights.
* Because G_i = w_i ||grad_W L_i||, dL_grad/dw_i needs ||grad_W L_i|| only as a number: ``torch.autograd.grad``
  is taken with respect to the weights alone, so no second-order gradient reaches the network.
* w is updated by plain SGD, clamped positive and renormalised to its initial sum (the paper's starting
  lambdas 1 / 1.5 / 0.35 / 0.35 are not uniform, so "sum = number of tasks" would not fit).
* L_i(0) is an exponential moving average of the first ``reference_steps`` losses, then frozen: one batch's
  loss is too noisy a reference for every later ratio. Each term's reference starts when that term is first
  active (Eq. 3 has no pairs on a batch without boxed phrases): seeding it with an inactive batch's 0 would make
  the reference too small and inflate that term's ratio for the whole run.
* A term inactive on a step (its loss carries no signal there) takes no part in that step's ratios and targets:
  the mean over tasks in r_i and in mean(G) runs over the active terms only, and its own weight gets no
  GradNorm gradient (it is still renormalised with the others).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def loss_ratios(
    losses: torch.Tensor,
    initial_losses: torch.Tensor,
    active: torch.Tensor | None = None,
    eps: float = 1e-12,
) -> torch.Tensor:
    """r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0)), the mean over the terms that are active on this step and have
    a reference (L_j(0) > 0). Every other term gets ratio 1 (neutral)."""
    used = initial_losses > eps
    if active is not None:
        used = used & active.to(torch.bool)
    inverse_rate = losses / initial_losses.clamp_min(eps)
    if not bool(used.any()):
        return torch.ones_like(losses)
    mean = inverse_rate[used].mean().clamp_min(eps)
    return torch.where(used, inverse_rate / mean, torch.ones_like(losses))


def gradnorm_targets(
    grad_norms: torch.Tensor,
    losses: torch.Tensor,
    initial_losses: torch.Tensor,
    alpha: float,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """The constant targets mean_j(G_j) * r_i^alpha, the mean over the active terms (no gradient flows through
    them)."""
    mean_g = grad_norms[active.to(torch.bool)].mean() if active is not None else grad_norms.mean()
    return (mean_g * loss_ratios(losses, initial_losses, active).pow(alpha)).detach()


def gradnorm_loss(grad_norms: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L_grad = sum_i |G_i - target_i| (Chen et al. 2018, Eq. 2)."""
    return (grad_norms - targets).abs().sum()


def renormalise(weights: torch.Tensor, total: float, min_weight: float = 1e-3) -> torch.Tensor:
    """Clamp the weights to at least ``min_weight`` (they must stay positive) and rescale them to sum to ``total``."""
    clamped = weights.clamp_min(min_weight)
    return clamped * (total / clamped.sum())


def task_gradient_norms(losses: Sequence[torch.Tensor], shared: Sequence[torch.Tensor]) -> torch.Tensor:
    """||grad_W L_i|| for each loss over the tensors ``shared`` (the generated image, or the LoRA weights).

    Uses ``torch.autograd.grad`` (the graph is kept for the training backward that follows), so nothing
    accumulates in any ``.grad``. A loss that does not depend on W has norm 0.
    """
    norms = []
    for loss in losses:
        if not loss.requires_grad:
            norms.append(torch.zeros((), device=loss.device))
            continue
        grads = torch.autograd.grad(loss, list(shared), retain_graph=True, allow_unused=True)
        squares = [g.detach().pow(2).sum() for g in grads if g is not None]
        norms.append(
            torch.sqrt(torch.stack(squares).sum()) if squares else torch.zeros((), device=loss.device)
        )
    return torch.stack(norms)


class GradNorm(nn.Module):
    """Task weights w (the lambdas) and their GradNorm update; a module so they live in checkpoints.

    Args:
        initial: starting weights, in LOSS_NAMES order (their sum is kept).
        alpha: asymmetry; 0 equalises the G_i, larger values favour the slower tasks more.
        lr: SGD learning rate of the weights.
        reference_steps: active steps of a term over which its L_i(0) is averaged (EMA with
            ``reference_momentum``, started at the term's first active loss), then frozen.
        min_weight: weights are clamped to at least this before renormalising.
        enabled: False keeps the initial weights (fixed lambdas) while still logging G_i and r_i.
    """

    def __init__(
        self,
        initial: Sequence[float],
        alpha: float = 1.5,
        lr: float = 0.025,
        reference_steps: int = 10,
        reference_momentum: float = 0.8,
        min_weight: float = 1e-3,
        enabled: bool = True,
    ) -> None:
        super().__init__()
        if not initial or min(initial) <= 0:
            raise ValueError(f"initial lambdas must be positive, got {list(initial)}")
        if alpha < 0 or lr < 0:
            raise ValueError(f"GradNorm alpha and lr must be >= 0, got alpha={alpha}, lr={lr}")
        if reference_steps < 1 or not 0 <= reference_momentum < 1:
            raise ValueError("reference_steps must be >= 1 and reference_momentum in [0, 1)")
        # A buffer, not a parameter: the weights follow GradNorm's own update, never the training optimiser.
        self.register_buffer("weights", torch.tensor([float(w) for w in initial]))
        self.register_buffer("initial_losses", torch.zeros(len(initial)))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        # per term: active steps seen so far (its L_i(0) starts at the first, is frozen after reference_steps)
        self.register_buffer("reference_counts", torch.zeros(len(initial), dtype=torch.long))
        self.total = float(sum(initial))
        self.alpha, self.lr = alpha, lr
        self.reference_steps, self.reference_momentum = reference_steps, reference_momentum
        self.min_weight, self.enabled = min_weight, enabled

    @property
    def lambdas(self) -> torch.Tensor:
        return self.weights.clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args, **kw):
        # checkpoints from before reference_counts: every term with a reference counted the run's steps
        key = prefix + "reference_counts"
        if (
            key not in state_dict
            and prefix + "steps" in state_dict
            and prefix + "initial_losses" in state_dict
        ):
            steps = state_dict[prefix + "steps"].clamp(max=self.reference_steps)
            state_dict[key] = torch.where(state_dict[prefix + "initial_losses"] > 0, steps, 0).long()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args, **kw)

    def update_reference(self, losses: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """L_i(0), per term: its first active loss, then an EMA over its first ``reference_steps`` active steps,
        then frozen. ``active`` (bool per term) defaults to loss > 0: a zero loss says nothing about the scale."""
        losses = losses.detach().to(self.initial_losses)
        active = (losses > 0) if active is None else active.to(device=losses.device, dtype=torch.bool)
        m = self.reference_momentum
        first = active & (self.reference_counts == 0)
        averaging = active & (self.reference_counts > 0) & (self.reference_counts < self.reference_steps)
        self.initial_losses.copy_(
            torch.where(
                first,
                losses,
                torch.where(averaging, m * self.initial_losses + (1 - m) * losses, self.initial_losses),
            )
        )
        self.reference_counts += (active & (self.reference_counts < self.reference_steps)).long()
        self.steps += 1

    def step(
        self, losses: torch.Tensor, grad_norms: torch.Tensor, active: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """One GradNorm update from this step's losses (values) and ||grad_W L_i||; returns what to log.

        ``active`` (bool per term, default loss > 0) marks the terms that carried a signal on this step.
        Call after computing the training loss with the current ``lambdas``.
        """
        losses = losses.detach().to(self.weights)
        grad_norms = grad_norms.detach().to(self.weights)
        active = (losses > 0) if active is None else active.to(device=losses.device, dtype=torch.bool)
        self.update_reference(losses, active)
        with torch.enable_grad():
            w = self.weights.clone().requires_grad_(True)
            g = w * grad_norms
            if bool(active.any()):
                targets = gradnorm_targets(g, losses, self.initial_losses, self.alpha, active)
                l_grad = gradnorm_loss(g[active], targets[active])
                (dw,) = torch.autograd.grad(l_grad, [w])
            else:  # nothing to balance on this step
                l_grad, dw = g.sum() * 0.0, torch.zeros_like(w)
        if self.enabled:
            with torch.no_grad():
                self.weights.copy_(renormalise(self.weights - self.lr * dw, self.total, self.min_weight))
        return {
            "gradnorm_loss": l_grad.detach(),
            "G": g.detach(),
            "ratio": loss_ratios(losses, self.initial_losses, active),
        }
