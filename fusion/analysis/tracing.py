"""What causal tracing shares between the fusion transformer (:mod:`.causal_trace`) and the LM head
(:mod:`.causal_trace_lm`): the settings and pairs of a trace, the restore loop over layers with its three
exactness checks and its sums over the traced pairs (:class:`Tally`), and the report (recovery heatmaps and
tables) written from those sums.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fusion.analysis.common import AnalysisContext, new_report
from fusion.analysis.pairs import Corrupter

Order = Callable[[Sequence[str], Sequence[str]], list[str]]
"""``order(labels, encoder_names)``: the position labels in sequence order, for the report's rows."""


class Restorer(Protocol):
    """A patcher (:class:`~fusion.analysis.causal_trace.Patcher`, :class:`~fusion.analysis.causal_trace_lm.LMPatcher`):
    ``action`` = ``("positions", layer, columns)``, ``("heads", layer, heads)``, ``("attn", layer, None)`` or None."""

    action: tuple[str, int, Any] | None


@dataclass
class Tally:
    """One trace's settings and its sums over the traced pairs (means are taken once, in :func:`finish`).

    ``pos_sum``: label -> (4, layers) float64, over the pairs that have the position: the patched, clean and
    corrupted scores and the pair count; ``head_sum`` (layers, heads); ``layer_all`` / ``layer_none`` /
    ``layer_attn`` (layers,): every position, none, the attention output restored; ``exact``: restoring every
    position gave the clean scores bitwise, none the corrupted ones, all heads the attention output's.
    """

    layers: int
    heads: int
    max_pairs: int
    min_effect: float
    questions: dict[str, str]
    corrupter: Corrupter | None
    pos_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    exact: dict[str, bool] = field(default_factory=lambda: {"all": True, "none": True, "heads": True})
    clean_sum: float = 0.0
    corrupt_sum: float = 0.0
    pairs: list[dict[str, Any]] = field(default_factory=list)
    candidates: int = 0  # pairs before the min_effect filter
    changed: int = 0  # ... of them where the corruption changes the model's answer

    def __post_init__(self) -> None:
        self.head_sum = torch.zeros(self.layers, self.heads, dtype=torch.float64)
        self.layer_all, self.layer_none, self.layer_attn = (
            torch.zeros(self.layers, dtype=torch.float64) for _ in range(3))

    @classmethod
    def start(cls, ctx: AnalysisContext, layers: int, heads: int) -> Tally:
        """A tally for ``layers`` x ``heads`` with ``analysis.causal_trace``'s settings and corruption."""
        settings = ctx.settings
        return cls(
            layers, heads, max_pairs=int(settings.get("max_pairs", 64)),
            min_effect=float(settings.get("min_effect", 0.02)),
            questions={e.question_id: e.question for e in ctx.task.examples(ctx.split)},
            corrupter=Corrupter(ctx) if str(settings.get("corrupt", "text")) == "text" else None,
        )

    @property
    def full(self) -> bool:
        return len(self.pairs) >= self.max_pairs

    def restore_layers(self, patcher: Restorer, score: Callable[[], tuple[torch.Tensor, ...]], s_clean: torch.Tensor,
                       s_corr: torch.Tensor, every: Any, none: Any,
                       positions: Sequence[tuple[str, Any, torch.Tensor]]) -> None:
        """Run the corrupted input again (``score()[0]``: (B,) scores under ``patcher.action``) with, in each layer,
        every position restored (``every``: the patcher's columns for all; must give ``s_clean`` bitwise), none
        (``none``; must give ``s_corr``), each of ``positions`` (label, columns, (B,) float64: 1 where the row
        has that position), each head, the whole attention output, and all heads at once (must equal it)."""
        for layer in range(self.layers):
            patcher.action = ("positions", layer, every)
            restored = score()[0]
            self.exact["all"] &= bool(torch.equal(restored, s_clean))
            self.layer_all[layer] += float(restored.sum())
            patcher.action = ("positions", layer, none)
            restored = score()[0]
            self.exact["none"] &= bool(torch.equal(restored, s_corr))
            self.layer_none[layer] += float(restored.sum())
            for label, columns, real in positions:
                patcher.action = ("positions", layer, columns)
                s = score()[0]
                sums = self.pos_sum.setdefault(label, torch.zeros(4, self.layers, dtype=torch.float64))
                sums[:, layer] += (torch.stack([s, s_clean, s_corr, torch.ones_like(s)]).double() @ real).cpu()
            for h in range(self.heads):
                patcher.action = ("heads", layer, [h])
                self.head_sum[layer, h] += float(score()[0].sum())
            patcher.action = ("attn", layer, None)
            s_attn = score()[0]
            self.layer_attn[layer] += float(s_attn.sum())
            patcher.action = ("heads", layer, range(self.heads))
            self.exact["heads"] &= bool(torch.equal(score()[0], s_attn))
            patcher.action = None

    def add_pairs(self, question_ids: Sequence[str], answers: Sequence[str], s_clean: torch.Tensor,
                  s_corr: torch.Tensor) -> None:
        """Record the traced pairs (clean answer and both scores, (B,)) and add their scores to the sums."""
        self.clean_sum += float(s_clean.sum())
        self.corrupt_sum += float(s_corr.sum())
        for i, qid in enumerate(question_ids):
            pair = {"question_id": qid, "question": self.questions[qid]}
            if self.corrupter is not None:
                pair["corrupted_question"] = self.corrupter(qid)
            self.pairs.append({**pair, "answer": answers[i], "clean_score": float(s_clean[i]),
                               "corrupted_score": float(s_corr[i])})


def finish(ctx: AnalysisContext, tally: Tally, order: Order) -> dict[str, Any]:
    """Means over the traced pairs (refused without any), then the report."""
    n = len(tally.pairs)
    if n == 0:
        raise ValueError(f"no pair found whose corruption lowers the clean answer's score by more than min_effect="
                         f"{tally.min_effect}: {tally.candidates} candidate pairs, the model's answer changed on "
                         f"{tally.changed}; lower analysis.causal_trace.min_effect (e.g. 0, or -1 for every pair) or "
                         "check analysis.causal_trace.corrupt / pairs / swaps")
    restored = {"all": (tally.layer_all / n).tolist(), "none": (tally.layer_none / n).tolist(),
                "attn": (tally.layer_attn / n).tolist()}
    counts = {"candidate_pairs": tally.candidates, "answer_changed": tally.changed,
              "answer_changed_share": tally.changed / tally.candidates if tally.candidates else 0.0}
    return _report(ctx, tally.pairs, tally.clean_sum / n, tally.corrupt_sum / n, restored, tally.exact,
                   tally.pos_sum, tally.head_sum / n, counts, order)


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
            counts: dict[str, Any], order: Order) -> dict[str, Any]:
    layers = heads.shape[0]
    labels = order(list(pos_sum), ctx.encoder_names)
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
