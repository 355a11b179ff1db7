"""The probe's Inception-v3 features are torch-fidelity's (TF-FID's) on the same weights: torchmetrics' extractor
with `antialias=False`, not its antialiased default."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import torch

from projects.inpaint_probe.fid import build_feature_extractor, extract_features


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A saved random-initialised state dict of torch-fidelity's Inception-v3, and torch-fidelity's own
    extractor loaded from that file."""
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    with (  # build the architecture without the download its constructor starts
        mock.patch.object(fidelity, "load_state_dict_from_url", return_value={}),
        mock.patch.object(fidelity.FeatureExtractorInceptionV3, "load_state_dict"),
        torch.random.fork_rng(),
    ):
        torch.manual_seed(0)
        model = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(model.state_dict(), path)
    reference = fidelity.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
    )
    return path, reference


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    # random weights give tiny features (~1e-8): compare relative to their norm, not with an absolute tolerance
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_the_probe_builds_torchmetrics_inception_without_antialiasing(tmp_path):
    """Fast guard (the Inception itself is mocked): the probe asks torchmetrics for antialias=False."""
    path = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(1)}, path)
    with mock.patch("torchmetrics.image.fid.NoTrainInceptionV3") as inception:
        build_feature_extractor("inception", str(path))
    assert inception.call_args.kwargs["antialias"] is False
    assert inception.call_args.kwargs["feature_extractor_weights_path"] == str(path)


def test_probe_inception_features_equal_torch_fidelity_and_differ_when_antialiased(random_inception):
    path, reference = random_inception
    extractor, info = build_feature_extractor("inception", str(path))
    assert info.metric == "fid" and info.comparable and info.dim == 2048
    # one 128 px image: the 299 px resize is an upsampling, where the two filters still differ
    images = torch.rand(1, 3, 128, 112, generator=torch.Generator().manual_seed(1))
    ours = extract_features(extractor, images)
    as_uint8 = (images * 255).round().to(torch.uint8)
    with torch.no_grad():
        (theirs,) = reference(as_uint8)
        extractor.use_antialias = True  # torchmetrics' default, which the probe used before
        antialiased = extractor(as_uint8)
    assert ours.shape == (1, 2048)
    assert _relative_error(ours, theirs) < 1e-5
    assert _relative_error(antialiased, theirs) > 1e-3
