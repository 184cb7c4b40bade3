"""VQAv2 and OK-VQA from the official question/annotation JSON files, trained on soft VQA scores.

One loader serves both (OK-VQA uses the VQA file format); the file-name patterns are constructor
arguments, so ``conf/task/okvqa.yaml`` only changes them. The answer vocabulary is the top-K
normalised training answers, cached as JSON (see :func:`load_or_build_vocab`).

The JSON reading helpers (:func:`read_json`, :func:`field`) and the vocabulary cache are shared with
:mod:`fusion.tasks.gqa`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from fusion.tasks.base import Example, FileTask, resolve_root, write_atomic
from fusion.tasks.vqa_metric import (
    VQAAccuracy,
    leave_one_out_accuracy,
    normalize_answer,
    official_references,
    soft_scores,
)

log = logging.getLogger(__name__)

ANSWER_TYPES = ("yes/no", "number", "other")
# Bump when the vocabulary recipe (normalisation, counting, ordering) changes: old cache files are ignored.
VOCAB_VERSION = 1


class DataFormatError(ValueError):
    """A data file that is not in the format its task reads; the message names the file, entry and key."""


# ---- reading JSON data files ---------------------------------------------------------------------
def read_json(path: Path, what: str) -> Any:
    """Parse ``path``; a missing file or bad JSON fails naming the file, ``what`` it is and where it broke."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{what} not found: {path}") from err
    except json.JSONDecodeError as err:
        where = f"line {err.lineno} column {err.colno}"
        raise DataFormatError(f"{path} ({what}) is not valid JSON: {err.msg} at {where}") from err
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path} ({what}) is not UTF-8 text: {err}") from err


def field(entry: Any, key: str, kind: type | tuple[type, ...], where: str, expected: str) -> Any:
    """``entry[key]`` if ``entry`` is an object holding a ``kind`` there, else an error naming ``where`` and ``key``."""
    if not isinstance(entry, Mapping):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    if key not in entry:
        raise DataFormatError(f"{where}: missing key {key!r} (expected {expected})")
    value = entry[key]
    # bool is an int subclass; a true/false id is still a format error.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise DataFormatError(f"{where}: key {key!r} is {value!r}, expected {expected}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def check_pattern(name: str, pattern: str, **fields: Any) -> str:
    """Fail at construction, naming the option, if a file-name pattern has unknown or bad placeholders."""
    try:
        return pattern.format(**fields)
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"{name}={pattern!r} is not a valid pattern: it may use {sorted(fields)} ({err!r})") from err


# ---- the cached answer vocabulary ----------------------------------------------------------------
def vocab_cache_path(cache_dir: str | Path | None, task: str, source: Path, top_k: int | None) -> Path | None:
    """``<cache_dir>/<task>/answer_vocab_<K>_<digest>.json``; the digest pins the source file and recipe."""
    if cache_dir is None:
        return None
    try:
        stat = source.stat()
    except OSError:
        return None  # no training file: building fails later with a message naming it
    key = json.dumps([VOCAB_VERSION, str(source), stat.st_size, stat.st_mtime_ns, top_k])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return resolve_root(cache_dir) / task / f"answer_vocab_{top_k or 'all'}_{digest}.json"


def load_or_build_vocab(
    path: Path | None, count: Callable[[], Counter[str]], top_k: int | None, source: Path
) -> list[tuple[str, int]]:
    """The ``top_k`` most frequent answers with their counts, most frequent first (ties: alphabetical).

    Read from ``path`` if it exists (a pinned ``vocab_file`` is used as it is); otherwise built with
    ``count()`` and written there atomically. An unwritable cache (read-only disk) only costs a rebuild.
    """
    if path is not None and path.is_file():
        data = read_json(path, "answer vocabulary file")
        answers = field(data, "answers", list, str(path), "a list of answer strings")
        counts = field(data, "counts", list, str(path), "a list of integer counts, one per answer")
        if len(answers) != len(counts) or not all(isinstance(a, str) for a in answers):
            raise DataFormatError(f"{path}: 'answers' must be strings, as many as 'counts'")
        if len(set(answers)) != len(answers):
            raise DataFormatError(f"{path}: 'answers' has duplicates")
        return list(zip(answers, counts, strict=True))
    ranked = sorted(count().items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
    if not ranked:
        raise DataFormatError(f"{source}: no training answers to build the answer vocabulary from")
    if path is not None:
        blob = {
            "version": VOCAB_VERSION, "source": str(source), "top_k": top_k,
            "answers": [a for a, _ in ranked], "counts": [c for _, c in ranked],
        }
        try:
            write_atomic(path, json.dumps(blob))
        except OSError as err:
            log.warning("could not cache the answer vocabulary at %s (%s); it is rebuilt next time", path, err)
    return ranked


# ---- VQA -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Row:
    """One parsed question with its (optional) annotation, before labels exist."""

    question_id: int
    image_id: int
    question: str
    answer_type: str = ""
    answers: tuple[str, ...] = ()  # raw human answers; empty without annotations
    multiple_choice: str = ""


class VQATask(FileTask):
    """VQA-format data (VQAv2, OK-VQA) below ``root``; splits are the names in the file names.

    Targets are soft scores over the vocabulary (each answer's leave-one-out VQA accuracy, from the
    normalised human answers); the loss is binary cross-entropy with logits summed over classes and
    averaged over examples (= mean x num_classes, as in bottom-up attention / ViLT). The metric is the
    official VQA accuracy, overall and per answer type. A split other than the train/val splits may
    lack its annotations file (VQAv2 test-dev): its examples have label -1 and no answers.
    """

    name = "vqa"

    def __init__(
        self,
        root: str | Path,
        name: str = "vqav2",
        train_split: str = "train2014",
        val_split: str = "val2014",
        test_split: str = "val2014",
        questions_file: str = "v2_OpenEnded_mscoco_{split}_questions.json",
        annotations_file: str = "v2_mscoco_{split}_annotations.json",
        image_file: str = "{image_split}/COCO_{image_split}_{image_id:012d}.jpg",
        image_splits: Mapping[str, str] | None = None,
        image_key_prefix: str = "coco",
        top_k: int | None = 3129,
        vocab_file: str | Path | None = None,
        cache_dir: str | Path | None = None,
        answer_types: Sequence[str] = ANSWER_TYPES,
    ) -> None:
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or null (all answers), got {top_k!r}")
        check_pattern("questions_file", questions_file, split="x")
        check_pattern("annotations_file", annotations_file, split="x")
        check_pattern("image_file", image_file, split="x", image_split="x", image_id=1)
        super().__init__(root, train_split, val_split, test_split)
        self.name = name
        self.questions_file = questions_file
        self.annotations_file = annotations_file
        self.image_file = image_file
        # Splits whose images live in another split's folder (test-dev2015 questions use test2015 images).
        self.image_splits = dict(image_splits or {})
        self.image_key_prefix = image_key_prefix
        self.top_k = top_k
        self.vocab_file = Path(vocab_file).expanduser() if vocab_file else None
        self.cache_dir = cache_dir
        self._answer_types = list(answer_types)
        self._vocab: list[str] | None = None
        self._vocab_counts: list[int] = []
        self._label: dict[str, int] = {}
        self._pred_norm: list[str] = []
        self._rows: dict[str, list[_Row]] = {}
        # Per question id (str), filled as splits load: what update_metric and target() look up.
        self._references: dict[str, tuple[str, ...]] = {}
        self._soft: dict[str, tuple[tuple[int, ...], tuple[float, ...]]] = {}
        # Raw answer -> normalised answer: ~10x fewer distinct answers than answers.
        self._normalized: dict[str, str] = {}

    # ---- files -----------------------------------------------------------------------------------
    def questions_path(self, split: str) -> Path:
        return self.root / self.questions_file.format(split=split)

    def annotations_path(self, split: str) -> Path:
        return self.root / self.annotations_file.format(split=split)

    def image_path(self, split: str, image_id: int) -> Path:
        image_split = self.image_splits.get(split, split)
        return self.root / self.image_file.format(split=split, image_split=image_split, image_id=image_id)

    def prepare_data(self) -> None:
        """The data is downloaded by hand; check the root exists so the error names the option."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"task.root={self.root} is not a directory (the {self.name} data folder)")

    # ---- parsing ---------------------------------------------------------------------------------
    def _normalize(self, answer: str) -> str:
        norm = self._normalized.get(answer)
        if norm is None:
            norm = self._normalized[answer] = normalize_answer(answer)
        return norm

    def _read_annotations(self, path: Path) -> dict[int, dict[str, Any]]:
        data = read_json(path, f"{self.name} annotations file")
        entries = field(data, "annotations", list, str(path), "a list of annotation objects")
        pool: dict[str, str] = {}  # one string object per distinct answer: ~4M answers, far fewer strings
        out = {}
        for i, ann in enumerate(entries):
            qid = field(ann, "question_id", int, f"{path}: annotations[{i}]", "an integer")
            where = f"{path}: annotation of question_id {qid}"
            answers = field(ann, "answers", list, where, "a non-empty list of {'answer': str} objects")
            if not answers:
                raise DataFormatError(f"{where}: key 'answers' is empty (expected the human answers)")
            texts = []
            for j, a in enumerate(answers):
                text = field(a, "answer", str, f"{where}, answers[{j}]", "a string")
                texts.append(pool.setdefault(text, text))
            answer_type = field(ann, "answer_type", str, where, f"one of {self._answer_types}")
            if answer_type not in self._answer_types:
                raise DataFormatError(
                    f"{where}: answer_type {answer_type!r} is not one of {self._answer_types} (task.answer_types)"
                )
            out[qid] = {
                "image_id": field(ann, "image_id", int, where, "an integer"),
                "answers": tuple(texts),
                "answer_type": answer_type,
                "multiple_choice": field(ann, "multiple_choice_answer", str, where, "a string"),
            }
        return out

    def _parse(self, split: str) -> list[_Row]:
        """Questions joined with their annotations; each question must have one (if the file exists)."""
        if split in self._rows:
            return self._rows[split]
        qpath, apath = self.questions_path(split), self.annotations_path(split)
        data = read_json(qpath, f"{self.name} questions file for split {split!r}")
        entries = field(data, "questions", list, str(qpath), "a list of question objects")
        annotations = None
        if apath.is_file() or split in (self.train_split, self.val_split):
            annotations = self._read_annotations(apath)
        else:
            log.warning("%s not found: split %r is unlabelled (no accuracy, predictions only)", apath, split)
        rows, seen = [], set()
        for i, q in enumerate(entries):
            qid = field(q, "question_id", int, f"{qpath}: questions[{i}]", "an integer")
            where = f"{qpath}: question_id {qid}"
            if qid in seen:
                raise DataFormatError(f"{where}: duplicate question_id")
            seen.add(qid)
            image_id = field(q, "image_id", int, where, "an integer (the COCO image id)")
            question = field(q, "question", str, where, "the question text")
            if annotations is None:
                rows.append(_Row(qid, image_id, question))
                continue
            ann = annotations.get(qid)
            if ann is None:
                raise DataFormatError(f"{apath}: no annotation for question_id {qid} (asked in {qpath})")
            if ann["image_id"] != image_id:
                raise DataFormatError(
                    f"{apath}: annotation of question_id {qid} has image_id {ann['image_id']}, "
                    f"the question in {qpath} has {image_id}"
                )
            rows.append(
                _Row(qid, image_id, question, ann["answer_type"], ann["answers"], ann["multiple_choice"])
            )
        self._rows[split] = rows
        return rows

    # ---- vocabulary ------------------------------------------------------------------------------
    def _count_training_answers(self) -> Counter[str]:
        # Every annotator's answer counts once, so answers several people give rank first.
        return Counter(self._normalize(a) for row in self._parse(self.train_split) for a in row.answers)

    def _load_vocab(self) -> list[str]:
        if self._vocab is None:
            source = self.annotations_path(self.train_split)
            path = self.vocab_file or vocab_cache_path(self.cache_dir, self.name, source, self.top_k)
            ranked = load_or_build_vocab(path, self._count_training_answers, self.top_k, source)
            self._vocab = [a for a, _ in ranked]
            self._vocab_counts = [c for _, c in ranked]
            self._label = {a: i for i, a in enumerate(self._vocab)}
            # What the official script compares a predicted vocabulary entry as (it normalises predictions).
            self._pred_norm = [normalize_answer(a) for a in self._vocab]
        return self._vocab

    @property
    def answers(self) -> list[str]:
        return list(self._load_vocab())

    @property
    def num_classes(self) -> int:
        return len(self._load_vocab())  # without copying the vocabulary (target() asks per sample)

    @property
    def answer_types(self) -> list[str]:
        return list(self._answer_types)

    # ---- examples --------------------------------------------------------------------------------
    def read_split(self, split: str) -> list[Example]:
        """All questions of ``split`` in file order."""
        self._load_vocab()
        rows = self._parse(split)
        examples = []
        for row in rows:
            qid = str(row.question_id)
            image_split = self.image_splits.get(split, split)
            if row.answers:
                self._references[qid] = official_references(row.answers)
                scores = soft_scores(self._normalize(a) for a in row.answers)
                known = sorted((self._label[a], s) for a, s in scores.items() if a in self._label and s > 0)
                self._soft[qid] = (tuple(i for i, _ in known), tuple(s for _, s in known))
            examples.append(
                Example(
                    question_id=qid,
                    image_key=f"{self.image_key_prefix}/{image_split}/{row.image_id}",
                    image_path=self.image_path(split, row.image_id),
                    question=row.question,
                    label=self._label.get(self._normalize(row.multiple_choice), -1) if row.answers else -1,
                    answer_type=row.answer_type,
                    answers=row.answers,
                )
            )
        del self._rows[split]  # the examples now hold everything
        return examples

    # ---- training and evaluation -----------------------------------------------------------------
    def target(self, example: Example) -> torch.Tensor:
        """Soft scores (C,) over the vocabulary; all -1 for an unannotated question (the loss skips it)."""
        soft = self._soft.get(example.question_id)
        if soft is None:
            return torch.full((self.num_classes,), -1.0)
        target = torch.zeros(self.num_classes)
        target[list(soft[0])] = torch.tensor(soft[1])
        return target

    def loss(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """BCE with logits, summed over answers, averaged over annotated questions (0 if there are none)."""
        targets = batch["targets"]
        annotated = targets[:, 0] >= 0
        if not bool(annotated.any()):
            return logits.sum() * 0.0  # keeps the graph; an unlabelled split has no loss
        bce = F.binary_cross_entropy_with_logits(logits[annotated].float(), targets[annotated], reduction="sum")
        return bce / annotated.sum()

    def metric(self) -> Metric:
        return VQAAccuracy(self._answer_types)

    def update_metric(self, metric: Metric, logits: torch.Tensor, batch: Mapping[str, Any]) -> None:
        """Score each annotated question's argmax answer against its human answers (looked up by id)."""
        self._load_vocab()
        scores, types = [], []
        preds = logits.argmax(-1).tolist()
        for qid, pred, answer_type in zip(batch["question_ids"], preds, batch["answer_types"].tolist(), strict=True):
            references = self._references.get(qid)
            if references:
                matches = references.count(self._pred_norm[pred])
                scores.append(leave_one_out_accuracy(matches, len(references)))
                types.append(answer_type)
        if scores:
            metric.update(torch.tensor(scores, dtype=torch.float64), torch.tensor(types, dtype=torch.long))

    def prediction_rows(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The official results format: ``{"question_id": int, "answer": str}``."""
        vocab = self._load_vocab()
        return [
            {"question_id": int(qid), "answer": vocab[i]}
            for qid, i in zip(batch["question_ids"], logits.argmax(-1).tolist(), strict=True)
        ]

    def majority_accuracy(self, split: str) -> float | None:
        """VQA accuracy on ``split`` of always giving the most frequent training answer (None if unlabelled)."""
        self._load_vocab()
        scored = [e for e in self.examples(split) if e.answers]
        if not scored:
            return None
        top = self._pred_norm[0]
        return sum(
            leave_one_out_accuracy(self._references[e.question_id].count(top), len(e.answers)) for e in scored
        ) / len(scored)
