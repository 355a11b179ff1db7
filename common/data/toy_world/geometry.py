"""Shape maths in object units: polygons with a shading model, primitives, the pose, tight boxes.

A part is a `_Geometry`: a list of `_Shape` polygons (x right, y down), each tagged with the component
(noun phrase) it belongs to. `_Pose` maps object units to image fractions; `_boxes` turns the transformed
polygons into pixel-edge boxes [x0, y0, x1, y1] (x1, y1 exclusive), tight to what is drawn and clipped.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.data.toy_world.catalogue import RGB, Material

Box = list[int]


# ----------------------------------------------------------------------------------------------------------
# Polygons and their shading models.
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Shape:
    points: np.ndarray  # (N, 2) polygon
    rgb: RGB
    surface: Material  # gloss and grain (the colour is rgb)
    normal: tuple[Any, ...]  # shading model, see rendering._normals()
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


def _rotation(angle_deg: float) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def _all_points(g: _Geometry) -> np.ndarray:
    return np.concatenate([s.points for s in g.shapes])


# ----------------------------------------------------------------------------------------------------------
# Pose and boxes: object units -> image.
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
