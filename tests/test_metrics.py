"""Real-vs-generated metrics checked against scikit-learn, per generator and as the mean over generators."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, roc_auc_score

from common.metrics import RealFakeMetrics, binary_report, format_table, mean_report


def _sklearn_report(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    predicted = (scores >= 0.5).astype(int)
    return {
        "acc": accuracy_score(labels, predicted),
        "real_acc": accuracy_score(labels[labels == 0], predicted[labels == 0]),
        "fake_acc": accuracy_score(labels[labels == 1], predicted[labels == 1]),
        "ap": average_precision_score(labels, scores),
        "auroc": roc_auc_score(labels, scores),
        "f1": f1_score(labels, predicted),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_report_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    scores = np.clip(0.3 * labels + rng.random(200) * 0.7, 0, 1).astype(np.float32)
    ours = binary_report(torch.from_numpy(scores), torch.from_numpy(labels))
    for name, value in _sklearn_report(scores, labels).items():
        assert ours[name] == pytest.approx(value, abs=1e-5), name


def test_per_generator_and_mean_match_sklearn():
    rng = np.random.default_rng(3)
    n = 300
    groups = rng.integers(0, 3, n)
    labels = rng.integers(0, 2, n)
    scores = np.clip(labels * (0.2 + 0.2 * groups) + rng.random(n) * 0.6, 0, 1).astype(np.float32)
    metric = RealFakeMetrics(["biggan", "sd", "dalle"])
    for chunk in np.array_split(np.arange(n), 7):  # several update() calls, as batches
        metric.update(
            torch.from_numpy(scores[chunk]),
            torch.from_numpy(labels[chunk]),
            torch.from_numpy(groups[chunk]),
            torch.from_numpy(chunk),
        )
    report = metric.compute()
    expected = {}
    for g, name in enumerate(["biggan", "sd", "dalle"]):
        mask = groups == g
        expected[name] = _sklearn_report(scores[mask], labels[mask])
        for key, value in expected[name].items():
            assert report[name][key] == pytest.approx(value, abs=1e-5), (name, key)
    for key in expected["sd"]:
        assert report["mean"][key] == pytest.approx(np.mean([e[key] for e in expected.values()]), abs=1e-5)
    assert report["pooled"]["ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-5)


def test_duplicates_from_distributed_padding_are_counted_once():
    scores = torch.tensor([0.9, 0.2, 0.7, 0.9])
    labels = torch.tensor([1, 0, 0, 1])
    groups = torch.zeros(4, dtype=torch.long)
    metric = RealFakeMetrics(["g"])
    # index 0 appears twice: a DistributedSampler padded the last batch with it
    metric.update(scores, labels, groups, torch.tensor([0, 1, 2, 0]))
    report = metric.compute()
    assert report["g"]["n"] == 3
    assert report["g"]["acc"] == pytest.approx(2 / 3)


def test_single_class_subset_has_undefined_ap_left_out_of_the_mean():
    per_group = {
        "only_fakes": binary_report(torch.tensor([0.8, 0.3]), torch.tensor([1, 1])),
        "both": binary_report(torch.tensor([0.8, 0.3]), torch.tensor([1, 0])),
    }
    assert math.isnan(per_group["only_fakes"]["ap"]) and math.isnan(per_group["only_fakes"]["real_acc"])
    assert per_group["only_fakes"]["fake_acc"] == 0.5
    mean = mean_report(per_group)
    assert mean["ap"] == pytest.approx(1.0)  # only "both" counts
    assert mean["fake_acc"] == pytest.approx(0.75)


def test_unknown_labels_are_ignored_by_compute():
    metric = RealFakeMetrics(["g"])
    metric.update(torch.tensor([0.9, 0.1, 0.5]), torch.tensor([1, 0, -1]), torch.zeros(3, dtype=torch.long))
    assert metric.compute()["g"]["n"] == 2


def test_format_table_has_generators_then_mean():
    report = {
        "a": binary_report(torch.tensor([0.9, 0.1]), torch.tensor([1, 0])),
        "b": binary_report(torch.tensor([0.9, 0.6]), torch.tensor([1, 0])),
    }
    report["mean"] = mean_report(report)
    table = format_table(report, columns=("acc", "ap"))
    lines = table.splitlines()
    assert lines[0].startswith("| generator | n | acc | ap |")
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["a", "b", "mean"]
    assert "| 75.00 |" in lines[-1]
