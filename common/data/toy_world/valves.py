"""Each valve built from shapes: bodies per part type, flanged or threaded ends with bolts, handles.

Drawing code is per part type and per attribute value, never per subtype: `_build_geometry(subtype, jitter)`
reads the subtype's attributes from the catalogue and returns its polygons in object units (x right,
y down, pipe axis at y = _PY), one component (grounded noun phrase) per part.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from common.data.toy_world.catalogue import (
    _PAINT,
    _STEEL,
    END_NOUNS,
    HANDLE_COLOURS,
    HANDLE_NOUNS,
    MATERIALS,
    PART_TYPES,
    Material,
    Subtype,
)
from common.data.toy_world.geometry import (
    _capsule,
    _cyl,
    _darker,
    _ellipse,
    _Geometry,
    _hexagon,
    _rect,
    _round_rect,
)

_PY = 0.3  # height of the pipe axis, in object units (y down)


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
