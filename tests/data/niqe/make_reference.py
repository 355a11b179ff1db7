"""Regenerate the NIQE test images and their reference values (not run by the test suite).

The reference values come from an implementation independent of ours: BasicSR 1.4.2's `basicsr/metrics/niqe.py`
(Apache-2.0), which reproduces the authors' MATLAB release (its docstring: MATLAB R2021a 5.72957338 vs 5.7295763
on baboon.png). Steps used for the shipped reference.json:

    pip download basicsr==1.4.2 --no-deps -d /tmp/niqe_ref      # the sdist, nothing installed
    tar xzf /tmp/niqe_ref/basicsr-1.4.2.tar.gz -C /tmp/niqe_ref
    python tests/data/niqe/make_reference.py --basicsr /tmp/niqe_ref/basicsr-1.4.2 [--images]

BasicSR's package __init__ pulls in OpenCV and its training stack, so its three source files are loaded by path
with two shims: `scipy.ndimage.filters` (a removed alias) is read as `scipy.ndimage`, and the registry decorator
and cv2 (used only by its 'gray' branch, which we do not call) are stubbed. The 'y' values come from its
`calculate_niqe(bgr_image, 0, convert_to='y')`; the 'gray' values feed its `niqe()` core with MATLAB rgb2gray
luminance (its own 'gray' branch uses OpenCV's weights, not MATLAB's). Interpreter used: the project's venv
(numpy 1.26, scipy 1.17, torch 2.14, CPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

HERE = Path(__file__).resolve().parent
GRAY = np.array([0.298936021293775, 0.587043074451121, 0.114020904255103])


def make_images() -> None:
    """Deterministic images from the toy world's renderer: a real render, its blurred and noisy versions, a
    toy_ldm image, and a non-square crop (3 x 2 blocks)."""
    sys.path.insert(0, str(HERE.parents[2]))
    from common.data.toy_world import CATALOGUE, render_scene, render_toy_ldm, sample_scene

    scene = sample_scene(CATALOGUE[3], np.random.default_rng(7))
    real, *_ = render_scene(scene, 256)
    real.save(HERE / "render.png")
    real.filter(ImageFilter.GaussianBlur(2)).save(HERE / "render_blur.png")
    noisy = np.asarray(real, np.float64) + np.random.default_rng(3).normal(0, 12, (256, 256, 3))
    Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8)).save(HERE / "render_noise.png")
    render_toy_ldm(sample_scene(CATALOGUE[10], np.random.default_rng(11)), 256).save(HERE / "toy_ldm.png")
    other, *_ = render_scene(sample_scene(CATALOGUE[17], np.random.default_rng(5)), 320)
    other.crop((10, 40, 310, 250)).save(HERE / "render_300x210.png")


def load_basicsr(root: Path) -> types.ModuleType:
    for name in ("basicsr", "basicsr.utils", "basicsr.metrics"):
        sys.modules[name] = types.ModuleType(name)
    registry = types.ModuleType("basicsr.utils.registry")
    registry.METRIC_REGISTRY = types.SimpleNamespace(register=lambda: (lambda f: f))
    sys.modules["basicsr.utils.registry"] = registry
    sys.modules.setdefault("cv2", types.ModuleType("cv2"))

    def load(name: str, relative: str) -> types.ModuleType:
        source = (root / relative).read_text().replace("scipy.ndimage.filters", "scipy.ndimage")
        module = types.ModuleType(name)
        module.__file__ = str(root / relative)
        exec(compile(source, str(root / relative), "exec"), module.__dict__)
        sys.modules[name] = module
        return module

    color = load("basicsr.utils.color_util", "basicsr/utils/color_util.py")
    sys.modules["basicsr.utils"].bgr2ycbcr = color.bgr2ycbcr
    sys.modules["basicsr.utils.matlab_functions"] = load(
        "basicsr.utils.matlab_functions", "basicsr/utils/matlab_functions.py"
    )
    load("basicsr.metrics.metric_util", "basicsr/metrics/metric_util.py")
    return load("basicsr.metrics.niqe", "basicsr/metrics/niqe.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--basicsr", type=Path, required=True, help="unpacked basicsr-1.4.2 sdist")
    parser.add_argument("--images", action="store_true", help="regenerate the PNGs first")
    args = parser.parse_args()
    if args.images:
        make_images()
    niqe = load_basicsr(args.basicsr)
    params = np.load(args.basicsr / "basicsr/metrics/niqe_pris_params.npz")
    values = {}
    for path in sorted(HERE.glob("*.png")):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        gray = np.round(rgb.astype(np.float64) @ GRAY)
        values[path.name] = {
            "y": niqe.calculate_niqe(rgb[..., ::-1].copy(), 0, input_order="HWC", convert_to="y"),
            "gray": niqe.niqe(
                gray, params["mu_pris_param"], params["cov_pris_param"], params["gaussian_window"]
            ),
        }
        print(path.name, values[path.name])
    (HERE / "reference.json").write_text(json.dumps(values, indent=2) + "\n")


if __name__ == "__main__":
    main()
