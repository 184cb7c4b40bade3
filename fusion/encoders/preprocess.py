"""Per-encoder image preprocessing: one frozen description, turned into a transform by timm.

Every vision encoder carries a :class:`Preprocess` (its own input size, mean/std, resize rule), read
from the model's own pretrained config (timm) or image processor (transformers). The dataset decodes an
image once and applies each encoder's transform to it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import PIL.Image
import timm.data
from torch import Tensor

CROP_MODES = ("center", "squash", "border")


@dataclass(frozen=True)
class Preprocess:
    """How one encoder wants its pixels.

    ``input_size`` is (H, W); ``interpolation`` a timm name (``bicubic``, ``bilinear``...); ``crop_pct``
    and ``crop_mode`` follow timm's eval transform (resize to ``input_size / crop_pct``, then crop).
    """

    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    crop_mode: str = "center"

    @classmethod
    def from_data_config(cls, cfg: Mapping[str, Any]) -> Preprocess:
        """From a timm data config (``timm.data.resolve_data_config``); ``input_size`` is (C, H, W)."""
        _, h, w = cfg["input_size"]
        return cls(
            input_size=(int(h), int(w)),
            mean=tuple(float(v) for v in cfg["mean"]),
            std=tuple(float(v) for v in cfg["std"]),
            interpolation=str(cfg.get("interpolation", "bicubic")),
            crop_pct=float(cfg.get("crop_pct", 1.0)),
            crop_mode=str(cfg.get("crop_mode", "center")),
        )

    @classmethod
    def from_image_processor(cls, processor: Any) -> Preprocess:
        """From a transformers image processor (``AutoImageProcessor``): size, crop, mean/std, resample.

        Resizing to the shortest edge then center-cropping maps to timm's ``center`` mode with
        ``crop_pct = crop / shortest_edge``; a fixed (H, W) resize without crop maps to ``squash``.
        """
        size = _size_dict(getattr(processor, "size", None))
        crop = _size_dict(getattr(processor, "crop_size", None)) if getattr(processor, "do_center_crop", False) else {}
        if crop.get("height"):
            input_size = (crop["height"], crop["width"])
            edge = size.get("shortest_edge") or min(size.get("height") or 0, size.get("width") or 0)
            crop_pct = min(input_size) / edge if edge else 1.0
            crop_mode = "center"
        elif size.get("height"):
            input_size, crop_pct, crop_mode = (size["height"], size["width"]), 1.0, "squash"
        elif size.get("shortest_edge"):
            # No crop but a variable-size resize: a square crop keeps batches stackable.
            input_size, crop_pct, crop_mode = (size["shortest_edge"],) * 2, 1.0, "center"
        else:
            raise ValueError(f"unsupported image processor size {size} of {type(processor).__name__}")
        normalize = getattr(processor, "do_normalize", True)
        return cls(
            input_size=(int(input_size[0]), int(input_size[1])),
            mean=tuple(float(v) for v in processor.image_mean) if normalize else (0.0, 0.0, 0.0),
            std=tuple(float(v) for v in processor.image_std) if normalize else (1.0, 1.0, 1.0),
            interpolation=_interpolation_name(getattr(processor, "resample", None)),
            crop_pct=float(crop_pct),
            crop_mode=crop_mode,
        )

    def with_crop_mode(self, crop_mode: str) -> Preprocess:
        """The same preprocessing with another of timm's eval crop modes: ``center`` (resize the short side,
        crop the middle square: most encoders' own), ``squash`` (resize the whole image to ``input_size``,
        aspect ratio not kept) or ``border`` (resize the long side, pad the rest)."""
        if crop_mode not in CROP_MODES:
            raise ValueError(f"image_crop={crop_mode!r}: expected one of {', '.join(CROP_MODES)} (or null: each "
                             "encoder's own)")
        return replace(self, crop_mode=crop_mode, crop_pct=1.0 if crop_mode != "center" else self.crop_pct)

    def transform(self) -> Callable[[PIL.Image.Image], Tensor]:
        """timm's eval transform: an RGB PIL image -> (3, H, W) float tensor, normalized."""
        return timm.data.create_transform(
            input_size=(3, *self.input_size),
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            crop_pct=self.crop_pct,
            crop_mode=self.crop_mode,
            is_training=False,
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples as lists) so a fingerprint compares equal after a round trip."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _size_dict(size: Any) -> dict[str, int]:
    """transformers' ``SizeDict`` / plain dict / int -> ``{key: value}`` without the unset keys."""
    if size is None:
        return {}
    if isinstance(size, int):
        return {"height": size, "width": size}
    items = size.items() if hasattr(size, "items") else vars(size).items()
    return {k: int(v) for k, v in items if v is not None}


def _interpolation_name(resample: Any) -> str:
    """PIL resample code (or a torchvision ``InterpolationMode``) -> timm interpolation name."""
    if resample is None:
        return "bicubic"
    if isinstance(getattr(resample, "value", None), str):  # torchvision InterpolationMode
        return resample.value
    return PIL.Image.Resampling(int(resample)).name.lower()
