"""cgroup v2 directories and the socket-hook programs attached to them.

A cgroup/connect4 (sendmsg4, recvmsg4, getpeername4) program attached to a cgroup v2
directory runs for every socket of every process in that cgroup and its descendants,
whatever network namespace the socket lives in. villi gives each node one cgroup and
puts the node's pods (their processes) in it, so a node's programs serve exactly its
own pods.

Programs are attached without BPF_F_ALLOW_MULTI: attaching again replaces the program
atomically (a restarted agent swaps in its fresh copy; no connect goes untranslated in
between), and ``detach`` can remove whatever villi attached even when this process did
not load it.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import time
from pathlib import Path

from villi.datapath import _libbpf as lb
from villi.errors import AttachError

#: Where cgroup v2 lives on hybrid hosts (v1 controllers at /sys/fs/cgroup/*).
UNIFIED = Path("/sys/fs/cgroup/unified")


class SockHook(enum.IntEnum):
    """The kernel's ``enum bpf_attach_type`` values of the IPv4 socket address hooks."""

    CONNECT4 = 10
    SENDMSG4 = 14
    RECVMSG4 = 19
    GETPEERNAME4 = 29


_query = lb._lib.bpf_prog_query
_query.restype = ctypes.c_int
_query.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32),
                   ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32)]


def cgroup2_root() -> Path:
    """The mount point of the cgroup v2 hierarchy (unified or hybrid layout)."""
    with open("/proc/mounts") as f:
        mounts = [line.split() for line in f]
    points = [Path(m[1]) for m in mounts if len(m) > 2 and m[2] == "cgroup2"]
    for preferred in (Path("/sys/fs/cgroup"), UNIFIED):
        if preferred in points:
            return preferred
    if points:
        return points[0]
    raise AttachError("no cgroup v2 hierarchy is mounted (mount -t cgroup2 none "
                      f"{UNIFIED})", errno=errno.ENOENT)


def _check_path(path: Path) -> Path:
    path = Path(path)
    root = cgroup2_root()
    if path != root and root not in path.parents:
        raise AttachError(f"{path} is not inside the cgroup v2 hierarchy at {root}",
                          errno=errno.EINVAL)
    return path


def create_cgroup(path: Path | str) -> Path:
    """Create a cgroup v2 directory (and its parents); idempotent."""
    p = _check_path(Path(path))
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AttachError(f"cannot create cgroup {p}: {e.strerror}", errno=e.errno) from e
    return p


def move_pid(path: Path | str, pid: int) -> None:
    """Move process ``pid`` (all its threads) into the cgroup at ``path``."""
    p = _check_path(Path(path))
    try:
        (p / "cgroup.procs").write_text(f"{pid}\n")
    except OSError as e:
        raise AttachError(f"cannot move pid {pid} into {p}: {e.strerror}", errno=e.errno) from e


def pids(path: Path | str) -> list[int]:
    """The processes in the cgroup itself (not in its children)."""
    try:
        text = (Path(path) / "cgroup.procs").read_text()
    except FileNotFoundError:
        return []
    return [int(x) for x in text.split()]


def remove_cgroup(path: Path | str, timeout: float = 2.0) -> bool:
    """Remove a cgroup and its children; processes still inside move to the parent.

    False when it did not exist. (A cgroup whose last process just exited may stay
    busy for a moment; removal is retried until ``timeout``.)
    """
    p = _check_path(Path(path))
    if not p.exists():
        return False
    for child in sorted((c for c in p.rglob("*") if c.is_dir()), key=lambda c: -len(c.parts)):
        _evacuate_and_rmdir(child, p.parent, timeout)
    _evacuate_and_rmdir(p, p.parent, timeout)
    return True


def _evacuate_and_rmdir(cg: Path, parent: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for pid in pids(cg):
            try:
                (parent / "cgroup.procs").write_text(f"{pid}\n")
            except OSError:
                pass  # exited meanwhile
        try:
            cg.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise AttachError(f"cannot remove cgroup {cg}: {e.strerror}",
                                  errno=e.errno) from e
            time.sleep(0.02)


def _open(path: Path) -> int:
    try:
        return os.open(_check_path(path), os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise AttachError(f"cannot open cgroup {path}: {e.strerror}", errno=e.errno) from e


def attach(path: Path | str, hook: SockHook, prog_fd: int) -> None:
    """Attach ``prog_fd`` at ``hook`` of the cgroup (replacing villi's previous one)."""
    fd = _open(Path(path))
    try:
        lb.check(lb.bpf_prog_attach(prog_fd, fd, int(hook), 0),
                 f"attaching to {hook.name.lower()} of cgroup {path}", AttachError)
    finally:
        os.close(fd)


def detach(path: Path | str, hook: SockHook) -> bool:
    """Detach the program at ``hook``; False when none was attached (or no cgroup)."""
    if not Path(path).exists():
        return False
    fd = _open(Path(path))
    try:
        # Without a program fd the kernel detaches the single non-multi program there.
        ret = lb.bpf_prog_detach2(-1, fd, int(hook))
        if ret < 0:
            if -ret in (errno.ENOENT, errno.EBADF):
                return False
            lb.check(ret, f"detaching {hook.name.lower()} from cgroup {path}", AttachError)
        return True
    finally:
        os.close(fd)


def query(path: Path | str, hook: SockHook) -> list[int]:
    """Ids of the programs attached at ``hook`` of the cgroup itself."""
    fd = _open(Path(path))
    try:
        ids = (ctypes.c_uint32 * 64)()
        count = ctypes.c_uint32(64)
        flags = ctypes.c_uint32(0)
        lb.check(_query(fd, int(hook), 0, ctypes.byref(flags), ids, ctypes.byref(count)),
                 f"querying {hook.name.lower()} of cgroup {path}", AttachError)
        return list(ids[:count.value])
    finally:
        os.close(fd)
