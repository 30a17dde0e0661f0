"""``villi cloud-sim``'s HTTP face: a simulated provider API over aiohttp.

``POST /api/<Action>`` with a JSON object of parameters answers the action's JSON, or
``{"Error": {"Code": ..., "Message": ...}}`` with a 4xx/5xx status. Every call first
waits ``latency_s`` (a real provider answers in tens to hundreds of milliseconds), then
takes a token from a token bucket of ``rate_limit`` tokens per second (burst
``burst``); with none left it answers ``503 RequestLimitExceeded`` at once, as EC2 does.
``GET /metrics`` serves per-action call, error and throttle counters in the Prometheus
text format, which is how benchmarks count API requests from outside the operator.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from villi.cloudsim.model import ACTIONS, Clock, Cloud, SimError


@dataclass(frozen=True, slots=True)
class SimSettings:
    """``latency_s`` per call; ``rate_limit`` calls per second (0 = unlimited) with a
    bucket of ``burst`` (default: one second's worth); ``consistency_delay_s`` before a
    new interface shows up in Describe."""

    latency_s: float = 0.0
    rate_limit: float = 0.0
    burst: float = 0.0
    consistency_delay_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("latency_s", "rate_limit", "burst", "consistency_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"cloud-sim {name} must be >= 0, got {getattr(self, name)}")


class TokenBucket:
    """``rate`` tokens per second up to ``capacity``; :meth:`take` never waits (the
    server refuses instead, so the client's own limiter and backoff are what's tested)."""

    def __init__(self, rate: float, capacity: float, clock: Clock = time.monotonic) -> None:
        self.rate = rate
        self.capacity = max(capacity, 1.0)
        self.tokens = self.capacity
        self.clock = clock
        self.stamp = clock()

    def take(self) -> bool:
        if self.rate <= 0:
            return True
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class CloudSimServer:
    """The aiohttp application around one :class:`Cloud`; counters are public so tests
    in the same process can read them without scraping."""

    def __init__(self, cloud: Cloud, settings: SimSettings | None = None, *,
                 plumber: Any = None) -> None:
        self.cloud = cloud
        self.plumber = plumber  # villi.cloudsim.links.LinkPlumber, or None
        self.settings = settings or SimSettings()
        s = self.settings
        self.bucket = TokenBucket(s.rate_limit, s.burst or s.rate_limit)
        self.calls: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.throttled: Counter[str] = Counter()
        self._lock = asyncio.Lock()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/{action}", self._handle)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        return app

    async def _handle(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        if action not in ACTIONS:
            return _error(SimError("InvalidAction", f"unknown action {action!r}", 404))
        self.calls[action] += 1
        if self.settings.latency_s:
            await asyncio.sleep(self.settings.latency_s)
        if not self.bucket.take():
            self.throttled[action] += 1
            return _error(SimError("RequestLimitExceeded", "Request limit exceeded.", 503))
        try:
            params = await request.json() if request.can_read_body else {}
        except json.JSONDecodeError as exc:
            self.errors[action] += 1
            return _error(SimError("MalformedRequest", f"body is not JSON: {exc}"))
        if not isinstance(params, dict):
            self.errors[action] += 1
            return _error(SimError("MalformedRequest", "body must be a JSON object"))
        async with self._lock:  # one mutation at a time, like a provider's control plane
            before = self._attachments() if self.plumber is not None else {}
            try:
                result = getattr(self.cloud, action)(params)
            except SimError as exc:
                self.errors[action] += 1
                return _error(exc)
            if self.plumber is not None:
                await asyncio.to_thread(self._plumb, before, self._attachments())
        return web.json_response(result)

    def _attachments(self) -> dict[str, tuple[str, int]]:
        return {e.id: (e.instance_id, e.device_index) for e in self.cloud.interfaces.values()
                if e.instance_id is not None and e.device_index}

    def _plumb(self, before: dict[str, tuple[str, int]],
               after: dict[str, tuple[str, int]]) -> None:
        from villi.cloudsim.links import NETNS_TAG

        for eid in before.keys() - after.keys():
            self.plumber.detach(eid)
        for eid in after.keys() - before.keys():
            iid, index = after[eid]
            inst = self.cloud.instances.get(iid)
            netns = inst.tags.get(NETNS_TAG) if inst is not None else None
            if netns:
                self.plumber.attach(eid, netns, index)

    async def _metrics(self, request: web.Request) -> web.Response:
        lines = ["# HELP villi_cloudsim_api_calls_total API calls received, by action.",
                 "# TYPE villi_cloudsim_api_calls_total counter"]
        lines += [f'villi_cloudsim_api_calls_total{{action="{a}"}} {self.calls[a]}'
                  for a in ACTIONS]
        lines += ["# HELP villi_cloudsim_api_throttled_total Calls refused with "
                  "RequestLimitExceeded.", "# TYPE villi_cloudsim_api_throttled_total counter"]
        lines += [f'villi_cloudsim_api_throttled_total{{action="{a}"}} {self.throttled[a]}'
                  for a in ACTIONS]
        lines += ["# HELP villi_cloudsim_api_errors_total Calls answered with an error.",
                  "# TYPE villi_cloudsim_api_errors_total counter"]
        lines += [f'villi_cloudsim_api_errors_total{{action="{a}"}} {self.errors[a]}'
                  for a in ACTIONS]
        lines += ["# HELP villi_cloudsim_interfaces Network interfaces that exist.",
                  "# TYPE villi_cloudsim_interfaces gauge",
                  f"villi_cloudsim_interfaces {len(self.cloud.interfaces)}"]
        return web.Response(text="\n".join(lines) + "\n")

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "simulator": True})


def _error(exc: SimError) -> web.Response:
    return web.json_response({"Error": {"Code": exc.code, "Message": exc.message}},
                             status=exc.status)


def load_topology(cloud: Cloud, doc: Any, *, where: str = "topology") -> None:
    """Create instance types and subnets from a topology document::

        {"instanceTypes": [{"name": "m5.large", "maxInterfaces": 3, "ipsPerInterface": 10}],
         "subnets": [{"id": "subnet-a", "cidr": "10.70.0.0/24", "tags": {"k": "v"}}]}

    Raises ValueError naming the entry and field that is wrong; nothing is created then.
    """
    staged = Cloud()
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: must be an object")
    unknown = set(doc) - {"instanceTypes", "subnets"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    for i, t in enumerate(doc.get("instanceTypes") or []):
        at = f"{where}: instanceTypes[{i}]"
        try:
            staged.add_instance_type(str(t["name"]), int(t["maxInterfaces"]),
                                     int(t["ipsPerInterface"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{at}: needs name, maxInterfaces, ipsPerInterface ({exc})"
                             ) from None
        except SimError as exc:
            raise ValueError(f"{at}: {exc.message}") from None
    for i, s in enumerate(doc.get("subnets") or []):
        at = f"{where}: subnets[{i}]"
        if not isinstance(s, dict) or "cidr" not in s:
            raise ValueError(f"{at}: needs a cidr")
        try:
            staged.add_subnet(str(s["cidr"]), subnet_id=s.get("id"), tags=s.get("tags"))
        except SimError as exc:
            raise ValueError(f"{at}.cidr: {exc.message}") from None
    cloud.instance_types.update(staged.instance_types)
    for subnet in staged.subnets.values():
        cloud.add_subnet(str(subnet.cidr), subnet_id=subnet.id, tags=subnet.tags)


async def serve(server: CloudSimServer, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start serving ``server``; returns the runner (``await runner.cleanup()`` stops
    it) and the port actually bound (``port=0`` picks a free one)."""
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server_obj = site._server  # aiohttp exposes no public accessor for the bound port
    sockets = getattr(server_obj, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, int(bound)
