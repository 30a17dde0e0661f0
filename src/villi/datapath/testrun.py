"""Run a loaded program on a crafted packet with BPF_PROG_TEST_RUN.

Datapath logic is tested this way without pods: build a frame, pre-fill maps, run the
program once, check its return code, the packet it left and the maps it changed.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from villi.datapath import _libbpf as lb
from villi.errors import DatapathError

TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7


class SkBuff(ctypes.Structure):
    """The leading fields of ``struct __sk_buff`` that test runs may set."""

    _fields_ = [("len", ctypes.c_uint32), ("pkt_type", ctypes.c_uint32),
                ("mark", ctypes.c_uint32), ("queue_mapping", ctypes.c_uint32),
                ("protocol", ctypes.c_uint32), ("vlan_present", ctypes.c_uint32),
                ("vlan_tci", ctypes.c_uint32), ("vlan_proto", ctypes.c_uint32),
                ("priority", ctypes.c_uint32), ("ingress_ifindex", ctypes.c_uint32),
                ("ifindex", ctypes.c_uint32), ("tc_index", ctypes.c_uint32),
                ("cb", ctypes.c_uint32 * 5), ("hash", ctypes.c_uint32),
                ("tc_classid", ctypes.c_uint32), ("data", ctypes.c_uint32),
                ("data_end", ctypes.c_uint32), ("napi_id", ctypes.c_uint32),
                ("family", ctypes.c_uint32), ("remote_ip4", ctypes.c_uint32),
                ("local_ip4", ctypes.c_uint32), ("remote_ip6", ctypes.c_uint32 * 4),
                ("local_ip6", ctypes.c_uint32 * 4), ("remote_port", ctypes.c_uint32),
                ("local_port", ctypes.c_uint32), ("data_meta", ctypes.c_uint32),
                ("flow_keys", ctypes.c_uint64), ("tstamp", ctypes.c_uint64),
                ("wire_len", ctypes.c_uint32), ("gso_segs", ctypes.c_uint32),
                ("sk", ctypes.c_uint64), ("gso_size", ctypes.c_uint32),
                ("tstamp_type", ctypes.c_uint8), ("_pad", ctypes.c_uint8 * 3),
                ("hwtstamp", ctypes.c_uint64)]


@dataclass(frozen=True)
class RunResult:
    retval: int
    packet: bytes
    duration_ns: int


def run(prog_fd: int, packet: bytes, *, ifindex: int = 1, repeat: int = 1) -> RunResult:
    """Run ``prog_fd`` on ``packet`` as if it arrived on ``ifindex`` (1 = lo).

    The kernel resolves ``ifindex`` in the caller's network namespace.
    """
    out = ctypes.create_string_buffer(len(packet) + 256)
    ctx = SkBuff(ifindex=ifindex)
    opts = lb.BpfTestRunOpts(sz=ctypes.sizeof(lb.BpfTestRunOpts))
    opts.data_in = ctypes.cast(ctypes.c_char_p(packet), ctypes.c_void_p)
    opts.data_size_in = len(packet)
    opts.data_out = ctypes.cast(out, ctypes.c_void_p)
    opts.data_size_out = len(out)
    opts.ctx_in = ctypes.cast(ctypes.pointer(ctx), ctypes.c_void_p)
    opts.ctx_size_in = ctypes.sizeof(ctx)
    opts.repeat = repeat
    lb.check(lb.bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "BPF_PROG_TEST_RUN",
             DatapathError)
    return RunResult(int(opts.retval), out.raw[:opts.data_size_out], int(opts.duration))
