"""``zoo/clip_tiny``: contrastive image-text pretraining (CLIP, Radford et al. 2021) at tiny size.

Images and their captions are embedded by the vision tower and a small text tower (the tiny BERT of
``text=tiny``), projected to one space and L2-normalised; the loss is the symmetric InfoNCE over the
batch with a learned temperature. Only the vision tower is saved; the text tower and projections are
the training scaffold.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion.encoders.text import TextEncoder
from fusion.encoders.vision import TimmEncoder
from fusion.zoo.recipe import ZooRecipe

__all__ = ["ClipRecipe", "symmetric_info_nce"]

# CLIP's initial temperature (0.07) and its cap on the logit scale (100), which keeps training stable.
INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100.0)


def symmetric_info_nce(image: Tensor, text: Tensor, logit_scale: Tensor) -> tuple[Tensor, Tensor]:
    """CLIP loss of matching rows: (B, E) normalised image and text embeddings, log scale () -> loss, logits.

    The i-th image's positive is the i-th text and vice versa; every other row of the batch is a
    negative. Returns the mean of the image->text and text->image cross-entropies and the (B, B) logits.
    """
    if image.shape != text.shape or image.ndim != 2:
        raise ValueError(
            f"InfoNCE needs two (B, E) embeddings of one shape, got {tuple(image.shape)} and {tuple(text.shape)}"
        )
    logits = logit_scale.exp() * image @ text.t()
    labels = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2, logits


class ClipRecipe(ZooRecipe):
    """Vision tower + ``text`` tower, linear projections to ``embed_dim``, learned temperature.

    Captions are tokenised in :meth:`collate` (the loader's worker), padded per batch. Logs the in-batch
    image->text top-1 accuracy as ``<stage>/i2t_acc`` and the temperature as ``<stage>/temperature``.
    """

    needs = ("captions",)

    def __init__(
        self,
        encoder: TimmEncoder,
        text: TextEncoder,
        embed_dim: int = 64,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_ratio: float = 0.1,
    ) -> None:
        super().__init__(encoder, lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio)
        if text.freeze:
            raise ValueError("clip recipe: the text tower is trained with the image tower; set text.freeze=false")
        # from_pretrained returns the text model in eval mode; it is trained here.
        self.text = text.train()
        self.image_proj = nn.Linear(self.embed_dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(text.hidden_size, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))
        self._eval_transform = self.preprocess.transform()

    def transform(self, item: dict[str, Any]) -> dict[str, Any]:
        if not item.get("caption"):
            raise ValueError("clip recipe: every training image needs a caption")
        # No flips or crops: captions name positions, which either would contradict.
        return {"pixels": self._eval_transform(item["image"]), "caption": item["caption"]}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "pixels": torch.stack([it["pixels"] for it in items]),
            **self.text.tokenize([it["caption"] for it in items]),
        }

    def embed_images(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, E), L2-normalised."""
        return F.normalize(self.image_proj(self.pooled(pixels)), dim=-1)

    def embed_texts(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) token ids and mask -> (B, E), L2-normalised; mean over the caption's tokens."""
        states = self.text(input_ids, attention_mask)  # (B, L, D_t)
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        image = self.embed_images(batch["pixels"])
        text = self.embed_texts(batch["input_ids"], batch["attention_mask"])
        # Clamped in place (as CLIP does) so the scale never passes 100, whatever the optimiser does.
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        loss, logits = symmetric_info_nce(image, text, self.logit_scale)
        labels = torch.arange(len(logits), device=logits.device)
        acc = (logits.argmax(-1) == labels).float().mean()
        return loss, {"i2t_acc": acc, "temperature": self.logit_scale.exp().reciprocal().detach()}
