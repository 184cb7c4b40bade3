"""The LM head's parts that need no :class:`fusion.model.lm.LMHead`: the projector, prompt templates, the LM
fingerprint, answer-token log-probabilities and greedy decoding.

The scoring functions work on transformers outputs for left-padded sequences, so every sample's answer ends
at the last column.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import string
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedModel

__all__ = [
    "Projector", "Reduction", "answer_tail", "answer_token_logprobs", "check_lm_fingerprint", "format_prompt",
    "greedy_decode", "lm_fingerprint_of", "sequence_logprob", "template_fields",
]

Reduction = Literal["sum", "mean"]

# Config entries that say how the LM runs, not what it computes: left out of the fingerprint.
_VOLATILE_CONFIG_KEYS = frozenset(
    {"_name_or_path", "transformers_version", "_commit_hash", "attn_implementation", "_attn_implementation",
     "_attn_implementation_internal", "_attn_implementation_autoset", "use_cache", "output_attentions",
     "output_hidden_states", "return_dict"}
)


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names of a ``str.format`` template, in order (ValueError if it is malformed)."""
    return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]


def format_prompt(template: str, fields: Mapping[str, Any]) -> str:
    """``template.format(**fields)``; a missing field raises KeyError naming it and the fields there are."""
    try:
        return template.format(**fields)
    except KeyError as e:
        missing = e.args[0]
        raise KeyError(f"prompt template {template!r} needs field {missing!r}; the example has {sorted(fields)}") from e


class Projector(nn.Sequential):
    """``(..., width) -> (..., out_dim)``: ``depth`` linear layers with GELU between them (LLaVA-1.5's MLP at
    depth 2); the hidden layers are ``hidden`` wide (default ``out_dim``)."""

    def __init__(self, width: int, out_dim: int, depth: int = 2, hidden: int | None = None) -> None:
        if depth < 1:
            raise ValueError(f"projector depth must be at least 1, got {depth}")
        dims = [width] + [hidden or out_dim] * (depth - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Linear(d_in, d_out))
        super().__init__(*layers)


def lm_fingerprint_of(lm: PreTrainedModel, name_or_path: str) -> dict[str, Any]:
    """``name_or_path``, the config that defines the model and a SHA-256 over its weights (names, dtypes,
    shapes, bytes: a digest of the LM the projector was aligned to)."""
    config = {k: v for k, v in lm.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256()
    for name, tensor in sorted(lm.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    # JSON round trip: plain values only (a checkpoint stores and compares them).
    return {"name_or_path": name_or_path, "config": json.loads(json.dumps(config, default=str)),
            "weights_sha256": digest.hexdigest()}


def check_lm_fingerprint(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Refuse (ValueError naming each differing key) a checkpoint whose LM differs from the one loaded now in
    config or weights. A different ``name_or_path`` alone is allowed (a hub name and its downloaded folder
    are the same LM) but named in the message when something else differs."""
    differ = []
    if saved["weights_sha256"] != current["weights_sha256"]:
        differ.append(f"weights_sha256 ({saved['weights_sha256'][:12]}... != {current['weights_sha256'][:12]}...)")
    s_cfg, c_cfg = saved["config"], current["config"]
    for key in sorted(set(s_cfg) | set(c_cfg)):
        if s_cfg.get(key, "<absent>") != c_cfg.get(key, "<absent>"):
            differ.append(f"config.{key} ({s_cfg.get(key, '<absent>')!r} != {c_cfg.get(key, '<absent>')!r})")
    if differ:
        names = f"{saved['name_or_path']!r} vs now {current['name_or_path']!r}"
        raise ValueError(f"the checkpoint's language model differs from the one loaded ({names}): {'; '.join(differ)}")


def answer_tail(labels: torch.Tensor) -> int:
    """``labels`` (B, S), -100 outside answers -> how many last positions hold every logit the answers need:
    the longest answer + 1 (the position before an answer's first token predicts it)."""
    return int((labels != -100).sum(1).max()) + 1


def answer_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits`` (B, K, V) of the last K positions, ``labels`` (B, S) -> ``logp`` (B, K-1) float32, the
    log-probability of each next token, and ``mask`` (B, K-1) float, 1 where that token is an answer token.

    Position t's logits predict token t+1 (the causal shift)."""
    K = logits.shape[1]
    target = labels[:, labels.shape[1] - K + 1:]
    if int((labels != -100).sum()) != int((target != -100).sum()):
        raise ValueError(f"the last {K} positions' logits do not cover every answer token")
    mask = target != -100
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    logp = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask.float()


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor, reduction: Reduction = "sum") -> torch.Tensor:
    """(B,) log-likelihood of each row's answer tokens: their sum, or their mean with ``"mean"``."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    logp, mask = answer_token_logprobs(logits, labels)
    total = logp.sum(1)
    return total if reduction == "sum" else total / mask.sum(1).clamp(min=1)


@torch.no_grad()
def greedy_decode(
    lm: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    eos_token_id: int,
    max_new_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding with the LM's key/value cache from a left-padded prefix.

    ``inputs_embeds`` (B, S, H), ``attention_mask`` / ``position_ids`` (B, S) -> ``ids`` (B, T) long, the new
    tokens (T <= ``max_new_tokens``; a finished row repeats EOS), and ``finished`` (B,) bool, True where the
    row produced EOS. Stops as soon as every row has. Each new token's position is its row's last + 1, so
    padding never shifts a row's positions.
    """
    B = inputs_embeds.shape[0]
    device = inputs_embeds.device
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    tokens: list[torch.Tensor] = []
    if max_new_tokens <= 0:
        return torch.zeros(B, 0, dtype=torch.long, device=device), finished
    embed = lm.get_input_embeddings()
    out = lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
             use_cache=True, logits_to_keep=1)
    cache_arg = _cache_keyword(lm)
    for step in range(max_new_tokens):
        nxt = torch.where(finished, eos_token_id, out.logits[:, -1].argmax(-1))
        tokens.append(nxt)
        finished |= nxt == eos_token_id
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
        position_ids = position_ids[:, -1:] + 1
        out = lm(inputs_embeds=embed(nxt)[:, None], attention_mask=attention_mask, position_ids=position_ids,
                 use_cache=True, logits_to_keep=1, **{cache_arg: _returned_cache(out)})
    return torch.stack(tokens, dim=1), finished


def _cache_keyword(lm: nn.Module) -> str:
    """The forward keyword of the key/value cache: ``cache`` (transformers >= 5.25) or ``past_key_values``."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # peft passes keywords through
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _returned_cache(out: Any) -> Any:
    return out["cache"] if "cache" in out else out["past_key_values"]
