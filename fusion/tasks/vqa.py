"""VQAv2 and OK-VQA from the official question/annotation JSON files, trained on soft VQA scores.

One loader serves both (OK-VQA uses the VQA file format); the file-name patterns are constructor
arguments, so ``conf/task/okvqa.yaml`` only changes them. The answer vocabulary is the top-K
normalised training answers, cached as JSON (see :func:`load_or_build_vocab`).

JSON reading (:mod:`fusion.tasks.formats`) and the vocabulary cache (:mod:`fusion.tasks.answer_vocab`) are
shared with :mod:`fusion.tasks.gqa`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from fusion.tasks.answer_vocab import load_or_build_vocab, vocab_cache_path
from fusion.tasks.base import Example, FileTask
from fusion.tasks.formats import DataFormatError, check_pattern, field, read_json
from fusion.tasks.vqa_metric import (
    VQAAccuracy,
    leave_one_out_accuracy,
    normalize_answer,
    official_references,
    soft_scores,
)

log = logging.getLogger(__name__)

ANSWER_TYPES = ("yes/no", "number", "other")


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

    def reference(self, split: str, example: Example) -> str:
        return f"{self.questions_path(split)}: question_id {example.question_id}"

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
