"""Endpoint lifecycle on one node: create, change identity or policy, restore, delete.

An endpoint is a pod's attachment to the node: its veth (host side in the node's
namespace, ``eth0`` in the pod's), its IPv4, its security identity and its policy
map state. The manager writes the kernel state (veth, routes, tc programs, map
entries) through ``villi.netns`` and ``villi.datapath`` and keeps a small JSON record
per endpoint in its state directory, so a restarted agent knows which veths and map
entries are its own without disturbing them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from villi.datapath import abi
from villi.endpoint import policymap
from villi.errors import EndpointError, VilliError
from villi.netns import create_pod_link, delete_link, link_info
from villi.netns.veth import PodLink

log = logging.getLogger(__name__)


class EndpointDatapath(Protocol):
    """What the manager needs of a node's datapath (``villi.datapath.node.NodeDatapath``;
    ``villi.testing.datapath.FakeNodeDatapath`` without root): the endpoint, ipcache and
    policy maps and the tc attachment of a host-side veth."""

    @property
    def endpoints(self) -> Any: ...
    @property
    def ipcache(self) -> Any: ...
    @property
    def policy(self) -> Any: ...
    def attach(self, ifindex: int, netns: str | None = None) -> None: ...


class PodLinks(Protocol):
    """The veth work of an endpoint (``VethLinks``: netlink; a fake in villi.testing)."""

    def create(self, *, host_ifname: str, host_netns: str | None, pod_netns: str,
               pod_ifname: str, ipv4: str) -> PodLink: ...
    def delete(self, ifname: str, netns: str | None = None) -> bool: ...
    def info(self, ifname: str, netns: str | None = None) -> tuple[int, str] | None: ...


class VethLinks:
    """Real veth pairs through ``villi.netns`` (needs CAP_NET_ADMIN)."""

    def create(self, *, host_ifname: str, host_netns: str | None, pod_netns: str,
               pod_ifname: str, ipv4: str) -> PodLink:
        return create_pod_link(host_ifname=host_ifname, host_netns=host_netns,
                               pod_netns=pod_netns, pod_ifname=pod_ifname, ipv4=ipv4)

    def delete(self, ifname: str, netns: str | None = None) -> bool:
        return delete_link(ifname, netns)

    def info(self, ifname: str, netns: str | None = None) -> tuple[int, str] | None:
        return link_info(ifname, netns)


def ip_be(ipv4: str) -> int:
    """An IPv4 string as the u32 the kernel stores (network order in memory)."""
    return struct.unpack("=I", socket.inet_aton(ipv4))[0]


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def host_ifname_for(key: str) -> str:
    """Host-side veth name: ``lxc`` + 11 hex digits of a hash of the attachment key."""
    return "lxc" + hashlib.sha256(key.encode()).hexdigest()[:11]


@dataclass
class Endpoint:
    """One local endpoint and everything needed to rebuild or remove its state."""

    id: int
    ipv4: str
    netns: str
    ifname: str
    host_ifname: str
    host_ifindex: int
    host_mac: str
    pod_mac: str
    identity: int
    namespace: str = "default"
    pod_name: str = ""
    container_id: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    named_ports: dict[str, list] = field(default_factory=dict)  # name -> [port, proto]
    ingress_enforced: bool = False
    egress_enforced: bool = False
    state: str = "ready"
    policy_audit: bool = False     # `villi endpoint config ID PolicyAuditMode=enabled`

    def to_json(self) -> str:
        data = asdict(self)
        if not data["policy_audit"]:
            del data["policy_audit"]   # records without audit stay readable by older agents
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Endpoint:
        return cls(**json.loads(text))


class EndpointManager:
    """Owns the endpoints of one node and their kernel state."""

    def __init__(self, datapath: EndpointDatapath, *, node_netns: str | None,
                 state_dir: Path, links: PodLinks | None = None) -> None:
        self.datapath = datapath
        self.links: PodLinks = links or VethLinks()
        self.node_netns = node_netns
        self.state_dir = state_dir / "endpoints"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.endpoints: dict[int, Endpoint] = {}
        # An endpoint's IP never changes, so this index is set at create/restore only.
        self._id_by_ip: dict[str, int] = {}
        # The map state last written per endpoint, to diff the next change against.
        self._map_state: dict[int, dict] = {}
        # The endpoints-map entry last written per endpoint (skip identical rewrites).
        self._written: dict[int, tuple] = {}

    # --- create / delete --------------------------------------------------------------
    def create(self, *, endpoint_id: int, ipv4: str, netns: str, identity: int,
               ifname: str = "eth0", attach_key: str | None = None, **meta: object) -> Endpoint:
        """Plumb a pod into the node. On any failure nothing is left behind."""
        if endpoint_id in self.endpoints:
            raise EndpointError(f"endpoint {endpoint_id} already exists")
        host_ifname = host_ifname_for(attach_key or f"{netns}/{ifname}")
        link = self.links.create(host_ifname=host_ifname, host_netns=self.node_netns,
                                 pod_netns=netns, pod_ifname=ifname, ipv4=ipv4)
        ep = Endpoint(id=endpoint_id, ipv4=ipv4, netns=netns, ifname=ifname,
                      host_ifname=host_ifname, host_ifindex=link.host_ifindex,
                      host_mac=link.host_mac, pod_mac=link.pod_mac, identity=identity,
                      **meta)  # type: ignore[arg-type]
        try:
            self._write_endpoint_entry(ep)
            self._write_ipcache(ep)
            self.datapath.attach(link.host_ifindex, self.node_netns)
            self.save(ep)
        except BaseException:
            self._remove_kernel_state(ep)
            self.links.delete(host_ifname, self.node_netns)
            raise
        self.endpoints[ep.id] = ep
        self._id_by_ip[ep.ipv4] = ep.id
        self._map_state[ep.id] = {}
        return ep

    def delete(self, endpoint_id: int) -> bool:
        """Remove an endpoint: veth, map entries, record. False when unknown."""
        ep = self.endpoints.pop(endpoint_id, None)
        if ep is None:
            return False
        self._id_by_ip.pop(ep.ipv4, None)
        self._remove_kernel_state(ep)
        self.links.delete(ep.host_ifname, self.node_netns)
        self._map_state.pop(endpoint_id, None)
        (self.state_dir / f"{endpoint_id}.json").unlink(missing_ok=True)
        return True

    def _remove_kernel_state(self, ep: Endpoint) -> None:
        self._written.pop(ep.id, None)
        self.datapath.endpoints.delete(abi.EndpointKey(addr=ip_be(ep.ipv4)))
        self.datapath.ipcache.delete(abi.IpcacheKey(prefixlen=32, addr=ip_be(ep.ipv4)))
        policymap.delete_all(self.datapath.policy, ep.id)

    # --- identity and policy ----------------------------------------------------------
    def set_identity(self, endpoint_id: int, identity: int, labels: dict[str, str] | None = None
                     ) -> Endpoint:
        ep = self._get(endpoint_id)
        ep = replace(ep, identity=identity, labels=labels if labels is not None else ep.labels)
        self._write_endpoint_entry(ep)
        self._write_ipcache(ep)
        self.endpoints[ep.id] = ep
        self.save(ep)
        return ep

    def set_policy(self, endpoint_id: int, *, ingress_enforced: bool, egress_enforced: bool,
                   map_state: Mapping) -> tuple[int, int]:
        """Install a new full policy map state for an endpoint, as a diff of the old one.

        Used at start-up (against what the kernel held) and by tests; the agent's
        steady state goes through :meth:`apply_policy_diff`.
        """
        old_state = self._map_state.get(endpoint_id, {})
        upserts = {k: v for k, v in map_state.items() if old_state.get(k) != v}
        deletes = [k for k in old_state if k not in map_state]
        return self.apply_policy_diff(endpoint_id, ingress_enforced=ingress_enforced,
                                      egress_enforced=egress_enforced, upserts=upserts,
                                      deletes=deletes)

    def apply_policy_diff(self, endpoint_id: int, *, ingress_enforced: bool,
                          egress_enforced: bool, upserts: Mapping, deletes: Iterable
                          ) -> tuple[int, int]:
        """Apply a map diff (from the policy engine) to the kernel and the record.

        Order: enforcement is relaxed first, then denies, allows and removals are
        written, and enforcement is tightened last, so no packet meets a policy that is
        stricter or looser than both the old and the new one.
        """
        ep = self._get(endpoint_id)
        deletes = list(deletes)
        state = self._map_state.setdefault(endpoint_id, {})
        before = _lookup_dirs(state)
        relaxed = replace(ep, ingress_enforced=ep.ingress_enforced and ingress_enforced,
                          egress_enforced=ep.egress_enforced and egress_enforced)
        self._write_endpoint_entry(relaxed, lookups=before | _lookup_dirs(upserts))
        counts = policymap.apply_changes(self.datapath.policy, endpoint_id, upserts, deletes)
        for k in deletes:
            state.pop(k, None)
        state.update(upserts)
        new_ep = replace(ep, ingress_enforced=ingress_enforced, egress_enforced=egress_enforced)
        self._write_endpoint_entry(new_ep, lookups=_lookup_dirs(state))
        self.endpoints[endpoint_id] = new_ep
        if (ep.ingress_enforced, ep.egress_enforced) != (ingress_enforced, egress_enforced):
            self.save(new_ep)
        return counts

    def set_policy_audit(self, endpoint_id: int, audit: bool) -> Endpoint:
        """Put one endpoint in or out of policy audit mode (EP_F_AUDIT): the datapath
        reads the flag per packet, so the next packet sees the change."""
        ep = replace(self._get(endpoint_id), policy_audit=audit)
        self._write_endpoint_entry(ep)
        self.endpoints[endpoint_id] = ep
        self.save(ep)
        return ep

    def by_ip(self, ipv4: str) -> Endpoint | None:
        """The local endpoint owning ``ipv4`` (O(1): flow enrichment calls it per flow)."""
        eid = self._id_by_ip.get(ipv4)
        return None if eid is None else self.endpoints.get(eid)

    def map_state(self, endpoint_id: int) -> dict:
        return dict(self._map_state.get(endpoint_id, {}))

    # --- restore after restart --------------------------------------------------------
    def restore(self) -> list[Endpoint]:
        """Re-adopt the endpoints recorded in the state directory whose veth still exists.

        The kernel state is left as it is (it kept enforcing while no agent ran); the
        programs are re-attached with REPLACE so the freshly loaded ones take over.
        Records whose veth vanished are dropped together with their map entries.
        """
        restored = []
        for path in sorted(self.state_dir.glob("*.json")):
            ep = self._read_record(path)
            if ep is None:
                continue
            info = self.links.info(ep.host_ifname, self.node_netns)
            if info is None or info[0] != ep.host_ifindex:
                self._remove_kernel_state(ep)
                path.unlink(missing_ok=True)
                continue
            self.datapath.attach(ep.host_ifindex, self.node_netns)
            self.endpoints[ep.id] = ep
            self._id_by_ip[ep.ipv4] = ep.id
            self._map_state[ep.id] = self._read_map_state(ep.id)
            restored.append(ep)
        return restored

    def _read_record(self, path: Path) -> Endpoint | None:
        """The endpoint saved in ``path``, or None after moving an unreadable record
        aside: one bad file (hand-edited, truncated, bad labels from an older agent)
        must not stop the agent from adopting every other endpoint."""
        from villi.endpoint.request import validate_labels

        try:
            ep = Endpoint.from_json(path.read_text())
            validate_labels(ep.labels)
            if not isinstance(ep.id, int) or not isinstance(ep.ipv4, str):
                raise ValueError("id must be an integer and ipv4 a string")
            socket.inet_aton(ep.ipv4)
        except (OSError, ValueError, TypeError, KeyError, EndpointError) as exc:
            quarantine = self.state_dir.parent / "quarantine"
            quarantine.mkdir(parents=True, exist_ok=True)
            target = quarantine / f"{path.name}.{int(time.time())}"
            path.replace(target)
            log.error("endpoint record %s is unreadable (%s): moved to %s; the other "
                      "endpoints are restored", path, exc, target)
            return None
        return ep

    def _read_map_state(self, endpoint_id: int) -> dict:
        """The entries the kernel holds for an endpoint, as MapKey → MapValue."""
        from villi.policy.mapstate import MapKey, MapValue

        state = {}
        for key, value in self.datapath.policy.items():
            if key.endpoint_id != endpoint_id:
                continue
            if key.prefixlen <= abi.POLICY_STATIC_PREFIX:
                mk = MapKey(identity=key.identity, direction=key.direction, protocol=0,
                            port=0, prefix_bits=0)
            else:
                mk = MapKey(identity=key.identity, direction=key.direction,
                            protocol=key.protocol, port=socket.ntohs(key.dport),
                            prefix_bits=key.prefixlen - abi.POLICY_STATIC_PREFIX - 8)
            state[mk] = MapValue(deny=bool(value.deny), cookie=value.cookie,
                                 redirect=bool(value.proxy_port),
                                 dns=value.proxy_port == abi.PROXY_DNS_PORT)
        return state

    # --- helpers ----------------------------------------------------------------------
    def _get(self, endpoint_id: int) -> Endpoint:
        try:
            return self.endpoints[endpoint_id]
        except KeyError:
            raise EndpointError(f"no endpoint {endpoint_id} on this node") from None

    def _write_endpoint_entry(self, ep: Endpoint, lookups: frozenset[int] | None = None
                              ) -> None:
        if lookups is None:
            lookups = _lookup_dirs(self._map_state.get(ep.id, {}))
        flags = 0
        if ep.ingress_enforced:
            flags |= abi.EP_F_INGRESS_ENFORCED
        if ep.egress_enforced:
            flags |= abi.EP_F_EGRESS_ENFORCED
        if abi.Dir.INGRESS in lookups:
            flags |= abi.EP_F_INGRESS_LOOKUP
        if abi.Dir.EGRESS in lookups:
            flags |= abi.EP_F_EGRESS_LOOKUP
        if ep.policy_audit:
            flags |= abi.EP_F_AUDIT
        cache_key = (ep.ipv4, ep.host_ifindex, ep.identity, flags)
        if self._written.get(ep.id) == cache_key:
            return
        value = abi.EndpointValue(ifindex=ep.host_ifindex, identity=ep.identity,
                                  endpoint_id=ep.id, flags=flags)
        value.pod_mac[:] = list(mac_bytes(ep.pod_mac))
        value.host_mac[:] = list(mac_bytes(ep.host_mac))
        self.datapath.endpoints.update(abi.EndpointKey(addr=ip_be(ep.ipv4)), value)
        self._written[ep.id] = cache_key

    def _write_ipcache(self, ep: Endpoint) -> None:
        self.datapath.ipcache.update(abi.IpcacheKey(prefixlen=32, addr=ip_be(ep.ipv4)),
                                     abi.IpcacheValue(identity=ep.identity))

    def save(self, ep: Endpoint) -> None:
        """Persist the endpoint record (atomic replace)."""
        tmp = self.state_dir / f".{ep.id}.json.tmp"
        tmp.write_text(ep.to_json())
        os.replace(tmp, self.state_dir / f"{ep.id}.json")


def _lookup_dirs(map_state: Mapping) -> frozenset[int]:
    """Directions in which an endpoint has entries the datapath must look up."""
    dirs: set[int] = set()
    for k in map_state:
        dirs.add(int(k.direction))
        if len(dirs) == 2:
            break
    return frozenset(dirs)


__all__ = ["Endpoint", "EndpointDatapath", "EndpointManager", "PodLinks", "VethLinks",
           "VilliError", "host_ifname_for", "ip_be"]
