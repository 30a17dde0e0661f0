"""The simulated agents of bench/scale.py spread over worker processes.

One Python process could not keep 20,000 sessions alive (1,000 keep-alives/s at a 60 s
TTL) while reading the watch events of 40,000 watchers: its event loop saturated and
the leases expired. So the sessions live in ``--workers`` processes, each running a
:class:`_scale_sessions.Sessions` for its share (its own few etcd connections and
multiplexed watch streams), driven by the benchmark's process over a pipe. Every
process stamps requests with ``time.monotonic()`` (one clock for all processes on
Linux), so their per-100 ms series add up.

Commands (dicts over a ``multiprocessing`` pipe, each answered by id): ``grant``
(create the sessions, grant and keep their leases), ``start``, ``stop``, ``watching``,
``storm``, ``report``, ``close``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from _scale_sessions import VILLI, Recorder, Sessions

from villi.errors import StoreError
from villi.kvstore import LeaseID, retry


# --- the worker side ----------------------------------------------------------------------------
def _worker(conn: Any, endpoint: str, ttl: int, clients: int) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_serve(conn, endpoint, ttl, clients))


async def _serve(conn: Any, endpoint: str, ttl: int, clients: int) -> None:
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[Any] = asyncio.Queue()

    def reader() -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                msg = {"id": -1, "cmd": "close"}
            loop.call_soon_threadsafe(inbox.put_nowait, msg)
            if msg.get("cmd") == "close":
                return

    threading.Thread(target=reader, daemon=True).start()
    sessions = Sessions(endpoint, ttl, clients=clients)
    send_lock = threading.Lock()
    tasks: set[asyncio.Task[Any]] = set()

    def reply(mid: int, value: Any = None, error: str | None = None) -> None:
        with send_lock:
            conn.send({"id": mid, "value": value, "error": error})

    async def handle(msg: dict[str, Any]) -> None:
        try:
            reply(msg["id"], await _command(sessions, msg))
        except Exception as exc:  # reported to the benchmark, which raises it
            reply(msg["id"], error=f"{type(exc).__name__}: {exc}")

    while True:
        msg = await inbox.get()
        if msg["cmd"] == "close":
            for t in tasks:
                t.cancel()
            await sessions.close()
            if msg["id"] >= 0:
                reply(msg["id"])
            return
        task = asyncio.create_task(handle(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


async def _command(sessions: Sessions, msg: dict[str, Any]) -> Any:
    cmd = msg["cmd"]
    if cmd == "grant":
        # Grant this worker's leases (a few at a time) and keep each alive from its grant.
        sem = asyncio.Semaphore(16)
        out: dict[int, int] = {}

        async def one(index: int, node: str, entry: bytes) -> None:
            client = sessions.clients[index % len(sessions.clients)]
            async with sem:
                # the sessions' clients try once; a grant retries as an agent's would
                lease = await retry(lambda: client.grant_lease(sessions.ttl), VILLI,
                                    retry_on=StoreError)
            s = sessions.add(index, node, lease, entry)
            sessions.start(watch=False, group=[s])
            out[index] = int(lease)

        await asyncio.gather(*(one(i, n, e) for i, n, e in msg["nodes"]))
        return out
    if cmd == "adopt":
        # Leases granted by the benchmark's process: keep each alive from now on.
        for index, node, entry, lease in msg["nodes"]:
            s = sessions.add(index, node, LeaseID(lease), entry)
            sessions.start(watch=False, group=[s])
        return len(msg["nodes"])
    if cmd == "stop":
        await sessions.stop()
        return None
    if cmd == "configure":
        for k in ("strategy", "revision", "rewatch_jitter", "storm_republish"):
            if k in msg:
                setattr(sessions, k, msg[k])
        return None
    if cmd == "record":
        sessions.rec.start(msg["t0"])
        return None
    if cmd == "start":
        sessions.start(watch=msg["watch"])
        return None
    if cmd == "watching":
        return await sessions.wait_watching(msg["timeout"])
    if cmd == "storm":
        await sessions.stop()
        sessions.rec.start(msg["t0"])
        await sessions.storm(msg["jitter"], msg["seed"])
        return await sessions.wait_watching(msg["timeout"])
    if cmd == "report":
        rec = sessions.rec
        return {"t0": rec.t0, "issued": dict(rec.issued),
                "issued_kind": [(k, b, n) for (k, b), n in rec.issued_kind.items()],
                "kinds": dict(rec.kinds), "errors": dict(rec.errors),
                "latency": rec.latency, "events": sessions.events,
                "back_at": [s.back_at for s in sessions.sessions],
                "attempts": [s.attempts for s in sessions.sessions],
                "sessions": len(sessions.sessions)}
    raise ValueError(f"unknown command {cmd!r}")


# --- the benchmark side -------------------------------------------------------------------------
class _Worker:
    def __init__(self, endpoint: str, ttl: int, clients: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, endpoint, ttl, clients),
                                daemon=True)
        self.proc.start()
        child.close()
        self.ids = 0
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.loop = asyncio.get_running_loop()
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                for fut in list(self.waiting.values()):
                    self.loop.call_soon_threadsafe(
                        lambda f=fut: f.done() or f.set_exception(
                            RuntimeError("session worker died")))
                return
            fut = self.waiting.pop(msg["id"], None)
            if fut is not None:
                self.loop.call_soon_threadsafe(self._settle, fut, msg)

    @staticmethod
    def _settle(fut: asyncio.Future[Any], msg: dict[str, Any]) -> None:
        if fut.done():
            return
        if msg.get("error"):
            fut.set_exception(RuntimeError(f"session worker: {msg['error']}"))
        else:
            fut.set_result(msg.get("value"))

    async def call(self, cmd: str, **kw: Any) -> Any:
        self.ids += 1
        fut: asyncio.Future[Any] = self.loop.create_future()
        self.waiting[self.ids] = fut
        msg = {"id": self.ids, "cmd": cmd, **kw}
        await asyncio.to_thread(self._send, msg)
        return await fut

    def _send(self, msg: dict[str, Any]) -> None:
        with self.lock:
            self.conn.send(msg)


class Fleet:
    """N simulated sessions in ``workers`` processes; what scale.py needs of them."""

    def __init__(self, endpoint: str, ttl: int, *, workers: int = 4, clients: int = 4) -> None:
        self.endpoint, self.ttl = endpoint, ttl
        self.workers = [_Worker(endpoint, ttl, clients) for _ in range(workers)]
        self.leases: dict[int, LeaseID] = {}
        self.count = 0
        self.rec = Recorder()   # this process's own requests (pod churn)
        self.reports: list[dict[str, Any]] = []

    def _share(self, items: list[Any]) -> list[list[Any]]:
        return [items[k::len(self.workers)] for k in range(len(self.workers))]

    async def _all(self, cmd: str, **kw: Any) -> list[Any]:
        return list(await asyncio.gather(*(w.call(cmd, **kw) for w in self.workers)))

    async def grant(self, nodes: Iterable[tuple[int, str, bytes]]) -> dict[int, LeaseID]:
        """Create the sessions; each worker grants its leases and keeps them alive."""
        items = list(nodes)
        answers = await asyncio.gather(*(w.call("grant", nodes=share) for w, share in
                                         zip(self.workers, self._share(items), strict=True)))
        for answer in answers:
            self.leases.update({int(i): LeaseID(lease) for i, lease in answer.items()})
        self.count = len(self.leases)
        return self.leases

    async def adopt(self, nodes: list[tuple[int, str, bytes, LeaseID]]) -> None:
        """Hand sessions whose leases this process granted to the workers, which keep
        the leases alive from now on."""
        await asyncio.gather(*(w.call("adopt", nodes=[(i, n, e, int(lease))
                                                      for i, n, e, lease in share])
                               for w, share in zip(self.workers, self._share(nodes),
                                                   strict=True)))
        for i, _n, _e, lease in nodes:
            self.leases[i] = lease
        self.count = len(self.leases)

    async def configure(self, **kw: Any) -> None:
        await self._all("configure", **kw)

    async def record(self, t0: float) -> None:
        self.rec.start(t0)
        await self._all("record", t0=t0)

    async def start(self, *, watch: bool) -> None:
        await self._all("start", watch=watch)

    async def stop(self) -> None:
        await self._all("stop")

    async def wait_watching(self, timeout: float) -> float:
        t0 = time.monotonic()
        await self._all("watching", timeout=timeout)
        return time.monotonic() - t0

    async def storm(self, jitter: float, t0: float, timeout: float) -> None:
        await self.rec_reset(t0)
        await asyncio.gather(*(w.call("storm", jitter=jitter, seed=3 + k, t0=t0,
                                      timeout=timeout) for k, w in enumerate(self.workers)))

    async def rec_reset(self, t0: float) -> None:
        self.rec.start(t0)

    async def collect(self) -> Merged:
        """Everything the workers recorded since their last ``record``/``storm``."""
        return Merged(await self._all("report"), self.rec)

    async def close(self) -> None:
        for w in self.workers:
            try:
                await asyncio.wait_for(w.call("close"), 30)
            except (TimeoutError, RuntimeError):
                pass
            w.proc.join(5)
            if w.proc.is_alive():
                w.proc.kill()


class Merged:
    """The workers' recordings (and this process's), added up."""

    def __init__(self, reports: list[dict[str, Any]], own: Recorder) -> None:
        self.t0 = own.t0
        self.issued: Counter[int] = Counter(own.issued)
        self.issued_kind: Counter[tuple[str, int]] = Counter(own.issued_kind)
        self.kinds: Counter[str] = Counter(own.kinds)
        self.errors: Counter[str] = Counter(own.errors)
        self.latency: dict[str, list[float]] = {k: list(v) for k, v in own.latency.items()}
        self.events = 0
        self.back_at: list[float] = []
        self.attempts: list[int] = []
        for r in reports:
            self.issued.update({int(b): n for b, n in r["issued"].items()})
            self.issued_kind.update({(k, int(b)): n for k, b, n in r["issued_kind"]})
            self.kinds.update(r["kinds"])
            self.errors.update(r["errors"])
            for k, v in r["latency"].items():
                self.latency.setdefault(k, []).extend(v)
            self.events += r["events"]
            self.back_at += r["back_at"]
            self.attempts += r["attempts"]

    def series(self, until: float | None = None, kind: str | None = None) -> list[int]:
        return Recorder.series(self, until, kind)  # type: ignore[arg-type]
