"""From task examples to batches: decode each image once, one transform per encoder, tokenize text."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from fusion.tasks.base import Example, VLTask

Transform = Callable[[Image.Image], torch.Tensor]


def load_image(path: Path) -> Image.Image:
    """Decode an image file as RGB, or fail with an error that names the file."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image file not found: {path}") from err
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


class VLDataset(Dataset):
    """Examples of one split; each item carries its image(s) once per encoder, in that encoder's format.

    ``images[name]``: (3, H_e, W_e), or (I, 3, H_e, W_e) when the task shows ``I > 1`` images per example.
    """

    def __init__(self, examples: Sequence[Example], transforms: Mapping[str, Transform], task: VLTask):
        self.examples = list(examples)
        self.transforms = dict(transforms)
        self.task = task
        self.type_index = {t: i for i, t in enumerate(task.answer_types)}

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self.examples[index]
        count = self.task.images_per_example
        if len(ex.images) != count:
            raise ValueError(
                f"example {ex.question_id!r} of task {self.task.name!r} has {len(ex.images)} images; "
                f"the task expects {count} per example"
            )
        # Each image is decoded once and transformed once per encoder (own size and normalisation).
        decoded = [load_image(path) for _, path in ex.images]
        if count == 1:
            images = {name: tf(decoded[0]) for name, tf in self.transforms.items()}
        else:
            images = {name: torch.stack([tf(img) for img in decoded]) for name, tf in self.transforms.items()}
        return {
            "images": images,
            "question": ex.question,
            "label": ex.label,
            "target": self.task.target(ex),
            # Types outside the task's list (or none) count under the first type.
            "answer_type": self.type_index.get(ex.answer_type, 0),
            "question_id": ex.question_id,
            "image_key": ex.image_key if count == 1 else tuple(key for key, _ in ex.images),
        }


class VLCollator:
    """Stacks images per encoder and tokenizes the questions of a batch in one call.

    Batch: ``images[name]`` (B, 3, H_e, W_e), or (B, I, 3, H_e, W_e) with I images per example;
    ``input_ids`` / ``attention_mask`` (B, L); ``labels`` (B,);
    ``targets`` (B,) or (B, C) (what the task's loss trains towards); ``answer_types`` (B,);
    ``question_ids`` and ``image_keys`` lists of str (of I-tuples of str with I images per example).
    """

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        text = self.tokenizer(
            [s["question"] for s in samples], padding=True, truncation=True,
            max_length=self.max_length, return_tensors="pt",
        )
        names = samples[0]["images"].keys()
        return {
            "images": {n: torch.stack([s["images"][n] for s in samples]) for n in names},
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "labels": torch.tensor([s["label"] for s in samples], dtype=torch.long),
            "targets": _stack_targets([s["target"] for s in samples]),
            "answer_types": torch.tensor([s["answer_type"] for s in samples], dtype=torch.long),
            "question_ids": [s["question_id"] for s in samples],
            "image_keys": [s["image_key"] for s in samples],
        }


def _stack_targets(targets: list[int | torch.Tensor]) -> torch.Tensor:
    if isinstance(targets[0], torch.Tensor):
        return torch.stack(targets)
    return torch.tensor(targets, dtype=torch.long)


class FusionDataModule(pl.LightningDataModule):
    """Lightning data module over a :class:`VLTask`: loaders for train / val / test."""

    def __init__(
        self,
        task: VLTask,
        transforms: Mapping[str, Transform],
        tokenizer: Any,
        max_length: int = 32,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.task = task
        self.transforms = dict(transforms)
        self.collate = VLCollator(tokenizer, max_length)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        # The split Lightning's validation loop reads; eval.py points it at any split of the task.
        self.val_split = task.val_split

    def prepare_data(self) -> None:
        self.task.prepare_data()

    def dataset(self, split: str) -> VLDataset:
        return VLDataset(self.task.examples(split), self.transforms, self.task)

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.task.train_split, True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_split, False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.task.test_split, False, self.eval_batch_size)
