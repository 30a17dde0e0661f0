"""Where clustermesh state lives in a kvstore.

A cluster's own state (what remote clusters read), as every agent already writes it::

    villi/state/nodes/v1/<node>              node entries
    villi/state/ip/v1/<ip>                   ipcache entries (pods)
    villi/state/identities/v1/id/<n>         identity → labels
    villi/resources/Service/<ns>/<name>      Service resources (global ones matter)
    villi/cluster-config/<cluster>           {"name", "id", "capabilities"}

What ``villi kvstoremesh`` writes into the *local* kvstore for each remote cluster
(Cilium's ``cilium/cache/...``: the state prefix with ``state`` → ``cache`` and the
remote's name inserted), all under the kvstoremesh's own lease::

    villi/cache/<kind>/v1/<remote>/<rest>    a copy of the remote's key <prefix><rest>
    villi/cluster-config/<remote>            its cluster config, "cached": true
    villi/synced/<remote>/<kind>             sync canary: the initial listing of <kind>
                                              is complete (value: the time it was)
    villi/cluster-status/<remote>            {"connected", "error", "since"}: can the
                                              kvstoremesh reach the remote right now

Agents in kvstoremesh mode only ever read the local kvstore: ``villi/cache/`` and the
canaries. In ``direct`` mode they read each remote's own prefixes instead.
"""

from __future__ import annotations

from dataclasses import dataclass

CACHE = "villi/cache/"
CLUSTER_CONFIG = "villi/cluster-config/"
SYNCED = "villi/synced/"
CLUSTER_STATUS = "villi/cluster-status/"


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of state a remote cluster shares: its prefix there, its name here."""

    name: str
    state_prefix: str

    @property
    def cache_root(self) -> str:
        """Where every remote cluster's copy of this kind lives."""
        return f"{CACHE}{self.name}/v1/"

    def cache_prefix(self, remote: str) -> str:
        return f"{self.cache_root}{remote}/"

    def cache_key(self, remote: str, state_key: str) -> str:
        """The cache key of a remote's state key (which must be under the prefix)."""
        assert state_key.startswith(self.state_prefix), (state_key, self.state_prefix)
        return self.cache_prefix(remote) + state_key[len(self.state_prefix):]


NODES = Kind("nodes", "villi/state/nodes/v1/")
IPCACHE = Kind("ip", "villi/state/ip/v1/")
IDENTITIES = Kind("identities", "villi/state/identities/v1/id/")
SERVICES = Kind("services", "villi/resources/Service/")
KINDS: tuple[Kind, ...] = (NODES, IPCACHE, IDENTITIES, SERVICES)
KIND_BY_NAME = {k.name: k for k in KINDS}


def cluster_config_key(cluster: str) -> str:
    return CLUSTER_CONFIG + cluster


def synced_key(remote: str, kind: Kind) -> str:
    return f"{SYNCED}{remote}/{kind.name}"


def parse_cache_key(key: str) -> tuple[Kind, str, str] | None:
    """(kind, remote, rest) of a cache key, None for anything else."""
    if not key.startswith(CACHE):
        return None
    parts = key[len(CACHE):].split("/", 3)
    if len(parts) != 4 or parts[1] != "v1" or parts[0] not in KIND_BY_NAME:
        return None
    return KIND_BY_NAME[parts[0]], parts[2], parts[3]


def parse_synced_key(key: str) -> tuple[str, str] | None:
    """(remote, kind name) of a canary key."""
    if not key.startswith(SYNCED):
        return None
    remote, sep, kind = key[len(SYNCED):].partition("/")
    return (remote, kind) if sep and kind in KIND_BY_NAME else None
