"""Tiny random-init causal LMs (Llama, Qwen2, GPT-2) with a BPE tokenizer built here, saved to a folder.

The folders are loaded back through ``AutoModelForCausalLM.from_pretrained(folder)``, the path users take
with a real LM; nothing downloads. Shared by the LM-head tests.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from fusion.fusers import FusedTokens
from fusion.model import tiny_lm
from fusion.model.tiny_lm import ARCHS, BOS, EOS, PAD, Arch

__all__ = ["ARCHS", "BOS", "EOS", "PAD", "Arch", "SENTENCES", "build_tiny_lm", "build_tokenizer", "fused_tokens"]

SENTENCES = [
    "Question: what color is the shape? Answer: red",
    "Question: what color is the circle? Answer: blue",
    "Question: how many shapes are there? Answer: two",
    "Question: is there a square? Answer: yes",
    "Question: is there a triangle? Answer: no",
    "Question: where is the purple triangle? Answer: top left",
    "The image shows a green circle and a yellow square.",
]


def build_tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    """The product's byte-level BPE trained on :data:`SENTENCES`."""
    return tiny_lm.build_tokenizer(SENTENCES, add_bos)


def build_tiny_lm(folder: Path, arch: Arch, seed: int = 0) -> Path:
    """Write a 2-layer, 32-wide random ``arch`` causal LM (128 positions) and its tokenizer to ``folder``."""
    return tiny_lm.build_tiny_lm(folder, arch, SENTENCES, max_positions=128, seed=seed)


def fused_tokens(
    batch: int, per_encoder: tuple[int, ...] = (3, 2), width: int = 16, seed: int = 0, mixed: int = 0
) -> FusedTokens:
    """Random fuser output: encoder e contributes ``per_encoder[e]`` tokens, then ``mixed`` tokens mixing
    encoders (``MIXED_GROUP``); every token visible."""
    from fusion.fusers.groups import MIXED_GROUP

    gen = torch.Generator().manual_seed(seed)
    token_encoder = torch.cat(
        [torch.full((n,), e) for e, n in enumerate(per_encoder)] + [torch.full((mixed,), MIXED_GROUP)]
    ).long()
    n = int(token_encoder.numel())
    return FusedTokens(
        tokens=torch.randn(batch, n, width, generator=gen),
        token_encoder=token_encoder,
        visible=torch.ones(batch, n, dtype=torch.bool),
    )
