"""VE-dropout: drop whole vision encoders per sample (training) or for a whole run (evaluation)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn


class EncoderDropout(nn.Module):
    """Samples which encoders each sample keeps: a ``(B, n_encoders)`` bool mask, True = kept.

    In training each encoder is dropped independently with its probability ``p`` (one float for all,
    or a mapping name -> p); a sample never loses all its encoders (one of the dropped ones is kept,
    chosen uniformly). ``drop_encoders`` removes the named encoders for every sample, in training
    and evaluation alike: that is how an evaluation measures what the model owes each encoder.
    """

    def __init__(
        self,
        encoder_names: Sequence[str],
        p: float | Mapping[str, float] = 0.0,
        drop_encoders: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.encoder_names = list(encoder_names)
        if not self.encoder_names:
            raise ValueError("VE-dropout needs at least one encoder; the encoder list is empty")
        probs = self._resolve_p(p)
        self.register_buffer("p", torch.tensor(probs, dtype=torch.float32), persistent=False)
        unknown = [n for n in drop_encoders if n not in self.encoder_names]
        if unknown:
            raise ValueError(
                f"drop_encoders names {unknown} which are not among the model's encoders; "
                f"allowed: {self.encoder_names}"
            )
        if set(drop_encoders) >= set(self.encoder_names):
            raise ValueError(
                f"drop_encoders={list(drop_encoders)} would drop every encoder; keep at least one of "
                f"{self.encoder_names}"
            )
        fixed = torch.tensor([n not in drop_encoders for n in self.encoder_names])
        self.register_buffer("fixed_keep", fixed, persistent=False)

    def _resolve_p(self, p: float | Mapping[str, float]) -> list[float]:
        if isinstance(p, Mapping):
            unknown = [n for n in p if n not in self.encoder_names]
            if unknown:
                raise ValueError(
                    f"VE-dropout p names {unknown} which are not encoders; allowed: {self.encoder_names}"
                )
            probs = [float(p.get(n, 0.0)) for n in self.encoder_names]
        else:
            probs = [float(p)] * len(self.encoder_names)
        for name, value in zip(self.encoder_names, probs, strict=True):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"VE-dropout p for encoder {name!r} is {value}; expected 0 <= p < 1")
        return probs

    def forward(self, batch_size: int) -> torch.Tensor:
        """The keep mask ``(B, n_encoders)`` for one batch."""
        keep = self.fixed_keep.expand(batch_size, -1).clone()
        if not self.training or not bool((self.p > 0).any()):
            return keep
        sampled = torch.rand(batch_size, len(self.encoder_names), device=self.p.device) >= self.p
        keep &= sampled
        empty = ~keep.any(dim=1)
        if empty.any():
            # Re-admit one encoder among those the run allows, uniformly, for samples that lost all.
            weights = self.fixed_keep.float().expand(int(empty.sum()), -1)
            rescued = torch.multinomial(weights, 1).squeeze(1)
            keep[empty.nonzero().squeeze(1), rescued] = True
        return keep
