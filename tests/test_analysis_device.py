"""analysis.device: where the analysis modes put the model and every batch; a clear error for a device this
machine does not have or a string that is no device; a mode run end to end with analysis.device=cpu."""

import json

import pytest
import torch
from analysis_helpers import COMMON, tiny_checkpoint
from entrypoints import run
from omegaconf import OmegaConf

from fusion.analysis.common import move_batch, resolve_device


def _batch() -> dict:
    return {
        "input_ids": torch.tensor([[101, 7, 102]]),
        "attention_mask": torch.ones(1, 3, dtype=torch.long),
        "images": {"a": torch.rand(1, 3, 4, 4)},
        "features": {"a": torch.rand(1, 2, 5), "b": torch.rand(1, 2, 2, 5, dtype=torch.float16)},
        "labels": torch.tensor([3]),
        "nested": [torch.zeros(2), {"deep": (torch.ones(1, dtype=torch.bool), "text")}],
        "question_ids": ["q1"],
        "image_keys": [("left", "right")],
        "count": 3,
    }


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def test_move_batch_moves_every_tensor_of_a_nested_batch_to_the_device():
    batch = _batch()
    moved = move_batch(batch, torch.device("meta"))
    tensors = _tensors(moved)
    assert len(tensors) == len(_tensors(batch)) == 8
    assert all(t.device.type == "meta" for t in tensors)
    # Dtypes kept without a dtype; the containers and the non-tensor values kept.
    assert [t.dtype for t in tensors] == [t.dtype for t in _tensors(batch)]
    assert isinstance(moved["nested"], list) and isinstance(moved["nested"][1]["deep"], tuple)
    assert moved["nested"][1]["deep"][1] == "text" and moved["question_ids"] == ["q1"]
    assert moved["image_keys"] == [("left", "right")] and moved["count"] == 3
    # The input batch is not changed in place.
    assert all(t.device.type == "cpu" for t in _tensors(batch))


def test_move_batch_casts_floating_point_tensors_only():
    batch = _batch()
    moved = move_batch(batch, "cpu", torch.float64)
    assert moved["images"]["a"].dtype == torch.float64
    assert torch.equal(moved["images"]["a"].float(), batch["images"]["a"])
    assert moved["features"]["a"].dtype == moved["features"]["b"].dtype == moved["nested"][0].dtype == torch.float64
    assert moved["input_ids"].dtype == moved["labels"].dtype == moved["attention_mask"].dtype == torch.long
    assert moved["nested"][1]["deep"][0].dtype == torch.bool
    assert torch.equal(moved["input_ids"], batch["input_ids"])


def _cfg(device, accelerator="auto"):
    return OmegaConf.create({"analysis": {"device": device}, "trainer": {"accelerator": accelerator}})


def test_resolve_device_follows_the_setting_then_the_trainer():
    assert resolve_device(_cfg("cpu")) == torch.device("cpu")
    assert resolve_device(_cfg(None, "cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    for accelerator in ("auto", "gpu", "cuda"):
        assert resolve_device(_cfg(None, accelerator)) == torch.device(expected)
    assert resolve_device(OmegaConf.create({})) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    for value in ("cuda", "cuda:0"):
        message = rf"analysis.device='{value}' but CUDA is not available.*use analysis.device=cpu"
        with pytest.raises(ValueError, match=message):
            resolve_device(_cfg(value))


def test_unknown_devices_are_named():
    with pytest.raises(ValueError, match=r"analysis.device='gpu0' is not a device; allowed: cpu, cuda"):
        resolve_device(_cfg("gpu0"))
    with pytest.raises(ValueError, match=r"analysis.device='meta': the analysis modes run on cpu or cuda"):
        resolve_device(_cfg("meta"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


def test_eval_py_runs_on_cpu_and_names_a_missing_cuda(checkpoint):
    ckpt, workdir = checkpoint
    out = workdir / "device_cpu"
    args = ["mode=cross_modal_ablation", f"ckpt_path={ckpt}", *COMMON, "analysis.max_batches=1"]
    proc = run("eval.py", [*args, "analysis.device=cpu", f"hydra.run.dir={out}"], workdir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "analysis on cpu" in (out / "eval.log").read_text()
    results = json.loads((out / "cross_modal_ablation" / "results.json").read_text())
    assert results["conditions"]["none"]["n"] == 100  # one batch of data.eval_batch_size
    if not torch.cuda.is_available():
        out = workdir / "device_cuda"
        proc = run("eval.py", [*args, "analysis.device=cuda", f"hydra.run.dir={out}"], workdir)
        assert proc.returncode != 0
        assert "analysis.device='cuda' but CUDA is not available" in proc.stderr
        assert not (out / "cross_modal_ablation").exists()
