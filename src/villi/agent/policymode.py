"""The node's policy enforcement mode, audit mode and degradation, kept in the datapath.

The agent writes the settings in force (``villi.policy.modes``: flags, then the cluster's,
then the node's setting in the kvstore) into the pinned ``villi_policy_cfg`` slots, and
per-endpoint audit into each endpoint's flags; the programs read them for every
decision (bpf/lib/policy.h). Everything is datapath state on purpose: the node keeps
enforcing, auditing or being degraded exactly as it was while the agent is down.

The last-resort switch (``villi datapath policy degrade``) has its own slot, which only
the switch writes: an agent that starts on a degraded node leaves it degraded, says so
loudly (log, ``villi status``, a metric) and never undoes it; ``restore`` does.

Wiring (in the agent's composition root): ``PolicyModes(node, datapath.policy_cfg,
endpoints, flags)`` right after the datapath is loaded, ``await modes.follow(store,
spawn)`` once the kvstore is up (before policy is regenerated), ``modes.status()`` in
the health view, ``modes.endpoint_policy(ep)`` in the endpoint view, ``modes.routes()``
among the API routes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from villi.datapath import abi
from villi.datapath.policycfg import PolicyConfigMap
from villi.endpoint.manager import Endpoint
from villi.errors import BadRequest, EndpointNotFound, VilliError
from villi.kvstore import EventType, Store
from villi.kvstore.sync import PrefixSync
from villi.policy.modes import (
    CLUSTER_CONFIG_KEY,
    CONFIG_PREFIX,
    ENDPOINT_SETTINGS,
    Effective,
    PolicySettings,
    SettingError,
    direction_text,
    effective,
    node_config_key,
    parse_assignments,
)

log = logging.getLogger(__name__)


class EndpointStore(Protocol):
    """What policy modes need of the endpoint manager."""

    endpoints: dict[int, Endpoint]

    def set_policy_audit(self, endpoint_id: int, audit: bool) -> Endpoint: ...


class PolicyModes:
    """Settings in force on this node, written to the datapath and reported."""

    def __init__(self, node: str, cfg: PolicyConfigMap, endpoints: EndpointStore,
                 flags: PolicySettings) -> None:
        self.node = node
        self.cfg = cfg
        self.endpoints = endpoints
        self.flags = flags
        self.cluster = PolicySettings()
        self.node_layer = PolicySettings()
        self.errors: dict[str, str] = {}      # key -> why its value was not used
        self.synced = asyncio.Event()
        since = cfg.get(abi.POLICY_CFG_DEGRADED)
        if since:
            log.error("POLICY IS DEGRADED on node %s since %s (villi datapath policy "
                      "degrade): packets policy would drop are forwarded and reported as "
                      "AUDIT. The agent keeps it so; `villi datapath policy restore --node "
                      "%s` ends it.", node, _when(since), node)

    # --- settings in force ----------------------------------------------------------------
    @property
    def effective(self) -> Effective:
        return effective(self.flags, self.cluster, self.node_layer)

    def apply(self) -> None:
        """Write the settings in force into the datapath (never the switch's slot)."""
        eff = self.effective
        self.cfg.set(abi.POLICY_CFG_ENFORCEMENT,
                     int(abi.Enforcement[eff.enable_policy.upper()]))
        self.cfg.set(abi.POLICY_CFG_AUDIT, int(eff.audit))
        if not eff.cluster_degraded:
            self.cfg.set(abi.POLICY_CFG_CLUSTER_DEGRADED, 0)
        elif not self.cfg.get(abi.POLICY_CFG_CLUSTER_DEGRADED):
            self.cfg.set(abi.POLICY_CFG_CLUSTER_DEGRADED, int(time.time()))

    async def follow(self, store: Store, spawn: Callable[[Coroutine[Any, Any, None], str],
                                                         object]) -> None:
        """Apply the kvstore's settings, then follow them; until this runs the datapath
        keeps the settings it had (a restart changes nothing in between)."""
        listing = await store.list(CONFIG_PREFIX)
        for kv in listing.items:
            self._take(kv.key, kv.value)
        self._changed()
        self.synced.set()
        spawn(self._run(store), "policy-modes")

    async def _run(self, store: Store) -> None:
        async for event in PrefixSync(store, CONFIG_PREFIX):
            if self._take(event.key, None if event.type is EventType.DELETE else event.value):
                self._changed()

    def _take(self, key: str, raw: bytes | None) -> bool:
        """Record one stored layer; False when the key is not this node's business or
        its value is bad (logged, reported in the status, previous settings kept)."""
        mine = node_config_key(self.node)
        if key not in (CLUSTER_CONFIG_KEY, mine):
            return False
        try:
            layer = PolicySettings.from_bytes(raw, f"kvstore key {key}")
        except SettingError as e:
            log.error("ignoring %s (keeping the previous settings)", e)
            self.errors[key] = str(e)
            return False
        self.errors.pop(key, None)
        if key == mine:
            self.node_layer = layer
        else:
            self.cluster = layer
        return True

    def _changed(self) -> None:
        before = self.cfg.read()
        self.apply()
        after = self.cfg.read()
        if before != after:
            log.info("policy settings on %s: %s", self.node, self.effective.as_dict())

    # --- views ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        sw = self.cfg.read()
        out: dict[str, Any] = {**self.effective.as_dict(), "datapath": sw.as_dict(),
                               "degraded": sw.degraded}
        if sw.degraded:
            out["status"] = "DEGRADED"
            out["message"] = (
                f"policy is DEGRADED since {_when(sw.degraded_since)}: what policy would "
                "drop is forwarded and reported as AUDIT; end it with `villi datapath "
                f"policy restore --node {self.node}`" if sw.degraded_since else
                "policy is DEGRADED cluster-wide (villi policy degrade --all): end it with "
                "`villi policy restore --all`")
        else:
            out["status"] = "ok"
        if self.errors:
            out["errors"] = dict(self.errors)
        return out

    def endpoint_policy(self, ep: Endpoint) -> dict[str, Any]:
        """The ``policy`` part of an endpoint's view: what is in force, per direction."""
        eff = self.effective
        sw = self.cfg.read()
        audit = eff.audit or ep.policy_audit
        return {
            "ingress": direction_text(ep.ingress_enforced, eff.enable_policy, audit,
                                      sw.degraded),
            "egress": direction_text(ep.egress_enforced, eff.enable_policy, audit,
                                     sw.degraded),
            "enforcement": eff.enable_policy,
            "auditMode": audit,
            "auditSource": "endpoint" if ep.policy_audit else
            (eff.audit_source if eff.audit else None),
            "degraded": sw.degraded,
        }

    # --- API ------------------------------------------------------------------------------
    def configure_endpoint(self, ep: Endpoint, changes: dict[str, Any]) -> Endpoint:
        try:
            parsed = parse_assignments([f"{k}={v}" for k, v in changes.items()],
                                       ENDPOINT_SETTINGS)
        except SettingError as e:
            raise ConfigRequestError(str(e)) from None
        audit = parsed.get("PolicyAuditMode")
        if audit is not None:
            ep = self.endpoints.set_policy_audit(ep.id, audit == "enabled")
            log.info("endpoint %d (%s/%s): policy audit mode %s", ep.id, ep.namespace,
                     ep.pod_name, audit)
        return ep

    def routes(self, find: Callable[[str], Endpoint | None],
               view: Callable[[Endpoint], dict[str, Any]]) -> list[tuple[str, str, Any]]:
        """``GET /v1/config`` (this node's policy settings) and ``PATCH
        /v1/config/endpoint/{id}`` (``{"PolicyAuditMode": "enabled"}``)."""
        from aiohttp import web

        async def get_config(request: web.Request) -> web.Response:
            return web.json_response(self.status())

        async def patch_endpoint(request: web.Request) -> web.Response:
            body = await request.json()
            if not isinstance(body, dict) or not body:   # errors: the API's middleware
                raise BadRequest('body: a JSON object of settings, e.g. '
                                 '{"PolicyAuditMode": "enabled"}')
            ep = find(request.match_info["id"])
            if ep is None:
                raise EndpointNotFound(f"no endpoint {request.match_info['id']} "
                                       f"on node {self.node}")
            return web.json_response(view(self.configure_endpoint(ep, body)))

        return [("GET", "/v1/config", get_config),
                ("PATCH", "/v1/config/endpoint/{id:.+}", patch_endpoint)]


class ConfigRequestError(BadRequest):
    """A bad endpoint setting in an API request (HTTP 400 through the API's middleware)."""


def _when(since: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since))


class PolicyModesCollector:
    """``villi_policy_degraded``, ``villi_policy_audit_mode`` and
    ``villi_policy_enforcement_mode`` gauges, read from the datapath at scrape time."""

    def __init__(self, modes: PolicyModes) -> None:
        self.modes = modes

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        try:
            sw = self.modes.cfg.read()
        except VilliError:
            return
        deg = GaugeMetricFamily("villi_policy_degraded", "1 while policy is degraded on this "
                                "node (last-resort switch or villi policy degrade --all): "
                                "policy drops are forwarded and reported as AUDIT",
                                labels=["source"])
        deg.add_metric(["node"], 1 if sw.degraded_since else 0)
        deg.add_metric(["cluster"], 1 if sw.cluster_degraded else 0)
        yield deg
        since = GaugeMetricFamily("villi_policy_degraded_since_seconds",
                                  "Unix time the node's last-resort switch was thrown (0: not)")
        since.add_metric([], sw.degraded_since)
        yield since
        audit = GaugeMetricFamily("villi_policy_audit_mode", "1 while the node is in policy "
                                  "audit mode (endpoints may also be, one by one)")
        audit.add_metric([], 1 if sw.audit else 0)
        yield audit
        mode = GaugeMetricFamily("villi_policy_enforcement_mode",
                                 "The enforcement mode in force (1 for the current one)",
                                 labels=["mode"])
        for name in ("default", "always", "never"):
            mode.add_metric([name], 1 if sw.enforcement == name else 0)
        yield mode


__all__ = ["PolicyModes", "PolicyModesCollector"]
