"""From task examples to batches: decode each image once, one transform per encoder, tokenize text."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fusion.data.cache import FeatureCache, ensure_cache, images_of
from fusion.data.cache.settings import CacheSettings
from fusion.data.distributed import EvalShardSampler, is_distributed
from fusion.data.images import load_image
from fusion.data.samplers import ResumableSampler, data_position
from fusion.tasks.base import Example, VLTask

Transform = Callable[[Image.Image], torch.Tensor]


class VLDataset(Dataset):
    """Examples of one split; each item carries its image(s) once per encoder, in that encoder's format.

    ``images[name]``: (3, H_e, W_e), or (I, 3, H_e, W_e) when the task shows ``I > 1`` images per example.
    """

    def __init__(self, examples: Sequence[Example], transforms: Mapping[str, Transform], task: VLTask):
        self.examples = list(examples)
        # Only the encoders that run online; cached encoders' features are gathered per batch by the collator.
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
        # Each image is decoded once and transformed once per encoder (own size and normalisation); with
        # every encoder cached there is nothing to decode.
        decoded = [load_image(path) for _, path in ex.images] if self.transforms else []
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
    ``question_ids``, ``questions`` (the raw text: the LM head's prompts) and ``image_keys`` lists of str
    (of I-tuples of str with I images per example).
    With feature caches, ``features[name]`` (B, T_e, D_e) or (B, I, T_e, D_e) in the cache's dtype, read
    from the cache file once per batch (into shared memory in a worker), for each cached encoder (which
    then has no ``images`` entry).
    """

    def __init__(self, tokenizer: Any, max_length: int, caches: Mapping[str, FeatureCache] | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.caches = dict(caches or {})

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        text = self.tokenizer(
            [s["question"] for s in samples], padding=True, truncation=True,
            max_length=self.max_length, return_tensors="pt",
        )
        names = samples[0]["images"].keys()
        batch = {
            "images": {n: torch.stack([s["images"][n] for s in samples]) for n in names},
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "labels": torch.tensor([s["label"] for s in samples], dtype=torch.long),
            "targets": _stack_targets([s["target"] for s in samples]),
            "answer_types": torch.tensor([s["answer_type"] for s in samples], dtype=torch.long),
            "question_ids": [s["question_id"] for s in samples],
            "questions": [s["question"] for s in samples],
            "image_keys": [s["image_key"] for s in samples],
        }
        if self.caches:
            batch["features"] = {name: _gather(cache, batch["image_keys"]) for name, cache in self.caches.items()}
        return batch


def _gather(cache: FeatureCache, keys: list[str] | list[tuple[str, ...]]) -> torch.Tensor:
    """(B, T, D) rows of ``keys``; (B, I, T, D) when each example has a tuple of I image keys."""
    if keys and isinstance(keys[0], tuple):
        flat = [k for group in keys for k in group]
        return cache.get(flat).unflatten(0, (len(keys), len(keys[0])))
    return cache.get(keys)


def _stack_targets(targets: list[int | torch.Tensor]) -> torch.Tensor:
    if isinstance(targets[0], torch.Tensor):
        return torch.stack(targets)
    return torch.tensor(targets, dtype=torch.long)


class FusionDataModule(pl.LightningDataModule):
    """Lightning data module over a :class:`VLTask`: loaders for train / val / test.

    With ``cache`` (and the ``encoders``), each encoder's features come from its feature cache instead
    of its pixels: the caches are built in ``prepare_data`` (once per node, before any loader exists)
    for every image of the splits in use and opened in ``setup`` on every process.
    """

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
        encoders: Mapping[str, Any] | None = None,
        cache: CacheSettings | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if cache is not None and not encoders:
            raise ValueError("a feature cache needs the encoders whose features it holds")
        self.task = task
        self.transforms = dict(transforms)
        self.tokenizer, self.max_length = tokenizer, max_length
        self.encoders = dict(encoders or {})
        self.cache = cache
        self.caches: dict[str, FeatureCache] | None = None
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        # The split Lightning's validation loop reads; eval.py points it at any split of the task.
        self.val_split = task.val_split
        # Training order is a function of (seed, epoch); a resumed run starts where its checkpoint stopped.
        self.seed = seed
        self._resume_at: dict[str, int] = {}
        self._images_checked: set[str] = set()

    def state_dict(self) -> dict[str, int]:
        # Lightning stores this in every checkpoint and hands it back to load_state_dict on resume.
        return data_position(self.trainer)

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume_at = dict(state_dict)

    def prepare_data(self) -> None:
        self.task.prepare_data()
        if self.cache is not None:
            self.caches = self._open_caches(build=True)

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit":
            # Before the first training step (Lightning calls setup after prepare_data, which generates shapes),
            # read every split training will use, validation and test included: a broken test file must stop
            # the run now, not after hours of training. Annotations only, not the pixels.
            for split in self.cached_splits():
                self.task.check_split(split)
        # Other processes than the one that ran prepare_data open the caches it built.
        if self.cache is not None and self.caches is None:
            self.caches = self._open_caches(build=False)

    def cached_splits(self) -> list[str]:
        """The splits whose images the caches hold: train, the validation split in use, test."""
        return list(dict.fromkeys((self.task.train_split, self.val_split, self.task.test_split)))

    def _open_caches(self, build: bool) -> dict[str, FeatureCache]:
        assert self.cache is not None
        images = images_of(ex for split in self.cached_splits() for ex in self.task.examples(split))
        device = self.cache.build_device()
        caches = {}
        for name, encoder in self.encoders.items():
            home = next(encoder.parameters()).device
            # Encoders run only when a cache is (re)built; then on the build device, and back afterwards.
            encoder.to(device if build else home)
            try:
                caches[name] = ensure_cache(
                    encoder, images, self.cache.dir, dtype=self.cache.dtype, rebuild=self.cache.rebuild and build,
                    tokens_per_encoder=self.cache.tokens_per_encoder,
                    batch_size=self.cache.batch_size, num_workers=self.cache.num_workers,
                )
            except FileNotFoundError:
                # A build met a missing image: name the annotation that refers to it. Not checked before the
                # build: a complete cache needs no image files at all.
                for split in self.cached_splits():
                    self._check_images(split)
                raise
            encoder.to(home)
        return caches

    def _check_images(self, split: str) -> None:
        if split not in self._images_checked:
            self.task.check_images(split)
            self._images_checked.add(split)

    def dataset(self, split: str) -> VLDataset:
        cached = set(self.caches or {})
        online = {n: tf for n, tf in self.transforms.items() if n not in cached}
        if online:  # pixels will be decoded: a missing image fails now, naming its annotation, not in a worker
            self._check_images(split)
        return VLDataset(self.task.examples(split), online, self.task)

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        if self.cache is not None and self.caches is None:
            self.setup()
        dataset = self.dataset(split)
        sampler, generator = None, None
        if shuffle:
            at, self._resume_at = self._resume_at, {}
            skip = at.get("batches", 0) * batch_size
            sampler = ResumableSampler(dataset, seed=self.seed, epoch=at.get("epoch", 0), skip=skip)
            # Workers' seeds from their own generator: making an iterator never draws from the global RNG.
            generator = torch.Generator().manual_seed(self.seed)
        elif is_distributed():
            sampler = EvalShardSampler(dataset)  # each example once: no padding counted twice by the metrics
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            generator=generator,
            num_workers=self.num_workers,
            collate_fn=VLCollator(self.tokenizer, self.max_length, self.caches),
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.task.train_split, True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_split, False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.task.test_split, False, self.eval_batch_size)
