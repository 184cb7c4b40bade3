import torch

from fusion.fusers import TokenConcatFuser


def test_token_concat_layout_and_visibility():
    fuser = TokenConcatFuser({"a": 8, "b": 12}, {"a": 3, "b": 5}, width=16)
    feats = {"a": torch.randn(2, 3, 8), "b": torch.randn(2, 5, 12)}
    keep = torch.tensor([[True, True], [True, False]])
    out = fuser(feats, keep)
    assert out.tokens.shape == (2, 8, 16)
    assert out.token_encoder.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert out.visible[0].all()
    assert out.visible[1].tolist() == [True] * 3 + [False] * 5


def test_encoder_type_embedding_tags_tokens():
    fuser = TokenConcatFuser({"a": 4, "b": 4}, {"a": 2, "b": 2}, width=8)
    with torch.no_grad():
        for p in fuser.pos_embed.values():
            p.zero_()
    same = torch.ones(1, 2, 4)
    out = fuser({"a": same, "b": same}, torch.ones(1, 2, dtype=torch.bool))
    # Identical features from two encoders differ only by projection and type embedding.
    fuser.proj["b"].load_state_dict(fuser.proj["a"].state_dict())
    out = fuser({"a": same, "b": same}, torch.ones(1, 2, dtype=torch.bool))
    diff = out.tokens[0, 2] - out.tokens[0, 0]
    torch.testing.assert_close(diff, fuser.type_embed[1] - fuser.type_embed[0])


def test_missing_encoder_features_are_named():
    fuser = TokenConcatFuser({"a": 4, "b": 4}, {"a": 2, "b": 2}, width=8)
    try:
        fuser({"a": torch.randn(1, 2, 4)}, torch.ones(1, 2, dtype=torch.bool))
    except KeyError as err:
        assert "'b'" in str(err)
    else:
        raise AssertionError("expected KeyError")
