"""GQA (Hudson & Manning 2019) from the official ``<split>_balanced_questions.json`` files.

Metrics: GQA's official measures as its evaluation script ``eval.py`` computes them (see
:mod:`fusion.metrics.gqa_official` for the rules): accuracy (headline ``acc``), ``acc_binary``, ``acc_open``,
accuracy per structural type (``acc_<type>``), per semantic type (``acc_semantic_<type>``), per number of
reasoning steps (``acc_steps_<n>``) and of words (``acc_words_<n>``), and, where the files allow them:

- ``acc_consistency`` over the entailed questions of the balanced ones. Those that are not in the split's own
  file are read from ``<split>_all_questions.json`` (``all_questions_file``) and added to the evaluated split:
  they are predicted (and written to the prediction file) but scored only through consistency. Without that
  file, or with ``consistency=False``, consistency is not computed and the log says so;
- ``acc_validity`` and ``acc_plausibility`` from the first of ``choices_files`` (``<split>_choices.json``,
  then ``challenge_all_choices.json``) that has an entry for every balanced question of the split; without
  one the log says so;
- ``acc_distribution``: the chi-square distribution measure (lower is better; not a fraction).

Grounding needs the model's attention maps and the scene graphs: it is not computed (logged). The entailed
questions are not added to the training split (never scored); an evaluation of the training split gets every
measure but consistency, validity and plausibility. The prediction file is the official submission format.

Cost: on GQA's val and testdev the entailed questions outnumber the balanced ones several times, and reading
``val_all_questions.json`` takes memory and time in every process; each evaluation (every validation epoch
too) predicts them all. ``task.consistency=false`` evaluates the balanced questions only.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from fusion.metrics.gqa import GQAMetric
from fusion.metrics.gqa_official import GQAQuestion, question_record
from fusion.tasks.answer_vocab import VocabTask
from fusion.tasks.base import Example, text_predictions
from fusion.tasks.formats import DataFormatError, check_pattern, field, read_json

log = logging.getLogger(__name__)

STRUCTURAL_TYPES = ("verify", "query", "choose", "logical", "compare")
CHOICES_FILES = ("{split}_choices.json", "challenge_all_choices.json")

# (question_id, image_id, question, answer or None, structural type, balanced)
Row = tuple[str, str, str, str | None, str, bool]


class GQATask(VocabTask):
    """GQA questions below ``root``: ``<split>_balanced_questions.json`` and ``images/<imageId>.jpg``.

    A split whose file has no ``answer`` at all (the test / challenge / submission questions) is
    unlabelled: label -1, not scored, predictions only. In a labelled file every question needs its
    ``answer`` and ``types.structural``; an answer outside the vocabulary has label -1 and counts as wrong.
    Only questions with ``isBalanced`` true (or without the key) are scored, as by the official script; the
    others still train (a questions file of all questions).

    Open-ended: a generated answer string is scored as it is, as the official script compares a prediction
    (exact string equality, no normalisation), so a string outside the vocabulary scores where it is the answer.
    """

    name = "gqa"
    open_ended = True

    def __init__(
        self,
        root: str | Path,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "testdev",
        questions_file: str = "{split}_balanced_questions.json",
        split_files: Mapping[str, str] | None = None,
        image_file: str = "images/{image_id}.jpg",
        top_k: int | None = None,
        vocab_file: str | Path | None = None,
        cache_dir: str | Path | None = None,
        answer_types: Sequence[str] = STRUCTURAL_TYPES,
        all_questions_file: str | None = "{split}_all_questions.json",
        choices_files: Sequence[str] = CHOICES_FILES,
        consistency: bool = True,
    ) -> None:
        check_pattern("questions_file", questions_file, split="x")
        check_pattern("image_file", image_file, split="x", image_id="x")
        if all_questions_file is not None:
            check_pattern("all_questions_file", all_questions_file, split="x")
        for pattern in choices_files:
            check_pattern("choices_files", pattern, split="x")
        super().__init__(root, train_split, val_split, test_split, top_k=top_k, vocab_file=vocab_file,
                         cache_dir=cache_dir, answer_types=answer_types)
        self.questions_file = questions_file
        # Splits named outside the pattern (submission_all_questions.json, ...).
        self.split_files = dict(split_files or {})
        self.image_file = image_file
        self.all_questions_file = all_questions_file
        self.choices_files = list(choices_files)
        self.consistency = consistency
        self._rows: dict[str, list[Row]] = {}
        # Question ids of the labelled balanced questions loaded so far: the ones the metric scores.
        self._scored: set[str] = set()
        # What the official measures read of the labelled questions of every split read but the training split
        # (its on demand: official_questions) and of the entailed questions added to those splits.
        self._official: dict[str, GQAQuestion] = {}
        self._official_splits: set[str] = set()
        # Per split, the entailed questions added from its all-questions file.
        self._added: dict[str, set[str]] = {}

    def questions_path(self, split: str) -> Path:
        name = self.split_files.get(split) or self.questions_file.format(split=split)
        return self.root / name

    def all_questions_path(self, split: str) -> Path | None:
        """``<split>_all_questions.json`` (``all_questions_file``), where the entailed questions are."""
        return self.root / self.all_questions_file.format(split=split) if self.all_questions_file else None

    def image_path(self, split: str, image_id: str) -> Path:
        return self.root / self.image_file.format(split=split, image_id=image_id)

    def prepare_data(self) -> None:
        """The data is downloaded by hand; check the root exists so the error names the option."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"task.root={self.root} is not a directory (the GQA data folder)")

    def _read(self, split: str, official: bool) -> tuple[list[Row], dict[str, GQAQuestion]]:
        """The rows of ``split`` in file order and, if ``official``, what the official measures read of each
        labelled question."""
        path = self.questions_path(split)
        data = _read_object(path, f"GQA questions file for split {split!r}", "question")
        labelled = any(isinstance(q, Mapping) and "answer" in q for q in data.values())
        if not labelled and split in (self.train_split, self.val_split):
            raise DataFormatError(f"{path}: no question has an 'answer', but split {split!r} is used for training")
        rows: list[Row] = []
        records: dict[str, GQAQuestion] = {}
        for qid, q in data.items():
            where = f"{path}: question {qid!r}"
            image_id = field(q, "imageId", str, where, "the image id (a string)")
            question = field(q, "question", str, where, "the question text")
            answer, structural, balanced = None, "", False
            if labelled:
                answer = field(q, "answer", str, where, "the answer (a string), as every question of this file has")
                types = field(q, "types", Mapping, where, "an object with a 'structural' type")
                structural = field(types, "structural", str, f"{where}, 'types'", f"one of {self._answer_types}")
                if structural not in self._answer_types:
                    raise DataFormatError(
                        f"{where}: types.structural {structural!r} is not one of {self._answer_types} "
                        "(task.answer_types)"
                    )
                balanced = q.get("isBalanced", True)
                if not isinstance(balanced, bool):
                    raise DataFormatError(f"{where}: key 'isBalanced' is {balanced!r}, expected true or false")
                if official:
                    records[qid] = question_record(q, where, structural, answer)
            rows.append((qid, image_id, question, answer, structural, balanced))
        return rows, records

    def _parse(self, split: str) -> list[Row]:
        """The rows of ``split``, kept until :meth:`read_split` (the training split is read for the vocabulary
        first)."""
        if split not in self._rows:
            self._rows[split] = self._read(split, official=False)[0]
        return self._rows[split]

    def _vocab_source(self) -> Path:
        return self.questions_path(self.train_split)

    def _count_training_answers(self) -> Counter[str]:
        return Counter(row[3] for row in self._parse(self.train_split))

    def read_split(self, split: str) -> list[Example]:
        """All questions of ``split`` in file order, then the entailed questions added for consistency."""
        self._load_vocab()
        if split == self.train_split:
            rows, official = self._parse(split), {}
            del self._rows[split]
        else:
            rows, official = self._read(split, official=True)
            self._rows.pop(split, None)
        examples = []
        for qid, image_id, question, answer, structural, balanced in rows:
            if answer is not None and balanced:
                self._scored.add(qid)
            examples.append(
                Example(
                    question_id=qid,
                    image_key=f"gqa/{image_id}",
                    image_path=self.image_path(split, image_id),
                    question=question,
                    label=self._label.get(answer, -1) if answer is not None else -1,
                    answer_type=structural,
                    answers=(answer,) if answer is not None else (),
                )
            )
        if official:
            examples += self._entailed_questions(split, official)
            self._add_choices(split, official)
            log.info("split %s: GQA grounding not computed (it needs the model's attention maps)", split)
            self._official.update(official)
            self._official_splits.add(split)
        return examples

    def _entailed_questions(self, split: str, official: dict[str, GQAQuestion]) -> list[Example]:
        """The entailed questions of the balanced questions of ``split`` that its file does not hold, read from its
        all-questions file, as unlabelled examples (their answers go into ``official``). Where they cannot all be
        read, consistency is not computed: every question's ``entailed`` becomes None, and the log says why."""
        balanced = [q for q, r in official.items() if r.balanced]
        # In order of first mention, so that the examples come in a fixed order.
        needed = dict.fromkeys(e for q in balanced for e in official[q].entailed or () if e != q and e not in official)
        path = self.all_questions_path(split)

        def skip(reason: str, *args: Any) -> list[Example]:
            log.info("split %s: GQA consistency not computed: " + reason, split, *args)
            for q in balanced:
                official[q] = dataclasses.replace(official[q], entailed=None)
            return []

        if not self.consistency:
            return skip("task.consistency is false")
        if not any(e != q for q in balanced for e in official[q].entailed or ()):
            return skip("no balanced question of %s lists entailed questions", self.questions_path(split))
        if not needed:
            return []
        if path is None or not path.is_file():
            return skip("%s absent (it holds %d entailed questions not in %s)", path or "task.all_questions_file=null",
                        len(needed), self.questions_path(split))
        data = _read_object(path, f"GQA all-questions file for split {split!r}", "question")
        absent = next((e for e in needed if e not in data), None)
        if absent is not None:
            return skip("entailed question %r is not in %s", absent, path)
        examples = []
        for eid in needed:
            entry, where = data[eid], f"{path}: question {eid!r}"
            image_id = field(entry, "imageId", str, where, "the image id (a string)")
            answer = field(entry, "answer", str, where, "the answer (a string)")
            types = entry.get("types") if isinstance(entry.get("types"), Mapping) else {}
            structural = types.get("structural") if types.get("structural") in self._answer_types else ""
            official[eid] = GQAQuestion(answer=answer, structural=structural, balanced=False)
            examples.append(
                Example(
                    question_id=eid,
                    image_key=f"gqa/{image_id}",
                    image_path=self.image_path(split, image_id),
                    question=field(entry, "question", str, where, "the question text"),
                    answer_type=structural,
                )
            )
        self._added[split] = set(needed)
        log.info("split %s: %d entailed questions from %s added for consistency (predicted, scored only through "
                 "consistency)", split, len(examples), path)
        return examples

    def _add_choices(self, split: str, official: dict[str, GQAQuestion]) -> None:
        """Each balanced question's ``valid`` and ``plausible`` answers from the first of ``choices_files`` that
        has them all; without one, validity and plausibility are not computed and the log says why."""
        balanced = [q for q, r in official.items() if r.balanced]
        paths = [self.root / pattern.format(split=split) for pattern in self.choices_files]
        for path in paths:
            if not path.is_file():
                continue
            data = _read_object(path, f"GQA choices file for split {split!r}", "choices")
            absent = next((q for q in balanced if q not in data), None)
            if absent is not None:
                log.info("split %s: %s has no choices for question %r; not used", split, path, absent)
                continue
            # The same lists recur for many questions (every color question's valid answers): one set each.
            shared: dict[frozenset[str], frozenset[str]] = {}
            for qid in balanced:
                where = f"{path}: question {qid!r}"
                lists = {
                    key: field(data[qid], key, list, where, "a list of answers") for key in ("valid", "plausible")
                }
                sets = {k: shared.setdefault(frozenset(v), frozenset(v)) for k, v in lists.items()}
                official[qid] = dataclasses.replace(official[qid], **sets)
            log.info("split %s: GQA validity and plausibility from %s", split, path)
            return
        if balanced:
            absent = ", ".join(str(p) for p in paths if not p.is_file()) or "none"
            log.info("split %s: GQA validity and plausibility not computed: no choices file has all its questions "
                     "(absent: %s)", split, absent)

    def official_questions(self, question_ids: Collection[str]) -> Mapping[str, GQAQuestion]:
        """What the official measures read of the questions read so far, including ``question_ids``: the
        training split's are read on demand (an evaluation of the training split), without consistency and
        choices."""
        train = self.train_split
        if train in self._examples and train not in self._official_splits:
            if any(q not in self._official for q in question_ids):
                official = self._read(train, official=True)[1]
                log.info("split %s: GQA consistency, validity and plausibility are not computed on the training "
                         "split", train)
                self._official.update({q: dataclasses.replace(r, entailed=None) for q, r in official.items()})
                self._official_splits.add(train)
        return self._official

    def reference(self, split: str, example: Example) -> str:
        if example.question_id in self._added.get(split, ()):
            return f"{self.all_questions_path(split)}: question {example.question_id!r}"
        return f"{self.questions_path(split)}: question {example.question_id!r}"

    def source(self, split: str) -> str:
        return str(self.questions_path(split))

    def loss(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """Cross-entropy over the vocabulary; 0 for a batch without any answer in the vocabulary."""
        labels = batch["targets"]
        if not bool((labels >= 0).any()):
            return logits.sum() * 0.0  # cross_entropy would give nan (a mean over nothing)
        return F.cross_entropy(logits, labels, ignore_index=-1)

    def metric(self) -> Metric:
        return GQAMetric(self._load_vocab(), self.official_questions)

    def _kept(self, question_ids: Sequence[str]) -> list[bool]:
        """Which questions the metric needs: the scored ones and those their consistency looks at."""
        return [q in self._scored or q in self._official for q in question_ids]

    def update_metric(self, metric: Metric, logits: torch.Tensor, batch: Mapping[str, Any]) -> None:
        """The predictions of the scored questions and of the questions their consistency looks at."""
        keep = self._kept(batch["question_ids"])
        if any(keep):
            qids = [q for q, k in zip(batch["question_ids"], keep, strict=True) if k]
            metric.update(qids, logits.argmax(-1)[torch.tensor(keep, device=logits.device)])

    def update_metric_text(self, metric: Metric, predictions: Sequence[str], batch: Mapping[str, Any]) -> None:
        """The generated answers (one string per example) of the questions :meth:`update_metric` keeps, scored as
        the strings they are (:meth:`GQAMetric.update_text <fusion.metrics.gqa.GQAMetric.update_text>`)."""
        qids = batch["question_ids"]
        texts = text_predictions(predictions, len(qids))
        keep = self._kept(qids)
        if any(keep):
            metric.update_text([q for q, k in zip(qids, keep, strict=True) if k],
                               [t for t, k in zip(texts, keep, strict=True) if k])

    def prediction_rows(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The official submission format: ``{"questionId": str, "prediction": str}``."""
        vocab = self._load_vocab()
        return [
            {"questionId": qid, "prediction": vocab[i]}
            for qid, i in zip(batch["question_ids"], logits.argmax(-1).tolist(), strict=True)
        ]

    def prediction_rows_text(self, predictions: Sequence[str], batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The official submission format, ``{"questionId": str, "prediction": str}``, with the generated string
        as it is."""
        qids = batch["question_ids"]
        return [
            {"questionId": qid, "prediction": text}
            for qid, text in zip(qids, text_predictions(predictions, len(qids)), strict=True)
        ]

    def majority_accuracy(self, split: str) -> float | None:
        """Accuracy on the scored questions of ``split`` of always giving the most frequent training answer
        (vocabulary entry 0)."""
        self._load_vocab()
        scored = [e for e in self.examples(split) if e.answers and e.question_id in self._scored]
        if not scored:
            return None
        return sum(e.label == 0 for e in scored) / len(scored)


def _read_object(path: Path, what: str, value: str) -> dict[str, Any]:
    """A JSON file that must hold one object ``{question_id: <value>}``."""
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise DataFormatError(f"{path}: expected a JSON object {{question_id: {value}}}, got {type(data).__name__}")
    return data
