"""Image decoding: errors name the file."""

import pytest

from fusion.images import load_image


def test_unreadable_and_missing_images_are_named(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_image(bad)
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        load_image(tmp_path / "nothere.png")
