"""``python -m fusion.study <sweep dir>``: see :mod:`fusion.study.cli`."""

from fusion.study.cli import main

main()
