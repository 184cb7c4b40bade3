"""What every task provides: its examples, its answer space, its loss and its metrics."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from fusion.metrics import AccuracyByType


@dataclass(frozen=True)
class Example:
    """One question about one image.

    ``image_key`` is stable across runs and machines (it names the image, not the row), so the
    feature cache and prediction files can refer to it.
    """

    question_id: str
    image_key: str
    image_path: Path
    question: str
    label: int
    answer_type: str


class VLTask(ABC):
    """A vision-and-language task with a fixed answer vocabulary (classification over answers)."""

    name: str = "task"
    splits: tuple[str, ...] = ("train", "val", "test")

    @property
    @abstractmethod
    def answers(self) -> list[str]:
        """The answer vocabulary; the head predicts an index into it."""

    @property
    @abstractmethod
    def answer_types(self) -> list[str]:
        """Question/answer types the metrics are split by (e.g. ``color``, ``count``)."""

    @abstractmethod
    def prepare_data(self) -> None:
        """Make the data available on disk (generate or check it). Called once per node."""

    @abstractmethod
    def examples(self, split: str) -> list[Example]:
        """All examples of ``split``, in a fixed order."""

    @property
    def num_classes(self) -> int:
        return len(self.answers)

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"task {self.name!r} has no split {split!r}; allowed: {list(self.splits)}")

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the answer vocabulary. ``logits`` (B, C), ``labels`` (B,)."""
        return F.cross_entropy(logits, labels)

    metric_name: str = "acc"

    def metric(self) -> Metric:
        """A fresh metric; ``compute()`` gives ``{"": headline, "<answer type>": value, ...}``."""
        return AccuracyByType(self.answer_types)

    def majority_accuracy(self, split: str, reference_split: str = "train") -> float:
        """Accuracy of always answering the most frequent ``reference_split`` answer on ``split``."""
        counts = torch.bincount(
            torch.tensor([e.label for e in self.examples(reference_split)]), minlength=self.num_classes
        )
        majority = int(counts.argmax())
        target = [e.label for e in self.examples(split)]
        return sum(t == majority for t in target) / max(len(target), 1)


def resolve_root(root: str | Path) -> Path:
    """The data root as an absolute path (Hydra changes nothing about cwd, but users pass ``~``)."""
    return Path(root).expanduser().resolve()
