"""Attach and detach tc programs on a device's clsact qdisc, in any network namespace.

Programs are attached in direct-action mode with a fixed handle and priority, and
re-attaching uses BPF_TC_F_REPLACE: a restarted agent swaps in its freshly loaded
program atomically, so no packet ever crosses the veth unfiltered.
"""

from __future__ import annotations

import ctypes
import enum
import errno

from villi._nsenter import in_netns
from villi.datapath import _libbpf as lb
from villi.errors import AttachError

TC_HANDLE = 1
TC_PRIORITY = 1


class TcHook(enum.IntEnum):
    INGRESS = lb.BPF_TC_INGRESS
    EGRESS = lb.BPF_TC_EGRESS


def _hook(ifindex: int, point: TcHook) -> lb.BpfTcHook:
    return lb.BpfTcHook(sz=ctypes.sizeof(lb.BpfTcHook), ifindex=ifindex, attach_point=int(point))


def attach(ifindex: int, point: TcHook, prog_fd: int, netns: str | None = None) -> int:
    """Attach ``prog_fd`` at ``point`` of ``ifindex`` (creating clsact if needed).

    Returns the kernel's program id of the attached program.
    """
    with in_netns(netns):
        hook = _hook(ifindex, point)
        ret = lb.bpf_tc_hook_create(ctypes.byref(hook))
        if ret < 0 and -ret != errno.EEXIST:
            lb.check(ret, f"creating clsact on ifindex {ifindex}", AttachError)
        opts = lb.BpfTcOpts(sz=ctypes.sizeof(lb.BpfTcOpts), prog_fd=prog_fd,
                            flags=lb.BPF_TC_F_REPLACE, handle=TC_HANDLE, priority=TC_PRIORITY)
        lb.check(lb.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts)),
                 f"attaching to {point.name.lower()} of ifindex {ifindex}", AttachError)
        return int(opts.prog_id)


def _ours() -> lb.BpfTcOpts:
    """Options naming villi's filter (its handle and priority), no program."""
    return lb.BpfTcOpts(sz=ctypes.sizeof(lb.BpfTcOpts), handle=TC_HANDLE, priority=TC_PRIORITY)


def detach(ifindex: int, point: TcHook, netns: str | None = None) -> bool:
    """Detach villi's program at ``point``; False when none was attached."""
    with in_netns(netns):
        hook, opts = _hook(ifindex, point), _ours()
        ret = lb.bpf_tc_detach(ctypes.byref(hook), ctypes.byref(opts))
        if ret < 0:
            if -ret in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                return False
            lb.check(ret, f"detaching from ifindex {ifindex}", AttachError)
        return True


def query(ifindex: int, point: TcHook, netns: str | None = None) -> int | None:
    """The id of the program villi attached at ``point``, or None."""
    with in_netns(netns):
        hook, opts = _hook(ifindex, point), _ours()
        ret = lb.bpf_tc_query(ctypes.byref(hook), ctypes.byref(opts))
        if ret < 0:
            return None
        return int(opts.prog_id)
