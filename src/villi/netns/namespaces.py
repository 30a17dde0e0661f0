"""Create, delete and configure named network namespaces."""

from __future__ import annotations

import os
import subprocess

from villi._nsenter import in_netns, netns_path
from villi.errors import NetnsError
from villi.netns._ipr import ipr_in


def _ip(*args: str) -> None:
    """``ip`` from iproute2 (namespace creation forks and mounts: let iproute2 do it)."""
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {res.stderr.strip()}")


def netns_exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def create_netns(name: str, *, forwarding: bool = False) -> None:
    """Create ``name`` (idempotent), bring its loopback up, disable IPv6 in it.

    IPv6 is off in villi's namespaces because the datapath is IPv4-only and drops
    IPv6 with a reported reason; silencing the kernel's own IPv6 chatter (router
    solicitations, DAD) keeps those drop reports meaningful.
    """
    try:
        if not netns_exists(name):
            _ip("netns", "add", name)
        with ipr_in(name) as ipr:
            ipr.link("set", index=1, state="up")
        set_sysctl(name, "net/ipv6/conf/all/disable_ipv6", "1")
        set_sysctl(name, "net/ipv6/conf/default/disable_ipv6", "1")
        if forwarding:
            set_sysctl(name, "net/ipv4/ip_forward", "1")
    except OSError as e:
        raise NetnsError(f"cannot create network namespace {name}: {e}") from e


def delete_netns(name: str) -> bool:
    """Delete ``name`` and with it every link inside; False when it did not exist."""
    if not netns_exists(name):
        return False
    try:
        _ip("netns", "delete", name)
    except OSError as e:
        raise NetnsError(f"cannot delete network namespace {name}: {e}") from e
    return True


def set_sysctl(netns_name: str | None, key: str, value: str) -> None:
    """Write a /proc/sys/<key> value as seen from inside ``netns_name``."""
    path = f"/proc/sys/{key}"
    try:
        with in_netns(netns_name):
            with open(path, "w") as f:
                f.write(value)
    except OSError as e:
        raise NetnsError(f"cannot set {key}={value} in {netns_name or 'this namespace'}: {e}") \
            from e
