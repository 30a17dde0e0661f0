"""Hubble's flow metrics, counted per batch with numpy (one group-by per metric).

Names and labels follow Hubble (``hubble_flows_processed_total{type,subtype,verdict}``,
``hubble_drop_total{reason,protocol}`` …) so existing dashboards keep working. Which
metrics exist and which context labels they carry (``sourceContext``,
``destinationContext``, ``labelsContext``) come from ``--hubble-metrics``
(:mod:`villi.observer.metricsconfig`). Context values are computed once per distinct
(address, identity) of a batch, not per record. Each metric lives in the registry the
agent serves on ``--hubble-metrics-port`` (9965).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from villi.observer.context import FlowContext
from villi.observer.dns import RCODE_LABELS
from villi.observer.metricsconfig import MetricOptions, MetricsConfig, parse
from villi.observer.vocab import (
    ICMP_TYPES,
    MATCH_TYPES,
    METRIC_TYPES,
    OBS_SUBTYPES,
    PROTOCOLS,
    RESERVED_NAMES,
    TCP_FLAGS,
    drop_reason_name,
)

WORLD = 2
Column = tuple[np.ndarray, list[str]]   # codes per record, the string of each code


def _groups(*cols: np.ndarray) -> list[tuple[tuple[int, ...], int]]:
    """(values, count) of each distinct combination of the given columns.

    The columns are packed into one uint64 key, each in just the bits its largest value
    needs, so the group-by is a single 1-D ``np.unique`` — several times faster than
    ``np.unique(axis=0)``, which is left for keys wider than 64 bits.
    """
    if not len(cols[0]):
        return []
    widths = [max(1, int(c.max()).bit_length()) for c in cols]
    if sum(widths) > 64:
        stacked = np.stack([c.astype(np.int64) for c in cols], axis=1)
        uniq, counts = np.unique(stacked, axis=0, return_counts=True)
        return [(tuple(int(v) for v in row), int(n))
                for row, n in zip(uniq.tolist(), counts.tolist(), strict=True)]
    key = np.zeros(len(cols[0]), dtype=np.uint64)
    for c, w in zip(cols, widths, strict=True):
        key = (key << np.uint64(w)) | c.astype(np.uint64)
    uniq, counts = np.unique(key, return_counts=True)
    out = []
    for k, n in zip(uniq.tolist(), counts.tolist(), strict=True):
        vals = []
        for w in reversed(widths):
            vals.append(k & ((1 << w) - 1))
            k >>= w
        out.append((tuple(reversed(vals)), n))
    return out


def _ip(raw: int) -> str:
    from villi.observer.flow import ip_str

    return ip_str(raw)


class _Contexts:
    """Context label values of one batch, computed per distinct (ip, identity)."""

    def __init__(self, rec: np.ndarray, ctx: FlowContext | None) -> None:
        self.rec, self.ctx = rec, ctx
        self._cache: dict[tuple[str, tuple[str, ...]], Column] = {}

    def _value(self, kind: str, ip: str, identity: int) -> str:
        ctx = self.ctx
        pod = ctx.pod_of(ip) if ctx is not None else None
        if kind == "ip":
            return ip
        if kind == "identity":
            return str(identity)
        if kind == "reserved-identity":
            return f"reserved:{RESERVED_NAMES[identity]}" if identity in RESERVED_NAMES else ""
        if kind == "namespace":
            return pod.namespace if pod else ""
        if kind == "pod":
            return f"{pod.namespace}/{pod.name}" if pod else ""
        if kind == "pod-name":
            return pod.name if pod else ""
        if kind in ("app", "workload-name", "workload"):
            # villi has no controllers: a workload is named by its app label
            labels = ctx.identity_labels(identity) if ctx is not None else []
            app = next((lbl.split("=", 1)[1] for lbl in labels
                        if lbl.partition(":")[2].startswith("app=")), "")
            if kind == "workload" and app and pod:
                return f"{pod.namespace}/{app}"
            return app
        return ""   # dns: villi has no DNS names for addresses

    def column(self, side: str, kinds: tuple[str, ...]) -> Column:
        """``side`` is "src" or "dst"; the first non-empty of ``kinds`` wins."""
        cached = self._cache.get((side, kinds))
        if cached is not None:
            return cached
        rec = self.rec
        key = (rec[f"{side}_ip"].astype(np.uint64) << np.uint64(32)) | \
            rec[f"{side}_identity"].astype(np.uint64)
        uniq, inverse = np.unique(key, return_inverse=True)
        strings = []
        for k in uniq.tolist():
            ip, identity = _ip(k >> 32), k & 0xFFFFFFFF
            strings.append(next((v for v in (self._value(kd, ip, identity) for kd in kinds)
                                 if v), ""))
        values = sorted(set(strings))
        index = {s: i for i, s in enumerate(values)}
        codes = np.array([index[s] for s in strings], dtype=np.uint32)[inverse.ravel()]
        self._cache[(side, kinds)] = (codes, values)
        return codes, values

    def columns(self, opts: MetricOptions) -> list[Column]:
        cols = []
        if opts.source_context:
            cols.append(self.column("src", opts.source_context))
        if opts.destination_context:
            cols.append(self.column("dst", opts.destination_context))
        for label in opts.labels_context:
            if label == "traffic_direction":
                cols.append((self.rec["direction"].astype(np.uint32), ["ingress", "egress"]))
                continue
            side, _, what = label.partition("_")
            kind = {"ip": "ip", "namespace": "namespace", "pod": "pod-name", "app": "app",
                    "workload": "workload-name", "workload_kind": ""}[what]
            if not kind:   # no controllers in villi
                cols.append((np.zeros(len(self.rec), dtype=np.uint32), [""]))
            else:
                cols.append(self.column("src" if side == "source" else "dst", (kind,)))
        return cols


def _names_pod(labels: tuple[str, ...], kinds: list[set[str]], values: dict[str, str]
               ) -> bool:
    """Whether one of a series' context labels holds the pod's value of its kind."""
    ctx = labels[len(labels) - len(kinds):]
    return any(v and any(values.get(k) == v for k in ks)
               for v, ks in zip(ctx, kinds, strict=True))


def _label_kinds(opts: MetricOptions) -> list[set[str]]:
    """Per context label of a metric, the context kinds its value may be (for expiry)."""
    out = [set(chain) for chain in (opts.source_context, opts.destination_context) if chain]
    for label in opts.labels_context:
        what = label.partition("_")[2]
        out.append({"ip": {"ip"}, "pod": {"pod-name"}}.get(what, set()))
    return out


class HubbleMetrics:
    def __init__(self, registry: CollectorRegistry | None = None,
                 config: MetricsConfig | None = None, ctx: FlowContext | None = None
                 ) -> None:
        self.registry = registry or CollectorRegistry()
        self.config = config or parse(None)
        self.ctx = ctx
        r, cfg = self.registry, self.config
        # series that carry context labels: {counter: (kinds per context label, {labels})}
        self._series: dict[Any, tuple[list[set[str]], set[tuple[str, ...]]]] = {}
        self._kinds: dict[Any, list[set[str]]] = {}

        def counter(metric: str, name: str, doc: str, labels: list[str]) -> Any:
            if not cfg.enabled(metric):
                return None
            return Counter(name, doc, labels + cfg.options(metric).context_labels(),
                           registry=r)

        self.flows = counter("flow", "hubble_flows_processed_total", "Flows processed",
                             ["type", "subtype", "verdict"])
        self.drops = counter("drop", "hubble_drop_total", "Dropped packets",
                             ["reason", "protocol"])
        self.tcp_flags = counter("tcp", "hubble_tcp_flags_total", "TCP flag occurrences",
                                 ["flag", "family"])
        self.ports = counter("port-distribution", "hubble_port_distribution_total",
                             "Destination ports", ["protocol", "port"])
        self.icmp = counter("icmp", "hubble_icmp_total", "ICMP messages", ["family", "type"])
        self.policy = counter("policy", "hubble_policy_verdicts_total", "Policy verdicts",
                              ["direction", "match", "action"])
        world = cfg.options("flows-to-world")
        self.to_world = counter("flows-to-world", "hubble_flows_to_world_total",
                                "Flows to reserved:world (new connections)",
                                ["protocol", "verdict"] + (["port"] if "port" in world.flags
                                                           else []))
        self.lost = Counter("hubble_lost_events_total", "Events lost", ["source"], registry=r)
        http = "httpV2" if cfg.enabled("httpV2") else "http" if cfg.enabled("http") else None
        http_ctx = cfg.options(http).context_labels() if http else []
        # Hubble's two HTTP handlers: ``http`` (v1) counts requests {method, protocol,
        # reporter} and responses {method, status, reporter}; ``httpV2`` counts one
        # requests series per response {method, protocol, status, reporter}.
        self.http_v1 = http == "http"
        self.http_requests = Counter(
            "hubble_http_requests_total", "HTTP requests (L7 flows)",
            ["method", "protocol"] + ([] if self.http_v1 else ["status"]) + ["reporter"]
            + http_ctx, registry=r) if http else None
        self.http_responses = Counter(
            "hubble_http_responses_total", "HTTP responses (L7 flows)",
            ["method", "status", "reporter"] + http_ctx,
            registry=r) if self.http_v1 else None
        self.http_duration = Histogram(
            "hubble_http_request_duration_seconds", "HTTP request latency (L7 flows)",
            ["method", "reporter"] + http_ctx, registry=r) if http else None
        self.dns_queries = counter("dns", "hubble_dns_queries_total", "DNS queries",
                                   ["rcode", "qtypes", "ips_returned"])
        self.dns_responses = counter("dns", "hubble_dns_responses_total", "DNS responses",
                                     ["rcode", "qtypes", "ips_returned"])
        self.dns_response_types = counter("dns", "hubble_dns_response_types_total",
                                          "DNS response types", ["type", "qtypes"])

    # --- series of departed pods ----------------------------------------------------------
    def _remember(self, counter: Any, n_ctx: int, labels: list[str]) -> None:
        if n_ctx:
            kinds = self._kinds.get(counter)
            if kinds is None:
                kinds = self._kinds[counter] = _label_kinds(
                    self.config.options(self._metric_of(counter)))
            self._series.setdefault(counter, (kinds, set()))[1].add(tuple(labels))

    def _metric_of(self, counter: Any) -> str:
        names = {"flows": "flow", "drops": "drop", "tcp_flags": "tcp",
                 "ports": "port-distribution", "icmp": "icmp", "policy": "policy",
                 "to_world": "flows-to-world", "dns_queries": "dns", "dns_responses": "dns",
                 "dns_response_types": "dns",
                 "http_requests": "httpV2" if self.config.enabled("httpV2") else "http"}
        for attr, metric in names.items():
            if getattr(self, attr, None) is counter:
                return metric
        return ""

    def forget_pod(self, namespace: str, name: str, ip: str, delay: float = 60.0) -> None:
        """Drop the series whose context labels name this pod ``delay`` seconds from now
        (Hubble's cardinality control: a deleted pod's series go after about a minute).
        Series keyed by app or namespace stay: the workload outlives the pod."""
        values = {"pod": f"{namespace}/{name}", "pod-name": name, "ip": ip}
        try:
            asyncio.get_running_loop().call_later(delay, self.expire, values)
        except RuntimeError:      # no loop (tests, tools): expire now
            self.expire(values)

    def expire(self, values: dict[str, str]) -> int:
        """Remove every context series whose pod, pod-name or ip label has the pod's value
        (``values``: kind → value); how many."""
        removed = 0
        for counter, (kinds, series) in self._series.items():
            for labels in [lb for lb in series if _names_pod(lb, kinds, values)]:
                try:
                    counter.remove(*labels)
                except KeyError:
                    pass
                series.discard(labels)
                removed += 1
        return removed

    # --- L3/L4, per batch ---------------------------------------------------------------
    def _add(self, metric: str, counter: Any, rec: np.ndarray, mask: np.ndarray | None,
             base: list[np.ndarray], fmt: list[Callable[[int], str]],
             ctxs: _Contexts) -> None:
        """Group ``rec[mask]`` by ``base`` columns (+ the metric's context columns) and
        add each group's count to ``counter``."""
        extra = ctxs.columns(self.config.options(metric))
        if mask is not None:
            base = [c[mask] for c in base]
            extra = [(codes[mask], values) for codes, values in extra]
        cols = base + [codes for codes, _ in extra]
        if not cols or not len(cols[0]):
            return
        for vals, n in _groups(*cols):
            labels = [f(v) for f, v in zip(fmt, vals, strict=False)]
            labels += [values[v] for (_, values), v in zip(extra, vals[len(base):],
                                                             strict=True)]
            counter.labels(*labels).inc(n)
            self._remember(counter, len(extra), labels)

    def count(self, rec: np.ndarray) -> None:
        if not len(rec):
            return
        verdicts = rec["event_type"] == 5
        if self.policy is not None and verdicts.any():
            self._count_policy_verdicts(rec[verdicts])
        if self.flows is not None:
            self._count_flows(rec)
        if verdicts.any():
            # The other metrics count packets' events once: a policy verdict repeats the
            # decision its trace or drop event already carries.
            rec = rec[~verdicts]
            if not len(rec):
                return
        ctxs = _Contexts(rec, self.ctx)
        dropped = (rec["drop_reason"] != 0)
        proto = lambda p: PROTOCOLS.get(p, str(p))  # noqa: E731
        if self.drops is not None:
            self._add("drop", self.drops, rec, dropped, [rec["drop_reason"], rec["protocol"]],
                      [drop_reason_name, proto], ctxs)
        if self.tcp_flags is not None:
            tcp = rec["protocol"] == 6
            for name, bit in TCP_FLAGS:
                mask = tcp & ((rec["tcp_flags"] & bit) != 0)
                if mask.any():
                    self._add_const("tcp", self.tcp_flags, rec, mask, [name, "IPv4"], ctxs)
        if self.ports is not None:
            l4 = (rec["protocol"] == 6) | (rec["protocol"] == 17) | (rec["protocol"] == 132)
            self._add("port-distribution", self.ports, rec, l4, [rec["protocol"], rec["dport"]],
                      [proto, str], ctxs)
        if self.icmp is not None:
            icmp = rec["protocol"] == 1
            self._add("icmp", self.icmp, rec, icmp, [np.ones(len(rec), dtype=np.uint8),
                                                     rec["icmp_type"]],
                      [lambda _v: "IPv4", lambda t: ICMP_TYPES.get(int(t), str(int(t)))],
                      ctxs)
        if self.to_world is not None:
            self._count_to_world(rec, dropped, ctxs)

    def _count_flows(self, rec: np.ndarray) -> None:
        """hubble_flows_processed_total{type, subtype, verdict}: every record."""
        assert self.flows is not None
        ctxs = _Contexts(rec, self.ctx)
        et, obs, reason = rec["event_type"], rec["obs_point"], rec["drop_reason"]
        verdict = np.where(reason != 0, 1, np.where(rec["audit_reason"] != 0, 2, 0))
        extra = ctxs.columns(self.config.options("flow"))
        cols = [et, obs, verdict, reason] + [c for c, _ in extra]
        for vals, n in _groups(*cols):
            e, o, d, rs = vals[:4]
            subtype = drop_reason_name(rs) if e == 1 else \
                "" if e == 5 else OBS_SUBTYPES.get(o, str(o))
            labels = [METRIC_TYPES.get(e, str(e)), subtype,
                      ("FORWARDED", "DROPPED", "AUDIT")[d],
                      *[values[v] for (_, values), v in zip(extra, vals[4:], strict=True)]]
            self.flows.labels(*labels).inc(n)
            self._remember(self.flows, len(extra), labels)

    def _count_policy_verdicts(self, rec: np.ndarray) -> None:
        """hubble_policy_verdicts_total{direction, match, action} from the datapath's
        policy-verdict events (one per connection and direction decided)."""
        action = np.where(rec["drop_reason"] != 0, 1, np.where(rec["audit_reason"] != 0, 2, 0))
        self._add("policy", self.policy, rec, np.ones(len(rec), dtype=bool),
                  [rec["direction"], rec["match_type"], action.astype(np.uint8)],
                  [lambda d: "ingress" if d == 0 else "egress",
                   lambda m: MATCH_TYPES.get(m, str(m)),
                   lambda a: ("forwarded", "dropped", "audit")[int(a)]],
                  _Contexts(rec, self.ctx))

    def _add_const(self, metric: str, counter: Any, rec: np.ndarray, mask: np.ndarray,
                   labels: list[str], ctxs: _Contexts) -> None:
        extra = ctxs.columns(self.config.options(metric))
        if not extra:
            counter.labels(*labels).inc(int(np.count_nonzero(mask)))
            return
        for vals, n in _groups(*[codes[mask] for codes, _ in extra]):
            full = [*labels, *[values[v] for (_, values), v in zip(extra, vals, strict=True)]]
            counter.labels(*full).inc(n)
            self._remember(counter, len(extra), full)

    def _count_to_world(self, rec: np.ndarray, dropped: np.ndarray, ctxs: _Contexts) -> None:
        """Hubble's flows-to-world: new connections (not replies) to reserved:world that
        were forwarded or dropped by policy (any drop with ``any-drop``); ``syn-only``
        counts only TCP SYNs, ``port`` adds the destination port."""
        opts = self.config.options("flows-to-world")
        policy_drop = (rec["drop_reason"] == 133) | (rec["drop_reason"] == 181)
        mask = (rec["dst_identity"] == WORLD) & ((rec["flags"] & 1) == 0) & \
            (~dropped | (dropped if "any-drop" in opts.flags else policy_drop))
        tcp = rec["protocol"] == 6
        syn = (rec["tcp_flags"] & 0x02) != 0
        ack = (rec["tcp_flags"] & 0x10) != 0
        if "syn-only" in opts.flags:
            mask &= ~tcp | (syn & ~ack)
        else:
            mask &= ~tcp | ~ack | syn   # TCP: the connection's first packet(s)
        base = [rec["protocol"], dropped.astype(np.uint8)]
        fmt: list[Callable[[int], str]] = [lambda p: PROTOCOLS.get(p, str(p)),
                                           lambda d: "DROPPED" if d else "FORWARDED"]
        if "port" in opts.flags:
            base.append(rec["dport"])
            fmt.append(str)
        self._add("flows-to-world", self.to_world, rec, mask, base, fmt, ctxs)

    # --- L7, per flow dict (fed by the L7 proxy's flows) -----------------------------------
    def _dict_contexts(self, metric: str, flow: dict[str, Any]) -> list[str]:
        """The metric's context label values for one flow dict (same rules as batches)."""
        opts = self.config.options(metric)
        ip = flow.get("IP") or {}

        def value(side: str, kind: str) -> str:
            ep = flow.get(side) or {}
            ns, pod = ep.get("namespace") or "", ep.get("pod_name") or ""
            labels = [str(x) for x in ep.get("labels") or []]
            app = next((x.split("=", 1)[1] for x in labels
                        if x.partition(":")[2].startswith("app=")), "")
            identity = int(ep.get("identity", 0) or 0)
            return {"ip": ip.get(side, ""), "identity": str(identity) if identity else "",
                    "reserved-identity": f"reserved:{RESERVED_NAMES[identity]}"
                    if identity in RESERVED_NAMES else "",
                    "namespace": ns, "pod": f"{ns}/{pod}" if pod else "", "pod-name": pod,
                    "app": app, "workload-name": app,
                    "workload": f"{ns}/{app}" if app and ns else ""}.get(kind, "")

        out = []
        for side, kinds in (("source", opts.source_context),
                            ("destination", opts.destination_context)):
            if kinds:
                out.append(next((v for v in (value(side, k) for k in kinds) if v), ""))
        for label in opts.labels_context:
            if label == "traffic_direction":
                out.append(str(flow.get("traffic_direction", "")).lower())
                continue
            side, _, what = label.partition("_")
            kind = {"ip": "ip", "namespace": "namespace", "pod": "pod-name", "app": "app",
                    "workload": "workload-name", "workload_kind": ""}[what]
            out.append(value(side, kind) if kind else "")
        return out

    def count_l7(self, flow: dict[str, Any]) -> None:
        """Count one L7 flow (Hubble JSON shape: ``l7.http`` / ``l7.dns``)."""
        l7 = flow.get("l7") or {}
        if self.flows is not None:   # with the flow metric's context labels, if any
            kind = "dns" if l7.get("dns") else "http"
            extra = self._dict_contexts("flow", flow)
            labels = ["L7", f"{kind}-{str(l7.get('type', '')).lower()}",
                      str(flow.get("verdict", "")), *extra]
            self.flows.labels(*labels).inc()
            self._remember(self.flows, len(extra), labels)
        reporter = "server" if flow.get("traffic_direction") == "INGRESS" else "client"
        http = l7.get("http")
        metric = "httpV2" if self.config.enabled("httpV2") else "http"
        is_response = l7.get("type") in ("RESPONSE", 2)
        if http and self.http_v1 and self.http_requests is not None:
            method = str(http.get("method", ""))
            extra = self._dict_contexts(metric, flow)
            if not is_response:
                self.http_requests.labels(method, str(http.get("protocol", "HTTP/1.1")),
                                          reporter, *extra).inc()
                return
            assert self.http_responses is not None
            self.http_responses.labels(method, str(http.get("code", 0)), reporter,
                                       *extra).inc()
            if l7.get("latency_ns") and self.http_duration is not None:
                self.http_duration.labels(method, reporter, *extra).observe(
                    int(l7["latency_ns"]) / 1e9)
            return
        if http and self.http_requests is not None and is_response:
            method = str(http.get("method", ""))
            extra = self._dict_contexts(metric, flow)
            labels = [method, str(http.get("protocol", "HTTP/1.1")), str(http.get("code", 0)),
                      reporter, *extra]
            self.http_requests.labels(*labels).inc()
            self._remember(self.http_requests, len(extra), labels)
            if l7.get("latency_ns") and self.http_duration is not None:
                self.http_duration.labels(method, reporter, *extra).observe(
                    int(l7["latency_ns"]) / 1e9)
        dns = l7.get("dns")
        if dns and self.dns_queries is not None:
            opts = self.config.options("dns")
            qtypes = ",".join(dns.get("qtypes") or [])
            if "ignoreAAAA" in opts.flags and qtypes == "AAAA":
                return
            is_resp = l7.get("type") in ("RESPONSE", 2)
            target = self.dns_responses if is_resp else self.dns_queries
            ctx = self._dict_contexts("dns", flow)
            rcode = int(dns.get("rcode", 0))
            target.labels(RCODE_LABELS.get(rcode, str(rcode)) if is_resp else "", qtypes,
                          str(len(dns.get("ips") or [])) if is_resp else "0", *ctx).inc()
            if is_resp and self.dns_response_types is not None:
                for rrtype in dns.get("rrtypes") or []:
                    self.dns_response_types.labels(rrtype, qtypes, *ctx).inc()
