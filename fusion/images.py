"""Decoding image files the one way both the training path and the feature cache use."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError


def load_image(path: Path) -> Image.Image:
    """Decode an image file as RGB, or fail with an error that names the file."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image file not found: {path}") from err
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
