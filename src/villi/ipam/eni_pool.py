"""The node side of ENI IPAM: pod IPs out of the pool the operator attached.

The operator publishes the node's :class:`~villi.ipam.eni.ENIRecord` (secondary IPs of
the interfaces attached to this node's instance, plus IPs it wants back);
:class:`ENIPool` hands those IPs to pods and answers the release handshake:

* an IP the operator marked is never handed out again once the agent has answered
  ``ready-for-release`` (the answer and the block are persisted together before the
  answer is published), and an IP that a pod holds is answered ``do-not-release``;
* exhaustion raises :class:`~villi.errors.PoolExhausted` (CNI code 11, "try again
  later") saying how many IPs the node holds, how many the operator could still attach,
  and counts the refusal as a *pending* pod so the operator surges;
* allocations persist in ``<state_dir>/eni-ipam.json`` (atomic, fsynced) before an IP
  is returned, so a restarted agent never hands an IP out twice.

Usage reported as :class:`~villi.ipam.capacity.IPAMUsage`: ``capacity`` = IPs held +
free IPs in the pool (not being released) + ``attachable``, so ``free`` is the node's
allocatable pod IPs, the figure published as ``villi.io/ip``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from ipaddress import IPv4Address
from pathlib import Path

from villi.errors import IPAMError, PoolExhausted
from villi.ipam._state import read_json, write_json_atomic
from villi.ipam.capacity import IPAMUsage
from villi.ipam.eni import (
    DO_NOT_RELEASE,
    READY_FOR_RELEASE,
    ENIAgentStatus,
    ENIRecord,
)

STATE_FILE = "eni-ipam.json"
#: How long a refused pod counts as pending (a runtime that gave up stops counting).
PENDING_WINDOW_S = 30.0


class ENIPool:
    """Thread-safe; every change is on disk before the method returns."""

    def __init__(self, node: str, *, state_dir: Path | None = None) -> None:
        self.node = node
        self.record: ENIRecord | None = None
        self._lock = threading.Lock()
        self._path = state_dir / STATE_FILE if state_dir is not None else None
        self._owners: dict[str, str] = {}     # ip -> owner
        self._released: set[str] = set()      # answered ready-for-release: never hand out
        self._cursor = ""                     # next-fit: start after the last handed out
        self._waiting: dict[str, float] = {}  # owner refused for lack of IPs -> when
        self._restore()

    # -- operator side ----------------------------------------------------------------

    def set_record(self, record: ENIRecord) -> None:
        """Take a new record from the operator; IPs that left the pool stop being
        blocked (the operator unassigned them)."""
        with self._lock:
            self.record = record
            pool = {str(ip) for ip in record.pool()}
            self._released &= pool
            for ip, state in record.release.items():
                if ip not in self._owners and state:
                    self._released.add(ip)
            self._persist()

    def status(self) -> ENIAgentStatus:
        """The report for the operator: used IPs, release answers, pending pods."""
        with self._lock:
            release: dict[str, str] = {}
            marked = self.record.release if self.record is not None else {}
            for ip in marked:
                release[ip] = DO_NOT_RELEASE if ip in self._owners else READY_FOR_RELEASE
            return ENIAgentStatus(dict(self._owners), release, self.pending)

    @property
    def pending(self) -> int:
        """Pods refused an IP within the last :data:`PENDING_WINDOW_S` (each counted
        once however often its runtime retries): the operator's surge figure."""
        now = time.monotonic()
        self._waiting = {o: t for o, t in self._waiting.items()
                         if now - t < PENDING_WINDOW_S}
        return len(self._waiting)

    # -- pods -------------------------------------------------------------------------

    def allocate(self, owner: str) -> IPv4Address:
        with self._lock:
            for ip, who in self._owners.items():
                if who == owner:
                    return IPv4Address(ip)  # a retried ADD gets the same IP
            free = self._free()
            if not free:
                self._waiting[owner] = time.monotonic()
                raise PoolExhausted(self._exhausted_message())
            last = IPv4Address(self._cursor) if self._cursor else None
            after = [ip for ip in free if last is None or IPv4Address(ip) > last]
            ip = str((after or free)[0])
            self._owners[ip] = owner
            self._cursor = ip
            self._waiting.pop(owner, None)
            self._persist()
            return IPv4Address(ip)

    def hold(self, ip: str, owner: str) -> None:
        """Keep an address a restored endpoint already uses (even before the record
        arrives: the operator's pool will contain it)."""
        with self._lock:
            current = self._owners.get(ip)
            if current is not None and current != owner:
                raise IPAMError(f"{ip} is held by {current}, not {owner}")
            self._owners[ip] = owner
            self._persist()

    def release(self, ip: str) -> bool:
        with self._lock:
            if self._owners.pop(str(ip), None) is None:
                return False
            self._persist()
            return True

    def release_owner(self, owner: str) -> bool:
        with self._lock:
            for ip, who in list(self._owners.items()):
                if who == owner:
                    del self._owners[ip]
                    self._persist()
                    return True
            return False

    def interface_of(self, ip: str) -> str | None:
        if self.record is None:
            return None
        return self.record.pool().get(IPv4Address(ip))

    def owners(self) -> Mapping[str, str]:
        with self._lock:
            return dict(self._owners)

    def usage(self) -> IPAMUsage:
        with self._lock:
            attachable = self.record.attachable if self.record is not None else 0
            held = len(self._owners)
            return IPAMUsage(held, held + len(self._free()) + attachable)

    # -- internals --------------------------------------------------------------------

    def _free(self) -> list[str]:
        if self.record is None:
            return []
        marked = set(self.record.release)
        return sorted((str(ip) for ip in self.record.pool()
                       if str(ip) not in self._owners and str(ip) not in marked
                       and str(ip) not in self._released),
                      key=lambda s: IPv4Address(s))

    def _exhausted_message(self) -> str:
        rec = self.record
        if rec is None:
            return (f"node {self.node} has no ENI pool yet: is `villi operator --ipam eni` "
                    "running against the same kvstore and the cloud API?")
        pool = len(rec.pool())
        why = (f"the operator is attaching more (needs {rec.needed})" if rec.attachable
               else f"instance {rec.instance_id} ({rec.instance_type}: "
               f"{rec.max_interfaces} interfaces x {rec.ips_per_interface} IPs) is full")
        err = f"; last operator error: {rec.error}" if rec.error else ""
        releasing = len((set(rec.release) | self._released) - set(self._owners))
        return (f"no free ENI IP on node {self.node}: {len(self._owners)} in use, "
                f"{pool} in pool, {releasing} being released; {why}{err}")

    def _persist(self) -> None:
        if self._path is not None:
            write_json_atomic(self._path, {"version": 1, "owners": self._owners,
                                           "released": sorted(self._released),
                                           "cursor": self._cursor})

    def _restore(self) -> None:
        if self._path is None:
            return
        doc = read_json(self._path)
        if doc is None:
            return
        try:
            self._owners = {str(k): str(v) for k, v in doc["owners"].items()}
            self._released = {str(ip) for ip in doc.get("released", [])}
            self._cursor = str(doc.get("cursor", ""))
        except (KeyError, AttributeError, TypeError) as exc:
            raise IPAMError(f"{self._path}: malformed ENI IPAM state: {exc}") from None
