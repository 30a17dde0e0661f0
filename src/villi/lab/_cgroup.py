"""Each lab node's cgroup: where its pods' processes run.

Socket-level service load balancing (cgroup ``connect4``/``sendmsg4``/``recvmsg4``
programs, see docs/services.md) acts on the processes of the cgroup the node's agent
attached to: by default ``<cgroup2>/villi/<cluster>/<node>``. So the lab puts every
process of a node's pods there: echo servers (moved before they open a socket: a
socket belongs to the cgroup of the process that created it), ``villi lab exec``
commands and ``villi lab probe`` (the CLI process moves itself first). ``lab down``
removes ``<cgroup2>/villi/lab-<id>`` (and ``<cgroup2>/villi`` when empty).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from villi.errors import VilliError


def root() -> Path | None:
    """The cgroup v2 mount, or None on a machine without one (no services then)."""
    from villi.datapath.cgroup import cgroup2_root

    try:
        return cgroup2_root()
    except VilliError:
        return None


def lab_cgroup(lab_id: str) -> Path | None:
    r = root()
    return r / "villi" / f"lab-{lab_id}" if r else None


def node_cgroup(cluster: str, node: str) -> Path | None:
    """Same path as the agent's default ``--service-cgroup``."""
    r = root()
    return r / "villi" / cluster / node if r else None


def ensure(path: Path | None) -> None:
    if path is not None:
        from villi.datapath.cgroup import create_cgroup

        create_cgroup(path)


def enter(path: Path | None) -> None:
    """Move this process (every thread) into ``path``; nothing when there is none."""
    if path is None or not path.is_dir():
        return
    import os

    (path / "cgroup.procs").write_text(f"{os.getpid()}\n")


def shell_prefix(path: Path | None) -> list[str]:
    """argv prefix that runs a command inside ``path`` from its very first instruction
    (a shell writes its own pid to ``cgroup.procs`` and execs the command)."""
    if path is None:
        return []
    return ["sh", "-c", f'echo $$ > "{path}/cgroup.procs" && exec "$@"', "lab-cgroup-enter"]


def remove_lab(lab_id: str) -> bool:
    from villi.datapath.cgroup import remove_cgroup

    path = lab_cgroup(lab_id)
    if path is None or not path.exists():
        return False
    try:
        remove_cgroup(path)
    except VilliError:
        return False
    with contextlib.suppress(OSError):
        path.parent.rmdir()   # <cgroup2>/villi, only when no other cluster uses it
    return True
