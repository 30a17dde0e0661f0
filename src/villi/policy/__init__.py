"""villi.policy — policy resources, selectors and their resolution to datapath entries.

The public surface, for the agent and endpoint layers::

    load_files(paths) / load_text(text, filename) -> Loaded (a list of Resource with
        .warnings: fields accepted that select nothing here)              (loader)
    PolicyResolver(map_writer=..., allow_localhost=True)                   (resolver)
        .apply(resources) / .upsert_resource(r) / .delete_resource(kind, ns, name)
        .update_identities(added, removed) / .identity_listener(added, removed)
        .upsert_pod(key, identity, ips, named_ports) / .delete_pod(key)
        .upsert_endpoint(Endpoint(...)) / .delete_endpoint(id)
        .policy(id) -> EndpointPolicy, .map_state(id), .cidr_identities(),
        .cookie_info(cookie), .namespace_labels(ns), .batch(),
        .l7_table(id) -> list[L7Entry]  (HTTP rules for the proxy)           (l7table)
    compute_map_state / datapath_verdict / diff_map_state / port_range_to_prefixes,
    MapKey, MapValue, Verdict                                               (mapstate)
    PolicySimulator                                                         (simulate)

Names are imported lazily so that ``villi.policy.entry`` (the pure data the datapath
layer shares) can be imported without pulling in pydantic and YAML.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Direction": "entry", "EndpointID": "entry", "IdentityID": "entry",
    "PolicyEntry": "entry", "Protocol": "entry",
    "load_files": "loader", "load_text": "loader",
    "Resource": "models", "CiliumNetworkPolicy": "models",
    "CiliumClusterwideNetworkPolicy": "models", "NetworkPolicy": "models",
    "Namespace": "models",
    "Selector": "selectors",
    "PolicyResolver": "resolver", "Endpoint": "resolver", "EndpointPolicy": "resolver",
    "EndpointPolicyDiff": "resolver", "PolicyUpdate": "resolver", "MapWriter": "resolver",
    "CookieInfo": "rules",
    "MapKey": "mapstate", "MapValue": "mapstate", "Verdict": "mapstate",
    "compute_map_state": "mapstate", "datapath_verdict": "mapstate",
    "diff_map_state": "mapstate", "port_range_to_prefixes": "mapstate",
    "DROP_POLICY_DENIED": "mapstate", "DROP_POLICY_DENY": "mapstate",
    "PolicySimulator": "simulate",
    "HTTPRule": "http", "L7Entry": "l7table",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'villi.policy' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"villi.policy.{module}"), name)
    globals()[name] = value
    return value
