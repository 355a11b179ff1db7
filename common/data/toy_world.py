"""The embedded toy world: a deterministic, procedural fine-grained dataset of industrial valves.

Why it exists
-------------
Every shipped config (the real-vs-generated classifier, the ITEM detector, the inpainting probe, the
fine-grained guidance generator and its subtype classifier) has to run on a fresh checkout with no network.
Instead of a download, the repo ships this generator: `ensure_toy_world()` writes the dataset under `data/`
the first time a config needs it and reuses it afterwards. Nothing here uses a global RNG: the same
`ToyWorldSpec` gives byte-identical PNGs with the same numpy/Pillow/zlib on the same kind of CPU (numpy's
SIMD maths may round a few pixels differently elsewhere, which is why the cache is keyed by the spec and
not by the content hash).

What is drawn
-------------
The six valve types of the fine-grained guidance paper (Sec. 4.1): ball, butterfly, check, control, gate
and plug, with four subtypes each (24 subclasses). Subtypes of one type differ in one or two SMALL
attributes (material/colour, bolt count 4/6/8, flange shape round/square/threaded, handle shape
lever/T-handle/handwheel/actuator box/diaphragm actuator, handle colour), so they are confusable the way
real valve subclasses are. `CATALOGUE` holds them as data; drawing code is per part type and per
attribute value, never per subtype.

A part is a list of polygons in object units, each with a shading model (cylinder, ellipsoid, ring,
tilted plane) lit by a Blinn-Phong light, drawn with PIL at `supersample` x the output size and
LANCZOS-downsampled (anti-aliasing). Each image varies the pose (rotation +-20 deg, scale, translation),
proportions (+-6 %), lever side, background (plain, gradient, concrete, wood planks, brushed metal),
light direction and gain, a drop shadow, vignetting and Gaussian sensor noise. Following the paper's
temporal and environmental variants (Sec. 3, Eq. 4-5), every scene also has a wear level (clean,
weathered, corroded: rust on steel and iron, green patina on brass and bronze) and a lighting condition
(normal, low light, overexposed, glare). A `Scene` is plain data: `dataclasses.replace(scene, wear=...)`
re-renders the SAME photograph aged or relit, which is exactly the (x, x') / (x, A_e(x)) pairs of Eq. 4-5.

Annotations, per image: a caption listing the subtype's distinguishing attributes (four templates, e.g.
"a ball valve with a brass body, a red lever handle and two threaded ends"), the subclass name
("ball/brass_red_lever") and integer id (alphabetical, so it equals torchvision ImageFolder's index of the
subclass folder), the part type, the attributes, and grounded part boxes with one noun phrase each
("ball valve", "brass body", "round flange", "bolt", "red lever handle", "bonnet", ...). Every phrase is a
substring of the caption (ITEM Sec. III grounds caption noun phrases to boxes). Boxes are [x0, y0, x1, y1]
pixel edges of the saved image (x1, y1 exclusive, as for `PIL.Image.crop`), computed from the transformed
polygons, so they are tight to what is drawn and clipped to the image.

Real and generated images
-------------------------
"real" images are the rendered photographs above. "generated" images come from two toy generators that
draw NEW scenes (their own seeds, same distribution of subtypes and captions) and leave the fingerprints
of the generator families they stand for, until the project's own diffusion generator replaces them.
All are 8-bit RGB PNGs of the same size, so a detector cannot separate them by size, mode or format.

* ``toy_gan``: renders the scene at 1/4 resolution and upsamples it 4x through two fixed GAN-style stages:
  a kernel-4 stride-2 transposed convolution whose taps are bilinear weights perturbed by a fixed random
  3.5 % (per channel), then a fixed 3x3 sharpening convolution. The unequal gains of the four output
  phases leave the periodic checkerboard of GAN upsamplers (spectral peaks at multiples of 1/4 cycle/pixel);
  the upsampling also leaves the image without the fine texture and sensor noise a camera records.
* ``toy_ldm``: renders the scene at full resolution, encodes it into an 8x-downsampled 4-channel "latent"
  (fixed linear map, quantised to 1/64), and decodes it with bicubic upsampling through a fixed, slightly
  wrong colour matrix (a faint colour cast). A skip path adds back detail from a 2x-downsampled copy (the
  decoder's learned detail prior), so nothing above half the Nyquist frequency survives: sensor noise and
  the sharpest edges are lost. A faint fixed 8x8 pattern (std 1.2/255) is added, like the grid that VAE
  decoders imprint (spectral peaks at multiples of 1/8 cycle/pixel).

Layout written by `generate_toy_world` (see the forgelab README)::

    <root>/toy_world.json                          spec, version, counts, catalogue, content hash (written last)
    <root>/parts/<split>/<subclass_dir>/<id>.png   split in train/val/test; subclass_dir = "<type>__<name>"
    <root>/parts/manifest.jsonl                    one record per image (path relative to <root>/parts)
    <root>/realfake/<split>/<generator>/0_real/<id>.png and 1_fake/<id>.png   (CNNDetection layout)
    <root>/realfake/<split>.csv                    path,label,generator,caption,subclass (path relative to realfake/)
    <root>/realfake/<split>.jsonl                  the same plus boxes, phrases, attributes and the scene

Determinism: each image draws from its own `np.random.Generator(PCG64)` seeded by (spec.seed, kind, split,
generator or subclass, index); the global RNGs are never used, PNGs are written with fixed options, and
the result does not depend on the number of worker processes.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "CATALOGUE",
    "GENERATOR_DESCRIPTIONS",
    "PART_TYPES",
    "SPLITS",
    "SUBCLASS_IDS",
    "TOY_GENERATORS",
    "Material",
    "PartType",
    "Scene",
    "Subtype",
    "ToyWorldSpec",
    "caption_for",
    "ensure_toy_world",
    "generate_toy_world",
    "get_subtype",
    "render_part",
    "render_scene",
    "render_toy_gan",
    "render_toy_ldm",
    "sample_scene",
    "scene_annotations",
]

LOGGER = logging.getLogger("forgelab.toy_world")
# Bump when the drawing code changes what a spec produces: the spec hash includes it, so cached worlds
# written by older code are regenerated instead of silently mixed with new ones.
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
META_FILE = "toy_world.json"
CSV_HEADER = ("path", "label", "generator", "caption", "subclass")
REAL_DIR, FAKE_DIR = "0_real", "1_fake"

RGB = tuple[float, float, float]
Box = list[int]


# ----------------------------------------------------------------------------------------------------------
# Catalogue: what exists in the toy world, as data.
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Material:
    """How a surface looks: albedo, gloss, grain, and what corrosion does to it over time."""

    phrase: str  # words used in captions
    rgb: RGB
    specular: float
    shininess: float
    roughness: float  # std of per-pixel albedo noise: cast iron is grainy, PVC is smooth
    corrosion: str  # "rust", "patina" or "none": what the "corroded" wear level draws


MATERIALS: dict[str, Material] = {
    "brass": Material("brass", (0.80, 0.62, 0.25), 0.55, 28.0, 0.03, "patina"),
    "bronze": Material("bronze", (0.58, 0.38, 0.20), 0.35, 18.0, 0.04, "patina"),
    "stainless": Material("stainless steel", (0.70, 0.72, 0.74), 0.65, 40.0, 0.02, "none"),
    "cast_iron": Material("cast iron", (0.29, 0.29, 0.30), 0.14, 8.0, 0.09, "rust"),
    "pvc": Material("white PVC", (0.88, 0.88, 0.85), 0.22, 14.0, 0.01, "none"),
    "steel_red": Material("red-painted carbon steel", (0.62, 0.12, 0.09), 0.25, 12.0, 0.03, "rust"),
    "steel_grey": Material("grey-painted carbon steel", (0.45, 0.47, 0.47), 0.20, 10.0, 0.03, "rust"),
}
# Surfaces of the parts every valve shares (bolts, stems) and of painted handles (colour set per shape).
_STEEL = Material("zinc-plated steel", (0.64, 0.65, 0.66), 0.6, 30.0, 0.03, "rust")
_PAINT = Material("paint", (0.5, 0.5, 0.5), 0.35, 20.0, 0.015, "none")

HANDLE_COLOURS: dict[str, RGB] = {
    "red": (0.80, 0.09, 0.07),
    "blue": (0.10, 0.24, 0.68),
    "yellow": (0.93, 0.74, 0.10),
    "black": (0.10, 0.10, 0.11),
}
HANDLE_NOUNS = {
    "lever": "lever handle",
    "tee": "T-handle",
    "handwheel": "handwheel",
    "actuator": "actuator box",
    "diaphragm": "diaphragm actuator",
    "none": "",
}
END_NOUNS = {"round": "round flange", "square": "square flange", "threaded": "threaded end"}
NUMBER_WORDS = {0: "no", 4: "four", 6: "six", 8: "eight"}
ATTRIBUTE_NAMES = ("material", "flange", "bolts", "handle", "handle_colour")


@dataclass(frozen=True)
class PartType:
    """A valve type: its name and the type-specific part the caption mentions (if any)."""

    name: str
    extra_phrase: str = ""  # grounded phrase of the type's characteristic part, e.g. "bonnet"
    extra_clause: str = ""  # how captions mention it; must contain extra_phrase


PART_TYPES: dict[str, PartType] = {
    p.name: p
    for p in (
        PartType("ball"),
        PartType("butterfly"),
        PartType("check", "domed cover", "a domed cover"),
        PartType("control", "yoke", "an open yoke"),
        PartType("gate", "bonnet", "a tall bonnet"),
        PartType("plug"),
    )
}


@dataclass(frozen=True)
class Subtype:
    """One fine-grained subclass: a part type plus the small attributes that tell it from its siblings."""

    part_type: str
    name: str
    material: str  # key of MATERIALS
    flange: str  # "round", "square" or "threaded" (threaded ends carry no bolts)
    bolts: int  # visible bolts on each flange
    handle: str  # key of HANDLE_NOUNS
    handle_colour: str  # key of HANDLE_COLOURS, or "none" without a handle

    @property
    def subclass(self) -> str:
        return f"{self.part_type}/{self.name}"

    @property
    def subclass_dir(self) -> str:
        """Folder name: one level (ImageFolder-friendly), no dots (extension parsers split on them)."""
        return f"{self.part_type}__{self.name}"

    def attributes(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ATTRIBUTE_NAMES}


def _catalogue() -> tuple[Subtype, ...]:
    # Per type: a base subtype and variants one or two attribute changes away (star or 2x2 factorial),
    # so every pair within a type differs in 1-2 attributes. Materials, bolt counts, flange shapes and
    # handle shapes all vary somewhere; the classifier has to look at the small parts.
    rows = [
        # type, name, material, flange, bolts, handle, handle colour
        ("ball", "brass_red_lever", "brass", "threaded", 0, "lever", "red"),
        ("ball", "brass_blue_lever", "brass", "threaded", 0, "lever", "blue"),
        ("ball", "pvc_red_lever", "pvc", "threaded", 0, "lever", "red"),
        ("ball", "brass_red_tee", "brass", "threaded", 0, "tee", "red"),
        ("butterfly", "iron_lever_4bolt", "cast_iron", "round", 4, "lever", "blue"),
        ("butterfly", "iron_lever_8bolt", "cast_iron", "round", 8, "lever", "blue"),
        ("butterfly", "iron_handwheel_4bolt", "cast_iron", "round", 4, "handwheel", "blue"),
        ("butterfly", "iron_actuator_4bolt", "cast_iron", "round", 4, "actuator", "blue"),
        ("check", "grey_steel_4bolt", "steel_grey", "round", 4, "none", "none"),
        ("check", "grey_steel_6bolt", "steel_grey", "round", 6, "none", "none"),
        ("check", "bronze_4bolt", "bronze", "round", 4, "none", "none"),
        ("check", "bronze_6bolt", "bronze", "round", 6, "none", "none"),
        ("control", "blue_diaphragm_6bolt", "stainless", "round", 6, "diaphragm", "blue"),
        ("control", "blue_diaphragm_8bolt", "stainless", "round", 8, "diaphragm", "blue"),
        ("control", "yellow_diaphragm_6bolt", "stainless", "round", 6, "diaphragm", "yellow"),
        ("control", "yellow_diaphragm_8bolt", "stainless", "round", 8, "diaphragm", "yellow"),
        ("gate", "round_4bolt", "cast_iron", "round", 4, "handwheel", "red"),
        ("gate", "round_8bolt", "cast_iron", "round", 8, "handwheel", "red"),
        ("gate", "square_4bolt", "cast_iron", "square", 4, "handwheel", "red"),
        ("gate", "square_8bolt", "cast_iron", "square", 8, "handwheel", "red"),
        ("plug", "red_steel_tee", "steel_red", "square", 4, "tee", "black"),
        ("plug", "red_steel_lever", "steel_red", "square", 4, "lever", "black"),
        ("plug", "iron_tee", "cast_iron", "square", 4, "tee", "black"),
        ("plug", "iron_lever", "cast_iron", "square", 4, "lever", "black"),
    ]
    return tuple(sorted((Subtype(*row) for row in rows), key=lambda s: s.subclass))


#: All subclasses, sorted by name; a subclass's index here is its `subclass_id`.
CATALOGUE: tuple[Subtype, ...] = _catalogue()
SUBCLASS_IDS: dict[str, int] = {s.subclass: i for i, s in enumerate(CATALOGUE)}


def get_subtype(subclass: str) -> Subtype:
    """The catalogue entry named "type/name" (raises KeyError with the known names otherwise)."""
    try:
        return CATALOGUE[SUBCLASS_IDS[subclass]]
    except KeyError:
        raise KeyError(f"unknown subclass {subclass!r}; known: {sorted(SUBCLASS_IDS)}") from None


# ----------------------------------------------------------------------------------------------------------
# Geometry: a part as polygons in object units (x right, y down, pipe axis at y = _PY).
# ----------------------------------------------------------------------------------------------------------

_PY = 0.3


@dataclass
class _Shape:
    points: np.ndarray  # (N, 2) polygon
    rgb: RGB
    surface: Material  # gloss and grain (the colour is rgb)
    normal: tuple[Any, ...]  # shading model, see _normals()
    component: int | None  # index into _Geometry.phrases; None = drawn, only in the whole-part box
    holes: tuple[np.ndarray, ...] = ()
    outline: float = 0.6  # outline colour = shaded colour * outline (1.0: no outline)


@dataclass
class _Geometry:
    shapes: list[_Shape] = dataclasses.field(default_factory=list)
    phrases: list[str] = dataclasses.field(default_factory=list)

    def component(self, phrase: str) -> int:
        self.phrases.append(phrase)
        return len(self.phrases) - 1

    def add(self, comp: int | None, points: np.ndarray, rgb: RGB, surface: Material, normal, **kw) -> None:
        self.shapes.append(_Shape(np.asarray(points, dtype=np.float64), rgb, surface, normal, comp, **kw))


def _ellipse(
    cx: float, cy: float, rx: float, ry: float, a0: float = 0.0, a1: float = 2 * math.pi, n: int = 40
) -> np.ndarray:
    t = np.linspace(a0, a1, n, endpoint=(a1 - a0) < 2 * math.pi - 1e-9)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], dtype=np.float64)


def _round_rect(x0: float, y0: float, x1: float, y1: float, r: float, n: int = 6) -> np.ndarray:
    r = min(r, (x1 - x0) / 2, (y1 - y0) / 2)
    corners = ((x1 - r, y0 + r, -math.pi / 2), (x1 - r, y1 - r, 0.0), (x0 + r, y1 - r, math.pi / 2))
    corners += ((x0 + r, y0 + r, math.pi),)
    pts = [_ellipse(cx, cy, r, r, a, a + math.pi / 2, n) for cx, cy, a in corners]
    return np.concatenate(pts)


def _capsule(p0: tuple[float, float], p1: tuple[float, float], r: float, n: int = 10) -> np.ndarray:
    (x0, y0), (x1, y1) = p0, p1
    a = math.atan2(y1 - y0, x1 - x0)
    end1 = _ellipse(x1, y1, r, r, a - math.pi / 2, a + math.pi / 2, n)
    end0 = _ellipse(x0, y0, r, r, a + math.pi / 2, a + 1.5 * math.pi, n)
    return np.concatenate([end1, end0])


def _hexagon(cx: float, cy: float, r: float, squash: float = 1.0) -> np.ndarray:
    t = np.arange(6) * math.pi / 3 + math.pi / 6
    return np.stack([cx + r * squash * np.cos(t), cy + r * np.sin(t)], axis=1)


def _cyl(px: float, py: float, dx: float, dy: float, r: float) -> tuple[Any, ...]:
    """Cylinder shading: axis through (px, py) along (dx, dy), radius r."""
    return ("cyl", px, py, dx, dy, r)


def _darker(rgb: RGB, f: float) -> RGB:
    return (rgb[0] * f, rgb[1] * f, rgb[2] * f)


@dataclass(frozen=True)
class _Jitter:
    body_scale: float  # proportions of the body
    handle_side: int  # +1: lever points right, -1: left
    handle_length: float


def _ends(g: _Geometry, st: Subtype, xs: Sequence[float], r: float) -> None:
    """Two pipe ends: flanges (face, rim, raised face, bolts) or threaded hex ends."""
    mat = MATERIALS[st.material]
    for side, xf in zip((-1, 1), xs):
        comp = g.component(END_NOUNS[st.flange])
        if st.flange == "threaded":
            body = _rect(xf - 0.08, _PY - 0.95 * r, xf + 0.08, _PY + 0.95 * r)
            g.add(comp, body, mat.rgb, mat, _cyl(xf, _PY, 1, 0, 0.95 * r))
            for dy in (-0.47 * r, 0.47 * r):  # hex facet edges
                g.add(
                    comp,
                    _rect(xf - 0.08, _PY + dy - 0.008, xf + 0.08, _PY + dy + 0.008),
                    _darker(mat.rgb, 0.55),
                    mat,
                    ("flat", 0, 0),
                    outline=1.0,
                )
            x_in, x_out = xf + side * 0.08, xf + side * 0.24
            lo, hi = min(x_in, x_out), max(x_in, x_out)
            g.add(
                comp,
                _rect(lo, _PY - 0.7 * r, hi, _PY + 0.7 * r),
                _darker(mat.rgb, 0.92),
                mat,
                _cyl(xf, _PY, 1, 0, 0.7 * r),
            )
            for k in range(6):  # thread ridges
                x = lo + (k + 0.5) * (hi - lo) / 6
                g.add(
                    comp,
                    _rect(x - 0.006, _PY - 0.7 * r, x + 0.006, _PY + 0.7 * r),
                    _darker(mat.rgb, 0.5),
                    mat,
                    ("flat", 0, 0),
                    outline=1.0,
                )
            continue
        rx, thick = 0.4 * r, 0.07
        if st.flange == "round":
            face = _ellipse(xf, _PY, rx, r)
            rim = _ellipse(xf - thick, _PY, rx, r)
        else:
            face = _round_rect(xf - rx, _PY - r, xf + rx, _PY + r, 0.25 * rx)
            rim = _round_rect(xf - thick - rx, _PY - r, xf - thick + rx, _PY + r, 0.25 * rx)
        rim_rgb = _darker(mat.rgb, 0.72)
        g.add(comp, rim, rim_rgb, mat, _cyl(xf, _PY, 1, 0, r))
        g.add(
            comp,
            _rect(xf - thick, _PY - r * 0.999, xf, _PY + r * 0.999),
            rim_rgb,
            mat,
            _cyl(xf, _PY, 1, 0, r),
            outline=1.0,
        )
        g.add(comp, face, mat.rgb, mat, ("flat", 0.55, 0.0))
        g.add(
            comp,
            _ellipse(xf, _PY, 0.5 * rx, 0.5 * r),
            _darker(mat.rgb, 1.1),
            mat,
            ("flat", 0.45, 0.0),
            outline=0.8,
        )
        # Bolt positions on the unit circle (round) or unit square (square): 4 and 8 include the corners.
        offset = {4: math.pi / 4, 6: math.pi / 6}.get(st.bolts, 0.0)
        for k in range(st.bolts):
            a = offset + 2 * math.pi * k / st.bolts
            c, s = math.cos(a), math.sin(a)
            if st.flange == "square":
                m = max(abs(c), abs(s))
                c, s = c / m, s / m
            bx, by = xf + 0.72 * rx * c, _PY + 0.76 * r * s
            rb = 0.1 * r
            g.add(
                g.component("bolt"),
                _hexagon(bx, by, rb, 0.8),
                _STEEL.rgb,
                _STEEL,
                ("ellipsoid", bx, by, rb * 0.8, rb),
            )


def _neck(g: _Geometry, comp: int, half: float, r: float, mat: Material) -> None:
    """The pipe run through the body, from flange to flange."""
    g.add(comp, _rect(-half, _PY - r, half, _PY + r), mat.rgb, mat, _cyl(0, _PY, 1, 0, r))


def _rod(
    g: _Geometry, comp: int | None, x: float, y0: float, y1: float, r: float, surface: Material = _STEEL
) -> None:
    g.add(comp, _rect(x - r, y0, x + r, y1), surface.rgb, surface, _cyl(x, 0, 0, 1, r))


def _body_ball(g: _Geometry, st: Subtype, body: int, j: _Jitter) -> tuple[float, float] | None:
    mat, bs = MATERIALS[st.material], j.body_scale
    _neck(g, body, 0.72, 0.17, mat)
    _ends(g, st, (-0.72, 0.72), 0.24 if st.flange == "threaded" else 0.36)
    ry = 0.38 * bs
    g.add(body, _ellipse(0, _PY, 0.40 * bs, ry), mat.rgb, mat, ("ellipsoid", 0, _PY, 0.40 * bs, ry))
    top = _PY - ry
    g.add(body, _rect(-0.08, top - 0.1, 0.08, top + 0.05), mat.rgb, mat, _cyl(0, 0, 0, 1, 0.08))
    return (0.0, top - 0.1)


def _body_gate(g: _Geometry, st: Subtype, body: int, j: _Jitter) -> tuple[float, float] | None:
    mat, bs = MATERIALS[st.material], j.body_scale
    _neck(g, body, 0.66, 0.17, mat)
    _ends(g, st, (-0.66, 0.66), 0.36)
    g.add(
        body,
        _ellipse(0, _PY + 0.02, 0.30 * bs, 0.34 * bs),
        mat.rgb,
        mat,
        ("ellipsoid", 0, _PY + 0.02, 0.3 * bs, 0.34 * bs),
    )
    bonnet = g.component(PART_TYPES["gate"].extra_phrase)
    y_flange = _PY - 0.30 * bs
    top = y_flange - 0.55 * bs
    g.add(
        bonnet,
        _rect(-0.3, y_flange - 0.06, 0.3, y_flange),
        _darker(mat.rgb, 0.85),
        mat,
        _cyl(0, 0, 0, 1, 0.3),
    )
    trapezoid = np.array([(-0.2, y_flange - 0.06), (0.2, y_flange - 0.06), (0.13, top), (-0.13, top)])
    g.add(bonnet, trapezoid, mat.rgb, mat, _cyl(0, 0, 0, 1, 0.2))
    _rod(g, bonnet, 0.0, top - 0.22, top, 0.035)  # rising stem
    return (0.0, top - 0.2)


def _body_check(g: _Geometry, st: Subtype, body: int, j: _Jitter) -> tuple[float, float] | None:
    mat, bs = MATERIALS[st.material], j.body_scale
    _neck(g, body, 0.7, 0.18, mat)
    _ends(g, st, (-0.7, 0.7), 0.36)
    g.add(
        body, _ellipse(0, _PY, 0.48 * bs, 0.3 * bs), mat.rgb, mat, ("ellipsoid", 0, _PY, 0.48 * bs, 0.3 * bs)
    )
    arrow = np.array([(-0.2, _PY + 0.06), (0.08, _PY + 0.06), (0.08, _PY + 0.02), (0.2, _PY + 0.09)])
    arrow = np.concatenate([arrow, np.array([(0.08, _PY + 0.16), (0.08, _PY + 0.12), (-0.2, _PY + 0.12)])])
    g.add(body, arrow, _darker(mat.rgb, 0.6), mat, ("flat", 0, -0.2), outline=1.0)  # cast flow arrow
    cover = g.component(PART_TYPES["check"].extra_phrase)
    y_plate = _PY - 0.27 * bs
    g.add(
        cover,
        _rect(-0.27, y_plate - 0.06, 0.27, y_plate),
        _darker(mat.rgb, 0.85),
        mat,
        _cyl(0, 0, 0, 1, 0.27),
    )
    dome = _ellipse(0, y_plate - 0.06, 0.22, 0.17, math.pi, 2 * math.pi, 24)
    g.add(cover, dome, mat.rgb, mat, ("ellipsoid", 0, y_plate - 0.06, 0.22, 0.17))
    return None


def _body_butterfly(g: _Geometry, st: Subtype, body: int, j: _Jitter) -> tuple[float, float] | None:
    mat, bs = MATERIALS[st.material], j.body_scale
    g.add(
        None, _rect(-0.62, _PY - 0.26, 0.62, _PY + 0.26), (0.55, 0.56, 0.57), _STEEL, _cyl(0, _PY, 1, 0, 0.26)
    )
    _ends(g, st, (-0.3, 0.3), 0.47)
    wafer = _round_rect(-0.15 * bs, _PY - 0.43 * bs, 0.15 * bs, _PY + 0.43 * bs, 0.08)
    g.add(body, wafer, mat.rgb, mat, _cyl(0, 0, 0, 1, 0.15 * bs))
    top = _PY - 0.43 * bs
    g.add(body, _rect(-0.06, top - 0.2, 0.06, top + 0.01), mat.rgb, mat, _cyl(0, 0, 0, 1, 0.06))
    g.add(body, _rect(-0.15, top - 0.26, 0.15, top - 0.2), _darker(mat.rgb, 0.9), mat, _cyl(0, 0, 0, 1, 0.15))
    return (0.0, top - 0.26)


def _body_plug(g: _Geometry, st: Subtype, body: int, j: _Jitter) -> tuple[float, float] | None:
    mat, bs = MATERIALS[st.material], j.body_scale
    _neck(g, body, 0.68, 0.17, mat)
    _ends(g, st, (-0.68, 0.68), 0.34)
    top, bottom = _PY - 0.34 * bs, _PY + 0.36 * bs
    taper = np.array([(-0.3 * bs, top), (0.3 * bs, top), (0.2 * bs, bottom), (-0.2 * bs, bottom)])
    g.add(body, taper, mat.rgb, mat, _cyl(0, 0, 0, 1, 0.28 * bs))
    g.add(
        body, _rect(-0.23, top - 0.08, 0.23, top + 0.005), _darker(mat.rgb, 0.88), mat, _cyl(0, 0, 0, 1, 0.23)
    )
    square_head = _rect(-0.07, top - 0.2, 0.07, top - 0.08)
    g.add(body, square_head, _STEEL.rgb, _STEEL, ("flat", 0.2, -0.3))
    return (0.0, top - 0.2)


def _body_control(g: _Geometry, st: Subtype, body: int, j: _Jitter) -> tuple[float, float] | None:
    mat, bs = MATERIALS[st.material], j.body_scale
    _neck(g, body, 0.7, 0.18, mat)
    _ends(g, st, (-0.7, 0.7), 0.36)
    g.add(
        body,
        _ellipse(0, _PY, 0.38 * bs, 0.33 * bs),
        mat.rgb,
        mat,
        ("ellipsoid", 0, _PY, 0.38 * bs, 0.33 * bs),
    )
    top = _PY - 0.33 * bs
    g.add(body, _rect(-0.16, top - 0.12, 0.16, top + 0.03), mat.rgb, mat, _cyl(0, 0, 0, 1, 0.16))
    yoke = g.component(PART_TYPES["control"].extra_phrase)
    y0, y1 = top - 0.12, top - 0.52
    for x in (-0.13, 0.13):
        _rod(g, yoke, x, y1, y0, 0.03, mat)
    _rod(g, yoke, 0.0, y1, y0, 0.018)  # stem
    g.add(
        yoke,
        _rect(-0.05, (y0 + y1) / 2 - 0.04, 0.05, (y0 + y1) / 2 + 0.04),
        _STEEL.rgb,
        _STEEL,
        ("flat", 0, 0),
    )
    g.add(yoke, _rect(-0.19, y1 - 0.05, 0.19, y1), mat.rgb, mat, _cyl(0, 0, 0, 1, 0.19))
    return (0.0, y1 - 0.05)


_BODY_BUILDERS: dict[str, Callable[[_Geometry, Subtype, int, _Jitter], tuple[float, float] | None]] = {
    "ball": _body_ball,
    "butterfly": _body_butterfly,
    "check": _body_check,
    "control": _body_control,
    "gate": _body_gate,
    "plug": _body_plug,
}


def _handle(g: _Geometry, st: Subtype, anchor: tuple[float, float], j: _Jitter) -> None:
    """The operator on top of the stem, anchored at its top centre; drawn per handle kind."""
    if st.handle == "none":
        return
    comp = g.component(f"{st.handle_colour} {HANDLE_NOUNS[st.handle]}")
    rgb = HANDLE_COLOURS[st.handle_colour]
    ax, ay = anchor
    hl = j.handle_length
    if st.handle == "lever":
        tilt = math.radians(8.0)
        dx, dy = j.handle_side * math.cos(tilt), -math.sin(tilt)
        p0 = (ax, ay - 0.04)
        p1 = (ax + dx * 0.78 * hl, ay - 0.04 + dy * 0.78 * hl)
        pg = (ax + dx * 0.28 * hl, ay - 0.04 + dy * 0.28 * hl)
        g.add(comp, _capsule(p0, p1, 0.035), _STEEL.rgb, _STEEL, _cyl(p0[0], p0[1], dx, dy, 0.035))
        g.add(comp, _capsule(pg, p1, 0.05), rgb, _PAINT, _cyl(pg[0], pg[1], dx, dy, 0.05))
        g.add(
            comp,
            _hexagon(ax, ay - 0.04, 0.06, 1.0),
            _STEEL.rgb,
            _STEEL,
            ("ellipsoid", ax, ay - 0.04, 0.06, 0.06),
        )
    elif st.handle == "tee":
        _rod(g, comp, ax, ay - 0.14, ay + 0.005, 0.035)
        half = 0.36 * hl
        g.add(
            comp,
            _capsule((ax - half, ay - 0.17), (ax + half, ay - 0.17), 0.045),
            rgb,
            _PAINT,
            _cyl(ax, ay - 0.17, 1, 0, 0.045),
        )
    elif st.handle == "handwheel":
        _rod(g, comp, ax, ay - 0.14, ay + 0.005, 0.03)
        cx, cy, rx, ry, w = ax, ay - 0.15, 0.42 * hl, 0.16, 0.045
        for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3):  # spokes
            rim = (cx + rx * math.cos(a), cy + ry * math.sin(a))
            g.add(
                comp,
                _capsule((cx, cy), rim, 0.018),
                _darker(rgb, 0.8),
                _PAINT,
                ("flat", 0, -0.3),
                outline=0.7,
            )
        ring = _ellipse(cx, cy, rx + w, ry + w, n=64)
        hole = _ellipse(cx, cy, rx - w, ry - w, n=64)
        g.add(comp, ring, rgb, _PAINT, ("ring", cx, cy, rx, ry, w), holes=(hole,))
        g.add(comp, _ellipse(cx, cy, 0.05, 0.035), _STEEL.rgb, _STEEL, ("ellipsoid", cx, cy, 0.05, 0.035))
    elif st.handle == "actuator":
        g.add(
            comp,
            _rect(ax - 0.08, ay - 0.09, ax + 0.08, ay + 0.005),
            _STEEL.rgb,
            _STEEL,
            _cyl(ax, 0, 0, 1, 0.08),
        )
        box = _round_rect(ax - 0.33, ay - 0.45, ax + 0.33, ay - 0.09, 0.05)
        g.add(comp, box, rgb, _PAINT, _cyl(0, ay - 0.27, 1, 0, 0.3))
        g.add(
            comp,
            _rect(ax - 0.33, ay - 0.3, ax + 0.33, ay - 0.28),
            _darker(rgb, 0.6),
            _PAINT,
            ("flat", 0, 0),
            outline=1.0,
        )
        g.add(
            comp,
            _ellipse(ax, ay - 0.45, 0.09, 0.05, math.pi, 2 * math.pi, 16),
            (0.95, 0.85, 0.2),
            _PAINT,
            ("ellipsoid", ax, ay - 0.45, 0.09, 0.05),
        )
    elif st.handle == "diaphragm":
        g.add(
            comp,
            _round_rect(ax - 0.5, ay - 0.06, ax + 0.5, ay + 0.005, 0.02),
            _darker(rgb, 0.85),
            _PAINT,
            _cyl(0, ay - 0.03, 1, 0, 0.04),
        )
        dome = _ellipse(ax, ay - 0.06, 0.46, 0.3, math.pi, 2 * math.pi, 32)
        g.add(comp, dome, rgb, _PAINT, ("ellipsoid", ax, ay - 0.06, 0.46, 0.3))
        _rod(g, comp, ax, ay - 0.42, ay - 0.35, 0.025)  # air connection on top
    else:  # pragma: no cover - the catalogue is checked by tests
        raise ValueError(f"unknown handle kind {st.handle!r}")


def _build_geometry(st: Subtype, jitter: _Jitter) -> _Geometry:
    g = _Geometry()
    body = g.component(f"{MATERIALS[st.material].phrase} body")
    anchor = _BODY_BUILDERS[st.part_type](g, st, body, jitter)
    if anchor is not None:
        _handle(g, st, anchor, jitter)
    return g


# ----------------------------------------------------------------------------------------------------------
# Scenes: everything that varies between photographs of one subclass.
# ----------------------------------------------------------------------------------------------------------

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


def _rotation(angle_deg: float) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def _all_points(g: _Geometry) -> np.ndarray:
    return np.concatenate([s.points for s in g.shapes])


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


# ----------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------

# (prefix, handle before ends?) — varied a little, always listing every distinguishing attribute.
_TEMPLATES = (
    ("a {t} valve with ", False),
    ("photo of a {t} valve showing ", True),
    ("{t} valve: ", False),
    ("close-up of a {t} valve with ", True),
)


def _article(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption_for(subtype: Subtype, template: int = 0, wear: str = "clean") -> str:
    """The attribute caption: type, material, ends with bolt count, handle shape and colour, extra part."""
    mat = MATERIALS[subtype.material]
    body = _article(f"{mat.phrase} body")
    if subtype.flange == "threaded":
        ends = "two threaded ends"
    else:
        ends = f"two {subtype.flange} flanges with {NUMBER_WORDS[subtype.bolts]} bolts each"
    rest = []
    if subtype.handle != "none":
        rest.append(_article(f"{subtype.handle_colour} {HANDLE_NOUNS[subtype.handle]}"))
    extra = PART_TYPES[subtype.part_type].extra_clause
    if extra:
        rest.append(extra)
    prefix, handle_first = _TEMPLATES[template % len(_TEMPLATES)]
    items = [body, *rest, ends] if handle_first else [body, ends, *rest]
    text = prefix.format(t=subtype.part_type) + _join(items)
    if wear == "weathered":
        text += ", weathered and dusty"
    elif wear == "corroded":
        text += ", with green patina spots" if mat.corrosion == "patina" else ", with rust spots"
    return text


# ----------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pose:
    """Object units -> image fractions: q = target + scale * R (p - origin).

    origin is the centre of the part's bounding box in object units, target where it lands in the image.
    """

    rot: np.ndarray
    scale: float
    target: np.ndarray
    origin: np.ndarray

    def apply(self, pts: np.ndarray) -> np.ndarray:
        return self.target + self.scale * (pts - self.origin) @ self.rot.T

    def inverse_affine(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(A, b) with object point = A @ pixel + b, for pixel coordinates of an n x n canvas."""
        return self.rot.T / (self.scale * n), self.origin - self.rot.T @ self.target / self.scale


def _pose(scene: Scene, g: _Geometry) -> _Pose:
    pts = _all_points(g)
    return _Pose(_rotation(scene.angle), scene.scale, np.asarray(scene.center), (pts.min(0) + pts.max(0)) / 2)


def _normals(
    model: tuple[Any, ...], u: np.ndarray, v: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit normals (object frame, z towards the camera) of the shading models."""
    kind = model[0]
    if kind == "flat":
        n = math.sqrt(model[1] ** 2 + model[2] ** 2 + 1)
        return np.full_like(u, model[1] / n), np.full_like(u, model[2] / n), np.full_like(u, 1 / n)
    if kind == "cyl":  # already unit length
        _, px, py, dx, dy, r = model
        t = np.clip((u - px) * (-dy / r) + (v - py) * (dx / r), -0.97, 0.97)
        return -dy * t, dx * t, np.sqrt(1 - t * t)
    if kind == "ellipsoid":
        _, cx, cy, rx, ry = model
        a, b = (u - cx) / rx, (v - cy) / ry
        nz = np.sqrt(1 - np.minimum(a * a + b * b, 0.94))
    elif kind == "ring":
        _, cx, cy, rx, ry, w = model
        a, b = (u - cx) / rx, (v - cy) / ry
        e = np.sqrt(a * a + b * b) + 1e-6
        t = np.clip((e - 1) * (min(rx, ry) / w), -0.95, 0.95)
        a, b, nz = t * a / e, t * b / e, np.sqrt(1 - t * t)
    else:  # pragma: no cover
        raise ValueError(kind)
    inv = 1 / np.sqrt(a * a + b * b + nz * nz)
    return a * inv, b * inv, nz * inv


def _draw_object(scene: Scene, g: _Geometry, pose: _Pose, n: int, supersample: int) -> Image.Image:
    """Draw the part on an n x n 8-bit RGBA canvas (alpha 0 or 255).

    Painter's algorithm on an id buffer (PIL polygons, in C), then each shape is shaded only on the pixels
    where it is visible: the cost follows the part's area, not the sum of its shapes' bounding boxes.
    Masks are hard at this resolution; the supersampling and LANCZOS downsampling do the anti-aliasing.
    """
    ids_img, edge_img = Image.new("I", (n, n), 0), Image.new("L", (n, n), 0)
    draw_ids, draw_edge = ImageDraw.Draw(ids_img), ImageDraw.Draw(edge_img)
    line_w = max(1, round(n / 256))
    bounds = []
    for k, shape in enumerate(g.shapes):
        px = pose.apply(shape.points) * n
        bounds.append((px.min(0), px.max(0)))
        poly = (px - 0.5).ravel().tolist()  # PIL fills the pixels whose centres are inside
        saved = []
        if shape.holes:  # keep what is under the hole, to put it back after drawing the shape
            lo, hi = np.floor(px.min(0)).astype(int) - 1, np.ceil(px.max(0)).astype(int) + 1
            box = (*np.clip(lo, 0, n).tolist(), *np.clip(hi, 0, n).tolist())
            saved = [box, ids_img.crop(box), edge_img.crop(box)]
        draw_ids.polygon(poly, fill=k + 1)
        if shape.outline < 1.0:
            draw_edge.polygon(poly, fill=0, outline=round(255 * (1 - shape.outline)), width=line_w)
        else:
            draw_edge.polygon(poly, fill=0)
        if saved:
            box, ids_crop, edge_crop = saved
            hole_mask = Image.new("L", (box[2] - box[0], box[3] - box[1]), 0)
            for hole in shape.holes:
                hole_px = pose.apply(hole) * n - 0.5 - np.array(box[:2])
                ImageDraw.Draw(hole_mask).polygon(hole_px.ravel().tolist(), fill=255)
            ids_img.paste(ids_crop, box[:2], hole_mask)
            edge_img.paste(edge_crop, box[:2], hole_mask)
    ids = np.asarray(ids_img)

    a_inv, b_inv = pose.inverse_affine(n)
    az = math.radians(scene.light_azimuth)
    light_world = np.array([0.55 * math.cos(az), 0.55 * math.sin(az)])
    lx, ly = (float(c) for c in pose.rot.T @ light_world)  # the light seen from the part's own frame
    lz = 0.83
    hn = math.sqrt(lx * lx + ly * ly + (lz + 1) ** 2)
    hx, hy, hz = lx / hn, ly / hn, (lz + 1) / hn  # Blinn-Phong half vector, camera along +z
    # A fixed per-pixel surface grain: uniform noise of unit variance (cheaper than Gaussian), scaled so
    # that after the downsampling its strength does not depend on the supersampling factor.
    texture = np.random.Generator(np.random.PCG64(np.random.SeedSequence([scene.seed, 1])))
    grain = (texture.random((n, n), dtype=np.float32) - 0.5) * (math.sqrt(12) * supersample / 2)
    edge = np.asarray(edge_img)
    rgba = np.zeros((n, n, 4), np.uint8)
    rgba[..., 3] = np.where(ids > 0, 255, 0)
    for k, (shape, (lo, hi)) in enumerate(zip(g.shapes, bounds)):
        x0, y0 = (min(max(int(v), 0), n) for v in np.floor(lo))
        x1, y1 = (min(max(int(v), 0), n) for v in np.ceil(hi) + 1)
        ys, xs = np.nonzero(ids[y0:y1, x0:x1] == k + 1)
        if ys.size == 0:
            continue
        ys, xs = ys + y0, xs + x0
        xc, yc = xs.astype(np.float32) + 0.5, ys.astype(np.float32) + 0.5
        u = a_inv[0, 0] * xc + a_inv[0, 1] * yc + np.float32(b_inv[0])
        v = a_inv[1, 0] * xc + a_inv[1, 1] * yc + np.float32(b_inv[1])
        nx, ny, nz = _normals(shape.normal, u, v)
        surf = shape.surface
        lum = (0.32 + 0.78 * np.clip(nx * lx + ny * ly + nz * lz, 0.0, 1.0)) * (
            1 + surf.roughness * grain[ys, xs]
        )
        spec = surf.specular * np.clip(nx * hx + ny * hy + nz * hz, 0.0, 1.0) ** np.float32(surf.shininess)
        base = np.asarray(shape.rgb, np.float32)
        # Paint has white highlights, metals tint theirs with their own colour.
        tint = np.ones(3, np.float32) if surf is _PAINT else 0.55 + 0.45 * base
        outline = (255.0 - edge[ys, xs]).astype(np.float32)  # 255 = no outline darkening
        rgb = (lum[:, None] * base + spec[:, None] * tint) * outline[:, None] + 0.5
        rgba[ys, xs, :3] = np.clip(rgb, 0, 255).astype(np.uint8)
    return Image.fromarray(rgba, mode="RGBA")


def _resize(arr: np.ndarray, size: int, resample: Image.Resampling) -> np.ndarray:
    """Resize a float (h, w) or (h, w, c) array channel by channel in 32-bit float (no 8-bit rounding)."""
    if arr.ndim == 2:
        return np.asarray(Image.fromarray(arr.astype(np.float32)).resize((size, size), resample))
    return np.stack([_resize(arr[..., c], size, resample) for c in range(arr.shape[2])], axis=-1)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    small = rng.standard_normal((max(cells, 2), max(cells, 2))).astype(np.float32)
    out = _resize(small, size, Image.Resampling.BICUBIC)
    return out / (out.std() + 1e-6)


def _background(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """Studio sweep or workshop surface behind the part."""
    a, b = (np.asarray(c, np.float32) for c in scene.bg_colours)
    coord = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    theta = rng.uniform(0, 2 * math.pi)
    t = coord[None, :] * math.cos(theta) + coord[:, None] * math.sin(theta) + 0.5
    kind = scene.background
    if kind == "plain":
        out = a[None, None] * (1 + 0.03 * (t[..., None] - 0.5))
    elif kind == "gradient":
        out = a + (b - a) * np.clip(t, 0, 1)[..., None]
    elif kind == "concrete":
        n = (
            0.5 * _smooth_noise(rng, size, 4)
            + 0.3 * _smooth_noise(rng, size, 12)
            + 0.2 * _smooth_noise(rng, size, size // 4)
        )
        speck = (rng.random((size, size)) < 0.01).astype(np.float32) * rng.uniform(-0.25, 0.15, (size, size))
        out = a[None, None] * (1 + 0.07 * n + speck)[..., None]
    elif kind == "wood":
        planks = rng.integers(3, 7)
        s = t * planks + rng.uniform(0, 1)
        tone = rng.uniform(-0.12, 0.12, planks + 3)[np.clip(np.floor(s).astype(int) + 1, 0, planks + 2)]
        grain = np.sin(2 * math.pi * (s * rng.uniform(5, 9) + 0.25 * _smooth_noise(rng, size, 6)))
        seam = np.clip(np.abs(s - np.round(s)) * size / planks / 1.5, 0, 1) * 0.45 + 0.55
        out = (a + (b - a) * 0.25)[None, None] * ((1 + tone + 0.05 * grain) * seam)[..., None]
    elif kind == "metal":  # brushed sheet: streaks along one axis
        streak = _resize(
            rng.standard_normal((size // 8, size)).astype(np.float32), size, Image.Resampling.BILINEAR
        )
        out = a[None, None] * (1 + 0.05 * streak + 0.08 * (t - 0.5))[..., None]
    else:
        raise ValueError(f"unknown background {kind!r}")
    return out.astype(np.float32)


def _wear(
    scene: Scene, col: np.ndarray, alpha: np.ndarray, bolt_centres: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Temporal deterioration on the object layer: faded/dusty paint, then rust or patina around bolts."""
    if scene.wear == "clean":
        return col
    size = alpha.shape[0]
    a = np.maximum(alpha, 1e-4)[..., None]
    c = col / a
    grey = c.mean(-1, keepdims=True)
    fade = 0.3 if scene.wear == "weathered" else 0.15
    c = (c * (1 - fade) + (0.95 * grey + 0.04) * fade) * 0.94
    r = rng.random((size, size), dtype=np.float32)
    c = c + np.where(r < 0.02, r * 6.0, 0.0)[..., None]  # dust specks, up to +0.12
    if scene.wear == "corroded":
        # Halos around the bolts (where water sits) plus a few patches elsewhere.
        field = 0.3 * _smooth_noise(rng, size, max(4, size // 16)) + 0.3 * _smooth_noise(
            rng, size, max(4, size // 32)
        )
        for bx, by, br in bolt_centres:
            sigma = 1.5 * br
            x0, x1 = max(int(bx - 3 * sigma), 0), min(int(bx + 3 * sigma) + 1, size)
            y0, y1 = max(int(by - 3 * sigma), 0), min(int(by + 3 * sigma) + 1, size)
            if x1 <= x0 or y1 <= y0:
                continue
            gx = np.exp(-((np.arange(x0, x1) + 0.5 - bx) ** 2) / (2 * sigma**2))
            gy = np.exp(-((np.arange(y0, y1) + 0.5 - by) ** 2) / (2 * sigma**2))
            field[y0:y1, x0:x1] += 1.4 * np.outer(gy, gx).astype(np.float32)
        spots = (np.clip((field - 0.8) * 3.0, 0, 1) * (alpha > 0.5))[..., None]
        corrosion = MATERIALS[get_subtype(scene.subclass).material].corrosion
        colour = np.array((0.50, 0.23, 0.08) if corrosion == "rust" else (0.28, 0.56, 0.44), np.float32)
        speck = 0.7 + 0.6 * r[..., None]
        lum = c.mean(-1, keepdims=True)
        c = c + 0.85 * spots * (colour * (0.55 + 0.7 * lum) * speck - c)
    return (c * alpha[..., None]).astype(np.float32)  # exactly 0 where the part is absent


def _boxes(g: _Geometry, pose: _Pose, size: int, part_type: str) -> tuple[list[Box], list[str]]:
    """Tight pixel-edge boxes of the whole part and of each component, from the transformed polygons."""

    def box(pts: np.ndarray) -> Box:
        q = pose.apply(pts) * size
        x0, y0 = np.floor(q.min(0)).astype(int)
        x1, y1 = np.ceil(q.max(0)).astype(int)
        return [
            int(np.clip(x0, 0, size)),
            int(np.clip(y0, 0, size)),
            int(np.clip(x1, 0, size)),
            int(np.clip(y1, 0, size)),
        ]

    boxes, phrases = [box(_all_points(g))], [f"{part_type} valve"]
    for comp, phrase in enumerate(g.phrases):
        pts = [s.points for s in g.shapes if s.component == comp]
        if pts:
            boxes.append(box(np.concatenate(pts)))
            phrases.append(phrase)
    return boxes, phrases


def _render_array(
    scene: Scene, size: int, supersample: int = 2, *, draw_object: bool = True
) -> tuple[np.ndarray, list[Box], list[str], str]:
    """The photograph as floats in [0, 1] (size, size, 3), plus boxes, phrases and caption at `size`."""
    subtype = scene.subtype
    g = _build_geometry(subtype, scene.jitter())
    pose = _pose(scene, g)
    boxes, phrases = _boxes(g, pose, size, subtype.part_type)
    # Separate streams, so that changing the wear or the lighting of a scene leaves the rest untouched.
    streams = [
        np.random.Generator(np.random.PCG64(s)) for s in np.random.SeedSequence([scene.seed, 2]).spawn(3)
    ]
    bg_rng, wear_rng, noise_rng = streams
    bg = _background(scene, size, bg_rng)
    az = math.radians(scene.light_azimuth)
    if draw_object:
        rgba = _draw_object(scene, g, pose, size * supersample, supersample)
        # An 8-bit RGBA LANCZOS resize (PIL premultiplies alpha itself) is 4x faster than float channels.
        small = np.asarray(rgba.resize((size, size), Image.Resampling.LANCZOS), np.float32) * (1 / 255.0)
        alpha = small[..., 3]
        col = small[..., :3] * alpha[..., None]
        bolts = np.array(
            [
                ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2, max(b[2] - b[0], 1) / 2)
                for b, p in zip(boxes, phrases)
                if p == "bolt"
            ]
        )
        col = _wear(scene, col, alpha, bolts.reshape(-1, 3), wear_rng)
        # Drop shadow: the part's silhouette, pushed away from the light and blurred.
        shadow = Image.fromarray((alpha * 255).astype(np.uint8))
        dx, dy = -math.cos(az) * size * 0.035, -math.sin(az) * size * 0.035
        shadow = shadow.transform(
            shadow.size, Image.Transform.AFFINE, (1, 0, -dx, 0, 1, -dy), Image.Resampling.BILINEAR
        )
        shadow = shadow.filter(ImageFilter.GaussianBlur(max(size / 45, 0.8)))
        bg = bg * (1 - 0.45 * np.asarray(shadow, np.float32) / 255.0)[..., None]
        img = col + bg * (1 - alpha[..., None])
    else:  # the clean plate: what an ideal inpainting of the whole part would give
        img = bg
    yy = xx = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    r2 = yy[:, None] ** 2 + xx[None, :] ** 2
    img = img * ((1 - 0.35 * r2) * scene.light_gain)[..., None]  # vignetting and exposure
    if scene.lighting == "low_light":
        img = img * np.array([0.92, 0.97, 1.08], np.float32)
    gx, gy, gs = scene.glare
    if gs > 0:
        bloom = np.exp(-((yy[:, None] + 0.5 - gy) ** 2 + (xx[None, :] + 0.5 - gx) ** 2) / (2 * 0.1**2))
        img = img + (gs * bloom)[..., None] * np.array([1.0, 0.98, 0.92], np.float32)
    img = img + scene.noise_sigma * noise_rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img, 0.0, 1.0), boxes, phrases, caption_for(subtype, scene.template, scene.wear)


def _to_image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8), mode="RGB")


def render_scene(
    scene: Scene, size: int = 256, *, supersample: int = 2, draw_object: bool = True
) -> tuple[Image.Image, list[Box], list[str], str]:
    """Render a scene as a real photograph: (RGB image, boxes, phrases, caption).

    `draw_object=False` renders the same background, light and noise without the part (a clean plate),
    which tests use to check that boxes sit on drawn pixels and an inpainting probe can use as ground truth.
    """
    arr, boxes, phrases, caption = _render_array(scene, size, supersample, draw_object=draw_object)
    return _to_image(arr), boxes, phrases, caption


def render_part(
    subtype: Subtype, rng: np.random.Generator, size: int = 256, supersample: int = 2
) -> tuple[Image.Image, list[Box], list[str], str]:
    """A new random photograph of `subtype`: (RGB image, boxes [x0, y0, x1, y1], phrases, caption)."""
    return render_scene(sample_scene(subtype, rng), size, supersample=supersample)


# ----------------------------------------------------------------------------------------------------------
# Toy generators: fingerprints of GAN and latent-diffusion pipelines (see the module docstring).
# ----------------------------------------------------------------------------------------------------------


@functools.cache
def _gan_weights() -> tuple[np.ndarray, np.ndarray]:
    """Fixed "weights" of toy_gan, one set per upsampling stage.

    up: (stage, channel, phase_y, phase_x, tap_y, tap_x) taps of the transposed convolution;
    sharpen: (stage, channel, 3, 3) the conv layer after it, which restores edge contrast as a generator's
    learned convolutions do (and so amplifies the checkerboard too).
    """
    rng = np.random.Generator(np.random.PCG64(zlib.crc32(b"toy_gan")))
    bilinear = np.outer([0.75, 0.25], [0.75, 0.25])  # own pixel, neighbour: exact bilinear 2x upsampling
    up = bilinear * (1 + 0.035 * rng.standard_normal((2, 3, 2, 2, 2, 2)))
    # Keep the mean phase gain at 1 (no global colour change) but let the four phases differ.
    up = up / up.sum(axis=(-1, -2), keepdims=True).mean(axis=(2, 3), keepdims=True)
    delta = np.zeros((3, 3))
    delta[1, 1] = 1.0
    sharpen = delta * 1.6 - 0.6 * np.full((3, 3), 1 / 9) + 0.01 * rng.standard_normal((2, 3, 3, 3))
    sharpen = sharpen / sharpen.sum(axis=(-1, -2), keepdims=True)
    return up.astype(np.float32), sharpen.astype(np.float32)  # float64 weights would upcast every pixel


def _transposed_conv2x(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Kernel-4 stride-2 transposed convolution, written per output phase.

    x is channel-first (c, h, w); k is (c, phase_y, phase_x, tap_y, tap_x): output pixel (2i + py, 2j + px)
    mixes input pixel (i, j) with its neighbours towards that phase, exactly bilinear when k is bilinear.
    """
    c, h, w = x.shape
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
    out = np.empty((c, 2 * h, 2 * w), np.float32)
    for py, sy in ((0, -1), (1, 1)):
        for px, sx in ((0, -1), (1, 1)):
            for ch in range(c):
                kk = k[ch, py, px]
                out[ch, py::2, px::2] = (
                    kk[0, 0] * p[ch, 1 : h + 1, 1 : w + 1]
                    + kk[0, 1] * p[ch, 1 : h + 1, 1 + sx : w + 1 + sx]
                    + kk[1, 0] * p[ch, 1 + sy : h + 1 + sy, 1 : w + 1]
                    + kk[1, 1] * p[ch, 1 + sy : h + 1 + sy, 1 + sx : w + 1 + sx]
                )
    return out


def _conv3x3(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Per-channel 3x3 convolution with edge padding; x is (c, h, w), k is (c, 3, 3)."""
    c, h, w = x.shape
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
    out = np.zeros_like(x)
    for ch in range(c):
        for dy in range(3):
            for dx in range(3):
                out[ch] += k[ch, dy, dx] * p[ch, dy : dy + h, dx : dx + w]
    return out


def render_toy_gan(scene: Scene, size: int = 256, supersample: int = 2) -> Image.Image:
    """toy_gan: render at size/4, then two fixed 2x transposed-conv + 3x3-conv stages (checkerboard)."""
    small, *_ = _render_array(scene, size // 4, supersample)
    x = np.ascontiguousarray(small.transpose(2, 0, 1), dtype=np.float32)
    for up, sharpen in zip(*_gan_weights()):
        x = _conv3x3(_transposed_conv2x(x, up), sharpen)
    return _to_image(x.transpose(1, 2, 0))


@functools.cache
def _ldm_weights() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fixed "weights" of toy_ldm: encoder (4x3), decoder (3x4) with a colour cast, bias, 8x8 pattern."""
    rng = np.random.Generator(np.random.PCG64(zlib.crc32(b"toy_ldm")))
    enc = np.linalg.qr(rng.standard_normal((4, 3)))[0]  # orthonormal columns: a lossless 4-channel latent
    cast = np.eye(3) + 0.025 * rng.standard_normal((3, 3))
    dec = cast @ enc.T
    bias = 0.012 * rng.standard_normal(3)
    pattern = rng.standard_normal((8, 8, 3))
    pattern = (pattern - pattern.mean()) / pattern.std() * (1.2 / 255)
    return enc, dec, bias, pattern.astype(np.float32)


def render_toy_ldm(scene: Scene, size: int = 256, supersample: int = 2) -> Image.Image:
    """toy_ldm: 8x latent bottleneck + bicubic decoder, colour cast, top-octave loss, 8x8 grid pattern."""
    x, *_ = _render_array(scene, size, supersample)
    enc, dec, bias, pattern = _ldm_weights()
    box, bicubic = Image.Resampling.BOX, Image.Resampling.BICUBIC
    low = _resize(x, size // 8, box)
    latent = np.round((low @ enc.T) * 64) / 64  # quantised latent
    base = _resize((latent @ dec.T + bias).astype(np.float32), size, bicubic)
    detail = _resize(_resize(x, size // 2, box), size, bicubic) - _resize(low, size, bicubic)
    out = base + 0.85 * detail + np.tile(pattern, (size // 8, size // 8, 1))
    return _to_image(out)


GeneratorFn = Callable[[np.random.Generator, Subtype, int], tuple[Image.Image, list[Box], list[str], str]]


def _generator_entry(render: Callable[[Scene, int, int], Image.Image]) -> GeneratorFn:
    def generate(
        rng: np.random.Generator, subtype: Subtype, size: int = 256
    ) -> tuple[Image.Image, list[Box], list[str], str]:
        scene = sample_scene(subtype, rng)
        boxes, phrases, caption = scene_annotations(scene, size)
        return render(scene, size, 2), boxes, phrases, caption

    generate.__doc__ = render.__doc__
    return generate


def scene_annotations(scene: Scene, size: int) -> tuple[list[Box], list[str], str]:
    """Boxes, phrases and caption of a scene at `size`, without rendering it (e.g. for a generated image)."""
    subtype = scene.subtype
    g = _build_geometry(subtype, scene.jitter())
    boxes, phrases = _boxes(g, _pose(scene, g), size, subtype.part_type)
    return boxes, phrases, caption_for(subtype, scene.template, scene.wear)


_FAKE_RENDERERS: dict[str, Callable[[Scene, int, int], Image.Image]] = {
    "toy_gan": render_toy_gan,
    "toy_ldm": render_toy_ldm,
}
#: name -> (rng, subtype, size) -> (image, boxes, phrases, caption) of a NEW generated scene.
TOY_GENERATORS: dict[str, GeneratorFn] = {name: _generator_entry(fn) for name, fn in _FAKE_RENDERERS.items()}
GENERATOR_DESCRIPTIONS = {
    "toy_gan": "render at 1/4 resolution, upsample 4x with two fixed, slightly unbalanced kernel-4 stride-2 "
    "transposed convolutions each followed by a fixed 3x3 sharpening conv: GAN-style checkerboard (spectral "
    "peaks at multiples of 1/4 cycle/pixel), no fine texture or sensor noise",
    "toy_ldm": "8x-downsampled quantised 4-channel latent decoded by bicubic upsampling with a colour cast, "
    "detail only from a 2x-downsampled skip path (top octave lost), faint fixed 8x8 decoder grid",
}


# ----------------------------------------------------------------------------------------------------------
# The dataset on disk
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyWorldSpec:
    """Every parameter of a toy world; its hash names the cached copy on disk.

    parts_*: images per subclass per split of the fine-grained set. realfake_*: real AND fake images per
    generator per split (each count is per label). supersample: anti-aliasing factor of the renderer.
    """

    image_size: int = 256
    supersample: int = 2
    parts_train: int = 10
    parts_val: int = 3
    parts_test: int = 3
    generators: tuple[str, ...] = ("toy_gan", "toy_ldm")
    realfake_train: int = 48
    realfake_val: int = 16
    realfake_test: int = 24
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "generators", tuple(self.generators))  # configs pass lists
        if self.image_size < 32 or self.image_size % 8:
            raise ValueError(
                f"image_size must be a multiple of 8 and >= 32 (toy_ldm's 8x latent), got {self.image_size}"
            )
        if not 1 <= self.supersample <= 4:
            raise ValueError(f"supersample must be 1-4, got {self.supersample}")
        counts = (
            self.parts_train,
            self.parts_val,
            self.parts_test,
            self.realfake_train,
            self.realfake_val,
            self.realfake_test,
        )
        if min(counts) < 0 or self.seed < 0:
            raise ValueError(f"counts and seed must be >= 0: {self}")
        unknown = sorted(set(self.generators) - set(_FAKE_RENDERERS))
        if unknown or len(set(self.generators)) != len(self.generators):
            raise ValueError(
                f"generators must be distinct names from {sorted(_FAKE_RENDERERS)}, got {self.generators}"
            )

    def parts_count(self, split: str) -> int:
        return {"train": self.parts_train, "val": self.parts_val, "test": self.parts_test}[split]

    def realfake_count(self, split: str) -> int:
        return {"train": self.realfake_train, "val": self.realfake_val, "test": self.realfake_test}[split]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["generators"] = list(self.generators)
        return d

    def spec_hash(self) -> str:
        """Hash of the spec and FORMAT_VERSION: a different hash means a different world on disk."""
        payload = json.dumps({"format_version": FORMAT_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _Task:
    kind: str  # "parts", "real" or "fake"
    split: str
    group: str  # subclass for parts, generator for realfake
    index: int
    path: str  # relative to the sub-root (parts/ or realfake/)


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    entropy = [seed] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def _tasks(spec: ToyWorldSpec) -> list[_Task]:
    tasks = []
    for split in SPLITS:
        for st in CATALOGUE:
            for i in range(spec.parts_count(split)):
                tasks.append(_Task("parts", split, st.subclass, i, f"{split}/{st.subclass_dir}/{i:05d}.png"))
    for split in SPLITS:
        for gen in spec.generators:
            for kind, label_dir in (("real", REAL_DIR), ("fake", FAKE_DIR)):
                for i in range(spec.realfake_count(split)):
                    tasks.append(_Task(kind, split, gen, i, f"{split}/{gen}/{label_dir}/{i:05d}.png"))
    return tasks


def _write_png(img: Image.Image, path: Path) -> None:
    # Fixed options and no metadata chunks: identical pixels give identical bytes. Sensor noise does not
    # compress anyway: level 1 is twice as fast as the default 6 for 12 % more bytes.
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", compress_level=1)


def _run_task(task: _Task, spec: ToyWorldSpec, root: str) -> dict[str, Any]:
    """Render one image, write it under `root`, and return its manifest record."""
    size = spec.image_size
    if task.kind == "parts":
        subtype = get_subtype(task.group)
        rng = _rng(spec.seed, "parts", task.split, task.group, task.index)
    else:
        rng = _rng(spec.seed, "realfake", task.split, task.group, task.kind, task.index)
        subtype = CATALOGUE[int(rng.integers(len(CATALOGUE)))]
    scene = sample_scene(subtype, rng)
    if task.kind == "fake":
        img = _FAKE_RENDERERS[task.group](scene, size, spec.supersample)
        boxes, phrases, caption = scene_annotations(scene, size)
    else:
        img, boxes, phrases, caption = render_scene(scene, size, supersample=spec.supersample)
    sub_root = "parts" if task.kind == "parts" else "realfake"
    _write_png(img, Path(root) / sub_root / task.path)
    record: dict[str, Any] = {"path": task.path}
    if task.kind != "parts":
        record.update(label=int(task.kind == "fake"), generator=task.group)
    record.update(
        caption=caption,
        subclass=subtype.subclass,
        subclass_id=SUBCLASS_IDS[subtype.subclass],
        part_type=subtype.part_type,
        attributes=subtype.attributes(),
        boxes=boxes,
        phrases=phrases,
        split=task.split,
        width=img.width,
        height=img.height,
        scene=scene.to_dict(),
    )
    return record


def _run_task_packed(args: tuple[_Task, ToyWorldSpec, str]) -> dict[str, Any]:
    return _run_task(*args)


def _default_workers(n_tasks: int) -> int:
    # Starting workers costs more than rendering a small world.
    if n_tasks < 96:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8))


def _content_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != META_FILE):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def _write_world(tmp: Path, spec: ToyWorldSpec, num_workers: int | None) -> dict[str, Any]:
    """Write the whole world into `tmp`; toy_world.json last. Returns the metadata."""
    tasks = _tasks(spec)
    workers = _default_workers(len(tasks)) if num_workers is None else max(1, num_workers)
    jobs = [(t, spec, str(tmp)) for t in tasks]
    if workers == 1:
        records = [_run_task_packed(j) for j in jobs]
    else:
        # fork on Linux: a spawned worker would re-import the caller's heavy modules (torch, lightning) for
        # seconds; the workers only run numpy and PIL, as DataLoader workers forked the same way do.
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        with multiprocessing.get_context(method).Pool(workers) as pool:
            records = pool.map(_run_task_packed, jobs, chunksize=max(1, len(jobs) // (workers * 8)))
    parts = [r for t, r in zip(tasks, records) if t.kind == "parts"]
    (tmp / "parts").mkdir(parents=True, exist_ok=True)  # also when a spec asks for no parts images
    _write_jsonl(tmp / "parts" / "manifest.jsonl", parts)
    counts: dict[str, Any] = {
        "parts": {},
        "realfake": {},
        "subclasses": len(CATALOGUE),
        "images": len(records),
    }
    for split in SPLITS:
        counts["parts"][split] = sum(r["split"] == split for r in parts)
        rf = [r for t, r in zip(tasks, records) if t.kind != "parts" and t.split == split]
        (tmp / "realfake").mkdir(parents=True, exist_ok=True)
        _write_jsonl(tmp / "realfake" / f"{split}.jsonl", rf)
        with open(tmp / "realfake" / f"{split}.csv", "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(CSV_HEADER)
            for r in rf:
                writer.writerow([r["path"], r["label"], r["generator"], r["caption"], r["subclass"]])
        counts["realfake"][split] = {
            g: {
                "real": sum(r["generator"] == g and r["label"] == 0 for r in rf),
                "fake": sum(r["generator"] == g and r["label"] == 1 for r in rf),
            }
            for g in spec.generators
        }
    meta = {
        "name": "forgelab toy world",
        "format_version": FORMAT_VERSION,
        "spec": spec.to_dict(),
        "spec_hash": spec.spec_hash(),
        "counts": counts,
        "subclasses": [
            {"id": i, "subclass": s.subclass, "dir": s.subclass_dir, **s.attributes()}
            for i, s in enumerate(CATALOGUE)
        ],
        "part_types": sorted(PART_TYPES),
        "generators": {g: GENERATOR_DESCRIPTIONS[g] for g in spec.generators},
        "content_hash": _content_hash(tmp),
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Exclusive fcntl lock on a file next to root; a second process waits here until the first is done."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            LOGGER.info("waiting for another process writing the toy world at %s", root)
            t0 = time.monotonic()
            fcntl.flock(fh, fcntl.LOCK_EX)
            LOGGER.info("lock on %s acquired after %.1f s", root, time.monotonic() - t0)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_meta(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_current(root: Path, spec: ToyWorldSpec) -> bool:
    meta = _read_meta(root)
    return meta is not None and meta.get("spec_hash") == spec.spec_hash()


def _generate_locked(root: Path, spec: ToyWorldSpec, num_workers: int | None) -> Path:
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not (root / META_FILE).exists())):
        # Never delete what we did not write: a complete toy world always has its toy_world.json.
        raise FileExistsError(
            f"{root} exists and is not a toy world (no {META_FILE}); refusing to replace it"
        )
    for stale in root.parent.glob(f".{root.name}.tmp-*"):  # left by a killed process; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.parent.glob(f".{root.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = root.parent / f".{root.name}.tmp-{tag}"
    tmp.mkdir()
    t0 = time.monotonic()
    try:
        meta = _write_world(tmp, spec, num_workers)
        old = root.parent / f".{root.name}.old-{tag}"
        if root.exists():
            os.replace(root, old)
        try:
            os.replace(tmp, root)
        except BaseException:
            if old.exists():
                os.replace(old, root)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    LOGGER.info(
        "generated toy world at %s: %d images, spec %s, in %.1f s",
        root,
        meta["counts"]["images"],
        meta["spec_hash"],
        time.monotonic() - t0,
    )
    return root


def generate_toy_world(
    root: str | Path, spec: ToyWorldSpec = ToyWorldSpec(), num_workers: int | None = None
) -> Path:
    """(Re)generate the toy world at `root`, replacing any previous one atomically.

    Written into a temporary sibling directory, then `os.replace`d into place: a crash or Ctrl-C never
    leaves a half-written world (an older complete world stays where it was). `num_workers` processes
    render in parallel (default: 1 for small worlds, else the available cores); the output is the same.
    """
    root = Path(root)
    with _locked(root):
        return _generate_locked(root, spec, num_workers)


def ensure_toy_world(
    root: str | Path = "data/toy_world", spec: ToyWorldSpec = ToyWorldSpec(), num_workers: int | None = None
) -> Path:
    """Return `root`, generating the toy world first if it is missing or was written from another spec.

    Safe under concurrency (DDP ranks, parallel test workers): the check-and-generate runs under a file
    lock next to root, so a second caller waits and then finds the world done.
    """
    root = Path(root)
    if _is_current(root, spec):
        LOGGER.info("toy world at %s is up to date (spec %s)", root, spec.spec_hash())
        return root
    with _locked(root):
        if _is_current(root, spec):
            LOGGER.info("toy world at %s was generated by another process (spec %s)", root, spec.spec_hash())
            return root
        reason = "missing" if _read_meta(root) is None else "written from another spec"
        LOGGER.info("toy world at %s is %s: generating (spec %s)", root, reason, spec.spec_hash())
        return _generate_locked(root, spec, num_workers)


def _disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m common.data.toy_world --root data/toy_world`: regenerate and print counts and time."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--root", default="data/toy_world")
    parser.add_argument("--ensure", action="store_true", help="only generate when missing or stale")
    parser.add_argument("--workers", type=int, default=None, help="render processes (default: automatic)")
    defaults = ToyWorldSpec()
    for f in dataclasses.fields(ToyWorldSpec):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "generators":
            parser.add_argument(flag, default=",".join(defaults.generators), help="comma-separated")
        else:
            parser.add_argument(flag, type=int, default=getattr(defaults, f.name))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(ToyWorldSpec)}
    kwargs["generators"] = tuple(g for g in kwargs["generators"].split(",") if g)
    spec = ToyWorldSpec(**kwargs)
    t0 = time.monotonic()
    make = ensure_toy_world if args.ensure else generate_toy_world
    root = make(args.root, spec, num_workers=args.workers)
    seconds = time.monotonic() - t0
    meta = _read_meta(root) or {}
    summary = {
        "root": str(root),
        "spec_hash": meta.get("spec_hash"),
        "counts": meta.get("counts"),
        "seconds": round(seconds, 2),
        "disk_mb": round(_disk_bytes(root) / 2**20, 2),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
