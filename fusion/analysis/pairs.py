"""Clean / corrupted input pairs for causal tracing: a pair file, word swaps (on the shapes task the swap that
changes the answer), or one encoder's features taken from another image; and picking a batch's paired rows."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from fusion.analysis.common import AnalysisContext, Batch
from fusion.analysis.shapes_scene import answer_changing_swap, scene_answers, word_swaps
from fusion.tasks.shapes import ShapesTask

DEFAULT_SWAPS = [
    ["red", "green", "blue", "yellow", "purple"],
    ["circle", "square", "triangle"],
    ["top", "bottom"],
    ["left", "right"],
]


def select(batch: Batch, rows: torch.Tensor) -> Batch:
    """The rows ``rows`` (long indices) of every per-example entry of a collated batch."""
    out: Batch = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value[rows]
        elif isinstance(value, dict):
            out[key] = {k: v[rows] for k, v in value.items()}
        elif isinstance(value, list):
            out[key] = [value[i] for i in rows.tolist()]
        else:
            out[key] = value
    return out


def swap_word(question: str, swaps: Sequence[Sequence[str]]) -> str | None:
    """``question`` with its first swappable word replaced by the next word of its group; None if none."""
    return next(word_swaps(question, swaps), None)


def corrupt_text(ctx: AnalysisContext, batch: Batch, corrupted: list[str | None]) -> tuple[Batch, torch.Tensor]:
    """The batch with the given questions (None: no pair; token ids and raw text) and the rows whose token
    layout is unchanged (the text encoder's word pieces; the LM head checks its own layout)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    questions = [q if q is not None else "" for q in corrupted]
    tok = ctx.model.text.tokenizer(questions, padding="max_length", truncation=True, max_length=ids.shape[1],
                                   return_tensors="pt")
    new_ids, new_mask = tok["input_ids"].to(ids.device, ids.dtype), tok["attention_mask"].to(mask.device)
    same = (new_mask == mask).all(1) & torch.tensor([q is not None for q in corrupted], device=ids.device)
    same &= (new_ids != ids).any(1)
    # The raw questions too (the LM head's prompts); a row without a pair keeps its own.
    raw = [q if q is not None else old for q, old in zip(corrupted, batch["questions"], strict=True)]
    return {**batch, "input_ids": new_ids, "questions": raw}, same


class Corrupter:
    """The corrupted question of each example (text corruption), from a pair file, or from word swaps: for the
    shapes task the first swap that changes the answer (the scene read from the image's pixels), for another
    task the first swappable word replaced by the next word of its group."""

    def __init__(self, ctx: AnalysisContext) -> None:
        self.examples = {e.question_id: e for e in ctx.task.examples(ctx.split)}
        pair_file = ctx.settings.get("pairs")
        self.table = read_pairs(Path(str(pair_file))) if pair_file else None
        if self.table is not None and not set(self.table) & set(self.examples):
            raise ValueError(f"analysis.causal_trace.pairs={pair_file}: none of its {len(self.table)} question ids "
                             f"is a question of split {ctx.split!r} (e.g. {next(iter(self.table))!r})")
        self.swaps = [list(g) for g in (ctx.settings.get("swaps") or DEFAULT_SWAPS)]
        self.shapes = isinstance(ctx.task, ShapesTask)
        self.answers = ctx.task.answers

    def __call__(self, question_id: str) -> str | None:
        if self.table is not None:
            return self.table.get(question_id)
        example = self.examples[question_id]
        if self.shapes and example.label >= 0:
            answers = scene_answers(example.image_path)
            return answer_changing_swap(example.question, self.answers[example.label], answers, self.swaps)
        return swap_word(example.question, self.swaps)


def make_pairs(ctx: AnalysisContext, batch: Batch, corrupter: Corrupter | None) -> tuple[Batch, Batch, torch.Tensor]:
    """Clean batch (encoder features computed once, in ``features``), corrupted batch, rows that are pairs.

    ``corrupter``: question id -> corrupted question (text corruption; batches carry token ids only)."""
    model = ctx.model
    clean = {**batch, "features": model.encode_images(batch)}
    corrupt = str(ctx.settings.get("corrupt", "text"))
    if corrupt == "text":
        assert corrupter is not None
        other, rows = corrupt_text(ctx, clean, [corrupter(q) for q in batch["question_ids"]])
        return clean, other, rows
    if corrupt.startswith("encoder:"):
        name = corrupt.split(":", 1)[1]
        if name not in model.encoder_names:
            raise ValueError(
                f"analysis.causal_trace.corrupt={corrupt!r}: no encoder {name!r}; have {model.encoder_names}"
            )
        keys = [str(k) for k in batch["image_keys"]]
        n = len(keys)
        # Each row takes the features of the next row that shows another image.
        source = [next((j % n for j in range(i + 1, i + n) if keys[j % n] != keys[i]), i) for i in range(n)]
        features = dict(clean["features"])
        device = features[name].device
        features[name] = features[name][torch.tensor(source, device=device)]
        rows = torch.tensor([s != i for i, s in enumerate(source)], device=device)
        return clean, {**clean, "features": features}, rows
    raise ValueError(f"analysis.causal_trace.corrupt={corrupt!r}; allowed: text, encoder:<name>")


def read_pairs(path: Path) -> dict[str, str]:
    """A pair file: question id -> corrupted question. JSON (a list of objects) or JSON Lines (one object a
    line), each object ``{"question_id": <id of an example of the analysed split>, "corrupted_question": str}``;
    numeric ids match the task's ids as strings (VQAv2's 11000 is "11000")."""
    where = f"analysis.causal_trace.pairs={path}"
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such file")
    text = path.read_text()
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{where}: line {number} is neither part of a JSON list nor a JSON object "
                                     f"({error.msg})") from None
    if isinstance(rows, dict):  # a JSON Lines file of one line
        rows = [rows]
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{where}: expected a non-empty JSON list or JSON Lines of "
                         '{"question_id", "corrupted_question"} objects')
    table = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "question_id" not in row or "corrupted_question" not in row:
            raise ValueError(f'{where}: pair {i} is {row!r}; expected {{"question_id": ..., "corrupted_question": '
                             '"..."}')
        table[str(row["question_id"])] = str(row["corrupted_question"])
    return table
