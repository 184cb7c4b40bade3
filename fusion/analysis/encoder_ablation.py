"""``eval.py mode=encoder_ablation``: the task metric for every non-empty subset of the model's encoders.

VE-dropout at inference (the paper's analysis): each subset is one pass over the split with the other
encoders named in ``drop_encoders`` (their tokens invisible to every query; inside the fuser for fusers
that mix encoders). The fusers refuse a sample with no encoder at all, so the "no encoder" row replaces
every encoder's tokens by that encoder's dataset-mean token (as ``cross_modal_ablation`` does): the model
then sees the text and an image-independent visual input. It is set against two baselines that never
look at the image: the majority answer and the question prior (each question's most frequent training
answer).

With the LM head (``training=lm``) a dropped encoder's visual tokens are removed from the LM's input (the
fuser's ``visible`` mask, as VE-dropout trains it) and the answers are the module's own: generated for
open-ended tasks, ranked over the task's answers otherwise, so the all-encoder row is eval.py's metric.

Marginal contributions per encoder ``e`` (``f`` the metric, ``A`` all encoders, ``S`` ranging over the
subsets of the other encoders, the empty one meaning the "no encoder" row):

- ``drop_when_removed`` = ``f(A) - f(A - {e})``: what the full model loses without ``e`` alone;
- ``mean_gain_when_added`` = mean over ``S`` of ``f(S + {e}) - f(S)``;
- ``shapley`` = the same gains weighted by ``|S|! (n - |S| - 1)! / n!``; they sum to ``f(A) - f(none)``.

Per example (``masking`` in results.json, ``masking.csv``): for each encoder ``e``, the share of the
split's examples whose answer changes when ``e`` alone is masked (``A - {e}`` against ``A``), and the shares
whose score (the task's per-answer score, :func:`~fusion.analysis.common.answer_score`: a generated answer
outside the answer list is scored by the task's metric) rises (masking helps: redundancy or harm) or falls;
``helped_ids`` lists up to 20 of the helped examples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig

from fusion.analysis.common import (
    AnalysisContext,
    answer_index,
    answer_score,
    evaluate,
    keep_only,
    mean_tokens,
    new_report,
    open_analysis,
    question_prior_accuracy,
    subsets,
    with_features,
)

NONE = "none (mean tokens)"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Entry point of ``eval.py mode=encoder_ablation``; returns what ``results.json`` holds."""
    with open_analysis(cfg, "encoder_ablation") as ctx:
        return encoder_ablation(ctx)


def subset_name(subset: Sequence[str]) -> str:
    return "+".join(subset) if subset else NONE


def marginal_contributions(names: Sequence[str], score: dict[frozenset[str], float]) -> dict[str, dict[str, float]]:
    """Per encoder: drop when removed, mean gain when added, Shapley value, from ``score`` of every subset
    (the empty frozenset included)."""
    n = len(names)
    everything = frozenset(names)
    out = {}
    for e in names:
        others = [o for o in names if o != e]
        gains, shapley = [], 0.0
        for r in range(len(others) + 1):
            weight = math.factorial(r) * math.factorial(n - r - 1) / math.factorial(n)
            for rest in _combinations(others, r):
                gain = score[rest | {e}] - score[rest]
                gains.append(gain)
                shapley += weight * gain
        out[e] = {
            "drop_when_removed": score[everything] - score[everything - {e}],
            "mean_gain_when_added": sum(gains) / len(gains),
            "shapley": shapley,
        }
    return out


def _combinations(names: Sequence[str], r: int) -> list[frozenset[str]]:
    from itertools import combinations

    return [frozenset(c) for c in combinations(names, r)]


def encoder_ablation(ctx: AnalysisContext) -> dict[str, Any]:
    """Evaluate every subset, write the report, return the results."""
    names, task, metric = ctx.encoder_names, ctx.task, ctx.task.metric_name
    evaluated: dict[str, dict[str, float]] = {}
    score: dict[frozenset[str], float] = {}
    answers: dict[str, dict[str, str]] = {}
    for subset in subsets(names):
        chosen = answers.setdefault(subset_name(subset), {})

        def keep_answers(batch: dict[str, Any], scored: Any, chosen: dict[str, str] = chosen) -> None:
            chosen.update(zip(map(str, batch["question_ids"]), scored.answers, strict=True))

        with keep_only(ctx.model, subset):
            values = evaluate(ctx, on_output=keep_answers)
        evaluated[subset_name(subset)] = values
        score[frozenset(subset)] = values[metric]
    means = mean_tokens(ctx)
    evaluated[NONE] = evaluate(ctx, transform=lambda b: with_features(ctx.model, b, means))
    score[frozenset()] = evaluated[NONE][metric]
    baselines = {
        "majority": task.majority_accuracy(ctx.split),
        "question_prior": question_prior_accuracy(task, ctx.split),
    }
    marginal = marginal_contributions(names, score)
    examples = {str(e.question_id): e for e in task.examples(ctx.split)}
    index = answer_index(task)
    masking = masking_changes(names, answers, lambda qid, a: answer_score(task, examples[qid], a, index))

    report = new_report(ctx, f"Encoder ablation ({task.name}, {ctx.split})")
    report.results.update({"subsets": evaluated, "baselines": baselines, "marginal": marginal, "masking": masking})
    full = subset_name(names)
    report.text(
        f"`{metric}` of the model with only the listed encoders visible (the others dropped with VE-dropout's "
        f"`drop_encoders`), over {int(evaluated[full]['n'])} examples. `{NONE}`: every encoder's tokens "
        "replaced by its dataset-mean token. Baselines that never see the image: "
        + ", ".join(f"{k} {v:.4f}" for k, v in baselines.items() if v is not None)
        + "."
    )
    keys = [k for k in evaluated[full] if k != "n"]
    rows = [[name, len(name.split("+")) if name != NONE else 0, *(values[k] for k in keys)]
            for name, values in evaluated.items()]
    report.table("subsets", ["subset", "num_encoders", *keys], rows)
    report.figure("subsets", _bar_chart(evaluated, metric, baselines, task.name), f"{metric} per encoder subset")
    report.text(
        "Marginal contributions: `drop_when_removed` = full model minus the model without the encoder; "
        "`mean_gain_when_added` = mean gain over the subsets of the other encoders (the empty one = `none`); "
        "`shapley` = the Shapley-weighted gain (the values sum to full minus `none`)."
    )
    parts = ["drop_when_removed", "mean_gain_when_added", "shapley"]
    report.table("marginal", ["encoder", *parts], [[e, *(marginal[e][p] for p in parts)] for e in names])
    caption = f"Marginal contribution of each encoder to {metric}"
    report.figure("marginal", _marginal_chart(marginal, names, metric), caption)
    report.text(
        "Per example, each encoder masked alone: `changed` = share of examples whose answer differs from the "
        "full model's; `helped` / `hurt` = share whose score rises / falls (over the scored examples)."
    )
    shares = ["changed", "helped", "hurt", "n", "n_scored"]
    report.table("masking", ["encoder", *shares], [[e, *(masking[e][k] for k in shares)] for e in names])
    return report.write()


def masking_changes(
    names: Sequence[str], answers: dict[str, dict[str, Any]], score: Any
) -> dict[str, dict[str, Any]]:
    """Per encoder ``e``: how the answers of ``A - {e}`` differ from ``A``'s, example by example.

    ``answers``: {subset name: {question id: answer (its string, or index)}}; ``score(question_id, answer)``:
    the example's score of that answer, None if it is not scored. ``changed`` is over every example, ``helped`` and
    ``hurt`` over the scored ones (None without any).
    """
    full = answers[subset_name(names)]
    out: dict[str, dict[str, Any]] = {}
    for e in names:
        if len(names) == 1:
            break  # masking the only encoder is the "none" row, not a subset the fusers accept
        without = answers[subset_name([x for x in names if x != e])]
        changed = helped = hurt = scored = 0
        helped_ids: list[str] = []
        for qid, answer in full.items():
            other = without[qid]
            changed += other != answer
            before, after = score(qid, answer), score(qid, other)
            if before is None or after is None:
                continue
            scored += 1
            if after > before:
                helped += 1
                if len(helped_ids) < 20:
                    helped_ids.append(qid)
            hurt += after < before
        n = len(full)
        out[e] = {
            "changed": changed / n if n else None,
            "helped": helped / scored if scored else None,
            "hurt": hurt / scored if scored else None,
            "n": n,
            "n_scored": scored,
            "helped_ids": helped_ids,
        }
    return out


def _bar_chart(
    evaluated: dict[str, dict[str, float]], metric: str, baselines: dict[str, float | None], task: str
) -> Any:
    """Horizontal bars, one per subset (largest subsets on top), with the image-blind baselines as lines."""
    from matplotlib.figure import Figure

    names = list(evaluated)[::-1]
    values = [evaluated[n][metric] for n in names]
    fig = Figure(figsize=(7.5, 1.2 + 0.42 * len(names)), layout="constrained")
    ax = fig.add_subplot()
    colors = ["tab:gray" if n == NONE else "tab:blue" for n in names]
    bars = ax.barh(range(len(names)), values, color=colors)
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], padding=3, fontsize=8)
    ax.set_yticks(range(len(names)), names)
    styles = {"majority": ("tab:red", "--"), "question_prior": ("tab:orange", ":")}
    for key, value in baselines.items():
        if value is not None:
            color, style = styles[key]
            ax.axvline(value, color=color, linestyle=style, label=f"{key.replace('_', ' ')} ({value:.3f})")
    ax.set_xlim(0, max([*values, *(v for v in baselines.values() if v is not None)]) * 1.15)
    ax.set_xlabel(metric)
    ax.set_ylabel("encoders visible")
    ax.set_title(f"{task}: {metric} per encoder subset (VE-dropout at inference)")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def _marginal_chart(marginal: dict[str, dict[str, float]], names: Sequence[str], metric: str) -> Any:
    """Grouped bars: per encoder, its drop when removed, mean gain when added and Shapley value."""
    from matplotlib.figure import Figure

    parts = ["drop_when_removed", "mean_gain_when_added", "shapley"]
    fig = Figure(figsize=(2.0 + 1.6 * len(names), 4.0), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(parts)
    for i, part in enumerate(parts):
        xs = [j + (i - 1) * width for j in range(len(names))]
        bars = ax.bar(xs, [marginal[e][part] for e in names], width, label=part.replace("_", " "))
        ax.bar_label(bars, labels=[f"{marginal[e][part]:+.3f}" for e in names], fontsize=7, padding=2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)), list(names))
    ax.set_xlabel("encoder")
    ax.set_ylabel(f"change in {metric}")
    ax.set_title(f"Marginal contribution of each encoder to {metric}")
    ax.legend(fontsize=8)
    return fig
