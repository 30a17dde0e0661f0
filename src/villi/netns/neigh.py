"""Neighbour (ARP) table sizing: how many entries a node needs, and the gc_thresh to set.

The seed's lesson: on big flat subnets and nodes with many pods, the kernel's neighbour
table hits ``net.ipv4.neigh.default.gc_thresh3`` (1024 by default), drops new entries
("neighbour table overflow") and connections to fresh peers stall. A node holds one
entry per local pod it talks to (pod veths) and one per peer on its underlay subnet
(other nodes, the gateway), so the demand is its pod capacity plus the hosts of its
underlay prefix.

On Linux the IPv4 neighbour table is one per machine, not per network namespace: the
``gc_thresh*`` sysctls exist only in the initial namespace (a node namespace has no
``/proc/sys/net/ipv4/neigh/default``). So an agent inside a lab node namespace cannot
set them, and must not reach into the machine's root namespace to do it; it reports
what they should be, and ``villi status`` (which runs on the host) compares that with
the machine's values. An agent on a real host (``--allow-root-netns``) may set them.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

SYSCTL_DIR = "/proc/sys/net/ipv4/neigh/default"
THRESHOLDS = ("gc_thresh1", "gc_thresh2", "gc_thresh3")


@dataclass(frozen=True, slots=True)
class NeighThresholds:
    gc_thresh1: int
    gc_thresh2: int
    gc_thresh3: int

    def as_dict(self) -> dict[str, int]:
        return {"gc_thresh1": self.gc_thresh1, "gc_thresh2": self.gc_thresh2,
                "gc_thresh3": self.gc_thresh3}

    def sysctl_lines(self) -> list[str]:
        return [f"net.ipv4.neigh.default.{k}={v}" for k, v in self.as_dict().items()]


def neighbour_demand(pod_capacity: int, underlay_prefix: str | None) -> int:
    """Entries a node may need: one per local pod plus one per host of its underlay
    subnet (``10.0.0.5/16`` → 65,534), which is where big flat subnets overflow."""
    hosts = 0
    if underlay_prefix:
        net = ipaddress.ip_interface(underlay_prefix).network
        hosts = max(net.num_addresses - 2, 1)
    return max(pod_capacity, 0) + hosts


def recommended(demand: int) -> NeighThresholds:
    """Thresholds for ``demand`` entries: the collector leaves the table alone below
    thresh1 = demand, prunes above thresh2 = 2x, and refuses only beyond thresh3 = 4x
    (never below the kernel's defaults 128/512/1024)."""
    return NeighThresholds(max(128, demand), max(512, 2 * demand), max(1024, 4 * demand))


def read_thresholds(sysctl_dir: str = SYSCTL_DIR) -> NeighThresholds | None:
    """The thresholds as this process's namespace sees them; None where they do not
    exist (any namespace but the machine's initial one)."""
    values = []
    for name in THRESHOLDS:
        try:
            with open(os.path.join(sysctl_dir, name)) as f:
                values.append(int(f.read().strip()))
        except (OSError, ValueError):
            return None
    return NeighThresholds(*values)


def write_thresholds(target: NeighThresholds, sysctl_dir: str = SYSCTL_DIR) -> NeighThresholds:
    """Raise (never lower) the thresholds to ``target``; returns what is set after.
    Raises OSError where they cannot be written (not the initial namespace, no root)."""
    current = read_thresholds(sysctl_dir)
    if current is None:
        raise OSError(f"{sysctl_dir}/gc_thresh* do not exist in this network namespace "
                      "(the neighbour table is machine-wide: set them on the host)")
    # thresh3 first when raising, so thresh1 <= thresh2 <= thresh3 holds at every step.
    for name in reversed(THRESHOLDS):
        want = max(getattr(target, name), getattr(current, name))
        with open(os.path.join(sysctl_dir, name), "w") as f:
            f.write(str(want))
    after = read_thresholds(sysctl_dir)
    assert after is not None
    return after


def check(demand: int, current: NeighThresholds | None) -> str | None:
    """A warning when the table could overflow for ``demand`` entries, else None."""
    if current is None:
        return None
    if current.gc_thresh3 >= demand and current.gc_thresh2 >= demand:
        return None
    want = recommended(demand)
    return (f"neighbour table may overflow: up to {demand} entries needed, but "
            f"gc_thresh2={current.gc_thresh2} gc_thresh3={current.gc_thresh3}; set "
            + " ".join(want.sysctl_lines()))
