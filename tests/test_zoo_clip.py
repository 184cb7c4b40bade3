"""zoo/clip_tiny: symmetric InfoNCE with a learned temperature and a small text tower."""

import math

import pytest
import torch
import torch.nn.functional as F
from zoo_helpers import first_batch, fit, fixed_batch_loss, tiny_encoder, tiny_text

from fusion.zoo.clip import MAX_LOGIT_SCALE, ClipRecipe, symmetric_info_nce


def test_info_nce_is_low_for_matching_pairs_and_symmetric():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    y = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    scale = torch.tensor(math.log(10.0))
    matched, _ = symmetric_info_nce(x, x, scale)
    random, logits = symmetric_info_nce(x, y, scale)
    assert matched < random and logits.shape == (8, 8)
    swapped, _ = symmetric_info_nce(y, x, scale)
    torch.testing.assert_close(random, swapped)
    with pytest.raises(ValueError, match=r"\(8, 16\) and \(8, 4\)"):
        symmetric_info_nce(x, y[:, :4], scale)


def test_loss_falls_and_temperature_is_learned(tmp_path):
    recipe = ClipRecipe(tiny_encoder("clip_tiny"), tiny_text(tmp_path / "text"), lr=2e-3, warmup_ratio=0.0)
    batch = first_batch(recipe)
    assert batch["pixels"].shape == (32, 3, 32, 32) and batch["input_ids"].shape[0] == 32
    before, scale = fixed_batch_loss(recipe, batch), recipe.logit_scale.item()
    text_weight = recipe.text.model.encoder.layer[0].attention.self.query.weight.detach().clone()
    fit(recipe, steps=60)
    after = fixed_batch_loss(recipe, batch)
    assert after < 0.85 * before, (before, after)
    assert recipe.logit_scale.item() != scale and recipe.logit_scale.item() <= MAX_LOGIT_SCALE
    assert not torch.equal(recipe.text.model.encoder.layer[0].attention.self.query.weight, text_weight)  # text trained


def test_frozen_text_tower_is_refused(tmp_path):
    text = tiny_text(tmp_path / "text")
    text.freeze = True
    with pytest.raises(ValueError, match="text.freeze=false"):
        ClipRecipe(tiny_encoder("clip_tiny"), text)
