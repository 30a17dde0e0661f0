"""The agent's observer: drains the ringbuf, keeps flows, serves queries and followers.

Ingest (per batch, no Python per record): append raw records to the flow ring, count
Hubble metrics, wake followers. Only the export file (when enabled) and readers turn
records into flow dicts, and only for the records they want.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np

from villi.datapath.ringbuf import RingBuffer
from villi.observer import dns
from villi.observer.context import FlowContext
from villi.observer.export import FlowExporter, read_flows
from villi.observer.filters import FilterSpec, match
from villi.observer.flow import iso_time, to_flow
from villi.observer.flowfilter import flow_matches
from villi.observer.l7flow import l7_flow
from villi.observer.metrics import HubbleMetrics
from villi.observer.ring import FlowRing

log = logging.getLogger(__name__)
POLL_INTERVAL = 0.2


class Observer:
    def __init__(self, ctx: FlowContext, *, events: RingBuffer | None = None,
                 capacity: int = 4095, metrics: HubbleMetrics | None = None,
                 kernel_lost: Callable[[], int] | None = None,
                 export_path: Path | None = None, export_filter: FilterSpec | None = None
                 ) -> None:
        self.ctx = ctx
        self.events = events
        self.ring = FlowRing(capacity)
        self.metrics = metrics or HubbleMetrics()
        self.kernel_lost = kernel_lost or (lambda: 0)
        self.exporter = FlowExporter(export_path) if export_path else None
        self.export_path = export_path
        self.export_filter = export_filter or FilterSpec()
        self.boot_offset_ns = time.time_ns() - time.monotonic_ns()
        self.processed = 0
        self.lost_reported = 0
        self.started_ns = time.time_ns()
        self._rate: collections.deque[tuple[float, int]] = collections.deque(maxlen=64)
        self._changed = asyncio.Event()
        # L7 flows (from the proxy's records): few, kept as dicts beside the raw ring.
        self.l7: collections.deque[dict[str, Any]] = collections.deque(maxlen=capacity)
        self.l7_seq = 0
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- ingest -------------------------------------------------------------------------
    def ingest(self, batch: np.ndarray) -> None:
        if not len(batch):
            return
        self.ring.append(batch)
        self.processed += len(batch)
        self.metrics.count(batch)
        if self.exporter is not None:
            chosen = batch[match(self.export_filter, batch, self.ctx)]
            self.exporter.write([self._flow(r) for r in chosen])
        self._changed.set()

    def ingest_l7(self, records: list[Any]) -> None:
        """L7 records from the proxy (``L7Record`` objects or their wire dicts; DNS
        records are dicts with ``"kind": "dns"``)."""
        flows = [dns.dns_flow(r, self.ctx) if isinstance(r, dict) and r.get("kind") == "dns"
                 else l7_flow(r if isinstance(r, dict) else r.to_wire(), self.ctx)
                 for r in records]
        if not flows:
            return
        self.l7.extend(flows)
        self.l7_seq += len(flows)
        self.processed += len(flows)
        for flow in flows:
            self.metrics.count_l7(flow)
        if self.exporter is not None:
            self.exporter.write([f for f in flows if flow_matches(self.export_filter, f)])
        self._changed.set()

    def _l7_query(self, spec: FilterSpec, since_ns: int | None, until_ns: int | None,
                  flows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        lo = iso_time(since_ns) if since_ns is not None else None
        hi = iso_time(until_ns) if until_ns is not None else None
        return [f for f in (self.l7 if flows is None else flows)
                if (lo is None or f["time"] >= lo) and (hi is None or f["time"] <= hi)
                and flow_matches(spec, f)]

    def drain(self) -> int:
        if self.events is None:
            return 0
        total = 0
        while True:
            batch = self.events.read_batch()
            if not len(batch):
                break
            self.ingest(batch)
            total += len(batch)
        return total

    def _on_readable(self) -> None:
        try:
            self.drain()
        except Exception:  # noqa: BLE001 - the reader must survive a bad batch
            log.exception("draining flow events failed")

    async def _poll(self) -> None:
        while True:
            self._on_readable()
            lost = self.kernel_lost()
            if lost > self.lost_reported:
                self.metrics.lost.labels("perf_event_ring_buffer").inc(lost - self.lost_reported)
                self.lost_reported = lost
            self._rate.append((time.monotonic(), self.processed))
            await asyncio.sleep(POLL_INTERVAL)

    def start(self, spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]]
              | None = None) -> None:
        """Start reading events; ``spawn`` runs the poll loop as the owner's task
        (the agent's TaskGroup), else it is a plain task of this loop."""
        self._loop = asyncio.get_running_loop()
        if self.events is not None:
            self._loop.add_reader(self.events.fileno(), self._on_readable)
        self._task = spawn(self._poll(), "observer") if spawn is not None else \
            self._loop.create_task(self._poll(), name="villi-observer")

    async def stop(self) -> None:
        if self._loop is not None and self.events is not None:
            self._loop.remove_reader(self.events.fileno())
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.exporter is not None:
            self.exporter.close()

    # --- queries ------------------------------------------------------------------------
    def _flow(self, rec: Any) -> dict[str, Any]:
        return to_flow(rec, self.boot_offset_ns, self.ctx)

    def _window(self, rec: np.ndarray, since_ns: int | None, until_ns: int | None
                ) -> np.ndarray:
        mask = np.ones(len(rec), dtype=bool)
        if since_ns is not None:
            mask &= rec["ts_ns"] >= np.uint64(max(0, since_ns - self.boot_offset_ns))
        if until_ns is not None:
            mask &= rec["ts_ns"] <= np.uint64(max(0, until_ns - self.boot_offset_ns))
        return rec[mask]

    def query(self, spec: FilterSpec, *, last: int | None = 20, first: int | None = None,
              since_ns: int | None = None, until_ns: int | None = None
              ) -> list[dict[str, Any]]:
        rec = self.ring.snapshot()
        rec = self._window(rec, since_ns, until_ns)
        rec = rec[match(spec, rec, self.ctx)]
        flows = []
        oldest = int(rec["ts_ns"][0]) + self.boot_offset_ns if len(rec) else None
        if since_ns is not None and self.export_path is not None and \
                (oldest is None or since_ns < oldest):
            flows = self._from_export(spec, since_ns, until_ns, before=oldest)
        flows += [self._flow(r) for r in rec]
        if self.l7:
            # The export file holds the L7 flows too: from it, only those older than the
            # ones still in memory (else each shows twice).
            kept = self.l7[0]["time"]
            flows = [f for f in flows if f.get("Type") != "L7" or f["time"] < kept]
            flows = sorted(flows + self._l7_query(spec, since_ns, until_ns),
                           key=lambda f: f["time"])
        if first is not None:
            return flows[:first]
        if last is not None and since_ns is None:
            return flows[-last:] if last else []
        return flows

    def _from_export(self, spec: FilterSpec, since_ns: int, until_ns: int | None,
                     before: int | None) -> list[dict[str, Any]]:
        """Flows older than the ring, read back from the export file."""
        from villi.observer.flowfilter import flow_matches

        lo, hi = iso_time(since_ns), iso_time(until_ns) if until_ns else None
        cutoff = iso_time(before) if before else None
        out = []
        for flow in read_flows(self.export_path):  # type: ignore[arg-type]
            t = flow.get("time", "")
            if t < lo or (hi and t > hi) or (cutoff and t >= cutoff):
                continue
            if flow_matches(spec, flow):
                out.append(flow)
        return out

    async def follow(self, spec: FilterSpec, last: int = 0) -> AsyncIterator[dict[str, Any]]:
        """Flows as they arrive (after the ``last`` newest existing ones)."""
        seq = self.ring.seq
        l7_seq = self.l7_seq
        for flow in self.query(spec, last=last) if last else []:
            yield flow
        while True:
            self._changed.clear()
            rec, seq = self.ring.since(seq)
            new_l7 = min(self.l7_seq - l7_seq, len(self.l7))
            l7_seq = self.l7_seq
            if new_l7:
                for flow in self._l7_query(spec, None, None, list(self.l7)[-new_l7:]):
                    yield flow
            if len(rec):
                for r in rec[match(spec, rec, self.ctx)]:
                    yield self._flow(r)
                continue
            if new_l7:
                continue
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=1.0)
            except TimeoutError:
                pass

    def status(self) -> dict[str, Any]:
        rate = 0.0
        if len(self._rate) >= 2:
            (t0, n0), (t1, n1) = self._rate[0], self._rate[-1]
            rate = (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
        return {"node": self.ctx.node_name(), "processed": self.processed,
                "lost": max(self.kernel_lost(), self.lost_reported),
                "current_flows": len(self.ring), "max_flows": self.ring.capacity,
                "seen_flows": self.ring.seq, "flows_per_second": round(rate, 2),
                "uptime_ns": time.time_ns() - self.started_ns,
                "export": str(self.export_path) if self.export_path else None}
