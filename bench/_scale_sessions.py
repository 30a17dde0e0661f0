"""Simulated agents for bench/scale.py: N node sessions over few connections.

Each session does what an agent does against the store: keeps its lease alive at a
third of the TTL, owns its node entry, and watches the shared prefixes (nodes and
ipcache). The sessions share a handful of villi ``EtcdStore`` clients (each a small
pool of HTTP connections) and their watches are multiplexed: one HTTP watch stream
carries the create requests of many sessions (etcd's gateway accepts a sequence of
``create_request`` objects in one body and answers each with its ``watch_id``), as a
gRPC client multiplexes watches over one connection. So etcd holds 2 x N real watchers
and sends every event to each of them; the sessions do not decode the events' JSON
(they count lines), and they do not transfer the listings (see scale.py's docstring).

Reconnects: when etcd goes away every stream breaks at once and each session retries
on its own with the strategy under test:

- ``none``:  fixed exponential, ``min(cap, base * 2**n)``;
- ``equal``: equal jitter, half of that plus uniform(0, the other half);
- ``full``:  villi: full jitter (``villi.kvstore.backoff.BackoffPolicy.delay``), and
  what the agent does besides since issue 16: a uniform pause of 0..``rewatch_jitter``
  between "etcd answers" and re-creating the watches (``EtcdStore.rewatch_jitter``)
  and a keep-alive period drawn from [TTL/6, TTL/3] (``LeaseKeeper.period``), so
  sessions that came back together do not stay in step.

A retry is one keep-alive of the session's lease (the cheapest request that proves
etcd is back, and one the agent must make anyway); after it succeeds the session's two
watches are re-created from the last revision (no replay: nothing was written while
etcd was down). Every request is counted when it is issued, per 100 ms window.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from villi.errors import StoreError, StoreUnavailable
from villi.kvstore import BackoffPolicy, EtcdStore, LeaseID
from villi.kvstore import schema as keys
from villi.kvstore._keys import prefix_range

log = logging.getLogger("scale.sessions")

#: villi's watch reconnect policy (EtcdStore's default watch_backoff): 50 ms .. 5 s.
BASE, CAP = 0.05, 5.0
VILLI = BackoffPolicy(base=BASE, cap=CAP, max_attempts=None)
WINDOW = 0.1
WATCHED = (keys.NODES, keys.IPCACHE)


def delay(strategy: str, attempt: int, rng: random.Random) -> float:
    ceiling = VILLI.ceiling(attempt)
    if strategy == "none":
        return ceiling
    if strategy == "equal":
        return ceiling / 2 + rng.uniform(0, ceiling / 2)
    return VILLI.delay(attempt, rng)


class Recorder:
    """Requests issued per 100 ms window, and latencies per kind, for one phase."""

    def __init__(self) -> None:
        self.start(time.monotonic())

    def start(self, t0: float) -> None:
        self.t0 = t0
        self.issued: Counter[int] = Counter()
        self.issued_kind: Counter[tuple[str, int]] = Counter()
        self.kinds: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.latency: dict[str, list[float]] = {}

    def issue(self, kind: str, n: int = 1) -> float:
        now = time.monotonic()
        bucket = int((now - self.t0) / WINDOW)
        self.issued[bucket] += n
        self.issued_kind[kind, bucket] += n
        self.kinds[kind] += n
        return now

    def done(self, kind: str, t_issue: float, ok: bool = True) -> None:
        if ok:
            self.latency.setdefault(kind, []).append(time.monotonic() - t_issue)
        else:
            self.errors[kind] += 1

    def series(self, until: float | None = None, kind: str | None = None) -> list[int]:
        last = max(self.issued, default=0)
        if until is not None:
            last = max(last, int((until - self.t0) / WINDOW))
        if kind is not None:
            return [self.issued_kind.get((kind, i), 0) for i in range(last + 1)]
        return [self.issued.get(i, 0) for i in range(last + 1)]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _create(prefix: str, start_revision: int) -> dict[str, Any]:
    start, end = prefix_range(prefix)
    req: dict[str, Any] = {"key": _b64(start), "range_end": _b64(end)}
    if start_revision:
        req["start_revision"] = str(start_revision)
    return {"create_request": req}


KA_BATCH = 100  # keep-alives per request: the gateway reads ~100 before it answers

STALL = 1.0  # seconds without a created answer before a stream's rest moves on
RETRY_CREATE = 15.0  # seconds a session waits for its watches before asking again


@dataclass(eq=False)
class Session:
    index: int
    node: str
    lease: LeaseID
    entry: bytes
    client: EtcdStore
    keepalives: KeepAlives
    broken: asyncio.Event = field(default_factory=asyncio.Event)
    watching: bool = False
    broken_at: float = 0.0
    back_at: float = 0.0
    attempts: int = 0
    stream: int = 0   # which watch stream carries this session's watches
    queued_at: float = 0.0


class KeepAlives:
    """Lease keep-alives of many sessions, multiplexed as clientv3 does it: one
    LeaseKeepAlive stream carries the keep-alives of every lease of the client. Through
    the gateway that is one POST whose body holds up to KA_BATCH requests; etcd answers
    each (``ID``, ``TTL``; TTL 0 = the lease is gone). Each keep-alive is still one
    request to etcd and is counted as one; only the HTTP round trip is shared."""

    def __init__(self, endpoint: str, client: httpx.AsyncClient, flushers: int = 8) -> None:
        self.url = endpoint + "/v3/lease/keepalive"
        self.client = client
        self.queue: asyncio.Queue[tuple[int, asyncio.Future[bool]]] = asyncio.Queue()
        self.tasks = [asyncio.create_task(self._flush()) for _ in range(flushers)]

    async def keep_alive(self, lease: int) -> bool:
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((lease, fut))
        return await fut

    async def _flush(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < KA_BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            body = "\n".join(json.dumps({"ID": str(lease)}) for lease, _ in batch).encode()
            waiting: dict[int, list[asyncio.Future[bool]]] = {}
            for lease, fut in batch:
                waiting.setdefault(int(lease), []).append(fut)
            error: BaseException | None = None
            try:
                async with self.client.stream("POST", self.url, content=body) as resp:
                    async for line in resp.aiter_lines():
                        if not line.strip():
                            continue
                        result = json.loads(line).get("result", {})
                        futs = waiting.pop(int(result.get("ID", 0)), [])
                        for fut in futs:
                            if not fut.done():
                                fut.set_result(int(result.get("TTL", 0)) > 0)
                        if not waiting:
                            break
            except (httpx.HTTPError, OSError, ValueError) as exc:
                error = exc
            for futs in waiting.values():
                for fut in futs:
                    if not fut.done():
                        fut.set_exception(StoreUnavailable(
                            f"keep-alive unanswered: {error or 'no answer'}"))

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@dataclass(eq=False)
class _StreamState:
    group: list[Session]
    acks: int = 0
    done: bool = False
    progress: float = field(default_factory=time.monotonic)


class Sessions:
    """N sessions, their clients and multiplexed watch streams."""

    def __init__(self, endpoint: str, ttl: int, *, clients: int = 8, pool: int = 8,
                 batch: int = 4000, seed: int = 16) -> None:
        self.endpoint = endpoint
        self.ttl = ttl
        self.rng = random.Random(seed)
        self.rec = Recorder()
        self.strategy = "full"
        self.rewatch_jitter = 1.0
        self.retried = 0
        self.storm_republish = False
        self.revision = 0
        self.batch = batch
        self.events = 0
        self.sessions: list[Session] = []
        self._pending: asyncio.Queue[Session] = asyncio.Queue()
        self._tasks: list[asyncio.Task[Any]] = []
        self._streams: set[asyncio.Task[Any]] = set()
        self._stream_ids = 0
        self.clients = [self._client(pool) for _ in range(clients)]
        self.keepalives = [KeepAlives(endpoint, c._gw.client(0)) for c in self.clients]
        self._watch_http = httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None),
                                             limits=httpx.Limits(max_connections=None))

    def _client(self, pool: int) -> EtcdStore:
        """A villi EtcdStore that tries once (the session's own backoff decides) and
        queues on a small connection pool instead of opening a socket per request."""
        store = EtcdStore(self.endpoint, backoff=BackoffPolicy(base=0.001, cap=0.001,
                                                               max_attempts=1))
        gw = store._gw
        gw._clients[0] = httpx.AsyncClient(
            # villi's request timeouts (EtcdStore defaults); waiting for a pooled
            # connection is this process's queue, not etcd's, so it does not time out.
            timeout=httpx.Timeout(5.0, connect=2.0, pool=600.0),
            limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool))
        return store

    def add(self, index: int, node: str, lease: LeaseID, entry: bytes) -> Session:
        k = index % len(self.clients)
        s = Session(index, node, lease, entry, self.clients[k], self.keepalives[k])
        self.sessions.append(s)
        return s

    # --- requests ---------------------------------------------------------------------------
    async def call(self, kind: str, coro_fn: Any) -> Any:
        t = self.rec.issue(kind)
        try:
            result = await coro_fn()
        except StoreError:
            self.rec.done(kind, t, ok=False)
            raise
        self.rec.done(kind, t)
        return result

    async def keep_alive(self, s: Session, kind: str = "keepalive") -> bool:
        return bool(await self.call(kind, lambda: s.keepalives.keep_alive(s.lease)))

    async def put_node(self, s: Session, entry: bytes | None = None) -> None:
        if entry is not None:
            s.entry = entry
        await self.call("node_put", lambda: s.client.put(keys.node_key(s.node), s.entry,
                                                         lease=s.lease))

    # --- watches ----------------------------------------------------------------------------
    async def _pump(self) -> None:
        """Open a multiplexed watch stream for whatever sessions wait for their watches.

        etcd's gateway is HTTP/1.1: it reads only the part of a request body that arrived
        before it starts answering, so a stream takes the creates etcd read (each gets
        its ``created`` answer, in order) and the sessions whose creates got no answer
        within ``STALL`` seconds go to the next stream."""
        while True:
            first = await self._pending.get()
            group = [first]
            while len(group) < self.batch and not self._pending.empty():
                group.append(self._pending.get_nowait())
            state = _StreamState(group)
            task = asyncio.create_task(self._stream(state))
            self._streams.add(task)
            task.add_done_callback(self._streams.discard)
            while not state.done:
                await asyncio.sleep(STALL / 4)
                if time.monotonic() - state.progress > STALL:
                    state.done = True
            for s in group[state.acks // 2:]:
                if not s.broken.is_set():
                    self._pending.put_nowait(s)  # same demand: not counted again

    async def _stream(self, st: _StreamState) -> None:
        group = st.group
        body = "\n".join(json.dumps(_create(p, self.revision + 1 if self.revision else 0))
                         for _ in group for p in WATCHED).encode()
        self._stream_ids += 1
        sid = self._stream_ids
        st.progress = time.monotonic()
        try:
            async with self._watch_http.stream("POST", self.endpoint + "/v3/watch",
                                               content=body) as resp:
                # Count tokens in the raw bytes (no line splitting, no JSON): at 20,000
                # sessions the streams carry ~100,000 messages per second.
                tail = b""
                async for chunk in resp.aiter_raw():
                    data = tail + chunk
                    # whole messages only (one JSON line each): a token may straddle
                    # two chunks
                    cut = data.rfind(b"\n") + 1
                    body_part, tail = data[:cut], data[cut:]
                    self.events += body_part.count(b'"events"')
                    created = body_part.count(b'"created"')
                    if not created or st.done:
                        continue  # (late creates: those sessions went to another stream)
                    now = time.monotonic()
                    st.progress = now
                    for _ in range(created):
                        st.acks += 1
                        if st.acks % 2 == 0 and st.acks // 2 <= len(group):
                            s = group[st.acks // 2 - 1]
                            s.watching, s.back_at = True, now
                            s.stream = sid
                            self.rec.done("watch_create", s.queued_at)
                    if st.acks >= 2 * len(group):
                        st.done = True
        except (httpx.HTTPError, OSError) as exc:
            log.debug("watch stream of %d sessions broke: %s", len(group), exc)
        finally:
            st.done = True
            now = time.monotonic()
            for s in group:
                if s.stream == sid and s.watching:
                    s.watching = False
                    s.broken_at = now
                    s.broken.set()

    # --- the session's life -------------------------------------------------------------------
    async def _reconnect(self, s: Session) -> None:
        attempt = 0
        while True:
            await asyncio.sleep(delay(self.strategy, attempt, self.rng))
            try:
                alive = await self.keep_alive(s, "reconnect")
                break
            except StoreError:
                attempt += 1
        s.attempts = attempt + 1
        if not alive:  # the lease expired while etcd was away: grant again, re-publish
            s.lease = await self.call("lease_grant", lambda: s.client.grant_lease(self.ttl))
            await self.put_node(s)
        if self.strategy == "full" and self.rewatch_jitter > 0:
            await asyncio.sleep(self.rng.uniform(0, self.rewatch_jitter))
        await self.watch(s)

    def ka_period(self) -> float:
        """Seconds to the next keep-alive: villi's LeaseKeeper draws it from
        [TTL/6, TTL/3]; the naive strategies keep the fixed TTL/3."""
        period = self.ttl / 3
        return self.rng.uniform(period / 2, period) if self.strategy == "full" else period

    async def _run(self, s: Session, watch: bool) -> None:
        period = self.ttl / 3
        loop = asyncio.get_running_loop()
        next_ka = loop.time() + self.rng.uniform(0, period)
        if watch:
            await self.watch(s)
        while True:
            try:
                await asyncio.wait_for(s.broken.wait(), max(0.0, next_ka - loop.time()))
            except TimeoutError:
                try:
                    await self.keep_alive(s)
                    next_ka += self.ka_period()
                    continue
                except StoreError:
                    s.broken_at = time.monotonic()
                    s.watching = False  # its stream is as dead: watches are re-created
                    s.stream = -1
                    s.broken.set()
            if not watch:  # keep-alive only: retry with the strategy, nothing to re-watch
                s.broken.clear()
                while True:
                    await asyncio.sleep(delay(self.strategy, 0, self.rng))
                    try:
                        await self.keep_alive(s, "reconnect")
                        break
                    except StoreError:
                        continue
                next_ka = loop.time() + self.ka_period()
                continue
            s.broken.clear()
            await self._reconnect(s)
            next_ka = loop.time() + self.ka_period()

    def start(self, *, watch: bool, group: list[Session] | None = None) -> None:
        """Run the sessions (all, or ``group``): keep-alives, and (``watch``) the
        multiplexed watches."""
        if watch:
            self.start_pumps()
        self._tasks += [asyncio.create_task(self._run(s, watch))
                        for s in (self.sessions if group is None else group)]

    async def storm(self, jitter: float, seed: int) -> None:
        """Every session restarts at once (a node-image rollout) after a uniform
        0..``jitter`` s (``--start-jitter``): refresh its lease (a new one if it expired),
        publish its node entry, list (one 100-key page, see scale.py's docstring),
        watch; each step retries as the agent does (full jitter)."""
        from villi.errors import StoreError
        from villi.kvstore import retry
        from villi.kvstore.etcd import _range

        rng = random.Random(seed)
        self.start_pumps()

        async def one(s: Session) -> None:
            await asyncio.sleep(rng.uniform(0, jitter))

            expired = False

            async def lease() -> None:
                nonlocal expired
                if not await self.keep_alive(s, "lease"):
                    expired = True
                    s.lease = await self.call("lease_grant",
                                              lambda: s.client.grant_lease(self.ttl))

            await retry(lease, VILLI, retry_on=StoreError)
            # Re-published only under a new lease: an agent that keeps its lease across
            # a restart has nothing to rewrite. (villi's agent grants a new lease at each
            # start and rewrites its node entry: N^2 node events per rollout, which took
            # etcd to 4.3 GiB at 5,000 sessions; docs/scale.md.)
            if expired or self.storm_republish:
                await retry(lambda: self.put_node(s), VILLI, retry_on=StoreError)
            await retry(lambda: self.call("list", lambda: s.client._gw.call(
                "/v3/kv/range", {**_range(keys.NODES), "limit": 100, "keys_only": True})),
                VILLI, retry_on=StoreError)
            await self.watch(s)
            self.keep_alive_loop(s)

        await asyncio.gather(*(one(s) for s in self.sessions))

    def keep_alive_loop(self, s: Session) -> None:
        """Keep one session's lease alive from now on (its watches are handled apart)."""
        self._tasks.append(asyncio.create_task(self._run(s, False)))

    def start_pumps(self) -> None:
        self._tasks += [asyncio.create_task(self._pump()) for _ in range(4)]

    async def watch(self, s: Session) -> None:
        """Queue the session's two watch creates on the next multiplexed stream (they
        count as issued now: that is when this agent would send them)."""
        s.watching = False
        s.queued_at = self.rec.issue("watch_create", 2)
        await self._pending.put(s)

    async def wait_watching(self, timeout: float) -> float:
        """Seconds until every session watches (or TimeoutError)."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        next_check = t0 + RETRY_CREATE
        while not all(s.watching for s in self.sessions):
            now = time.monotonic()
            if now > deadline:
                missing = sum(not s.watching for s in self.sessions)
                raise TimeoutError(f"{missing} sessions not watching after {timeout} s")
            if now > next_check:
                # A create that got no answer for RETRY_CREATE s (its stream stalled on a
                # loaded machine) is sent again, as a client would after a timeout.
                next_check = now + RETRY_CREATE / 2
                for s in self.sessions:
                    if not s.watching and not s.broken.is_set() and s.queued_at \
                            and now - s.queued_at > RETRY_CREATE:
                        s.queued_at = now
                        self.retried += 1
                        self._pending.put_nowait(s)
            await asyncio.sleep(0.1)
        return time.monotonic() - t0

    async def stop(self) -> None:
        tasks = self._tasks + list(self._streams)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks, self._streams = [], set()
        self._pending = asyncio.Queue()
        for s in self.sessions:
            s.watching = False
            s.broken = asyncio.Event()

    async def close(self) -> None:
        await self.stop()
        for k in self.keepalives:
            await k.close()
        for c in self.clients:
            await c.close()
        await self._watch_http.aclose()
