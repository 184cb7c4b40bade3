"""Moved: the encoder-subset study is :mod:`fusion.study` (``python -m fusion.study <sweep dir>``).

``python -m fusion.zoo.study`` still runs it (saying so); ``fusion.zoo.study.SubsetTable`` is
:class:`fusion.study.cli.StudyCallback`.
"""

import sys

from fusion.study.cli import StudyCallback, SubsetTable, main, write_study

__all__ = ["StudyCallback", "SubsetTable", "main", "write_study"]

if __name__ == "__main__":
    print("fusion.zoo.study moved to fusion.study: python -m fusion.study <sweep dir>", file=sys.stderr)
    main()
