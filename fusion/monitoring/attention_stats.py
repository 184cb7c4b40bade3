"""Attention-over-encoder statistics: how much attention each query kind gives each token group.

For every layer and head of the multimodal transformer, :class:`AttentionOverEncoders` accumulates the
mean attention mass that the [CLS] query and the (real) text queries give to the tokens of each vision
encoder, to the tokens that mix encoders (fusers other than token_concat), to the text and to [CLS].
:class:`LMAttentionOverEncoders` does the same for the LM head's layers, with the prompt queries and the
first answer token's query. The helpers turn a computed ``(Q, L, H, G)`` tensor (``Q`` query kinds, in
the order of ``query_kinds``: :data:`QUERY_KINDS` by default, :data:`LM_QUERY_KINDS` for the LM head) into
scalars for the logger, table rows, heatmaps and files on disk.

Group order everywhere: ``encoder_names`` in order, then ``"fused"`` (only with ``mixed=True``), then
``"text"``, then ``"cls"``; for the LM head ``"prompt"``, ``"answer"``, ``"bos"`` instead of the last two.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from fusion.fusers.groups import ANSWER_GROUP as ANSWER
from fusion.fusers.groups import (
    ANSWER_NAME,
    BOS_NAME,
    CLS_NAME,
    LM_RESERVED_NAMES,
    MIXED_NAME,
    PROMPT_NAME,
    RESERVED_NAMES,
    TEXT_NAME,
)
from fusion.fusers.groups import CLS_GROUP as CLS
from fusion.fusers.groups import MIXED_GROUP as MIXED
from fusion.fusers.groups import PAD_GROUP as PAD
from fusion.fusers.groups import TEXT_GROUP as TEXT

# The model fixes the values of ``key_groups`` for [CLS] and text; visual tokens carry their encoder index.
from fusion.io import atomic_write, save_figure

__all__ = [
    "ANSWER",
    "CLS",
    "MIXED",
    "PAD",
    "TEXT",
    "LM_QUERY_KINDS",
    "QUERY_KINDS",
    "AttentionOverEncoders",
    "LMAttentionOverEncoders",
    "scalar_metrics",
    "stats_rows",
    "plot_heatmaps",
    "save_stats",
    "load_stats",
]

QUERY_KINDS = (CLS_NAME, TEXT_NAME)  # the multimodal transformer's query kinds
LM_QUERY_KINDS = (PROMPT_NAME, ANSWER_NAME)  # the LM head's query kinds

JSON_NAME = "attention.json"
CSV_NAME = "attention.csv"
CSV_FIELDS = ("query", "layer", "head", "group", "mass")
# attention.json's own keys besides one list per query kind; "queries" is written only for query kinds other
# than QUERY_KINDS, so the files of the multimodal transformer are as they were before the LM head.
JSON_KEYS = ("groups", "queries", "num_layers", "num_heads")

PAD_TOLERANCE = 1e-6  # most attention mass a counted LM query may give padding


def _group_names(
    encoder_names: Sequence[str],
    mixed: bool,
    reserved: Sequence[str] = RESERVED_NAMES,
    tail: Sequence[str] = (TEXT_NAME, CLS_NAME),
) -> list[str]:
    names = list(encoder_names)
    for name in names:
        if name in reserved:
            raise ValueError(f"encoder name {name!r} is reserved for a token group; rename the encoder")
    if len(set(names)) != len(names):
        raise ValueError(f"encoder names must be unique, got {names}")
    return names + ([MIXED_NAME] if mixed else []) + list(tail)


class _AttentionMass(Metric):
    """What both attention statistics share: per query kind, float64 sums of the attention mass over
    ``(L, H, G)`` and a count of the samples that had such a query; ``compute()`` their means.

    States ``<kind>_sum`` and ``<kind>_count`` for each of ``query_kinds`` (summed across processes).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, group_names: list[str], query_kinds: tuple[str, ...], encoder_names: Sequence[str],
                 num_layers: int, num_heads: int, mixed: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_layers < 1 or num_heads < 1:
            raise ValueError(f"num_layers and num_heads must be >= 1, got {num_layers} and {num_heads}")
        self._group_names = group_names
        self._query_kinds = query_kinds
        self.mixed = mixed
        self.num_encoders = len(encoder_names)
        self.num_layers = num_layers
        self.num_heads = num_heads
        shape = (num_layers, num_heads, len(group_names))
        # float64 sums: validation sets can be large and the means should still sum to 1 tightly.
        for kind in query_kinds:
            self.add_state(f"{kind}_sum", default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{kind}_count", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @property
    def group_names(self) -> list[str]:
        """The order of the last output axis (see the subclass)."""
        return list(self._group_names)

    @property
    def query_kinds(self) -> tuple[str, ...]:
        """The order of the first output axis."""
        return self._query_kinds

    def _check_attentions(self, attentions: Sequence[Tensor], names: str) -> tuple[int, int, int, int]:
        """``L`` self-attention tensors of one shape ``(B, H, Q, Q)``; returns that shape.
        ``names``: how the docstring names the axes, for the error (``(B, H, Q, K)``)."""
        if len(attentions) != self.num_layers:
            raise ValueError(f"expected attentions for {self.num_layers} layers, got {len(attentions)}")
        first = attentions[0]
        if first.dim() != 4:
            raise ValueError(f"expected attention probabilities {names}, got shape {tuple(first.shape)}")
        b, h, q, k = first.shape
        if h != self.num_heads:
            raise ValueError(f"expected {self.num_heads} heads, got {h} (shape {tuple(first.shape)})")
        if q != k:
            raise ValueError(f"expected self-attention with Q == K, got Q={q}, K={k}")
        for i, attn in enumerate(attentions):
            if attn.shape != first.shape:
                raise ValueError(f"layer {i} attention has shape {tuple(attn.shape)}, expected {tuple(first.shape)}")
        return b, h, q, k

    def compute(self) -> Tensor:
        """``(Q, L, H, G)`` float32 mean masses in :attr:`query_kinds` order; zeros for a query kind that
        saw no sample."""
        means = [getattr(self, f"{kind}_sum") / getattr(self, f"{kind}_count").clamp(min=1)
                 for kind in self._query_kinds]
        return torch.stack(means).to(torch.float32)


class AttentionOverEncoders(_AttentionMass):
    """Mean attention mass per (query kind, layer, head, group).

    ``update(attentions, key_groups, text_query_mask)``:

    - ``attentions``: ``L`` tensors ``(B, H, Q, K)`` of attention probabilities (Q == K, rows sum to 1,
      masked keys exactly 0); any float dtype.
    - ``key_groups``: ``(K,)`` long, ``CLS`` / ``TEXT`` / encoder index per position (``MIXED`` too if
      ``mixed``, counted as the group ``"fused"``); position 0 is [CLS].
    - ``text_query_mask``: ``(B, Q)`` bool, True at real text tokens.

    ``compute()`` returns ``(2, L, H, G)``: index 0 = [CLS] query, 1 = mean over each sample's text
    queries; both averaged over samples. Samples without text tokens don't count for the text half.
    """

    cls_sum: Tensor
    text_sum: Tensor
    cls_count: Tensor
    text_count: Tensor

    def __init__(
        self, encoder_names: Sequence[str], num_layers: int, num_heads: int, mixed: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(_group_names(encoder_names, mixed), QUERY_KINDS, encoder_names, num_layers, num_heads,
                         mixed, **kwargs)

    def _one_hot(self, key_groups: Tensor, device: torch.device) -> Tensor:
        """``(K,)`` group ids -> ``(K, G)`` float32 one-hot in output group order."""
        n, m = self.num_encoders, int(self.mixed)
        low = MIXED if self.mixed else CLS
        key_groups = key_groups.to(device=device, dtype=torch.long)
        bad = (key_groups < low) | (key_groups >= n)
        if bool(bad.any()):
            values = sorted(set(key_groups[bad].tolist()))
            hint = f"; MIXED ({MIXED}) tokens need mixed=True" if MIXED in values else ""
            raise ValueError(f"key_groups values must be in [{low}, {n - 1}] for {n} encoders, got {values}{hint}")
        if int(key_groups[0]) != CLS:
            raise ValueError(f"key_groups[0] must be CLS ({CLS}), got {int(key_groups[0])}")
        # Encoders keep their own index as column; MIXED (-3) -> n, TEXT (-1) -> n + m, CLS (-2) -> n + m + 1.
        column = torch.where(key_groups == MIXED, n, torch.where(key_groups < 0, n + m - 1 - key_groups, key_groups))
        return torch.nn.functional.one_hot(column, n + m + 2).to(torch.float32)

    def _check(self, attentions: Sequence[Tensor], key_groups: Tensor, text_query_mask: Tensor) -> None:
        b, _, q, k = self._check_attentions(attentions, "(B, H, Q, K)")
        if key_groups.shape != (k,):
            raise ValueError(f"expected key_groups of shape ({k},) for K={k}, got {tuple(key_groups.shape)}")
        if text_query_mask.shape != (b, q):
            raise ValueError(f"expected text_query_mask of shape ({b}, {q}), got {tuple(text_query_mask.shape)}")

    def update(self, attentions: Sequence[Tensor], key_groups: Tensor, text_query_mask: Tensor) -> None:
        """Accumulate one batch; see the class docstring for shapes."""
        self._check(attentions, key_groups, text_query_mask)
        device = attentions[0].device
        one_hot = self._one_hot(key_groups, device)  # (K, G)
        text_mask = text_query_mask.to(device=device, dtype=torch.bool)
        if bool((text_mask & (key_groups.to(device) != TEXT)).any()):
            raise ValueError("text_query_mask is True at a position whose key_groups entry is not TEXT")

        n_text = text_mask.sum(dim=1)  # (B,)
        # Per-sample mean over text queries as weights, so reducing over Q first (B*H*Q*K work) gives
        # the same result as forming the full (B, H, Q, G) mass and averaging it.
        weights = text_mask.to(torch.float32) / n_text.clamp(min=1).unsqueeze(1)  # (B, Q)

        cls_mass, text_mass = [], []
        for attn in attentions:
            probs = attn.detach().to(torch.float32)
            cls_mass.append((probs[:, :, 0, :] @ one_hot).sum(dim=0))  # (H, G)
            per_key = torch.einsum("bhqk,bq->hk", probs, weights)  # samples w/o text have zero weights
            text_mass.append(per_key @ one_hot)  # (H, G)
        self.cls_sum += torch.stack(cls_mass).to(self.cls_sum.dtype)
        self.text_sum += torch.stack(text_mass).to(self.text_sum.dtype)
        self.cls_count += attentions[0].shape[0]
        self.text_count += (n_text > 0).sum().to(self.text_count.device)


class LMAttentionOverEncoders(_AttentionMass):
    """Mean attention mass per (query kind, layer, head, group) inside the LM head's layers.

    ``update(attentions, groups)``:

    - ``attentions``: ``L`` tensors ``(B, H, S, S)`` of attention probabilities (rows sum to 1, padded keys
      exactly 0); any float dtype.
    - ``groups``: ``(B, S)`` long, each sample's group id per position (``LMInputs.groups``): the encoder
      index (``MIXED`` too if ``mixed``, counted as the group ``"fused"``) for visual tokens, ``CLS`` for BOS,
      ``TEXT`` for the prompt, ``ANSWER`` for the answer (+ EOS), ``PAD`` for the left padding.

    ``compute()`` returns ``(2, L, H, G)`` in the order of :data:`LM_QUERY_KINDS`: index 0 = mean over each
    sample's prompt queries, 1 = the query of each sample's first answer token; both averaged over samples.
    Samples without prompt (answer) tokens don't count for the prompt (answer) half. Groups:
    ``encoder_names``, ``"fused"`` (if ``mixed``), ``"prompt"`` (prompt keys), ``"answer"`` (answer keys;
    under causal attention the first answer token sees only itself of the answer), ``"bos"``. Padded keys
    belong to no group: a counted query that gives them more than ``1e-6`` raises ValueError.
    """

    prompt_sum: Tensor
    answer_sum: Tensor
    prompt_count: Tensor
    answer_count: Tensor

    def __init__(
        self, encoder_names: Sequence[str], num_layers: int, num_heads: int, mixed: bool = False, **kwargs: Any
    ) -> None:
        names = _group_names(encoder_names, mixed, LM_RESERVED_NAMES, (PROMPT_NAME, ANSWER_NAME, BOS_NAME))
        super().__init__(names, LM_QUERY_KINDS, encoder_names, num_layers, num_heads, mixed, **kwargs)
        n, m = self.num_encoders, int(mixed)
        # Column of each group id, indexed by ``id - PAD``: PAD, ANSWER, MIXED, CLS, TEXT, then the encoders.
        # PAD gets the column after the last group (dropped), MIXED without ``mixed`` -1 (rejected).
        self._columns = [n + m + 3, n + m + 1, n if mixed else -1, n + m + 2, n + m, *range(n)]

    def _check(self, attentions: Sequence[Tensor], groups: Tensor) -> None:
        b, _, _, k = self._check_attentions(attentions, "(B, H, S, S)")
        if groups.shape != (b, k):
            raise ValueError(f"expected groups of shape ({b}, {k}) for B={b}, S={k}, got {tuple(groups.shape)}")

    def _one_hot(self, groups: Tensor) -> Tensor:
        """``(B, S)`` group ids -> ``(B, S, G)`` float32 one-hot in output group order; PAD rows are 0."""
        n = self.num_encoders
        table = torch.tensor(self._columns, device=groups.device)
        column = table[(groups - PAD).clamp(min=0, max=len(self._columns) - 1)]
        bad = (groups < PAD) | (groups >= n) | (column < 0)
        if bool(bad.any()):
            values = sorted(set(groups[bad].tolist()))
            hint = f"; MIXED ({MIXED}) tokens need mixed=True" if MIXED in values else ""
            allowed = "" if self.mixed else f" except MIXED ({MIXED})"
            raise ValueError(f"groups values must be in [{PAD}, {n - 1}]{allowed} for {n} encoders, got {values}{hint}")
        one_hot = torch.nn.functional.one_hot(column, len(self._group_names) + 1)
        return one_hot[..., :-1].to(torch.float32)

    def update(self, attentions: Sequence[Tensor], groups: Tensor) -> None:
        """Accumulate one batch; see the class docstring for shapes."""
        self._check(attentions, groups)
        device = attentions[0].device
        groups = groups.to(device=device, dtype=torch.long)
        one_hot = self._one_hot(groups)  # (B, S, G)
        prompt = groups == TEXT  # (B, S)
        answer = groups == ANSWER
        n_prompt = prompt.sum(dim=1)  # (B,)
        has_answer = answer.any(dim=1)
        # argmax returns the first maximum: each sample's first answer position (0 without answer: masked).
        first_answer = torch.nn.functional.one_hot(answer.long().argmax(dim=1), groups.shape[1]).bool()
        first_answer &= has_answer.unsqueeze(1)
        # Per-sample query weights: the mean over prompt queries and the first answer query; reducing over
        # queries first (B*H*S*S work) gives the same result as forming the (B, H, S, G) mass and averaging.
        weights = torch.stack(
            [prompt.to(torch.float32) / n_prompt.clamp(min=1).unsqueeze(1), first_answer.to(torch.float32)], dim=1
        )  # (B, 2, S)
        counted = (prompt | first_answer).unsqueeze(1)  # (B, 1, S)
        pad_keys = (groups == PAD).to(torch.float32)  # (B, S)

        masses = []
        for i, attn in enumerate(attentions):
            probs = attn.detach().to(torch.float32)
            pad_mass = torch.einsum("bhqk,bk->bhq", probs, pad_keys).masked_fill(~counted, 0.0)
            if bool((pad_mass > PAD_TOLERANCE).any()):
                raise ValueError(
                    f"layer {i}: a prompt or answer query gives padded keys attention mass up to "
                    f"{float(pad_mass.max()):.3g}; padding must be masked out of the attention"
                )
            per_key = torch.einsum("bhqk,bjq->bjhk", probs, weights)  # (B, 2, H, S)
            masses.append(torch.einsum("bjhk,bkg->jhg", per_key, one_hot))  # (2, H, G)
        mass = torch.stack(masses, dim=1).to(self.prompt_sum.dtype)  # (2, L, H, G)
        self.prompt_sum += mass[0]
        self.answer_sum += mass[1]
        self.prompt_count += (n_prompt > 0).sum().to(self.prompt_count.device)
        self.answer_count += has_answer.sum().to(self.answer_count.device)


def _check_stats(
    stats: Tensor, group_names: Sequence[str], query_kinds: Sequence[str]
) -> tuple[int, int, int]:
    queries = list(query_kinds)
    if not queries or len(set(queries)) != len(queries) or not all(isinstance(q, str) and q for q in queries):
        raise ValueError(f"query kinds must be unique non-empty names, got {queries}")
    clash = sorted(set(queries) & set(JSON_KEYS))
    if clash:
        raise ValueError(f"query kinds {clash} would overwrite the keys of {JSON_NAME}")
    if stats.dim() != 4 or stats.shape[0] != len(queries) or stats.shape[3] != len(group_names):
        raise ValueError(
            f"expected stats of shape ({len(queries)}, L, H, {len(group_names)}) for query kinds {queries} and "
            f"groups {list(group_names)}, got {tuple(stats.shape)}"
        )
    _, num_layers, num_heads, num_groups = stats.shape
    return num_layers, num_heads, num_groups


def scalar_metrics(
    stats: Tensor, group_names: Sequence[str], prefix: str = "attn", *, query_kinds: Sequence[str] = QUERY_KINDS
) -> dict[str, float]:
    """Head-averaged masses of ``stats`` ``(Q, L, H, G)`` as ``{prefix}/{query}/layer{l}/{group}``."""
    _check_stats(stats, group_names, query_kinds)
    mean = stats.detach().float().mean(dim=2).cpu()  # (Q, L, G)
    out: dict[str, float] = {}
    for qi, query in enumerate(query_kinds):
        for layer in range(mean.shape[1]):
            for gi, group in enumerate(group_names):
                out[f"{prefix}/{query}/layer{layer}/{group}"] = float(mean[qi, layer, gi])
    return out


def stats_rows(
    stats: Tensor, group_names: Sequence[str], *, query_kinds: Sequence[str] = QUERY_KINDS
) -> list[dict[str, Any]]:
    """One dict per (query, layer, head, group) with keys ``query, layer, head, group, mass``."""
    num_layers, num_heads, _ = _check_stats(stats, group_names, query_kinds)
    values = stats.detach().float().cpu().tolist()
    return [
        {"query": query, "layer": layer, "head": head, "group": group, "mass": values[qi][layer][head][gi]}
        for qi, query in enumerate(query_kinds)
        for layer in range(num_layers)
        for head in range(num_heads)
        for gi, group in enumerate(group_names)
    ]


def _heatmap(ax: Any, values: Tensor, vmax: float, annotate: bool) -> Any:
    """Draw ``values`` ``(rows, G)`` on ``ax``; returns the image for a colour bar."""
    image = ax.imshow(values.numpy(), vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto")
    if annotate:
        for r, row in enumerate(values.tolist()):
            for c, v in enumerate(row):
                # Light text on the dark end of viridis, dark text on the bright end.
                color = "white" if v < 0.6 * vmax else "black"
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color=color)
    return image


def plot_heatmaps(
    stats: Tensor, group_names: Sequence[str], out_dir: Path, *, query_kinds: Sequence[str] = QUERY_KINDS
) -> list[Path]:
    """Write layers x groups and per-layer heads x groups heatmaps of ``stats`` ``(Q, L, H, G)``.

    Files: ``attention_{query}_layers.png`` and ``attention_{query}_heads.png`` in ``out_dir`` per query kind
    (``attention_{cls,text}_{layers,heads}.png`` by default).
    """
    # Figure without pyplot: no global figure registry or backend switch, safe in a training process.
    from matplotlib.figure import Figure

    num_layers, num_heads, num_groups = _check_stats(stats, group_names, query_kinds)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = stats.detach().float().cpu()
    # Shared scale per figure so cells compare across layers/heads; floor avoids a zero-width range.
    vmax = max(float(stats.max()), 1e-6)
    cell_w, cell_h = 0.8, 0.45
    paths = []
    for qi, query in enumerate(query_kinds):
        layer_mean = stats[qi].mean(dim=1)  # (L, G)
        fig = Figure(figsize=(2.0 + cell_w * num_groups, 1.5 + cell_h * num_layers))
        ax = fig.add_subplot()
        image = _heatmap(ax, layer_mean, vmax, annotate=True)
        ax.set_xticks(range(num_groups), list(group_names), rotation=45, ha="right")
        ax.set_yticks(range(num_layers), [f"layer {i}" for i in range(num_layers)])
        ax.set_title(f"Attention mass of the {query} query per layer (head mean)")
        fig.colorbar(image, ax=ax, label="attention mass")
        path = out_dir / f"attention_{query}_layers.png"
        save_figure(fig, path, dpi=100)
        paths.append(path)

    ncols = min(num_layers, 4)
    nrows = -(-num_layers // ncols)
    annotate_heads = num_heads * num_groups <= 96  # beyond that the numbers overlap into noise
    for qi, query in enumerate(query_kinds):
        fig = Figure(
            figsize=(1.0 + ncols * (1.2 + 0.6 * num_groups), 1.0 + nrows * (1.2 + 0.35 * num_heads)),
            layout="constrained",
        )
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for layer, ax in enumerate(axes.flat):
            if layer >= num_layers:
                ax.set_visible(False)
                continue
            image = _heatmap(ax, stats[qi, layer], vmax, annotate=annotate_heads)
            ax.set_xticks(range(num_groups), list(group_names), rotation=45, ha="right")
            ax.set_yticks(range(num_heads), [f"head {h}" for h in range(num_heads)])
            ax.set_title(f"layer {layer}")
        fig.suptitle(f"Attention mass of the {query} query per head")
        fig.colorbar(image, ax=axes, label="attention mass")
        path = out_dir / f"attention_{query}_heads.png"
        save_figure(fig, path, dpi=100)
        paths.append(path)
    return paths


def save_stats(
    stats: Tensor,
    group_names: Sequence[str],
    out_dir: Path,
    extra: dict[str, Any] | None = None,
    *,
    query_kinds: Sequence[str] = QUERY_KINDS,
) -> dict[str, Path]:
    """Write ``attention.json``, ``attention.csv`` and the heatmaps to ``out_dir``; returns file name -> path.

    ``attention.json`` holds ``groups``, ``queries`` (the query kinds in order; left out for
    :data:`QUERY_KINDS`, which a file without it holds), ``num_layers``, ``num_heads`` and one
    ``(L, H, G)`` list per query kind. ``extra`` is merged into the JSON (e.g. epoch, step); it may not
    overwrite the stats' own keys.
    """
    num_layers, num_heads, _ = _check_stats(stats, group_names, query_kinds)
    out_dir = Path(out_dir)
    values = stats.detach().float().cpu()
    queries = list(query_kinds)
    payload: dict[str, Any] = {
        "groups": list(group_names),
        **({} if tuple(queries) == QUERY_KINDS else {"queries": queries}),
        "num_layers": num_layers,
        "num_heads": num_heads,
        **{query: values[qi].tolist() for qi, query in enumerate(queries)},
    }
    clash = sorted(set(extra or {}) & (set(payload) | set(JSON_KEYS)))
    if clash:
        raise ValueError(f"extra keys {clash} would overwrite the statistics in {JSON_NAME}")
    payload.update(extra or {})
    # Serialise before touching the disk so a non-JSON value in ``extra`` leaves nothing behind.
    json_bytes = (json.dumps(payload, indent=1) + "\n").encode()

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(stats_rows(values, group_names, query_kinds=queries))
    csv_bytes = buffer.getvalue().encode()

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {JSON_NAME: out_dir / JSON_NAME, CSV_NAME: out_dir / CSV_NAME}
    atomic_write(paths[JSON_NAME], lambda f: f.write(json_bytes))
    atomic_write(paths[CSV_NAME], lambda f: f.write(csv_bytes))
    for path in plot_heatmaps(values, group_names, out_dir, query_kinds=queries):
        paths[path.name] = path
    return paths


def load_stats(path: Path | str, *, query_kinds: Sequence[str] = QUERY_KINDS) -> tuple[Tensor, list[str]]:
    """Read ``attention.json`` (or the folder holding it) back as ``(stats (Q, L, H, G), group_names)``.

    ``query_kinds``: the query kinds the file must hold (its ``queries``; :data:`QUERY_KINDS` in a file
    without that field); ValueError names the file's own otherwise.
    """
    path = Path(path)
    if path.is_dir():
        path = path / JSON_NAME
    payload = json.loads(path.read_text())
    held = list(payload.get("queries", QUERY_KINDS))
    if held != list(query_kinds):
        raise ValueError(f"{path} holds the query kinds {held}, not {list(query_kinds)}; pass query_kinds={held}")
    stats = torch.tensor([payload[query] for query in held], dtype=torch.float32)
    groups = list(payload["groups"])
    _check_stats(stats, groups, held)
    return stats, groups
