"""villi-cni's parts in-process: CNI_ARGS, results per version, the HTTP client, imports."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from villi.agentclient import AgentError, UnixHTTP, _dechunk, quote
from villi.cni import SUPPORTED_VERSIONS, CNIError
from villi.cni._env import parse_cni_args, parse_labels_value, parse_ports_value
from villi.cni._result import for_version, merge
from villi.errors import AgentUnavailable, VilliError

# -- CNI_ARGS -------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["1", "true", "True", "TRUE"])
def test_ignore_unknown_accepts_libcni_spellings(flag: str) -> None:
    args = parse_cni_args(f"IgnoreUnknown={flag};FOO=bar;K8S_POD_NAME=web-0;")
    assert args.pod_name == "web-0"


@pytest.mark.parametrize("flag", ["0", "false", "yes"])
def test_unknown_keys_fail_without_ignore_unknown(flag: str) -> None:
    with pytest.raises(CNIError) as exc:
        parse_cni_args(f"IgnoreUnknown={flag};FOO=bar")
    assert exc.value.code == 4 and "'FOO'" in exc.value.msg


def test_cni_args_full() -> None:
    args = parse_cni_args(
        "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=1234;"
        "VILLI_LABELS=app:web, example.com/tier:front ,env:;VILLI_PORTS=http:80,dns:53/UDP"
    )
    assert args.namespace == "shop" and args.pod_name == "web-0"
    assert args.labels == {"app": "web", "example.com/tier": "front", "env": ""}
    assert args.ports == {"http": {"port": 80, "protocol": "TCP"},
                          "dns": {"port": 53, "protocol": "UDP"}}
    empty = parse_cni_args("")
    assert (empty.namespace, empty.labels, empty.ports) == ("", {}, {})


@pytest.mark.parametrize("text", [
    "app", "app=web", "-app:web", "app:web!", "Example.com/app:web", "/app:web",
    "a" * 64 + ":x", "app:" + "v" * 64,
])
def test_bad_labels(text: str) -> None:
    with pytest.raises(CNIError) as exc:
        parse_labels_value(text)
    assert exc.value.code == 4 and "VILLI_LABELS" in exc.value.msg


@pytest.mark.parametrize("text", [
    "http", "http:", "http:0", "http:65536", "http:80/icmp", "HTTP:80", "1234:80",
    "a-very-long-port-name:80", "we--b:80", "-web:80",
])
def test_bad_ports(text: str) -> None:
    with pytest.raises(CNIError) as exc:
        parse_ports_value(text)
    assert exc.value.code == 4 and "VILLI_PORTS" in exc.value.msg


def test_cni_error_is_a_villi_error() -> None:
    err = CNIError(7, "invalid network config", "name")
    assert isinstance(err, VilliError)
    assert err.to_json("1.1.0") == {"cniVersion": "1.1.0", "code": 7,
                                    "msg": "invalid network config", "details": "name"}
    assert CNIError(11, "later").to_json("1.0.0") == {"cniVersion": "1.0.0", "code": 11,
                                                      "msg": "later"}


# -- results --------------------------------------------------------------------------

RESULT: dict[str, Any] = {
    "cniVersion": "1.1.0",
    "interfaces": [{"name": "lxc1", "mac": "0e:00:00:00:00:01"},
                   {"name": "eth0", "mac": "0a:00:00:00:00:01", "sandbox": "/n", "mtu": 1450}],
    "ips": [{"address": "10.64.1.2/32", "gateway": "169.254.1.1", "interface": 1}],
    "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1", "mtu": 1450}],
    "dns": {},
}


def test_result_shapes_per_version() -> None:
    v11 = for_version(RESULT, "1.1.0")
    assert v11 == RESULT
    v10 = for_version(RESULT, "1.0.0")
    assert "mtu" not in v10["interfaces"][1] and "mtu" not in v10["routes"][0]
    assert "version" not in v10["ips"][0]
    v04 = for_version(RESULT, "0.4.0")
    assert v04["cniVersion"] == "0.4.0" and v04["ips"][0]["version"] == "4"
    assert for_version(v04, "1.0.0")["ips"][0] == {k: v for k, v in RESULT["ips"][0].items()}
    assert RESULT["ips"][0].get("version") is None  # inputs are not modified


def test_merge_shifts_interface_indexes() -> None:
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "lo", "sandbox": "/n"}],
            "ips": [{"address": "127.0.0.1/8", "interface": 0}], "custom": {"kept": True}}
    out = merge(prev, RESULT)
    assert [i["name"] for i in out["interfaces"]] == ["lo", "lxc1", "eth0"]
    assert out["ips"][1]["interface"] == 2
    assert out["routes"] == RESULT["routes"]
    assert out["custom"] == {"kept": True}  # unknown fields pass through


def test_supported_versions() -> None:
    assert SUPPORTED_VERSIONS == ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")


# -- the HTTP client ------------------------------------------------------------------


def test_quote() -> None:
    assert quote("c0ffee_01.a-b") == "c0ffee_01.a-b"
    assert quote("e th/0?#%") == "e%20th%2F0%3F%23%25"


def test_dechunk() -> None:
    assert _dechunk(b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n") == b"hello world"
    assert _dechunk(b"5\r\nhel") is None
    assert _dechunk(b"5\r\nhello\r\n") is None


@pytest.fixture
def sock_path() -> Iterator[str]:
    root = tempfile.mkdtemp(prefix="vcni-", dir="/tmp")
    try:
        yield os.path.join(root, "agent.sock")
    finally:
        shutil.rmtree(root, ignore_errors=True)


class ScriptedServer:
    """Accepts one connection, reads the request head, then plays (bytes, delay) steps."""

    def __init__(self, path: str, steps: list[tuple[bytes, float]]) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(1)
        self.steps = steps
        self.request = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            while b"\r\n\r\n" not in self.request:
                self.request += conn.recv(4096)
            try:
                for data, delay in self.steps:
                    time.sleep(delay)
                    conn.sendall(data)
            except OSError:
                pass  # the client gave up

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(10)
        self.sock.close()


def test_response_in_pieces_with_content_length(sock_path: str) -> None:
    body = b'{"ipv4": "10.64.1.2"}'
    head = b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\nContent-Type: application/json"
    steps = [(head % len(body), 0), (b"\r\n\r\n" + body[:5], 0.05), (body[5:], 0.05)]
    with ScriptedServer(sock_path, steps) as server:
        resp = UnixHTTP(sock_path, 2).request("POST", "/v1/endpoint", {"a": 1})
    assert resp.status == 201 and resp.json() == {"ipv4": "10.64.1.2"}
    assert server.request.startswith(b"POST /v1/endpoint HTTP/1.1\r\n")
    assert b"Connection: close\r\n" in server.request


def test_chunked_response(sock_path: str) -> None:
    steps = [(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n[]\r\n", 0),
             (b"0\r\n\r\n", 0.05)]
    with ScriptedServer(sock_path, steps):
        assert UnixHTTP(sock_path, 2).request("GET", "/v1/endpoint").json() == []


def test_response_until_eof(sock_path: str) -> None:
    with ScriptedServer(sock_path, [(b"HTTP/1.0 200 OK\r\n\r\n{}", 0)]):
        assert UnixHTTP(sock_path, 2).request("GET", "/v1/healthz").json() == {}


def test_not_http(sock_path: str) -> None:
    with ScriptedServer(sock_path, [(b"SSH-2.0-OpenSSH_9.2\r\n\r\n", 0)]):
        with pytest.raises(AgentError, match="not an HTTP response"):
            UnixHTTP(sock_path, 2).request("GET", "/v1/healthz")


def test_malformed_length(sock_path: str) -> None:
    with ScriptedServer(sock_path, [(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n{}", 0)]):
        with pytest.raises(AgentError, match="malformed HTTP response"):
            UnixHTTP(sock_path, 2).request("GET", "/v1/healthz")


def test_truncated_body(sock_path: str) -> None:
    with ScriptedServer(sock_path, [(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", 0)]):
        with pytest.raises(AgentUnavailable, match="connection closed before a complete"):
            UnixHTTP(sock_path, 2).request("GET", "/v1/healthz")


def test_slow_drip_is_bounded_by_the_total_timeout(sock_path: str) -> None:
    # every byte arrives well within a per-recv timeout; only a total deadline stops it
    steps = [(b"HTTP/1.1 200 OK\r\n", 0)] + [(b"X-Pad: 1\r\n", 0.1)] * 30
    with ScriptedServer(sock_path, steps):
        start = time.monotonic()
        with pytest.raises(AgentUnavailable, match="did not answer within 0.5 s"):
            UnixHTTP(sock_path, 0.5).request("GET", "/v1/healthz")
        assert time.monotonic() - start < 1


def test_connect_retry_is_bounded(sock_path: str) -> None:
    start = time.monotonic()
    with pytest.raises(AgentUnavailable, match="no such socket"):
        UnixHTTP(sock_path, 0.3).request("GET", "/v1/healthz", retry_connect=True)
    assert 0.3 <= time.monotonic() - start < 1


# -- start-up cost --------------------------------------------------------------------

HEAVY = ("pydantic", "httpx", "aiohttp", "yaml", "numpy", "pyroute2", "http.client", "email",
         "ssl", "asyncio", "dataclasses", "inspect", "typing", "urllib", "villi.datapath",
         "villi.agent", "villi.netns", "villi.endpoint")


def test_plugin_imports_stay_light() -> None:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import villi.cni.main"],
                          capture_output=True, text=True, check=True)
    modules = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
               if line.startswith("import time:") and "|" in line}
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY or m in HEAVY
                   or any(m.startswith(h + ".") for h in HEAVY))
    assert heavy == []
    assert {m for m in modules if m.startswith("villi")} == {
        "villi", "villi.errors", "villi.cni", "villi.cni._config", "villi.cni._env",
        "villi.cni._errors", "villi.agentclient", "villi.cni._result", "villi.cni.main"}


def test_version_starts_fast() -> None:
    plugin = Path(sys.executable).parent / "villi-cni"
    cmd = [str(plugin)] if plugin.exists() else [sys.executable, "-m", "villi.cni.main"]
    best = min(_timed(cmd) for _ in range(3))
    assert best < 0.5  # measured ~30 ms (docs/cni.md); the bound only catches regressions


def _timed(cmd: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(cmd, input=b"", env={"CNI_COMMAND": "VERSION"}, capture_output=True,
                   check=True)
    return time.monotonic() - start


def test_agent_retry_cap_is_a_netconf_field() -> None:
    """The connect-retry cap of a restarting agent's pods is configurable (agentRetryCap),
    validated like agentTimeout, and reaches the client's full-jitter sleeps."""
    from villi.agentclient import CONNECT_BACKOFF_CAP
    from villi.cni._config import NetConf

    base = {"cniVersion": "1.0.0", "name": "villi", "type": "villi-cni"}
    assert NetConf(dict(base), {}).agent_retry_cap == CONNECT_BACKOFF_CAP
    assert NetConf({**base, "agentRetryCap": 2}, {}).agent_retry_cap == 2
    for bad in (0, -1, 601, "1s"):
        with pytest.raises(CNIError, match="agentRetryCap"):
            NetConf({**base, "agentRetryCap": bad}, {})
    slept: list[float] = []
    http = UnixHTTP("/nonexistent/villi.sock", 0.5, retry_cap=0.01)
    real_sleep = time.sleep
    try:
        time.sleep = lambda s: slept.append(s)  # type: ignore[assignment]
        with pytest.raises(AgentUnavailable):
            http.request("GET", "/v1/healthz", retry_connect=True)
    finally:
        time.sleep = real_sleep  # type: ignore[assignment]
    assert slept and max(slept) <= 0.01
