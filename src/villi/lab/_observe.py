"""The lab's flow observability: agents' TCP flow endpoints, a relay, and the web UI.

Each agent serves its flows on ``<node IP>:4244`` inside its node namespace, guarded by a
token written to the lab directory (mode 0600). The relay runs in the underlay namespace
(which reaches every node IP) and listens on unix sockets in the lab directory — unix
sockets cross namespaces, so nothing is added to the root namespace's network. The UI
runs in the root namespace on a loopback port and reads the relay's socket; that
loopback port is the URL ``villi lab up`` prints.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from villi.kvstore.tls import KvstoreTLS
from villi.lab import _procs
from villi.lab._state import LabError

AGENT_FLOW_PORT = 4244


def _villi(*args: str) -> list[str]:
    return [sys.executable, "-m", "villi.cli.main", *args]


def token_path(state: dict[str, Any]) -> Path:
    return Path(state["dir"]) / "flows.token"


def write_token(state: dict[str, Any]) -> Path:
    """The token agents and the relay share (created once, mode 0600)."""
    path = token_path(state)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(24) + "\n")
    return path


def agent_args(state: dict[str, Any], node: dict[str, Any]) -> list[str]:
    """Flags that give an agent its TCP flow endpoint and a flow export file."""
    d = Path(state["dir"])
    return ["--flows-listen", f"{node['ip']}:{AGENT_FLOW_PORT}",
            "--flows-token-file", str(token_path(state)),
            "--flow-export", str(d / f"{node['name']}-flows.jsonl")]


def write_scrape_config(state: dict[str, Any]) -> Path:
    """``<lab dir>/prometheus.yml``: the agents' metric ports at their node IPs (run
    Prometheus in the underlay namespace, see dashboards/prometheus-lab.yml)."""
    agents = ", ".join(f'"{n["ip"]}:9962"' for n in state["nodes"])
    flows = ", ".join(f'"{n["ip"]}:9965"' for n in state["nodes"])
    path = Path(state["dir"]) / "prometheus.yml"
    path.write_text("global:\n  scrape_interval: 15s\nscrape_configs:\n"
                    f"  - job_name: villi-agent\n    static_configs:\n"
                    f"      - targets: [{agents}]\n"
                    f"  - job_name: hubble\n    static_configs:\n"
                    f"      - targets: [{flows}]\n")
    return path


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(state: dict[str, Any], timeout: float = 30.0) -> None:
    """Start the relay and the UI, wait until the UI answers, record them in ``state``."""
    d = Path(state["dir"])
    write_scrape_config(state)
    relay_sock, grpc_sock = d / "relay.sock", d / "relay-grpc.sock"
    tls = KvstoreTLS.from_dict(state.get("kvstore_tls"))  # the lab's etcd wants certificates
    cmd = _villi(*(tls.as_flags() if tls is not None else []),
                 "--netns", state["underlay"]["netns"], "relay",
                 "--kvstore", state["kvstore"], "--agent-port", str(AGENT_FLOW_PORT),
                 "--token-file", str(token_path(state)),
                 "--listen", f"unix://{relay_sock}", "--grpc-listen", f"unix://{grpc_sock}")
    pid = _procs.spawn(cmd, d / "relay.log")
    state["processes"]["relay"] = {"pid": pid, "log": str(d / "relay.log")}
    port = _free_loopback_port()
    ui_cmd = _villi("ui", "--listen", f"127.0.0.1:{port}", "--relay", f"unix://{relay_sock}")
    pid = _procs.spawn(ui_cmd, d / "ui.log")
    state["processes"]["ui"] = {"pid": pid, "log": str(d / "ui.log")}
    state["relay"] = {"http": f"unix://{relay_sock}", "grpc": f"unix://{grpc_sock}"}
    state["ui_url"] = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in ("relay", "ui"):
            info = state["processes"][name]
            if not _procs.alive(info["pid"]):
                raise LabError(f"the {name} exited during start-up: see {info['log']}")
        try:
            with urllib.request.urlopen(state["ui_url"] + "api/status", timeout=2) as r:
                if r.status == 200 and relay_sock.exists():
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise LabError(f"the UI did not answer on {state['ui_url']} within {timeout:.0f}s")
