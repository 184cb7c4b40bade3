"""Tiny random-init causal LMs (Llama, Qwen2, GPT-2) with a BPE tokenizer built here, saved to a folder.

The folders are loaded back through ``AutoModelForCausalLM.from_pretrained(folder)``, the path users take
with a real LM; nothing downloads. Shared by the LM-head tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from fusion.fusers import FusedTokens

Arch = Literal["llama", "qwen2", "gpt2"]
ARCHS: tuple[Arch, ...] = ("llama", "qwen2", "gpt2")
PAD, BOS, EOS = "<pad>", "<s>", "</s>"

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
    """A byte-level BPE (every string encodes, no unknown token) with pad/bos/eos; ``add_bos``: the tokenizer
    prepends ``<s>`` when asked for special tokens, as Llama's does (GPT-2's and Qwen2's do not)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=[PAD, BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS)


def build_tiny_lm(folder: Path, arch: Arch, seed: int = 0) -> Path:
    """Write a 2-layer, 32-wide random ``arch`` causal LM and its tokenizer to ``folder`` (save_pretrained)."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(add_bos=arch == "llama")
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if arch == "gpt2":
        # No dropout: the tests compare outputs in train mode too.
        config = GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids
        )
    else:
        cls = LlamaConfig if arch == "llama" else Qwen2Config
        config = cls(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, **ids,
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


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
