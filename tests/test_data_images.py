"""Image decoding: every pixel mode becomes 8-bit RGB with the right values; errors name the file."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fusion.data.images import load_image


def test_unreadable_and_missing_images_are_named(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_image(bad)
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        load_image(tmp_path / "nothere.png")


def png_bytes(width: int, height: int, depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG file written by hand (Pillow writes no 16-bit RGB): ``rows`` are the raw, unfiltered scanlines."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def sixteen_bit_png(pixels: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG of ``pixels`` (H, W, C) uint16: colour type 2 RGB, 4 grey + alpha, 6 RGBA."""
    height, width = pixels.shape[:2]
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))
    return png_bytes(width, height, 16, color_type, rows)


def pixels_of(path) -> list:
    image = load_image(path)
    assert image.mode == "RGB"
    return np.asarray(image).reshape(-1, 3).tolist()


def _palette(transparent: bool) -> Image.Image:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255])
    image.putpixel((1, 0), 1)
    if transparent:
        image.info["transparency"] = 1  # the blue entry
    return image


def _rgba() -> Image.Image:
    image = Image.new("RGBA", (3, 1))
    for x, value in enumerate([(255, 0, 0, 255), (0, 0, 255, 0), (0, 0, 0, 128)]):
        image.putpixel((x, 0), value)
    return image


def _from(mode: str, values: list) -> Image.Image:
    image = Image.new(mode, (len(values), 1))
    for x, value in enumerate(values):
        image.putpixel((x, 0), value)
    return image


@pytest.mark.parametrize(
    ("name", "make", "expected"),
    [
        ("grey.png", lambda: _from("L", [0, 200]), [[0, 0, 0], [200, 200, 200]]),
        ("bits.png", lambda: _from("1", [0, 1]), [[0, 0, 0], [255, 255, 255]]),
        ("palette.png", lambda: _palette(False), [[255, 0, 0], [0, 0, 255]]),
        # The transparent palette entry shows the white it is composited over, not its stored blue.
        ("palette_alpha.png", lambda: _palette(True), [[255, 0, 0], [255, 255, 255]]),
        # Opaque red stays red; fully transparent blue is white; black at alpha 128/255 over white is
        # 255 * (1 - 128/255) = 127.
        ("rgba.png", _rgba, [[255, 0, 0], [255, 255, 255], [127, 127, 127]]),
        ("grey_alpha.png", lambda: _from("LA", [(100, 255), (100, 0)]), [[100, 100, 100], [255, 255, 255]]),
        # CMYK (lossless TIFF): no ink is white, full cyan is (0, 255, 255), full black is black.
        ("cmyk.tif", lambda: _from("CMYK", [(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)]),
         [[255, 255, 255], [0, 255, 255], [0, 0, 0]]),
    ],
)
def test_eight_bit_modes_become_rgb(tmp_path, name, make, expected):
    path = tmp_path / name
    make().save(path)
    assert pixels_of(path) == expected


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    # round(v / 257): 0 -> 0, 257 -> 1, 32896 -> 128, 65535 -> 255.
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"  # what Pillow makes of a 16-bit grey PNG
    assert pixels_of(path) == [[v] * 3 for v in (0, 1, 128, 255)]
    Image.fromarray(values).save(tmp_path / "grey16.tif")
    assert pixels_of(tmp_path / "grey16.tif") == [[v] * 3 for v in (0, 1, 128, 255)]
    # A mid-grey 16-bit picture stays mid-grey (it used to be clipped to white).
    ramp = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(path)
    decoded = np.asarray(load_image(path))[..., 0]
    assert (decoded == 255).mean() < 0.01
    assert decoded.mean() == pytest.approx(127.5, abs=0.5)


def test_sixteen_bit_rgb_and_rgba_pngs_keep_their_colours(tmp_path):
    # Pillow decodes 16-bit channels to their high byte: 65535 -> 255, 32896 (0x8080) -> 128, 514 -> 2.
    path = tmp_path / "rgb48.png"
    path.write_bytes(sixteen_bit_png(np.array([[[65535, 0, 32896], [257, 514, 65535]]], dtype=np.uint16), 2))
    assert pixels_of(path) == [[255, 0, 128], [1, 2, 255]]
    # 16-bit RGBA: opaque red stays red; fully transparent black is the white behind it.
    path = tmp_path / "rgba64.png"
    path.write_bytes(sixteen_bit_png(np.array([[[65535, 0, 0, 65535], [0, 0, 0, 0]]], dtype=np.uint16), 6))
    assert pixels_of(path) == [[255, 0, 0], [255, 255, 255]]
    # 16-bit grey + alpha.
    path = tmp_path / "la32.png"
    path.write_bytes(sixteen_bit_png(np.array([[[32896, 65535], [32896, 0]]], dtype=np.uint16), 4))
    assert pixels_of(path) == [[128, 128, 128], [255, 255, 255]]


@pytest.mark.parametrize(
    ("name", "array", "mode"),
    [
        ("int32.tif", np.array([[0, 70000]], dtype=np.int32), "I"),
        ("float.tif", np.array([[0.0, 0.5]], dtype=np.float32), "F"),
    ],
)
def test_modes_without_an_eight_bit_range_are_refused_naming_file_and_mode(tmp_path, name, array, mode):
    path = tmp_path / name
    Image.fromarray(array).save(path)
    assert Image.open(path).mode == mode
    with pytest.raises(ValueError, match=rf"cannot read image {path}: pixel mode '{mode}' is not supported"):
        load_image(path)


def test_a_decompression_bomb_is_refused_naming_file_pixels_and_the_limit(tmp_path):
    # A real 225-megapixel 1-bit PNG (15000 x 15000, all black): small on disk, Pillow refuses it at open.
    side = 15000
    row = b"\x00" + bytes((side + 7) // 8)
    path = tmp_path / "huge.png"
    path.write_bytes(png_bytes(side, side, 1, 0, row * side))
    with pytest.raises(ValueError, match=rf"image {path} refused as a possible decompression bomb: .*225000000 pixels"
                       r".*PIL\.Image\.MAX_IMAGE_PIXELS \(now 89478485 pixels\)"):
        load_image(path)
