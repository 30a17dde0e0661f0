"""One lab driver and one lab fixture body for every e2e module that runs `villi lab`.

Each module that needs a lab runs its own (labs are cheap to share within a module and
must not leak between modules); what they share is how a lab is driven through the CLI
and how it is torn down on every path: `lab down`, then `cluster.teardown` in case `lab
down` itself failed, a stopped etcd resumed first, and this process's VILLI_LAB_STATE
restored.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from villi.lab import cluster

VILLI = [sys.executable, "-m", "villi.cli.main"]


class Lab:
    """Drives one lab through the CLI, with the lab's state file as its only address."""

    def __init__(self, state_path: Path) -> None:
        self.state_path = state_path
        self.tmp = state_path.parent
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("VILLI_")}
        self.env["VILLI_LAB_STATE"] = str(state_path)
        self.up_output = ""   # what `villi lab up` printed

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*VILLI, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def ok(self, *args: str, timeout: float = 120) -> str:
        res = self.run(*args, timeout=timeout)
        assert res.returncode == 0, f"villi {' '.join(args)} → {res.returncode}\n" \
            f"{res.stdout}\n{res.stderr}"
        return res.stdout

    @property
    def state(self) -> dict[str, Any]:
        return json.loads(self.state_path.read_text())

    def probe(self, src: str, dst: str, port: str, timeout: float = 1.0) -> bool:
        res = self.run("lab", "probe", src, dst, port, "--timeout", str(timeout))
        assert res.returncode in (0, 1), res.stderr
        return res.returncode == 0

    def eventually(self, src: str, dst: str, port: str, expect: bool,
                   within: float = 10.0) -> bool:
        deadline = time.monotonic() + within
        while True:
            if self.probe(src, dst, port) == expect:
                return True
            if time.monotonic() > deadline:
                return False

    def ipcache_has(self, node: str, ip: str) -> bool:
        """Whether ``node``'s pinned ipcache map holds ``ip``/32 (read from the kernel)."""
        from villi.datapath import abi
        from villi.datapath.maps import BpfMap, TypedMap
        from villi.endpoint.manager import ip_be

        m = BpfMap.open_pinned(f"/sys/fs/bpf/villi/lab-{self.state['id']}/{node}/villi_ipcache")
        try:
            keys = TypedMap(m, abi.IpcacheKey, abi.IpcacheValue).keys()
            return any(k.prefixlen == 32 and k.addr == ip_be(ip) for k in keys)
        finally:
            m.close()

    def apply(self, text: str, name: str, delete: bool = False) -> None:
        path = self.tmp / f"{name}.yaml"
        path.write_text(textwrap.dedent(text))
        self.ok("delete" if delete else "apply", "-f", str(path))


@contextlib.contextmanager
def running_lab(tmp_path_factory: pytest.TempPathFactory, name: str, *up_args: str,
                lab_class: type[Lab] = Lab, timeout: float = 120,
                require_clean_down: bool = False) -> Iterator[Lab]:
    """`villi lab up UP_ARGS` in a fresh directory; torn down whatever happens.

    With ``require_clean_down``, the teardown fails the module when ``villi lab down``
    left any process, namespace, pin, cgroup or file behind (what the leftovers sweep
    then removed)."""
    lab = lab_class(tmp_path_factory.mktemp(name) / "state.json")
    saved = os.environ.get("VILLI_LAB_STATE")
    os.environ["VILLI_LAB_STATE"] = str(lab.state_path)   # cluster.teardown looks here
    lab_id = None
    try:
        res = lab.run("lab", "up", *up_args, timeout=timeout)
        assert res.returncode == 0, f"lab up failed:\n{res.stdout}\n{res.stderr}"
        lab.up_output = res.stdout
        lab_id = lab.state["id"]
        yield lab
    finally:
        if lab.state_path.exists():
            state = lab.state
            lab_id = lab_id or state.get("id")
            etcd = state.get("processes", {}).get("etcd", {}).get("pid")
            if etcd:   # a failed drill must not leave etcd stopped
                with contextlib.suppress(ProcessLookupError):
                    os.kill(etcd, signal.SIGCONT)
            lab.run("lab", "down")
        left = {k: v for k, v in cluster.leftovers(lab_id).items() if v} if lab_id else {}
        if lab_id:
            cluster.teardown(lab_id)   # in case `lab down` itself failed
        if require_clean_down:
            assert not left, f"lab down left {left}"
        if saved is None:
            os.environ.pop("VILLI_LAB_STATE", None)
        else:
            os.environ["VILLI_LAB_STATE"] = saved
