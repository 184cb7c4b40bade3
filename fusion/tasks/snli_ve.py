"""SNLI-VE (Xie et al., 2019): does a Flickr30k image entail, contradict or say nothing about a sentence?

Files under ``root``: ``snli_ve_<split>.jsonl`` (one JSON object a line with ``pairID``, ``Flickr30K_ID``,
``sentence2``: the hypothesis, and ``gold_label``) and the images ``<images_dir>/<Flickr30K_ID>.jpg``.
Metric: accuracy, and per gold label (``acc_entailment``...). SNLI-VE ships no evaluation script
(necla-ml/SNLI-VE has the generator ``snli_ve_generator.py`` only); its paper and the models reporting on it
(UNITER, OFA, ...) score plain accuracy: the share of lines of ``snli_ve_<split>.jsonl`` whose predicted
label equals ``gold_label``, every line counting once (the released files hold only the three labels;
another ``gold_label`` is refused when the split is read). ``acc_<label>`` is the same share among the
lines of that gold label. Prediction file ``predictions.json``:
``[{"pairID": "...", "prediction": "entailment" | "neutral" | "contradiction"}, ...]`` in split order.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fusion.tasks.base import Example, FixedLabelTask
from fusion.tasks.formats import line_of, read_json_lines

LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")


class SNLIVETask(FixedLabelTask):
    """Three-way visual entailment over SNLI-VE's JSON-lines files; the hypothesis is the question."""

    name = "snli_ve"
    labels = LABELS
    metric_name = "acc"
    prediction_file = "predictions.json"

    def __init__(
        self,
        root: str | Path,
        images_dir: str | Path = "flickr30k_images",
        train_split: str = "train",
        val_split: str = "dev",
        test_split: str = "test",
    ) -> None:
        super().__init__(root, train_split, val_split, test_split)
        # Relative to root unless absolute (Path's / keeps an absolute right-hand side as it is).
        self.images_dir = self.root / Path(images_dir).expanduser()

    @property
    def answer_types(self) -> list[str]:
        # The gold label doubles as the answer type: the base metric then reports accuracy per label.
        return list(LABELS)

    def split_file(self, split: str) -> Path:
        return self.root / f"snli_ve_{split}.jsonl"

    def prepare_data(self) -> None:
        """Nothing to download or generate: check that the image folder is there."""
        if not self.images_dir.is_dir():
            raise FileNotFoundError(
                f"SNLI-VE image folder {self.images_dir} not found; expected the Flickr30k images as "
                "<Flickr30K_ID>.jpg there (set task.images_dir=<folder>, relative to task.root or absolute)"
            )

    def read_split(self, split: str) -> list[Example]:
        """The examples of ``snli_ve_<split>.jsonl`` in file order; parsed once."""
        path = self.split_file(split)
        examples = []
        for rec in read_json_lines(path, f"SNLI-VE's JSON lines for split {split!r} (snli_ve_<split>.jsonl)"):
            image_id = str(rec.field("Flickr30K_ID", (str, int)))
            gold = rec.choice("gold_label", LABELS)
            examples.append(
                Example(
                    question_id=str(rec.field("pairID", (str, int))),
                    image_key=f"flickr30k/{image_id}",
                    image_path=self.images_dir / f"{image_id}.jpg",
                    question=rec.field("sentence2"),
                    label=LABELS.index(gold),
                    answer_type=gold,
                )
            )
        return examples

    def reference(self, split: str, example: Example) -> str:
        return line_of(self.split_file(split), "pairID", example.question_id)

    def prediction_rows(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        return [
            {"pairID": qid, "prediction": LABELS[i]}
            for qid, i in zip(batch["question_ids"], logits.argmax(-1).tolist(), strict=True)
        ]
