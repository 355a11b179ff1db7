"""Every kind of bad or odd image file becomes clean RGB or a named skip reason."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.data.images import ImageDecodeError, load_rgb
from tests.conftest import write_rgb


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG signature and IHDR claiming a huge size with a few bytes of pixel data (a bomb's header)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
    path.write_bytes(data)
    return path


def _reason(path: Path, **kwargs) -> str:
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(path, **kwargs)
    return info.value.reason


def test_zero_byte_file_is_skipped_as_empty(tmp_path):
    path = tmp_path / "empty.png"
    path.touch()
    assert _reason(path) == "empty"


def test_missing_file_is_reported(tmp_path):
    assert _reason(tmp_path / "nope.png") == "missing"


def test_text_file_with_image_extension_is_not_an_image(tmp_path):
    path = tmp_path / "page.jpg"
    path.write_text("<html><body>404 Not Found</body></html>")
    assert _reason(path) == "not_an_image"


def test_random_bytes_are_not_an_image(tmp_path):
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    assert _reason(path) in ("not_an_image", "corrupt")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_skipped_not_half_decoded(tmp_path, fmt):
    full = write_rgb(tmp_path / f"full.{fmt.lower()}", size=(64, 64), fmt=fmt)
    truncated = tmp_path / f"cut.{fmt.lower()}"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert _reason(truncated) in ("truncated", "corrupt")


def test_decompression_bomb_header_is_rejected_before_decoding(tmp_path):
    path = _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    assert _reason(path) == "too_large"


def test_pixel_limit_is_configurable(tmp_path):
    path = write_rgb(tmp_path / "a.png", size=(20, 20))
    assert _reason(path, max_pixels=100) == "too_large"
    assert load_rgb(path, max_pixels=400).size == (20, 20)


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "LA", "RGBA", "I;16", "I", "F"])
def test_every_mode_becomes_8bit_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 24, 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray(np.linspace(0, 65535, 16 * 24).reshape(16, 24).astype(np.uint16))
    elif mode == "I":
        image = Image.fromarray(np.linspace(0, 65535, 16 * 24).reshape(16, 24).astype(np.int32), mode="I")
    elif mode == "F":
        image = Image.fromarray(np.linspace(0, 1, 16 * 24).reshape(16, 24).astype(np.float32), mode="F")
    else:
        image = rgb.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode in ("F", "I") else "PNG"
    path = tmp_path / ("img.jpg" if fmt == "JPEG" else f"img.{fmt.lower()}")
    image.save(path, format=fmt)
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (24, 16)


def test_16bit_grayscale_keeps_its_range(tmp_path):
    ramp = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    out = np.asarray(load_rgb(path))
    assert out.min() == 0 and out.max() == 255  # rescaled, not clipped to white
    assert len(np.unique(out[..., 0])) > 200


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent
    path = tmp_path / "clear.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    assert np.asarray(load_rgb(path)).min() == 255


def test_palette_with_transparency_is_composited(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.info["transparency"] = 0
    path = tmp_path / "pal.png"
    image.save(path, transparency=0)
    assert np.asarray(load_rgb(path)).min() == 255


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((20, 40, 3), dtype=np.uint8)  # landscape on disk
    array[:, :20] = 255
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "phone.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    out = load_rgb(path)
    assert out.size == (20, 40)  # displayed portrait


def test_clean_rgb_round_trips(tmp_path):
    path = write_rgb(tmp_path / "ok.png", size=(30, 10))
    expected = np.asarray(Image.open(path))
    np.testing.assert_array_equal(np.asarray(load_rgb(path)), expected)


def test_webp_and_bmp_are_read(tmp_path):
    for fmt, ext in (("WEBP", "webp"), ("BMP", "bmp")):
        buffer = io.BytesIO()
        Image.new("RGB", (9, 7), (10, 20, 30)).save(
            buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {})
        )
        path = tmp_path / f"x.{ext}"
        path.write_bytes(buffer.getvalue())
        assert load_rgb(path).getpixel((0, 0)) == (10, 20, 30)


def test_collate_with_skips_stacks_good_items_and_lists_the_skipped_ones():
    from common.data.collate import collate_with_skips

    good = {"image": torch.ones(3, 2, 2), "label": 1, "path": "a.png", "caption": "a valve"}
    bad = {"skip": "truncated", "path": "b.png"}
    batch = collate_with_skips(
        [good, bad, good], {"image": (3, 1, 1)}, {"label": torch.long}, ("path", "caption")
    )
    assert batch["image"].shape == (2, 3, 2, 2) and batch["label"].tolist() == [1, 1]
    assert batch["path"] == ["a.png", "a.png"] and batch["caption"] == ["a valve"] * 2
    assert batch["skipped"] == [("b.png", "truncated")]
    empty = collate_with_skips([bad], {"image": (3, 1, 1)}, {"label": torch.long}, ("path",))
    assert empty["image"].shape == (0, 3, 1, 1) and empty["label"].dtype == torch.long and empty["path"] == []
