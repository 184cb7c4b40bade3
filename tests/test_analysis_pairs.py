"""Causal-tracing pairs: word swaps, pair files, and selecting a batch's paired rows."""

import json

import pytest
import torch

from fusion.analysis.pairs import DEFAULT_SWAPS, read_pairs, select, swap_word


def test_swap_word_keeps_the_rest_of_the_question():
    assert swap_word("what color is the shape in the top left?", DEFAULT_SWAPS) == (
        "what color is the shape in the bottom left?"
    )
    assert swap_word("how many circles are there?", DEFAULT_SWAPS) == "how many squares are there?"
    assert swap_word("where is the purple square?", DEFAULT_SWAPS) == "where is the red square?"
    assert swap_word("how many shapes are there?", DEFAULT_SWAPS) is None


def test_select_takes_the_rows_of_every_per_example_entry():
    batch = {"x": torch.arange(4), "features": {"a": torch.arange(8).view(4, 2)}, "ids": list("wxyz"), "k": 3}
    out = select(batch, torch.tensor([2, 0]))
    assert out["x"].tolist() == [2, 0] and out["features"]["a"].tolist() == [[4, 5], [0, 1]]
    assert out["ids"] == ["y", "w"] and out["k"] == 3


def test_pair_files_json_and_jsonl(tmp_path):
    rows = [{"question_id": 11000, "corrupted_question": "what color is the box?"},
            {"question_id": "a_1", "corrupted_question": "x"}]
    expected = {"11000": "what color is the box?", "a_1": "x"}
    (tmp_path / "p.json").write_text(json.dumps(rows))
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "one.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert read_pairs(tmp_path / "p.json") == read_pairs(tmp_path / "p.jsonl") == expected
    assert read_pairs(tmp_path / "one.jsonl") == {"11000": "what color is the box?"}
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"pairs=.*bad\.jsonl: line 2 is neither"):
        read_pairs(tmp_path / "bad.jsonl")
    (tmp_path / "keys.json").write_text(json.dumps([{"question_id": 1, "question": "q"}]))
    with pytest.raises(ValueError, match=r"keys\.json: pair 0 is .*expected \{\"question_id\""):
        read_pairs(tmp_path / "keys.json")
    with pytest.raises(FileNotFoundError, match=r"pairs=.*missing\.json: no such file"):
        read_pairs(tmp_path / "missing.json")
