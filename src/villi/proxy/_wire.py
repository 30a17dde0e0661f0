"""HTTP/1.1 pieces of the relay: canned local responses, limits and counters, and the
httptools callback objects that turn parser callbacks into events and state."""

from __future__ import annotations

from dataclasses import dataclass

import httptools


def _local(code: int, reason: str, body: bytes, close: bool = False) -> bytes:
    head = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\n")
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body


FORBIDDEN = _local(403, "Forbidden", b"Access denied\r\n")
FORBIDDEN_CLOSE = _local(403, "Forbidden", b"Access denied\r\n", close=True)
BAD_REQUEST = _local(400, "Bad Request", b"Bad Request\r\n", close=True)
UNAVAILABLE = _local(503, "Service Unavailable", b"upstream connect error\r\n")
UNAVAILABLE_CLOSE = _local(503, "Service Unavailable", b"upstream connect error\r\n",
                           close=True)
GATEWAY_TIMEOUT = _local(504, "Gateway Timeout", b"upstream request timeout\r\n", close=True)


@dataclass(slots=True)
class Limits:
    """Timeouts (seconds) and sizes that keep one client from holding the proxy."""

    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    body_timeout: float = 30.0
    connect_timeout: float = 5.0
    response_timeout: float = 60.0
    max_head_bytes: int = 64 * 1024


@dataclass(slots=True)
class Stats:
    """Proxy counters (exported as metrics by the agent)."""

    connections: int = 0
    active: int = 0
    requests: int = 0
    forwarded: int = 0
    denied: int = 0
    upstream_errors: int = 0
    bad_requests: int = 0
    timeouts: int = 0
    upgrades: int = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]


class RequestEvents:
    """httptools callbacks: record events, read parser state when the head completes."""

    def __init__(self) -> None:
        self.parser: httptools.HttpRequestParser | None = None
        self.events: list[tuple] = []
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.events.append(("begin",))

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        p = self.parser
        assert p is not None
        self.events.append(("head", p.get_method().decode("latin-1"), self.url, self.headers,
                            p.get_http_version(), p.should_keep_alive(), p.should_upgrade()))

    def on_body(self, body: bytes) -> None:
        self.events.append(("body", body))

    def on_message_complete(self) -> None:
        self.events.append(("end",))


class ResponseEvents:
    def __init__(self) -> None:
        self.parser: httptools.HttpResponseParser | None = None
        self.status = 0
        self.final = False
        self.head_done = False
        self.keep_alive = True
        self.sized = False

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self.status = self.parser.get_status_code()
        self.head_done = True
        self.keep_alive = self.parser.should_keep_alive()

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname in (b"content-length", b"transfer-encoding"):
            self.sized = True

    def on_message_complete(self) -> None:
        if not 100 <= self.status < 200:
            self.final = True
        else:
            self.head_done = False  # an interim 1xx: the real response follows
