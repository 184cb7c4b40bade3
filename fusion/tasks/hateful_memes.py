"""Hateful Memes (Kiela et al., 2020): is a meme (image + overlaid text) hateful?

Files under ``root``: ``<split>.jsonl`` (one JSON object a line with ``id``, ``img`` such as
``img/42953.png`` relative to ``root``, ``text`` and ``label`` 0/1; unlabelled test splits have no
``label`` on any line, labelled ones on every line) and the images. Metrics as the challenge scored a
submission (DrivenData "Hateful Memes"; the submission writer is facebookresearch/mmf
``mmf/datasets/builders/hateful_memes/dataset.py`` ``generate_prediction``, the metrics ``roc_auc`` and
``accuracy`` of ``mmf/modules/metrics.py``): AUROC (headline ``auroc``) is scikit-learn's
``roc_auc_score(gold, proba)`` with ``proba`` = P(hateful) = softmax(logits)[1], tied probabilities
counting half; accuracy (``auroc_acc``) is the share of memes whose submitted ``label`` equals the gold
one, the label here being ``proba > 0.5`` (see :mod:`fusion.metrics.binary`). Every labelled line
counts once; both are NaN on a split without labels, AUROC NaN when one class is absent. Prediction
file: the challenge's submission CSV ``predictions.csv`` with the header ``id,proba,label``, one row per
line of the split, in file order.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torchmetrics import Metric

from fusion.io import write_text
from fusion.metrics.binary import auroc_with_accuracy
from fusion.tasks.base import Example, FixedLabelTask
from fusion.tasks.formats import all_or_none, line_of, read_json_lines

ANSWERS: tuple[str, ...] = ("not_hateful", "hateful")


class HatefulMemesTask(FixedLabelTask):
    """Binary classification of memes; the meme's text is the question."""

    name = "hateful_memes"
    labels = ANSWERS
    metric_name = "auroc"
    prediction_file = "predictions.csv"

    def __init__(
        self,
        root: str | Path,
        train_split: str = "train",
        val_split: str = "dev_seen",
        test_split: str = "test_seen",
    ) -> None:
        super().__init__(root, train_split, val_split, test_split)

    def split_file(self, split: str) -> Path:
        return self.root / f"{split}.jsonl"

    def prepare_data(self) -> None:
        """Nothing to download or generate: check that the data folder is there."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"Hateful Memes folder {self.root} not found; set task.root=<folder>")

    def read_split(self, split: str) -> list[Example]:
        """The examples of ``<split>.jsonl`` in file order; parsed once.

        A file without any ``label`` (the unlabelled test releases) gives label -1; in a file with labels
        every line needs one.
        """
        path = self.split_file(split)
        records = read_json_lines(path, f"Hateful Memes' JSON lines for split {split!r} (<split>.jsonl)")
        labelled = all_or_none(records, "label")
        examples = []
        for rec in records:
            image = rec.field("img")
            if Path(image).is_absolute():
                raise rec.error(f"img {image!r} is absolute; expected a path relative to the data folder")
            examples.append(
                Example(
                    question_id=str(rec.field("id", (int, str))),
                    image_key=f"hateful_memes/{image}",
                    image_path=self.root / image,
                    question=rec.field("text"),
                    label=rec.choice("label", (0, 1)) if labelled else -1,
                )
            )
        return examples

    def reference(self, split: str, example: Example) -> str:
        return line_of(self.split_file(split), "id", example.question_id)

    def metric(self) -> Metric:
        return auroc_with_accuracy()

    @staticmethod
    def probabilities(logits: torch.Tensor) -> torch.Tensor:
        """P(hateful) per example, (B,), from the two-way logits (B, 2)."""
        return logits.float().softmax(-1)[:, 1]

    def update_metric(self, metric: Metric, logits: torch.Tensor, batch: Mapping[str, Any]) -> None:
        metric.update(self.probabilities(logits), batch["labels"])

    def prediction_rows(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        probs = self.probabilities(logits).tolist()
        return [
            # proba > 0.5 (argmax up to rounding): exactly the decision the accuracy scores.
            {"id": qid, "proba": p, "label": int(p > 0.5)}
            for qid, p in zip(batch["question_ids"], probs, strict=True)
        ]

    def write_predictions(self, rows: list[dict[str, Any]], path: Path) -> None:
        """The challenge's submission CSV: header ``id,proba,label``, one row per meme."""
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=["id", "proba", "label"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text(path, out.getvalue())

    def majority_accuracy(self, split: str) -> float | None:
        """The headline metric of a constant answer, which run.py records as ``<split>/majority_auroc``.

        A constant score ranks nothing, so its AUROC is 0.5 (None where AUROC is undefined); the majority
        class's accuracy would be the wrong number under that name.
        """
        labels = {e.label for e in self.examples(split) if e.label >= 0}
        return 0.5 if labels == {0, 1} else None
