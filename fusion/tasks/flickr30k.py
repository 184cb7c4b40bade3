"""Flickr30k image-text retrieval (Karpathy split): which image shows a caption, which captions fit an image?

Files under ``root``: the Karpathy split file ``dataset_flickr30k.json`` (``{"images": [{"filename":
"1000092795.jpg", "split": "train" | "val" | "test" | "restval", "sentences": [{"raw": "..."}, ...]},
...]}``; further fields such as ``tokens``, ``imgid`` or ``sentid`` are ignored) and the images
``<images_dir>/<filename>``.

Examples are the positive (image, caption) pairs, one per caption, in file order; the caption id
``<filename>#<n>`` (n = the caption's position in ``sentences``) follows Flickr30k's own captions file.
Training turns them into image-text matching with hard negatives and a contrastive first stage
(:mod:`fusion.retrieval.module`); evaluation ranks every image of the split for every caption and every
caption for every image. Metrics (:class:`~fusion.metrics.ranking.RetrievalRecall`): ``t2i_r1/5/10``,
``i2t_r1/5/10`` and their sum ``rsum``, by the standard Karpathy-split protocol of VSE++ (fartashf/vsepp,
``evaluation.py`` ``t2i`` / ``i2t``; 1,000 test images, five captions each): t2i R@K = the share of
captions whose own image is among their first K images; i2t R@K = the share of images with at least one
of their captions among their first K captions (the best-placed one counts). Values are fractions
(rsum <= 6; the papers print percentages, rsum <= 600); exact score ties are broken against the model
(:mod:`fusion.metrics.ranking`). Prediction file ``predictions.json``::

    {"text_to_image": [{"caption_id": "1000092795.jpg#0", "images": ["1000092795.jpg", ...]}, ...],
     "image_to_text": [{"image": "1000092795.jpg", "captions": ["1000092795.jpg#0", ...]}, ...]}

with the top-10 ranked candidates of every query, best first, queries in split order: the order the
recalls are computed from, so R@1/5/10 read off the file (a caption hits when its ``<filename>`` is among
its first K images; an image when one of its ``<filename>#<n>`` is among its first K captions) are the
reported ones.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torchmetrics import Metric

from fusion.io import write_text
from fusion.metrics.ranking import RetrievalRecall
from fusion.tasks.base import Example, FixedLabelTask

ANSWERS: tuple[str, ...] = ("no_match", "match")
KARPATHY_SPLITS: tuple[str, ...] = ("train", "val", "test", "restval")
EXPECTED = (
    'the Karpathy split file: {"images": [{"filename": "<name>.jpg", "split": "train|val|test|restval", '
    '"sentences": [{"raw": "<caption>"}, ...]}, ...]}'
)


def image_key(filename: str) -> str:
    """The stable key of a Flickr30k image, shared with SNLI-VE (``flickr30k/<stem>``)."""
    return f"flickr30k/{Path(filename).stem}"


class Flickr30kTask(FixedLabelTask):
    """Image-text retrieval over the Karpathy split of Flickr30k; each example is a matching pair.

    ``restval_in_train`` adds the images marked ``restval`` to the training split (Flickr30k's
    Karpathy file has none; COCO-style files do).
    """

    name = "flickr30k"
    labels = ANSWERS
    metric_name = "rsum"
    prediction_file = "predictions.json"

    def __init__(
        self,
        root: str | Path,
        annotations: str | Path = "dataset_flickr30k.json",
        images_dir: str | Path = "flickr30k_images",
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        restval_in_train: bool = False,
    ) -> None:
        super().__init__(root, train_split, val_split, test_split)
        # Relative to root unless absolute (Path's / keeps an absolute right-hand side as it is).
        self.annotations = self.root / Path(annotations).expanduser()
        self.images_dir = self.root / Path(images_dir).expanduser()
        self.restval_in_train = bool(restval_in_train)
        self._images: list[tuple[str, str, tuple[str, ...]]] | None = None  # (filename, split, captions)

    def prepare_data(self) -> None:
        """Nothing to download or generate: check that the split file and the image folder are there."""
        if not self.images_dir.is_dir():
            raise FileNotFoundError(
                f"Flickr30k image folder {self.images_dir} not found; expected the images as <filename> there "
                "(set task.images_dir=<folder>, relative to task.root or absolute)"
            )
        self._read()

    def majority_accuracy(self, split: str) -> float | None:
        """No majority baseline: every example is a match; chance is 1/#images per caption."""
        return None

    def metric(self) -> Metric:
        return RetrievalRecall()

    def image_name(self, key: str) -> str:
        """The file name of the image with key ``key`` (as in the split file)."""
        return self._filenames()[key]

    def write_rankings(
        self,
        caption_ids: Sequence[str],
        text_to_image: Sequence[Sequence[str]],
        image_keys: Sequence[str],
        image_to_text: Sequence[Sequence[str]],
        path: Path,
    ) -> None:
        """Write ``predictions.json``: per caption its ranked image names, per image its ranked caption ids."""
        data = {
            "text_to_image": [
                {"caption_id": cid, "images": [self.image_name(k) for k in ranked]}
                for cid, ranked in zip(caption_ids, text_to_image, strict=True)
            ],
            "image_to_text": [
                {"image": self.image_name(key), "captions": list(ranked)}
                for key, ranked in zip(image_keys, image_to_text, strict=True)
            ],
        }
        write_text(path, json.dumps(data, indent=1))

    # ---- reading -------------------------------------------------------------------------------
    def read_split(self, split: str) -> list[Example]:
        """One example per caption of the split's images, in file order."""
        wanted = {split, "restval"} if self.restval_in_train and split == self.train_split else {split}
        images = [rec for rec in self._read() if rec[1] in wanted]
        if not images:
            present = sorted({rec[1] for rec in self._read()})
            raise ValueError(
                f"{self.annotations} has no image with split {split!r}; splits present: {', '.join(present)} "
                "(set task.train_split / val_split / test_split, or eval.py split=<name>)"
            )
        examples = []
        for filename, _, captions in images:
            path = self.images_dir / filename
            for n, caption in enumerate(captions):
                examples.append(
                    Example(
                        question_id=f"{filename}#{n}",
                        image_key=image_key(filename),
                        image_path=path,
                        question=caption,
                        label=ANSWERS.index("match"),
                    )
                )
        return examples

    def reference(self, split: str, example: Example) -> str:
        filename = example.question_id.rsplit("#", 1)[0]
        i = next(i for i, (name, _, _) in enumerate(self._read()) if name == filename)
        return f"images[{i}].filename in {self.annotations}"

    def _filenames(self) -> dict[str, str]:
        return {image_key(filename): filename for filename, _, _ in self._read()}

    def _read(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """``(filename, split, captions)`` per image of the split file, parsed and checked once."""
        if self._images is None:
            self._images = _parse(self.annotations)
        return self._images


def _parse(path: Path) -> list[tuple[str, str, tuple[str, ...]]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected {EXPECTED} (set task.annotations=<file>)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno} column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason}); expected {EXPECTED}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        got = f"a JSON object with keys {sorted(data)}" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise ValueError(f"{path}: expected a JSON object with an 'images' list, got {got}; expected {EXPECTED}")
    images, seen = [], {}
    for i, rec in enumerate(data["images"]):
        where = f"{path} images[{i}]"
        filename = _string(rec, "filename", where)
        where = f"{where} ({filename})"
        split = _string(rec, "split", where)
        if split not in KARPATHY_SPLITS:
            raise ValueError(f"{where}: split {split!r} is not one of {', '.join(KARPATHY_SPLITS)}")
        sentences = rec.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            what = "missing" if "sentences" not in rec else f"{sentences!r:.60}"
            raise ValueError(f"{where}: sentences is {what}; expected a non-empty list of {{\"raw\": <caption>}}")
        captions = tuple(_string(s, "raw", f"{where} sentences[{n}]") for n, s in enumerate(sentences))
        key = image_key(filename)
        if key in seen:
            raise ValueError(f"{where}: image {key!r} is listed twice (also images[{seen[key]}])")
        seen[key] = i
        images.append((filename, split, captions))
    if not images:
        raise ValueError(f"{path}: the 'images' list is empty; expected {EXPECTED}")
    return images


def _string(rec: Any, key: str, where: str) -> str:
    """``rec[key]``, a non-empty string, or an error naming ``where``, the key and what was expected."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if key not in rec:
        raise ValueError(f"{where}: missing key {key!r} (keys present: {', '.join(sorted(rec)) or 'none'})")
    value = rec[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {key} {value!r:.60} is not a non-empty string")
    return value
