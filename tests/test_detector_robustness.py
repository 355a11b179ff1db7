"""The robustness protocol (ITEM Fig. 4, CNNDetection) and the Tables I-III shape for every detector, not only
ITEM: RealFakeFolder's test conditions, RealFakeTask's per-condition report, the image detectors' config."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
import yaml
from PIL import Image
from sklearn.metrics import average_precision_score

from common.data.realfake import RealFakeFolder
from common.experiment.detector_report import accuracy_table, paper_tables
from common.perturbations import Perturbation, robustness_specs
from projects.inpaint_probe.classifier import RealFakeClassifier
from tests.cli_helpers import CONFIGS, run_cli, tiny_overrides

TINY = CONFIGS / "inpaint_probe" / "tiny.yaml"
CPU = CONFIGS / "trainer" / "cpu.yaml"
IMAGE_ROBUSTNESS = CONFIGS / "inpaint_probe" / "data" / "robustness.yaml"


# --- RealFakeFolder: one test dataloader per condition ------------------------------------------------------------


def _stored(path: str) -> torch.Tensor:
    """The image file as stored, (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255.0


def _center_crop_folder(root, **kwargs) -> RealFakeFolder:
    """The test folder as 16 px centre crops in one batch of 64."""
    return RealFakeFolder(
        train_root=str(root),
        test_root=str(root),
        image_size=16,
        resize="center_crop",
        num_workers=0,
        batch_size=64,
        **kwargs,
    )


def test_each_test_condition_is_a_loader_of_the_clean_images_perturbed_per_file(realfake_root) -> None:
    conditions = ["none", "blur:2", "noise:0.005"]
    dm = _center_crop_folder(realfake_root, test_perturbations=conditions)
    clean = _center_crop_folder(realfake_root)
    for module in (dm, clean):
        module.setup("test")
    assert dm.test_conditions == conditions
    loaders = dm.test_dataloader()
    assert isinstance(loaders, list) and len(loaders) == 3
    reference = next(iter(clean.test_dataloader()))
    batches = [next(iter(loader)) for loader in loaders]
    assert torch.equal(batches[0]["image"], reference["image"])  # clean first
    for spec, batch in zip(conditions[1:], batches[1:], strict=True):
        # the stored image is perturbed, then centre-cropped (the field's protocol), not the crop
        by_hand = torch.stack(
            [
                TF.center_crop(Perturbation.parse(spec)(_stored(path), seed_key=path), [16, 16])
                for path in reference["path"]
            ]
        )
        crop_first = torch.stack(
            [
                Perturbation.parse(spec)(image, seed_key=path)
                for image, path in zip(reference["image"], reference["path"])
            ]
        )
        assert torch.allclose(batch["image"], by_hand, atol=1e-6)
        assert not torch.allclose(batch["image"], crop_first, atol=1e-3)
        assert not torch.allclose(batch["image"], reference["image"], atol=1e-3)
        assert batch["path"] == reference["path"] and torch.equal(batch["label"], reference["label"])
    # validation stays clean under the test grid
    dm.setup("fit")
    clean.setup("fit")
    assert torch.equal(next(iter(dm.val_dataloader()))["image"], next(iter(clean.val_dataloader()))["image"])


def test_a_single_test_perturbation_stays_one_loader_and_condition(realfake_root) -> None:
    dm = RealFakeFolder(
        test_root=str(realfake_root), image_size=16, num_workers=0, test_perturbation="jpeg:50"
    )
    dm.setup("test")
    assert dm.test_conditions == ["jpeg:50"]
    assert isinstance(dm.test_dataloader(), torch.utils.data.DataLoader)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"test_perturbations": ["none", "jpeg:75"], "test_perturbation": "blur:1"}, "not both"),
        ({"test_perturbations": ["jpeg:75", "none"]}, "must start with 'none'"),
        ({"test_perturbations": ["none", "jpeg:75", "jpeg:75.0"]}, "repeats"),
        ({"test_perturbations": ["none", "sharpen:2"]}, "unknown perturbation"),
        ({"test_perturbations": []}, "non-empty list"),
    ],
)
def test_bad_test_conditions_fail_at_config_time(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        RealFakeFolder(test_root="unused", **kwargs)


def test_image_detector_robustness_config_is_items_fig4_grid() -> None:
    image = yaml.safe_load(IMAGE_ROBUSTNESS.read_text())["data"]["init_args"]["test_perturbations"]
    item = yaml.safe_load((CONFIGS / "item_detector" / "robustness.yaml").read_text())
    assert image == robustness_specs() == item["data"]["init_args"]["test_perturbations"]


# --- RealFakeTask: one report per condition -----------------------------------------------------------------------


class _Conditions(L.LightningDataModule):
    """Two test conditions, one fixed batch each (the second: every generated image scored lower)."""

    def __init__(self, batches: list[dict]) -> None:
        super().__init__()
        self.batches = batches
        self.test_conditions = ["none", "jpeg:50"]
        self.generators = ["gan", "ldm"]

    def test_dataloader(self) -> list[torch.utils.data.DataLoader]:
        return [torch.utils.data.DataLoader([b], batch_size=None) for b in self.batches]


def test_base_task_reports_every_condition_and_collects_images_from_clean_batches_only(tmp_path) -> None:
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 1, 0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    clean_p = torch.tensor([0.2, 0.4, 0.6, 0.9, 0.1, 0.8, 0.3, 0.7])
    perturbed_p = torch.tensor([0.3, 0.2, 0.1, 0.4, 0.45, 0.35, 0.05, 0.25])
    batches = [
        {
            "image": torch.rand(8, 3, 16, 16),
            "label": labels,
            "generator_id": groups,
            "index": torch.arange(8),
            "path": [f"/x/{i}.png" for i in range(8)],
            "score": p,
        }
        for p in (clean_p, perturbed_p)
    ]
    model = RealFakeClassifier(backbone="resnet50.tv_in1k", preset="tiny", false_real_images=8)
    model.forward = lambda batch: torch.stack(  # logits whose generated node gives the batch's scores
        [torch.zeros_like(batch["score"]), torch.logit(batch["score"])], dim=1
    )
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.test(model, datamodule=_Conditions(batches), verbose=False)

    reports = json.loads((tmp_path / "test_robustness.json").read_text())
    assert list(reports) == ["none", "jpeg:50"]
    assert reports["none"] == json.loads((tmp_path / "test_metrics.json").read_text())
    for condition, p in (("none", clean_p), ("jpeg:50", perturbed_p)):
        expected = [average_precision_score(labels[groups == g], p[groups == g]) for g in (0, 1)]
        assert reports[condition]["gan"]["ap"] == pytest.approx(expected[0])
        assert reports[condition]["ldm"]["ap"] == pytest.approx(expected[1])
        assert reports[condition]["mean"]["ap"] == pytest.approx(sum(expected) / 2)
    expected_mean = (
        sum(average_precision_score(labels[groups == g], perturbed_p[groups == g]) for g in (0, 1)) / 2
    )
    assert float(trainer.callback_metrics["test_robustness/jpeg:50/ap"]) == pytest.approx(expected_mean)
    rows = list(csv.DictReader((tmp_path / "test_robustness.csv").open()))
    assert [(r["perturbation"], r["level"]) for r in rows] == [("none", "-"), ("jpeg", "50")]
    assert (tmp_path / "plots" / "test_robustness.png").is_file()
    # clean batch: 4 misclassified at 0.5 (0.6, 0.4, 0.3, 0.7), of which 2 generated images called real
    assert len(model._misclassified) == 4
    assert sum(len(v) for v in model._false_real.values()) == 2


def test_a_test_dataloader_without_a_condition_is_one_clear_error(tmp_path) -> None:
    model = RealFakeClassifier(backbone="resnet50.tv_in1k", preset="tiny")
    batch = {
        "image": torch.rand(2, 3, 16, 16),
        "label": torch.tensor([0, 1]),
        "generator_id": torch.zeros(2).long(),
        "index": torch.arange(2),
        "path": ["a", "b"],
    }
    loaders = [torch.utils.data.DataLoader([batch], batch_size=None)] * 2
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match="test dataloader 1 has no condition"):
        trainer.test(model, dataloaders=loaders, verbose=False)


# --- Tables I-III shape for a non-ITEM detector -------------------------------------------------------------------


def test_accuracy_table_holds_real_generated_mean_acc_and_ap_per_generator_and_means() -> None:
    report = {
        "gan": {"n": 4.0, "acc": 0.75, "real_acc": 0.5, "fake_acc": 1.0, "ap": 0.8333333},
        "sd": {"n": 2.0, "acc": 0.5, "real_acc": float("nan"), "fake_acc": 0.5, "ap": float("nan")},
        "mean": {"n": 6.0, "acc": 0.625, "real_acc": 0.5, "fake_acc": 0.75, "ap": 0.8333333},
        "pooled": {"n": 6.0, "acc": 0.6667, "real_acc": 0.5, "fake_acc": 0.75, "ap": 0.9},
    }
    markdown = accuracy_table(report, "CNNDet (run)")
    header, _, row = markdown.splitlines()[2:5]
    assert header == (
        "| method | gan real ACC | gan fake ACC | gan ACC | gan AP | sd real ACC | sd fake ACC | sd ACC | sd AP "
        "| mean real ACC | mean fake ACC | mean ACC | mAP |"
    )
    assert row == (
        "| CNNDet (run) | 50.00 | 100.00 | 75.00 | 83.33 | - | 50.00 | 50.00 | n/a (one class) "
        "| 50.00 | 75.00 | 62.50 | 83.33 |"
    )
    assert "leaves out sd (only generated)" in markdown
    assert markdown in paper_tables(report, "CNNDet (run)")[2]


# --- through the real CLI: a tiny classifier tested under 3 conditions ------------------------------------------


def _test_args(toy: Path, root: Path, name: str, *extra: str) -> list[str]:
    return [
        "test",
        "--config",
        str(CPU),
        "--config",
        str(TINY),
        *tiny_overrides(TINY, toy),
        f"--run.root={root}",
        f"--run.name={name}",
        "--run.wandb=false",
        "--model.init_args.false_real_images=0",  # grids are tested elsewhere; keeps the three runs short
        *extra,
    ]


def test_classifier_robustness_conditions_equal_separate_tests_under_each_perturbation(
    small_toy_world, tmp_path
) -> None:
    """No checkpoint: the CLI seeds (42) before building the model, so every run tests the same weights."""
    code, out, err = run_cli(
        _test_args(
            small_toy_world,
            tmp_path,
            "grid",
            '--data.init_args.test_perturbations=["none","blur:2","jpeg:50"]',
        )
    )
    assert code == 0, err
    run = tmp_path / "inpaint_probe" / "grid"
    reports = json.loads((run / "test_robustness.json").read_text())
    clean = json.loads((run / "test_metrics.json").read_text())
    assert list(reports) == ["none", "blur:2", "jpeg:50"] and reports["none"] == clean
    for condition in ("blur:2", "jpeg:50"):
        code, _, err = run_cli(
            _test_args(
                small_toy_world,
                tmp_path,
                condition.replace(":", "-"),
                f"--data.init_args.test_perturbation={condition}",
            )
        )
        assert code == 0, err
        alone = json.loads(
            (tmp_path / "inpaint_probe" / condition.replace(":", "-") / "test_metrics.json").read_text()
        )
        assert reports[condition] == alone and reports[condition] != clean  # same computation: bit-identical
        assert "test_robustness/" + condition + "/ap" in (run / "metrics.csv").read_text().splitlines()[0]
    assert (run / "plots" / "test_robustness.png").is_file() and "Fig. 4 shape" in out
    # Tables I-III shape for this (non-ITEM) detector, cells from test_metrics.json by hand
    tables = (run / "test_paper_tables.md").read_text()

    def cells(metric: str) -> str:
        return " | ".join(f"{100 * clean[g][metric]:.2f}" for g in ("toy_gan", "toy_ldm", "mean"))

    assert "| method | toy_gan | toy_ldm | mAP |" in tables
    assert f"| RealFakeClassifier (grid) | {cells('acc')} |" in tables
    assert f"| RealFakeClassifier (grid) | {cells('ap')} |" in tables
    assert "toy_gan real ACC" in tables and "Table III shape" in tables


def test_both_perturbation_settings_at_once_are_one_clear_line(small_toy_world, tmp_path) -> None:
    args = _test_args(small_toy_world, tmp_path, "both", "--data.init_args.test_perturbation=jpeg:75")
    code, _, err = run_cli([*args[:5], "--config", str(IMAGE_ROBUSTNESS), *args[5:]])
    assert code == 2 and "not both" in err and "Traceback" not in err
