"""Plain, aligned tables (greppable, like cilium-dbg and hubble) and JSON output."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, no_headers: bool = False,
          out: TextIO = sys.stdout) -> None:
    """Columns aligned with spaces; a multi-valued cell (list) takes one line per value."""
    expanded: list[list[str]] = []
    for row in rows:
        cells = [c if isinstance(c, list) else [c] for c in row]
        height = max((len(c) for c in cells), default=1) or 1
        for i in range(height):
            expanded.append([str(c[i]) if i < len(c) else "" for c in cells])
    all_rows = ([list(headers)] if not no_headers else []) + expanded
    widths = [max((len(r[i]) for r in all_rows), default=0) for i in range(len(headers))]
    for r in all_rows:
        out.write("   ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() + "\n")


def dump_json(data: Any, out: TextIO = sys.stdout) -> None:
    json.dump(data, out, indent=2, sort_keys=True, default=str)
    out.write("\n")
