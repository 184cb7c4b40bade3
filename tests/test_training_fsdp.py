"""trainer=fsdp: the config composes into Lightning's FSDP strategy, and the decoder-layer policy shards a
real LM head over two CPU processes (torch FSDP on gloo; Lightning's FSDP strategy itself needs CUDA, the
GPU command is in docs/lm_head.md)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lm_helpers import build_tiny_lm, fused_tokens
from pytorch_lightning.strategies import FSDPStrategy

from fusion.model.lm import LMHead
from fusion.training.fsdp import DecoderLayerPolicy

CONF = Path(__file__).resolve().parents[1] / "conf"
PROMPTS = ["Question: what color is the shape? Answer:", "Question: is there a square? Answer:"]
ANSWERS = ["red", "yes"]


def test_the_fsdp_trainer_config_builds_lightnings_fsdp_strategy_with_the_policy():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=vqav2_lm", "trainer=fsdp", "trainer.devices=4"])
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 4
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert isinstance(strategy.kwargs["auto_wrap_policy"], DecoderLayerPolicy)
    assert strategy.kwargs["use_orig_params"] is True


@pytest.mark.parametrize(("arch", "layer"), [("llama", "LlamaDecoderLayer"), ("gpt2", "GPT2Block")])
def test_the_policy_wraps_each_decoder_layer_of_the_lm(tmp_path, arch, layer):
    head = LMHead(build_tiny_lm(tmp_path / arch, arch), width=16)
    policy = DecoderLayerPolicy()
    assert policy(head, recurse=True, nonwrapped_numel=0)  # FSDP asks the root first: the names are read there
    assert policy.names == {layer}
    wrapped = [n for n, m in head.named_modules() if m is not head and policy(m, recurse=False, nonwrapped_numel=0)]
    assert len(wrapped) == head.lm.config.num_hidden_layers and all(type(head.get_submodule(n)).__name__ == layer
                                                                    for n in wrapped)
    with pytest.raises(ValueError, match="no transformers model"):
        DecoderLayerPolicy()(torch.nn.Linear(2, 2), recurse=True, nonwrapped_numel=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_loss(rank: int, folder: str, port: int, out: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    torch.manual_seed(0)
    head = LMHead(folder, width=16, regime="lora", lora_rank=4, lora_dropout=0.0)
    model = FSDP(head, auto_wrap_policy=DecoderLayerPolicy(), use_orig_params=True, device_id=torch.device("cpu"))
    units = sum(isinstance(m, FSDP) for m in model.modules())
    loss = model(fused_tokens(2, width=16), PROMPTS, ANSWERS).loss
    loss.backward()
    if rank == 0:
        torch.save({"loss": loss.detach(), "units": units}, out)
    dist.destroy_process_group()


def test_an_lm_head_sharded_over_two_processes_gives_the_unsharded_loss(tmp_path):
    folder = str(build_tiny_lm(tmp_path / "llama", "llama"))
    out = str(tmp_path / "sharded.pt")
    mp.spawn(_sharded_loss, args=(folder, _free_port(), out), nprocs=2, join=True)
    sharded = torch.load(out, weights_only=True)
    torch.manual_seed(0)
    head = LMHead(folder, width=16, regime="lora", lora_rank=4, lora_dropout=0.0)
    expected = head(fused_tokens(2, width=16), PROMPTS, ANSWERS).loss
    assert sharded["units"] == 1 + head.lm.config.num_hidden_layers  # the root and one unit per decoder layer
    torch.testing.assert_close(sharded["loss"], expected.detach(), rtol=1e-5, atol=1e-5)
