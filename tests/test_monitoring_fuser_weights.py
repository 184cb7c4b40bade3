"""The fuser-weights metric and its files: hand-computed means, merging, round trip on disk."""

import json

import pytest
import torch
from PIL import Image

from fusion.monitoring.fuser_weights import FuserWeights, fuser_scalars, load_fuser_weights, save_fuser_weights

pytestmark = pytest.mark.filterwarnings("ignore:The ``compute`` method of metric:UserWarning")


def test_mean_over_samples_by_hand() -> None:
    metric = FuserWeights(["clip", "dino"])
    assert torch.equal(metric.compute(), torch.zeros(2))
    metric.update(torch.tensor([[0.2, 0.8], [1.0, 0.0]]))
    metric.update(torch.tensor([[0.5, 0.5]], dtype=torch.bfloat16))
    torch.testing.assert_close(metric.compute(), torch.tensor([1.7 / 3, 1.3 / 3]))
    assert fuser_scalars(metric.compute(), metric.encoder_names) == pytest.approx(
        {"fuser/clip": 1.7 / 3, "fuser/dino": 1.3 / 3}
    )
    assert set(fuser_scalars(metric.compute(), metric.encoder_names, prefix="test/fuser")) == {
        "test/fuser/clip", "test/fuser/dino"
    }


def test_merged_states_equal_one_metric_and_shapes_are_checked() -> None:
    # merge_state applies the sum reduction DDP uses across ranks.
    first, second = torch.tensor([[0.1, 0.9]]), torch.tensor([[0.3, 0.7], [0.6, 0.4]])
    rank0, rank1, single = FuserWeights(["a", "b"]), FuserWeights(["a", "b"]), FuserWeights(["a", "b"])
    rank0.update(first)
    rank1.update(second)
    rank0.merge_state(rank1)
    single.update(torch.cat([first, second]))
    torch.testing.assert_close(rank0.compute(), single.compute())
    with pytest.raises(ValueError, match=r"shape \(B, 2\) for \['a', 'b'\], got \(3,\)"):
        single.update(torch.ones(3))


def test_save_and_load_round_trip(tmp_path) -> None:
    weights = torch.tensor([0.25, 0.5, 0.25])
    paths = save_fuser_weights(weights, ["a", "b", "c"], tmp_path / "val", extra={"split": "val", "epoch": 2})
    assert set(paths) == {"fuser_weights.json", "fuser_weights.png"}
    assert {p.name for p in (tmp_path / "val").iterdir()} == set(paths)  # no temp files left behind
    loaded, names = load_fuser_weights(tmp_path / "val")
    torch.testing.assert_close(loaded, weights)
    assert names == ["a", "b", "c"]
    assert json.loads(paths["fuser_weights.json"].read_text())["epoch"] == 2
    with Image.open(paths["fuser_weights.png"]) as image:
        image.verify()
        assert image.format == "PNG"
    with pytest.raises(ValueError, match="overwrite"):
        save_fuser_weights(weights, ["a", "b", "c"], tmp_path / "bad", extra={"weights": 1})
    assert not (tmp_path / "bad").exists()
