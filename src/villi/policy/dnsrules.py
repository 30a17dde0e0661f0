"""Which DNS names each local endpoint may look up: its ``toPorts[].rules.dns`` patterns.

The DNS proxy checks every query of an endpoint against the union of the ``rules.dns``
patterns of the egress rules that select it (Cilium: a query no DNS rule allows is
refused). The L3/L4 part of those rules (may this pod reach that DNS server on port 53)
is ordinary policy, enforced by the datapath; this module only answers the L7 question,
from the same compiled subjects the resolver uses.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from villi.policy._subject import Endpoint
from villi.policy.models import CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy, Resource
from villi.policy.rules import CookieTable, compile_policy


def dns_patterns(resources: Iterable[Resource], endpoints: Iterable[Endpoint]
                 ) -> dict[str, list[str]]:
    """endpoint IPv4 → sorted DNS patterns it may query (endpoints without DNS rules are
    absent: the proxy refuses all their queries, should any reach it)."""
    per_rule: list[tuple[Any, list[str]]] = []
    cookies = CookieTable()
    for res in resources:
        if not isinstance(res, CiliumNetworkPolicy | CiliumClusterwideNetworkPolicy):
            continue
        compiled = compile_policy(res, cookies)
        for (_path, rule), comp in zip(res.rules, compiled, strict=False):
            patterns = [sel.pattern for eg in rule.egress or () for pr in eg.to_ports or ()
                        if pr.rules is not None and pr.rules.dns is not None
                        for sel in pr.rules.dns]
            if patterns:
                per_rule.append((comp, patterns))
    out: dict[str, set[str]] = {}
    for ep in endpoints:
        if not ep.ipv4:
            continue
        for comp, patterns in per_rule:
            if (comp.namespace is None or comp.namespace == ep.namespace) and \
                    comp.subject.matches(ep.labels):
                out.setdefault(ep.ipv4, set()).update(patterns)
    return {ip: sorted(p) for ip, p in out.items()}
