"""The cluster state of bench/scale.py: generated deterministically, written to real etcd.

Everything is written with villi's own key formats and encoders: node entries
(``villi.kvstore.schema``) and ipcache entries under the leases of their nodes, identities
(``villi.identity.allocator`` id and value keys, canonical label strings), Namespace
and policy resources (``villi.resources``), the policies being the same realistic mix
as bench/policy.py (namespace isolation KNPs, app-to-app CNPs with ports and ranges,
CIDR rules with ``except``, deny rules, a few clusterwide ones).

Bulk writes go through etcd's transaction endpoint, 128 puts per transaction (etcd's
default ``--max-txn-ops``), on villi's etcd gateway client: writing 350,000 keys one
request at a time would measure the benchmark's Python, not etcd.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from policy import Workload  # bench/policy.py: the 3,000-policy mix

from villi import resources
from villi.identity.allocator import id_key, value_key
from villi.ipam.usage import usage_report
from villi.kvstore import EtcdStore, LeaseID
from villi.kvstore import schema as keys
from villi.kvstore.etcd import _put  # the gateway's PutRequest encoder
from villi.policy.loader import load_text

TXN_OPS = 128
UNDERLAY = ipaddress.IPv4Network("172.20.0.0/16")   # inside lab namespaces only
CLUSTER_CIDR = ipaddress.IPv4Network("10.64.0.0/10")
NODE_MASK = 25   # 32,768 node CIDRs of 126 pods: 20,000 nodes do not fit in /24s of a /10
APPS = 10


@dataclass
class Size:
    nodes: int
    pods: int
    policies: int
    namespaces: int

    @property
    def identities(self) -> int:
        return self.namespaces * APPS


def node_name(i: int) -> str:
    return f"node-{i:05d}"


def node_ip(i: int) -> str:
    return str(UNDERLAY.network_address + 1 + i)


def node_cidr(i: int) -> str:
    return str(ipaddress.IPv4Network((int(CLUSTER_CIDR.network_address) + (i << (32 - NODE_MASK)),
                                      NODE_MASK)))


@dataclass
class ClusterState:
    """Node 0 is the real agent's; nodes 1..N-1 are simulated and hold every pod."""

    size: Size
    work: Workload = field(init=False)
    identity_ids: list[int] = field(default_factory=list)
    leases: dict[int, LeaseID] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.size
        self.work = Workload(namespaces=s.namespaces, apps=APPS, replicas=1,
                             policies=s.policies, seed=16)
        self.identity_ids = [int(i) for i in self.work.identities]

    # --- generated entries --------------------------------------------------------------
    def identity_of(self, ns_index: int, app_index: int) -> int:
        return self.identity_ids[ns_index * APPS + app_index]

    def pod(self, j: int) -> tuple[str, str, dict[str, Any]]:
        """(node name, pod IP, ipcache entry) of pod ``j``, on node 1 + j % (N-1)."""
        remote = self.size.nodes - 1
        node = 1 + j % remote
        slot = j // remote
        base = ipaddress.IPv4Network(node_cidr(node)).network_address
        ip = str(base + 2 + slot)
        ident_index = j % len(self.identity_ids)
        ns_index, app_index = divmod(ident_index, APPS)
        ns = self.work.namespaces[ns_index]
        app = self.work.apps[app_index]
        entry = keys.IpcacheEntry(
            identity=self.identity_ids[ident_index], node=node_name(node),
            node_ip=node_ip(node), namespace=ns, pod_name=f"{app}-{j}", endpoint_id=slot + 1,
            labels={"app": app, "tier": ("fe", "be")[app_index % 2]},
            named_ports={"http": (8000 + app_index, "TCP"), "metrics": (9090, "TCP")}
        ).to_json()
        return node_name(node), ip, entry

    def pods_on(self, node: int) -> int:
        remote = self.size.nodes - 1
        return self.size.pods // remote + (1 if (node - 1) < self.size.pods % remote else 0)

    def node_entry(self, i: int) -> dict[str, Any]:
        """The agent's node entry: no IPAM usage (that is :meth:`usage_report`'s key)."""
        return {"name": node_name(i), "ipv4": node_ip(i), "podCIDRs": [node_cidr(i)],
                "apiSocket": f"/var/run/villi/{node_name(i)}.sock"}

    def usage_report(self, i: int, extra: int = 0) -> bytes:
        """The agent's IPAM usage report (``ipam/v1/usage/<node>``, villi.ipam.usage)."""
        used = min(126, (self.pods_on(i) if i else 0) + extra)
        return usage_report({"allocated": used, "capacity": 126})

    def resource_docs(self) -> list[Any]:
        ns_yaml = "---\n".join(
            f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels: "
            f"{json.dumps(self.work.ns_labels[ns])}\n" for ns in self.work.namespaces)
        return [*load_text(ns_yaml, "namespaces.yaml"), *self.work.policies()]


async def txn_puts(store: EtcdStore, puts: list[dict[str, Any]]) -> None:
    """One etcd transaction of up to TXN_OPS puts (villi's gateway: retries, errors)."""
    await store._gw.call("/v3/kv/txn", {"success": [{"request_put": p} for p in puts]})


async def bulk_put(store: EtcdStore, items: list[tuple[str, bytes, LeaseID | None]],
                   concurrency: int = 8) -> None:
    batches = [items[i:i + TXN_OPS] for i in range(0, len(items), TXN_OPS)]
    sem = asyncio.Semaphore(concurrency)

    async def one(batch: list[tuple[str, bytes, LeaseID | None]]) -> None:
        async with sem:
            await txn_puts(store, [_put(k, v, lease) for k, v, lease in batch])

    await asyncio.gather(*(one(b) for b in batches))


async def populate(store: EtcdStore, state: ClusterState, lease_ttl: int,
                   grant: Callable[[list[int]], Awaitable[dict[int, LeaseID]]]
                   ) -> dict[str, Any]:
    """Write the whole cluster state; returns timings and counts. ``grant(indices)``
    grants the leases of nodes 1..N-1 and keeps them alive from then on (the simulated
    agents do: granting 20,000 can take longer than a TTL)."""
    t0 = time.perf_counter()
    n = state.size.nodes
    state.leases.update(await grant(list(range(1, n))))
    t_leases = time.perf_counter()

    await bulk_put(store, [(keys.node_key(node_name(i)),
                            json.dumps(state.node_entry(i)).encode(), state.leases[i])
                           for i in range(1, n)])
    await bulk_put(store, [(keys.usage_key(node_name(i)), state.usage_report(i),
                            state.leases[i]) for i in range(1, n)])
    t_nodes = time.perf_counter()

    idents: list[tuple[str, bytes, LeaseID | None]] = []
    for identity, labels in state.work.identities.items():
        idents.append((id_key(int(identity)), labels.canonical.encode(), None))
        idents.append((value_key(labels), str(int(identity)).encode(), None))
    await bulk_put(store, idents)
    t_ids = time.perf_counter()

    docs = state.resource_docs()
    await bulk_put(store, [(resources.key_of(r), resources.encode(r), None) for r in docs])
    t_res = time.perf_counter()

    chunk = 20_000
    lease_of = {node_name(i): lease for i, lease in state.leases.items()}
    for start in range(0, state.size.pods, chunk):
        items = []
        for j in range(start, min(state.size.pods, start + chunk)):
            node, ip, entry = state.pod(j)
            items.append((keys.ipcache_key(ip), json.dumps(entry).encode(), lease_of[node]))
        await bulk_put(store, items)
    t_pods = time.perf_counter()
    return {"leases_s": t_leases - t0, "nodes_s": t_nodes - t_leases,
            "identities_s": t_ids - t_nodes, "resources_s": t_res - t_ids,
            "ipcache_s": t_pods - t_res, "total_s": t_pods - t0,
            "keys": {"nodes": n - 1, "usage_reports": n - 1, "leases": len(state.leases),
                     "identities": len(idents) // 2,
                     "namespaces": len(state.work.namespaces),
                     "policies": len(docs) - len(state.work.namespaces),
                     "ipcache": state.size.pods}}
