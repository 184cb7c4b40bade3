"""``eval.py mode=probe``: what each layer's representation encodes, by linear probes (after VALUE, Cao et al. 2020).

The model runs over a fitting split (``analysis.probe.fit_split``, default the task's training split, at most
``max_fit`` examples) and the analysed split; forward hooks on the multimodal transformer's blocks read, at
every depth (``input`` = the embedded sequence, ``layer i`` = block i's output, ``final`` = after the last
norm, what the head reads), the [CLS] state and the mean over the visible tokens. A multinomial logistic
regression (L-BFGS, standardised features) is fitted per (property, depth, representation) on the fitting
split and scored on the analysed split (held out), against the majority class of the fitting split.

Properties: the answer type and the answer (label) where the task has them; which encoders the sample saw
(``random_subsets: true``, default: every sample sees a random non-empty subset of the encoders, as VE-dropout
would give it, so the property exists; all other probes then read such representations too); for the
shapes task the number of shapes and the colour in the top-left cell, read from the image's pixels.

Also each head's modality importance (VALUE): the attention mass the [CLS] and text queries give image
tokens vs text, from the same pass (the model's attention read-out,
``fusion.monitoring.attention_stats.AttentionOverEncoders``).

With the LM head (``training=lm``) the depths are the LM's: the LM runs over each example's visual tokens and
prompt without an answer (what generation starts from; ``LMLitModule.prompt_pass``), and its hidden states are
read at ``input`` (the embedded sequence), ``layer i`` (decoder layer i's output) and ``final`` (the last
layer's output after the LM's final norm, what its output layer reads): the state of the last prompt token
(``last_prompt``, the position whose next-token prediction starts the answer) and the mean over the
sequence's real positions (``mean``: BOS, visual tokens, prompt). Modality importance is then the prompt
queries' attention mass on image tokens, on the prompt and on BOS in the LM's layers
(``LMAttentionOverEncoders``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torchmetrics import Metric

from fusion.analysis.attention import rank_heads
from fusion.analysis.common import AnalysisContext, Batch, new_report, open_analysis, random_subsets
from fusion.data.images import load_image
from fusion.model.transformer import FusionOutput
from fusion.tasks.base import Example
from fusion.tasks.shapes import COLORS, GRID, ShapesTask, cell_bounds
from fusion.training.module import ScoredBatch

REPRESENTATIONS = ("cls", "mean")
LM_REPRESENTATIONS = ("last_prompt", "mean")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Entry point of ``eval.py mode=probe``; returns what ``results.json`` holds."""
    with open_analysis(cfg, "probe") as ctx:
        return probe(ctx)


def shapes_properties(example: Example) -> dict[str, str]:
    """The number of shapes and the top-left cell's colour of a shapes image, from its pixels (exact palette
    colours, no anti-aliasing; a cell holds at most one shape)."""
    image = load_image(example.image_path).convert("RGB")
    palette = {rgb: name for name, rgb in COLORS.items()}
    colours = []
    for cell in range(GRID * GRID):
        counts = Counter(image.crop(cell_bounds(cell, image.width)).getdata())
        found = [(n, palette[rgb]) for rgb, n in counts.items() if rgb in palette]
        colours.append(max(found)[1] if found else "empty")
    return {"num_shapes": str(sum(c != "empty" for c in colours)), "top_left_color": colours[0]}


def depths_of(num_layers: int) -> list[str]:
    """The probed depths of ``num_layers`` blocks: the input, each block's output but the last, and ``final``."""
    return ["input", *(f"layer {i}" for i in range(num_layers - 1)), "final"]


def layout(ctx: AnalysisContext) -> tuple[list[str], tuple[str, ...]]:
    """The depths and representations the model is probed at (the fusion transformer's, or the LM's)."""
    if ctx.lm:
        return depths_of(ctx.model.lm_attention_shape[0]), LM_REPRESENTATIONS
    return depths_of(ctx.model.fusion.depth), REPRESENTATIONS


class Collector:
    """Forward hooks on the fusion blocks: per depth the [CLS] state and the visible-token mean (B, D)."""

    def __init__(self, ctx: AnalysisContext) -> None:
        self.model = ctx.model
        self.blocks = list(ctx.model.fusion.blocks)
        self.depths = depths_of(len(self.blocks))
        self.states: list[torch.Tensor] = []
        self.handles = [self.blocks[0].register_forward_pre_hook(lambda m, args: self._keep(args[0]))]
        # The last block's output is normed before the head reads it; ``final`` comes from FusionOutput.hidden.
        self.handles += [b.register_forward_hook(lambda m, args, out: self._keep(out[0])) for b in self.blocks[:-1]]
        self.rows: dict[str, list[torch.Tensor]] = {f"{d}/{r}": [] for d in self.depths for r in REPRESENTATIONS}

    def _keep(self, x: torch.Tensor) -> None:
        self.states.append(x.detach())

    def step(self, batch: Batch, output_attentions: bool) -> ScoredBatch:
        """Run the model on ``batch``, keep its representations; the output (attention read-out as asked)."""
        _, out = self.model(batch, output_attentions=output_attentions)
        self.take(out)
        return ScoredBatch([], None, out)

    def take(self, out: FusionOutput) -> None:
        """Store the batch's hooked states plus the final one; ``out.key_mask`` (B, S) weights the mean."""
        visible = out.key_mask.float()[..., None]  # (B, S, 1)
        for depth, x in zip(self.depths, [*self.states, out.hidden], strict=True):
            self.rows[f"{depth}/cls"].append(x[:, 0].float().cpu())
            self.rows[f"{depth}/mean"].append(((x * visible).sum(1) / visible.sum(1)).float().cpu())
        self.states = []

    def close(self) -> dict[str, torch.Tensor]:
        for handle in self.handles:
            handle.remove()
        return {k: torch.cat(v) for k, v in self.rows.items()}


class LMCollector:
    """The LM's hidden states of the prompt pass: per depth the last prompt token's state and the mean over the
    real positions (B, H_lm)."""

    def __init__(self, ctx: AnalysisContext) -> None:
        self.model = ctx.model
        self.depths = depths_of(ctx.model.lm_attention_shape[0])
        self.rows: dict[str, list[torch.Tensor]] = {f"{d}/{r}": [] for d in self.depths for r in LM_REPRESENTATIONS}

    def step(self, batch: Batch, output_attentions: bool) -> ScoredBatch:
        out, _ = self.model.prompt_pass(batch, output_attentions=output_attentions, output_hidden_states=True)
        real = out.inputs.attention_mask.float()[..., None]  # (B, S, 1); left padding: the last position is real
        assert out.hidden_states is not None and len(out.hidden_states) == len(self.depths)
        for depth, x in zip(self.depths, out.hidden_states, strict=True):
            self.rows[f"{depth}/last_prompt"].append(x[:, -1].float().cpu())
            self.rows[f"{depth}/mean"].append(((x * real).sum(1) / real.sum(1)).float().cpu())
        return ScoredBatch([], None, out)

    def close(self) -> dict[str, torch.Tensor]:
        return {k: torch.cat(v) for k, v in self.rows.items()}


def collect(ctx: AnalysisContext, split: str, limit: int | None, stats: Metric | None) -> tuple:
    """Representations ``{depth/rep: (N, D)}`` and properties ``{name: [N values]}`` of up to ``limit`` examples;
    the attention read-out of the passes goes into ``stats`` (the model's own statistic) when given."""
    model, task = ctx.model, ctx.task
    by_id = {e.question_id: e for e in task.examples(split)}
    collector = LMCollector(ctx) if ctx.lm else Collector(ctx)
    props: dict[str, list[str]] = {}
    seen = 0
    seed = int(ctx.cfg.seed) + (0 if split == ctx.split else 1)
    random = bool(ctx.settings.get("random_subsets", True))
    try:
        with random_subsets(model, seed=seed) if random else _nothing() as keep:
            max_batches = ctx.cfg.analysis.get("max_batches") if split == ctx.split else None
            for batch in ctx.batches(split, max_batches=max_batches):
                if limit is not None and seen >= limit:
                    break
                scored = collector.step(batch, output_attentions=stats is not None)
                if stats is not None:
                    model.update_attention_statistics(stats, scored)
                _properties(ctx, batch, by_id, keep.last if random else None, props)
                seen += len(batch["question_ids"])
    finally:
        features = collector.close()
    if limit is not None:  # the last batch may run past the limit
        features = {k: v[:limit] for k, v in features.items()}
        props = {k: v[:limit] for k, v in props.items()}
    return features, props


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _properties(ctx: AnalysisContext, batch: Batch, by_id: dict, keep: torch.Tensor | None, props: dict) -> None:
    task = ctx.task
    for i, qid in enumerate(batch["question_ids"]):
        example = by_id[qid]
        row: dict[str, str] = {}
        if task.answer_types:
            row["answer_type"] = example.answer_type
        if example.label >= 0:
            row["answer"] = task.answers[example.label]
        if keep is not None:
            row["encoders"] = "+".join(n for n, k in zip(ctx.encoder_names, keep[i].tolist(), strict=True) if k)
        if isinstance(task, ShapesTask):
            row.update(shapes_properties(example))
        for name, value in row.items():
            props.setdefault(name, []).append(value)


def fit_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, steps: int = 100, l2: float = 1e-3) -> torch.Tensor:
    """Multinomial logistic regression on standardised ``x`` (N, D) with labels ``y`` (N,); returns the
    weights (D + 1, C), the last row the bias, on ``x``'s device. Full-batch L-BFGS: deterministic and quick
    at this size."""
    with torch.enable_grad():
        w = torch.zeros(x.shape[1] + 1, num_classes, device=x.device, requires_grad=True)
        xb = torch.cat([x, torch.ones(len(x), 1, device=x.device)], 1)
        opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(xb @ w, y) + l2 * w[:-1].pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    return w.detach()


def probe_accuracy(fit_x: torch.Tensor, fit_y: list[str], test_x: torch.Tensor, test_y: list[str], steps: int,
                   device: torch.device | str = "cpu") -> dict:
    """Held-out accuracy of a linear probe and of the fitting split's majority class; the probe is fitted on
    ``device`` (the representations are collected on the CPU, one depth at a time moves)."""
    classes = sorted(set(fit_y))
    index = {c: i for i, c in enumerate(classes)}
    fit_x, test_x = fit_x.to(device), test_x.to(device)
    mean, std = fit_x.mean(0), fit_x.std(0).clamp_min(1e-6)
    labels = torch.tensor([index[v] for v in fit_y], device=fit_x.device)
    w = fit_probe((fit_x - mean) / std, labels, len(classes), steps)
    xb = torch.cat([(test_x - mean) / std, torch.ones(len(test_x), 1, device=test_x.device)], 1)
    predicted = [classes[i] for i in (xb @ w).argmax(1).tolist()]
    majority = Counter(fit_y).most_common(1)[0][0]
    n = len(test_y)
    return {
        "accuracy": sum(p == t for p, t in zip(predicted, test_y, strict=True)) / n,
        "majority": sum(t == majority for t in test_y) / n,
        "classes": len(classes),
    }


def probe(ctx: AnalysisContext) -> dict[str, Any]:
    """Collect, fit every probe, write the report, return the results."""
    fit_split = str(ctx.settings.get("fit_split") or ctx.task.train_split)
    max_fit = ctx.settings.get("max_fit", 3000)
    steps = int(ctx.settings.get("steps", 100))
    stats = ctx.model.attention_statistics()
    fit_x, fit_p = collect(ctx, fit_split, max_fit, None)
    test_x, test_p = collect(ctx, ctx.split, None, stats)
    collector_depths, representations = layout(ctx)
    results: dict[str, dict[str, dict[str, dict]]] = {}
    for prop in fit_p:
        results[prop] = {
            rep: {d: probe_accuracy(fit_x[f"{d}/{rep}"], fit_p[prop], test_x[f"{d}/{rep}"], test_p[prop], steps,
                                    device=ctx.device)
                  for d in collector_depths}
            for rep in representations
        }
    heads = rank_heads(stats.compute(), stats.group_names, ctx.encoder_names, stats.query_kinds)
    if ctx.lm:  # the prompt pass has no answer, so no answer query: its (zero) columns are left out
        heads = [{k: v for k, v in h.items() if not k.startswith("answer_to_")} for h in heads]

    report = new_report(ctx, f"Layer probes ({ctx.task.name}, {ctx.split})")
    report.results.update({"fit_split": fit_split, "fit_examples": len(next(iter(fit_x.values()))),
                           "test_examples": len(next(iter(test_x.values()))), "depths": collector_depths,
                           "probes": results, "modality_importance": heads})
    where = (
        "per depth of the LM (its pass over visual tokens and prompt, no answer), on the last prompt token's state "
        "(`last_prompt`, where the answer starts) and the mean over the real positions (`mean`). `final` is after "
        "the LM's final norm, what its output layer reads. "
        if ctx.lm else
        "per depth of the fusion transformer, on the [CLS] state (`cls`) and the mean over visible tokens "
        "(`mean`). `final` is what the task head reads. "
    )
    report.text(
        f"Linear probes fitted on {report.results['fit_examples']} examples of `{fit_split}` and scored on "
        f"{report.results['test_examples']} of `{ctx.split}` (held out), {where}"
        + ("Every sample saw a random non-empty subset of the encoders (property `encoders`). "
           if ctx.settings.get("random_subsets", True) else "")
    )
    rows = [[prop, rep, d, r["accuracy"], r["majority"], r["classes"]]
            for prop, by_rep in results.items() for rep, by_depth in by_rep.items() for d, r in by_depth.items()]
    report.table("probes", ["property", "representation", "depth", "accuracy", "majority", "classes"], rows)
    report.figure("probe_curves", _curves(results, collector_depths, representations, ctx.lm),
                  "Held-out probe accuracy per depth")
    if ctx.lm:  # the prompt pass has no answer: its prompt queries only
        columns = ["prompt_to_image", "prompt_to_prompt", "prompt_to_bos"]
        labels = ["prompt -> image", "prompt -> prompt", "prompt -> BOS"]
    else:
        columns = ["cls_to_image", "cls_to_text", "text_to_image", "text_to_text"]
        labels = ["[CLS] -> image", "[CLS] -> text", "text -> image", "text -> text"]
    ordered = sorted(heads, key=lambda h: (h["layer"], h["head"]))
    report.text("Modality importance per head (VALUE): attention mass on image tokens vs on the text.")
    report.table("modality_importance", ["layer", "head", *columns],
                 [[h["layer"], h["head"], *(h[c] for c in columns)] for h in ordered], show=False)
    values = torch.tensor([[h[c] for c in columns] for h in ordered])
    report.heatmap("modality_importance", values, [f"L{h['layer']} H{h['head']}" for h in ordered], labels,
                   "Modality importance of each head",
                   title="Modality importance per head: attention mass by query and key modality",
                   xlabel="query -> key modality", ylabel="layer, head", colorbar="attention mass", vmin=0.0, vmax=1.0)
    return report.write()


TITLES = {"cls": "[CLS] state", "mean": "mean over visible tokens", "last_prompt": "last prompt token's state"}


def _curves(results: dict, depths: list[str], representations: tuple[str, ...] = REPRESENTATIONS,
            lm: bool = False) -> Any:
    """One panel per representation: accuracy per depth, one line per property, its majority dotted."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, len(representations), sharey=True)
    colors = [f"C{i}" for i in range(10)]
    for ax, rep in zip(axes, representations, strict=True):
        for i, (prop, by_rep) in enumerate(results.items()):
            acc = [by_rep[rep][d]["accuracy"] for d in depths]
            ax.plot(range(len(depths)), acc, marker="o", color=colors[i % 10], label=prop)
            ax.axhline(by_rep[rep][depths[0]]["majority"], color=colors[i % 10], linestyle=":", linewidth=1)
        ax.set_xticks(range(len(depths)), depths)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("depth in the LM" if lm else "depth in the fusion transformer")
        ax.set_title("mean over the real positions" if lm and rep == "mean" else TITLES[rep])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out probe accuracy")
    axes[-1].legend(fontsize=8, loc="lower right", title="property (dotted: majority)")
    fig.suptitle("Linear probes per layer")
    return fig
