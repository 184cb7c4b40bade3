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

With the LM head (``training=lm``, :func:`lm_causal_trace`) the same pairs are traced through the LM's decoder
layers: the score is the probability of the clean run's answer (its tokens + EOS under teacher forcing; for a
closed-set task its share of the rank-classification softmax), positions are the LM's (``[BOS]``, visual
tokens, ``prompt <i>``, ``answer <i>``; each row left-padded, so a position is found per row), heads are
restored at the input of each attention's output projection, and the same three exactness checks hold. A text
pair is traced only when the corrupted question gives the LM the same layout (as many LM tokens).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from omegaconf import DictConfig

from fusion.analysis.common import AnalysisContext, Batch, new_report, open_analysis
from fusion.analysis.pairs import Corrupter, make_pairs, select
from fusion.fusers.groups import ANSWER_GROUP, MIXED_GROUP, PAD_GROUP
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
    max_pairs = int(ctx.settings.get("max_pairs", 64))
    min_effect = float(ctx.settings.get("min_effect", 0.02))
    layers, heads = fusion.depth, fusion.num_heads
    patcher = Patcher(ctx)
    # label -> (4, layers): sums over the pairs where the position is real (not padding) of the patched,
    # clean and corrupted scores, and their count; positions differ in how many pairs have them.
    pos_sum: dict[str, torch.Tensor] = {}
    head_sum = torch.zeros(layers, heads, dtype=torch.float64)
    layer_all = torch.zeros(layers, dtype=torch.float64)
    layer_none = torch.zeros(layers, dtype=torch.float64)
    layer_attn = torch.zeros(layers, dtype=torch.float64)
    # Restoring a whole layer gives the clean score, none the corrupted one, every head the attention output's.
    exact = {"all": True, "none": True, "heads": True}
    clean_sum = corrupt_sum = 0.0
    pairs: list[dict[str, Any]] = []
    questions = {e.question_id: e.question for e in ctx.task.examples(ctx.split)}
    corrupter = Corrupter(ctx) if str(ctx.settings.get("corrupt", "text")) == "text" else None
    # Pairs before the min_effect filter, and how many of them change the model's answer.
    candidates = changed = 0
    try:
        for batch in ctx.batches():
            if len(pairs) >= max_pairs:
                break
            clean, corrupted, rows = make_pairs(ctx, batch, corrupter)
            if bool(rows.any()):
                logits = model(clean)[0]
                answer = logits.argmax(-1)
                logits_corr = model(corrupted)[0]
                s_clean, s_corr = answer_prob(logits, answer), answer_prob(logits_corr, answer)
                candidates += int(rows.sum())
                changed += int((rows & (logits_corr.argmax(-1) != answer)).sum())
                rows &= (s_clean - s_corr) > min_effect
            rows = rows.nonzero().flatten()[: max_pairs - len(pairs)]
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
            for layer in range(layers):
                patcher.action = ("positions", layer, range(len(labels)))
                restored, _ = scores(ctx, corrupted, answer)
                exact["all"] &= bool(torch.equal(restored, s_clean))
                layer_all[layer] += float(restored.sum())
                patcher.action = ("positions", layer, [])
                restored, _ = scores(ctx, corrupted, answer)
                exact["none"] &= bool(torch.equal(restored, s_corr))
                layer_none[layer] += float(restored.sum())
                for p, label in enumerate(labels):
                    patcher.action = ("positions", layer, [p])
                    s, _ = scores(ctx, corrupted, answer)
                    real = visible[:, p].double()
                    sums = pos_sum.setdefault(label, torch.zeros(4, layers, dtype=torch.float64))
                    sums[:, layer] += (torch.stack([s, s_clean, s_corr, torch.ones_like(s)]).double() @ real).cpu()

                for h in range(heads):
                    patcher.action = ("heads", layer, [h])
                    s, _ = scores(ctx, corrupted, answer)
                    head_sum[layer, h] += float(s.sum())
                patcher.action = ("attn", layer, None)
                s_attn, _ = scores(ctx, corrupted, answer)
                layer_attn[layer] += float(s_attn.sum())
                patcher.action = ("heads", layer, range(heads))
                s, _ = scores(ctx, corrupted, answer)
                exact["heads"] &= bool(torch.equal(s, s_attn))
                patcher.action = None
            clean_sum += float(s_clean.sum())
            corrupt_sum += float(s_corr.sum())
            for i, qid in enumerate(clean["question_ids"]):
                pair = {"question_id": qid, "question": questions[qid]}
                if corrupter is not None:
                    pair["corrupted_question"] = corrupter(qid)
                pairs.append({**pair, "answer": ctx.task.answers[int(answer[i])], "clean_score": float(s_clean[i]),
                              "corrupted_score": float(s_corr[i])})
    finally:
        patcher.close()
    return _finish(ctx, pairs, candidates, changed, min_effect, clean_sum, corrupt_sum,
                   (layer_all, layer_none, layer_attn), exact, pos_sum, head_sum)


def _finish(ctx: AnalysisContext, pairs: list[dict], candidates: int, changed: int, min_effect: float,
            clean_sum: float, corrupt_sum: float, layer_sums: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
            exact: dict[str, bool], pos_sum: dict[str, torch.Tensor], head_sum: torch.Tensor) -> dict[str, Any]:
    """Means over the traced pairs (refused without any), then the report."""
    n = len(pairs)
    if n == 0:
        raise ValueError(f"no pair found whose corruption lowers the clean answer's score by more than min_effect="
                         f"{min_effect}: {candidates} candidate pairs, the model's answer changed on {changed}; "
                         "lower analysis.causal_trace.min_effect (e.g. 0, or -1 for every pair) or check "
                         "analysis.causal_trace.corrupt / pairs / swaps")
    layer_all, layer_none, layer_attn = layer_sums
    restored = {"all": (layer_all / n).tolist(), "none": (layer_none / n).tolist(), "attn": (layer_attn / n).tolist()}
    counts = {"candidate_pairs": candidates, "answer_changed": changed,
              "answer_changed_share": changed / candidates if candidates else 0.0}
    return _report(ctx, pairs, clean_sum / n, corrupt_sum / n, restored, exact, pos_sum, head_sum / n, counts)


# ---- the LM head --------------------------------------------------------------------------------------

BOS_LABEL = "[BOS]"


class LMPatcher:
    """Forward hooks on the LM's decoder layers (:meth:`LMLitModule.lm_layers
    <fusion.training.lm_module.LMLitModule.lm_layers>`) that record the clean run's states and write them into
    the corrupted run; what :class:`Patcher` does for the fusion transformer's blocks.

    ``action``: ``("positions", l, cols)`` restores layer ``l``'s output at column ``cols[r]`` of each row ``r``
    (``cols`` (rows,) long, -1: none of that row; None: every position of every row), ``("heads", l, [h, ...])``
    those heads of layer ``l`` at every position (the output projection's input, heads side by side),
    ``("attn", l, None)`` layer ``l``'s whole self-attention output. The LM's rows are left-padded per sample,
    so one labelled position sits in another column in each row.
    """

    def __init__(self, ctx: AnalysisContext) -> None:
        self.layers = ctx.model.lm_layers()
        self.num_heads = ctx.model.lm_attention_shape[1]
        n = len(self.layers)
        self.clean_out: list[torch.Tensor | None] = [None] * n
        self.clean_heads: list[torch.Tensor | None] = [None] * n
        self.clean_attn: list[torch.Tensor | None] = [None] * n
        self.recording = False
        self.action: tuple[str, int, Any] | None = None
        self.handles = []
        for i, part in enumerate(self.layers):
            self.handles.append(part.layer.register_forward_hook(self._layer_hook(i)))
            self.handles.append(part.out_proj.register_forward_pre_hook(self._head_hook(i)))
            self.handles.append(part.attention.register_forward_hook(self._attn_hook(i)))

    def _armed(self, kind: str, layer: int) -> bool:
        return self.action is not None and self.action[0] == kind and self.action[1] == layer

    def _layer_hook(self, layer: int) -> Callable:
        def hook(module: Any, args: Any, out: Any) -> Any:
            x = out[0] if isinstance(out, tuple) else out
            if self.recording:
                self.clean_out[layer] = x.detach().clone()
                return None
            if not self._armed("positions", layer):
                return None
            clean, cols = self.clean_out[layer], self.action[2]
            if cols is None:
                x = clean.clone()
            else:
                x = x.clone()
                rows = (cols >= 0).nonzero().flatten()
                x[rows, cols[rows]] = clean[rows, cols[rows]]
            return (x, *out[1:]) if isinstance(out, tuple) else x

        return hook

    def _head_hook(self, layer: int) -> Callable:
        def hook(module: Any, args: tuple[Any, ...]) -> Any:
            x = args[0]
            if self.recording:
                self.clean_heads[layer] = x.detach().clone()
            elif self._armed("heads", layer):
                x = x.clone()
                dim = x.shape[-1] // self.num_heads
                for head in self.action[2]:
                    x[..., head * dim : (head + 1) * dim] = self.clean_heads[layer][..., head * dim : (head + 1) * dim]
                return (x, *args[1:])
            return None

        return hook

    def _attn_hook(self, layer: int) -> Callable:
        def hook(module: Any, args: Any, out: Any) -> Any:
            x = out[0] if isinstance(out, tuple) else out
            if self.recording:
                self.clean_attn[layer] = x.detach().clone()
            elif self._armed("attn", layer):
                x = self.clean_attn[layer].clone()
                return (x, *out[1:]) if isinstance(out, tuple) else x
            return None

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def lm_position_labels(groups: torch.Tensor, encoder_names: Sequence[str], num_images: int = 1) -> dict[str, int]:
    """One LM row's positions by label -> column: ``[BOS]``, each visual token ``<encoder>[<i>]`` (``fused[<i>]``;
    ``img<k> `` before it with ``num_images`` > 1), ``prompt <i>``, ``answer <i>``; padding has none. ``groups``
    (S,): the row's group ids (``LMInputs.groups``)."""
    row = groups.tolist()
    visual_total = sum(g >= 0 or g == MIXED_GROUP for g in row)
    per_image = max(visual_total // num_images, 1)
    labels: dict[str, int] = {}
    counts: Counter = Counter()
    visual = 0
    for col, g in enumerate(row):
        if g == PAD_GROUP:
            continue
        if g == CLS_GROUP:
            label = BOS_LABEL
        elif g in (TEXT_GROUP, ANSWER_GROUP):
            kind = "prompt" if g == TEXT_GROUP else "answer"
            label = f"{kind} {counts[kind]}"
            counts[kind] += 1
        else:
            name, image = (encoder_names[g] if g >= 0 else "fused"), visual // per_image
            visual += 1
            label = f"img{image} " * (num_images > 1) + f"{name}[{counts[image, name]}]"
            counts[image, name] += 1
        labels[label] = col
    return labels


def _lm_order(labels: Sequence[str], encoder_names: Sequence[str]) -> list[str]:
    """The LM's sequence order: [BOS], each encoder's (and fused) tokens image by image, prompt, answer."""
    groups = [*encoder_names, "fused"]

    def key(label: str) -> tuple[int, int, int]:
        if label == BOS_LABEL:
            return 0, 0, 0
        kind, _, index = label.rpartition(" ")
        if kind in ("prompt", "answer"):
            return (1000 if kind == "prompt" else 1001), 0, int(index)
        image, _, token = label.rpartition(" ")
        name, number = token[:-1].split("[")
        return 1 + (int(image[3:]) if image else 0), groups.index(name), int(number)

    return sorted(labels, key=key)


def lm_causal_trace(ctx: AnalysisContext) -> dict[str, Any]:
    """Causal tracing inside the LM head: the same pairs, the LM's decoder layers patched.

    Score = the probability of the clean run's answer (:meth:`LMLitModule.answer_probability
    <fusion.training.lm_module.LMLitModule.answer_probability>`: its tokens + EOS under teacher forcing for
    open-ended tasks, its share of the rank-classification softmax for closed-set ones). Positions are the LM's
    (``[BOS]``, visual tokens, ``prompt <i>``, ``answer <i>``: the answer tokens are teacher-forced, the same in
    both runs), patched per row at that row's column (left padding); a pair is kept only where the corrupted
    input gives the LM the same layout (the question's LM token count unchanged)."""
    model = ctx.model
    max_pairs = int(ctx.settings.get("max_pairs", 64))
    min_effect = float(ctx.settings.get("min_effect", 0.02))
    layers, heads = model.lm_attention_shape
    num_images = ctx.task.images_per_example
    patcher = LMPatcher(ctx)
    pos_sum: dict[str, torch.Tensor] = {}
    head_sum = torch.zeros(layers, heads, dtype=torch.float64)
    layer_all = torch.zeros(layers, dtype=torch.float64)
    layer_none = torch.zeros(layers, dtype=torch.float64)
    layer_attn = torch.zeros(layers, dtype=torch.float64)
    exact = {"all": True, "none": True, "heads": True}
    clean_sum = corrupt_sum = 0.0
    pairs: list[dict[str, Any]] = []
    questions = {e.question_id: e.question for e in ctx.task.examples(ctx.split)}
    corrupter = Corrupter(ctx) if str(ctx.settings.get("corrupt", "text")) == "text" else None
    candidates = changed = 0

    def probability(batch: Batch, fused: Any, answers: list[str]) -> tuple[torch.Tensor, Any, torch.Tensor]:
        return model.answer_probability(fused, model.prompts(batch), answers)

    def per_example(values: torch.Tensor, example: torch.Tensor, size: int) -> torch.Tensor:
        """(rows,) bool -> (size,) bool: any row of the example."""
        counts = torch.zeros(size, device=values.device).index_add_(0, example, values.float())
        return counts > 0

    try:
        for batch in ctx.batches():
            if len(pairs) >= max_pairs:
                break
            clean, corrupted, rows = make_pairs(ctx, batch, corrupter)
            answers: list[str] = []
            if bool(rows.any()):
                fused_clean, fused_corr = model.fused_tokens(clean), model.fused_tokens(corrupted)
                answers, _ = model.predict(clean, fused_clean)
                answers_corr, _ = model.predict(corrupted, fused_corr)
                s_clean, inputs_clean, example = probability(clean, fused_clean, answers)
                s_corr, inputs_corr, _ = probability(corrupted, fused_corr, answers)
                size = len(answers)
                # The same layout for the LM in both runs (positions line up): every row of the pair.
                differs = (inputs_clean.groups != inputs_corr.groups).any(1)
                rows &= ~per_example(differs, example, size)
                candidates += int(rows.sum())
                moved = torch.tensor([a != b for a, b in zip(answers, answers_corr, strict=True)], device=rows.device)
                changed += int((rows & moved).sum())
                rows &= (s_clean - s_corr) > min_effect
            rows = rows.nonzero().flatten()[: max_pairs - len(pairs)]
            if len(rows) == 0:
                continue
            clean, corrupted = select(clean, rows), select(corrupted, rows)
            answer = [answers[i] for i in rows.tolist()]
            fused_clean, fused_corr = model.fused_tokens(clean), model.fused_tokens(corrupted)
            # Clean run on exactly these rows (the batch shape of the patched runs): recorded states.
            patcher.recording = True
            s_clean, inputs, example = probability(clean, fused_clean, answer)
            patcher.recording = False
            s_corr, inputs_corr, _ = probability(corrupted, fused_corr, answer)
            assert torch.equal(inputs.groups, inputs_corr.groups)
            size = len(answer)
            columns = [lm_position_labels(g, ctx.encoder_names, num_images) for g in inputs.groups]
            labels = list(dict.fromkeys(label for row in columns for label in row))
            for layer in range(layers):
                patcher.action = ("positions", layer, None)
                restored, _, _ = probability(corrupted, fused_corr, answer)
                exact["all"] &= bool(torch.equal(restored, s_clean))
                layer_all[layer] += float(restored.sum())
                none = torch.full((len(columns),), -1, dtype=torch.long, device=inputs.groups.device)
                patcher.action = ("positions", layer, none)
                restored, _, _ = probability(corrupted, fused_corr, answer)
                exact["none"] &= bool(torch.equal(restored, s_corr))
                layer_none[layer] += float(restored.sum())
                for label in labels:
                    cols = torch.tensor([row.get(label, -1) for row in columns], device=none.device)
                    patcher.action = ("positions", layer, cols)
                    s, _, _ = probability(corrupted, fused_corr, answer)
                    real = per_example(cols >= 0, example, size).double()
                    sums = pos_sum.setdefault(label, torch.zeros(4, layers, dtype=torch.float64))
                    sums[:, layer] += (torch.stack([s, s_clean, s_corr, torch.ones_like(s)]).double() @ real).cpu()
                for h in range(heads):
                    patcher.action = ("heads", layer, [h])
                    s, _, _ = probability(corrupted, fused_corr, answer)
                    head_sum[layer, h] += float(s.sum())
                patcher.action = ("attn", layer, None)
                s_attn, _, _ = probability(corrupted, fused_corr, answer)
                layer_attn[layer] += float(s_attn.sum())
                patcher.action = ("heads", layer, range(heads))
                s, _, _ = probability(corrupted, fused_corr, answer)
                exact["heads"] &= bool(torch.equal(s, s_attn))
                patcher.action = None
            clean_sum += float(s_clean.sum())
            corrupt_sum += float(s_corr.sum())
            for i, qid in enumerate(clean["question_ids"]):
                pair = {"question_id": qid, "question": questions[qid]}
                if corrupter is not None:
                    pair["corrupted_question"] = corrupter(qid)
                pairs.append({**pair, "answer": answer[i], "clean_score": float(s_clean[i]),
                              "corrupted_score": float(s_corr[i])})
    finally:
        patcher.close()
    return _finish(ctx, pairs, candidates, changed, min_effect, clean_sum, corrupt_sum,
                   (layer_all, layer_none, layer_attn), exact, pos_sum, head_sum)


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


def defined(values: torch.Tensor) -> torch.Tensor:
    """``values`` with every non-finite entry (0/0: no pair to average over) set to NaN: undefined."""
    return values.where(values.isfinite(), torch.full_like(values, float("nan")))


def top_positions(recovery: torch.Tensor, labels: Sequence[str], k: int) -> list[dict[str, Any]]:
    """The ``k`` (layer, position) cells of ``recovery`` (layers, positions) with the highest recovery, undefined
    (NaN) cells left out (a descending sort would put them first)."""
    flat = recovery.flatten()
    finite = flat.isfinite().nonzero().flatten()
    order = finite[flat[finite].argsort(descending=True, stable=True)][:k]
    return [{"layer": int(i) // len(labels), "position": labels[int(i) % len(labels)], "recovery": float(flat[i])}
            for i in order]


def _range(values: torch.Tensor) -> tuple[float, float]:
    """Colour range of a recovery heatmap: at least [0, 1], wider if a defined value lies outside."""
    finite = values[values.isfinite()]
    if finite.numel() == 0:
        return 0.0, 1.0
    return min(0.0, float(finite.min())), max(1.0, float(finite.max()))


def _report(ctx: AnalysisContext, pairs: list[dict], clean: float, corrupted: float, restored: dict[str, list],
            exact: dict[str, bool], pos_sum: dict[str, torch.Tensor], heads: torch.Tensor,
            counts: dict[str, Any]) -> dict[str, Any]:
    layers = heads.shape[0]
    labels = (_lm_order if ctx.lm else _order)(list(pos_sum), ctx.encoder_names)
    sums = torch.stack([pos_sum[k] for k in labels], 2)  # (4, layers, positions): patched, clean, corrupted, n
    # Means and recovery over the pairs that have the position (a late text position exists in long questions
    # only); undefined (NaN) where no traced pair has it.
    mean = defined(sums[0] / sums[3])
    position_recovery = defined((sums[0] - sums[2]) / (sums[1] - sums[2]))
    position_pairs = sums[3, 0].long()  # (positions,) the same at every layer

    def recovery(x: torch.Tensor) -> torch.Tensor:
        return defined((x - corrupted) / (clean - corrupted))

    head_recovery = recovery(heads)
    top = top_positions(position_recovery, labels, int(ctx.settings.get("top_positions", 10)))
    report = new_report(ctx, f"Causal tracing ({ctx.task.name}, {ctx.split})")
    report.results.update({
        "corrupt": str(ctx.settings.get("corrupt", "text")), "pairs": pairs, "num_pairs": len(pairs),
        "clean_score": clean, "corrupted_score": corrupted, "restore_all_score": restored["all"],
        "restore_none_score": restored["none"], "restore_all_exact": exact["all"],
        "restore_none_exact": exact["none"], "restore_attention_score": restored["attn"],
        "restore_heads_exact": exact["heads"], "positions": labels, "position_pairs": position_pairs.tolist(),
        "position_score": mean, "position_recovery": position_recovery,
        "head_score": heads, "head_recovery": head_recovery, "top_positions": top, **counts,
    })
    undefined = int((position_pairs == 0).sum())
    report.text(
        f"{counts['candidate_pairs']} candidate pairs in the batches read; the corruption changed the model's "
        f"answer in {counts['answer_changed']} of them ({100 * counts['answer_changed_share']:.1f}%). "
        f"{len(pairs)} pairs (corruption `{report.results['corrupt']}`) lower the clean answer's probability by "
        f"more than min_effect={float(ctx.settings.get('min_effect', 0.02))} and are traced; score = probability "
        f"of the clean answer: clean {clean:.4f}, corrupted {corrupted:.4f}. Restoring every position of a layer gives "
        f"{', '.join(f'{v:.4f}' for v in restored['all'])} per layer (equal to the clean scores bitwise: "
        f"{exact['all']}), restoring none {', '.join(f'{v:.4f}' for v in restored['none'])} (equal to the "
        f"corrupted scores bitwise: {exact['none']}), restoring a layer's attention output "
        f"{', '.join(f'{v:.4f}' for v in restored['attn'])} (equal to restoring all its heads bitwise: "
        f"{exact['heads']}). Recovery = (patched - corrupted) / (clean - corrupted), each position's over the "
        "pairs that have it"
        + (f"; {undefined} positions no traced pair has (padding in all of them) have none (grey, not ranked)."
           if undefined else ".")
    )
    rows = [f"layer {i}" for i in range(layers)]
    # Positions down the side: a sequence of ~70 tokens does not fit across a page.
    lo, hi = _range(position_recovery)
    report.heatmap("positions", position_recovery.T, labels, rows, "Recovery per position and layer",
                   title="Recovery when one position of one layer is restored", xlabel="block output",
                   ylabel="sequence position", colorbar="recovery of the clean score", vmin=lo, vmax=hi)
    report.table("positions", ["layer", "position", "pairs", "score", "recovery"],
                 [[i, p, int(position_pairs[j]), float(mean[i, j]), float(position_recovery[i, j])]
                  for i in range(layers) for j, p in enumerate(labels)], show=False)
    report.text("Top positions:\n\n" + "\n".join(
        f"- layer {t['layer']}, {t['position']}: recovery {t['recovery']:.3f}" for t in top))
    lo, hi = _range(head_recovery)
    report.heatmap("heads", head_recovery, rows, [f"head {h}" for h in range(heads.shape[1])],
                   "Recovery per layer and head", title="Recovery when one head's output (all positions) is restored",
                   xlabel="head", ylabel="layer", colorbar="recovery of the clean score", vmin=lo, vmax=hi)
    report.table("heads", ["layer", "head", "score", "recovery"],
                 [[i, h, float(heads[i, h]), float(head_recovery[i, h])] for i in range(layers)
                  for h in range(heads.shape[1])], show=False)
    report.table("pairs", list(pairs[0]), [list(p.values()) for p in pairs], show=False)
    return report.write()
