"""zoo/vit_tiny: supervised multi-label classification of shape and colour presence."""

import pytest
import torch
from PIL import Image
from zoo_helpers import first_batch, fit, fixed_batch_loss, tiny_encoder

from fusion.zoo.data import ZooDataModule
from fusion.zoo.supervised import SupervisedRecipe


def test_loss_falls_over_a_short_run():
    groups = {"shape": 3, "color": 5}
    recipe = SupervisedRecipe(tiny_encoder("vit_tiny"), lr=2e-3, warmup_ratio=0.0, label_groups=groups)
    batch = first_batch(recipe)
    before = fixed_batch_loss(recipe, batch)
    fit(recipe, steps=60)
    after = fixed_batch_loss(recipe, batch)
    assert after < 0.85 * before, (before, after)


def test_heads_come_from_the_data_label_groups(tmp_path):
    for cls in ("cats", "dogs", "owls"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            Image.new("RGB", (40, 40), (60 * i, 20, 200)).save(tmp_path / cls / f"{i}.png")
    recipe = SupervisedRecipe(tiny_encoder("vit_tiny"))
    fit(recipe, steps=2, batch_size=4, folder=str(tmp_path), val_fraction=0.25)
    assert list(recipe.heads) == ["class"] and recipe.heads["class"].out_features == 3


def test_scene_label_groups_are_shape_and_colour_presence():
    recipe = SupervisedRecipe(tiny_encoder("vit_tiny"))
    dm = ZooDataModule(recipe.transform, recipe.collate, recipe.needs, num_train=8, num_val=8, batch_size=4)
    assert dm.label_groups == {"shape": 3, "color": 5}
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixels"].shape == (4, 3, 32, 32) and batch["targets"]["color"].shape == (4, 5)


def test_missing_targets_are_named():
    recipe = SupervisedRecipe(tiny_encoder("vit_tiny"), label_groups={"shape": 3, "size": 2})
    with pytest.raises(KeyError, match="size"):
        recipe.loss({"pixels": torch.zeros(2, 3, 32, 32), "targets": {"shape": torch.zeros(2, 3, dtype=torch.long)}})
