"""``eval.py mode=attention``: attention-over-encoder statistics over a whole split, ranked and split by type.

One pass over the split with the model's own attention read-out (``output_attentions=True``), every
encoder visible. The per-layer/per-head masses are
:class:`fusion.monitoring.attention_stats.AttentionOverEncoders`, the same statistic training logs: for the
[CLS] query and the mean over each sample's real text queries, the share of attention that goes to each
encoder's tokens (``fused`` for tokens that mix encoders), to the text and to [CLS]. The report adds

- heatmaps layers x groups and (layer, head) x groups for both query kinds,
- heads ranked by cross-modal mass: the text queries' mass on image tokens (all encoders and ``fused``),
  i.e. which heads read the image for the words and which stay within the text,
- the same statistics per answer type (``analysis.attention.split_by: answer_type``) or per gold label
  (``label``); ``auto`` takes answer types when the task has them, else labels: a heatmap value x groups
  (mean over layers and heads) and one per layer (layers x groups, one panel per value, mean over heads).

Every heatmap's matrix is in results.json under ``figures.<figure name>``.

With the LM head (``training=lm``) the statistic is the LM's own,
:class:`fusion.monitoring.attention_stats.LMAttentionOverEncoders` over its decoder layers in the teacher-forced
pass eval.py reads (the labelled examples, their gold answer after the prompt): the query kinds are
:data:`~fusion.monitoring.attention_stats.LM_QUERY_KINDS` (the mean over each sample's prompt queries, and its
first answer token's query), the groups each encoder, ``fused``, ``prompt``, ``answer`` and ``bos``; heads are
ranked by the prompt queries' mass on image tokens. ``queries`` in results.json names the query kinds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from torchmetrics import Metric

from fusion.analysis.common import AnalysisContext, Batch, evaluate, new_report, open_analysis
from fusion.fusers.groups import CLS_NAME, PROMPT_NAME, TEXT_NAME
from fusion.monitoring.attention_stats import QUERY_KINDS, stats_rows
from fusion.training.module import ScoredBatch


def run(cfg: DictConfig) -> dict[str, Any]:
    """Entry point of ``eval.py mode=attention``; returns what ``results.json`` holds."""
    with open_analysis(cfg, "attention") as ctx:
        return attention(ctx)


def _new_stats(ctx: AnalysisContext) -> Metric:
    """The model's own attention-over-encoder statistic (the fusion transformer's, or the LM head's)."""
    return ctx.model.attention_statistics()


def split_key(ctx: AnalysisContext) -> str | None:
    """What the statistics are split by: ``answer_type``, ``label`` or None (``analysis.attention.split_by``)."""
    choice = str(ctx.settings.get("split_by", "auto"))
    if choice == "auto":
        return "answer_type" if ctx.task.answer_types else "label"
    if choice in ("none", "null", "None"):
        return None
    if choice not in ("answer_type", "label"):
        raise ValueError(f"analysis.attention.split_by={choice!r}; allowed: auto, answer_type, label, none")
    if choice == "answer_type" and not ctx.task.answer_types:
        raise ValueError(f"task {ctx.task.name!r} has no answer types; use analysis.attention.split_by=label")
    return choice


def collect(ctx: AnalysisContext, by: str | None) -> tuple[Metric, dict[str, Metric], dict[str, float]]:
    """One pass over the split: overall statistics, statistics per value of ``by``, and the task metric."""
    overall = _new_stats(ctx)
    parts: dict[str, Metric] = {}
    types = ctx.task.answer_types

    def name_of(index: int) -> str:
        if by == "answer_type":
            return types[index] if index < len(types) else str(index)
        return ctx.task.answers[index] if 0 <= index < ctx.task.num_classes else "unlabelled"

    def update(batch: Batch, scored: ScoredBatch) -> None:
        ctx.model.update_attention_statistics(overall, scored)
        if by is None:
            return
        values = batch["answer_types"] if by == "answer_type" else batch["labels"]
        for value in values.unique().tolist():
            rows = values == value  # (B,) the samples of this answer type / label
            part = parts.setdefault(name_of(int(value)), _new_stats(ctx))
            ctx.model.update_attention_statistics(part, scored, rows)

    metrics = evaluate(ctx, on_output=update, output_attentions=True)
    return overall, dict(sorted(parts.items())), metrics


def image_groups(groups: list[str], encoder_names: list[str]) -> list[int]:
    """Indices of the groups that are image tokens: every encoder, and ``fused``."""
    return [i for i, g in enumerate(groups) if g in encoder_names or g == "fused"]


def ranked_query(query_kinds: Sequence[str]) -> str:
    """The query kind heads are ranked by: the text queries' (``text``; the LM head's ``prompt``)."""
    return next((q for q in (TEXT_NAME, PROMPT_NAME) if q in query_kinds), query_kinds[-1])


def rank_heads(
    stats: torch.Tensor, groups: list[str], encoder_names: list[str], query_kinds: Sequence[str] = QUERY_KINDS
) -> list[dict[str, Any]]:
    """Per (layer, head) and query kind the mass on image tokens (every encoder and ``fused``) and on each other
    group (``{query}_to_image``, ``{query}_to_{group}``: text and [CLS]; the LM head's prompt, answer and BOS),
    ranked by the text queries' image mass (cross-modal; :func:`ranked_query`), highest first. ``stats``
    ``(Q, L, H, G)`` in the order of ``query_kinds``."""
    image = image_groups(groups, encoder_names)
    others = [(i, g) for i, g in enumerate(groups) if i not in image]
    rows = []
    for layer in range(stats.shape[1]):
        for head in range(stats.shape[2]):
            row: dict[str, Any] = {"layer": layer, "head": head}
            for qi, query in enumerate(query_kinds):
                mass = stats[qi, layer, head]
                row[f"{query}_to_image"] = float(mass[image].sum())
                for gi, group in others:
                    row[f"{query}_to_{group}"] = float(mass[gi])
            rows.append(row)
    key = f"{ranked_query(query_kinds)}_to_image"
    rows.sort(key=lambda r: -r[key])
    for rank, row in enumerate(rows):
        row["rank"] = rank + 1
    return rows


def samples(stats: Metric) -> int:
    """How many samples a statistic has counted: every sample ([CLS] queries), the LM's labelled ones (prompt
    queries of the teacher-forced pass)."""
    count = getattr(stats, "cls_count", None)
    return int(count if count is not None else stats.prompt_count)


def attention(ctx: AnalysisContext) -> dict[str, Any]:
    """Collect the statistics, write the report, return the results."""
    by = split_key(ctx)
    overall, parts, metrics = collect(ctx, by)
    groups, queries = overall.group_names, list(overall.query_kinds)
    stats = overall.compute()  # (2, L, H, G)
    L, H = stats.shape[1], stats.shape[2]
    heads = rank_heads(stats, groups, ctx.encoder_names, queries)
    by_part = {name: (part.compute(), samples(part)) for name, part in parts.items()}

    report = new_report(ctx, f"Attention over encoders ({ctx.task.name}, {ctx.split})")
    report.results.update(
        {
            "groups": groups,
            "queries": queries,
            "num_layers": L,
            "num_heads": H,
            "metrics": metrics,
            **{query: stats[qi].tolist() for qi, query in enumerate(queries)},
            "heads": heads,
            "split_by": by,
            "by": {
                name: {"n": n, **{q: s[qi].tolist() for qi, q in enumerate(queries)}}
                for name, (s, n) in by_part.items()
            },
        }
    )
    # Mass grows with a group's token count: say how many tokens each encoder contributes per image.
    token_encoder = ctx.model.fusion.fuser.token_encoder.cpu()
    tokens = {n: int((token_encoder == i).sum()) for i, n in enumerate(ctx.encoder_names)}
    report.results["tokens_per_image"] = tokens
    report.text(
        "Visual tokens per image (a group's mass grows with its token count): "
        + ", ".join(f"`{n}` {t}" for n, t in tokens.items())
        + (f", `fused` {int((token_encoder < 0).sum())}" if ctx.model.fusion.mixes_encoders else "")
        + "."
    )
    if ctx.lm:
        report.text(
            f"Mean attention mass in the LM's layers over the {samples(overall)} labelled of {int(metrics['n'])} "
            f"examples (every encoder visible; {ctx.task.metric_name} {metrics[ctx.task.metric_name]:.4f}), in the "
            "teacher-forced pass (gold answer after the prompt), from the prompt queries (mean over each sample's "
            "prompt tokens) and from the first answer token's query to each encoder's visual tokens, the prompt, "
            "the answer and BOS; each (query, layer, head) row sums to 1. `results.json` holds `prompt` and "
            "`answer` as [layer][head][group] with `groups` in order."
        )
    else:
        report.text(
            f"Mean attention mass over {int(metrics['n'])} examples (every encoder visible; {ctx.task.metric_name} "
            f"{metrics[ctx.task.metric_name]:.4f}) from the [CLS] query and from the text queries (mean over each "
            "sample's real tokens) to each encoder's tokens, the text and [CLS]; each (query, layer, head) row "
            "sums to 1. `results.json` holds `cls` and `text` as [layer][head][group] with `groups` in order."
        )
    layers = [f"layer {i}" for i in range(L)]
    for qi, query in enumerate(queries):
        report.heatmap(f"{query}_layers", stats[qi].mean(1), layers, groups,
                       f"{_label(query)}: attention mass per layer and key group",
                       title=f"Attention mass from {_label(query)} per layer (mean over heads)", xlabel="key group",
                       ylabel="layer", colorbar="attention mass")
        report.heatmap(f"{query}_heads", stats[qi].flatten(0, 1), [f"L{i} H{h}" for i in range(L) for h in range(H)],
                       groups, f"{_label(query)}: attention mass per head and key group",
                       title=f"Attention mass from {_label(query)} per head", xlabel="key group",
                       ylabel="layer, head", colorbar="attention mass")
    rows = stats_rows(stats, groups, query_kinds=queries)
    report.table("attention", list(rows[0]), [list(r.values()) for r in rows], show=False)

    top = int(ctx.settings.get("top_heads", 5))
    columns = ["rank", "layer", "head", *(k for k in heads[0] if "_to_" in k)]
    ranked = ranked_query(queries)
    report.text(
        f"Heads ranked by cross-modal mass: the {QUERY_NAMES[ranked]}' attention to image tokens (all encoders). "
        f"Top {top} and bottom {top} below; all of them in `heads.csv`."
    )
    report.table("heads", columns, [[r[c] for c in columns] for r in heads], show=False)
    shown = heads if len(heads) <= 2 * top else heads[:top] + heads[-top:]
    report.text(_markdown_rows(columns, shown))
    caption = f"Heads ranked by the {QUERY_NAMES[ranked]}' mass on image tokens"
    report.figure("heads_ranked", _heads_chart(heads, queries), caption)

    if by_part:
        names = list(by_part)
        report.text(f"Split by {by.replace('_', ' ')} (`by` in results.json; n = examples per value).")
        part_rows = []
        for name, (s, n) in by_part.items():
            for qi, query in enumerate(queries):
                part_rows.append([name, n, query, *(float(v) for v in s[qi].mean((0, 1)))])
        report.table(f"by_{by}", [by, "n", "query", *groups], part_rows)
        what = by.replace("_", " ")
        # Per layer from the JSON's own `by` data: the figures are the numbers results.json holds.
        shown = largest_parts(report.results["by"], MAX_PANELS)
        if len(shown) < len(names):
            report.text(f"Per-layer figures: the {len(shown)} most frequent values of {len(names)}.")
        for query in queries:
            values = torch.stack([torch.tensor(report.results["by"][n][query]).mean((0, 1)) for n in names])
            report.heatmap(f"{query}_by_{by}", values, names, groups, f"{_label(query)}: attention mass by {what}",
                           title=f"Attention mass from {_label(query)} by {what} (mean over layers and heads)",
                           xlabel="key group", ylabel=what, colorbar="attention mass")
            report.heatmaps(f"{query}_by_{by}_layers", layer_masses(report.results["by"], query, shown), layers,
                            groups, f"{_label(query)}: attention mass per layer, one panel per {what}",
                            title=f"Attention mass from {_label(query)} per layer and {what} (mean over heads)",
                            xlabel="key group", ylabel="layer", colorbar="attention mass")
    return report.write()


# Panels of a per-layer figure split by answer type / label: a label split has one value per answer.
MAX_PANELS = 12


def largest_parts(by: dict[str, dict[str, Any]], limit: int) -> list[str]:
    """The (at most ``limit``) values of the split with the most examples, in ``by``'s order (results.json's
    ``by``: value -> ``{"n", "cls", "text"}``)."""
    kept = set(sorted(by, key=lambda name: -by[name]["n"])[:limit])
    return [name for name in by if name in kept]


def layer_masses(by: dict[str, dict[str, Any]], query: str, names: list[str]) -> dict[str, torch.Tensor]:
    """Per value of the split in ``names``: the attention mass from ``query`` per layer and key group, mean over
    heads (L, G), from results.json's ``by`` (``[layer][head][group]`` lists)."""
    return {name: torch.tensor(by[name][query]).mean(1) for name in names}


QUERY_LABELS = {CLS_NAME: "[CLS]", TEXT_NAME: "the text tokens", PROMPT_NAME: "the prompt tokens",
                "answer": "the first answer token"}


# Query kinds in the charts and the ranking's text.
QUERY_NAMES = {TEXT_NAME: "text queries", CLS_NAME: "[CLS]", PROMPT_NAME: "prompt queries",
               "answer": "first answer token"}


def _label(query: str) -> str:
    return QUERY_LABELS.get(query, query)


def _markdown_rows(columns: list[str], rows: list[dict[str, Any]]) -> str:
    from fusion.analysis.report import markdown_table

    return markdown_table(columns, [[r[c] for c in columns] for r in rows])


def _heads_chart(heads: list[dict[str, Any]], queries: Sequence[str] = QUERY_KINDS) -> Any:
    """Bars per head (ranked): the image mass of each query kind (the text queries and [CLS]; the LM's prompt
    queries and first answer token)."""
    from matplotlib.figure import Figure

    labels = [f"L{r['layer']} H{r['head']}" for r in heads]
    fig = Figure(figsize=(2.5 + 0.45 * len(heads), 4.0), layout="constrained")
    ax = fig.add_subplot()
    xs = range(len(heads))
    ranked = ranked_query(queries)
    order = [ranked, *(q for q in queries if q != ranked)]  # the ranked query kind's bars first
    width = 0.8 / len(order)
    for i, query in enumerate(order):
        offset = (i - (len(order) - 1) / 2) * width
        ax.bar([x + offset for x in xs], [r[f"{query}_to_image"] for r in heads], width,
               label=f"{QUERY_NAMES.get(query, query)} -> image")
    ax.set_xticks(list(xs), labels, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"head (layer, head), ranked by {QUERY_NAMES[ranked].split()[0]} -> image mass")
    ax.set_ylabel("attention mass on image tokens")
    ax.set_title("Cross-modal heads: attention mass on image tokens (all encoders)")
    ax.legend(fontsize=8)
    return fig
