"""What every task provides: its examples, its answer space, its loss and its metrics."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from fusion.io import write_text
from fusion.metrics.accuracy import AccuracyByType
from fusion.tasks.formats import DataFormatError


@dataclass(frozen=True)
class Example:
    """One question (statement, caption...) about one image.

    ``image_key`` is stable across runs and machines (it names the image, not the row), so the
    feature cache and prediction files can refer to it. ``label`` is the index of the answer in the
    task's vocabulary, -1 when there is none (an unlabelled test split, or an answer outside the
    vocabulary). ``answers`` are the reference answers a metric scores against when one label is not
    enough (VQA: the ten human answers). ``more_images`` are ``(image_key, image_path)`` pairs of further
    images after the first, for tasks that show the model several (NLVR2: the right image).
    """

    question_id: str
    image_key: str
    image_path: Path
    question: str
    label: int = -1
    answer_type: str = ""
    answers: tuple[str, ...] = ()
    more_images: tuple[tuple[str, Path], ...] = ()

    @property
    def images(self) -> tuple[tuple[str, Path], ...]:
        """Every ``(image_key, image_path)`` of the example, the first one first."""
        return ((self.image_key, self.image_path), *self.more_images)


class VLTask(ABC):
    """A vision-and-language task answered by classification over a fixed answer vocabulary.

    Subclasses say where their examples are (``examples(split)`` for any split name the data has; the
    splits used for training, validation and testing are attributes set from config) and may override
    the training target, the loss, the metric and the prediction file.

    An open-ended task (:attr:`open_ended`) can also be scored from generated answer strings, one per example
    (:meth:`update_metric_text`, :meth:`prediction_rows_text`): the same metric object and the same official
    prediction file as from logits, so a generating head and a classifier are scored alike.
    """

    name: str = "task"
    metric_name: str = "acc"
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    # The official prediction file eval.py writes next to metrics.json.
    prediction_file: str = "predictions.json"
    # Images per example; every encoder sees each of them and the model tells them apart (image index).
    images_per_example: int = 1
    open_ended: bool = False
    """True where the LM head generates the answer rather than ranking the answer list: the task is scored from
    the generated strings (:meth:`update_metric_text`, :meth:`prediction_rows_text`)."""

    @property
    @abstractmethod
    def answers(self) -> list[str]:
        """The answer vocabulary; the head predicts an index into it."""

    @property
    @abstractmethod
    def answer_types(self) -> list[str]:
        """Question/answer types the metrics are split by (e.g. ``color``, ``count``); may be empty."""

    @abstractmethod
    def prepare_data(self) -> None:
        """Make the data available on disk (generate or check it). Called once per node."""

    @abstractmethod
    def examples(self, split: str) -> list[Example]:
        """All examples of ``split``, in a fixed order."""

    @property
    def num_classes(self) -> int:
        return len(self.answers)

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits training uses: train, validation, test."""
        return (self.train_split, self.val_split, self.test_split)

    def is_labelled(self, split: str) -> bool:
        """Whether ``split`` has anything to score (a label or human answers); a split without any (VQAv2
        test-dev, GQA's submission questions) gets predictions only."""
        return any(e.label >= 0 or e.answers for e in self.examples(split))

    def check_split(self, split: str) -> None:
        """Fail early, naming the split, if its annotations cannot be read or are refused (``examples`` raises).

        Reads the annotations only, never the images (:meth:`check_images`).
        """
        try:
            self.examples(split)
        except (FileNotFoundError, ValueError) as err:
            # The message names the file; say which split it was read for. Only these exact types are
            # rebuilt with one message (a subclass may take other arguments).
            if type(err) not in (FileNotFoundError, ValueError, DataFormatError) or f"split {split!r}" in str(err):
                raise
            raise type(err)(f"split {split!r} of task {self.name!r}: {err}") from err

    def reference(self, split: str, example: Example) -> str:
        """Where ``split``'s annotation files refer to ``example`` (file and line or key), for error messages."""
        return f"question {example.question_id!r} of split {split!r}"

    def source(self, split: str) -> str:
        """Where ``split``'s annotations are read from (a file), for error messages about the whole split."""
        return f"task {self.name!r}"

    def check_images(self, split: str) -> None:
        """Fail, naming the annotation that refers to it, if an image file of ``split`` does not exist.

        Called where pixels are needed (the data module before an encoder runs online or a feature cache is
        built), not when a split is read: training from a complete feature cache needs no image files. One
        stat per distinct image (VQAv2 train: 443k questions on 83k images). Only existence is checked: an
        unreadable file still fails when it is decoded (:func:`fusion.data.images.load_image`), which would cost
        a full read of every image here.
        """
        first_use: dict[Path, Example] = {}
        for example in self.examples(split):
            for _, path in example.images:
                first_use.setdefault(path, example)
        missing = [path for path in first_use if not path.is_file()]
        if not missing:
            return
        path = missing[0]
        # Only the first is traced: a reference may mean re-reading an annotation file.
        message = f"image file not found: {path} (referred to by {self.reference(split, first_use[path])})"
        if len(missing) > 1:
            shown = ", ".join(map(str, missing[1:4])) + (", ..." if len(missing) > 4 else "")
            message += f"; {len(missing) - 1} more image file(s) of split {split!r} missing: {shown}"
        raise FileNotFoundError(message)

    def target(self, example: Example) -> int | torch.Tensor:
        """What the loss trains towards for ``example``: the label index (soft scores in VQA)."""
        return example.label

    def loss(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """Cross-entropy over the answer vocabulary; examples without a label (-1) are ignored.

        ``logits`` (B, C); ``batch["targets"]`` (B,) long.
        """
        return F.cross_entropy(logits, batch["targets"], ignore_index=-1)

    def metric(self) -> Metric:
        """A fresh metric; ``compute()`` gives ``{"": headline, "<sub-metric>": value, ...}``."""
        return AccuracyByType(self.answer_types)

    def update_metric(self, metric: Metric, logits: torch.Tensor, batch: Mapping[str, Any]) -> None:
        """Feed one batch's predictions to ``metric`` (made by :meth:`metric`)."""
        metric.update(logits.argmax(-1), batch["labels"], batch["answer_types"])

    def prediction_rows(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        """One row per example of the official prediction file."""
        return [
            {"question_id": qid, "answer": self.answers[i]}
            for qid, i in zip(batch["question_ids"], logits.argmax(-1).tolist(), strict=True)
        ]

    def update_metric_text(self, metric: Metric, predictions: Sequence[str], batch: Mapping[str, Any]) -> None:
        """Feed one batch's generated answers (one string per example) to ``metric`` (made by :meth:`metric`),
        as :meth:`update_metric` feeds the argmax answers.

        Here: a prediction that equals a vocabulary entry (``self.answers``) character for character (exact,
        case-sensitive string equality, no stripping or normalisation: the caller passes the decoded answer)
        counts as that entry, scored against the label as the logits path scores it; any other string is wrong
        (it never equals a label, -1 included). Tasks whose official metric compares strings otherwise override
        this (VQA: the official answer processing; GQA: the string itself).
        """
        self._check_text_default("update_metric_text", "metric", "update_metric")
        index: dict[str, int] = {}
        for i, answer in enumerate(self.answers):
            index.setdefault(answer, i)
        labels = batch["labels"]
        preds = torch.tensor([index.get(p, _NO_ANSWER) for p in text_predictions(predictions, labels.shape[0])],
                             dtype=torch.long, device=labels.device)
        metric.update(preds, labels, batch["answer_types"])

    def prediction_rows_text(self, predictions: Sequence[str], batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        """One row per example of the official prediction file, from one generated answer string per example (as
        :meth:`prediction_rows` from logits). Here: ``{"question_id": ..., "answer": <the string as given>}``."""
        self._check_text_default("prediction_rows_text", "prediction_rows")
        qids = batch["question_ids"]
        return [
            {"question_id": qid, "answer": text}
            for qid, text in zip(qids, text_predictions(predictions, len(qids)), strict=True)
        ]

    def _check_text_default(self, method: str, *logits_methods: str) -> None:
        """Refuse the default text scoring for a task that changed the logits path it mirrors (its own metric or
        prediction format): the default would score or write something else than the task's official one."""
        changed = [m for m in logits_methods if getattr(type(self), m) is not getattr(VLTask, m)]
        if changed:
            raise NotImplementedError(
                f"task {self.name!r} ({type(self).__name__}) overrides {', '.join(changed)} but not {method}: "
                "generated answers cannot be scored or written as the task's official metric and prediction file "
                "do; override it (open-ended tasks) or score the answer list from logits"
            )

    def write_predictions(self, rows: list[dict[str, Any]], path: Path) -> None:
        """Write the rows in the task's official format (a JSON list by default), atomically."""
        write_text(path, json.dumps(rows, indent=1))

    def answer_accuracy(self, example: Example, answer: int) -> float | None:
        """The metric's score of vocabulary entry ``answer`` as the prediction for ``example``; None if the
        example is not scored. Exact match with the label here (VQA: the official accuracy against its answers)."""
        return None if example.label < 0 else float(answer == example.label)

    def majority_accuracy(self, split: str) -> float | None:
        """Accuracy on ``split`` of always answering the most frequent training answer (None if unlabelled)."""
        target = [e.label for e in self.examples(split) if e.label >= 0]
        if not target:
            return None
        train = [e.label for e in self.examples(self.train_split) if e.label >= 0]
        if not train:
            return None
        majority = int(torch.bincount(torch.tensor(train), minlength=self.num_classes).argmax())
        return sum(t == majority for t in target) / len(target)


# The class index of a generated answer outside the vocabulary: never a label (unlabelled examples have -1).
_NO_ANSWER = -2


def text_predictions(predictions: Sequence[str], n: int) -> list[str]:
    """Generated answers as a list, checked: one string per example of a batch of ``n`` examples."""
    out = list(predictions)
    if len(out) != n:
        raise ValueError(f"{len(out)} predicted answers for a batch of {n} examples")
    bad = next((p for p in out if not isinstance(p, str)), None)
    if bad is not None:
        raise TypeError(f"predicted answers must be strings, got {type(bad).__name__} {bad!r}")
    return out


class FileTask(VLTask):
    """A task whose examples are read from files under ``root``; each split is read once per instance.

    Subclasses implement :meth:`read_split`; :meth:`examples` returns a fresh list of its cached result.
    They may override :meth:`reference` so that a missing image is traced to its line or key in the
    annotation files (:meth:`VLTask.check_images`).
    """

    def __init__(
        self, root: str | Path, train_split: str = "train", val_split: str = "val", test_split: str = "test"
    ) -> None:
        self.root = resolve_root(root)
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split
        self._examples: dict[str, list[Example]] = {}

    @abstractmethod
    def read_split(self, split: str) -> list[Example]:
        """Read (parse, check) every example of ``split``, in a fixed order."""

    def source(self, split: str) -> str:
        # Subclasses name the file; this names at least the folder.
        return f"task.root={self.root}"

    def examples(self, split: str) -> list[Example]:
        """All examples of ``split`` (read and checked once; :func:`check_examples`), in a fixed order."""
        if split not in self._examples:
            examples = self.read_split(split)
            check_examples(self, split, examples)
            self._examples[split] = examples
        return list(self._examples[split])


class FixedLabelTask(FileTask):
    """A file task that classifies into a fixed set of ``labels`` (binary, entailment, match / no match) and
    splits its metrics by no answer type unless it says otherwise."""

    labels: tuple[str, ...] = ()

    @property
    def answers(self) -> list[str]:
        return list(self.labels)

    @property
    def answer_types(self) -> list[str]:
        return []


def check_examples(task: VLTask, split: str, examples: list[Example]) -> None:
    """Refuse a split that has no example, an id twice or an empty question text, naming the file and line or id.

    One check for every task: an empty split would give an empty ``metrics.json`` and a run that looks
    fine; the ids are the rows of the prediction file (and what metrics look answers up by), so a repeated one
    would silently score or submit one example as another; an empty text gives the model nothing to read.
    """
    if not examples:
        raise DataFormatError(f"{task.source(split)}: split {split!r} of task {task.name!r} has no examples; "
                              "expected at least one")
    first: dict[str, int] = {}
    for i, example in enumerate(examples):
        qid = example.question_id
        if first.setdefault(qid, i) != i:
            # Traced only when refused: a reference may re-read an annotation file.
            raise DataFormatError(
                f"{task.reference(split, example)}: id {qid!r} occurs more than once in split {split!r} "
                f"(examples {first[qid]} and {i} of the split); expected unique ids, the rows of the prediction file"
            )
        if not example.question.strip():
            raise DataFormatError(
                f"{task.reference(split, example)}: the text of {qid!r} is empty (split {split!r}); "
                "expected a question, statement or caption"
            )


def resolve_root(root: str | Path) -> Path:
    """The data root as an absolute path (Hydra changes nothing about cwd, but users pass ``~``)."""
    return Path(root).expanduser().resolve()
