"""GQA (Hudson & Manning 2019) from the official ``<split>_balanced_questions.json`` files.

Exact-match accuracy over an answer vocabulary of the training answers (all, or the top-K), overall
and per structural type (verify, query, choose, logical, compare). GQA's other official measures
(consistency, validity, plausibility, grounding, distribution) need the scene graphs and are not
computed here; the prediction file is the official submission format.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from fusion.tasks.answer_vocab import load_or_build_vocab, vocab_cache_path
from fusion.tasks.base import Example, FileTask
from fusion.tasks.formats import DataFormatError, check_pattern, field, read_json

STRUCTURAL_TYPES = ("verify", "query", "choose", "logical", "compare")


class GQATask(FileTask):
    """GQA questions below ``root``: ``<split>_balanced_questions.json`` and ``images/<imageId>.jpg``.

    A split whose file has no ``answer`` at all (the test / challenge / submission questions) is
    unlabelled: label -1, not scored, predictions only. In a labelled file every question needs its
    ``answer`` and ``types.structural``; an answer outside the vocabulary has label -1 and counts as wrong.
    """

    name = "gqa"

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
    ) -> None:
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or null (all answers), got {top_k!r}")
        check_pattern("questions_file", questions_file, split="x")
        check_pattern("image_file", image_file, split="x", image_id="x")
        super().__init__(root, train_split, val_split, test_split)
        self.questions_file = questions_file
        # Splits named outside the pattern (submission_all_questions.json, ...).
        self.split_files = dict(split_files or {})
        self.image_file = image_file
        self.top_k = top_k
        self.vocab_file = Path(vocab_file).expanduser() if vocab_file else None
        self.cache_dir = cache_dir
        self._answer_types = list(answer_types)
        self._vocab: list[str] | None = None
        self._label: dict[str, int] = {}
        self._rows: dict[str, list[tuple[str, str, str, str | None, str]]] = {}
        # Question ids of the labelled examples loaded so far: the ones the metric scores.
        self._scored: set[str] = set()

    def questions_path(self, split: str) -> Path:
        name = self.split_files.get(split) or self.questions_file.format(split=split)
        return self.root / name

    def image_path(self, split: str, image_id: str) -> Path:
        return self.root / self.image_file.format(split=split, image_id=image_id)

    def prepare_data(self) -> None:
        """The data is downloaded by hand; check the root exists so the error names the option."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"task.root={self.root} is not a directory (the GQA data folder)")

    def _parse(self, split: str) -> list[tuple[str, str, str, str | None, str]]:
        """``(question_id, image_id, question, answer or None, structural type)`` in file order."""
        if split in self._rows:
            return self._rows[split]
        path = self.questions_path(split)
        data = read_json(path, f"GQA questions file for split {split!r}")
        if not isinstance(data, dict):
            got = type(data).__name__
            raise DataFormatError(f"{path}: expected a JSON object {{question_id: question}}, got {got}")
        labelled = any(isinstance(q, Mapping) and "answer" in q for q in data.values())
        if not labelled and split in (self.train_split, self.val_split):
            raise DataFormatError(f"{path}: no question has an 'answer', but split {split!r} is used for training")
        rows = []
        for qid, q in data.items():
            where = f"{path}: question {qid!r}"
            image_id = field(q, "imageId", str, where, "the image id (a string)")
            question = field(q, "question", str, where, "the question text")
            answer, structural = None, ""
            if labelled:
                answer = field(q, "answer", str, where, "the answer (a string), as every question of this file has")
                types = field(q, "types", Mapping, where, "an object with a 'structural' type")
                structural = field(types, "structural", str, f"{where}, 'types'", f"one of {self._answer_types}")
                if structural not in self._answer_types:
                    raise DataFormatError(
                        f"{where}: types.structural {structural!r} is not one of {self._answer_types} "
                        "(task.answer_types)"
                    )
            rows.append((qid, image_id, question, answer, structural))
        self._rows[split] = rows
        return rows

    def _load_vocab(self) -> list[str]:
        if self._vocab is None:
            source = self.questions_path(self.train_split)
            path = self.vocab_file or vocab_cache_path(self.cache_dir, self.name, source, self.top_k)

            def count() -> Counter[str]:
                return Counter(answer for *_, answer, _ in self._parse(self.train_split))

            self._vocab = [a for a, _ in load_or_build_vocab(path, count, self.top_k, source)]
            self._label = {a: i for i, a in enumerate(self._vocab)}
        return self._vocab

    @property
    def answers(self) -> list[str]:
        return list(self._load_vocab())

    @property
    def num_classes(self) -> int:
        return len(self._load_vocab())

    @property
    def answer_types(self) -> list[str]:
        return list(self._answer_types)

    def read_split(self, split: str) -> list[Example]:
        """All questions of ``split`` in file order."""
        self._load_vocab()
        examples = []
        for qid, image_id, question, answer, structural in self._parse(split):
            if answer is not None:
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
        del self._rows[split]
        return examples

    def reference(self, split: str, example: Example) -> str:
        return f"{self.questions_path(split)}: question {example.question_id!r}"

    def loss(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """Cross-entropy over the vocabulary; 0 for a batch without any answer in the vocabulary."""
        labels = batch["targets"]
        if not bool((labels >= 0).any()):
            return logits.sum() * 0.0  # cross_entropy would give nan (a mean over nothing)
        return F.cross_entropy(logits, labels, ignore_index=-1)

    def update_metric(self, metric: Metric, logits: torch.Tensor, batch: Mapping[str, Any]) -> None:
        """Exact match on the labelled questions (an out-of-vocabulary answer has label -1: always wrong)."""
        keep = torch.tensor([qid in self._scored for qid in batch["question_ids"]], device=logits.device)
        if bool(keep.any()):
            metric.update(logits.argmax(-1)[keep], batch["labels"][keep], batch["answer_types"][keep])

    def prediction_rows(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The official submission format: ``{"questionId": str, "prediction": str}``."""
        vocab = self._load_vocab()
        return [
            {"questionId": qid, "prediction": vocab[i]}
            for qid, i in zip(batch["question_ids"], logits.argmax(-1).tolist(), strict=True)
        ]

    def majority_accuracy(self, split: str) -> float | None:
        """Accuracy on ``split`` of always giving the most frequent training answer (vocabulary entry 0)."""
        self._load_vocab()
        labelled = [e for e in self.examples(split) if e.answers]
        if not labelled:
            return None
        return sum(e.label == 0 for e in labelled) / len(labelled)
