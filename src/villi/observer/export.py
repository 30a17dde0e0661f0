"""Persistent flow log: flows as JSON lines, size-based rotation, optional filter.

Hubble's ring forgets; this file does not (until rotation). ``read_flows`` reads it
back (newest file last) so ``villi observe --since`` can reach beyond the ring and
across agent restarts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class FlowExporter:
    def __init__(self, path: Path, *, max_bytes: int = 10 * 1024 * 1024, backups: int = 5
                 ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")
        self.written = 0

    def write(self, flows: list[dict[str, Any]]) -> None:
        if not flows:
            return
        self._f.write("".join(json.dumps(f, separators=(",", ":")) + "\n" for f in flows))
        self._f.flush()
        self.written += len(flows)
        if self._f.tell() >= self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        self._f.close()
        for i in range(self.backups - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._f = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        self._f.close()


def read_flows(path: Path, backups: int = 5) -> Iterator[dict[str, Any]]:
    """Every flow in the export file and its rotations, oldest file first."""
    path = Path(path)
    files = [path.with_name(f"{path.name}.{i}") for i in range(backups, 0, -1)] + [path]
    for f in files:
        if not f.exists():
            continue
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if line:
                    try:
                        yield json.loads(line)
                    except ValueError:
                        continue
