"""Command groups shared by several CLI modules (``villi policy …``, ``villi endpoint …``).

Two modules may add verbs to one group (``villi policy trace`` here, ``villi policy
degrade`` elsewhere): :func:`group` returns the group's sub-parsers, creating the group
the first time, so registration order does not matter and argparse never sees the
group twice.
"""

from __future__ import annotations

import argparse

_GROUPS: dict[tuple[int, str], argparse._SubParsersAction] = {}


def group(sub: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """The sub-parsers of ``villi NAME``, created on first use."""
    key = (id(sub), name)
    found = _GROUPS.get(key)
    if found is None:
        parser = sub.add_parser(name, help=help)
        found = parser.add_subparsers(dest=f"{name}_cmd", metavar="COMMAND")
        parser.set_defaults(handler=lambda args, p=parser: _usage(p))
        _GROUPS[key] = found
    return found


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2
