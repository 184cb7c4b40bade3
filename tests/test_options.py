"""Numeric options checked where they are built: a bad value names its key, the value and the range."""

import pytest

from fusion.options import number


def test_number_accepts_numbers_and_numeric_strings_within_range():
    assert number("training.lr", 3e-4, low=0, low_open=True) == 3e-4
    assert number("training.lr", "3e-4", low=0, low_open=True) == 3e-4  # YAML reads 3e-4 as a string
    assert number("training.warmup_ratio", 1, low=0, high=1) == 1.0
    assert number("x", -5) == -5.0


@pytest.mark.parametrize(
    ("value", "bounds", "says"),
    [
        ("fast", {"low": 0, "low_open": True}, r"training.lr='fast': expected a number > 0$"),
        (0, {"low": 0, "low_open": True}, r"training.lr=0: expected a number > 0$"),
        (True, {}, r"training.lr=True: expected a number$"),
        (None, {}, r"training.lr=None: expected a number$"),
        (float("nan"), {}, r"training.lr=nan: expected a number \(finite\)"),
        ("inf", {"low": 0}, r"training.lr='inf': expected a number >= 0 \(finite\)"),
        (1.0, {"low": 0, "high": 1, "high_open": True}, r"training.lr=1.0: expected a number in \[0, 1\)$"),
        (-0.1, {"low": 0, "high": 1}, r"training.lr=-0.1: expected a number in \[0, 1\]$"),
        (2, {"high": 1}, r"training.lr=2: expected a number <= 1$"),
    ],
)
def test_number_names_the_key_the_value_and_what_was_expected(value, bounds, says):
    with pytest.raises(ValueError, match=says):
        number("training.lr", value, **bounds)
