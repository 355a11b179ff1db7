"""Paper 003 Sec. 6, Figs. 7-8: the classifier's test report shows, per generator, the generated images it
predicted real."""

from __future__ import annotations

import lightning as L
import torch
from PIL import Image

from projects.inpaint_probe.classifier import RealFakeClassifier


def test_false_real_grids_are_written_per_generator(tmp_path):
    model = RealFakeClassifier(backbone="resnet50.tv_in1k", preset="tiny", false_real_images=8)
    model.forward = lambda batch: torch.tensor([[5.0, -5.0]]).expand(
        batch["image"].shape[0], 2
    )  # "real" always
    batch = {
        "image": torch.rand(5, 3, 16, 16),
        "label": torch.tensor([1, 1, 0, 1, 0]),
        "generator_id": torch.tensor([0, 1, 0, 1, 1]),
        "index": torch.arange(5),
        "path": [f"/x/{i}.png" for i in range(5)],
        "skipped": [],
    }
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.test(model, dataloaders=torch.utils.data.DataLoader([batch], batch_size=None), verbose=False)
    assert {g: len(items) for g, items in model._false_real.items()} == {"generator_0": 1, "generator_1": 2}
    for generator in ("generator_0", "generator_1"):
        assert Image.open(tmp_path / "plots" / f"test_false_real_{generator}.png").size[0] > 0
    assert (tmp_path / "test_per_generator.md").is_file()  # the base report is still written
