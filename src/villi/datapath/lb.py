"""One node's socket load balancer: ``sock.bpf.c``, its LB maps, its cgroup.

``ServiceDatapath`` compiles and loads ``sock.bpf.c`` with the node's pin root (the
same as ``NodeDatapath``'s, so both objects of a node share maps of the same name),
attaches its four programs to the node's cgroup, and writes the LB maps.

The writer speaks frontends and backends, not Kubernetes: ``apply(frontend,
backends)`` makes the maps say "connections to this VIP:port/protocol go to these
addresses" and changes only what differs from what it wrote before, in an order that
never lets a connect see a half-written service:

1. new backends are written to ``villi_lb_backends`` and new slots beyond the current
   count to ``villi_lb_services`` (invisible: the frontend's count does not reach them);
2. a shrinking service first lowers the frontend's count, so no connect picks a slot
   that is about to change;
3. slots whose backend changed are rewritten (one atomic update each; both the old and
   the new backend exist at that moment);
4. a growing service raises the count: the new slots become reachable;
5. slots beyond the new count and removed backends are deleted — in the same call, so a
   removed backend is gone from the maps before ``apply`` returns and its IP can be
   reused by another pod safely.

Ids: each frontend gets a 16-bit service id, each (frontend, backend) pair a 32-bit
backend id (not shared between services, so a backend id alone tells which service it
belongs to: affinity entries need no extra map to be checked). State lives in the
pinned maps; a new ``ServiceDatapath`` reads it back, so a restarted agent reconciles
against what the kernel holds instead of starting over.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from villi.datapath import abi, cgroup
from villi.datapath.compiler import DEFAULT_CACHE_DIR, NodeConfig, compile_program
from villi.datapath.loader import BpfObject, pin_root
from villi.datapath.maps import TypedMap
from villi.errors import MapError

PROTOCOLS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}
MAX_SERVICE_ID = 0xFFFF
MAX_BACKEND_ID = 0xFFFFFFFF

PROGRAMS = {
    "sock4_connect": cgroup.SockHook.CONNECT4,
    "sock4_sendmsg": cgroup.SockHook.SENDMSG4,
    "sock4_recvmsg": cgroup.SockHook.RECVMSG4,
    "sock4_getpeername": cgroup.SockHook.GETPEERNAME4,
}


class U32(ctypes.Structure):
    _fields_ = [("value", ctypes.c_uint32)]


@dataclass(frozen=True, order=True)
class Frontend:
    """What clients connect to: VIP, port and protocol ("TCP" or "UDP")."""

    vip: str
    port: int
    protocol: str = "TCP"

    def __str__(self) -> str:
        return f"{self.vip}:{self.port}/{self.protocol}"


@dataclass(frozen=True, order=True)
class Backend:
    """Where connections go: a pod IP and port."""

    ip: str
    port: int

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass
class _Programmed:
    service_id: int
    slots: list[Backend]           # slot i+1 → backend
    ids: dict[Backend, int]        # backend → backend id
    affinity_timeout: int


def ip_be(ip: str) -> int:
    """An IPv4 address as the u32 the kernel stores (network byte order in memory)."""
    return int(struct.unpack("=I", socket.inet_aton(str(ipaddress.IPv4Address(ip))))[0])


def ip_str(value: int) -> str:
    return socket.inet_ntoa(struct.pack("=I", value))


def port_be(port: int) -> int:
    return int(struct.unpack("=H", struct.pack("!H", port))[0])


def port_host(value: int) -> int:
    return int(struct.unpack("!H", struct.pack("=H", value))[0])


class ServiceDatapath:
    """The socket-LB programs and maps of one node (one per agent)."""

    def __init__(self, cluster: str, node: str, cgroup_path: Path | str,
                 config: NodeConfig | None = None, *,
                 cache_dir: Path = DEFAULT_CACHE_DIR) -> None:
        self.cluster = cluster
        self.node = node
        self.cgroup_path = Path(cgroup_path)
        self.config = config or NodeConfig()
        self.pin_dir = pin_root(cluster, node)
        obj_path = compile_program("sock", self.config, cache_dir=cache_dir)
        self.obj = BpfObject(obj_path, pin_root=self.pin_dir)
        self.programs = {name: self.obj.program(name) for name in PROGRAMS}
        self.services = TypedMap(self.obj.map("villi_lb_services"), abi.LbServiceKey,
                                 abi.LbServiceValue)
        self.backends = TypedMap(self.obj.map("villi_lb_backends"), U32, abi.LbBackend)
        self.revnat = TypedMap(self.obj.map("villi_lb_revnat"), abi.LbRevnatKey,
                               abi.LbRevnatValue)
        self.affinity = TypedMap(self.obj.map("villi_lb_affinity"), abi.LbAffinityKey,
                                 abi.LbAffinityValue)
        self._state: dict[Frontend, _Programmed] = {}
        self._next_service_id = 1
        self._next_backend_id = 1
        self._used_service_ids: set[int] = set()
        self._used_backend_ids: set[int] = set()
        self._restore()

    # --- attachments ----------------------------------------------------------------
    def attach(self) -> None:
        """Attach the four programs to the node's cgroup (creating it if needed)."""
        cgroup.create_cgroup(self.cgroup_path)
        for name, hook in PROGRAMS.items():
            cgroup.attach(self.cgroup_path, hook, self.programs[name].fd)

    def detach(self) -> None:
        for hook in PROGRAMS.values():
            cgroup.detach(self.cgroup_path, hook)

    # --- the map writer -------------------------------------------------------------
    @property
    def frontends(self) -> dict[Frontend, list[Backend]]:
        """What the maps hold: each frontend's backends in slot order."""
        return {fe: list(p.slots) for fe, p in sorted(self._state.items())}

    def service_id(self, frontend: Frontend) -> int | None:
        p = self._state.get(frontend)
        return None if p is None else p.service_id

    def apply(self, frontend: Frontend, backends: Iterable[Backend],
              affinity_timeout: int = 0) -> None:
        """Make ``frontend`` lead to ``backends`` (none: connects are refused).

        ``affinity_timeout`` > 0 keeps each client (network namespace) on one backend
        for that many seconds since its last connect.
        """
        proto = _proto(frontend.protocol)
        wanted = list(dict.fromkeys(backends))
        prog = self._state.get(frontend)
        created = prog is None
        if prog is None:
            prog = _Programmed(self._alloc_service_id(), [], {}, affinity_timeout)
            self._state[frontend] = prog
        old_slots = list(prog.slots)
        old_count = len(old_slots)
        new_slots = _place(old_slots, wanted)
        new_count = len(new_slots)
        keep = set(new_slots)
        removed = [b for b in old_slots if b not in keep]

        # 1. backends and slots the frontend's count does not reach yet
        added = [b for b in new_slots if b not in prog.ids]
        for b in added:
            prog.ids[b] = self._alloc_backend_id()
        self.backends.update_many(
            (U32(prog.ids[b]), abi.LbBackend(address=ip_be(b.ip), port=port_be(b.port),
                                              service_id=prog.service_id)) for b in added)
        self.services.update_many(
            (self._key(frontend, proto, i + 1), self._slot(prog, new_slots[i]))
            for i in range(old_count, new_count))
        # 2. shrink before touching the slots that go away
        if new_count < old_count:
            self._write_frontend(frontend, proto, prog, new_count, affinity_timeout)
        # 3. slots that now lead elsewhere
        self.services.update_many(
            (self._key(frontend, proto, i + 1), self._slot(prog, new_slots[i]))
            for i in range(min(old_count, new_count)) if old_slots[i] != new_slots[i])
        # 4. grow (or create, or change affinity)
        if created or new_count > old_count or (
                new_count == old_count and affinity_timeout != prog.affinity_timeout):
            self._write_frontend(frontend, proto, prog, new_count, affinity_timeout)
        # 5. forget what is gone
        for i in range(new_count, old_count):
            self.services.delete(self._key(frontend, proto, i + 1))
        for b in removed:
            self._free_backend(prog, b)
        prog.slots = new_slots
        prog.affinity_timeout = affinity_timeout

    def remove(self, frontend: Frontend) -> bool:
        """Delete a frontend: the VIP:port is no longer a service (connects pass)."""
        prog = self._state.pop(frontend, None)
        if prog is None:
            return False
        proto = _proto(frontend.protocol)
        self.services.delete(self._key(frontend, proto, 0))
        for i in range(len(prog.slots)):
            self.services.delete(self._key(frontend, proto, i + 1))
        for b in list(prog.ids):
            self._free_backend(prog, b)
        self._used_service_ids.discard(prog.service_id)
        return True

    def retain(self, frontends: Iterable[Frontend]) -> list[Frontend]:
        """Remove every frontend not in ``frontends`` (after a restart's resync)."""
        keep = set(frontends)
        gone = [fe for fe in self._state if fe not in keep]
        for fe in gone:
            self.remove(fe)
        return gone

    # --- internals ------------------------------------------------------------------
    @staticmethod
    def _key(fe: Frontend, proto: int, slot: int) -> abi.LbServiceKey:
        return abi.LbServiceKey(address=ip_be(fe.vip), dport=port_be(fe.port), slot=slot,
                                protocol=proto)

    @staticmethod
    def _slot(prog: _Programmed, backend: Backend) -> abi.LbServiceValue:
        return abi.LbServiceValue(backend_id=prog.ids[backend], service_id=prog.service_id)

    def _write_frontend(self, fe: Frontend, proto: int, prog: _Programmed, count: int,
                        affinity_timeout: int) -> None:
        val = abi.LbServiceValue(count=count, service_id=prog.service_id,
                                 affinity_timeout=max(0, affinity_timeout),
                                 flags=abi.LB_SVC_F_AFFINITY if affinity_timeout > 0 else 0)
        self.services.update(self._key(fe, proto, 0), val)

    def _free_backend(self, prog: _Programmed, backend: Backend) -> None:
        bid = prog.ids.pop(backend)
        self.backends.delete(U32(bid))
        self._used_backend_ids.discard(bid)

    def _alloc_service_id(self) -> int:
        return self._alloc(self._used_service_ids, "_next_service_id", MAX_SERVICE_ID,
                           "service ids")

    def _alloc_backend_id(self) -> int:
        return self._alloc(self._used_backend_ids, "_next_backend_id", MAX_BACKEND_ID,
                           "backend ids")

    def _alloc(self, used: set[int], cursor: str, limit: int, what: str) -> int:
        if len(used) >= limit:
            raise MapError(f"no free {what} left ({limit} in use)")
        value = getattr(self, cursor)
        while value in used:
            value = value % limit + 1
        used.add(value)
        setattr(self, cursor, value % limit + 1)
        return value

    def _restore(self) -> None:
        """Rebuild the writer's state from the pinned maps (agent restart)."""
        backends = {k.value: v for k, v in self.backends.items()}
        fronts: dict[tuple[int, int, int], tuple[abi.LbServiceKey, abi.LbServiceValue]] = {}
        slots: dict[tuple[int, int, int], dict[int, int]] = {}
        for k, v in self.services.items():
            ident = (k.address, k.dport, k.protocol)
            if k.slot == 0:
                fronts[ident] = (k, v)
            else:
                slots.setdefault(ident, {})[k.slot] = v.backend_id
        for ident, (k, v) in fronts.items():
            if k.protocol not in PROTOCOL_NAMES:
                continue
            fe = Frontend(ip_str(k.address), port_host(k.dport), PROTOCOL_NAMES[k.protocol])
            prog = _Programmed(v.service_id, [], {}, v.affinity_timeout
                               if v.flags & abi.LB_SVC_F_AFFINITY else 0)
            by_slot = slots.get(ident, {})
            for i in range(1, v.count + 1):
                be = backends.get(by_slot.get(i, 0))
                if be is None:
                    break
                b = Backend(ip_str(be.address), port_host(be.port))
                prog.slots.append(b)
                prog.ids[b] = by_slot[i]
            self._state[fe] = prog
            self._used_service_ids.add(prog.service_id)
            self._used_backend_ids.update(prog.ids.values())
        # Entries no frontend accounts for (a crash mid-write): drop them.
        live_ids = self._used_backend_ids
        for bid in backends:
            if bid not in live_ids:
                self.backends.delete(U32(bid))
        for ident, by_slot in slots.items():
            front = fronts.get(ident)
            count = front[1].count if front else 0
            for slot in by_slot:
                if slot > count:
                    k = abi.LbServiceKey(address=ident[0], dport=ident[1], slot=slot,
                                         protocol=ident[2])
                    self.services.delete(k)
        if self._used_service_ids:
            self._next_service_id = max(self._used_service_ids) % MAX_SERVICE_ID + 1
        if self._used_backend_ids:
            self._next_backend_id = max(self._used_backend_ids) % MAX_BACKEND_ID + 1

    # --- lifecycle ------------------------------------------------------------------
    def close(self) -> None:
        """Drop this process's handles; attached programs and pinned maps stay."""
        for m in (self.services, self.backends, self.revnat, self.affinity):
            m.map.close()
        self.obj.close()

    def __enter__(self) -> ServiceDatapath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _proto(name: str) -> int:
    try:
        return PROTOCOLS[name.upper()]
    except KeyError:
        raise MapError(f"protocol {name!r} cannot be load-balanced (TCP or UDP)") from None


def _place(old: Sequence[Backend], wanted: Sequence[Backend]) -> list[Backend]:
    """The new slot order: backends that stay keep their slot, new ones fill the slots
    of removed ones, then the tail; holes left are filled from the end."""
    want = set(wanted)
    slots: list[Backend | None] = [b if b in want else None for b in old]
    present = {b for b in slots if b is not None}
    fresh = [b for b in wanted if b not in present]
    for i, b in enumerate(slots):
        if b is None and fresh:
            slots[i] = fresh.pop(0)
    slots.extend(fresh)
    # compact: move tail entries into holes
    i = 0
    while i < len(slots):
        if slots[i] is None:
            while slots and slots[-1] is None:
                slots.pop()
            if i < len(slots):
                slots[i] = slots.pop()
        i += 1
    return [b for b in slots if b is not None]
