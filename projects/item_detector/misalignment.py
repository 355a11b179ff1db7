"""ITEM's hierarchical image-text misalignment (Zhang et al., "Leveraging Hierarchical Image-Text Misalignment
for Universal Fake Image Detection", Sec. III-A/B, Eq. 3-8), as small pure tensor functions.

The frozen stage (captioner, detector, CLIP) produces embeddings; these functions turn them into the
representation D the MLP head classifies. Keeping them parameter-free and separate from the cache means the
cache stores raw CLIP embeddings, and the global-only / local-only / both ablation (Fig. 5) is a choice of
weights at training time, not a second extraction.
"""

from __future__ import annotations

from typing import Literal

import torch

EmptyLocal = Literal["global", "zero"]


def misalignment_vector(
    image_embedding: torch.Tensor, text_embedding: torch.Tensor, eps: float = 1e-12
) -> torch.Tensor:
    """ITEM Eq. 3: D = I/|I| - T/|T|, over the last dimension (any leading batch/object dimensions).

    Used as Eq. 4 on the whole image and full caption (D_g) and as Eq. 6 on each grounded object and its
    phrase (D_l^i). Normalising first makes |D|^2 = 2 - 2 cos(I, T): high similarity, small misalignment,
    whatever the lengths of the two embeddings (Fig. 3). `eps` keeps an all-zero embedding finite.
    """
    image_unit = image_embedding / image_embedding.norm(dim=-1, keepdim=True).clamp_min(eps)
    text_unit = text_embedding / text_embedding.norm(dim=-1, keepdim=True).clamp_min(eps)
    return image_unit - text_unit


def local_distance(
    object_distances: torch.Tensor, mask: torch.Tensor, fallback: torch.Tensor
) -> torch.Tensor:
    """ITEM Eq. 7: D_l = (1/n) sum_i D_l^i, the mean over the n grounded objects of each image.

    `object_distances` (B, K, d) holds D_l^i padded to K objects, `mask` (B, K) marks the real ones. Eq. 7 is
    undefined for n = 0 (the detector grounded nothing); those rows take `fallback` (B, d) instead: the
    caller passes D_g (the whole image as its only object) or zeros (see `ItemDetector.empty_local`).
    """
    weights = mask.to(object_distances.dtype).unsqueeze(-1)
    count = weights.sum(dim=1)
    mean = (object_distances * weights).sum(dim=1) / count.clamp_min(1.0)
    return torch.where(count > 0, mean, fallback)


def mean_object_distance(object_distances: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """ITEM Eq. 7's mean (1/n) sum_i D_l^i over ragged rows: `object_distances` (M, d) holds the objects of
    N images one after another, `counts` (N,) how many each has. Rows with n = 0 are zero; `with_fallback`
    gives them their D_l. This is what the per-image view stores, so Eq. 7 need not see every object again."""
    device, dtype = object_distances.device, object_distances.dtype
    counts = counts.to(device=device, dtype=torch.int64)
    owner = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)
    sums = torch.zeros(len(counts), object_distances.shape[-1], dtype=dtype, device=device)
    sums.index_add_(0, owner, object_distances)
    return sums / counts.clamp_min(1).unsqueeze(-1).to(dtype)


def with_fallback(mean_distance: torch.Tensor, counts: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Eq. 7's D_l from its precomputed mean: rows whose image has no grounded object (count 0) take
    `fallback` (see `empty_local_fallback`), as in `local_distance`."""
    return torch.where((counts > 0).unsqueeze(-1), mean_distance, fallback)


def hierarchical_distance(
    global_distance: torch.Tensor, local_distance: torch.Tensor, w_global: float = 1.0, w_local: float = 1.0
) -> torch.Tensor:
    """ITEM Eq. 8: D = w1 D_g + w2 D_l (both weights 1.0 in the paper; (1, 0) and (0, 1) are Fig. 5's
    global-only and local-only variants)."""
    return w_global * global_distance + w_local * local_distance


def empty_local_fallback(global_distance: torch.Tensor, policy: EmptyLocal) -> torch.Tensor:
    """The D_l used for an image with no grounded object (Eq. 7 has none): `global` treats the whole image and
    full caption as the single object (D_l = D_g), `zero` contributes nothing (D_l = 0)."""
    if policy == "global":
        return global_distance
    if policy == "zero":
        return torch.zeros_like(global_distance)
    raise ValueError(f"empty_local must be 'global' or 'zero', got {policy!r}")
