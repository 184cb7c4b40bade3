import pytest
import torch

from fusion.model.dropout import EncoderDropout

NAMES = ["clip_tiny", "dino_tiny", "vit_tiny"]


def test_never_drops_every_encoder_of_a_sample():
    torch.manual_seed(0)
    drop = EncoderDropout(NAMES, p=0.9).train()
    keep = drop(20000)
    assert keep.shape == (20000, 3)
    assert keep.any(dim=1).all()
    # Each encoder is still dropped often: the rescue keeps one, not all.
    assert (~keep).float().mean() > 0.5


def test_per_encoder_probability_is_respected():
    torch.manual_seed(0)
    drop = EncoderDropout(NAMES, p={"dino_tiny": 0.5}).train()
    keep = drop(20000)
    assert keep[:, 0].all() and keep[:, 2].all()
    assert abs((~keep[:, 1]).float().mean().item() - 0.5) < 0.02


def test_p_zero_is_a_no_op_and_eval_never_samples():
    assert EncoderDropout(NAMES, p=0.0).train()(64).all()
    assert EncoderDropout(NAMES, p=0.5).eval()(64).all()


def test_drop_encoders_applies_to_every_sample_in_eval_and_training():
    drop = EncoderDropout(NAMES, p=0.5, drop_encoders=["dino_tiny"])
    for mode in (False, True):
        keep = drop.train(mode)(512)
        assert not keep[:, 1].any()
        assert keep.any(dim=1).all()


def test_bad_names_and_values_are_named_in_errors():
    with pytest.raises(ValueError, match=r"\['dino'\].*allowed: \['clip_tiny', 'dino_tiny', 'vit_tiny'\]"):
        EncoderDropout(NAMES, drop_encoders=["dino"])
    with pytest.raises(ValueError, match="would drop every encoder"):
        EncoderDropout(NAMES, drop_encoders=NAMES)
    with pytest.raises(ValueError, match="'vit_tiny' is 1.0"):
        EncoderDropout(NAMES, p={"vit_tiny": 1.0})
    with pytest.raises(ValueError, match="empty"):
        EncoderDropout([])
