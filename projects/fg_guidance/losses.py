"""The fine-grained loss L_FG of "Fine-Grained Guidance for Image Generation" (Sakaino & Nguyen), Sec. 3.

One pure function per equation, on embeddings; which images and encoders feed them is the LightningModule's
business (see README "Equation -> function"). All four terms are averages, so their scale does not depend on the
batch size or on the number of pairs, patches or environments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_NAMES: tuple[str, ...] = ("contrast", "detail", "temporal", "env")


def contrastive_loss(z_a: torch.Tensor, z_b: torch.Tensor, same: torch.Tensor, margin: float) -> torch.Tensor:
    """Eq. 2 (Hadsell et al. 2006): 1/2 y D^2 + 1/2 (1 - y) max(0, m - D)^2 with D = ||z_a - z_b||_2, averaged
    over the P pairs given as rows of ``z_a`` and ``z_b`` (P, d); ``same`` (P,) is y: 1 for a pair from the
    same fine-grained subclass, 0 otherwise."""
    if z_a.shape != z_b.shape or z_a.dim() != 2:
        raise ValueError(f"z_a and z_b must both be (P, d), got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    if margin <= 0:
        raise ValueError(f"the margin m must be positive, got {margin}")
    y = same.to(z_a.dtype)
    d2 = (z_a - z_b).pow(2).sum(-1)
    # sqrt has an infinite slope at 0; the epsilon only matters for identical embeddings in a negative pair.
    d = torch.sqrt(d2 + 1e-12)
    return (0.5 * y * d2 + 0.5 * (1 - y) * F.relu(margin - d).pow(2)).mean()


def detail_alignment_loss(patches: torch.Tensor, tokens: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 3: all-pairs InfoNCE between K patch embeddings z_k (K, d) and K token embeddings t_k (K, d),
    -1/K sum_k log( exp(S_kk / tau) / sum_j exp(S_kj / tau) ) with S_kj = <z_k, t_j>.

    Row k of both inputs describes the same part (patch k shows what token k names)."""
    if patches.shape != tokens.shape or patches.dim() != 2:
        raise ValueError(
            f"patches and tokens must both be (K, d), got {tuple(patches.shape)} and {tuple(tokens.shape)}"
        )
    if tau <= 0:
        raise ValueError(f"the temperature tau must be positive, got {tau}")
    similarity = patches @ tokens.T
    return F.cross_entropy(similarity / tau, torch.arange(len(patches), device=patches.device))


def temporal_consistency_loss(
    z: torch.Tensor, z_aged: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 4: ||f(x) - f(x')||_2^2 between an image's embedding and its aged twin's, averaged over the batch.

    Masked variant (the paper: "evaluated only on those pixels"): with patch embeddings z, z_aged (B, K, d) and
    ``weights`` (B, K) = the fraction of each patch inside the corroded mask, the squared distance of each patch
    is averaged with those weights, per image, then over images that have any masked patch.
    """
    if z.shape != z_aged.shape:
        raise ValueError(
            f"z and z_aged must have the same shape, got {tuple(z.shape)} and {tuple(z_aged.shape)}"
        )
    d2 = (z - z_aged).pow(2).sum(-1)
    if weights is None:
        return d2.mean()
    if weights.shape != d2.shape:
        raise ValueError(f"weights must have shape {tuple(d2.shape)}, got {tuple(weights.shape)}")
    total = weights.sum(-1)
    used = total > 0
    if not bool(used.any()):
        return d2.sum() * 0.0  # nothing masked: no signal, but a graph the caller can still backpropagate
    return ((weights * d2).sum(-1)[used] / total[used]).mean()


def environment_invariance_loss(z: torch.Tensor, z_env: torch.Tensor) -> torch.Tensor:
    """Eq. 5: E_e ||f(x) - f(A_e(x))||_2^2, the expectation over environments e taken as the mean over the E
    sampled environments. ``z`` (B, d); ``z_env`` (E, B, d) holds f(A_e(x)) for each environment."""
    if z_env.dim() != z.dim() + 1 or z_env.shape[1:] != z.shape:
        raise ValueError(f"z_env must be (E, *{tuple(z.shape)}), got {tuple(z_env.shape)}")
    return (z.unsqueeze(0) - z_env).pow(2).sum(-1).mean()


def total_loss(losses: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """Eq. 1: L_total = lambda_ctr L_contrast + lambda_det L_detail + lambda_tmp L_temporal + lambda_env L_env,
    with ``losses`` and ``lambdas`` in LOSS_NAMES order."""
    if losses.shape != lambdas.shape:
        raise ValueError(f"{len(lambdas)} lambdas for {len(losses)} loss terms")
    return (lambdas * losses).sum()
