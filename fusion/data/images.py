"""Decoding image files the one way both the training path and the feature cache use.

Every file becomes 8-bit RGB, whatever its pixel mode:

- 8-bit grey (``L``), 1-bit (``1``), palette (``P``), ``RGB`` and ``CMYK``: Pillow's own conversion (1-bit
  black/white becomes 0/255; CMYK is converted by Pillow, which already undoes Adobe's inverted CMYK JPEGs).
- 16-bit grey (``I;16``, ``I;16B``, ...; a 16-bit grey PNG, TIFF): scaled to 0..255 (``round(v / 257)``, so
  65535 is 255). Pillow's own conversion clips at 255, which turns nearly every pixel white.
- 16-bit RGB / RGBA PNGs: Pillow already decodes them to 8 bits per channel (the high byte), which is the
  same scaling up to one step.
- Transparency (``RGBA``, ``LA``, ``PA``, a palette or colour with a transparent entry): composited over white.
  Pillow's ``convert("RGB")`` would drop the alpha channel and show whatever colour the transparent pixels
  happen to store (often black, sometimes garbage); white is what a person sees on a page, and the pretrained
  encoders were trained on photographs and web images as people see them.
- Modes without a defined 8-bit range (32-bit integer ``I`` other than a PNG's 16-bit grey, float ``F``)
  or without a colorimetric conversion here (``LAB``, ``HSV``...) are refused, naming the file and the mode.

EXIF orientation is *not* applied: pixels are used as stored, as torchvision's and timm's image loaders read
them (``Image.open(...).convert("RGB")``), which is how the published encoders and V+L results saw them.

A file over Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) is refused naming the file,
its pixel count and how to allow it; the protection is never switched off here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Pillow's conversion to RGB is right for these as they are (no alpha, 8 bits per channel or fewer).
_DIRECT = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr"})
_ALPHA = frozenset({"RGBA", "LA", "PA"})
_SIXTEEN_BIT_GREY = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def load_image(path: Path) -> Image.Image:
    """Decode an image file as 8-bit RGB (see the module docstring for each pixel mode), or fail with an
    error that names the file."""
    try:
        with Image.open(path) as img:
            return _to_rgb(img)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image file not found: {path}") from err
    # Between MAX_IMAGE_PIXELS and twice that Pillow only warns; where warnings are errors (``-W error``) the
    # warning is raised, and is as much a reason to stop as the error.
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(
            f"image {path} refused as a possible decompression bomb: {err} If the file is trusted, raise Pillow's "
            f"limit PIL.Image.MAX_IMAGE_PIXELS (now {Image.MAX_IMAGE_PIXELS} pixels) before the data is read, or "
            "downscale the file"
        ) from err
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in _SIXTEEN_BIT_GREY or (mode == "I" and img.format == "PNG"):
        # A PNG holds at most 16 bits a sample, so an "I" PNG (older Pillow's 16-bit grey) is 16-bit too.
        return _sixteen_bit_grey(img).convert("RGB")
    if mode in _ALPHA or (mode in _DIRECT and img.info.get("transparency") is not None):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in _DIRECT:
        return img.convert("RGB")
    raise ValueError(
        f"pixel mode {mode!r} is not supported (no defined conversion to 8-bit RGB); expected 1-bit, 8- or 16-bit "
        "grey, palette, RGB(A) or CMYK: convert the file, e.g. to an 8-bit RGB PNG"
    )


def _sixteen_bit_grey(img: Image.Image) -> Image.Image:
    """16-bit grey scaled to 8 bits: ``round(v * 255 / 65535)``."""
    values = np.asarray(img).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(f"16-bit grey image holds values {values.min()}..{values.max()} outside 0..65535")
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), mode="L")
