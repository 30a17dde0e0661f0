"""Hubble-style flow filters, evaluated on whole batches of raw records with numpy.

A filter is a conjunction of predicates; each predicate ORs its values (a repeated
flag) and may be negated (``--not`` before the flag). Predicates that name pods,
namespaces or labels are resolved once per evaluation into sets of IPs or identities,
so matching a batch is a handful of ``np.isin`` calls, not Python per record.

The same ``FilterSpec`` travels from the CLI to every agent as JSON.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from villi.errors import VilliError
from villi.observer.context import FlowContext
from villi.observer.vocab import OBS_SUBTYPES, PROTOCOL_NUMBERS

# field -> which side(s) it looks at
SIDES = {"": ("src", "dst"), "from": ("src",), "to": ("dst",)}
FIELDS = {
    "pod", "from-pod", "to-pod", "namespace", "from-namespace", "to-namespace",
    "label", "from-label", "to-label", "identity", "from-identity", "to-identity",
    "ip", "from-ip", "to-ip", "port", "from-port", "to-port", "verdict", "protocol",
    "type", "traffic-direction", "drop-reason-desc", "tcp-flags", "node", "service",
    "from-service", "to-service", "http-method", "http-path", "http-status", "http-url", "fqdn",
}
#: L7 protocols: datapath records never match them (L7 flows come from the proxies).
L7_PROTOCOLS = ("dns", "http")


class FilterError(VilliError):
    """A filter value that cannot be understood."""


@dataclass
class Predicate:
    field: str
    values: list[str]
    negate: bool = False


@dataclass
class FilterSpec:
    predicates: list[Predicate] = field(default_factory=list)

    def to_json(self) -> list[dict[str, Any]]:
        return [asdict(p) for p in self.predicates]

    @classmethod
    def from_json(cls, data: list[dict[str, Any]] | None) -> FilterSpec:
        preds = []
        for item in data or []:
            f = item.get("field")
            if f not in FIELDS:
                raise FilterError(f"unknown filter {f!r}; known: {', '.join(sorted(FIELDS))}")
            preds.append(Predicate(f, [str(v) for v in item.get("values", [])],
                                   bool(item.get("negate", False))))
        return cls(preds)


def _split(name: str) -> tuple[str, str]:
    if name.startswith("from-"):
        return "from", name[5:]
    if name.startswith("to-"):
        return "to", name[3:]
    return "", name


def _ip_u32(ip: str) -> int:
    """An IPv4 as the u32 the datapath stores (network order in memory)."""
    return struct.unpack("<I", socket.inet_aton(ip))[0]


def _host_order(raw: np.ndarray) -> np.ndarray:
    return raw.astype(np.uint32).byteswap()


def _pod_ips(ctx: FlowContext, values: list[str], by_namespace: bool) -> np.ndarray:
    pods = ctx.all_pods()
    ips = []
    for value in values:
        if by_namespace:
            ns, prefix = value, ""
        elif "/" in value:
            ns, prefix = value.split("/", 1)
        else:
            ns, prefix = "default", value
        for ip, pod in pods.items():
            if (not ns or pod.namespace == ns) and pod.name.startswith(prefix):
                ips.append(_ip_u32(ip))
    return np.array(ips, dtype=np.uint32)


def _split_name(value: str) -> tuple[str, str]:
    """``[NAMESPACE/]NAME-PREFIX`` → (namespace, prefix); no namespace means ``default``
    and an empty one (``/web``) means any namespace, as for ``--pod``."""
    if "/" in value:
        ns, prefix = value.split("/", 1)
        return ns, prefix
    return "default", value


def service_matches(service: tuple[str, str] | None, values: list[str]) -> bool:
    """Whether ``(namespace, name)`` is named by any ``[NAMESPACE/]NAME-PREFIX`` value."""
    if service is None:
        return False
    for value in values:
        ns, prefix = _split_name(value)
        if (not ns or service[0] == ns) and service[1].startswith(prefix):
            return True
    return False


def _service_mask(ctx: FlowContext, ips: np.ndarray, ports: np.ndarray,
                  values: list[str]) -> np.ndarray:
    """Records whose ``ip:port`` belongs to a named service (a ClusterIP:port or a
    backend of one): one context lookup per distinct address in the batch."""
    keys = (ips.astype(np.uint64) << np.uint64(16)) | ports.astype(np.uint64)
    uniq = np.unique(keys)
    hits = [k for k in uniq.tolist()
            if service_matches(ctx.service_of(_ip_str(k >> 16), k & 0xFFFF), values)]
    return np.isin(keys, np.array(hits, dtype=np.uint64))


def _ip_str(raw: int) -> str:
    return socket.inet_ntoa(struct.pack("<I", raw & 0xFFFFFFFF))


def _label_matches(labels: list[str], selector: str) -> bool:
    key, _, value = selector.partition("=")
    for label in labels:
        src, _, rest = label.partition(":")
        k, _, v = rest.partition("=")
        if ":" in key:
            want_src, want_key = key.split(":", 1)
            if src != want_src or k != want_key:
                continue
        elif k != key:
            continue
        if not value or v == value:
            return True
    return False


def _identities(ctx: FlowContext, values: list[str]) -> np.ndarray:
    ids = ctx.all_identities()
    out = [i for i, labels in ids.items()
           if any(all(_label_matches(labels, part) for part in v.split(",")) for v in values)]
    return np.array(out, dtype=np.uint32)


def _cidr_mask(col: np.ndarray, value: str) -> np.ndarray:
    try:
        net = ipaddress.IPv4Network(value, strict=False)
    except ValueError as e:
        raise FilterError(f"{value!r} is not an IPv4 address or CIDR") from e
    mask = np.uint32(int(net.netmask))
    return (_host_order(col) & mask) == np.uint32(int(net.network_address))


def _predicate_mask(p: Predicate, rec: np.ndarray, ctx: FlowContext) -> np.ndarray:
    side, base = _split(p.field)
    sides = SIDES[side]
    out = np.zeros(len(rec), dtype=bool)
    if base in ("pod", "namespace"):
        ips = _pod_ips(ctx, p.values, base == "namespace")
        for s in sides:
            out |= np.isin(rec[f"{s}_ip"], ips)
    elif base == "label":
        ids = _identities(ctx, p.values)
        for s in sides:
            out |= np.isin(rec[f"{s}_identity"], ids)
    elif base == "identity":
        ids = np.array([int(v) for v in p.values], dtype=np.uint32)
        for s in sides:
            out |= np.isin(rec[f"{s}_identity"], ids)
    elif base == "ip":
        for v in p.values:
            for s in sides:
                out |= _cidr_mask(rec[f"{s}_ip"], v)
    elif base == "port":
        ports = np.array([int(v) for v in p.values], dtype=np.uint16)
        cols = {"src": "sport", "dst": "dport"}
        for s in sides:
            out |= np.isin(rec[cols[s]], ports)
    elif base == "verdict":
        to_proxy = (rec["flags"] & 0x04) != 0  # EVF_TO_PROXY
        passed = rec["drop_reason"] == 0
        audited = passed & (rec["audit_reason"] != 0)
        for v in p.values:
            v = v.upper()
            if v == "FORWARDED":
                out |= passed & ~to_proxy & ~audited
            elif v == "DROPPED":
                out |= ~passed
            elif v == "AUDIT":
                out |= audited
            elif v == "REDIRECTED":
                out |= passed & to_proxy & ~audited
            elif v != "ERROR":  # ERROR: L7 flows only
                raise FilterError(f"verdict {v!r}: villi reports FORWARDED, DROPPED, "
                                  "AUDIT, REDIRECTED or ERROR")
    elif base.startswith("http-"):
        pass  # L7 fields: packet records never match (L7 flows are matched as dicts)
    elif base == "protocol":
        for v in p.values:
            if v.lower() == "http":
                continue  # L7 flows only
            num = PROTOCOL_NUMBERS.get(v.lower())
            if num is None and v.lower() in L7_PROTOCOLS:
                continue
            if num is None:
                raise FilterError(f"unknown protocol {v!r} (tcp, udp, icmp, sctp)")
            out |= rec["protocol"] == num
    elif base == "type":
        for v in p.values:
            kind, _, sub = v.partition(":")
            if kind == "drop":
                m = rec["event_type"] == 1
            elif kind == "trace":
                m = rec["event_type"] == 4
                if sub:
                    obs = {name: num for num, name in OBS_SUBTYPES.items()}.get(sub)
                    if obs is None:
                        raise FilterError(f"unknown trace subtype {sub!r}")
                    m &= rec["obs_point"] == obs
            elif kind == "l7":
                m = np.zeros(len(rec), dtype=bool)   # L7 flows are not datapath records
            elif kind == "policy-verdict":
                m = rec["event_type"] == 5   # the datapath's own policy-verdict events
            elif kind == "l7":
                continue  # L7 flows only
            else:
                raise FilterError(f"unknown event type {kind!r} (trace, drop, "
                                  "policy-verdict, l7)")
            out |= m
    elif base == "traffic-direction":
        for v in p.values:
            out |= rec["direction"] == (0 if v.lower() == "ingress" else 1)
    elif base == "drop-reason-desc":
        from villi.datapath.abi import DROP_REASON_TEXT

        codes = [c for c, (_, name) in DROP_REASON_TEXT.items()
                 if name in {v.upper() for v in p.values}]
        out |= np.isin(rec["drop_reason"], np.array(codes, dtype=np.uint8))
    elif base == "tcp-flags":
        bits = {"fin": 1, "syn": 2, "rst": 4, "psh": 8, "ack": 16}
        for v in p.values:
            want = 0
            for f in v.lower().split(","):
                if f not in bits:
                    raise FilterError(f"unknown TCP flag {f!r}")
                want |= bits[f]
            out |= (rec["tcp_flags"] & want) == want
    elif base == "node":
        out[:] = any(ctx.node_name() == v or ctx.node_name().startswith(v.rstrip("*"))
                     for v in p.values)
    elif base == "service":
        addr_cols = {"src": ("src_ip", "sport"), "dst": ("dst_ip", "dport")}
        for s in sides:
            ip_col, port_col = addr_cols[s]
            out |= _service_mask(ctx, rec[ip_col], rec[port_col], p.values)
    elif base == "fqdn":
        # flows to or from IPs learned for matching names (the agent's DNS caches)
        learned = getattr(ctx, "fqdn_ips", None)
        ips = np.array([_ip_u32(ip) for v in p.values for ip in (learned(v) if learned
                        else [])], dtype=np.uint32)
        for s in sides:
            out |= np.isin(rec[f"{s}_ip"], ips)
    return ~out if p.negate else out


def match(spec: FilterSpec, rec: np.ndarray, ctx: FlowContext) -> np.ndarray:
    """Boolean mask of the records that pass every predicate."""
    mask = np.ones(len(rec), dtype=bool)
    for p in spec.predicates:
        if not mask.any():
            break
        mask &= _predicate_mask(p, rec, ctx)
    return mask
