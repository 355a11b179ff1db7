"""Scenes: everything that varies between photographs of one subclass, and how it is sampled.

A `Scene` is plain data (pose, proportions, lever side, background, light, wear, lighting, noise, caption
template, texture seed): `dataclasses.replace(scene, wear=...)` re-renders the SAME photograph aged or
relit, which is exactly the (x, x') / (x, A_e(x)) pairs of the fine-grained guidance paper (Eq. 4-5).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from common.data.toy_world.catalogue import _TEMPLATES, MATERIALS, RGB, Subtype, get_subtype
from common.data.toy_world.geometry import _all_points, _rotation
from common.data.toy_world.valves import _build_geometry, _Jitter

_BG_KINDS = ("plain", "gradient", "concrete", "wood", "metal")
_BG_PALETTE: tuple[RGB, ...] = (
    (0.86, 0.86, 0.84),  # light grey
    (0.80, 0.74, 0.62),  # beige
    (0.30, 0.33, 0.37),  # slate
    (0.52, 0.58, 0.64),  # blue grey
    (0.45, 0.47, 0.36),  # olive
    (0.58, 0.42, 0.28),  # workbench wood
    (0.95, 0.95, 0.95),  # white sweep
    (0.20, 0.21, 0.22),  # dark workshop
)
_WEAR = ("clean", "weathered", "corroded")
_LIGHTING = ("normal", "low_light", "overexposed", "glare")


@dataclass(frozen=True)
class Scene:
    """One photograph, as data: re-rendering a Scene gives the same image at any size.

    Replace `wear` or `lighting` (dataclasses.replace) to get the same part aged or relit: the temporal and
    environmental pairs of the fine-grained guidance paper (Sec. 3, Eq. 4-5).
    """

    subclass: str
    angle: float  # in-plane rotation, degrees
    scale: float  # image widths per object unit
    center: tuple[float, float]  # where the part's bounding-box centre lands, in image fractions
    body_scale: float
    handle_side: int
    handle_length: float
    light_azimuth: float  # direction the light comes from in the image plane, degrees
    light_gain: float
    background: str
    bg_colours: tuple[RGB, RGB]
    wear: str
    lighting: str
    glare: tuple[float, float, float]  # (x, y, strength) in image fractions; strength 0 without glare
    noise_sigma: float  # sensor noise std on the 0-1 scale
    template: int  # caption template
    seed: int  # textures, corrosion and sensor noise

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        d = dict(data)
        d["center"] = tuple(d["center"])
        d["bg_colours"] = tuple(tuple(c) for c in d["bg_colours"])
        d["glare"] = tuple(d["glare"])
        return cls(**d)

    @property
    def subtype(self) -> Subtype:
        return get_subtype(self.subclass)

    def jitter(self) -> _Jitter:
        return _Jitter(self.body_scale, self.handle_side, self.handle_length)


def sample_scene(subtype: Subtype, rng: np.random.Generator) -> Scene:
    """Draw the pose, proportions, background, light, wear and noise of one photograph of `subtype`."""
    jitter = _Jitter(float(rng.uniform(0.94, 1.06)), int(rng.choice([-1, 1])), float(rng.uniform(0.9, 1.1)))
    pts = _all_points(_build_geometry(subtype, jitter))
    centre = (pts.min(0) + pts.max(0)) / 2
    angle = float(rng.uniform(-20.0, 20.0))
    rel = (pts - centre) @ _rotation(angle).T
    scale = float(rng.uniform(0.58, 0.86) / (rel.max(0) - rel.min(0)).max())
    margin = 0.03
    lo, hi = margin - rel.min(0) * scale, 1 - margin - rel.max(0) * scale
    center = tuple(float(rng.uniform(a, b)) if b > a else float((a + b) / 2) for a, b in zip(lo, hi))
    mat = MATERIALS[subtype.material]
    wear = str(rng.choice(_WEAR, p=[0.55, 0.25, 0.2]))
    if wear == "corroded" and mat.corrosion == "none":
        wear = "weathered"
    lighting = str(rng.choice(_LIGHTING, p=[0.7, 0.1, 0.1, 0.1]))
    gain = {
        "normal": (0.88, 1.1),
        "low_light": (0.32, 0.45),
        "overexposed": (1.35, 1.6),
        "glare": (0.9, 1.05),
    }
    light_gain = float(rng.uniform(*gain[lighting]))
    glare = (0.0, 0.0, 0.0)
    if lighting == "glare":
        glare = (float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.25, 0.6)), float(rng.uniform(0.5, 0.9)))
    i, k = rng.choice(len(_BG_PALETTE), size=2, replace=False)
    sigma = float(rng.uniform(0.006, 0.016)) * (2.5 if lighting == "low_light" else 1.0)
    return Scene(
        subclass=subtype.subclass,
        angle=angle,
        scale=scale,
        center=center,  # type: ignore[arg-type]
        body_scale=jitter.body_scale,
        handle_side=jitter.handle_side,
        handle_length=jitter.handle_length,
        light_azimuth=float(rng.uniform(190.0, 340.0)),  # from the left, above or the right; never from below
        light_gain=light_gain,
        background=str(rng.choice(_BG_KINDS)),
        bg_colours=(_BG_PALETTE[int(i)], _BG_PALETTE[int(k)]),
        wear=wear,
        lighting=lighting,
        glare=glare,
        noise_sigma=sigma,
        template=int(rng.integers(len(_TEMPLATES))),
        seed=int(rng.integers(0, 2**62)),
    )
