"""The node's policy switches in the pinned ``villi_policy_cfg`` map (bpf/lib/policy.h).

One u32 per slot, and each slot has exactly one writer, so no read-modify-write race
exists between them:

- ``POLICY_CFG_ENFORCEMENT`` and ``POLICY_CFG_AUDIT``: the agent (``--enable-policy``,
  ``--policy-audit-mode`` and the kvstore settings of ``villi config set``);
- ``POLICY_CFG_CLUSTER_DEGRADED``: the agent, from ``villi policy degrade --all``;
- ``POLICY_CFG_DEGRADED``: only the last-resort switch ``villi datapath policy
  degrade|restore``, which opens the pinned map directly: it needs neither the agent
  nor the kvstore, and the agent never clears it (it reports it instead).

The programs read the slots for every decision, so a change applies to the next packet.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from pathlib import Path

from villi.datapath import abi
from villi.datapath.maps import BpfMap, TypedMap
from villi.errors import MapError

MAP_NAME = "villi_policy_cfg"


class U32(ctypes.Structure):
    _fields_ = [("value", ctypes.c_uint32)]


@dataclass(frozen=True)
class PolicySwitches:
    """What the node's datapath enforces right now (read from the pinned map)."""

    enforcement: str          # default | always | never
    audit: bool               # node-wide audit mode
    degraded_since: int       # unix seconds the last-resort switch was thrown, 0 = off
    cluster_degraded: bool    # `villi policy degrade --all` reached this node's agent

    @property
    def degraded(self) -> bool:
        return bool(self.degraded_since) or self.cluster_degraded

    def as_dict(self) -> dict[str, object]:
        return {"enforcement": self.enforcement, "audit": self.audit,
                "degraded": self.degraded, "degradedSince": self.degraded_since or None,
                "localSwitch": bool(self.degraded_since),
                "clusterDegraded": self.cluster_degraded}


class PolicyConfigMap:
    """Typed access to one node's ``villi_policy_cfg``."""

    def __init__(self, typed: TypedMap[U32, U32]) -> None:
        self.map = typed

    @classmethod
    def open_pinned(cls, pin_dir: Path) -> PolicyConfigMap:
        path = pin_dir / MAP_NAME
        if not path.exists():
            raise MapError(f"no pinned policy switches at {path}: has an agent of this "
                           "node (this villi version) ever run? Check --cluster and --node")
        return cls(TypedMap(BpfMap.open_pinned(path), U32, U32))

    def get(self, slot: int) -> int:
        v = self.map.lookup(U32(slot))
        return 0 if v is None else int(v.value)

    def set(self, slot: int, value: int) -> None:
        if self.get(slot) != value:
            self.map.update(U32(slot), U32(value))

    def read(self) -> PolicySwitches:
        mode = self.get(abi.POLICY_CFG_ENFORCEMENT)
        try:
            enforcement = abi.Enforcement(mode).name.lower()
        except ValueError:
            enforcement = str(mode)
        return PolicySwitches(
            enforcement=enforcement,
            audit=bool(self.get(abi.POLICY_CFG_AUDIT)),
            degraded_since=self.get(abi.POLICY_CFG_DEGRADED),
            cluster_degraded=bool(self.get(abi.POLICY_CFG_CLUSTER_DEGRADED)))

    # --- the last-resort switch --------------------------------------------------------
    def degrade(self, now: float | None = None) -> int:
        """Throw the switch (idempotent: an earlier time is kept); returns its time."""
        since = self.get(abi.POLICY_CFG_DEGRADED)
        if not since:
            since = int(now if now is not None else time.time())
            self.map.update(U32(abi.POLICY_CFG_DEGRADED), U32(since))
        return since

    def restore(self) -> bool:
        """Clear the switch; False when it was not thrown."""
        was = bool(self.get(abi.POLICY_CFG_DEGRADED))
        self.map.update(U32(abi.POLICY_CFG_DEGRADED), U32(0))
        return was

    def close(self) -> None:
        self.map.map.close()


def read_pinned(pin_dir: Path) -> PolicySwitches | None:
    """The switches of a node's pinned datapath, or None where nothing is pinned."""
    try:
        cfg = PolicyConfigMap.open_pinned(pin_dir)
    except MapError:
        return None
    try:
        return cfg.read()
    finally:
        cfg.close()
