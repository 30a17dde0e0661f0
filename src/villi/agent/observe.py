"""The agent's observability: flow context, flow API routes, Prometheus endpoints.

Each piece takes the collaborators it reads (endpoint manager, ipcache, identity cache,
policy, services) rather than the agent: :class:`AgentFlowContext` implements the
observer's ``FlowContext`` Protocol from them.
"""

from __future__ import annotations

import collections
import json
import logging
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from villi.agent.config import AgentConfig
from villi.agent.metrics_http import MetricsServer
from villi.endpoint.manager import Endpoint
from villi.errors import BadRequest
from villi.identity.labels import CLUSTER_LABEL
from villi.kvstore.schema import IpcacheEntry
from villi.observer.context import PodInfo, PolicyRef
from villi.observer.filters import FilterError, FilterSpec
from villi.observer.metrics import HubbleMetrics
from villi.observer.metricsconfig import parse as parse_metrics
from villi.observer.observer import Observer
from villi.observer.vocab import DIRECTIONS, drop_reason_name

log = logging.getLogger(__name__)


class LocalEndpoints(Protocol):
    """This node's endpoints (``villi.endpoint.manager.EndpointManager``)."""

    @property
    def endpoints(self) -> Mapping[int, Endpoint]: ...
    def by_ip(self, ipv4: str) -> Endpoint | None: ...


class RemotePods(Protocol):
    """Every pod of the cluster (``villi.agent.sync.IpcacheSync``)."""

    @property
    def entries(self) -> Mapping[str, IpcacheEntry]: ...
    @property
    def departed(self) -> Mapping[str, IpcacheEntry]: ...


class Identities(Protocol):
    def get(self, identity: int) -> Any: ...
    def items(self) -> Any: ...


class AgentFlowContext:
    """Names for flows, from the agent's live state (plus recently departed pods)."""

    def __init__(self, node: str, cluster: str, endpoints: LocalEndpoints,
                 remote: RemotePods, identities: Identities, resolver: Any,
                 service_of: Callable[[str, int], tuple[str, str] | None],
                 state_path: Path) -> None:
        self.node = node
        self.cluster = cluster
        self.endpoints = endpoints
        self.remote = remote
        self.identities = identities
        self.resolver = resolver
        self._service_of = service_of
        self.state_path = state_path
        self.observer: Observer | None = None   # set by build_observer
        self.gone: collections.OrderedDict[str, PodInfo] = collections.OrderedDict()
        self._ifnames: dict[int, str] = {}
        self._learned_cache: tuple[int, dict[str, set[str]]] | None = None

    def forget(self, ip: str, info: PodInfo | None) -> None:
        if info is None:
            return
        self.gone[ip] = info
        if self.observer is not None:
            self.observer.metrics.forget_pod(info.namespace, info.name, ip)
        while len(self.gone) > 1024:
            self.gone.popitem(last=False)

    def forget_endpoint(self, ep: Endpoint) -> None:
        """A local endpoint is going away: its flows keep its name for a while."""
        self.forget(ep.ipv4, self.pod_of(ep.ipv4))

    def node_name(self) -> str:
        return self.node

    def identity_labels(self, identity: int) -> list[str]:
        labels = self.identities.get(identity)
        return [str(lbl) for lbl in labels] if labels is not None else []

    def _local(self) -> dict[str, PodInfo]:
        return {ep.ipv4: PodInfo(ep.namespace, ep.pod_name, ep.id, self.node,
                                 ep.pod_mac, ep.host_mac)
                for ep in self.endpoints.endpoints.values()}

    def _remote(self) -> dict[str, PodInfo]:
        sync = self.remote
        return {ip: _pod_info(d) for ip, d in {**sync.departed, **sync.entries}.items()}

    def pod_of(self, ip: str) -> PodInfo | None:
        ep = self.endpoints.by_ip(ip)
        if ep is not None:
            return PodInfo(ep.namespace, ep.pod_name, ep.id, self.node,
                           ep.pod_mac, ep.host_mac)
        sync = self.remote
        d = sync.entries.get(ip) or sync.departed.get(ip)
        if d is not None:
            return _pod_info(d)
        return self.gone.get(ip)

    def all_pods(self) -> dict[str, PodInfo]:
        return {**self.gone, **self._remote(), **self._local()}

    def all_identities(self) -> dict[int, list[str]]:
        return {int(i): [str(lbl) for lbl in labels]
                for i, labels in self.identities.items()}

    def policy_of(self, cookie: int) -> PolicyRef | None:
        info = self.resolver.cookie_info(cookie)
        if info is None:
            return None
        return PolicyRef(info.kind, info.namespace, info.name, info.direction, info.rule_index)

    def service_of(self, ip: str, port: int) -> tuple[str, str] | None:
        return self._service_of(ip, port)

    def _learned(self) -> dict[str, set[str]]:
        """ip → names from the DNS proxy's cache file, re-read only when it changed."""
        from villi.agent.fqdn import cache_path, learned_names

        path = cache_path(self.state_path)
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            return {}
        cached = self._learned_cache
        if cached is None or cached[0] != mtime:
            cached = (mtime, learned_names(path))
            self._learned_cache = cached
        return cached[1]

    def names_of(self, ip: str) -> list[str]:
        """DNS names pods of this node resolved to ``ip`` (``destination_names``)."""
        return sorted(self._learned().get(ip, ()))

    def fqdn_ips(self, pattern: str) -> list[str]:
        """IPs the node's DNS proxy learned for names matching ``pattern`` (``--fqdn``)."""
        import fnmatch

        want = pattern.lower().rstrip(".")
        return [ip for ip, names in self._learned().items()
                if any(fnmatch.fnmatchcase(n.rstrip("."), want) for n in names)]

    def interface_name(self, ifindex: int) -> str:
        """The name of an interface of the agent's namespace (cached; "" if gone)."""
        name = self._ifnames.get(ifindex)
        if name is None:
            try:
                name = socket.if_indextoname(ifindex)
            except OSError:
                name = ""
            if len(self._ifnames) > 4096:
                self._ifnames.clear()
            self._ifnames[ifindex] = name
        return name

    def cluster_name(self, identity: int) -> str:
        """The cluster of an endpoint with ``identity``: its cluster label (a remote
        cluster's pods carry theirs), else this node's cluster (reserved identities)."""
        labels = self.identities.get(identity)
        for lbl in labels or ():
            if lbl.key == CLUSTER_LABEL and lbl.value:
                return lbl.value
        return self.cluster

    def node_labels(self) -> list[str]:
        return [f"kubernetes.io/hostname={self.node}",
                f"io.cilium.cluster={self.cluster}"]


def _pod_info(d: IpcacheEntry) -> PodInfo:
    return PodInfo(d.namespace, d.pod_name, d.endpoint_id, d.node)


class DatapathCollector:
    """Reads the datapath's counters at scrape time (no polling in between)."""

    def __init__(self, datapath: Any, ipam: Any, endpoints: LocalEndpoints) -> None:
        self.datapath = datapath
        self.ipam = ipam
        self.endpoints = endpoints

    def collect(self) -> Any:
        # Counters: the datapath's per-CPU totals only grow (rate() must work on them).
        drops = CounterMetricFamily("villi_datapath_drop",
                                    "Packets dropped by the datapath (since the maps were made)",
                                    labels=["reason", "direction"])
        fwd = CounterMetricFamily("villi_datapath_forward",
                                  "Packets forwarded by the datapath", labels=["direction"])
        try:
            totals = self.datapath.metrics_totals()
        except Exception:  # noqa: BLE001 - a scrape must not crash on a closing agent
            totals = {}
        for (reason, direction), (pkts, _bytes) in sorted(totals.items()):
            d = DIRECTIONS.get(direction, str(direction)).lower()
            if reason:
                drops.add_metric([drop_reason_name(reason), d], pkts)
            else:
                fwd.add_metric([d], pkts)
        yield drops
        yield fwd
        yield from _cilium_datapath(totals)
        usage = self.ipam.usage()
        ips = GaugeMetricFamily("villi_ipam_ips", "Pod IPs by state", labels=["type"])
        ips.add_metric(["allocated"], usage["allocated"])
        ips.add_metric(["available"], usage["free"])
        yield ips
        cap = GaugeMetricFamily("villi_ipam_capacity", "Pod IPs this node can allocate")
        cap.add_metric([], usage["capacity"])
        yield cap
        eps = GaugeMetricFamily("villi_endpoint_count", "Local endpoints")
        eps.add_metric([], len(self.endpoints.endpoints))
        yield eps
        pressure = GaugeMetricFamily("villi_bpf_map_pressure",
                                     "Fill level of BPF maps (entries / max entries)",
                                     labels=["map_name"])
        for name, tm in (("villi_endpoints", self.datapath.endpoints),
                         ("villi_ipcache", self.datapath.ipcache)):
            try:
                n = sum(1 for _ in tm.map.keys_raw())
                pressure.add_metric([name], n / max(1, tm.map.max_entries))
            except Exception:  # noqa: BLE001
                continue
        yield pressure
        cilium_pressure = GaugeMetricFamily("cilium_bpf_map_pressure", "Fill level of BPF "
                                            "maps (Cilium's name)", labels=["map_name"])
        for smp in pressure.samples:
            cilium_pressure.add_metric([smp.labels["map_name"]], smp.value)
        yield cilium_pressure
        lost = CounterMetricFamily("villi_events_lost",
                                   "Flow events the datapath could not queue (ringbuf full)")
        lost.add_metric([], self.datapath.events_lost())
        yield lost


def _cilium_datapath(totals: dict[tuple[int, int], tuple[int, int]]) -> Any:
    """The datapath counters under the names Cilium users alert on: reason is the human
    text ("Policy denied"), direction INGRESS/EGRESS."""
    from prometheus_client.core import CounterMetricFamily

    from villi.observer.vocab import drop_reason_text

    fams = {name: CounterMetricFamily(f"cilium_{name}", f"{what} (Cilium's name)",
                                      labels=labels)
            for name, what, labels in (
                ("drop_count", "Packets dropped by the datapath", ["reason", "direction"]),
                ("drop_bytes", "Bytes dropped by the datapath", ["reason", "direction"]),
                ("forward_count", "Packets forwarded by the datapath", ["direction"]),
                ("forward_bytes", "Bytes forwarded by the datapath", ["direction"]))}
    for (reason, direction), (pkts, nbytes) in sorted(totals.items()):
        d = DIRECTIONS.get(direction, str(direction))
        if reason:
            fams["drop_count"].add_metric([drop_reason_text(reason), d], pkts)
            fams["drop_bytes"].add_metric([drop_reason_text(reason), d], nbytes)
        else:
            fams["forward_count"].add_metric([d], pkts)
            fams["forward_bytes"].add_metric([d], nbytes)
    yield from fams.values()


class CiliumAliases:
    """villi's own agent metrics again under Cilium's names, read at scrape time.

    One source of truth (villi's metric) and no second increment in the hot paths;
    labels Cilium has and villi does not know (kvstore ``kind``/``scope``) are empty.
    """

    def __init__(self, renames: list[tuple[Any, str, dict[str, str]]]) -> None:
        self.renames = renames

    def collect(self) -> Any:
        from prometheus_client.core import Metric

        for metric, new, extra in self.renames:
            for fam in metric.collect():
                out = Metric(new, fam.documentation + " (Cilium's name)", fam.type)
                for smp in fam.samples:
                    out.add_sample(new + smp.name[len(fam.name):], {**smp.labels, **extra},
                                   smp.value)
                yield out


class AgentMetrics:
    def __init__(self, datapath: Any, ipam: Any, endpoints: LocalEndpoints) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.regenerations = Counter("villi_endpoint_regenerations_total",
                                     "Endpoint policy regenerations", ["outcome"], registry=r)
        self.regeneration_seconds = Histogram(
            "villi_policy_regeneration_seconds", "Time from a policy input change to its "
            "map diff written", registry=r,
            buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.kvstore_ops = Histogram(
            "villi_kvstore_operations_duration_seconds", "Duration of kvstore operations",
            ["action", "outcome"], registry=r,
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
        r.register(DatapathCollector(datapath, ipam, endpoints))
        # Incremented by the L7 proxy for each request its rules decide (Cilium's name).
        self.policy_l7 = Counter("cilium_policy_l7", "L7 requests decided by policy",
                                 ["rule", "proxy_type"], registry=r)
        r.register(CiliumAliases([
            (self.regenerations, "cilium_endpoint_regenerations", {}),
            (self.kvstore_ops, "cilium_kvstore_operations_duration_seconds",
             {"kind": "", "scope": ""})]))


def build_observer(cfg: AgentConfig, datapath: Any, ctx: AgentFlowContext) -> Observer:
    export_filter = FilterSpec.from_json(cfg.extra.get("flow_export_filter"))
    obs = Observer(ctx, events=datapath.events, capacity=cfg.flows_capacity,
                   metrics=HubbleMetrics(config=parse_metrics(cfg.hubble_metrics), ctx=ctx),
                   kernel_lost=datapath.events_lost,
                   export_path=cfg.flow_export, export_filter=export_filter)
    ctx.observer = obs
    return obs


async def start_metrics_servers(cfg: AgentConfig, agent_registry: CollectorRegistry,
                                flow_registry: CollectorRegistry) -> list[MetricsServer]:
    """Prometheus on TCP (in the agent's network namespace): 9962 agent, 9965 flows.
    Bounded connections and timeouts: see ``villi.agent.metrics_http``."""
    servers = []
    for port, registry in ((cfg.metrics_port, agent_registry),
                           (cfg.hubble_metrics_port, flow_registry)):
        if port:
            server = MetricsServer(registry, port)
            try:
                await server.start()
            except OSError as e:
                log.warning("metrics port %d: %s", port, e)
                continue
            servers.append(server)
    return servers


def _int(q: Any, name: str) -> int | None:
    v = q.get(name)
    if v in (None, ""):
        return None
    try:
        return int(v)
    except ValueError:
        raise BadRequest(f"{name} must be an integer") from None   # answered 400


def flow_routes(observer: Observer) -> list[tuple[str, str, Any]]:
    async def flows(request: web.Request) -> web.StreamResponse:
        q = request.query
        try:
            spec = FilterSpec.from_json(json.loads(q.get("filter", "[]")))
        except (ValueError, FilterError) as e:
            raise BadRequest(f"bad filter: {e}") from None
        last, first = _int(q, "last"), _int(q, "first")
        since, until = _int(q, "since"), _int(q, "until")
        follow = q.get("follow") in ("1", "true")
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        try:
            if follow:
                async for flow in observer.follow(spec, last=last or 0):
                    await resp.write((json.dumps(flow) + "\n").encode())
            else:
                out = observer.query(spec, last=20 if last is None else last,
                                           first=first, since_ns=since, until_ns=until)
                await resp.write("".join(json.dumps(f) + "\n" for f in out).encode())
        except (ConnectionResetError, FilterError) as e:
            log.debug("flow stream ended: %s", e)
        await resp.write_eof()
        return resp

    async def flow_status(request: web.Request) -> web.Response:
        return web.json_response(observer.status())

    return [("GET", "/v1/flows", flows), ("GET", "/v1/flows/status", flow_status)]


def now_ns() -> int:
    return time.time_ns()
