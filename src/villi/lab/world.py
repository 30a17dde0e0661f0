"""The lab's outside world: its DNS server and "internet" hosts, all inside lab namespaces.

    underlay netns (villi-lab-<id>-underlay)
      br0      172.30.0.1/24 ...               (the bridge the nodes hang off)
      lo       192.0.2.53/32                   (dnsmasq, the lab's DNS server)
               198.51.100.N/32 ...             (one address per external host)
      unreachable <cluster CIDR> + pod CIDRs via node IPs   (as before: replies to pods)
    every node netns: 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24 via 172.30.0.1

Outside addresses come only from the TEST-NET ranges (RFC 5737), which never collide
with the cluster CIDR, the underlay or the machine's resolver network, and nothing
touches the root namespace. A pod reaches them the way it reaches any world address:
out through its node, so policy (``toFQDNs``, ``toCIDR``, ``toEntities: [world]``)
applies. Each pod namespace gets ``/etc/netns/<netns>/resolv.conf`` naming the lab DNS
server, which ``ip netns exec`` (and so ``villi lab exec``) mounts over
``/etc/resolv.conf``; ``getent hosts NAME`` inside a pod resolves through the lab DNS.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from villi._nsenter import in_netns
from villi.errors import NetnsError
from villi.lab import _procs, _state, dnsserver
from villi.lab._state import PREFIX, LabError
from villi.netns import routes
from villi.netns._ipr import ipr_in

DNS_IP = "192.0.2.53"
OUTSIDE_NETS = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
EXTERNAL_POOL = "198.51.100.0/24"
FIRST_EXTERNAL_HOST = 10
#: Outside addresses sit on the underlay's loopback: nodes route them via the bridge
#: address, so nothing ARPs for them (and no dummy module is needed).
WORLD_LINK = "lo"
NETNS_ETC = Path("/etc/netns")


# --- lab up / down ---------------------------------------------------------------------------

def setup(state: dict[str, Any]) -> None:
    """The world link, node routes toward it and a running DNS server (at ``lab up``)."""
    underlay = state["underlay"]
    _ensure_world_link(underlay["netns"])
    _add_address(underlay["netns"], DNS_IP)
    nodes = list(state["nodes"])
    for sub in (state.get("clusters") or {}).values():   # multi-cluster labs
        nodes += sub["nodes"]
    for node in nodes:
        for net in OUTSIDE_NETS:
            routes.replace_route(net, underlay["gateway"], node["netns"])
    state["dns"] = {"ip": DNS_IP, "dir": str(Path(state["dir"]) / "dns")}
    state.setdefault("externals", {})
    dnsserver.RecordFile(Path(state["dns"]["dir"])).save({})
    _start_dns(state)


def _ensure_world_link(netns: str) -> None:
    try:
        with ipr_in(netns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=WORLD_LINK)[0], state="up")
    except NetlinkError as e:
        raise NetnsError(f"cannot create {WORLD_LINK} in {netns}: {e}") from e


def _add_address(netns: str, ip: str) -> None:
    try:
        with ipr_in(netns) as ipr:
            idx = ipr.link_lookup(ifname=WORLD_LINK)[0]
            ipr.addr("add", index=idx, address=ip, prefixlen=32)
    except NetlinkError as e:
        if e.code != 17:   # EEXIST
            raise NetnsError(f"cannot add {ip} to {WORLD_LINK} in {netns}: {e}") from e


def _del_address(netns: str, ip: str) -> None:
    try:
        with ipr_in(netns) as ipr:
            idx = ipr.link_lookup(ifname=WORLD_LINK)[0]
            ipr.addr("del", index=idx, address=ip, prefixlen=32)
    except (NetlinkError, IndexError):
        pass


def _start_dns(state: dict[str, Any]) -> None:
    files = dnsserver.RecordFile(Path(state["dns"]["dir"]))
    log = files.dir / "dnsmasq.log"
    cmd = ["ip", "netns", "exec", state["underlay"]["netns"],
           *dnsserver.command(files.conf, DNS_IP)]
    pid = _procs.spawn(cmd, log)
    state["processes"]["dns"] = {"pid": pid, "log": str(log)}
    _wait_dns(state["underlay"]["netns"], pid, log)


def _wait_dns(netns: str, pid: int, log: Path, timeout: float = 10.0) -> None:
    from dnslib import DNSRecord

    deadline = time.monotonic() + timeout
    query = DNSRecord.question("villi-lab-probe.invalid").pack()
    while time.monotonic() < deadline:
        if not _procs.alive(pid):
            raise LabError(f"dnsmasq exited during start-up ({_procs.exit_status(pid)}); "
                           f"see {log}")
        with in_netns(netns):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.settimeout(0.2)
            s.sendto(query, (DNS_IP, 53))
            s.recvfrom(512)
            return
        except OSError:
            time.sleep(0.05)
        finally:
            s.close()
    raise LabError(f"dnsmasq does not answer on {DNS_IP}:53 after {timeout:.0f}s; see {log}")


def _restart_dns(state: dict[str, Any]) -> None:
    old = state["processes"].get("dns", {}).get("pid")
    if old:
        _procs.kill([old], f"{PREFIX}{state['id']}", grace=2.0)
    _start_dns(state)


def _require_dns(state: dict[str, Any]) -> dict[str, Any]:
    if not state.get("dns"):
        raise LabError("this lab has no DNS server (it was created by an older villi); "
                       "recreate it with `villi lab down` and `villi lab up`")
    return state["dns"]


def write_resolv_conf(netns: str) -> None:
    """Give a pod namespace its resolver: the lab DNS server (``ip netns exec`` mounts it)."""
    d = NETNS_ETC / netns
    d.mkdir(parents=True, exist_ok=True)
    (d / "resolv.conf").write_text(f"# villi lab\nnameserver {DNS_IP}\noptions timeout:2 "
                                   "attempts:2\n")


def remove_resolv_conf(netns: str) -> None:
    shutil.rmtree(NETNS_ETC / netns, ignore_errors=True)


def remove_lab_files(lab_id: str) -> int:
    """Every /etc/netns entry of lab ``lab_id`` (teardown); returns how many."""
    try:
        found = [p for p in NETNS_ETC.iterdir() if p.name.startswith(f"{PREFIX}{lab_id}-")]
    except OSError:
        return 0
    for p in found:
        shutil.rmtree(p, ignore_errors=True)
    return len(found)


# --- records -------------------------------------------------------------------------------

def dns_add(name: str, ip: str | None, ttl: int = dnsserver.DEFAULT_TTL,
            cname: str | None = None) -> dict[str, Any]:
    record = dnsserver.check_record(name, ip, ttl, cname)
    with _state.update() as state:
        files = dnsserver.RecordFile(Path(_require_dns(state)["dir"]))
        records = files.load()
        records[record["name"]] = record
        files.save(records)
        _restart_dns(state)
    return record


def dns_del(name: str) -> dict[str, Any]:
    norm = dnsserver.check_name(name)
    with _state.update() as state:
        files = dnsserver.RecordFile(Path(_require_dns(state)["dir"]))
        records = files.load()
        if norm not in records:
            raise LabError(f"no DNS record {norm} in this lab (see `villi lab dns list`)")
        if any(e["name"] == norm for e in state.get("externals", {}).values()):
            raise LabError(f"{norm} is an external host's name: use `villi lab external "
                           f"del {norm}`")
        record = records.pop(norm)
        files.save(records)
        _restart_dns(state)
    return record


def dns_records(state: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    state = state or _state.require()
    return dnsserver.RecordFile(Path(_require_dns(state)["dir"])).load()


# --- external hosts --------------------------------------------------------------------------

def _check_outside_ip(ip: str) -> str:
    try:
        addr = ipaddress.IPv4Address(ip)
    except ValueError:
        raise LabError(f"--ip {ip!r} is not an IPv4 address") from None
    if not any(addr in ipaddress.IPv4Network(n) for n in OUTSIDE_NETS):
        raise LabError(f"--ip {ip}: external hosts live in {', '.join(OUTSIDE_NETS)} "
                       "(TEST-NET ranges, never the cluster, the underlay or this "
                       "machine's networks)")
    if str(addr) == DNS_IP:
        raise LabError(f"--ip {ip} is the lab DNS server's address")
    return str(addr)


def _pick_ip(state: dict[str, Any]) -> str:
    used = {e["ip"] for e in state.get("externals", {}).values()}
    net = ipaddress.IPv4Network(EXTERNAL_POOL)
    for host in list(net.hosts())[FIRST_EXTERNAL_HOST - 1:]:
        if str(host) not in used:
            return str(host)
    raise LabError(f"no free external address left in {EXTERNAL_POOL}; give --ip")


def external_add(name: str, serve: list[dict[str, Any]], ip: str | None = None,
                 http_reply: str | None = None, ttl: int = dnsserver.DEFAULT_TTL
                 ) -> dict[str, Any]:
    """An "internet" host: an address on the world link, an echo server on it, and its
    name in the lab DNS."""
    norm = dnsserver.check_name(name)
    if not serve:
        raise LabError("an external host needs --serve PORT/PROTO[,...]")
    with _state.update() as state:
        _require_dns(state)
        externals = state.setdefault("externals", {})
        if norm in externals:
            raise LabError(f"external host {norm} already exists ({externals[norm]['ip']})")
        addr = _check_outside_ip(ip) if ip else _pick_ip(state)
        if any(e["ip"] == addr for e in externals.values()):
            raise LabError(f"{addr} is already used by another external host")
        netns = state["underlay"]["netns"]
        log = Path(state["dir"]) / f"external-{norm}.log"
        record: dict[str, Any] = {"name": norm, "ip": addr, "serve": serve,
                                  "http_reply": http_reply, "log": str(log),
                                  "server_pid": None}
        _add_address(netns, addr)
        try:
            cmd = [sys.executable, "-m", "villi.lab.echo", "--netns", netns, "--bind", addr]
            if http_reply is not None:
                cmd += ["--http-reply", http_reply]
            ports = [f"{p['port']}/{p['protocol']}" for p in serve]
            record["server_pid"] = _procs.spawn([*cmd, *ports], log, ready_line="ready")
            files = dnsserver.RecordFile(Path(state["dns"]["dir"]))
            records = files.load()
            records[norm] = dnsserver.check_record(norm, addr, ttl)
            files.save(records)
            externals[norm] = record
            _restart_dns(state)
        except BaseException:
            if record["server_pid"]:
                _procs.kill([record["server_pid"]], netns, grace=1.0)
            _del_address(netns, addr)
            externals.pop(norm, None)
            raise
    return record


def external_del(name: str) -> dict[str, Any]:
    norm = dnsserver.check_name(name)
    with _state.update() as state:
        record = state.get("externals", {}).get(norm)
        if record is None:
            raise LabError(f"no external host {norm} in this lab (see `villi lab external "
                           "list`)")
        netns = state["underlay"]["netns"]
        if record.get("server_pid"):
            _procs.kill([record["server_pid"]], netns, grace=1.0)
        _del_address(netns, record["ip"])
        files = dnsserver.RecordFile(Path(state["dns"]["dir"]))
        records = files.load()
        records.pop(norm, None)
        files.save(records)
        del state["externals"][norm]
        _restart_dns(state)
    return record


# --- name resolution from a pod --------------------------------------------------------------

def resolve_from(netns: str, name: str, timeout: float = 2.0) -> tuple[str | None, str]:
    """Ask the lab DNS server for ``name``'s A record from inside ``netns`` (the pod's own
    path, so DNS policy applies): (IP or None, why)."""
    from dnslib import QTYPE, RCODE, DNSRecord

    query = DNSRecord.question(name)
    with in_netns(netns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.settimeout(timeout)
        s.sendto(query.pack(), (DNS_IP, 53))
        reply = DNSRecord.parse(s.recvfrom(4096)[0])
    except OSError:
        return None, "no answer from the lab DNS (timeout)"
    finally:
        s.close()
    if reply.header.rcode != RCODE.NOERROR:
        return None, f"DNS {RCODE.get(reply.header.rcode)}"
    ips = [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]
    return (ips[0], "resolved") if ips else (None, "DNS answer without an A record")
