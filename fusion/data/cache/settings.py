"""How a run keeps its feature caches: the ``cache`` config group (``conf/cache/default.yaml``) as one value."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class CacheSettings:
    """Where and how the frozen-feature caches are kept (``conf/cache/``; see :mod:`fusion.data.cache`).

    ``device``: where encoders run while a cache is built (``auto``: CUDA if available). ``dtype``
    (float16, float32, int8, float8_e4m3fn) and ``tokens_per_encoder`` (patch grids pooled to K tokens at
    build time; the model then needs ``fusion.tokens_per_encoder`` = K) choose the storage.
    """

    dir: str | Path
    dtype: str = "float16"
    tokens_per_encoder: int | None = None
    rebuild: bool = True
    batch_size: int = 64
    num_workers: int = 2
    device: str = "auto"

    def build_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
