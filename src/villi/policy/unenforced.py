"""Policy fields villi accepts but cannot enforce as written: said out loud, never silent.

Some valid Cilium/Kubernetes policy fields select nothing on villi: its datapath is
IPv4-only (IPv6 packets are dropped, so IPv6 CIDRs and ``icmps`` of ``family: IPv6``
match no packet), ``kube-apiserver`` selects only the kvstore (its etcd takes that
identity), and some reserved identities are never given to anything here (no
health endpoints, no ingress proxy, no unmanaged or ``init``
endpoints). Rejecting such policies would break manifests written for Cilium; applying
them silently would let an author believe a rule is in force. So the loader accepts
them and reports one :class:`PolicyWarning` per field, naming the file, document, line
and field path and what the field selects here. ``villi apply`` prints them.

The walk reads the validated document's raw data (the YAML spelling of every field),
so the field paths are the ones the author wrote.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

Loc = tuple[str | int, ...]

POLICY_KINDS = ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", "NetworkPolicy")

_IPV4_ONLY = "villi's datapath is IPv4-only and drops IPv6 packets"

#: What each entity selects on villi when it selects nothing (the others are real).
ENTITY_NOTES = {
    "world-ipv6": f"selects nothing here: {_IPV4_ONLY}",
    "health": "selects nothing here: villi runs no health endpoints, so no address has "
              "the health identity",
    "init": "selects nothing here: villi gives an endpoint its labels' identity when it "
            "is created, so no endpoint is ever in the init identity",
    "kube-apiserver": "selects only the kvstore's client endpoints here: villi has no "
                      "kube-apiserver, and its etcd takes that identity (docs/security.md)",
    "ingress": "selects nothing here: villi has no ingress proxy, so no address has the "
               "ingress identity",
    "unmanaged": "selects nothing here: every pod on a villi node is managed by its agent",
}


@dataclass(frozen=True)
class PolicyWarning:
    """One accepted field that does not do here what it does on Cilium."""

    file: str
    document: int
    field: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: document {self.document}, {self.field}: {self.message}"


def find(data: Any) -> Iterator[tuple[Loc, str]]:
    """(field path, message) of every unenforceable field of one policy document."""
    if not isinstance(data, dict) or data.get("kind") not in POLICY_KINDS:
        return
    if data["kind"] == "NetworkPolicy":
        yield from _walk(data.get("spec"), ("spec",), _k8s_field)
        return
    if data.get("spec") is not None:
        yield from _walk(data["spec"], ("spec",), _cilium_field)
    for i, spec in enumerate(data.get("specs") or ()):
        yield from _walk(spec, ("specs", i), _cilium_field)


def _walk(node: Any, loc: Loc,
          check: Callable[[str, Any, Loc], Iterator[tuple[Loc, str]]]
          ) -> Iterator[tuple[Loc, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            found = list(check(str(key), value, loc + (key,)))
            if found:
                yield from found
            else:
                yield from _walk(value, loc + (key,), check)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _walk(item, loc + (i,), check)


def _is_ipv6(value: Any) -> bool:
    try:
        return ipaddress.ip_network(str(value), strict=False).version == 6
    except ValueError:
        return False


def _ipv6_cidr(loc: Loc, value: Any) -> Iterator[tuple[Loc, str]]:
    if _is_ipv6(value):
        yield loc, f"IPv6 CIDR {value} selects nothing here: {_IPV4_ONLY}"


def _cilium_field(key: str, value: Any, loc: Loc) -> Iterator[tuple[Loc, str]]:
    if key in ("toCIDR", "fromCIDR") and isinstance(value, list):
        for i, cidr in enumerate(value):
            yield from _ipv6_cidr(loc + (i,), cidr)
    elif key in ("toCIDRSet", "fromCIDRSet") and isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, dict):
                yield from _ipv6_cidr(loc + (i, "cidr"), item.get("cidr"))
    elif key in ("toEntities", "fromEntities") and isinstance(value, list):
        for i, entity in enumerate(value):
            if entity in ENTITY_NOTES:
                yield loc + (i,), f"entity {entity!r} {ENTITY_NOTES[entity]}"
    elif key == "icmps" and isinstance(value, list):
        for i, rule in enumerate(value):
            for j, f in enumerate((rule or {}).get("fields") or ()):
                if isinstance(f, dict) and f.get("family") == "IPv6":
                    yield (loc + (i, "fields", j, "family"),
                           f"ICMPv6 type {f.get('type')!r} selects nothing here: "
                           f"{_IPV4_ONLY}")


def _k8s_field(key: str, value: Any, loc: Loc) -> Iterator[tuple[Loc, str]]:
    if key == "ipBlock" and isinstance(value, dict):
        yield from _ipv6_cidr(loc + ("cidr",), value.get("cidr"))
