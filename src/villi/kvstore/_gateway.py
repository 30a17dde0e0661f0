"""HTTP transport to etcd's JSON gRPC-gateway: endpoints, failover, retries, errors.

Every request goes to the current endpoint; a failure that proves the request never
reached etcd (connection refused, connect timeout, no leader yet) moves to the next
endpoint and retries after a full-jitter backoff. After ``max_attempts`` tries the call
raises :class:`StoreUnavailable` naming the endpoints, the attempt count and the last
reason, e.g. ``etcd at http://127.0.0.1:2379 is unreachable after 5 attempts:
connection refused``.

A failure after the request may have been applied (read timeout, connection reset
mid-answer) is retried only for requests whose repetition is harmless (reads, puts,
deletes, lease calls). A transaction (create-if-absent, compare-and-swap) is not
repeated: its outcome is unknown, so it raises :class:`StoreUnavailable` saying so
rather than guessing (the same rule as etcd's Go client for non-repeatable calls).
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import time
from dataclasses import dataclass
from typing import Any

import httpx

from villi.errors import StoreError, StoreUnavailable
from villi.kvstore.backoff import Backoff, BackoffPolicy, SleepFn, UniformSource

log = logging.getLogger("villi.kvstore.etcd")

# gRPC status codes that etcd's gateway puts in error bodies.
GRPC_DEADLINE_EXCEEDED = 4
GRPC_NOT_FOUND = 5
GRPC_OUT_OF_RANGE = 11  # "mvcc: required revision has been compacted"
GRPC_UNAVAILABLE = 14
_RETRYABLE_CODES = {GRPC_DEADLINE_EXCEEDED, GRPC_UNAVAILABLE}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One etcd client URL: ``http(s)://host:port`` or ``unix:///path/to/socket``."""

    url: str
    base: str
    uds: str | None = None

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        text = text.strip()
        if text.startswith("unix://"):
            path = text[len("unix://"):]
            if not path:
                raise ValueError(f"etcd endpoint {text!r}: unix:// needs a socket path")
            return cls(text, "http://localhost", path)
        text = text.rstrip("/")
        if text.startswith("etcd://"):
            text = "http://" + text[len("etcd://"):]
        elif "://" not in text:
            text = "http://" + text
        if not text.startswith(("http://", "https://")):
            raise ValueError(f"etcd endpoint {text!r}: expected http://, https:// or unix://")
        return cls(text, text)


class GatewayError(StoreError):
    """etcd answered with an error (``code`` is the gRPC status code)."""

    def __init__(self, message: str, code: int | None) -> None:
        super().__init__(message)
        self.code = code


class _Retry(Exception):
    """Internal: this attempt failed in a way another attempt may fix."""

    def __init__(self, reason: str, sent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sent = sent  # True when the request may have reached etcd


def describe(exc: BaseException) -> str:
    """A short human reason for a transport failure: the OS error when there is one
    ("connection refused", "no such file or directory"), else the exception's text."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):  # e.g. etcd wants a client certificate
            return f"TLS handshake failed: {seen.reason or seen}"
        if isinstance(seen, OSError) and seen.errno:
            return os.strerror(seen.errno).lower()
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, httpx.ConnectTimeout):
        return "connection timed out"
    if isinstance(exc, httpx.TimeoutException):
        return "no answer in time"
    return str(exc) or type(exc).__name__


def error_of(payload: Any) -> tuple[str, int | None] | None:
    """(message, gRPC code) of a gateway error body or stream line, else None."""
    if not isinstance(payload, dict) or "error" not in payload:
        return None
    err = payload["error"]
    if isinstance(err, dict):  # streaming endpoints nest the error
        return str(err.get("message", err)), err.get("grpc_code", err.get("code"))
    return str(payload.get("message") or err), payload.get("code")


class Gateway:
    """Clients for each endpoint and the retrying ``call``."""

    def __init__(
        self,
        endpoints: list[Endpoint],
        *,
        request_timeout: float,
        connect_timeout: float,
        backoff: BackoffPolicy,
        rng: UniformSource | None,
        sleep: SleepFn | None,
        ssl_context: ssl.SSLContext | None = None,
        client_cert: bool = False,
    ) -> None:
        if not endpoints:
            raise ValueError("etcd store needs at least one endpoint")
        self.endpoints = endpoints
        self.timeout = httpx.Timeout(request_timeout, connect=connect_timeout)
        self.backoff = backoff
        self.rng, self.sleep = rng, sleep
        self.current = 0
        # https endpoints: verify etcd against the CA and present our client cert.
        self.ssl_context = ssl_context
        self.client_cert = client_cert
        self._clients: dict[int, httpx.AsyncClient] = {}
        #: monotonic time of the last answer from etcd (None: never answered yet).
        self.last_answer: float | None = None

    @property
    def where(self) -> str:
        return "etcd at " + ", ".join(e.url for e in self.endpoints)

    def _tls_hint(self) -> str:
        """A refused client certificate often shows as a reset or broken pipe: say so
        when we talk TLS without presenting one."""
        if self.client_cert or not any(e.base.startswith("https://") for e in self.endpoints):
            return ""
        return (" (no client certificate was presented; if etcd runs with "
                "--client-cert-auth, give --kvstore-cert/--kvstore-key)")

    def client(self, index: int) -> httpx.AsyncClient:
        client = self._clients.get(index)
        if client is None:
            ep = self.endpoints[index]
            transport = httpx.AsyncHTTPTransport(uds=ep.uds) if ep.uds else None
            client = httpx.AsyncClient(
                transport=transport,
                timeout=self.timeout,
                verify=self.ssl_context if self.ssl_context is not None else True,
                # Each watch holds a connection for its lifetime: do not cap them.
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=20),
            )
            self._clients[index] = client
        return client

    def failover(self, index: int) -> None:
        """The endpoint ``index`` failed: the next call starts at the one after it."""
        if self.current == index:
            self.current = (index + 1) % len(self.endpoints)

    def new_backoff(self, policy: BackoffPolicy | None = None) -> Backoff:
        return Backoff(policy or self.backoff, rng=self.rng, sleep=self.sleep)

    async def call(
        self, path: str, body: dict[str, Any], *, repeatable: bool = True,
        tolerate: frozenset[int] = frozenset(),
    ) -> dict[str, Any]:
        """POST ``body`` to ``path``; the decoded answer. Errors with a code in
        ``tolerate`` are returned (as the error body) instead of raised."""
        backoff = self.new_backoff()
        while True:
            index = self.current
            try:
                return await self._attempt(index, path, body, tolerate)
            except _Retry as failure:
                if failure.sent and not repeatable:
                    raise StoreUnavailable(
                        f"{self.where}: outcome of {path} unknown ({failure.reason}); "
                        "not retried because it is not safe to repeat") from None
                self.failover(index)
                if not await backoff.failed():
                    raise StoreUnavailable(
                        f"{self.where} is unreachable after {backoff.failures} attempts: "
                        f"{failure.reason}{self._tls_hint()}") from failure.__cause__
                log.debug("%s: %s failed (%s), retrying", self.where, path, failure.reason)

    async def attempt_once(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One try of ``call`` (no retry): StoreUnavailable when etcd does not answer."""
        index = self.current
        try:
            return await self._attempt(index, path, body, frozenset())
        except _Retry as failure:
            self.failover(index)
            raise StoreUnavailable(f"{self.where}: {failure.reason}") from None

    async def _attempt(
        self, index: int, path: str, body: dict[str, Any], tolerate: frozenset[int]
    ) -> dict[str, Any]:
        ep = self.endpoints[index]
        try:
            resp = await self.client(index).post(ep.base + path, json=body)
            if resp.status_code < 500:
                self.last_answer = time.monotonic()
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise _Retry(describe(exc), sent=False) from exc
        except httpx.TransportError as exc:
            raise _Retry(describe(exc), sent=True) from exc
        except ssl.SSLError as exc:
            # TLS 1.3: etcd rejects a missing/untrusted client certificate after the
            # handshake looked done to us, so the alert arrives on the first read.
            # etcd processed nothing; retrying cannot help.
            raise StoreUnavailable(
                f"{self.where} refused the TLS connection ({exc.reason or exc}): this "
                "component needs a client certificate signed by etcd's CA "
                "(--kvstore-cert/--kvstore-key, docs/security.md)") from exc
        # Streaming endpoints answer JSON lines; the first one is ours.
        text = resp.text.strip().split("\n", 1)[0]
        try:
            payload = json.loads(text) if text else {}
        except ValueError:
            payload = None
        err = error_of(payload)
        if err is None and (resp.status_code != 200 or not isinstance(payload, dict)):
            err = (f"HTTP {resp.status_code}: {text[:200]}", None)
            if resp.status_code >= 500:
                raise _Retry(err[0], sent=True)
        if err is not None:
            message, code = err
            if code in tolerate:
                return payload if isinstance(payload, dict) else {}
            if code in _RETRYABLE_CODES:
                # "no leader" is refused before anything is proposed: safe to repeat.
                raise _Retry(message, sent="no leader" not in message)
            raise GatewayError(f"{self.where}: {path}: {message}", code)
        assert isinstance(payload, dict)
        # Streaming endpoints (lease keep-alive) wrap their answer in "result".
        result = payload.get("result", payload)
        return result if isinstance(result, dict) else payload

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.aclose()
