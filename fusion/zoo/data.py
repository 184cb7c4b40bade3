"""Pretraining data for the zoo recipes: generated scenes by default, or any folder of images.

Both sources yield ``{"image": PIL RGB, "caption": str | None, "targets": {group: LongTensor}}``; a
recipe turns each item into tensors with its own ``transform`` (augmentations, normalisation) and
``collate`` (tokenising captions...), which :class:`ZooDataModule` applies in its loaders.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, random_split

from fusion.zoo.scenes import SceneDataset

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset", "ZooDataModule"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})


class ImageFolderDataset(Dataset):
    """Every image file below ``root`` (recursively, sorted), for pretraining on your own images.

    - captions (contrastive recipe): ``<image stem>.txt`` next to each image, as in LAION/webdataset dumps;
    - classes (supervised recipe): the first folder level below ``root`` names the class, as in
      torchvision's ``ImageFolder``; targets are ``{"class": one-hot}``;
    - the self-distillation recipe needs neither.

    ``needs`` (``{"captions", "classes"}`` or a subset) is checked up front, naming the first offending file.
    """

    def __init__(self, root: str | os.PathLike, needs: Collection[str] = ()) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist")
        unknown = set(needs) - {"captions", "classes"}
        if unknown:
            raise ValueError(f"image folder: unknown needs {sorted(unknown)}; allowed: captions, classes")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.files:
            raise ValueError(
                f"image folder {str(self.root)!r} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        self.has_captions = "captions" in needs
        if self.has_captions:
            missing = next((p for p in self.files if not p.with_suffix(".txt").is_file()), None)
            if missing is not None:
                raise FileNotFoundError(
                    f"image folder {str(self.root)!r}: the contrastive recipe needs a caption file per image; "
                    f"{str(missing.with_suffix('.txt'))!r} does not exist"
                )
        self.classes: list[str] = []
        self.label_groups: dict[str, int] = {}
        if "classes" in needs:
            flat = next((p for p in self.files if p.parent == self.root), None)
            if flat is not None:
                raise ValueError(
                    f"image folder {str(self.root)!r}: the supervised recipe reads the class from the first "
                    f"sub-folder, but {str(flat)!r} lies directly in the root"
                )
            self.classes = sorted({p.relative_to(self.root).parts[0] for p in self.files})
            self.label_groups = {"class": len(self.classes)}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise OSError(f"could not read image {str(path)!r}: {e}") from e
        caption = path.with_suffix(".txt").read_text().strip() if self.has_captions else None
        targets = {}
        if self.classes:
            one_hot = torch.zeros(len(self.classes), dtype=torch.long)
            one_hot[self.classes.index(path.relative_to(self.root).parts[0])] = 1
            targets["class"] = one_hot
        return {"image": image, "caption": caption, "targets": targets}


class _Mapped(Dataset):
    """``dataset`` with ``transform`` applied to each item (in the loader's worker)."""

    def __init__(self, dataset: Dataset, transform: Callable[[dict], dict]) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.transform(self.dataset[index])


class ZooDataModule(pl.LightningDataModule):
    """Generated scenes (``scenes`` = :class:`~fusion.zoo.scenes.SceneDataset` arguments) or ``folder``.

    Scenes: ``num_train`` training scenes from stream ``seed`` and ``num_val`` validation scenes from stream
    ``seed + 1``. Folder: a seeded ``val_fraction`` of its images is held out, and the rest must fill at least
    one training batch (``batch_size``). ``transform`` and
    ``collate_fn`` come from the recipe; ``needs`` says what the recipe needs from a folder.
    ``label_groups`` (set up front) are the classification groups of the source: ``{group: classes}``.
    """

    def __init__(
        self,
        transform: Callable[[dict], dict],
        collate_fn: Callable[[list[dict]], dict] | None = None,
        needs: Collection[str] = (),
        folder: str | os.PathLike | None = None,
        num_train: int = 20000,
        num_val: int = 512,
        seed: int = 0,
        scenes: Mapping[str, Any] | None = None,
        val_fraction: float = 0.05,
        batch_size: int = 128,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"zoo data: val_fraction must lie in (0, 1), got {val_fraction!r}")
        self.transform = transform
        self.collate_fn = collate_fn
        self.batch_size = batch_size
        self.num_workers = num_workers
        if folder is not None:
            full = ImageFolderDataset(folder, needs=needs)
            n_val = max(1, round(val_fraction * len(full)))
            if n_val >= len(full):
                raise ValueError(
                    f"image folder {str(folder)!r}: {len(full)} image(s) are too few to hold out a val set"
                )
            n_train = len(full) - n_val
            if n_train < batch_size:
                # Training keeps full batches only (drop_last): Lightning would run 0 steps and the recipe
                # would save its random init as if trained.
                raise ValueError(
                    f"image folder {str(folder)!r}: {len(full)} image(s), {n_train} for training after holding out "
                    f"{n_val} for val, fewer than batch_size={batch_size} (training uses full batches only); add "
                    f"images or lower zoo.recipe.<name>.data.batch_size"
                )
            generator = torch.Generator().manual_seed(seed)
            self.train_set, self.val_set = random_split(full, [n_train, n_val], generator=generator)
            self.label_groups = dict(full.label_groups)
        else:
            kwargs = dict(scenes or {})
            self.train_set = SceneDataset(num_train, seed=seed, **kwargs)
            self.val_set = SceneDataset(num_val, seed=seed + 1, **kwargs)
            self.label_groups = dict(SceneDataset.label_groups)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            _Mapped(dataset, self.transform),
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle,  # contrastive and centring statistics want full batches
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
