"""Drawing a scene as a photograph: shading, background, wear, shadow, lighting and sensor noise.

Polygons are drawn with PIL at `supersample` x the output size on an id buffer, shaded per visible pixel
(Blinn-Phong light, per-material gloss and grain) and LANCZOS-downsampled (anti-aliasing); then come the
wear (faded paint, dust, rust or patina around the bolts), a drop shadow, vignetting and exposure, the
lighting condition and Gaussian sensor noise, each from its own random stream.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from common.data.toy_world.catalogue import _PAINT, MATERIALS, Subtype, caption_for, get_subtype
from common.data.toy_world.geometry import Box, _all_points, _boxes, _Geometry, _Pose, _rotation
from common.data.toy_world.scenes import Scene, sample_scene
from common.data.toy_world.valves import _build_geometry


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


def scene_annotations(scene: Scene, size: int) -> tuple[list[Box], list[str], str]:
    """Boxes, phrases and caption of a scene at `size`, without rendering it (e.g. for a generated image)."""
    subtype = scene.subtype
    g = _build_geometry(subtype, scene.jitter())
    boxes, phrases = _boxes(g, _pose(scene, g), size, subtype.part_type)
    return boxes, phrases, caption_for(subtype, scene.template, scene.wear)
