"""An in-memory stand-in for the villi agent's API, for testing ``villi-cni``.

It serves the endpoint and health paths of ``src/villi/agent/openapi.yaml`` over a unix
socket from a background thread (stdlib ``http.server``), keeps endpoints in a dict,
allocates IPs from a pool of configurable size, and records every request so tests can
assert what the plugin sent. :class:`HangingAgent` accepts connections and never answers.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import socketserver
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler
from typing import Any

GATEWAY = "169.254.1.1"


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False
    agent: FakeAgent


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib name)
        pass

    def _reply(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        body = json.loads(raw) if raw else None
        status, reply = self.server.agent.handle(self.command, url.path, query, body)
        self._reply(status, reply)

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle


class FakeAgent:
    """The agent's endpoint API in memory. Use as a context manager."""

    def __init__(self, socket_path: str, pool_size: int = 254, cidr: str = "10.64.1.0/24"):
        self.socket_path = socket_path
        self.pool_size = pool_size
        self.cidr = cidr
        base = cidr.split("/")[0].rsplit(".", 1)[0]
        self._pool = [f"{base}.{i}" for i in range(2, 2 + pool_size)]
        self.endpoints: dict[int, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []
        self.health: dict[str, Any] = {}  # overrides merged into the computed health
        self.fail: dict[tuple[str, str], tuple[int, object]] = {}  # (method, path) → reply
        self._next_id = 1
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> FakeAgent:
        server = _Server(self.socket_path, _Handler)
        server.agent = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)

    def __enter__(self) -> FakeAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state helpers ---------------------------------------------------------------
    def add_endpoint(self, **fields: Any) -> dict[str, Any]:
        """Insert an endpoint directly (e.g. one not created through CNI)."""
        with self._lock:
            ep = self._new_endpoint(fields)
            if ep is None:
                raise RuntimeError("pool exhausted")
            return ep

    def find(self, container_id: str, ifname: str = "eth0") -> dict[str, Any] | None:
        for ep in self.endpoints.values():
            if ep["containerID"] == container_id and ep["ifname"] == ifname:
                return ep
        return None

    def allocated(self) -> int:
        return len(self.endpoints)

    def _new_endpoint(self, req: dict[str, Any]) -> dict[str, Any] | None:
        used = {ep["ipv4"] for ep in self.endpoints.values()}
        free = [ip for ip in self._pool if ip not in used]
        if not free:
            return None
        ep_id = self._next_id
        self._next_id += 1
        cid = req.get("containerID", "")
        digest = hashlib.sha256(f"{cid}/{req.get('ifname')}/{ep_id}".encode()).hexdigest()
        ep = {
            "id": ep_id,
            "containerID": cid,
            "ifname": req.get("ifname", "eth0"),
            "netns": req.get("netns", ""),
            "namespace": req.get("namespace") or "default",
            "podName": req.get("podName") or cid[:12],
            "labels": dict(req.get("labels") or {}),
            "namedPorts": dict(req.get("namedPorts") or {}),
            "identity": 256 + ep_id,
            "ipv4": free[0],
            "ipv4Pool": self.cidr,
            "gateway": GATEWAY,
            "mac": "0a:" + ":".join(digest[i : i + 2] for i in range(0, 10, 2)),
            "hostIfname": f"lxc{digest[:11]}",
            "hostMac": "0e:" + ":".join(digest[i : i + 2] for i in range(10, 20, 2)),
            "policy": {"ingress": "disabled", "egress": "disabled"},
            "state": "ready",
        }
        self.endpoints[ep_id] = ep
        return ep

    def computed_health(self) -> dict[str, Any]:
        allocated = len(self.endpoints)
        health: dict[str, Any] = {
            "status": "ok",
            "node": "fake-node",
            "kvstore": {"status": "ok", "message": "embedded"},
            "datapath": {"status": "ok", "message": ""},
            "ipam": {
                "status": f"IPv4: {allocated}/{self.pool_size} allocated from {self.cidr}",
                "allocated": allocated,
                "capacity": self.pool_size,
                "free": self.pool_size - allocated,
                "cidrs": [self.cidr],
            },
            "endpoints": allocated,
        }
        health.update(self.health)
        return health

    # -- the API ---------------------------------------------------------------------
    def _lookup(self, ref: str, query: dict[str, str]) -> dict[str, Any] | None:
        if ref.startswith("container-id:"):
            return self.find(urllib.parse.unquote(ref[len("container-id:"):]),
                             query.get("ifname", "eth0"))
        if ref.isdigit():
            return self.endpoints.get(int(ref))
        return None

    def handle(self, method: str, path: str, query: dict[str, str],
               body: Any) -> tuple[int, object]:
        with self._lock:
            self.requests.append((method, path, query, body))
            if (method, path) in self.fail:
                return self.fail[(method, path)]
            if path == "/v1/healthz" and method == "GET":
                return 200, self.computed_health()
            if path == "/v1/endpoint" and method == "GET":
                return 200, list(self.endpoints.values())
            if path == "/v1/endpoint" and method == "POST":
                return self._create(body)
            if path.startswith("/v1/endpoint/"):
                ep = self._lookup(path[len("/v1/endpoint/"):], query)
                if ep is None:
                    return 404, {"error": f"no endpoint {path.rsplit('/', 1)[1]}", "code": 0}
                if method == "GET":
                    return 200, ep
                if method == "DELETE":
                    del self.endpoints[ep["id"]]
                    return 200, {"deleted": True}
            return 405, {"error": f"{method} {path} is not supported", "code": 0}

    def _create(self, body: Any) -> tuple[int, object]:
        if not isinstance(body, dict):
            return 400, {"error": "request body must be a JSON object", "code": 6}
        missing = [k for k in ("containerID", "netns", "ifname") if not body.get(k)]
        if missing:
            return 400, {"error": f"missing {', '.join(missing)}", "code": 4}
        existing = self.find(body["containerID"], body["ifname"])
        if existing is not None:
            return 200, existing
        if not os.path.exists(body["netns"]):
            return 400, {"error": f"network namespace {body['netns']} does not exist", "code": 0}
        ep = self._new_endpoint(body)
        if ep is None:
            return 503, {
                "error": f"IPv4 pool {self.cidr} exhausted: "
                f"{self.pool_size}/{self.pool_size} allocated",
                "code": 11,
            }
        return 201, ep


class HangingAgent:
    """A socket that accepts connections (via the backlog) and never answers."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def __enter__(self) -> HangingAgent:
        self.sock.bind(self.socket_path)
        self.sock.listen(16)
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
        os.unlink(self.socket_path)
