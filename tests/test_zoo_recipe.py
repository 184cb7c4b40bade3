"""Every zoo recipe saves its tower so that TimmEncoder (and encoder.<name>.weights) reloads it exactly."""

import json

import pytest
import torch
from safetensors import safe_open
from zoo_helpers import fit, one_thread, tiny_encoder, tiny_text

from fusion.encoders.vision import HFVisionEncoder
from fusion.zoo.clip import ClipRecipe
from fusion.zoo.dino import DinoRecipe
from fusion.zoo.recipe import SaveEncoder, save_encoder
from fusion.zoo.supervised import SupervisedRecipe

RECIPES = {
    "clip_tiny": lambda tmp: ClipRecipe(tiny_encoder("clip_tiny"), tiny_text(tmp / "text")),
    "dino_tiny": lambda tmp: DinoRecipe(tiny_encoder("dino_tiny"), num_local=2),
    "vit_tiny": lambda tmp: SupervisedRecipe(tiny_encoder("vit_tiny")),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_saved_tower_reloads_through_the_encoder_wrapper_with_the_same_features(tmp_path, name):
    recipe = RECIPES[name](tmp_path)
    saver = SaveEncoder(tmp_path / "zoo" / f"{name}.safetensors")
    fit(recipe, steps=3, batch_size=8, num_train=64, callbacks=[saver])
    assert saver.saved == tmp_path / "zoo" / f"{name}.safetensors"

    loaded = tiny_encoder(name, weights=str(saver.saved))  # what encoder.<name>.weights=<file> builds
    random_init = tiny_encoder(name)
    pixels = torch.randn(4, 3, *loaded.preprocess.input_size, generator=torch.Generator().manual_seed(0))
    recipe.eval()
    with torch.no_grad(), one_thread():
        expected = recipe.backbone.forward_features(pixels)
        got = loaded(pixels)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(random_init(pixels), got)  # training moved the weights
    with safe_open(str(saver.saved), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["sha256"]) == loaded.fingerprint()["sha256"]
    assert json.loads(meta["encoder"]) == name and json.loads(meta["global_step"]) == 3


def test_pth_output_loads_too(tmp_path):
    enc = tiny_encoder("vit_tiny", init_seed=5)
    path = save_encoder(SupervisedRecipe(enc).encoder_state_dict(), tmp_path / "vit.pth", {"encoder": "vit_tiny"})
    assert tiny_encoder("vit_tiny", weights=str(path)).fingerprint()["sha256"] == enc.fingerprint()["sha256"]


def test_bad_output_suffix_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"vit\.bin"):
        save_encoder({}, tmp_path / "vit.bin", {})


def test_only_timm_towers_can_be_trained(tmp_path, monkeypatch):
    enc = HFVisionEncoder.__new__(HFVisionEncoder)  # no model needed: the type check comes first
    torch.nn.Module.__init__(enc)
    enc.name = "hf"
    with pytest.raises(TypeError, match="HFVisionEncoder"):
        SupervisedRecipe(enc)


def test_intermediate_layer_encoder_is_refused():
    with pytest.raises(ValueError, match="layer=-1"):
        SupervisedRecipe(tiny_encoder("vit_tiny", layer=0))


def test_clip_recipe_groups_follow_no_weight_decay(tmp_path):
    from fusion.training.optim import no_weight_decay_names

    recipe = RECIPES["clip_tiny"](tmp_path)
    skipped = no_weight_decay_names(recipe)
    # timm's ViT lists pos_embed and cls_token; the text tower its embedding tables; logit_scale is a scalar.
    assert {"backbone.pos_embed", "backbone.cls_token", "logit_scale",
            "text.model.embeddings.word_embeddings.weight"} <= skipped
    decayed = {n for n, _ in recipe.named_parameters() if n not in skipped}
    assert {"backbone.patch_embed.proj.weight", "image_proj.weight", "text_proj.weight"} <= decayed
