"""Progress of long loops outside training: log lines (never a carriage return) off a terminal, tqdm on one.

The cache CLI writing these lines to a redirected stderr, as a batch job does, is checked in
tests/test_data_cache.py (test_cli_build_progress_in_a_batch_log).
"""

import io
import logging
import re

import pytest
from tqdm import tqdm

from fusion.counter import LogTqdm, progress_counter

LOGGER = "fusion.counter"


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_a_line_at_the_start_and_at_the_end_within_the_interval(caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert list(progress_counter(range(5), terminal=False, desc="shapes train", unit="img")) == [0, 1, 2, 3, 4]
    lines = _lines(caplog)
    assert len(lines) == 2, lines  # the default 60 s interval: no line in between
    assert lines[0].startswith("shapes train: 0/5 img (0%) | ") and "ETA" in lines[0]
    assert re.fullmatch(r"shapes train: 5/5 img \(100%\) \| [\d.?]+img/s \| elapsed 00:00 \| ETA 00:00", lines[1])
    assert not any("\r" in line for line in lines)


def test_every_update_with_a_zero_interval_and_the_start_count_of_a_resumed_build(caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER), progress_counter(
        total=10, initial=4, terminal=False, desc="cache clip-0", unit="img", log_every=0
    ) as bar:
        for _ in range(3):
            bar.update(2)
    counts = [re.match(r"cache clip-0: (\d+)/10 img \((\d+)%\)", line).groups() for line in _lines(caplog)]
    assert counts == [("4", "40"), ("6", "60"), ("8", "80"), ("10", "100")]


def test_without_a_total_and_with_leave_false_the_final_count_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for _ in progress_counter(iter(range(3)), terminal=False, desc="features clip_tiny", leave=False):
            pass
    assert re.match(r"features clip_tiny: 3it \[", _lines(caplog)[-1])  # tqdm's short form: no total, no ETA


def test_the_tqdm_bar_on_a_terminal_nothing_when_disabled(caplog):
    out = io.StringIO()
    bar = progress_counter(range(3), terminal=True, file=out, desc="verify x")
    assert isinstance(bar, tqdm) and not isinstance(bar, LogTqdm)
    list(bar)
    assert "\r" in out.getvalue() and "3/3" in out.getvalue()  # tqdm redraws its one line
    assert isinstance(progress_counter(range(3), terminal=False), LogTqdm)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        list(progress_counter(range(3), terminal=False, disable=True))
    assert _lines(caplog) == []


def test_a_bad_interval_is_named():
    with pytest.raises(ValueError, match="log_every"):
        progress_counter(range(3), terminal=False, log_every=-1)
