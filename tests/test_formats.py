"""Reading JSON-lines annotation files: records, and errors that name the file, the line and what was expected."""

import re

import pytest

from fusion.tasks.formats import DataFormatError, all_or_none, line_of, read_json, read_json_lines


def test_blank_lines_are_skipped_but_counted(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n  \n{"a": 2}\n')
    records = read_json_lines(path, "something")
    assert [(r.line, r.field("a", int)) for r in records] == [(1, 1), (4, 2)]
    assert records[1].where == f"{path} line 4"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"x\.jsonl holds no examples; expected the test file"),
        ('{"a": 1}\n[1, 2]\n', r"x\.jsonl line 2: expected a JSON object, got list"),
        ('{"a": 1}\n{"a": \n', r"x\.jsonl line 2: not valid JSON \(Expecting value, column 7\)"),
    ],
)
def test_file_level_errors(tmp_path, text, message):
    path = tmp_path / "x.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_json_lines(path, "the test file")
    with pytest.raises(FileNotFoundError, match=r"y\.jsonl not found; expected the test file"):
        read_json_lines(tmp_path / "y.jsonl", "the test file")


def test_field_and_choice_check_type_and_value(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"n": true, "s": "", "label": 1, "flag": true}\n')
    (rec,) = read_json_lines(path, "the test file")
    with pytest.raises(ValueError, match=r"line 1: n True is not an integer"):
        rec.field("n", int)  # a JSON true is not the number 1
    with pytest.raises(ValueError, match=r"line 1: s is empty"):
        rec.field("s")
    with pytest.raises(ValueError, match=r"line 1: missing field 'x' \(fields present: flag, label, n, s\)"):
        rec.field("x")
    assert rec.choice("label", (0, 1)) == 1 and rec.has("label") and not rec.has("x")
    with pytest.raises(ValueError, match=r"line 1: flag True is not one of 0, 1"):
        rec.choice("flag", (0, 1))


def test_bytes_that_are_not_utf8_name_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    # Far past the first block a text-mode reader decodes ahead, so the line number must come from the line.
    lines = [b'{"a": 1}'] * 3000
    lines[2499] = b'{"a": "caf\xe9"}'  # Latin-1
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataFormatError, match=r"x\.jsonl line 2500: not UTF-8 text \(invalid continuation byte"):
        read_json_lines(path, "the test file")


def test_a_key_is_on_every_line_or_on_none(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": 1}\n{"id": 2}\n')
    assert all_or_none(read_json_lines(path, "the test file"), "label") is False
    path.write_text('{"id": 1, "label": 0}\n\n{"id": 2, "label": 1}\n')
    assert all_or_none(read_json_lines(path, "the test file"), "label") is True
    path.write_text('{"id": 1, "label": 0}\n{"id": 2}\n{"id": 3, "label": 1}\n')
    with pytest.raises(DataFormatError, match=r"x\.jsonl line 2: missing field 'label' while other lines have one"):
        all_or_none(read_json_lines(path, "the test file"), "label")


def test_line_of_finds_the_line_by_a_key_compared_as_text(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": 7}\n\n{"id": 42}\n')
    assert line_of(path, "id", "42") == f"{path} line 3"
    assert line_of(path, "id", "9") == f"{path}, id '9'"


def test_a_key_twice_in_one_json_object_is_refused_naming_file_key_and_lines(tmp_path):
    path = tmp_path / "q.json"
    # json.load alone keeps the second q1 and drops a question without a word.
    path.write_text('{\n "q1": {"question": "a"},\n "q2": {"question": "b"},\n "q1": {"question": "c"}\n}\n')
    with pytest.raises(DataFormatError, match=rf"^{re.escape(str(path))} \(the questions\): key 'q1' occurs twice in "
                       r"one JSON object \(lines 2 and 4\); expected each key once"):
        read_json(path, "the questions")
    # A key repeated inside nested objects is found too; its lines are left out where the key occurs elsewhere.
    path.write_text('[{"id": 1, "answer": "x"}, {"id": 2, "answer": "y", "answer": "z"}]')
    with pytest.raises(DataFormatError, match=r"key 'answer' occurs twice in one JSON object; expected"):
        read_json(path, "the answers")
    # The same key in different objects is fine.
    path.write_text('[{"id": 1}, {"id": 2}]')
    assert read_json(path, "the answers") == [{"id": 1}, {"id": 2}]


def test_line_of_names_every_line_of_a_repeated_id(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": 7}\n{"id": 8}\n\n{"id": 7}\n')
    assert line_of(path, "id", "7") == f"{path} lines 1, 4"
