"""``eval.py mode=causal_trace`` with the LM head (``training=lm``): the pairs of :mod:`.causal_trace` traced
through the LM's decoder layers.

The score is the probability of the clean run's answer (its tokens + EOS under teacher forcing; for a closed-set
task its share of the rank-classification softmax); positions are the LM's (``[BOS]``, visual tokens,
``prompt <i>``, ``answer <i>``; each row left-padded, so a position is found per row); heads are restored at the
input of each attention's output projection. The restore loop, its exactness checks and the report are
:mod:`.tracing`'s, as for the fusion transformer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from fusion.analysis.common import AnalysisContext, Batch
from fusion.analysis.pairs import make_pairs, select
from fusion.analysis.tracing import Tally, finish
from fusion.fusers.groups import ANSWER_GROUP, MIXED_GROUP, PAD_GROUP
from fusion.model.transformer import CLS_GROUP, TEXT_GROUP

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
    layers, heads = model.lm_attention_shape
    num_images = ctx.task.images_per_example
    tally = Tally.start(ctx, layers, heads)
    patcher = LMPatcher(ctx)

    def probability(batch: Batch, fused: Any, answers: list[str]) -> tuple[torch.Tensor, Any, torch.Tensor]:
        return model.answer_probability(fused, model.prompts(batch), answers)

    def per_example(values: torch.Tensor, example: torch.Tensor, size: int) -> torch.Tensor:
        """(rows,) bool -> (size,) bool: any row of the example."""
        counts = torch.zeros(size, device=values.device).index_add_(0, example, values.float())
        return counts > 0

    try:
        for batch in ctx.batches():
            if tally.full:
                break
            clean, corrupted, rows = make_pairs(ctx, batch, tally.corrupter)
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
                tally.candidates += int(rows.sum())
                moved = torch.tensor([a != b for a, b in zip(answers, answers_corr, strict=True)], device=rows.device)
                tally.changed += int((rows & moved).sum())
                rows &= (s_clean - s_corr) > tally.min_effect
            rows = rows.nonzero().flatten()[: tally.max_pairs - len(tally.pairs)]
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
            none = torch.full((len(columns),), -1, dtype=torch.long, device=inputs.groups.device)
            positions = []
            for label in labels:
                cols = torch.tensor([row.get(label, -1) for row in columns], device=none.device)
                positions.append((label, cols, per_example(cols >= 0, example, size).double()))
            tally.restore_layers(patcher, partial(probability, corrupted, fused_corr, answer), s_clean, s_corr,
                                 every=None, none=none, positions=positions)
            tally.add_pairs(clean["question_ids"], answer, s_clean, s_corr)
    finally:
        patcher.close()
    return finish(ctx, tally, _lm_order)
