"""The tiny random LMs of the embedded LM experiment: written once with save_pretrained, loaded by
from_pretrained, and a folder built with other settings refused instead of reused."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion.model.tiny_lm import SETTINGS_FILE, build_tokenizer, ensure_tiny_lm, shapes_corpus


def test_ensure_builds_once_then_reuses_and_refuses_other_settings(tmp_path):
    folder = tmp_path / "lm" / "tiny"
    assert ensure_tiny_lm(folder, "llama", hidden_size=32, vocab_size=512) == str(folder)
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert ensure_tiny_lm(folder, "llama", hidden_size=32, vocab_size=512) == str(folder)
    assert (folder / "config.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert json.loads((folder / SETTINGS_FILE).read_text()) == {"arch": "llama", "hidden_size": 32, "vocab_size": 512}
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.hidden_size == 32 and model.config.model_type == "llama"
    assert AutoTokenizer.from_pretrained(folder)(" red", add_special_tokens=False)["input_ids"] != []
    with pytest.raises(ValueError, match=r"hidden_size 32 != 64"):
        ensure_tiny_lm(folder, "llama", hidden_size=64, vocab_size=512)
    with pytest.raises(ValueError, match=r"arch 'llama' != 'gpt2'"):
        ensure_tiny_lm(folder, "gpt2", hidden_size=32, vocab_size=512)
    (folder / SETTINGS_FILE).unlink()
    with pytest.raises(ValueError, match="not one ensure_tiny_lm built"):
        ensure_tiny_lm(folder, "llama", hidden_size=32, vocab_size=512)
    assert not list(folder.parent.glob(".*.tmp"))  # no half-built folder left beside it


def test_the_shapes_tokenizer_makes_each_answer_word_one_token():
    tokenizer = build_tokenizer(shapes_corpus(), add_bos=True, vocab_size=512)
    for word in ("red", "purple", "circle", "triangle", "top", "left", "3"):
        assert len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
