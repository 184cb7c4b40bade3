"""NLVR2 (Suhr et al., 2019): is a sentence true of a pair of photographs?

Files under ``root`` as the official release lays them out: ``<split>.json`` (or ``data/<split>.json``,
the repository's layout), JSON lines with ``identifier`` ``<split>-<set>-<pair>-<sentence>`` (e.g.
``dev-850-0-0``), ``sentence`` and ``label`` ``True``/``False`` (on every line, or on none: an unlabelled
copy of the hidden test split). The two images of a line are ``<identifier without its last field>-img0.png``
(left) and ``-img1.png`` (right), found by file name anywhere below ``images_dir`` (the copies differ: train
images sit in numbered subfolders, dev and test ones do not). Both images go through every encoder; the
model tells them apart by an image-index embedding (``FusionModel(num_images=2)``).

Metrics as the official evaluator computes them (lil-lab/nlvr, ``nlvr2/eval/metrics.py``), and the
rules it applies: it reads the CSV ``<identifier>,<prediction>`` keyed by the identifier as written; it
stops, scoring nothing, when it has fewer distinct identifiers than the labels file has lines (extra
rows are ignored; a missing one for a labelled line is an error); a line is correct when the prediction
equals its ``label`` ignoring case. Accuracy (it prints "precision"; headline ``acc``) = correct lines /
all lines of the labels file. Consistency (``acc_consistency``) = the share of unique sentences all of whose
lines are correct, a sentence being the identifier split at ``-`` with its third field (the pair) emptied
and joined again, compared as a string: ``dev-850-0-0`` and ``dev-850-1-0`` are the sentence
``dev-850--0``; the split and set fields take part, so ``"07"`` and ``"7"`` differ. Only labelled lines
are scored. Prediction file: the official ``predictions.csv``, no header, one ``<identifier>,True|False``
line per example, in split order.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torchmetrics import Metric

from fusion.io import write_text
from fusion.metrics.binary import AccuracyConsistency, group_id
from fusion.tasks.base import Example, FixedLabelTask
from fusion.tasks.formats import all_or_none, line_of, read_json_lines

ANSWERS: tuple[str, ...] = ("False", "True")
IDENTIFIER = re.compile(r"([\w]+)-(\d+)-(\d+)-(\d+)")


def sentence_group(identifier: str) -> str:
    """The official consistency group of an identifier: its third field (the image pair) emptied."""
    if IDENTIFIER.fullmatch(identifier) is None:
        raise ValueError(f"identifier {identifier!r} is not of the form <split>-<set>-<pair>-<sentence>")
    fields = identifier.split("-")
    fields[2] = ""
    return "-".join(fields)


def image_names(identifier: str) -> tuple[str, str]:
    """The official file names of the left and right image of an identifier."""
    stem = identifier.rsplit("-", 1)[0]
    return f"{stem}-img0.png", f"{stem}-img1.png"


class NLVR2Task(FixedLabelTask):
    """Binary classification of (sentence, left image, right image) triples."""

    name = "nlvr2"
    labels = ANSWERS
    metric_name = "acc"
    prediction_file = "predictions.csv"
    images_per_example = 2

    def __init__(
        self,
        root: str | Path,
        images_dir: str | Path = "images",
        train_split: str = "train",
        val_split: str = "dev",
        test_split: str = "test1",
    ) -> None:
        super().__init__(root, train_split, val_split, test_split)
        # Relative to root unless absolute (the images are often unpacked elsewhere).
        self.images_dir = self.root / Path(images_dir).expanduser()
        self._image_paths: dict[str, Path] | None = None

    def split_file(self, split: str) -> Path:
        """``root/<split>.json``, else ``root/data/<split>.json`` (the official repository's layout)."""
        flat, repo = self.root / f"{split}.json", self.root / "data" / f"{split}.json"
        return repo if repo.is_file() and not flat.is_file() else flat

    def prepare_data(self) -> None:
        """Nothing to download or generate: check that the data and image folders are there."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"NLVR2 folder {self.root} not found; set task.root=<folder>")
        if not self.images_dir.is_dir():
            raise FileNotFoundError(
                f"NLVR2 images folder {self.images_dir} not found; set task.images_dir=<folder> (relative to "
                "task.root or absolute) to where the train/dev/test1 image folders are"
            )

    def image_paths(self) -> dict[str, Path]:
        """Every image file name below ``images_dir`` -> its path (walked once; the first in sorted order
        wins if a name occurs twice)."""
        if self._image_paths is None:
            if not self.images_dir.is_dir():
                raise FileNotFoundError(f"NLVR2 images folder {self.images_dir} not found; set task.images_dir")
            found: dict[str, Path] = {}
            for folder, subfolders, files in os.walk(self.images_dir):
                subfolders.sort()
                for name in sorted(files):
                    found.setdefault(name, Path(folder) / name)
            self._image_paths = found
        return self._image_paths

    def read_split(self, split: str) -> list[Example]:
        """One example per JSON line, in file order, each with its left and right image."""
        records = read_json_lines(self.split_file(split), f"NLVR2's JSON lines for split {split!r}")
        # Unlabelled copies of the hidden test split have no label on any line; a labelled file on every one.
        labelled = all_or_none(records, "label")
        paths = self.image_paths()
        examples, missing = [], []
        for rec in records:
            identifier = rec.field("identifier")
            if not IDENTIFIER.fullmatch(identifier):
                raise rec.error(
                    f"identifier {identifier!r} is not of the form <split>-<set>-<pair>-<sentence>, e.g. dev-850-0-0"
                )
            label = rec.data.get("label")
            if not labelled:
                index = -1
            elif isinstance(label, bool) or (isinstance(label, str) and label.lower() in ("true", "false")):
                index = int(label if isinstance(label, bool) else label.lower() == "true")
            else:
                raise rec.error(f"label {label!r} is not one of True, False")
            refs = []
            for name in image_names(identifier):
                if name not in paths:
                    missing.append(f"{name} ({rec.where})")
                    continue
                refs.append((f"nlvr2/{Path(name).stem}", paths[name]))
            if len(refs) == 2:
                (key0, path0), more = refs[0], tuple(refs[1:])
                examples.append(
                    Example(
                        question_id=identifier,
                        image_key=key0,
                        image_path=path0,
                        question=rec.field("sentence"),
                        label=index,
                        more_images=more,
                    )
                )
        if missing:
            shown = "; ".join(missing[:5]) + (f"; and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise FileNotFoundError(
                f"{len(missing)} NLVR2 image(s) of split {split!r} not found anywhere below {self.images_dir}: {shown}"
            )
        return examples

    def reference(self, split: str, example: Example) -> str:
        return line_of(self.split_file(split), "identifier", example.question_id)

    def metric(self) -> Metric:
        return AccuracyConsistency()

    def update_metric(self, metric: Metric, logits: torch.Tensor, batch: Mapping[str, Any]) -> None:
        groups = torch.tensor([group_id(sentence_group(q)) for q in batch["question_ids"]], device=logits.device)
        labelled = batch["labels"] >= 0
        metric.update(logits.argmax(-1)[labelled], batch["labels"][labelled], groups[labelled])

    def prediction_rows(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        return [
            {"identifier": qid, "prediction": ANSWERS[i]}
            for qid, i in zip(batch["question_ids"], logits.argmax(-1).tolist(), strict=True)
        ]

    def write_predictions(self, rows: list[dict[str, Any]], path: Path) -> None:
        """The official CSV: no header, ``<identifier>,True|False`` per line."""
        write_text(path, "".join(f"{r['identifier']},{r['prediction']}\n" for r in rows))
