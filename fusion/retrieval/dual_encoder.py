"""The cheap first stage of retrieval and the training signal of the second.

:class:`DualEncoder` embeds images (each frozen encoder's pooled token, projected, averaged over the
encoders a sample keeps) and captions (masked mean of the text states, projected) into one normalised
space; :func:`contrastive_loss` is the symmetric InfoNCE over a batch (ALBEF's ITC), with every caption
of the same image counted as a positive. :func:`hard_negatives` picks, ALBEF style, for each positive
pair one wrong image for its caption and one wrong caption for its image, drawn in proportion to the
first-stage similarity and never from the same image.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DualEncoder(nn.Module):
    """Image and text projections into a shared ``embed_dim`` space with a learned temperature.

    ``encoder_dims`` / ``encoder_prefix``: each encoder's width and number of prefix tokens ([CLS] first);
    an encoder's image vector is its first token, or the mean of its tokens when it has no prefix.
    """

    def __init__(
        self,
        encoder_dims: Mapping[str, int],
        text_dim: int,
        embed_dim: int = 256,
        temperature: float = 0.07,
        encoder_prefix: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        if not 0 < temperature:
            raise ValueError(f"the contrastive temperature must be > 0, got {temperature}")
        self.encoder_names = list(encoder_dims)
        self.prefix = {n: int((encoder_prefix or {}).get(n, 1)) for n in self.encoder_names}
        self.image_proj = nn.ModuleDict(
            {n: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, embed_dim)) for n, d in encoder_dims.items()}
        )
        self.text_proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, embed_dim))
        # CLIP's parametrisation: log of the inverse temperature, capped at 100 when used.
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    @property
    def scale(self) -> Tensor:
        """The inverse temperature multiplying cosine similarities (<= 100)."""
        return self.log_scale.exp().clamp(max=100.0)

    def embed_images(self, features: Mapping[str, Tensor], keep: Tensor) -> Tensor:
        """``features[name]`` (B, N_e, D_e), ``keep`` (B, n_enc) bool -> (B, E) unit vectors.

        The mean over the kept encoders' projections: a dropped encoder contributes nothing.
        """
        pooled = []
        for name in self.encoder_names:
            tokens = features[name]
            vec = tokens[:, 0] if self.prefix[name] > 0 else tokens.mean(dim=1)
            pooled.append(self.image_proj[name](vec))
        stacked = torch.stack(pooled, dim=1)  # (B, n_enc, E)
        weights = keep.to(stacked.dtype)
        mean = (stacked * weights[..., None]).sum(dim=1) / weights.sum(dim=1, keepdim=True).clamp(min=1.0)
        return F.normalize(mean, dim=-1)

    def embed_text(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """``hidden`` (B, L, D_t), ``mask`` (B, L) True at real tokens -> (B, E) unit vectors."""
        weights = mask.to(hidden.dtype)[..., None]
        mean = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return F.normalize(self.text_proj(mean), dim=-1)


def same_image(image_keys: Sequence[str], device: torch.device | None = None) -> Tensor:
    """(B, B) bool: True where rows ``i`` and ``j`` show the same image (compared by image key)."""
    ids = {key: n for n, key in enumerate(dict.fromkeys(image_keys))}
    index = torch.tensor([ids[k] for k in image_keys], device=device)
    return index[:, None] == index[None, :]


def contrastive_loss(logits: Tensor, positives: Tensor) -> Tensor:
    """Symmetric InfoNCE over a batch of pairs.

    ``logits`` (B, B): scaled similarity of caption ``i`` (rows) and image ``j`` (columns);
    ``positives`` (B, B) bool, True where caption ``i`` describes image ``j`` (at least the diagonal).
    The target of each row / column is uniform over its positives.
    """
    target = positives.to(logits.dtype)
    t2i = -(target / target.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    i2t = -(target / target.sum(0, keepdim=True) * F.log_softmax(logits, dim=0)).sum(0).mean()
    return (t2i + i2t) / 2


def hard_negatives(logits: Tensor, positives: Tensor, hardest: bool = False) -> tuple[Tensor, Tensor]:
    """One hard negative per row in each direction, never a positive.

    ``logits`` (B, B) caption x image similarities, ``positives`` (B, B) bool as in
    :func:`contrastive_loss`. Returns ``(neg_image, neg_text)``, each (B,) long: ``neg_image[i]`` is a
    wrong image (a batch row) for caption ``i``, ``neg_text[j]`` a wrong caption for image ``j``; -1 where
    the batch holds no wrong one. Drawn with probability softmax(similarity) over the wrong ones
    (``hardest``: the most similar wrong one).
    """
    logits = logits.detach().float()
    return _pick(logits, positives, hardest), _pick(logits.T, positives.T, hardest)


def _pick(logits: Tensor, positives: Tensor, hardest: bool) -> Tensor:
    wrong = ~positives.bool()
    has = wrong.any(dim=1)
    out = torch.full((logits.shape[0],), -1, dtype=torch.long, device=logits.device)
    if not bool(has.any()):
        return out
    masked = logits[has].masked_fill(~wrong[has], float("-inf"))
    if hardest:
        out[has] = masked.argmax(dim=1)
    else:
        out[has] = torch.multinomial(masked.softmax(dim=1), 1).squeeze(1)
    return out
