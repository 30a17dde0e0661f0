"""The agent ↔ proxy control channel: JSON lines over a unix socket in the node.

The proxy is the server (it outlives agent restarts); the agent connects, sends full
policy snapshots (``{"op": "snapshot", "snapshot": {...}}``, answered with ``ack``)
and reads L7 records the proxy pushes (``{"op": "records", "records": [...]}``).
Records produced while no agent is connected wait in a bounded queue (oldest dropped,
counted). ``{"op": "stats"}`` returns the proxy's counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from villi.proxy.records import L7Record
from villi.proxy.store import PolicyStore, SnapshotError

log = logging.getLogger("villi.proxy")

MAX_LINE = 64 * 1024 * 1024
PENDING_RECORDS = 10000


class WireRecord(Protocol):
    """A record the proxy reports: HTTP (:class:`L7Record`) or DNS (its wire dict has
    ``"kind": "dns"``, see ``villi.dnsproxy.host``)."""

    def to_wire(self) -> dict[str, Any]: ...


def from_wire(data: dict[str, Any]) -> L7Record | dict[str, Any]:
    """HTTP records become :class:`L7Record`; DNS records stay dicts (the observer
    renders them)."""
    return data if data.get("kind") == "dns" else L7Record.from_wire(data)


class ControlServer:
    """Serves one agent at a time; queues records while none is connected."""

    def __init__(self, path: Path, store: PolicyStore,
                 stats: Callable[[], dict[str, int]]) -> None:
        self.path = path
        self.store = store
        self.stats = stats
        self.pending: deque[dict[str, Any]] = deque(maxlen=PENDING_RECORDS)
        self.dropped_records = 0
        self.snapshots = 0
        self._writer: asyncio.StreamWriter | None = None
        self._wakeup = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._flusher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path),
                                                       limit=MAX_LINE)
        os.chmod(self.path, 0o600)
        self._flusher = asyncio.create_task(self._flush_loop())

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def emit(self, record: WireRecord) -> None:
        if len(self.pending) == self.pending.maxlen:
            self.dropped_records += 1
        self.pending.append(record.to_wire())
        self._wakeup.set()

    async def _flush_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            writer = self._writer
            if writer is None or not self.pending:
                continue
            batch = list(self.pending)
            self.pending.clear()
            try:
                writer.write(json.dumps({"op": "records", "records": batch}).encode() + b"\n")
                await writer.drain()
            except (ConnectionError, RuntimeError):
                self.pending.extendleft(reversed(batch))
                if self._writer is writer:
                    self._writer = None

    async def _serve(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer = writer
        self._wakeup.set()  # deliver what waited for an agent
        try:
            while line := await reader.readline():
                reply = self._handle(line)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()

    def _handle(self, line: bytes) -> dict[str, Any]:
        try:
            message = json.loads(line)
            op = message.get("op")
            if op == "snapshot":
                snapshot = self.store.replace(message["snapshot"])
                self.snapshots += 1
                return {"op": "ack", "version": snapshot.version}
            if op == "stats":
                return {"op": "stats", "stats": {
                    **self.stats(), "snapshots": self.snapshots,
                    "dropped_records": self.dropped_records,
                    "version": self.store.snapshot.version}}
            return {"op": "error", "error": f"unknown op {op!r}"}
        except (ValueError, KeyError, TypeError, AttributeError, SnapshotError) as exc:
            return {"op": "error", "error": str(exc)}


class ProxyClient:
    """The agent's side: keeps a connection, (re)sends the last snapshot after every
    reconnect, and hands received records to ``on_records``."""

    def __init__(self, path: Path,
                 on_records: Callable[[list[L7Record | dict[str, Any]]], None]) -> None:
        self.path = path
        self.on_records = on_records
        self.snapshot: dict[str, Any] | None = None
        self.connected = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._writer is not None:
            self._writer.close()

    async def push(self, snapshot: dict[str, Any]) -> bool:
        """Send a snapshot now if connected (else on connect); True once acknowledged."""
        self.snapshot = snapshot
        if self._writer is None:
            return False
        reply = await self._request({"op": "snapshot", "snapshot": snapshot})
        return reply is not None and reply.get("op") == "ack"

    async def stats(self) -> dict[str, int] | None:
        reply = await self._request({"op": "stats"})
        return reply.get("stats") if reply else None

    async def _request(self, message: dict[str, Any]) -> dict[str, Any] | None:
        async with self._lock:
            writer = self._writer
            if writer is None:
                return None
            try:
                writer.write(json.dumps(message).encode() + b"\n")
                await writer.drain()
                reply = await asyncio.wait_for(self._replies.get(), 10)
            except (ConnectionError, TimeoutError):
                return None
            return None if reply.get("op") == "closed" else reply

    async def _run(self) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.path),
                                                                    limit=MAX_LINE)
            except OSError:
                await asyncio.sleep(0.2)
                continue
            self._writer = writer
            self._replies = asyncio.Queue()
            reader_task = asyncio.create_task(self._read(reader))
            if self.snapshot is not None:
                await self.push(self.snapshot)
            self.connected.set()
            with contextlib.suppress(Exception):
                await reader_task
            self.connected.clear()
            self._writer = None
            writer.close()
            await asyncio.sleep(0.2)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            await self._read_lines(reader)
        finally:
            await self._replies.put({"op": "closed"})  # a pending request fails now

    async def _read_lines(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            message = json.loads(line)
            if message.get("op") == "records":
                try:
                    self.on_records([from_wire(r) for r in message["records"]])
                except Exception:  # the observer must not break the channel
                    log.exception("handling L7 records failed")
            else:
                await self._replies.put(message)
