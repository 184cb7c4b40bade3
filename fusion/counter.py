"""Progress of long loops outside training, in a terminal and in a batch log.

A cache build, a cache check, generating the shapes data or probing a tower's features take
:func:`progress_counter` where they would take ``tqdm``: tqdm's bar when stderr is a terminal (or in a
notebook), else :class:`LogTqdm`, which logs a line when the loop starts, at most every ``log_every`` seconds
while it runs and when it ends, instead of redrawing one line with ``\\r`` (which a SLURM ``.out`` file or
``> log`` keeps as one ever longer line)::

    cache clip-3f9a1c0b7e21: 1200/5000 img (24%) | 35.10img/s | elapsed 00:34 | ETA 01:48

Training's own progress lines are :mod:`fusion.monitoring.progress`. This module is a foundation layer (after
:mod:`fusion.options`, its one fusion import; no Lightning), so tasks and data use it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm
from tqdm.auto import tqdm as auto_tqdm

from fusion.options import number

log = logging.getLogger(__name__)

LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) | {rate_fmt} | elapsed {elapsed} | ETA {remaining}"


class _Discard:
    """The file LogTqdm hands tqdm: its redraws (``\\r`` + bar) go nowhere, the log lines carry the progress."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


class LogTqdm(tqdm):
    """tqdm for a batch log: a log line (``fusion.counter``, INFO) when the loop starts, at most
    every ``log_every`` seconds while it runs (tqdm's ``mininterval``) and when it ends, never a ``\\r``.
    Without a total tqdm's own short form is logged (count, elapsed, rate)."""

    def __init__(self, iterable: Iterable | None = None, *args: Any, log_every: float = 60.0, **kwargs: Any) -> None:
        every = number("log_every", log_every, low=0)
        # maxinterval too: tqdm's monitor thread would otherwise force a redraw every 10 s.
        kwargs.update(file=_Discard(), mininterval=every, maxinterval=max(every, 10.0), dynamic_ncols=False,
                      ncols=None)
        total = kwargs.get("total")
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        if total is not None:  # with no total tqdm's short form: the count, elapsed and rate
            kwargs.setdefault("bar_format", LOG_FORMAT)
        kwargs["leave"] = True  # a log line is never erased: the final count is logged as well
        self._logged_n: float | None = None
        super().__init__(iterable, *args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        # close() displays the last state again: a count already logged is not logged twice
        if msg is None and self.n != self._logged_n:
            log.info("%s", self.__str__())
            self._logged_n = self.n
        return True


def progress_counter(
    iterable: Iterable | None = None, *, terminal: bool | None = None, log_every: float = 60.0, **kwargs: Any
) -> tqdm:
    """A progress counter for a long loop: ``tqdm(iterable, **kwargs)`` on a terminal or in a notebook
    (``terminal=None``: stderr is a tty, or IPython's kernel is loaded), else :class:`LogTqdm` logging every
    ``log_every`` seconds. Used like tqdm: iterate it, or ``update(n)`` inside ``with``."""
    if terminal is None:
        terminal = sys.stderr.isatty() or "ipykernel" in sys.modules
    if terminal:
        return auto_tqdm(iterable, **kwargs)
    return LogTqdm(iterable, log_every=log_every, **kwargs)
