"""VQAv2 and OK-VQA from the official question/annotation JSON files, trained on soft VQA scores.

One loader serves both (OK-VQA uses the VQA file format); the file-name patterns are constructor
arguments, so ``conf/task/okvqa.yaml`` only changes them. The answer vocabulary is the top-K
normalised training answers, cached as JSON (see :class:`fusion.tasks.answer_vocab.VocabTask`).

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

from fusion.metrics.vqa import References, VQAAccuracy, clean, normalize_answer
from fusion.tasks.answer_vocab import VocabTask
from fusion.tasks.base import Example, text_predictions
from fusion.tasks.formats import DataFormatError, check_pattern, field, read_json

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
    references: References | None = None  # the answers as the official evaluator compares them


class VQATask(VocabTask):
    """VQA-format data (VQAv2, OK-VQA) below ``root``; splits are the names in the file names.

    The vocabulary, the training targets, the label and the majority baseline all use the human answers
    in the form the official evaluator compares them (:class:`~fusion.metrics.vqa.References`:
    cleaned, and processed only when a question's annotators disagree), and every vocabulary entry's target
    on a question is exactly the official accuracy the evaluator gives that entry as the prediction: the
    answer the model is trained towards is the one the evaluator rewards. The loss is binary cross-entropy
    with logits summed over classes and averaged over examples (= mean x num_classes, as in bottom-up
    attention / ViLT). The metric is the official VQA accuracy, overall and per answer type.
    A split other than the train/val splits may
    lack its annotations file (VQAv2 test-dev): its examples have label -1 and no answers.

    Open-ended: a generated answer string is scored by the same official accuracy, processed as the evaluator
    processes a prediction, so a string outside the vocabulary scores where it matches the human answers.
    """

    name = "vqa"
    open_ended = True

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
        check_pattern("questions_file", questions_file, split="x")
        check_pattern("annotations_file", annotations_file, split="x")
        check_pattern("image_file", image_file, split="x", image_split="x", image_id=1)
        super().__init__(root, train_split, val_split, test_split, top_k=top_k, vocab_file=vocab_file,
                         cache_dir=cache_dir, answer_types=answer_types)
        self.name = name
        self.questions_file = questions_file
        self.annotations_file = annotations_file
        self.image_file = image_file
        # Splits whose images live in another split's folder (test-dev2015 questions use test2015 images).
        self.image_splits = dict(image_splits or {})
        self.image_key_prefix = image_key_prefix
        self._vocab_counts: list[int] = []
        # Each vocabulary entry as the evaluator compares it: (cleaned, processed), and the entries by form.
        self._pred_forms: list[tuple[str, str]] = []
        self._by_clean: dict[str, list[int]] = {}
        self._by_normalized: dict[str, list[int]] = {}
        self._rows: dict[str, list[_Row]] = {}
        # Per question id (str), filled as splits load: what update_metric and target() look up.
        self._references: dict[str, References] = {}
        self._soft: dict[str, tuple[tuple[int, ...], tuple[float, ...]]] = {}
        # Raw answer -> processed answer: ~10x fewer distinct answers than answers.
        self._normalized: dict[str, str] = {}
        self._pool: dict[str, str] = {}  # one object per distinct answer string in the references

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

    def _intern(self, references: References) -> References:
        """Share one string object per distinct processed answer (VQAv2 train: 4.4M answers)."""
        pool = self._pool
        return References(
            tuple(pool.setdefault(a, a) for a in references.answers), references.normalized, references.ties
        )

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
            if qid in out:
                raise DataFormatError(f"{where}: question_id annotated twice (annotations[{i}] repeats it)")
            answer_type = field(ann, "answer_type", str, where, f"one of {self._answer_types}")
            if answer_type not in self._answer_types:
                raise DataFormatError(
                    f"{where}: answer_type {answer_type!r} is not one of {self._answer_types} (task.answer_types)"
                )
            out[qid] = {
                "image_id": field(ann, "image_id", int, where, "an integer"),
                "answers": tuple(texts),
                "references": self._intern(References.from_entries(answers, self._normalize)),
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
                _Row(
                    qid, image_id, question, ann["answer_type"], ann["answers"], ann["multiple_choice"],
                    ann["references"],
                )
            )
        self._rows[split] = rows
        return rows

    # ---- vocabulary ------------------------------------------------------------------------------
    def _count_training_answers(self) -> Counter[str]:
        # Every annotator's answer counts once, in the form the evaluator compares it, so that answers several
        # people give rank first and every entry is a string the evaluator can reward.
        return Counter(a for row in self._parse(self.train_split) if row.references for a in row.references.answers)

    def _vocab_source(self) -> Path:
        return self.annotations_path(self.train_split)

    def _on_vocab(self, ranked: list[tuple[str, int]]) -> None:
        self._vocab_counts = [c for _, c in ranked]
        # A prediction is cleaned, and processed too where the annotators disagree: both forms, once.
        self._pred_forms = [(clean(a), self._normalize(a)) for a, _ in ranked]
        self._by_clean, self._by_normalized = {}, {}
        for i, (cleaned, normalized) in enumerate(self._pred_forms):
            self._by_clean.setdefault(cleaned, []).append(i)
            self._by_normalized.setdefault(normalized, []).append(i)

    # ---- examples --------------------------------------------------------------------------------
    def read_split(self, split: str) -> list[Example]:
        """All questions of ``split`` in file order."""
        self._load_vocab()
        rows = self._parse(split)
        examples = []
        for row in rows:
            qid = str(row.question_id)
            image_split = self.image_splits.get(split, split)
            refs = row.references
            if refs is not None:
                self._references[qid] = refs
                self._soft[qid] = self._soft_targets(refs)
            examples.append(
                Example(
                    question_id=qid,
                    image_key=f"{self.image_key_prefix}/{image_split}/{row.image_id}",
                    image_path=self.image_path(split, row.image_id),
                    question=row.question,
                    label=self._label.get(refs.form(row.multiple_choice), -1) if refs is not None else -1,
                    answer_type=row.answer_type,
                    answers=row.answers,
                )
            )
        del self._rows[split]  # the examples now hold everything
        return examples

    def _soft_targets(self, refs: References) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """The vocabulary entries the evaluator rewards on a question, with the accuracy it gives each.

        An entry scores only if its form (processed or cleaned, as the question's annotators agree or not)
        equals one of the answers, so only those entries are scored; several entries may share a form.
        """
        by_form = self._by_normalized if refs.normalized else self._by_clean
        side = 1 if refs.normalized else 0
        known = []
        for form in set(refs.answers):
            for i in by_form.get(form, ()):
                score = refs.score_form(self._pred_forms[i][side])
                if score > 0:
                    known.append((i, score))
        known.sort()
        return tuple(i for i, _ in known), tuple(s for _, s in known)

    def _score(self, refs: References, entry: int) -> float:
        """The official accuracy of vocabulary entry ``entry`` as the prediction for a question."""
        return refs.score_form(self._pred_forms[entry][1 if refs.normalized else 0])

    def answer_accuracy(self, example: Example, answer: int) -> float | None:
        """The official VQA accuracy of vocabulary entry ``answer`` on ``example`` (None if unannotated)."""
        self._load_vocab()
        refs = self._references.get(example.question_id)
        return None if refs is None else self._score(refs, answer)

    def reference(self, split: str, example: Example) -> str:
        return f"{self.questions_path(split)}: question_id {example.question_id}"

    def source(self, split: str) -> str:
        return str(self.questions_path(split))

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
            if references is not None:
                scores.append(self._score(references, pred))
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

    def update_metric_text(self, metric: Metric, predictions: Sequence[str], batch: Mapping[str, Any]) -> None:
        """Score each annotated question's generated answer with the official VQA accuracy
        (:meth:`References.score <fusion.metrics.vqa.References.score>`: the raw string, cleaned and, where the
        annotators disagree, processed as the evaluator processes a prediction). A vocabulary entry scores exactly
        as :meth:`update_metric` scores it."""
        qids = batch["question_ids"]
        scores, types = [], []
        for qid, text, answer_type in zip(
            qids, text_predictions(predictions, len(qids)), batch["answer_types"].tolist(), strict=True
        ):
            references = self._references.get(qid)
            if references is not None:
                scores.append(references.score(text))
                types.append(answer_type)
        if scores:
            metric.update(torch.tensor(scores, dtype=torch.float64), torch.tensor(types, dtype=torch.long))

    def prediction_rows_text(self, predictions: Sequence[str], batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The official results format, ``{"question_id": int, "answer": str}``, with the generated string as it is
        (the evaluator processes it when it scores)."""
        qids = batch["question_ids"]
        return [
            {"question_id": int(qid), "answer": text}
            for qid, text in zip(qids, text_predictions(predictions, len(qids)), strict=True)
        ]

    def majority_accuracy(self, split: str) -> float | None:
        """VQA accuracy on ``split`` of always giving the most frequent training answer (None if unlabelled)."""
        self._load_vocab()
        scored = [e for e in self.examples(split) if e.answers]
        if not scored:
            return None
        return sum(self._score(self._references[e.question_id], 0) for e in scored) / len(scored)
