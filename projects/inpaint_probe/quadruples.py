"""Paper 003 Figs. 1-4: each inpainted image as a 2x2 quadruple, original (top left), masked regions (top right,
holes in white), binary mask (bottom left) and the inpainting result (bottom right)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from common.experiment.reporting import image_grid


def _pil(image: torch.Tensor) -> Image.Image:
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)


def quadruple(
    original: torch.Tensor, hole: torch.Tensor, result: torch.Tensor, tile: int = 128
) -> Image.Image:
    """(3, H, W) original and result in [0, 1], (1, H, W) hole mask -> one 2x2 PIL image of side 2 * tile."""
    masked = original * (1 - hole) + hole  # holes shown white, as in the paper's figures
    mask = hole.expand(3, -1, -1)
    sheet = Image.new("RGB", (2 * tile, 2 * tile), "white")
    for k, part in enumerate((original, masked, mask, result)):
        sheet.paste(
            _pil(part).resize((tile, tile), Image.Resampling.NEAREST), ((k % 2) * tile, (k // 2) * tile)
        )
    return sheet


def quadruple_sheet(
    items: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    captions: Sequence[str] = (),
    columns: int = 4,
    tile: int = 128,
) -> Image.Image:
    """Several (original, hole, result) quadruples side by side with a caption strip under each."""
    quads = [quadruple(o, h, r, tile) for o, h, r in items]
    return image_grid(quads, captions, columns=columns, tile=2 * tile)
