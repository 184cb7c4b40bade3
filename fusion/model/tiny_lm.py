"""Tiny random-init causal LMs of real architectures (Llama, Qwen2, GPT-2), written to a folder with a BPE
tokenizer trained here: the LM of the embedded ``+experiment=shapes_lm`` (no download) and of the tests.

The folder is what ``save_pretrained`` writes, so the LM head loads it through
``AutoModelForCausalLM.from_pretrained(folder)``, the path users take with a real LM. A random LM knows no
language: with it, only ``regime=full`` (or LoRA) can learn a task; a pretrained LM is the real use.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

__all__ = ["ARCHS", "Arch", "build_tiny_lm", "build_tokenizer", "ensure_tiny_lm", "shapes_corpus"]

Arch = Literal["llama", "qwen2", "gpt2"]
ARCHS: tuple[Arch, ...] = ("llama", "qwen2", "gpt2")
PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def shapes_corpus(scenes: int = 300, seed: int = 0) -> list[str]:
    """Prompts and answers of the shapes task (``Question: ... Answer: ...`` lines from random scenes): what
    the shapes LM's tokenizer is trained on, so its words are single tokens or few."""
    from fusion.tasks.shapes import candidate_questions, sample_scene  # only the corpus needs the task

    rng = random.Random(f"tiny_lm:{seed}")
    lines = []
    for _ in range(scenes):
        for pairs in candidate_questions(sample_scene(rng, 64, 4)).values():
            lines += [f"Question: {q} Answer: {a}" for q, a in pairs]
    return lines


def build_tokenizer(texts: Sequence[str], add_bos: bool, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts`` (every string encodes, no unknown token) with pad/bos/eos;
    ``add_bos``: the tokenizer prepends ``<s>`` when asked for special tokens, as Llama's does (GPT-2's and
    Qwen2's do not)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS)


def build_tiny_lm(
    folder: str | os.PathLike,
    arch: Arch = "llama",
    texts: Sequence[str] | None = None,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 320,
    max_positions: int = 512,
    seed: int = 0,
) -> Path:
    """Write a random ``arch`` causal LM (``num_layers`` x ``hidden_size``, ``num_heads`` heads) and its
    tokenizer (trained on ``texts``, default :func:`shapes_corpus`) to ``folder`` with ``save_pretrained``."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
    tokenizer = build_tokenizer(texts if texts is not None else shapes_corpus(), arch == "llama", vocab_size)
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if arch == "gpt2":
        # No dropout: outputs in train mode equal eval mode's, as with modern LMs.
        config = GPT2Config(
            n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=max_positions, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, **ids,
        )
    else:
        cls = LlamaConfig if arch == "llama" else Qwen2Config
        config = cls(
            hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
            max_position_embeddings=max_positions, **ids,
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def ensure_tiny_lm(folder: str | os.PathLike, arch: Arch = "llama", **kwargs: int) -> str:
    """``folder`` as a string, after writing a tiny LM there (:func:`build_tiny_lm` with ``kwargs``) unless it
    holds one already. Built in a temporary folder beside it and renamed, so concurrent runs (a multirun's
    jobs) and an interrupted build never leave half an LM; used as a ``_target_`` for ``lm_name_or_path``."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        _check_built(folder, arch, kwargs)
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
    try:
        build_tiny_lm(tmp, arch, **kwargs)
        (tmp / SETTINGS_FILE).write_text(json.dumps({"arch": arch, **kwargs}, indent=1, sort_keys=True))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "config.json").is_file():  # another run's rename won the race: theirs is the same LM
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


SETTINGS_FILE = "tiny_lm.json"  # the arguments a folder's LM was built with (ensure_tiny_lm compares them)


def _check_built(folder: Path, arch: Arch, kwargs: dict[str, int]) -> None:
    """Refuse a folder holding a tiny LM built with other arguments than asked for (a changed config must not
    silently reuse the old LM), naming what differs."""
    wanted = {"arch": arch, **kwargs}
    settings = folder / SETTINGS_FILE
    held = json.loads(settings.read_text()) if settings.is_file() else None
    if held is None:
        raise ValueError(f"{folder} holds an LM without {SETTINGS_FILE}: not one ensure_tiny_lm built; remove it or "
                         "choose another folder (training.head.lm_name_or_path.folder=...)")
    differ = [f"{k} {held.get(k)!r} != {v!r}" for k, v in wanted.items() if held.get(k) != v]
    differ += [f"{k} {v!r} (now the default)" for k, v in held.items() if k not in wanted]
    if differ:
        raise ValueError(
            f"{folder} holds a tiny LM built with other settings ({'; '.join(differ)}): remove the folder or "
            "choose another one (training.head.lm_name_or_path.folder=...)"
        )
