"""The etcd backend, over etcd's JSON gRPC-gateway with ``httpx``.

Client choice: etcd serves its v3 API as JSON on the client port (``/v3/kv/range``,
``/v3/kv/put``, ``/v3/kv/txn``, ``/v3/lease/grant``, streaming ``/v3/watch`` ...; keys
and values base64, 64-bit numbers as strings). Talking to it with ``httpx.AsyncClient``
gives a truly async client with no generated protobuf code. The alternatives were
worse: the ``etcd3`` package has been unmaintained since 2020, is synchronous and breaks
with protobuf >= 4; ``aetcd``/``etcd3-py`` are thinly maintained and pin
grpcio/protobuf, which would fight every other package that uses them. The cost of the
gateway is JSON encoding (small next to the network round-trip) and one HTTP connection
per open watch instead of multiplexed gRPC streams; villi opens a handful of watches per
agent, so that is fine. The same endpoints work for etcd 3.4 and later.

Endpoints: ``http://host:port``, ``https://host:port`` or ``unix:///path/to/socket``
(etcd listening with ``--listen-client-urls unix://...``); several endpoints give
failover. Retries, failover and error wording live in ``_gateway.py``.

Watches survive etcd restarts: a broken stream is re-opened (next endpoint, full-jitter
backoff) with ``start_revision`` = last delivered revision + 1, and events at revisions
already delivered are dropped, so the consumer sees every event exactly once. A watch
keeps retrying (``watch_backoff`` is unbounded by default: an agent must resume when
etcd comes back; cancel the task to stop it). Compaction raises :class:`Compacted`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import ssl
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from typing import Any

import httpx

from villi.errors import StoreError, StoreUnavailable
from villi.kvstore._gateway import (
    GRPC_NOT_FOUND,
    GRPC_OUT_OF_RANGE,
    Endpoint,
    Gateway,
    GatewayError,
    describe,
    error_of,
)
from villi.kvstore._keys import prefix_range
from villi.kvstore.backoff import Backoff, BackoffPolicy, SleepFn, UniformSource
from villi.kvstore.store import (
    Compacted,
    EventType,
    KeyValue,
    LeaseID,
    ListResult,
    Store,
    TxnOp,
    WatchEvent,
    check_unique,
)
from villi.kvstore.tls import KvstoreTLS

log = logging.getLogger(__name__)

#: Keys per range request while listing: the first page, doubled per page up to the cap.
#: Bounded answers, but few of them: etcd 3.4 counts every key left in the range for each
#: page it serves, so fixed pages of 500 made a 125,000-key listing cost 11.2 s; these
#: pages: 3.5 s (docs/kvstore.md).
_LIST_PAGE_FIRST = 1000
_LIST_PAGE_MAX = 32000
_ALL_KEYS_END = b"\0"  # etcd: range_end "\0" means "every key >= key"
# A watch stream that lived this long counts as a success for the reconnect backoff
# (resetting on "created" alone would spin if etcd accepted and dropped at once).
_HEALTHY_STREAM = 10.0


class _StreamBroken(Exception):
    """Internal: a watch stream ended; ``reason`` says why, for logs and errors."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _range(prefix: str) -> dict[str, str]:
    start, end = prefix_range(prefix)
    return {"key": _b64(start or b"\0"), "range_end": _b64(end or _ALL_KEYS_END)}


def _kv(raw: dict[str, Any]) -> KeyValue:
    lease = int(raw.get("lease", 0))
    return KeyValue(
        key=_unb64(raw["key"]).decode(),
        value=_unb64(raw.get("value")),
        create_revision=int(raw.get("create_revision", 0)),
        mod_revision=int(raw.get("mod_revision", 0)),
        lease=LeaseID(lease) if lease else None,
    )


def _put(key: str, value: bytes, lease: LeaseID | None) -> dict[str, Any]:
    """A PutRequest, for /v3/kv/put and inside transactions."""
    request: dict[str, Any] = {"key": _b64(key.encode()), "value": _b64(bytes(value))}
    if lease:
        request["lease"] = str(lease)
    return request


def _revision(answer: dict[str, Any]) -> int:
    return int(answer.get("header", {}).get("revision", 0))


class EtcdStore(Store):
    """A :class:`Store` on one etcd cluster.

    ``request_timeout``: bound of one HTTP request; ``connect_timeout``: of connecting.
    ``backoff``: retry policy of single requests (bounded: a request that cannot reach
    etcd raises :class:`StoreUnavailable`); worst case it takes ``max_attempts`` x
    ``connect_timeout`` plus ``backoff.worst_case_sleep()``.
    ``watch_backoff``: reconnect policy of watches (unbounded by default).
    ``rng``/``sleep``: injectable randomness and sleep for the backoff (tests).
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        request_timeout: float = 5.0,
        connect_timeout: float = 2.0,
        backoff: BackoffPolicy | None = None,
        watch_backoff: BackoffPolicy | None = None,
        watch_read_timeout: float | None = 900.0,
        rng: UniformSource | None = None,
        sleep: SleepFn | None = None,
        tls: KvstoreTLS | None = None,
        rewatch_jitter: float = 1.0,
    ) -> None:
        if rewatch_jitter < 0:
            raise ValueError(f"rewatch_jitter must be >= 0 s, got {rewatch_jitter}")
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e.strip()]
        parsed = [Endpoint.parse(e) for e in endpoints]
        # TLS settings: explicit, else the environment the --kvstore-* flags set.
        tls = tls if tls is not None else KvstoreTLS.from_env()
        ssl_context = None
        if tls is not None and any(e.base.startswith("https://") for e in parsed):
            ssl_context = tls.context()
        self._gw = Gateway(
            parsed,
            ssl_context=ssl_context,
            client_cert=bool(tls is not None and tls.cert),
            request_timeout=request_timeout,
            connect_timeout=connect_timeout,
            backoff=backoff or BackoffPolicy(),
            rng=rng if rng is not None else random.Random(),
            sleep=sleep,
        )
        self._watch_backoff = watch_backoff or BackoffPolicy(base=0.05, cap=5.0, max_attempts=None)
        # Watches get progress notifications from etcd (every 10 min by default), so a
        # stream silent for longer than this is a dead connection (e.g. a partition).
        self._watch_timeout = httpx.Timeout(
            request_timeout, connect=connect_timeout, read=watch_read_timeout)
        self._closed = False
        #: Cap (s) of the random pause between "etcd answers again" and re-creating a
        #: broken watch (see :meth:`watch`).
        self.rewatch_jitter = rewatch_jitter

    @property
    def last_answer(self) -> float | None:
        """Monotonic time etcd last answered this client (a request or a watch line):
        proof of reachability that costs no request (villi.agent.sync.StoreHealth)."""
        return self._gw.last_answer

    def __repr__(self) -> str:
        return f"EtcdStore({[e.url for e in self._gw.endpoints]!r})"

    @property
    def endpoints(self) -> list[str]:
        return [e.url for e in self._gw.endpoints]

    async def _call(self, path: str, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
        if self._closed:
            raise StoreError(f"{self._gw.where}: store is closed")
        return await self._gw.call(path, body, **kw)

    async def revision(self) -> int:
        # A range over one impossible key: the cheapest request that returns a header.
        return _revision(await self._call("/v3/kv/range", {"key": _b64(b"\0"), "limit": 1}))

    async def get(self, key: str) -> KeyValue | None:
        answer = await self._call("/v3/kv/range", {"key": _b64(key.encode())})
        kvs = answer.get("kvs", [])
        return _kv(kvs[0]) if kvs else None

    async def put(self, key: str, value: bytes, lease: LeaseID | None = None) -> int:
        return _revision(await self._call("/v3/kv/put", _put(key, value, lease)))

    async def delete(self, key: str) -> bool:
        answer = await self._call("/v3/kv/deleterange", {"key": _b64(key.encode())})
        return int(answer.get("deleted", 0)) > 0

    async def delete_prefix(self, prefix: str) -> int:
        answer = await self._call("/v3/kv/deleterange", _range(prefix))
        return int(answer.get("deleted", 0))

    async def list(self, prefix: str) -> ListResult:
        """Growing pages of keys, all read at the revision of the first page, so the
        result is one consistent snapshot however many keys there are."""
        while True:
            body: dict[str, Any] = {**_range(prefix), "limit": _LIST_PAGE_FIRST}
            items: list[KeyValue] = []
            revision = 0
            while True:
                answer = await self._call(
                    "/v3/kv/range", body, tolerate=frozenset({GRPC_OUT_OF_RANGE}))
                if error_of(answer):  # the pinned revision got compacted: start over
                    break
                revision = revision or _revision(answer)
                page = [_kv(raw) for raw in answer.get("kvs", [])]
                items.extend(page)
                if not answer.get("more") or not page:
                    return ListResult(items, revision)
                body["key"] = _b64(page[-1].key.encode() + b"\0")
                body["revision"] = str(revision)
                body["limit"] = min(2 * body["limit"], _LIST_PAGE_MAX)

    async def _txn_if(
        self, key: str, target: str, revision: int, then: dict[str, Any]
    ) -> bool:
        """Run ``then`` only if ``key``'s ``target`` revision (CREATE or MOD) equals
        ``revision``; True when it ran."""
        field = "create_revision" if target == "CREATE" else "mod_revision"
        compare = {"key": _b64(key.encode()), "target": target, "result": "EQUAL",
                   field: str(revision)}
        answer = await self._call(
            "/v3/kv/txn", {"compare": [compare], "success": [then]}, repeatable=False)
        return bool(answer.get("succeeded", False))

    async def create(self, key: str, value: bytes, lease: LeaseID | None = None) -> bool:
        return await self._txn_if(key, "CREATE", 0, {"request_put": _put(key, value, lease)})

    async def compare_and_swap(
        self, key: str, expected_mod_revision: int, value: bytes, lease: LeaseID | None = None
    ) -> bool:
        if expected_mod_revision == 0:
            return await self.create(key, value, lease)
        return await self._txn_if(
            key, "MOD", expected_mod_revision, {"request_put": _put(key, value, lease)})

    async def compare_and_delete(self, key: str, expected_mod_revision: int) -> bool:
        if expected_mod_revision == 0:
            return False  # "delete if absent" never deletes anything
        return await self._txn_if(
            key, "MOD", expected_mod_revision,
            {"request_delete_range": {"key": _b64(key.encode())}})

    async def commit(self, ops: Sequence[TxnOp], expect: Mapping[str, int]) -> int | None:
        """One ``/v3/kv/txn``: compares on mod revisions, then every put and delete.
        etcd refuses (and applies nothing of) a transaction over ``--max-txn-ops``
        (128 by default) or ``--max-request-bytes`` (1.5 MiB): that refusal is raised
        as a :class:`StoreError` saying so."""
        check_unique(ops)
        compare = [{"key": _b64(key.encode()), "target": "MOD", "result": "EQUAL",
                    "mod_revision": str(rev)} for key, rev in expect.items()]
        success: list[dict[str, Any]] = [
            {"request_delete_range": {"key": _b64(op.key.encode())}} if op.value is None
            else {"request_put": _put(op.key, op.value, op.lease)} for op in ops]
        try:
            answer = await self._call("/v3/kv/txn", {"compare": compare, "success": success},
                                      repeatable=False)
        except GatewayError as exc:
            text = str(exc)
            if "too many operations" in text or "request is too large" in text or (
                    "larger than" in text):
                raise StoreError(
                    f"{text} (a transaction of {len(ops)} writes; raise etcd's "
                    "--max-txn-ops / --max-request-bytes or apply in smaller parts)") from None
            raise
        if not answer.get("succeeded", False):
            return None
        return _revision(answer)

    async def grant_lease(self, ttl_seconds: int) -> LeaseID:
        if ttl_seconds < 1:
            raise ValueError(f"lease TTL must be >= 1 s, got {ttl_seconds}")
        # etcd raises TTLs below its minimum (about 2 s with default election settings).
        answer = await self._call("/v3/lease/grant", {"TTL": str(int(ttl_seconds))})
        return LeaseID(int(answer["ID"]))

    async def keep_alive(self, lease: LeaseID) -> bool:
        answer = await self._call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(answer.get("TTL", 0)) > 0

    async def revoke_lease(self, lease: LeaseID) -> None:
        # Revoking an unknown (expired, already revoked) lease is not an error.
        await self._call("/v3/lease/revoke", {"ID": str(lease)},
                         tolerate=frozenset({GRPC_NOT_FOUND}))

    async def compact(self, revision: int) -> None:
        answer = await self._call(
            "/v3/kv/compaction", {"revision": str(revision), "physical": True},
            tolerate=frozenset({GRPC_OUT_OF_RANGE}))
        err = error_of(answer)
        if err and "future revision" in err[0]:
            raise StoreError(f"{self._gw.where}: cannot compact to {revision}: {err[0]}")

    async def watch(
        self, prefix: str, start_revision: int | None = None
    ) -> AsyncGenerator[WatchEvent, None]:
        loop = asyncio.get_running_loop()
        request: dict[str, Any] = {**_range(prefix), "progress_notify": True}
        next_rev = start_revision if start_revision and start_revision > 0 else None
        backoff = self._gw.new_backoff(self._watch_backoff)
        while not self._closed:
            index = self._gw.current
            if next_rev is not None:
                request["start_revision"] = str(next_rev)
            opened = loop.time()
            try:
                async with aclosing(self._stream(index, request)) as results:
                    async for result in results:
                        if result.get("created"):
                            if next_rev is None:  # "from now": pin now, for resuming
                                next_rev = _revision(result) + 1
                            continue
                        events = [_event(raw) for raw in result.get("events", ())]
                        # After a reconnect etcd replays from next_rev: nothing below it.
                        events = [e for e in events if next_rev is None or e.revision >= next_rev]
                        for event in events:
                            yield event
                        if events:
                            next_rev = events[-1].revision + 1
                            backoff.reset()
            except _StreamBroken as broken:
                reason = broken.reason
            if self._closed:
                return
            if loop.time() - opened >= _HEALTHY_STREAM:
                backoff.reset()  # a long-lived stream was a success, not another failure
            self._gw.failover(index)
            if not await backoff.failed():
                raise StoreUnavailable(
                    f"{self._gw.where}: watch of {prefix!r} gave up after "
                    f"{backoff.failures} attempts: {reason}")
            log.info("%s: watch of %r broke (%s); resuming at revision %s",
                     self._gw.where, prefix, reason, next_rev)
            await self._rewatch_pause(backoff)

    async def _rewatch_pause(self, backoff: Backoff) -> None:
        """Between a broken watch and its re-creation: wait until etcd answers a cheap
        request (retrying with the watch's backoff), then a uniform random 0 ..
        ``rewatch_jitter`` seconds.

        Why: a restarting etcd accepts connections a moment before it serves; requests
        sent meanwhile wait inside it and are all answered together once it is ready.
        Were those the watch creates, every watcher of the cluster would re-create its
        watches in the same instant whatever the backoff (bench/scale.py measured it).
        The probe takes that instant; the creates follow spread over the jitter window.
        """
        if self.rewatch_jitter <= 0:
            return
        while not self._closed:
            try:
                await self._gw.attempt_once(
                    "/v3/kv/range", {"key": _b64(b"\0"), "limit": 1, "serializable": True})
                break
            except StoreError as exc:
                if not await backoff.failed():
                    raise StoreUnavailable(
                        f"{self._gw.where}: watch gave up after {backoff.failures} "
                        f"attempts: {exc}") from None
        rng = self._gw.rng if self._gw.rng is not None else random
        await (self._gw.sleep or asyncio.sleep)(rng.uniform(0.0, self.rewatch_jitter))

    async def _stream(
        self, index: int, request: dict[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The results of one watch stream on endpoint ``index``. It always ends by
        raising: :class:`Compacted`, or :class:`_StreamBroken` with the reason."""
        ep = self._gw.endpoints[index]
        try:
            async with self._gw.client(index).stream(
                "POST", ep.base + "/v3/watch", json={"create_request": request},
                timeout=self._watch_timeout,
            ) as resp:
                async for line in resp.aiter_lines():
                    self._gw.last_answer = time.monotonic()
                    if not line.strip():
                        continue
                    message = json.loads(line)
                    err = error_of(message)
                    if err is not None:
                        raise _StreamBroken(err[0])
                    result = message.get("result", {})
                    if int(result.get("compact_revision", 0)):
                        raise Compacted(int(result["compact_revision"]))
                    if result.get("canceled"):
                        raise _StreamBroken(result.get("cancel_reason") or "canceled by etcd")
                    yield result
        except httpx.TransportError as exc:
            raise _StreamBroken(describe(exc)) from exc
        except ssl.SSLError as exc:  # refused client certificate (see _gateway)
            raise _StreamBroken(describe(exc)) from exc
        except ValueError as exc:  # a line that is not JSON
            raise _StreamBroken(f"bad answer: {exc}") from exc
        raise _StreamBroken("stream ended")

    async def close(self) -> None:
        self._closed = True
        await self._gw.close()


def _event(raw: dict[str, Any]) -> WatchEvent:
    kv = raw.get("kv", {})
    kind = EventType.DELETE if raw.get("type") == "DELETE" else EventType.PUT
    return WatchEvent(
        type=kind,
        key=_unb64(kv.get("key")).decode(),
        value=b"" if kind is EventType.DELETE else _unb64(kv.get("value")),
        revision=int(kv.get("mod_revision", 0)),
    )
