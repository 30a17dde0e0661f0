"""``villi observe`` (being built: see issue 6)."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("observe", help="show flows (Hubble-compatible)")


def run(args: argparse.Namespace) -> int:
    print("villi observe is not built yet")
    return 2
