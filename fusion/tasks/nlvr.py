"""NLVR v1 (Suhr et al., 2017), images: is a statement true of a rendered picture of three boxes?

Files under ``root`` as the official repository lays them out: ``<split>/<split>.json`` (``<split>.json``
directly under ``root`` also works), JSON lines with ``sentence``, ``label`` ``true``/``false``,
``identifier`` ``<sentence>-<position>`` and ``directory``; each line has six renderings
``<split>/images/<directory>/<split>-<identifier>-<n>.png``, n = 0..5, and each is one example with the
line's label.

Metrics as the official evaluator computes them (lil-lab/nlvr, ``nlvr/metrics_images.py``), and the
rules it applies: it reads the CSV ``<image file name>,<prediction>`` and keys each row by the file name
without ``.png`` and without its first ``-`` field (the split), i.e. ``<sentence>-<position>-<n>``; every
line of the labels file needs all six of its rows (the script stops, scoring nothing, unless it has exactly
6 x lines distinct keys); a row is correct when the prediction equals the line's ``label`` ignoring case.
Accuracy (it prints "precision"; headline ``acc``) = correct rows / (6 x lines). Consistency
(``acc_consistency``) = the share of sentences, the identifier's first ``-`` field compared as a string
(shared by up to four presentations), all of whose rows are correct. Here the question id is the image
name without ``.png``, one example per row, and the sentence is its field before the last two
(``<split>-<sentence>-<position>-<n>``).
Prediction file: the official CSV ``predictions.csv``, no header, one ``<split>-<identifier>-<n>.png,true|false``
line per image, in split order.

``val_from_train`` > 0 carves the validation split out of train by whole image directories, as the NLVR
authors advise: a directory holds every presentation and permutation of its sentences, so none of them
straddles train and validation.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchmetrics import Metric

from fusion.io import write_text
from fusion.metrics.binary import AccuracyConsistency, group_id
from fusion.tasks.base import Example, FixedLabelTask
from fusion.tasks.formats import line_of, read_json_lines

ANSWERS: tuple[str, ...] = ("false", "true")
IMAGES_PER_STATEMENT = 6
IDENTIFIER = re.compile(r"(\d+)-(\d+)")


@dataclass(frozen=True)
class Statement:
    """One JSON line: a sentence about one presentation; ``split`` is the file it comes from."""

    split: str
    identifier: str
    directory: str
    sentence: str
    label: int

    def image_stem(self, n: int) -> str:
        """The official image name without ``.png``; also the question id of that example."""
        return f"{self.split}-{self.identifier}-{n}"


def sentence_of(question_id: str) -> str:
    """The consistency group of an example's question id ``<split>-<sentence>-<position>-<n>``: the
    sentence field as the official script compares it, a string (``"07"`` and ``"7"`` are two sentences)."""
    parts = question_id.rsplit("-", 3)
    if len(parts) != 4 or not IDENTIFIER.fullmatch(f"{parts[1]}-{parts[2]}") or not parts[3].isdigit():
        raise ValueError(f"question id {question_id!r} is not of the form <split>-<sentence>-<position>-<n>")
    return parts[1]


class NLVRTask(FixedLabelTask):
    """Binary classification of (statement, rendered image) pairs, six images per statement."""

    name = "nlvr"
    labels = ANSWERS
    metric_name = "acc"
    prediction_file = "predictions.csv"

    def __init__(
        self,
        root: str | Path,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        val_from_train: float = 0.1,
        val_seed: int = 0,
    ) -> None:
        is_number = isinstance(val_from_train, int | float) and not isinstance(val_from_train, bool)
        if not is_number or not 0 <= val_from_train < 1:
            raise ValueError(f"val_from_train must be a number in [0, 1) (0: no carving), got {val_from_train!r}")
        if val_from_train and val_split == train_split:
            raise ValueError(f"val_from_train={val_from_train} needs val_split to differ from train_split")
        super().__init__(root, train_split, val_split, test_split)
        self.val_from_train = float(val_from_train)
        self.val_seed = val_seed
        self._statements: dict[str, list[Statement]] = {}

    def split_file(self, split: str) -> Path:
        """``root/<split>/<split>.json`` (the official layout), else ``root/<split>.json`` if that exists."""
        official, flat = self.root / split / f"{split}.json", self.root / f"{split}.json"
        return flat if flat.is_file() and not official.is_file() else official

    def prepare_data(self) -> None:
        """Nothing to download or generate: check that the data folder is there."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"NLVR folder {self.root} not found; set task.root=<folder>")

    def read_statements(self, split: str) -> list[Statement]:
        """Every line of ``split``'s own file, in file order; parsed once."""
        if split not in self._statements:
            self._statements[split] = self._read(split)
        return self._statements[split]

    def _read(self, split: str) -> list[Statement]:
        path = self.split_file(split)
        hint = "" if self.val_from_train else " (or set task.val_from_train > 0 to carve a split from train)"
        records = read_json_lines(path, f"NLVR's JSON lines for split {split!r}{hint}")
        statements = []
        for rec in records:
            identifier = rec.field("identifier")
            if not IDENTIFIER.fullmatch(identifier):
                raise rec.error(f"identifier {identifier!r} is not of the form <sentence>-<position>, e.g. 1572-0")
            label = rec.field("label")
            if label.lower() not in ANSWERS:
                raise rec.error(f"label {label!r} is not one of {', '.join(ANSWERS)}")
            statements.append(
                Statement(
                    split=split,
                    identifier=identifier,
                    directory=str(rec.field("directory", (str, int))),
                    sentence=rec.field("sentence"),
                    label=ANSWERS.index(label.lower()),
                )
            )
        return statements

    def heldout_directories(self) -> frozenset[str]:
        """The train image directories that form the validation split when ``val_from_train`` > 0.

        ``round(val_from_train * directories)`` of them, at least one and never all, drawn with a seeded RNG
        from the sorted directory names: the same on every machine and process.
        """
        directories = sorted({s.directory for s in self.read_statements(self.train_split)})
        if len(directories) < 2:
            raise ValueError(
                f"val_from_train={self.val_from_train} splits by image directory, but "
                f"{self.split_file(self.train_split)} has images in only {len(directories)} directory; set "
                "task.val_from_train=0 and "
                "task.val_split=<a split with its own file>"
            )
        k = min(len(directories) - 1, max(1, round(self.val_from_train * len(directories))))
        return frozenset(random.Random(f"nlvr:{self.val_seed}").sample(directories, k))

    def statements(self, split: str) -> list[Statement]:
        """The statements of ``split``: its own file's, or train's minus / within the held-out directories."""
        if self.val_from_train and split in (self.train_split, self.val_split):
            heldout = self.heldout_directories()
            in_val = split == self.val_split
            return [s for s in self.read_statements(self.train_split) if (s.directory in heldout) == in_val]
        return self.read_statements(split)

    def read_split(self, split: str) -> list[Example]:
        """Six examples per statement (one per rendering), in file order."""
        return [
            Example(
                question_id=s.image_stem(n),
                image_key=f"nlvr/{s.split}/{s.directory}/{s.image_stem(n)}",
                image_path=self.root / s.split / "images" / s.directory / f"{s.image_stem(n)}.png",
                question=s.sentence,
                label=s.label,
            )
            for s in self.statements(split)
            for n in range(IMAGES_PER_STATEMENT)
        ]

    def reference(self, split: str, example: Example) -> str:
        # The question id <file split>-<sentence>-<position>-<n> names the line's file (train's for a carved
        # validation split) and identifier.
        source, sentence, position, _ = example.question_id.rsplit("-", 3)
        return line_of(self.split_file(source), "identifier", f"{sentence}-{position}")

    def metric(self) -> Metric:
        return AccuracyConsistency()

    def update_metric(self, metric: Metric, logits: torch.Tensor, batch: Mapping[str, Any]) -> None:
        # The question id is the image name, which carries the sentence; no lookup table needed.
        sentences = torch.tensor([group_id(sentence_of(q)) for q in batch["question_ids"]], device=logits.device)
        metric.update(logits.argmax(-1), batch["labels"], sentences)

    def prediction_rows(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        return [
            {"image": f"{qid}.png", "prediction": ANSWERS[i]}
            for qid, i in zip(batch["question_ids"], logits.argmax(-1).tolist(), strict=True)
        ]

    def write_predictions(self, rows: list[dict[str, Any]], path: Path) -> None:
        """The official CSV: no header, ``<image file name>,true|false`` per line."""
        write_text(path, "".join(f"{r['image']},{r['prediction']}\n" for r in rows))
