"""An independent reference evaluator of CNP/CCNP/KNP semantics, for property tests.

Written straight from /work/shared/reference/policy-semantics.md, over the raw YAML
dicts, with no entries, identities, selector cache or map state: it decides one packet
by walking the policies. It deliberately imports nothing from ``villi.policy`` so a
misunderstanding shared by both sides cannot hide.

Model: every pod is local and has one IPv4 address; a peer is a pod, an external IPv4
address (outside the cluster, or an in-cluster address not managed by villi), or a
reserved peer (``host``, ``remote-node``, ``kube-apiserver``, ``health``).

Semantics choices the reference shares with villi, documented in docs/policy.md:
ICMP type 0 in ``icmps`` selects every ICMP type (port 0 is the wildcard, as in Cilium);
traffic from the local host to a local pod is allowed unless a deny rule matches it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

NS_LABEL = "io.kubernetes.pod.namespace"
NS_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."
POLICY_DENIED = 133
POLICY_DENY = 181
L4 = ("TCP", "UDP", "SCTP")


@dataclass(frozen=True)
class Pod:
    ns: str
    name: str
    labels: dict[str, str]
    ip: str
    ports: dict[str, tuple[int, str]] = field(default_factory=dict)  # name → (port, proto)


@dataclass(frozen=True)
class Peer:
    """A pod, an external IP (``ip`` only) or a reserved peer (``reserved`` only)."""

    pod: Pod | None = None
    ip: str | None = None
    reserved: str | None = None


def _labels_of(peer: Peer, namespaces: dict[str, dict[str, str]]) -> set[tuple[str, str, str]]:
    """(source, key, value) labels of a peer, from the semantics doc §1.2."""
    if peer.pod is not None:
        pod = peer.pod
        out = {("k8s", k, v) for k, v in pod.labels.items()}
        out.add(("k8s", NS_LABEL, pod.ns))
        ns_labels = dict(namespaces.get(pod.ns, {}))
        ns_labels["kubernetes.io/metadata.name"] = pod.ns
        out |= {("k8s", NS_LABELS_PREFIX + k, v) for k, v in ns_labels.items()}
        return out
    if peer.reserved is not None:
        return {("reserved", peer.reserved, "")}
    return {("reserved", "world", "")}


def _split(key: str, default: str) -> tuple[str, str]:
    if ":" in key:
        src, _, name = key.partition(":")
        return src, name
    return default, key


def _values(labels: set[tuple[str, str, str]], src: str, key: str) -> list[str]:
    return [v for s, k, v in labels if k == key and (src == "any" or s == src)]


def _selector_matches(sel: dict, labels: set[tuple[str, str, str]], default: str = "any",
                      prefix: str = "") -> bool:
    for key, value in (sel.get("matchLabels") or {}).items():
        src, name = _split(key, default)
        if value not in _values(labels, src, prefix + name):
            return False
    for expr in sel.get("matchExpressions") or []:
        src, name = _split(expr["key"], default)
        found = _values(labels, src, prefix + name)
        op, vals = expr["operator"], expr.get("values") or []
        ok = {"In": any(v in vals for v in found), "NotIn": not any(v in vals for v in found),
              "Exists": bool(found), "DoesNotExist": not found}[op]
        if not ok:
            return False
    return True


def _names_key(sel: dict, key: str) -> bool:
    keys = list(sel.get("matchLabels") or {}) + [e["key"] for e in sel.get("matchExpressions")
                                                 or []]
    return any(_split(k, "any")[1] == key and _split(k, "any")[0] in ("k8s", "any")
               for k in keys)


def _has_reserved(sel: dict) -> bool:
    keys = list(sel.get("matchLabels") or {}) + [e["key"] for e in sel.get("matchExpressions")
                                                 or []]
    return any(_split(k, "any")[0] == "reserved" for k in keys)


def _in_cidr(ip: str, cidr: str, excepts: list[str] | None = None) -> bool:
    addr = ipaddress.ip_address(ip)
    if addr not in ipaddress.ip_network(cidr):
        return False
    return not any(addr in ipaddress.ip_network(e) for e in excepts or [])


def _peer_ip(peer: Peer) -> str | None:
    return peer.pod.ip if peer.pod is not None else peer.ip


# -- Cilium ------------------------------------------------------------------------------


def _cnp_peer_selector_matches(sel: dict, peer: Peer, policy_ns: str | None,
                               namespaces: dict) -> bool:
    labels = _labels_of(peer, namespaces)
    if not _selector_matches(sel, labels):
        return False
    if _has_reserved(sel) or _names_key(sel, NS_LABEL):
        return True
    # implicit namespace: the policy's own namespace, or (CCNP) any pod namespace
    if peer.pod is None:
        return False
    return policy_ns is None or peer.pod.ns == policy_ns


def _entity_matches(entity: str, peer: Peer) -> bool:
    if entity == "all":
        return True
    if entity in ("world", "world-ipv4"):
        return peer.pod is None and peer.reserved is None
    if entity == "cluster":
        return peer.pod is not None or peer.reserved is not None
    return peer.reserved == entity


def _cnp_l3(item: dict, prefix: str, peer: Peer, policy_ns: str | None,
            namespaces: dict) -> bool | None:
    """True/False for a rule with L3 fields; None when it has none."""
    eps = item.get(f"{prefix}Endpoints") or []
    cidrs = item.get(f"{prefix}CIDR") or []
    sets = item.get(f"{prefix}CIDRSet") or []
    ents = item.get(f"{prefix}Entities") or []
    if not (eps or cidrs or sets or ents):
        return None
    if any(_cnp_peer_selector_matches(s, peer, policy_ns, namespaces) for s in eps):
        return True
    if any(_entity_matches(e, peer) for e in ents):
        return True
    external = peer.pod is None and peer.reserved is None
    if external and any(_in_cidr(peer.ip, c) for c in cidrs):  # type: ignore[arg-type]
        return True
    return external and any(_in_cidr(peer.ip, s["cidr"], s.get("except"))  # type: ignore[arg-type]
                            for s in sets)


def _dest_pod(direction: str, endpoint: Pod, peer: Peer) -> Pod | None:
    return endpoint if direction == "ingress" else peer.pod


def _cnp_l4(item: dict, direction: str, endpoint: Pod, peer: Peer, proto: str,
            port: int) -> bool | None:
    """True/False for a rule with toPorts/icmps; None when it has neither."""
    if item.get("icmps"):
        if proto != "ICMP":
            return False
        for icmp in item["icmps"]:
            for f in icmp["fields"]:
                if f.get("family", "IPv4") != "IPv4":
                    continue
                t = int(f["type"])
                if t == 0 or t == port:
                    return True
        return False
    if not item.get("toPorts"):
        return None
    for pr in item["toPorts"]:
        for pp in pr["ports"]:
            p = str(pp.get("port", ""))
            want = pp.get("protocol", "ANY")
            if p in ("", "0"):
                if want == "ANY" or want == proto:
                    return True
                continue
            if want != "ANY" and want != proto:
                continue
            if want == "ANY" and proto not in L4:
                continue
            if p.isdigit():
                lo, hi = int(p), int(pp.get("endPort") or p)
                if lo <= port <= hi:
                    return True
            else:
                dest = _dest_pod(direction, endpoint, peer)
                declared = dest.ports.get(p) if dest is not None else None
                if declared and declared[0] == port and declared[1] == proto:
                    return True
    return False


def _cnp_item_matches(item: dict, direction: str, endpoint: Pod, peer: Peer, proto: str,
                      port: int, policy_ns: str | None, namespaces: dict) -> bool:
    prefix = "from" if direction == "ingress" else "to"
    l3 = _cnp_l3(item, prefix, peer, policy_ns, namespaces)
    l4 = _cnp_l4(item, direction, endpoint, peer, proto, port)
    if l3 is None and l4 is None:
        return False  # `ingress: [{}]` selects no peer
    return (l3 is None or l3) and (l4 is None or l4)


def _cnp_rules(doc: dict) -> list[dict]:
    rules = []
    if doc.get("spec"):
        rules.append(doc["spec"])
    rules.extend(doc.get("specs") or [])
    return rules


# -- Kubernetes --------------------------------------------------------------------------


def _knp_peer_matches(p: dict, peer: Peer, ns: str, namespaces: dict) -> bool:
    if "ipBlock" in p:
        ip = _peer_ip(peer)
        return ip is not None and _in_cidr(ip, p["ipBlock"]["cidr"], p["ipBlock"].get("except"))
    if peer.pod is None:
        return False
    labels = {(k, v) for k, v in peer.pod.labels.items()}
    if "namespaceSelector" in p:
        ns_labels = dict(namespaces.get(peer.pod.ns, {}))
        ns_labels["kubernetes.io/metadata.name"] = peer.pod.ns
        if not _selector_matches(p["namespaceSelector"], {("k8s", k, v) for k, v in
                                                          ns_labels.items()}, "k8s"):
            return False
    elif peer.pod.ns != ns:
        return False
    if "podSelector" in p:
        return _selector_matches(p["podSelector"], {("k8s", k, v) for k, v in labels}, "k8s")
    return True


def _knp_port_matches(ports: list[dict] | None, direction: str, endpoint: Pod, peer: Peer,
                      proto: str, port: int) -> bool:
    if not ports:
        return True
    for p in ports:
        want = p.get("protocol", "TCP")
        if want != proto:
            continue
        value = p.get("port")
        if value is None:
            return True
        if isinstance(value, int):
            if value <= port <= (p.get("endPort") or value):
                return True
        else:
            dest = _dest_pod(direction, endpoint, peer)
            declared = dest.ports.get(value) if dest is not None else None
            if declared and declared == (port, proto):
                return True
    return False


def _knp_types(spec: dict) -> set[str]:
    if spec.get("policyTypes") is not None:
        return set(spec["policyTypes"])
    return {"Ingress", "Egress"} if spec.get("egress") else {"Ingress"}


# -- the decision -------------------------------------------------------------------------


def decide(policies: list[dict], namespaces: dict[str, dict[str, str]], endpoint: Pod,
           direction: str, peer: Peer, proto: str, port: int) -> tuple[bool, int]:
    """(allowed, drop reason) for a new packet at ``endpoint`` in ``direction``."""
    enforced = False
    allowed = False
    denied = False
    ep_labels = _labels_of(Peer(pod=endpoint), namespaces)
    for doc in policies:
        kind = doc["kind"]
        meta = doc["metadata"]
        if kind == "NetworkPolicy":
            ns = meta.get("namespace", "default")
            spec = doc["spec"]
            if endpoint.ns != ns or not _selector_matches(
                    spec["podSelector"], {("k8s", k, v) for k, v in endpoint.labels.items()},
                    "k8s"):
                continue
            if direction.capitalize() not in _knp_types(spec):
                continue
            enforced = True
            for rule in spec.get(direction) or []:
                peers = rule.get("from" if direction == "ingress" else "to")
                if (not peers or any(_knp_peer_matches(p, peer, ns, namespaces)
                                     for p in peers)) and _knp_port_matches(
                        rule.get("ports"), direction, endpoint, peer, proto, port):
                    allowed = True
            continue
        policy_ns = meta.get("namespace", "default") if kind == "CiliumNetworkPolicy" else None
        for rule in _cnp_rules(doc):
            sel = rule["endpointSelector"]
            if policy_ns is not None:
                if endpoint.ns != policy_ns:
                    continue
                sel = {"matchLabels": {k: v for k, v in (sel.get("matchLabels") or {}).items()
                                       if _split(k, "any")[1] != NS_LABEL},
                       "matchExpressions": [e for e in sel.get("matchExpressions") or []
                                            if _split(e["key"], "any")[1] != NS_LABEL]}
            if not _selector_matches(sel, ep_labels):
                continue
            allow_items = rule.get(direction) or []
            deny_items = rule.get(f"{direction}Deny") or []
            flag = (rule.get("enableDefaultDeny") or {}).get(direction)
            if (allow_items or deny_items) and flag is not False:
                enforced = True
            for item in allow_items:
                if _cnp_item_matches(item, direction, endpoint, peer, proto, port, policy_ns,
                                     namespaces):
                    allowed = True
            for item in deny_items:
                if _cnp_item_matches(item, direction, endpoint, peer, proto, port, policy_ns,
                                     namespaces):
                    denied = True
    if denied:
        return False, POLICY_DENY
    if allowed:
        return True, 0
    if direction == "ingress" and peer.reserved == "host":
        return True, 0  # the local node may always reach its pods (kubelet probes)
    if enforced:
        return False, POLICY_DENIED
    return True, 0
