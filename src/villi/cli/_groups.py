"""Command groups shared by several CLI modules (``villi policy …``, ``villi endpoint …``).

Two modules may add verbs to one group (``villi policy trace`` here, ``villi policy
degrade`` elsewhere): :func:`group` returns the group's sub-parsers, reusing a group
that another module registered already (with this helper or with a plain
``add_parser``), so argparse never sees the group twice. Verbs registered through it
set ``handler`` (``main`` calls it); a group's own verbs without a handler fall through
to ``main``'s dispatch by command name.
"""

from __future__ import annotations

import argparse


def group(sub: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """The sub-parsers of ``villi NAME``, created on first use."""
    parser = sub.choices.get(name)
    if parser is None:
        parser = sub.add_parser(name, help=help)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest=f"{name}_cmd", metavar="COMMAND")
