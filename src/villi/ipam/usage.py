"""The IPAM usage report of a node, kept apart from its node entry.

An agent reports how many pod IPs it has allocated at most once per
``--ipam-node-update-rate``. The report lives at ``villi/state/ipam/v1/usage/<node>``
(under the agent's lease), not in the node entry: every agent watches every node entry,
so a usage figure there turned each report into N watch events, O(N^2) in the cluster
(bench/scale.py, docs/scale.md). Only the operator follows this prefix; ``villi get
nodes`` lists it and shows each node with its usage.

Value: ``{"ipam": {"allocated": a, "capacity": c, "free": f}, "villi.io/ip": f}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from villi.errors import IPAMError
from villi.ipam.capacity import IPAMUsage
from villi.ipam.keys import USAGE_PREFIX, node_of_key


def usage_report(usage: Mapping[str, int]) -> bytes:
    """The value an agent writes for its ``usage()`` figures."""
    parsed = IPAMUsage.from_json(usage)
    return json.dumps({"ipam": parsed.to_json(), "villi.io/ip": parsed.free},
                      sort_keys=True).encode()


def decode_usage(raw: bytes, *, key: str = "") -> IPAMUsage:
    """The usage in a report; IPAMError naming the key when it is malformed."""
    where = f"{key}: " if key else ""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IPAMError(f"{where}usage report is not JSON: {exc}") from None
    if not isinstance(doc, Mapping):
        raise IPAMError(f"{where}usage report must be an object: {doc!r}")
    try:
        return IPAMUsage.from_json(doc.get("ipam"))
    except IPAMError as exc:
        raise IPAMError(f"{where}{exc}") from None


def merge_usage(nodes: list[dict[str, Any]],
                reports: Iterable[tuple[str, bytes]]) -> list[dict[str, Any]]:
    """Node entries with their usage report folded in (``ipam``, ``villi.io/ip``), as
    ``villi get nodes`` shows them; a node without a (readable) report has neither."""
    usage: dict[str, IPAMUsage] = {}
    for key, raw in reports:
        node = node_of_key(key, USAGE_PREFIX)
        if node is None:
            continue
        try:
            usage[node] = decode_usage(raw, key=key)
        except IPAMError:
            continue  # shown without usage; the operator logs malformed reports
    out = []
    for n in nodes:
        u = usage.get(str(n.get("name")))
        out.append({**n, "ipam": u.to_json(), "villi.io/ip": u.free} if u else dict(n))
    return out
