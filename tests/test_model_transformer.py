import pytest
import torch

from fusion.fusers import ChannelConcatFuser, TokenConcatFuser
from fusion.model.transformer import CLS_GROUP, MIXED_GROUP, TEXT_GROUP, FusionModel

DIMS = {"a": 8, "b": 12}
TOKENS = {"a": 3, "b": 5}


def _model():
    torch.manual_seed(0)
    return FusionModel(DIMS, TOKENS, text_dim=10, width=16, depth=2, num_heads=2, dropout=0.0).eval()


def _inputs(B=3):
    torch.manual_seed(1)
    feats = {n: torch.randn(B, TOKENS[n], d) for n, d in DIMS.items()}
    text = torch.randn(B, 4, 10)
    text_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)[:B]
    return feats, text, text_mask


def test_output_layout():
    model = _model()
    feats, text, text_mask = _inputs()
    keep = torch.ones(3, 2, dtype=torch.bool)
    out = model(feats, keep, text, text_mask, output_attentions=True)
    assert out.pooled.shape == (3, 16)
    assert out.hidden.shape == (3, 1 + 4 + 8, 16)
    assert out.key_groups.tolist() == [CLS_GROUP] + [TEXT_GROUP] * 4 + [0] * 3 + [1] * 5
    assert len(out.attentions) == 2 and out.attentions[0].shape == (3, 2, 13, 13)
    assert out.text_query_mask[1].tolist() == [False, True, True, False, False] + [False] * 8
    assert model(feats, keep, text, text_mask).attentions is None


def test_dropped_encoder_tokens_receive_exactly_zero_attention():
    model = _model()
    feats, text, text_mask = _inputs()
    keep = torch.tensor([[True, False], [True, True], [False, True]])
    out = model(feats, keep, text, text_mask, output_attentions=True)
    b_tokens = slice(1 + 4 + 3, None)
    a_tokens = slice(1 + 4, 1 + 4 + 3)
    for probs in out.attentions:
        assert torch.all(probs[0, :, :, b_tokens] == 0)
        assert torch.all(probs[2, :, :, a_tokens] == 0)
        assert torch.all(probs[1, :, :, b_tokens].sum(-1) > 0)
        assert torch.all(probs[1, :, :, 3:5] == 0)  # padded text of sample 1 (positions 3, 4)


def test_dropped_encoder_changes_predictions_only_through_its_features():
    model = _model()
    feats, text, text_mask = _inputs()
    drop_b = torch.tensor([[True, False]] * 3)
    base = model(feats, drop_b, text, text_mask).pooled
    changed = dict(feats, b=torch.randn_like(feats["b"]) * 10)
    torch.testing.assert_close(model(changed, drop_b, text, text_mask).pooled, base, atol=1e-6, rtol=0)
    # Not dropped, the same change does move the output; and dropping changes predictions.
    keep_all = torch.ones(3, 2, dtype=torch.bool)
    full = model(feats, keep_all, text, text_mask).pooled
    assert not torch.allclose(model(changed, keep_all, text, text_mask).pooled, full, atol=1e-3)
    assert not torch.allclose(full, base, atol=1e-3)


def test_attention_readout_does_not_change_outputs():
    model = _model()
    feats, text, text_mask = _inputs()
    keep = torch.tensor([[True, False], [True, True], [False, True]])
    fast = model(feats, keep, text, text_mask).pooled
    slow = model(feats, keep, text, text_mask, output_attentions=True).pooled
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_fuser_gets_the_projected_text_and_its_settings():
    seen = {}

    class Recorder(TokenConcatFuser):
        def forward(self, features, keep, text=None, text_mask=None):
            seen.update(text=text, text_mask=text_mask)
            return super().forward(features, keep, text, text_mask)

    torch.manual_seed(0)
    model = FusionModel({"a": 8}, {"a": 1 + 9}, text_dim=10, width=16, depth=1, num_heads=2, fuser=Recorder,
                        encoder_prefix={"a": 1}, tokens_per_encoder=4)
    assert model.fuser.encoder_prefix == {"a": 1} and model.fuser.tokens_per_encoder == 4
    feats, text, text_mask = _inputs()
    out = model({"a": torch.randn(3, 10, 8)}, torch.ones(3, 1, dtype=torch.bool), text, text_mask)
    torch.testing.assert_close(seen["text"], model.text_proj(text) + model.text_type)
    assert torch.equal(seen["text_mask"], text_mask)
    assert out.hidden.shape == (3, 1 + 4 + 1 + 4, 16) and out.encoder_weights is None
    assert not model.mixes_encoders and not model.reports_encoder_weights


def test_mixing_fuser_output_layout():
    torch.manual_seed(0)
    model = FusionModel(
        {"a": 8, "b": 12}, {"a": 1 + 4, "b": 1 + 16}, text_dim=10, width=16, depth=2, num_heads=2,
        fuser=ChannelConcatFuser,
    )
    feats = {"a": torch.randn(3, 5, 8), "b": torch.randn(3, 17, 12)}
    _, text, text_mask = _inputs()
    keep = torch.tensor([[True, True], [True, False], [False, True]])
    out = model(feats, keep, text, text_mask, output_attentions=True)
    assert out.key_groups.tolist() == [CLS_GROUP] + [TEXT_GROUP] * 4 + [MIXED_GROUP] * (1 + 16)
    assert out.key_mask[:, 5:].all()  # dropping happens inside the fuser
    assert out.encoder_weights.shape == (3, 2) and out.encoder_weights[1, 1] == 0
    assert model.mixes_encoders and model.reports_encoder_weights


def _two_image_model(fuser=TokenConcatFuser):
    torch.manual_seed(0)
    return FusionModel(
        DIMS, TOKENS, text_dim=10, width=16, depth=2, num_heads=2, dropout=0.0, fuser=fuser, num_images=2
    ).eval()


def test_two_images_side_by_side_each_fused_on_its_own():
    model = _two_image_model()
    feats, text, text_mask = _inputs()
    pair = {n: torch.stack([f, torch.randn_like(f)], dim=1) for n, f in feats.items()}  # (B, 2, N, D)
    keep = torch.tensor([[True, False], [True, True], [False, True]])
    out = model(pair, keep, text, text_mask, output_attentions=True)
    assert out.hidden.shape == (3, 1 + 4 + 2 * 8, 16)
    assert out.key_groups.tolist() == [CLS_GROUP] + [TEXT_GROUP] * 4 + ([0] * 3 + [1] * 5) * 2
    # A dropped encoder is hidden in both images.
    for image in range(2):
        b_tokens = slice(1 + 4 + 8 * image + 3, 1 + 4 + 8 * (image + 1))
        for probs in out.attentions:
            assert torch.all(probs[0, :, :, b_tokens] == 0)
    # The image tokens are the fuser's tokens of that image plus its image-index embedding.
    visual = model.fuser({n: f[:, 1] for n, f in pair.items()}, keep, None, None).tokens
    assert torch.allclose(model._fuse_images(pair, keep, text, text_mask).tokens[:, 8:], visual + model.image_embed[1])


def test_the_model_tells_left_from_right():
    model = _two_image_model()
    feats, text, text_mask = _inputs()
    pair = {n: torch.stack([f, torch.randn_like(f)], dim=1) for n, f in feats.items()}
    swapped = {n: f.flip(1) for n, f in pair.items()}
    keep = torch.ones(3, 2, dtype=torch.bool)
    assert not torch.allclose(model(pair, keep, text, text_mask).pooled, model(swapped, keep, text, text_mask).pooled)
    # Without the image-index embedding the two orders are indistinguishable (attention is permutation-blind
    # apart from position embeddings, which both images share).
    with torch.no_grad():
        model.image_embed.zero_()
    torch.testing.assert_close(
        model(pair, keep, text, text_mask).pooled, model(swapped, keep, text, text_mask).pooled, atol=1e-5, rtol=0
    )


def test_two_images_with_a_fuser_that_mixes_encoders():
    torch.manual_seed(0)
    model = FusionModel(
        {"a": 8, "b": 12}, {"a": 1 + 4, "b": 1 + 16}, text_dim=10, width=16, depth=1, num_heads=2,
        fuser=ChannelConcatFuser, num_images=2,
    )
    pair = {"a": torch.randn(3, 2, 5, 8), "b": torch.randn(3, 2, 17, 12)}
    _, text, text_mask = _inputs()
    keep = torch.tensor([[True, True], [True, False], [False, True]])
    out = model(pair, keep, text, text_mask)
    assert out.key_groups.tolist() == [CLS_GROUP] + [TEXT_GROUP] * 4 + [MIXED_GROUP] * 2 * (1 + 16)
    # The sample's share of each encoder is the mean over its two images; dropped encoders get none.
    assert out.encoder_weights.shape == (3, 2) and out.encoder_weights[1, 1] == 0 and out.encoder_weights[2, 0] == 0
    torch.testing.assert_close(out.encoder_weights.sum(-1), torch.ones(3))


def test_two_image_model_rejects_one_image_features():
    model = _two_image_model()
    feats, text, text_mask = _inputs()
    with pytest.raises(ValueError, match=r"encoder 'a' should be \(B, 2, N, D\) for 2 images per example"):
        model(feats, torch.ones(3, 2, dtype=torch.bool), text, text_mask)
