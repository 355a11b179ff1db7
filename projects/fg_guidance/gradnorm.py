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
  loss is too noisy a reference for every later ratio.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def loss_ratios(losses: torch.Tensor, initial_losses: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0)). A task whose reference loss is 0 (never active) gets ratio 1."""
    active = initial_losses > eps
    inverse_rate = torch.where(active, losses / initial_losses.clamp_min(eps), torch.ones_like(losses))
    return inverse_rate / inverse_rate.mean().clamp_min(eps)


def gradnorm_targets(
    grad_norms: torch.Tensor, losses: torch.Tensor, initial_losses: torch.Tensor, alpha: float
) -> torch.Tensor:
    """The constant targets mean_j(G_j) * r_i^alpha (no gradient flows through them)."""
    return (grad_norms.mean() * loss_ratios(losses, initial_losses).pow(alpha)).detach()


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
        reference_steps: steps over which L_i(0) is averaged (EMA with ``reference_momentum``), then frozen.
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
        self.total = float(sum(initial))
        self.alpha, self.lr = alpha, lr
        self.reference_steps, self.reference_momentum = reference_steps, reference_momentum
        self.min_weight, self.enabled = min_weight, enabled

    @property
    def lambdas(self) -> torch.Tensor:
        return self.weights.clone()

    def update_reference(self, losses: torch.Tensor) -> None:
        """L_i(0): the first loss, then an EMA over the first ``reference_steps`` steps, then frozen."""
        losses = losses.detach().to(self.initial_losses)
        if int(self.steps) == 0:
            self.initial_losses.copy_(losses)
        elif int(self.steps) < self.reference_steps:
            m = self.reference_momentum
            self.initial_losses.mul_(m).add_((1 - m) * losses)
        self.steps += 1

    def step(self, losses: torch.Tensor, grad_norms: torch.Tensor) -> dict[str, torch.Tensor]:
        """One GradNorm update from this step's losses (values) and ||grad_W L_i||; returns what to log.

        Call after computing the training loss with the current ``lambdas``.
        """
        losses = losses.detach().to(self.weights)
        grad_norms = grad_norms.detach().to(self.weights)
        self.update_reference(losses)
        with torch.enable_grad():
            w = self.weights.clone().requires_grad_(True)
            g = w * grad_norms
            targets = gradnorm_targets(g, losses, self.initial_losses, self.alpha)
            l_grad = gradnorm_loss(g, targets)
            (dw,) = torch.autograd.grad(l_grad, [w])
        if self.enabled:
            with torch.no_grad():
                self.weights.copy_(renormalise(self.weights - self.lr * dw, self.total, self.min_weight))
        return {
            "gradnorm_loss": l_grad.detach(),
            "G": g.detach(),
            "ratio": loss_ratios(losses, self.initial_losses),
        }
