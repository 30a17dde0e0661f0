"""Run code inside another network namespace, on the calling thread only.

``setns(CLONE_NEWNET)`` changes the namespace of the calling thread, not of the whole
process, so a short block of netlink or BPF attach work can enter a pod's or a lab
node's namespace and come back without disturbing other threads. Python 3.11 has no
``os.setns``; libc's is called through ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterator
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/var/run/netns"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


def netns_path(netns: str) -> str:
    """A namespace name (as ``ip netns`` knows it) or a path, as a path."""
    return netns if "/" in netns else os.path.join(NETNS_RUN_DIR, netns)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def in_netns(netns: str | None) -> Iterator[None]:
    """Enter ``netns`` (name or path) for the block; None means stay where we are."""
    if netns is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(netns_path(netns), os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def enter_netns_for_good(netns: str) -> None:
    """Move the calling thread into ``netns`` for the rest of its life.

    Daemons (agents in lab nodes) use this at start instead of ``ip netns exec``,
    which would also give them a private mount namespace with its own /sys — and so
    a private bpffs, where pinned maps would vanish with the process.
    """
    fd = os.open(netns_path(netns), os.O_RDONLY)
    try:
        _setns(fd)
    finally:
        os.close(fd)
