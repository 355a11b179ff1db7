"""ITEM's classification head (Sec. III-C, Eq. 9-10): a two-layer MLP on the misalignment D, trained with binary
cross-entropy. It is the only trainable part of the detector.

The paper states both "an output dimension of 2" (implementation details) and a binary cross-entropy on a
probability y_hat (Eq. 10). Both hold at once when y_hat is the softmax probability of the "generated" output:
then -[y log y_hat + (1 - y) log(1 - y_hat)] is exactly the two-class cross-entropy of the logits, which is how
it is computed here (numerically stable, no log of a rounded probability).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MisalignmentHead(nn.Module):
    """ITEM Eq. 9: y_hat = MLP(D) -- Linear(d, hidden), ReLU, (dropout), Linear(hidden, 2); logits of
    (real, generated). The paper gives no hidden width; 512 is our default."""

    def __init__(self, in_features: int, hidden_features: int = 512, dropout: float = 0.0) -> None:
        super().__init__()
        if in_features <= 0 or hidden_features <= 0:
            raise ValueError(f"in/hidden features must be positive, got {in_features}, {hidden_features}")
        self.layers = nn.Sequential(
            nn.Linear(in_features, hidden_features),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_features, 2),
        )

    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        return self.layers(distance)


def fake_probability(logits: torch.Tensor) -> torch.Tensor:
    """y_hat of Eq. 9-10: the softmax probability of the second ("generated") output."""
    return torch.softmax(logits, dim=-1)[..., 1]


def item_bce(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """ITEM Eq. 10: L = -sum_i [y_i log y_hat_i + (1 - y_i) log(1 - y_hat_i)], y_hat = `fake_probability`.

    With two softmax outputs, log y_hat = log_softmax[1] and log(1 - y_hat) = log_softmax[0], so this is the
    two-class cross-entropy. Eq. 10 sums over the mini-batch (`reduction="sum"`); training uses the mean,
    which AdamW's update is invariant to up to its epsilon, and which keeps logged losses comparable across
    batch sizes.
    """
    return F.cross_entropy(logits, labels.long(), reduction=reduction)
