"""``eval.py mode=cross_modal_ablation``: how much the answer needs each modality (Frank et al., EMNLP 2021).

Frank, Bugliarello and Elliott ("Vision-and-Language or Vision-for-Language?") ablate one modality's input
at test time and measure how much the model's predictions suffer. Here, on the task head:

- **visual ablation** (``vision:<encoder>``, ``vision:all``): the encoder's tokens are all replaced by its
  dataset-mean token (every token of every image of the split, one vector per encoder), positions and
  sequence layout kept, so only the image-specific content is gone. The change it makes is the model's
  *vision-for-language* use: how much the language task (answering the question) relies on the image;
- **text ablation** (``text``): every real text token except [CLS]/[SEP] becomes [MASK] (the attention
  mask is unchanged); the change is the *language-for-vision* use: how much the answer about the image
  relies on the words;
- ``vision:all+text``: both at once.

With the LM head (``training=lm``) the text the answer reads is the prompt: ``text`` replaces each question's
text by a filler token (``analysis.cross_modal_ablation.text_filler``; default the LM tokenizer's unknown
token, else its padding token), once per LM token the question takes in its prompt, so the prompt template
(``Question: ... Answer:``) stays and the question's words are gone; a fuser that reads the text (gated) also
gets the [MASK]ed word pieces. The loss is the LM's teacher-forced answer loss, the metric the module's own
answers (generated, or ranked over the task's answers).

Each condition is one pass over the split; the table gives the task metric and loss and their change
against the unablated model (metric: ablated - unablated, negative = the model needs that input; loss:
ablated - unablated, positive = the model needs it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from fusion.analysis.common import (
    AnalysisContext,
    Batch,
    evaluate,
    mask_text,
    mean_tokens,
    new_report,
    open_analysis,
    question_prior_accuracy,
    with_features,
)

CLEAN = "none"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Entry point of ``eval.py mode=cross_modal_ablation``; returns what ``results.json`` holds."""
    with open_analysis(cfg, "cross_modal_ablation") as ctx:
        return cross_modal_ablation(ctx)


def text_filler(ctx: AnalysisContext) -> str:
    """The LM token a question's tokens become (``analysis.cross_modal_ablation.text_filler``, else the LM
    tokenizer's unknown token, else its padding token); it must be one token of the LM's vocabulary."""
    tokenizer = ctx.model.head.tokenizer
    filler = ctx.settings.get("text_filler") or tokenizer.unk_token or tokenizer.pad_token
    if not filler:
        raise ValueError("the LM's tokenizer has neither an unknown nor a padding token to ablate the question with; "
                         "set analysis.cross_modal_ablation.text_filler=<one token of the LM>")
    lengths = [len(tokenizer(str(filler) * n, add_special_tokens=False)["input_ids"]) for n in (1, 2, 3)]
    if lengths != [1, 2, 3]:
        raise ValueError(f"analysis.cross_modal_ablation.text_filler={filler!r}: 1, 2 and 3 of it in a row are "
                         f"{lengths} tokens of the LM's tokenizer; choose one token that does not merge with itself "
                         "(a special token such as the padding token)")
    return str(filler)


def ablate_questions(ctx: AnalysisContext, batch: Batch, filler: str) -> Batch:
    """``batch`` whose questions (the LM head's prompts) are ``filler`` once per LM token the question takes in
    its prompt: the prompt template stays, the question's words are gone."""
    counts = ctx.model.question_token_counts(batch["questions"])
    return {**batch, "questions": [filler * n for n in counts]}


def conditions(ctx: AnalysisContext) -> dict[str, Callable[[Batch], Batch]]:
    """Condition name -> the batch transform that ablates it (``none``: the batch unchanged)."""
    model = ctx.model
    tokenizer = model.text.tokenizer
    # The text encoder's word pieces: what the classifier reads, and the LM head's fuser when it reads text.
    masks_pieces = not ctx.lm or model.fusion.fuser.uses_text
    if masks_pieces and tokenizer.mask_token_id is None:
        raise ValueError(
            f"the text tokenizer of {model.text.name_or_path!r} has no [MASK] token to ablate the text with"
        )
    special = [i for i in tokenizer.all_special_ids if i != tokenizer.mask_token_id]
    filler = text_filler(ctx) if ctx.lm else None
    means = mean_tokens(ctx)

    def text(batch: Batch) -> Batch:
        if masks_pieces:
            batch = mask_text(batch, tokenizer.mask_token_id, special)
        return batch if filler is None else ablate_questions(ctx, batch, filler)

    out: dict[str, Callable[[Batch], Batch]] = {CLEAN: lambda b: b}
    for name in ctx.encoder_names:
        out[f"vision:{name}"] = lambda b, name=name: with_features(model, b, {name: means[name]})
    out["vision:all"] = lambda b: with_features(model, b, means)
    out["text"] = text
    out["vision:all+text"] = lambda b: text(with_features(model, b, means))
    return out


def cross_modal_ablation(ctx: AnalysisContext) -> dict[str, Any]:
    """Evaluate every condition, write the report, return the results."""
    metric = ctx.task.metric_name
    evaluated = {name: evaluate(ctx, transform=fn) for name, fn in conditions(ctx).items()}
    clean = evaluated[CLEAN]
    changes = {
        name: {"metric_change": v[metric] - clean[metric], "loss_change": v["loss"] - clean["loss"]}
        for name, v in evaluated.items()
        if name != CLEAN
    }
    summary = {
        "vision_for_language": {"all": changes["vision:all"]}
        | {n: changes[f"vision:{n}"] for n in ctx.encoder_names},
        "language_for_vision": changes["text"],
    }
    baselines = {"majority": ctx.task.majority_accuracy(ctx.split),
                 "question_prior": question_prior_accuracy(ctx.task, ctx.split)}

    report = new_report(ctx, f"Cross-modal input ablation ({ctx.task.name}, {ctx.split})")
    report.results.update({"conditions": evaluated, "changes": changes, "summary": summary, "baselines": baselines})
    if ctx.lm:
        filler = text_filler(ctx)
        masked = ctx.model.fusion.fuser.uses_text
        report.results["text_ablation"] = {"filler": filler, "fuser_text_masked": masked}
        how = (f"`text` replaces the question in the LM's prompt by `{filler}` once per LM token it takes (the "
               "prompt template kept)" + (" and the fuser's word pieces by [MASK]" if masked else ""))
    else:
        how = "`text` replaces every word piece by [MASK]"
    report.text(
        f"Task `{metric}` and loss over {int(clean['n'])} examples with one modality's input ablated (Frank et "
        "al., 2021): `vision:<encoder>` replaces that encoder's tokens by its dataset-mean token (positions "
        f"kept), {how}. Vision-for-language = the change when the image is "
        "ablated, language-for-vision = the change when the text is. Image-blind baselines: "
        + ", ".join(f"{k} {v:.4f}" for k, v in baselines.items() if v is not None)
        + "."
    )
    rows = [
        [name, v[metric], v["loss"], changes.get(name, {}).get("metric_change", 0.0),
         changes.get(name, {}).get("loss_change", 0.0)]
        for name, v in evaluated.items()
    ]
    report.table("conditions", ["condition", metric, "loss", f"{metric}_change", "loss_change"], rows)
    report.figure("changes", _chart(changes, metric, ctx.task.name), f"Change in {metric} and loss per ablation")
    return report.write()


def _chart(changes: dict[str, dict[str, float]], metric: str, task: str) -> Any:
    """Two panels of horizontal bars, one bar per ablation: the metric change and the loss change."""
    from matplotlib.figure import Figure

    names = list(changes)[::-1]
    fig = Figure(figsize=(10, 1.4 + 0.45 * len(names)), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, label in ((axes[0], "metric_change", f"{metric} change"), (axes[1], "loss_change", "loss change")):
        values = [changes[n][key] for n in names]
        colors = ["tab:green" if n.startswith("vision") and "text" not in n else
                  "tab:purple" if n == "text" else "tab:gray" for n in names]
        bars = ax.barh(range(len(names)), values, color=colors)
        ax.bar_label(bars, labels=[f"{v:+.3f}" for v in values], padding=3, fontsize=8)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlabel(f"{label} (ablated - unablated)")
        ax.margins(x=0.25)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].set_ylabel("ablated input")
    fig.suptitle(f"{task}: cross-modal input ablation (green: vision-for-language, purple: language-for-vision)")
    return fig
