"""Which control-plane addresses pods may not reach without a policy (guarded.h).

The kvstore holds the cluster's security state; a pod that can talk to it can try to
rewrite it. TLS client certificates refuse such a pod (docs/security.md), and the
datapath also keeps its packets from ever reaching the kvstore: the agent writes the
kvstore's client endpoints (address, TCP port) into the ``villi_guarded`` map as the
control plane (identity ``kube-apiserver``), and a pod's packet to a guarded
destination is dropped with reason 190 unless an egress rule of that pod allows the
identity explicitly (``toEntities: [kube-apiserver]``). Node addresses (identities
``host`` and ``remote-node``) are guarded by the datapath itself.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from urllib.parse import urlsplit

from villi.datapath import abi
from villi.datapath.node import NodeDatapath
from villi.endpoint.manager import ip_be

log = logging.getLogger(__name__)

IPPROTO_TCP = 6


def kvstore_endpoints(url: str) -> list[tuple[str, int]]:
    """The IPv4 (address, port) pairs of an etcd URL list; nothing for the embedded
    store or unix sockets. Host names are resolved once, now."""
    out: list[tuple[str, int]] = []
    for part in url.split(","):
        part = part.strip()
        if not part.startswith(("http://", "https://", "etcd://")):
            continue
        split = urlsplit(part)
        host = split.hostname
        if not host:
            continue
        port = split.port or 2379
        try:
            addrs = [str(ipaddress.IPv4Address(host))]
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("kvstore host %s does not resolve (%s): not guarded", host, exc)
                continue
            addrs = sorted({str(info[4][0]) for info in infos})
        out.extend((addr, port) for addr in addrs)
    return out


def guard_control_plane(datapath: NodeDatapath, endpoints: list[tuple[str, int]]) -> None:
    """Make the guarded map hold exactly ``endpoints`` (stale entries of an earlier
    configuration are removed; the map is pinned and outlives the agent)."""
    wanted = {}
    for addr, port in endpoints:
        if ipaddress.IPv4Address(addr).is_loopback:
            continue  # a pod's 127.0.0.1 is its own; nothing to guard on the node
        key = abi.GuardedKey(addr=ip_be(addr), dport=socket.htons(port),
                             protocol=IPPROTO_TCP)
        wanted[bytes(key)] = key
    for key in datapath.guarded.keys():
        if bytes(key) not in wanted:
            datapath.guarded.delete(key)
    value = abi.IpcacheValue(identity=int(abi.ReservedIdentity.KUBE_APISERVER))
    for key in wanted.values():
        datapath.guarded.update(key, value)
    if endpoints:
        log.info("pods reach the kvstore (%s) only when a policy allows kube-apiserver",
                 ", ".join(f"{a}:{p}" for a, p in endpoints))
