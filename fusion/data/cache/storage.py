"""How a cache stores each token row: float16/float32 as is, or quantised (int8, float8_e4m3fn) with a scale.

A quantised cache holds, beside ``features.npy``, ``scales.npy``: one float16 scale per token row
(``(N, T)``), symmetric (no zero point). A row ``x`` (one token, ``D`` values) is stored as
``q = round(x / s)`` (int8, ``|q| <= 127``) or ``q = float8_e4m3fn(x / s)`` (raw bytes in a uint8 array:
NumPy has no float8), with ``s = max|x| / qmax`` rounded *up* to float16 so that ``|x / s| <= qmax``
holds after the rounding (no clipping: the int8 error is at most ``s / 2`` per value). Reading
dequantises ``q * s`` (exact in float32) into float16, the dtype float16 caches give. Quantising starts
from float32 features (pooled first if the cache is pooled), never from float16-rounded ones.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

SCALES = "scales.npy"


@dataclass(frozen=True)
class Storage:
    """One storage kind: ``name`` (meta.json's ``dtype``), the NumPy dtype of ``features.npy``, the dtype
    batches are read as, and for quantised kinds the largest stored magnitude ``qmax`` (None: stored as is)."""

    name: str
    file_dtype: np.dtype
    read_dtype: torch.dtype
    qmax: float | None = None

    @property
    def quantised(self) -> bool:
        return self.qmax is not None

    def row_bytes(self, tokens: int, dim: int) -> int:
        """Bytes one image takes on disk: its ``(T, D)`` rows plus, quantised, its ``T`` float16 scales."""
        return tokens * dim * self.file_dtype.itemsize + (tokens * 2 if self.quantised else 0)


@functools.cache
def float8_supported() -> bool:
    """Whether this torch has ``float8_e4m3fn`` and can cast to and from it on the CPU."""
    dtype = getattr(torch, "float8_e4m3fn", None)
    if dtype is None:
        return False
    try:
        return bool(torch.tensor([1.5]).to(dtype).to(torch.float32).item() == 1.5)
    except (RuntimeError, TypeError):
        return False


STORAGES: dict[str, Storage] = {
    "float16": Storage("float16", np.dtype(np.float16), torch.float16),
    "float32": Storage("float32", np.dtype(np.float32), torch.float32),
    "int8": Storage("int8", np.dtype(np.int8), torch.float16, qmax=127.0),
    "float8_e4m3fn": Storage("float8_e4m3fn", np.dtype(np.uint8), torch.float16, qmax=448.0),
}


def storage_of(name: str) -> Storage:
    """The :class:`Storage` of a normalised dtype name (see :func:`fusion.data.cache.fingerprint.normalize_dtype`)."""
    try:
        return STORAGES[name]
    except KeyError:
        raise ValueError(f"cache dtype {name!r} is not a storage; known: {', '.join(STORAGES)}") from None


def row_scales(x: Tensor, qmax: float) -> Tensor:
    """``(..., T)`` float16 scales of ``(..., T, D)`` float32 rows: ``max|x| / qmax`` rounded up to float16.

    Rounded up (the next float16 where rounding went down) so that ``|x| / s <= qmax`` always; an all-zero
    row gets scale 0 (and quantises to zeros).
    """
    amax = x.abs().amax(dim=-1).float()
    s = (amax / qmax).to(torch.float16)
    low = s.float() * qmax < amax
    return torch.where(low, torch.nextafter(s, torch.full_like(s, float("inf"))), s)


def quantise(x: Tensor, storage: Storage) -> tuple[np.ndarray, np.ndarray]:
    """``(B, T, D)`` features -> (stored rows in ``storage.file_dtype``, ``(B, T)`` float16 scales), on the CPU."""
    if not storage.quantised:
        raise ValueError(f"storage {storage.name} is not quantised")
    x = x.float()
    s = row_scales(x, storage.qmax)
    safe = torch.where(s > 0, s.float(), torch.ones_like(s, dtype=torch.float32)).unsqueeze(-1)
    y = x / safe
    if storage.name == "int8":
        q = y.round().clamp_(-storage.qmax, storage.qmax).to(torch.int8)
    else:
        # Saturate: a quotient a float32 ulp above 448 must not become NaN (e4m3fn has no infinity).
        q = y.clamp_(-storage.qmax, storage.qmax).to(torch.float8_e4m3fn).view(torch.uint8)
    return q.cpu().numpy(), s.cpu().numpy()


def dequantise(q: np.ndarray, scales: np.ndarray, storage: Storage, out: Tensor) -> Tensor:
    """Stored rows ``(B, T, D)`` and their ``(B, T)`` scales -> ``out`` (float16 or float32): ``q * s``."""
    qt = torch.from_numpy(q)
    values = qt.view(torch.float8_e4m3fn) if storage.name == "float8_e4m3fn" else qt
    # q * s in float32 is exact (8-bit q times an 11-bit float16 scale), then one rounding to out's dtype.
    deq = values.to(torch.float32) * torch.from_numpy(scales).to(torch.float32).unsqueeze(-1)
    out.copy_(deq)
    return out
