"""Command-line checks that Hydra does not make itself."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep


def unknown_choice_errors(args: Sequence[str], conf_dir: Path) -> list[str]:
    """Messages for list choices of a config group (``encoder=[clip,nope]``) naming a missing config.

    Hydra lists the available options when a single choice is unknown, but not inside a multi-select
    list; this fills that gap before composition.
    """
    candidates = [a for a in args if not a.startswith("-") and "=" in a]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except Exception:  # Hydra reports malformed overrides itself, with its own message.
        return []
    errors = []
    for override in overrides:
        group = conf_dir / override.key_or_group.lstrip("+~")
        if override.is_delete() or not group.is_dir():
            continue
        value = override.value()
        lists = value.list if isinstance(value, ChoiceSweep) else [value]
        available = sorted(p.stem for p in group.glob("*.yaml"))
        for choice in lists:
            names = choice if isinstance(choice, list) else []
            for name in names:
                if name not in available:
                    errors.append(
                        f"unknown {override.key_or_group} {name!r} in {override.input_line!r}; "
                        f"available: {', '.join(available)}"
                    )
    return errors


# Config groups that were renamed: an override of the old name is refused naming the new one (Hydra alone
# would say only that the key is not in the config).
RENAMED_GROUPS = {"model": "training"}


def renamed_group_errors(args: Sequence[str]) -> list[str]:
    """Messages for overrides of a renamed group (``model.lr=1e-3`` is now ``training.lr=1e-3``)."""
    errors = []
    for arg in args:
        key = arg.split("=", 1)[0].lstrip("+~")
        head, _, rest = key.partition(".")
        if "=" in arg and head in RENAMED_GROUPS:
            new = RENAMED_GROUPS[head] + ("." + rest if rest else "")
            errors.append(f"{arg!r}: the config group {head!r} is now {RENAMED_GROUPS[head]!r}; write {new}=...")
    return errors


def check_choices(conf_dir: Path, args: Sequence[str] | None = None) -> None:
    """Exit with a clear message if a multi-select group names a config that does not exist, or an override
    names a renamed group."""
    args = sys.argv[1:] if args is None else args
    errors = renamed_group_errors(args) + unknown_choice_errors(args, conf_dir)
    if errors:
        sys.exit("error: " + "\n".join(errors))
