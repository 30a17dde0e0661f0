"""Atomic, durable JSON files for node-local state.

A pod IP must be on disk before the CNI plugin hands it to a pod: after a crash the
agent restores its allocations from this file, and an allocation that was lost would be
handed out a second time. So a write goes to a temporary file in the same directory,
is fsynced, renamed over the old file (atomic on POSIX), and the directory is fsynced so
the rename itself survives a power loss. A reader therefore sees either the old or the
new file, never a torn one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from villi.errors import IPAMError


def write_json_atomic(path: Path, doc: Any) -> None:
    data = json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise IPAMError(f"cannot write IPAM state {path}: {exc.strerror or exc}") from exc


def read_json(path: Path) -> Any | None:
    """The document in ``path``, or None when the file does not exist."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IPAMError(f"cannot read IPAM state {path}: {exc.strerror or exc}") from exc
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IPAMError(
            f"IPAM state {path} is corrupt ({exc}); it holds the pod IPs in use, so move it "
            "aside only after checking which pods run on this node") from None
