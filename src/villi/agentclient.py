"""The one client of the agent's unix-socket API: CNI plugin, CLI, lab and tests.

A minimal, time-bounded HTTP/1.1 client, standard library only. The CNI plugin is
exec'd once per pod, so this module avoids ``http.client`` (importing it pulls in
``email.parser`` and ``ssl`` and costs ~15 ms, more than the rest of the plugin
together, see docs/cni.md) and httpx (~50 ms to build a client). Each request opens one
connection, sends ``Connection: close``, and reads the response until its
``Content-Length`` (or chunked body, or EOF) is complete. Every blocking step uses
what is left of one deadline, so a request never takes longer than the timeout it was
given. :func:`stream_lines` follows a streamed answer (``villi observe -f``) on asyncio.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time

from villi.errors import AgentUnavailable, VilliError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from typing import Any

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~:")
_RETRYABLE_CONNECT = (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN)
#: Connect retries: full jitter, each sleep uniform in [0, min(cap, base * 2**n)].
CONNECT_BACKOFF_BASE = 0.05
CONNECT_BACKOFF_CAP = 0.5


def full_jitter(attempt: int, base: float = CONNECT_BACKOFF_BASE,
                cap: float = CONNECT_BACKOFF_CAP) -> float:
    """One full-jitter sleep (as ``villi.kvstore.backoff``, without importing it: the
    plugin's import path stays light). Pods of a node whose agent restarts all retry
    at once; drawing each sleep from the whole window spreads them."""
    ceiling = min(cap, base * (1 << min(attempt, 30)))
    return ceiling * int.from_bytes(os.urandom(4), "big") / 0xFFFFFFFF


def quote(text: str) -> str:
    """Percent-encode ``text`` for a URL path segment or query value."""
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in text.encode())


class AgentError(VilliError):
    """The agent answered with an HTTP error; ``code`` is the CNI code it gave (or 0),
    ``message`` the agent's own words; ``where`` (the socket) prefixes the text."""

    def __init__(self, status: int, message: str, code: int = 0, where: str = "") -> None:
        super().__init__(f"agent {where}: {message}" if where else message)
        self.status = status
        self.message = message
        self.code = code


class Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def _reason(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such socket"
    if exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return str(exc)


def _dechunk(data: bytes) -> bytes | None:
    """Decode a chunked body; None when it is incomplete."""
    out = bytearray()
    pos = 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(data[pos:eol].split(b";")[0].strip() or b"0", 16)
        start = eol + 2
        if size == 0:
            return bytes(out)
        if len(data) < start + size + 2:
            return None
        out += data[start : start + size]
        pos = start + size + 2


class UnixHTTP:
    """Requests to one unix socket, each bounded by ``timeout`` seconds in total."""

    def __init__(self, path: str, timeout: float,
                 retry_cap: float = CONNECT_BACKOFF_CAP) -> None:
        self.path = path
        self.timeout = timeout
        self.retry_cap = retry_cap

    def _unreachable(self, reason: str) -> AgentUnavailable:
        return AgentUnavailable(
            f"villi agent is not reachable at {self.path}: {reason} (is `villi agent` running?)"
        )

    def _timed_out(self) -> AgentUnavailable:
        return AgentUnavailable(
            f"villi agent at {self.path} did not answer within {self.timeout:g} s "
            "(agentTimeout); it may be overloaded or stuck"
        )

    def _connect(self, deadline: float, retry: bool) -> socket.socket:
        attempt = 0
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                sock.connect(self.path)
                return sock
            except TimeoutError:
                sock.close()
                raise self._timed_out() from None
            except OSError as e:
                sock.close()
                left = deadline - time.monotonic()
                if not retry or e.errno not in _RETRYABLE_CONNECT or left <= 0:
                    raise self._unreachable(_reason(e)) from e
                time.sleep(min(full_jitter(attempt, cap=self.retry_cap), left))
                attempt += 1

    def request(
        self, method: str, target: str, body: object = None, *, retry_connect: bool = False
    ) -> Response:
        """Send one request; ``retry_connect`` retries a refused connect until the deadline."""
        deadline = time.monotonic() + self.timeout
        payload = b"" if body is None else json.dumps(body).encode()
        head = (
            f"{method} {target} HTTP/1.1\r\nHost: villi-agent\r\nUser-Agent: villi-cni\r\n"
            f"Accept: application/json\r\nConnection: close\r\n"
        )
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        sock = self._connect(deadline, retry_connect)
        try:
            sock.sendall(head.encode("latin-1") + b"\r\n" + payload)
            return self._read(sock, deadline)
        except TimeoutError:
            raise self._timed_out() from None
        except OSError as e:
            raise self._unreachable(f"connection lost: {_reason(e)}") from e
        finally:
            sock.close()

    def _read(self, sock: socket.socket, deadline: float) -> Response:
        data = b""
        header_end = -1
        status = 0
        headers: dict[str, str] = {}
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            chunk = sock.recv(65536)
            data += chunk
            if header_end < 0:
                header_end = data.find(b"\r\n\r\n")
                if header_end >= 0:
                    status, headers = self._parse_head(data[:header_end])
            if header_end >= 0:
                try:
                    resp = self._complete(status, headers, data[header_end + 4 :], not chunk)
                except ValueError as e:
                    problem = f"malformed HTTP response from {self.path}: {e}"
                    raise AgentError(status, problem) from None
                if resp is not None:
                    return resp
            if not chunk:
                raise self._unreachable("connection closed before a complete response")

    @staticmethod
    def _complete(status: int, headers: dict[str, str], body: bytes, eof: bool) -> Response | None:
        """The response if ``body`` completes it, else None (ValueError if malformed)."""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            decoded = _dechunk(body)
            return None if decoded is None else Response(status, headers, decoded)
        if "content-length" in headers:
            length = int(headers["content-length"])
            return Response(status, headers, body[:length]) if len(body) >= length else None
        return Response(status, headers, body) if eof else None

    def _parse_head(self, head: bytes) -> tuple[int, dict[str, str]]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise AgentError(0, f"not an HTTP response from {self.path}: {lines[0][:80]!r}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers


def _error_of(resp: Response, where: str = "") -> AgentError:
    """The agent's ``{"error", "code"}`` body as an :class:`AgentError`."""
    try:
        doc = resp.json()
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        code = doc.get("code")
        return AgentError(resp.status, doc["error"], code if isinstance(code, int) else 0,
                          where)
    text = resp.body.decode("utf-8", "replace").strip()[:200] or "(empty body)"
    return AgentError(resp.status, f"HTTP {resp.status}: {text}", 0, where)


def target_of(path: str, params: dict[str, Any] | None = None) -> str:
    """``path?k=v&…`` with the values percent-encoded."""
    if not params:
        return path
    query = "&".join(f"{quote(str(k))}={quote(str(v))}" for k, v in params.items()
                     if v is not None)
    return f"{path}?{query}" if query else path


def _json_of(resp: Response, what: str) -> Any:
    try:
        return resp.json()
    except ValueError as e:
        raise AgentError(resp.status, f"the agent's {what} is not JSON: {e}") from None


class AgentClient:
    """Calls to one agent (paths from src/villi/agent/openapi.yaml): the plugin's typed
    ones, and :meth:`request`/:meth:`get` for everything else (JSON in, JSON out;
    :class:`AgentError` naming the socket for an HTTP error, ``AgentUnavailable`` when
    the agent does not answer). Holds no connection: ``with`` is only a convenience."""

    def __init__(self, socket_path: str, timeout: float = 5.0, *,
                 retry_cap: float = CONNECT_BACKOFF_CAP) -> None:
        self.socket = str(socket_path)
        self.http = UnixHTTP(self.socket, timeout, retry_cap)

    def request(self, method: str, path: str, json: Any = None, *,
                params: dict[str, Any] | None = None, retry_connect: bool = False) -> Any:
        resp = self.http.request(method, target_of(path, params), json,
                                 retry_connect=retry_connect)
        if resp.status >= 400:
            raise _error_of(resp, self.socket)
        return _json_of(resp, f"answer to {method} {path}") if resp.body else None

    def get(self, path: str, *, params: dict[str, Any] | None = None) -> Any:
        return self.request("GET", path, params=params)

    def close(self) -> None:
        pass

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    @staticmethod
    def _ref(container_id: str, ifname: str) -> str:
        return f"/v1/endpoint/container-id:{quote(container_id)}?ifname={quote(ifname)}"

    def create_endpoint(self, request: dict[str, object]) -> dict[str, Any]:
        resp = self.http.request("POST", "/v1/endpoint", request)
        if resp.status not in (200, 201):
            raise _error_of(resp)
        ep = _json_of(resp, "endpoint")
        if not isinstance(ep, dict):
            raise AgentError(resp.status, "the agent's endpoint is not a JSON object")
        return ep

    def get_endpoint(self, container_id: str, ifname: str) -> dict[str, Any] | None:
        resp = self.http.request("GET", self._ref(container_id, ifname))
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise _error_of(resp)
        ep = _json_of(resp, "endpoint")
        if not isinstance(ep, dict):
            raise AgentError(resp.status, "the agent's endpoint is not a JSON object")
        return ep

    def delete_endpoint(self, container_id: str, ifname: str, *, retry: bool = False) -> bool:
        """Delete; False when the agent did not know the endpoint (404)."""
        resp = self.http.request("DELETE", self._ref(container_id, ifname), retry_connect=retry)
        if resp.status == 404:
            return False
        if resp.status not in (200, 202, 204):
            raise _error_of(resp)
        return True

    def list_endpoints(self) -> list[dict[str, Any]]:
        resp = self.http.request("GET", "/v1/endpoint", retry_connect=True)
        if resp.status != 200:
            raise _error_of(resp)
        eps = _json_of(resp, "endpoint list")
        if not isinstance(eps, list) or not all(isinstance(e, dict) for e in eps):
            raise AgentError(resp.status, "the agent's endpoint list is not a list of objects")
        return eps

    def healthz(self) -> dict[str, Any]:
        """The agent's Health, also when it comes with an error status (e.g. 503)."""
        resp = self.http.request("GET", "/v1/healthz")
        try:
            health = resp.json()
        except ValueError:
            health = None
        if isinstance(health, dict) and isinstance(health.get("status"), str):
            return health
        if resp.status != 200:
            raise _error_of(resp)
        raise AgentError(resp.status, "the agent's health is not a JSON object with a status")


async def stream_lines(socket_path: str, path: str, params: dict[str, Any] | None = None,
                       connect_timeout: float = 5.0) -> AsyncIterator[bytes]:
    """The lines of a streamed answer (NDJSON flows), as they arrive; AgentError for an
    HTTP error, AgentUnavailable when the agent cannot be reached."""
    import asyncio

    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(socket_path),
                                                connect_timeout)
    except (OSError, TimeoutError) as e:
        reason = _reason(e) if isinstance(e, OSError) and not isinstance(
            e, TimeoutError) else "timed out"
        raise AgentUnavailable(f"villi agent is not reachable at {socket_path}: {reason} "
                               "(is `villi agent` running?)") from e
    try:
        writer.write(f"GET {target_of(path, params)} HTTP/1.1\r\nHost: villi-agent\r\n"
                     "User-Agent: villi\r\nConnection: close\r\n\r\n".encode("latin-1"))
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status, headers = UnixHTTP(socket_path, connect_timeout)._parse_head(head[:-4])
        chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        if status >= 400:
            body = await reader.read()
            raise _error_of(Response(status, headers, (_dechunk(body) if chunked else body)
                                     or b""), socket_path)
        buf = b""
        while True:
            if chunked:
                size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    break
                data = (await reader.readexactly(size + 2))[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    break
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                yield line
        if buf:
            yield buf
    except (asyncio.IncompleteReadError, ConnectionError) as e:
        raise AgentUnavailable(f"villi agent at {socket_path}: stream ended: {e}") from e
    finally:
        writer.close()
