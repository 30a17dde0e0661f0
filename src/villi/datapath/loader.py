"""Load compiled BPF objects through libbpf, with their maps pinned per node.

Maps declare ``LIBBPF_PIN_BY_NAME``; opening an object with ``pin_root`` makes libbpf
reuse maps already pinned there (same definition) or create and pin them. That is what
keeps enforcement alive while no agent runs: the maps live in bpffs, the programs stay
attached to the veths, and a new agent loads the same object and finds the same maps.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

from villi.datapath import _libbpf as lb
from villi.datapath.maps import BpfMap
from villi.errors import DatapathError, LoadError

BPFFS = Path("/sys/fs/bpf")
VERIFIER_LOG_SIZE = 16 * 1024 * 1024


def ensure_bpffs() -> None:
    """Mount bpffs at /sys/fs/bpf when the machine has not (pins need it)."""
    with open("/proc/mounts") as f:
        if any(line.split()[1:3] == [str(BPFFS), "bpf"] for line in f):
            return
    res = subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], capture_output=True, text=True)
    if res.returncode != 0:
        raise DatapathError(f"cannot mount bpffs at {BPFFS}: {res.stderr.strip()}")


def pin_root(cluster: str, node: str) -> Path:
    """Where a node's maps are pinned: /sys/fs/bpf/villi/<cluster>/<node>."""
    return BPFFS / "villi" / cluster / node


class Program:
    """A loaded program: its name and fd (owned by its object)."""

    def __init__(self, name: str, fd: int) -> None:
        self.name = name
        self.fd = fd

    def __repr__(self) -> str:
        return f"Program({self.name!r}, fd={self.fd})"


class BpfObject:
    """One loaded ELF object: its programs and maps.

    Keep it open for as long as its programs should be reachable by fd; attached
    programs and pinned maps outlive it.
    """

    def __init__(self, path: Path | str, pin_root: Path | None = None) -> None:
        self.path = Path(path)
        self._log_buf = ctypes.create_string_buffer(VERIFIER_LOG_SIZE)
        opts = lb.BpfObjectOpenOpts()
        opts.sz = ctypes.sizeof(opts)
        if pin_root is not None:
            ensure_bpffs()
            pin_root.mkdir(parents=True, exist_ok=True)
            opts.pin_root_path = str(pin_root).encode()
        opts.kernel_log_buf = ctypes.cast(self._log_buf, ctypes.c_void_p)
        opts.kernel_log_size = VERIFIER_LOG_SIZE
        opts.kernel_log_level = 0  # no log on success; libbpf retries with level 1 on failure
        lb.take_log()
        self._obj: int | None = lb.check_ptr(
            lb.bpf_object__open_file(str(self.path).encode(), opts), f"opening {self.path}",
            LoadError)
        ret = lb.bpf_object__load(self._obj)
        if ret < 0:
            err = -ret
            verifier_log = self._log_buf.value.decode(errors="replace").strip()
            libbpf_log = lb.take_log().strip()
            lb.bpf_object__close(self._obj)
            self._obj = None
            raise LoadError(f"loading {self.path.name} failed: {os.strerror(err)}"
                            + (f"\n{libbpf_log}" if libbpf_log else ""),
                            errno=err, verifier_log=verifier_log)
        self._maps: dict[str, BpfMap] = {}

    def program(self, name: str) -> Program:
        prog = lb.check_ptr(lb.bpf_object__find_program_by_name(self._require(), name.encode()),
                            f"no program {name!r} in {self.path.name}", LoadError)
        return Program(name, lb.bpf_program__fd(prog))

    def program_names(self) -> list[str]:
        names, prog = [], lb.bpf_object__next_program(self._require(), None)
        while prog:
            names.append(lb.bpf_program__name(prog).decode())
            prog = lb.bpf_object__next_program(self._obj, prog)
        return names

    def map(self, name: str) -> BpfMap:
        """A map of the object, with its own duplicated fd (valid after close())."""
        if name not in self._maps:
            m = lb.check_ptr(lb.bpf_object__find_map_by_name(self._require(), name.encode()),
                             f"no map {name!r} in {self.path.name}", LoadError)
            self._maps[name] = BpfMap(os.dup(lb.bpf_map__fd(m)), name=name)
        return self._maps[name]

    def _require(self) -> int:
        if not self._obj:
            raise LoadError(f"{self.path.name} is closed")
        return self._obj

    def close(self) -> None:
        """Close the object (programs stay attached, pinned maps stay pinned)."""
        if self._obj:
            lb.bpf_object__close(self._obj)
            self._obj = None

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
