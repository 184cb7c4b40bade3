"""Building and briefly training zoo recipes for the zoo tests (imported by them, not a test file)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from fusion.encoders.text import TextEncoder
from fusion.encoders.vision import TimmEncoder
from fusion.zoo.data import ZooDataModule
from fusion.zoo.recipe import ZooRecipe

CONF = Path(__file__).resolve().parents[1] / "conf"


def tiny_encoder(name: str, **overrides) -> TimmEncoder:
    """The encoder of conf/encoder/<name>.yaml, built as run.py builds it."""
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "encoder" / f"{name}.yaml")[name], overrides)
    return instantiate(cfg)


def random_towers(folder: Path, names: list[str]) -> Path:
    """Random-init tiny towers saved as the zoo saves trained ones (plain timm state dicts) into ``folder``."""
    folder.mkdir()
    for name in names:
        state = {k: v.contiguous() for k, v in tiny_encoder(name).model.state_dict().items()}
        save_file(state, str(folder / f"{name}.safetensors"))
    return folder


def image_folder(root: Path, count: int) -> Path:
    """``count`` tiny images of random colours, each with its ``<stem>.txt`` caption (what the CLIP recipe needs)."""
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        pixels = torch.randint(0, 256, (30, 20, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"picture number {i}\n")
    return root


def tiny_text(folder: Path) -> TextEncoder:
    """The text=tiny tower (built into ``folder`` on first use)."""
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    return TextEncoder(folder, build_tiny=True, model_kwargs=no_dropout)


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models on a shared CPU: one intra-op thread is much faster (see fusion/zoo/entry.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def datamodule(recipe: ZooRecipe, batch_size: int = 32, num_train: int = 4096, **kwargs) -> ZooDataModule:
    return ZooDataModule(
        recipe.transform, recipe.collate, recipe.needs, num_train=num_train, num_val=batch_size, batch_size=batch_size,
        **kwargs,
    )


def seed_all(seed: int = 0) -> None:
    """Seed Python, NumPy and torch: heads' init, batch order, augmentations and the probes' init repeat."""
    pl.seed_everything(seed, workers=True, verbose=False)


def fit(recipe: ZooRecipe, steps: int, batch_size: int = 32, callbacks=(), seed: int = 0, **data_kwargs) -> pl.Trainer:
    """Train ``recipe`` for ``steps`` steps on generated scenes (no logger, checkpoint or progress bar).

    Seeded (``seed``): the batch order and the augmentations repeat; seed before building the recipe too
    (:func:`seed_all`) for its heads' init to repeat.
    """
    seed_all(seed)
    trainer = pl.Trainer(
        max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=list(callbacks),
        accelerator="cpu", gradient_clip_val=1.0,
    )
    with one_thread():
        trainer.fit(recipe, datamodule=datamodule(recipe, batch_size, **data_kwargs))
    return trainer


@torch.no_grad()
def fixed_batch_loss(recipe: ZooRecipe, batch: dict) -> float:
    """The recipe's loss on one fixed batch, in eval mode (no state updates)."""
    was_training = recipe.training
    recipe.eval()
    try:
        with one_thread():
            return float(recipe.loss(batch)[0])
    finally:
        recipe.train(was_training)


def first_batch(recipe: ZooRecipe, batch_size: int = 32, seed: int = 7) -> dict:
    """One batch of validation-stream scenes, transformed and collated by the recipe."""
    dm = datamodule(recipe, batch_size, seed=seed)
    return next(iter(dm.val_dataloader()))
