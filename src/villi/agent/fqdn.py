"""The agent's side of FQDN policy: what the DNS proxy learns becomes identities, ipcache
entries and policy map rows — before the proxy releases the answer to the pod.

The DNS proxy (in ``villi-proxy``, apart from the agent so DNS survives agent restarts)
asks ``GET /v1/fqdn/patterns`` for the toFQDNs patterns in force and
``GET /v1/fqdn/dns-rules`` for each endpoint's ``rules.dns`` patterns, labels each learned IP
with its name manager, and posts the changes to ``POST /v1/fqdn/learned``; the handler
returns once the resolver's diff is in the kernel maps, which is what the proxy's
≤ 100 ms hold waits for. ``GET /v1/fqdn/cache`` lists the proxy's persisted per-endpoint
caches (``villi get fqdn-cache``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from villi.errors import BadRequest, VilliError
from villi.identity.labels import SOURCE_FQDN, LabelSet, parse_label

log = logging.getLogger(__name__)

#: How long a learned-IP answer may wait for the snapshot push to villi-proxy.
PUSH_TIMEOUT = 0.05

#: Where the node's DNS proxy persists its caches (inside the agent's state directory).
CACHE_FILE = "fqdn-cache.json"


class PolicyResolver(Protocol):
    """Whatever holds the node's policy resolver (``PolicySync``)."""

    @property
    def resolver(self) -> Any: ...


class FQDNPolicy(Protocol):
    """The policy engine the learned IPs go to (``villi.agent.policy_sync.PolicySync``)."""

    @property
    def resolver(self) -> Any: ...
    def apply(self, update: Any, started: float | None = None) -> None: ...


class ProxyPush(Protocol):
    """The L7 proxy's feed (``villi.agent.l7.L7Proxy``): learned identities reach the
    HTTP side before the DNS answer is released."""

    def push_now(self) -> Awaitable[bool]: ...
    def request_push(self) -> None: ...


class ProxyOptions(Protocol):
    """The agent settings villi-proxy's DNS side is started with (``AgentConfig``)."""

    @property
    def api_socket(self) -> Path: ...
    @property
    def state_path(self) -> Path: ...
    @property
    def tofqdns_dns_reject_response_code(self) -> str: ...
    @property
    def tofqdns_min_ttl(self) -> int: ...
    @property
    def tofqdns_endpoint_max_ip_per_hostname(self) -> int: ...
    @property
    def tofqdns_proxy_response_max_delay(self) -> float: ...


def cache_path(state_path: Path) -> Path:
    return Path(state_path) / CACHE_FILE


def parse_learned(body: Any) -> tuple[dict[str, LabelSet], list[str]]:
    """``{"changed": {ip: [label, ...]}, "removed": [ip]}`` → resolver input; ValueError
    names the bad field."""
    import ipaddress

    if not isinstance(body, dict):
        raise ValueError("body must be an object with 'changed' and 'removed'")
    raw_changed, raw_removed = body.get("changed") or {}, body.get("removed") or []
    if not isinstance(raw_changed, dict):
        raise ValueError("changed: must be an object {ip: [label, ...]}")
    if not isinstance(raw_removed, list):
        raise ValueError("removed: must be a list of IPs")
    changed: dict[str, LabelSet] = {}
    for ip, labels in raw_changed.items():
        try:
            ipaddress.IPv4Address(ip)
        except ValueError:
            raise ValueError(f"changed: {ip!r} is not an IPv4 address") from None
        if not isinstance(labels, list):
            raise ValueError(f"changed.{ip}: must be a list of labels")
        parsed = [parse_label(str(x)) for x in labels]
        if not any(lbl.source == SOURCE_FQDN for lbl in parsed):
            raise ValueError(f"changed.{ip}: needs at least one fqdn: label")
        changed[ip] = LabelSet(tuple(parsed))
    removed = [str(ip) for ip in raw_removed]
    for ip in removed:
        try:
            ipaddress.IPv4Address(ip)
        except ValueError:
            raise ValueError(f"removed: {ip!r} is not an IPv4 address") from None
    return changed, removed


def cache_listing(path: Path, now: float | None = None) -> list[dict[str, Any]]:
    """Rows like ``cilium-dbg fqdn cache list`` from the proxy's cache file (its format is
    ``villi.dnsproxy.cache.CacheStore``'s; read here so the agent needs no proxy code)."""
    now = time.time() if now is None else now
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable DNS cache file: {e}") from e
    rows = []
    for ep, cache in sorted((data.get("endpoints") or {}).items()):
        for ent in sorted(cache.get("entries", []), key=lambda x: (x["name"], x["ip"])):
            rows.append({"endpoint": ep, "name": ent["name"], "ip": ent["ip"],
                         "ttl": ent["ttl"], "ttl_left": max(0, round(ent["expires"] - now)),
                         "source": "lookup"})
        for z in sorted(cache.get("zombies", []), key=lambda z: z["ip"]):
            rows.extend({"endpoint": ep, "name": n, "ip": z["ip"], "ttl": 0, "ttl_left": 0,
                         "source": "zombie"} for n in z["names"])
    return rows


def learned_names(path: Path) -> dict[str, set[str]]:
    """ip → names from the proxy's cache file, zombies included (they stay allowed)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable DNS cache %s: %s", path, e)
        return {}
    out: dict[str, set[str]] = {}
    for cache in (data.get("endpoints") or {}).values():
        for ent in cache.get("entries", []):
            out.setdefault(ent["ip"], set()).add(ent["name"])
        for z in cache.get("zombies", []):
            out.setdefault(z["ip"], set()).update(z["names"])
    return out


def restore_learned(policy: FQDNPolicy, state_path: Path) -> int:
    """At start, before policy regeneration: give the IPs in the proxy's persisted caches
    their fqdn identities again, so regeneration keeps (instead of deleting) the policy
    map rows that allow them. Returns how many IPs."""
    from villi.policy.fqdn import fqdn_identity_labels, matches

    resolver = policy.resolver
    patterns = resolver.fqdn_patterns()
    changed = {}
    for ip, names in learned_names(cache_path(state_path)).items():
        hit = {p for p in patterns if any(matches(p, n) for n in names)}
        if hit:
            changed[ip] = fqdn_identity_labels(ip, hit)
    if changed:
        policy.apply(resolver.learn_fqdn(changed))
        log.info("restored %d IPs learned by the DNS proxy", len(changed))
    return len(changed)


#: resolver → (resources, endpoints, rules) of the last dns_snapshot: the rules are
#: recomputed only when a policy or an endpoint object changed (a learned IP — the
#: common push — changes neither).
_RULES: weakref.WeakKeyDictionary[Any, tuple[list[Any], list[Any], dict[str, list[str]]]] = \
    weakref.WeakKeyDictionary()


def dns_snapshot(policy: PolicyResolver) -> dict[str, Any]:
    """The DNS part of the policy snapshot pushed to villi-proxy: each local endpoint's
    ``rules.dns`` patterns and the toFQDNs patterns in force."""
    from villi.policy.dnsrules import dns_patterns

    r = policy.resolver
    resources, endpoints = r.resources(), r.endpoints()
    last = _RULES.get(r)
    if last is None or not (_same(last[0], resources) and _same(last[1], endpoints)):
        last = (resources, endpoints, dns_patterns(resources, endpoints))
        _RULES[r] = last
    return {"rules": last[2], "patterns": r.fqdn_patterns()}


def _same(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def proxy_args(cfg: ProxyOptions, pin_dir: Path) -> list[str]:
    """villi-proxy's DNS options (``villi.dnsproxy.host``): where to post learned IPs,
    where the caches persist, the CT for zombies."""
    return ["--agent-socket", str(cfg.api_socket),
            "--dns-cache-file", str(cache_path(cfg.state_path)),
            "--pin-dir", str(pin_dir),
            "--tofqdns-dns-reject-response-code", cfg.tofqdns_dns_reject_response_code,
            "--tofqdns-min-ttl", str(cfg.tofqdns_min_ttl),
            "--tofqdns-endpoint-max-ip-per-hostname",
            str(cfg.tofqdns_endpoint_max_ip_per_hostname),
            "--tofqdns-proxy-response-max-delay", str(cfg.tofqdns_proxy_response_max_delay)]


def fqdn_routes(policy: FQDNPolicy, state_path: Path,
                l7: ProxyPush | None = None) -> list[tuple[str, str, Any]]:
    async def patterns(request: web.Request) -> web.Response:
        return web.json_response({"patterns": policy.resolver.fqdn_patterns()})

    async def learned(request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        try:
            changed, removed = parse_learned(await request.json())
        except (ValueError, json.JSONDecodeError) as e:
            raise BadRequest(str(e)) from None   # the API's middleware answers 400
        update = policy.resolver.learn_fqdn(changed, removed)
        policy.apply(update, t0)
        if l7 is not None and (update.cidr_upserts or update.cidr_deletes):
            # toFQDNs + HTTP rules: villi-proxy's HTTP side must know the new identity
            # and its L7 rows before the DNS answer is released
            try:
                # shielded: a push cut off mid-request would leave its reply queued
                pushed = await asyncio.wait_for(asyncio.shield(l7.push_now()), PUSH_TIMEOUT)
            except (OSError, TimeoutError):
                pushed = False
            if not pushed:
                l7.request_push()
        return web.json_response({
            "identities": {p.split("/")[0]: int(i) for p, i in update.cidr_upserts.items()},
            "endpoints": len(update.endpoints),
            "seconds": time.perf_counter() - t0})

    async def cache(request: web.Request) -> web.Response:
        try:
            return web.json_response(cache_listing(cache_path(state_path)))
        except ValueError as e:
            raise VilliError(f"the DNS cache is unreadable: {e}") from None   # 500

    async def dns_rules(request: web.Request) -> web.Response:
        from villi.policy.dnsrules import dns_patterns

        r = policy.resolver
        return web.json_response(dns_patterns(r.resources(), r.endpoints()))

    return [("GET", "/v1/fqdn/patterns", patterns), ("GET", "/v1/fqdn/dns-rules", dns_rules),
            ("POST", "/v1/fqdn/learned", learned), ("GET", "/v1/fqdn/cache", cache)]
