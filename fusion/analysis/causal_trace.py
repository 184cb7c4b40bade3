"""``eval.py mode=causal_trace``: activation patching between clean and corrupted inputs (causal tracing).

As Meng et al. (2022) for language models and Quantmeyer et al. (2024) for CLIP: a *pair* is a clean input
and a corrupted one that differ in one element; the score is the softmax probability of the answer the
model gives on the clean input. The corrupted input runs again with one hidden state restored from the
clean run, and the score that comes back says how much that state carries the difference:

- per (layer, position): block ``l``'s output at one sequence position ([CLS], a text token, one visual
  token of one encoder) replaced by the clean run's;
- per (layer, head): one head's output (its slice of the attention output before the projection) at every
  position replaced by the clean run's. Restoring every head of a layer at once must equal restoring the
  layer's attention output (after the projection); that is checked bitwise on every batch.

Recovery = ``(patched - corrupted) / (clean - corrupted)`` of the mean scores over pairs: 1 = the state
alone restores the clean answer. A position's recovery is over the pairs that have it (a real token, not
padding); a position no traced pair has (the batch's longest question is not traced) has none: null in
results.json, an empty cell in positions.csv, a grey cell in the heatmap, and it is not ranked. Restoring
every position of a layer gives the clean score exactly (the rest of the network then sees the clean state);
restoring none gives the corrupted one; both are recorded. Head recovery: ``heads.csv`` and ``heads.png``.

Corruptions (``analysis.causal_trace.corrupt``):

- ``text``: one word of the question swapped for another of its group (``swaps``: colours, shapes, top/
  bottom, left/right by default, the shapes task's words). On the shapes task the swap is the first one that
  changes the gold answer, the scene read back from the image's pixels (``shapes_scene``): "what color is
  the circle?" becomes "what color is the square?" only when a square of another colour is in the image; a
  question with no such swap gives no pair. On other tasks the first swappable word becomes the next word of
  its group. Or, with ``pairs=<file>``, a pair file for any task: a JSON list or JSON Lines of
  ``{"question_id", "corrupted_question"}`` (ids of the analysed split). Either way a pair is kept only when
  the word piece count is unchanged, so both inputs have the same layout;
- ``encoder:<name>``: that encoder's features taken from another image of the batch (the other encoders
  and the question unchanged).

Pairs whose corruption lowers the score by less than ``min_effect`` are left out (nothing to recover).

With the LM head (``training=lm``, :mod:`.causal_trace_lm`) the same pairs are traced through the LM's decoder
layers: the score is the probability of the clean run's answer (its tokens + EOS under teacher forcing; for a
closed-set task its share of the rank-classification softmax), positions are the LM's (``[BOS]``, visual
tokens, ``prompt <i>``, ``answer <i>``; each row left-padded, so a position is found per row), heads are
restored at the input of each attention's output projection, and the same three exactness checks hold. A text
pair is traced only when the corrupted question gives the LM the same layout (as many LM tokens).

The restore loop, its sums and the report are shared with the LM head's trace (:mod:`.tracing`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from omegaconf import DictConfig

from fusion.analysis.causal_trace_lm import lm_causal_trace
from fusion.analysis.common import AnalysisContext, Batch, open_analysis
from fusion.analysis.pairs import make_pairs, select
from fusion.analysis.tracing import Tally, finish
from fusion.model.transformer import CLS_GROUP, TEXT_GROUP


def run(cfg: DictConfig) -> dict[str, Any]:
    """Entry point of ``eval.py mode=causal_trace``; returns what ``results.json`` holds."""
    with open_analysis(cfg, "causal_trace") as ctx:
        return causal_trace(ctx)


class Patcher:
    """Forward hooks that record the clean run's states and write them into the corrupted run.

    With ``recording`` set, a forward pass keeps every block's output (B, S, D), every attention's
    pre-projection output (B, S, D, heads side by side) and its output after the projection (B, S, D).
    ``action`` arms the replacement of later passes: ``("positions", l, [p, ...])`` restores block ``l``'s
    output at those positions (all of them, or none), ``("heads", l, [h, ...])`` those heads of layer ``l`` at
    every position, ``("attn", l, None)`` layer ``l``'s whole attention output.
    """

    def __init__(self, ctx: AnalysisContext) -> None:
        self.blocks = list(ctx.model.fusion.blocks)
        self.head_dim = ctx.model.fusion.width // ctx.model.fusion.num_heads
        self.clean_out: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.clean_heads: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.clean_attn: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.recording = False
        self.action: tuple[str, int, Any] | None = None
        self.handles = []
        for i, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_hook(self._block_hook(i)))
            self.handles.append(block.attn.proj.register_forward_pre_hook(self._head_hook(i)))
            self.handles.append(block.attn.register_forward_hook(self._attn_hook(i)))

    def _block_hook(self, layer: int) -> Callable:
        def hook(module: Any, args: Any, out: tuple[torch.Tensor, Any]) -> Any:
            x, probs = out
            if self.recording:
                self.clean_out[layer] = x.detach().clone()
            elif self.action and self.action[0] == "positions" and self.action[1] == layer:
                positions = list(self.action[2])
                x = x.clone()
                x[:, positions] = self.clean_out[layer][:, positions]
                return x, probs
            return None

        return hook

    def _head_hook(self, layer: int) -> Callable:
        def hook(module: Any, args: tuple[torch.Tensor]) -> Any:
            (x,) = args
            if self.recording:
                self.clean_heads[layer] = x.detach().clone()
            elif self.action and self.action[0] == "heads" and self.action[1] == layer:
                x = x.clone()
                for head in self.action[2]:
                    lo = head * self.head_dim
                    x[..., lo : lo + self.head_dim] = self.clean_heads[layer][..., lo : lo + self.head_dim]
                return (x,)
            return None

        return hook

    def _attn_hook(self, layer: int) -> Callable:
        def hook(module: Any, args: Any, out: tuple[torch.Tensor, Any]) -> Any:
            x, probs = out
            if self.recording:
                self.clean_attn[layer] = x.detach().clone()
            elif self.action and self.action[0] == "attn" and self.action[1] == layer:
                return self.clean_attn[layer].clone(), probs
            return None

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def scores(ctx: AnalysisContext, batch: Batch, answer: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Softmax probability (B,) of ``answer`` (B,) and the fusion output."""
    logits, out = ctx.model(batch)
    return answer_prob(logits, answer), out


def answer_prob(logits: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Softmax probability (B,) of ``answer`` (B,) under ``logits`` (B, C)."""
    return logits.float().softmax(-1).gather(1, answer[:, None]).squeeze(1)


def position_labels(key_groups: torch.Tensor, encoder_names: Sequence[str], num_images: int = 1) -> list[str]:
    """One label per sequence position: ``[CLS]``, ``text <i>``, ``<encoder>[<i>]`` (``fused[<i>]``); with
    ``num_images`` I > 1 (the visual tokens are image 0's, then image 1's, ...) ``img<k> <encoder>[<i>]``."""
    groups = key_groups.tolist()
    per_image = max(sum(g not in (CLS_GROUP, TEXT_GROUP) for g in groups) // num_images, 1)
    labels: list[str] = []
    counts: Counter = Counter()  # tokens labelled so far: "text", or (image, encoder)
    visual = 0
    for g in groups:
        if g == CLS_GROUP:
            labels.append("[CLS]")
        elif g == TEXT_GROUP:
            labels.append(f"text {counts['text']}")
            counts["text"] += 1
        else:
            name, image = (encoder_names[g] if g >= 0 else "fused"), visual // per_image
            visual += 1
            labels.append(f"img{image} " * (num_images > 1) + f"{name}[{counts[image, name]}]")
            counts[image, name] += 1
    return labels


def causal_trace(ctx: AnalysisContext) -> dict[str, Any]:
    """Trace every pair, write the report, return the results."""
    if ctx.lm:
        return lm_causal_trace(ctx)
    model, fusion = ctx.model, ctx.model.fusion
    tally = Tally.start(ctx, fusion.depth, fusion.num_heads)
    patcher = Patcher(ctx)
    try:
        for batch in ctx.batches():
            if tally.full:
                break
            clean, corrupted, rows = make_pairs(ctx, batch, tally.corrupter)
            if bool(rows.any()):
                logits = model(clean)[0]
                answer = logits.argmax(-1)
                logits_corr = model(corrupted)[0]
                s_clean, s_corr = answer_prob(logits, answer), answer_prob(logits_corr, answer)
                tally.candidates += int(rows.sum())
                tally.changed += int((rows & (logits_corr.argmax(-1) != answer)).sum())
                rows &= (s_clean - s_corr) > tally.min_effect
            rows = rows.nonzero().flatten()[: tally.max_pairs - len(tally.pairs)]
            if len(rows) == 0:
                continue
            clean, corrupted = select(clean, rows), select(corrupted, rows)
            # Clean run on exactly these rows (same batch shape as the patched runs): recorded states.
            answer = model(clean)[0].argmax(-1)
            patcher.recording = True
            s_clean, out = scores(ctx, clean, answer)
            patcher.recording = False
            s_corr, _ = scores(ctx, corrupted, answer)
            visible = out.key_mask  # (B, S): pads are no position of the pair
            labels = position_labels(out.key_groups, ctx.encoder_names, fusion.num_images)
            positions = [(label, [p], visible[:, p].double()) for p, label in enumerate(labels)]
            tally.restore_layers(patcher, partial(scores, ctx, corrupted, answer), s_clean, s_corr,
                                 every=range(len(labels)), none=[], positions=positions)
            tally.add_pairs(clean["question_ids"], [ctx.task.answers[int(a)] for a in answer], s_clean, s_corr)
    finally:
        patcher.close()
    return finish(ctx, tally, _order)


def _order(labels: Sequence[str], encoder_names: Sequence[str]) -> list[str]:
    """[CLS], text positions in order, then each encoder's (and fused) tokens in order, image by image."""
    groups = ["[CLS]", "text", *encoder_names, "fused"]

    def key(label: str) -> tuple[int, int, int]:
        if label == "[CLS]":
            return 0, 0, 0
        if label.startswith("text "):
            return 1, 0, int(label.split(" ")[1])
        image, _, token = label.rpartition(" ")
        name, index = token[:-1].split("[")
        return 2 + (int(image[3:]) if image else 0), groups.index(name), int(index)

    return sorted(labels, key=key)
