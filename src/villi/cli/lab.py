"""``villi lab …`` and ``villi connectivity test`` (being built: see issue 5)."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("lab", help="local multi-node lab in network namespaces")
    sub.add_parser("connectivity", help="built-in connectivity test suite against the lab")


def run(args: argparse.Namespace) -> int:
    print("villi lab is not built yet")
    return 2
