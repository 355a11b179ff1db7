"""What researchers look at after a run, written to the run directory and sent to W&B when it is a logger:
metric tables (per generator), ROC/PR curves, and grids of images (e.g. misclassified ones)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from lightning.pytorch.loggers import WandbLogger
from PIL import Image, ImageDraw
from torchmetrics.functional.classification import binary_precision_recall_curve, binary_roc

from common.io import save_figure, save_image, write_csv, write_text


def wandb_loggers(trainer: Any) -> list[WandbLogger]:
    return [lg for lg in getattr(trainer, "loggers", []) if isinstance(lg, WandbLogger)]


def run_dir(trainer: Any) -> Path:
    return Path(trainer.default_root_dir)


def log_table(
    trainer: Any, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], markdown: str = ""
) -> Path:
    """`<run>/<key>.csv` (+ `.md` when given) and a W&B table under `key`."""
    base = run_dir(trainer) / key.replace("/", "_")
    path = write_csv(base.with_suffix(".csv"), columns, rows)
    if markdown:
        write_text(base.with_suffix(".md"), markdown + "\n")
    for logger in wandb_loggers(trainer):
        logger.log_table(key=key, columns=list(columns), data=[list(r) for r in rows])
    return path


def log_figure(trainer: Any, key: str, figure: Any) -> Path:
    """Save a matplotlib figure as `<run>/plots/<key>.png` and log it to W&B as an image."""
    path = save_figure(run_dir(trainer) / "plots" / f"{key.replace('/', '_')}.png", figure)
    plt.close(figure)
    for logger in wandb_loggers(trainer):
        logger.log_image(key=key, images=[str(path)])
    return path


def log_pil(trainer: Any, key: str, image: Image.Image, caption: str | None = None) -> Path:
    path = save_image(run_dir(trainer) / "plots" / f"{key.replace('/', '_')}.png", image)
    for logger in wandb_loggers(trainer):
        # Lightning's WandbLogger checks len() of every keyword it is given: pass caption only when there is one.
        extra = {"caption": [caption]} if caption else {}
        logger.log_image(key=key, images=[str(path)], **extra)
    return path


def curves_figure(
    scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, names: Sequence[str], title: str = ""
) -> Any:
    """ROC and precision-recall curves, one line per generator subset (subsets with one class are left out)."""
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(10, 4.5))
    for g in torch.unique(groups).tolist():
        mask = groups == g
        s, y = scores[mask].float(), labels[mask].long()
        if y.numel() == 0 or y.min() == y.max():
            continue
        name = names[g] if 0 <= g < len(names) else f"generator_{g}"
        fpr, tpr, _ = binary_roc(s, y)
        precision, recall, _ = binary_precision_recall_curve(s, y)
        ax_roc.plot(fpr.numpy(), tpr.numpy(), label=name)
        ax_pr.plot(recall.numpy(), precision.numpy(), label=name)
    ax_roc.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax_roc.set(
        xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.01)
    )
    ax_pr.set(xlabel="recall", ylabel="precision", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.01))
    for ax in (ax_roc, ax_pr):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def image_grid(
    images: Sequence[torch.Tensor | Image.Image],
    captions: Sequence[str] = (),
    columns: int = 8,
    tile: int = 128,
) -> Image.Image:
    """Tiles with a caption strip under each; tensors are (3, H, W) in [0, 1]."""
    n = len(images)
    columns = max(1, min(columns, n))
    rows = max(1, math.ceil(n / columns))
    strip = 14 * max(1, max((c.count("\n") + 1 for c in captions), default=1))
    sheet = Image.new("RGB", (columns * tile, rows * (tile + strip)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, image in enumerate(images):
        if isinstance(image, torch.Tensor):
            array = (
                (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255)
                .round()
                .astype("uint8")
            )
            image = Image.fromarray(array)
        x, y = (i % columns) * tile, (i // columns) * (tile + strip)
        sheet.paste(image.convert("RGB").resize((tile, tile)), (x, y))
        if i < len(captions):
            draw.multiline_text((x + 2, y + tile + 1), captions[i], fill="black", spacing=1)
    return sheet
