"""Which agents the relay reads: static ``NAME=HOST:PORT`` peers or the kvstore's nodes.

Hubble Relay learns peers from the agents' Peer service; villi's agents already publish
their node entry (with its underlay IPv4) in the kvstore, so the relay lists those and
adds the agents' flow port. In a ClusterMesh the kvstoremesh also caches every remote
cluster's nodes in the local kvstore; the relay reads those too and names them
``CLUSTER/NODE`` (as Cilium's Peer service does for nodes of other clusters), so one
relay shows the flows of the whole mesh. Static peers serve tests and hosts without a
shared store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from villi.clustermesh import keys as mesh_keys
from villi.errors import IPAMError, VilliError
from villi.kvstore.schema import NODES, NodeEntry, name_in

NODES_PREFIX = NODES
DEFAULT_AGENT_PORT = 4244


@dataclass(frozen=True)
class Peer:
    name: str
    address: str   # HOST:PORT of the agent's TCP flow endpoint

    def url(self, tls: bool = False) -> str:
        return f"{'https' if tls else 'http'}://{self.address}"


def parse_peer(text: str) -> Peer:
    """``NAME=HOST:PORT`` → Peer, with an error that quotes the bad flag."""
    name, sep, addr = text.partition("=")
    host, colon, port = addr.rpartition(":")
    if not sep or not name or not colon or not host or not port.isdigit():
        raise VilliError(f"--peer {text!r}: expected NAME=HOST:PORT")
    return Peer(name, addr)


def peers_from_entries(entries: dict[str, NodeEntry], port: int) -> list[Peer]:
    """Peers from the kvstore's node entries (nodes without an IPv4 are skipped)."""
    return [Peer(name, f"{e.ipv4}:{port}") for name, e in sorted(entries.items())
            if e.ipv4 is not None]


async def discover(store: Any, port: int) -> list[Peer]:
    """The live nodes of the cluster, then those of remote clusters the kvstoremesh
    caches here (``CLUSTER/NODE``); a malformed entry is skipped."""
    local = _entries((await store.list(NODES_PREFIX)).items,
                     lambda key: name_in(NODES, key))
    remote = _entries((await store.list(mesh_keys.NODES.cache_root)).items, _remote_name)
    return peers_from_entries(local, port) + peers_from_entries(remote, port)


def _remote_name(key: str) -> str | None:
    parsed = mesh_keys.parse_cache_key(key)
    if parsed is None or "/" in parsed[2]:
        return None
    return f"{parsed[1]}/{parsed[2]}"


def _entries(items: Any, name_of: Callable[[str], str | None]) -> dict[str, NodeEntry]:
    out = {}
    for kv in items:
        name = name_of(kv.key)
        if name is None:
            continue
        try:
            out[name] = NodeEntry.decode(kv.value, key=kv.key)
        except IPAMError:
            continue
    return out
