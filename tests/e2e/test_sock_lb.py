"""Socket-level load balancing on the real kernel, datapath only (no agent).

A client network namespace is wired to three backend namespaces by veth pairs (plain
connected routes, nothing in the root namespace). The client runs as a helper process
in a throw-away cgroup v2 directory where ``sock.bpf.c`` is attached; the test writes
the LB maps through ``ServiceDatapath`` and asks the helper to connect to VIPs.
Each backend answers with its own name, so the test sees which backend it reached.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from villi.datapath import cgroup
from villi.datapath.lb import Backend, Frontend, ServiceDatapath, ip_str, port_host
from villi.datapath.loader import pin_root
from villi.datapath.node import remove_pins
from villi.netns import create_netns, delete_netns

pytestmark = pytest.mark.e2e

CLUSTER = "test"
VIP = "10.32.0.10"
EMPTY_VIP = "10.32.0.11"
NBACKENDS = 3

SERVER = textwrap.dedent("""
    import socket, sys, threading
    from villi._nsenter import enter_netns_for_good
    enter_netns_for_good(sys.argv[1])
    name = sys.argv[2].encode()
    tcp = socket.socket(); tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", 8080)); tcp.listen(512)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind(("0.0.0.0", 8081))
    def serve_udp():
        while True:
            data, peer = udp.recvfrom(2048)
            udp.sendto(name, peer)
    threading.Thread(target=serve_udp, daemon=True).start()
    print("ready", flush=True)
    while True:
        conn, _ = tcp.accept()
        try:
            conn.sendall(name)
        finally:
            conn.close()
""")

CLIENT = textwrap.dedent("""
    import errno, json, socket, sys, time
    from villi._nsenter import enter_netns_for_good
    enter_netns_for_good(sys.argv[1])

    def tcp(ip, port):
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect((ip, port))
            peer = s.getpeername()
            return {"name": s.recv(64).decode(), "peer": list(peer)}
        except OSError as e:
            return {"errno": e.errno}
        finally:
            s.close()

    def udp(ip, port, connected):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        try:
            if connected:
                s.connect((ip, port))
                peer = list(s.getpeername())
                s.send(b"x")
                data = s.recv(64)
                return {"name": data.decode(), "peer": peer}
            s.sendto(b"x", (ip, port))
            data, src = s.recvfrom(64)
            s.sendto(b"x", (ip, port))   # the same socket keeps its backend
            again, _ = s.recvfrom(64)
            return {"name": data.decode(), "from": list(src), "again": again.decode()}
        except OSError as e:
            return {"errno": e.errno}
        finally:
            s.close()

    print("ready", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        out = []
        t0 = time.perf_counter()
        for _ in range(req.get("n", 1)):
            if req["op"] == "tcp":
                out.append(tcp(req["ip"], req["port"]))
            else:
                out.append(udp(req["ip"], req["port"], req["op"] == "udp-connected"))
        print(json.dumps({"results": out, "seconds": time.perf_counter() - t0}), flush=True)
""")


@dataclass
class Lab:
    suffix: str
    client_ns: str
    backend_ns: list[str]
    cgroup_path: Path
    dp: ServiceDatapath | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)
    client: subprocess.Popen | None = None

    @property
    def backends(self) -> list[str]:
        return [f"10.202.{i}.2" for i in range(1, NBACKENDS + 1)]

    def names(self) -> dict[str, str]:
        return {ip: f"b{i}" for i, ip in enumerate(self.backends, 1)}

    def ask(self, op: str, ip: str, port: int, n: int = 1) -> tuple[list[dict[str, Any]], float]:
        assert self.client is not None and self.client.stdin and self.client.stdout
        self.client.stdin.write(json.dumps({"op": op, "ip": ip, "port": port, "n": n}) + "\n")
        self.client.stdin.flush()
        reply = json.loads(self.client.stdout.readline())
        return reply["results"], reply["seconds"]

    def reached(self, op: str, ip: str, port: int, n: int) -> Counter[str]:
        results, _ = self.ask(op, ip, port, n)
        return Counter(r.get("name", f"errno {r.get('errno')}") for r in results)


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def _spawn(code: str, *args: str, stdin: bool = False) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code, *args], text=True,
                            stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)
    assert proc.stdout is not None
    return proc


def _wait_ready(proc: subprocess.Popen) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", f"helper did not start: {line!r}"


@pytest.fixture
def lab() -> Iterator[Lab]:
    sfx = uuid.uuid4().hex[:6]
    lab = Lab(sfx, f"villi-s{sfx}-c", [f"villi-s{sfx}-b{i}" for i in range(1, NBACKENDS + 1)],
              cgroup.cgroup2_root() / "villi-test" / f"s{sfx}")
    try:
        create_netns(lab.client_ns)
        for i, ns in enumerate(lab.backend_ns, 1):
            create_netns(ns)
            _run("ip", "-n", lab.client_ns, "link", "add", f"vc{i}", "type", "veth", "peer",
                 "name", "eth0", "netns", ns)
            _run("ip", "-n", lab.client_ns, "addr", "add", f"10.202.{i}.1/24", "dev", f"vc{i}")
            _run("ip", "-n", ns, "addr", "add", f"10.202.{i}.2/24", "dev", "eth0")
            _run("ip", "-n", lab.client_ns, "link", "set", f"vc{i}", "up")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            lab.procs.append(_spawn(SERVER, ns, f"b{i}"))
        for proc in lab.procs:
            _wait_ready(proc)
        lab.dp = ServiceDatapath(CLUSTER, f"s{sfx}", lab.cgroup_path)
        lab.dp.attach()
        lab.client = _spawn(CLIENT, lab.client_ns, stdin=True)
        lab.procs.append(lab.client)
        cgroup.move_pid(lab.cgroup_path, lab.client.pid)
        _wait_ready(lab.client)
        yield lab
    finally:
        for proc in lab.procs:
            proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
        if lab.dp is not None:
            lab.dp.detach()
            lab.dp.close()
        cgroup.remove_cgroup(lab.cgroup_path)
        try:
            lab.cgroup_path.parent.rmdir()
        except OSError:
            pass  # another test's cgroup is still there
        remove_pins(pin_root(CLUSTER, f"s{sfx}"))
        for ns in [lab.client_ns, *lab.backend_ns]:
            delete_netns(ns)


def _program(lab: Lab, backends: list[str] | None = None, affinity: int = 0) -> None:
    assert lab.dp is not None
    ips = lab.backends if backends is None else backends
    lab.dp.apply(Frontend(VIP, 80, "TCP"), [Backend(ip, 8080) for ip in ips], affinity)
    lab.dp.apply(Frontend(VIP, 53, "UDP"), [Backend(ip, 8081) for ip in ips], affinity)


def test_tcp_reaches_every_backend_through_the_vip(lab: Lab) -> None:
    _program(lab)
    results, _ = lab.ask("tcp", VIP, 80, 60)
    assert all("name" in r for r in results), results
    assert Counter(r["name"] for r in results).keys() == {"b1", "b2", "b3"}
    # getpeername4: the application sees the VIP it connected to
    assert all(r["peer"] == [VIP, 80] for r in results)


def test_udp_replies_come_from_the_vip(lab: Lab) -> None:
    _program(lab)
    results, _ = lab.ask("udp", VIP, 53, 60)
    assert all("name" in r for r in results), results
    assert Counter(r["name"] for r in results).keys() == {"b1", "b2", "b3"}
    for r in results:
        assert r["from"] == [VIP, 53]          # recvmsg4 reverse translation
        assert r["again"] == r["name"]         # one socket sticks to one backend
    results, _ = lab.ask("udp-connected", VIP, 53, 20)
    assert all("name" in r and r["peer"] == [VIP, 53] for r in results), results


def test_traffic_to_non_service_addresses_is_untouched(lab: Lab) -> None:
    _program(lab)
    assert lab.reached("tcp", "10.202.2.2", 8080, 5) == Counter({"b2": 5})
    # a port of the VIP that is no service port passes untranslated (and goes nowhere)
    (r,), _ = lab.ask("tcp", VIP, 81)
    assert "errno" in r


def test_service_without_backends_refuses_at_once(lab: Lab) -> None:
    assert lab.dp is not None
    lab.dp.apply(Frontend(EMPTY_VIP, 80, "TCP"), [])
    lab.dp.apply(Frontend(EMPTY_VIP, 53, "UDP"), [])
    results, seconds = lab.ask("tcp", EMPTY_VIP, 80, 20)
    assert all(r == {"errno": 111} for r in results), results  # ECONNREFUSED
    assert seconds < 0.5, f"20 refused connects took {seconds:.3f}s"
    results, _ = lab.ask("udp", EMPTY_VIP, 53, 5)
    assert all(r == {"errno": 111} for r in results), results


def test_scale_down_and_up_take_effect_on_the_next_connect(lab: Lab) -> None:
    assert lab.dp is not None
    _program(lab)
    _program(lab, lab.backends[1:])           # b1 goes away
    assert "b1" not in lab.reached("tcp", VIP, 80, 40)
    assert "b1" not in lab.reached("udp", VIP, 53, 40)
    addrs = {ip_str(v.address) for _, v in lab.dp.backends.items()}
    assert lab.backends[0] not in addrs       # gone from the maps when apply returned
    _program(lab, lab.backends[:1])           # only b1 left
    assert lab.reached("tcp", VIP, 80, 20) == Counter({"b1": 20})
    _program(lab, [])                         # no backend: refused
    assert lab.reached("tcp", VIP, 80, 3) == Counter({"errno 111": 3})
    _program(lab)                             # all back
    assert lab.reached("tcp", VIP, 80, 60).keys() == {"b1", "b2", "b3"}
    lab.dp.remove(Frontend(VIP, 80, "TCP"))   # no longer a service: connects pass through
    (r,), _ = lab.ask("tcp", VIP, 80)
    assert "name" not in r and r["errno"] != 111


def test_session_affinity_keeps_a_client_on_one_backend(lab: Lab) -> None:
    assert lab.dp is not None
    _program(lab, affinity=60)
    tcp = lab.reached("tcp", VIP, 80, 30)
    assert len(tcp) == 1, tcp
    (chosen,) = tcp
    # the client netns sticks to that backend for UDP too (its own service port,
    # its own affinity entry: it may be another backend, but always the same one)
    assert len(lab.reached("udp", VIP, 53, 20)) == 1
    # the chosen backend goes away: the client moves to another one, and stays there
    keep = [ip for ip, name in lab.names().items() if name != chosen]
    _program(lab, keep, affinity=60)
    moved = lab.reached("tcp", VIP, 80, 20)
    assert len(moved) == 1 and chosen not in moved
    # affinity off again: connections spread
    _program(lab, affinity=0)
    assert len(lab.reached("tcp", VIP, 80, 60)) == 3


def test_affinity_expires_after_its_timeout(lab: Lab) -> None:
    assert lab.dp is not None
    _program(lab, affinity=1)
    seen = set()
    for _ in range(12):  # each round: one connect after the entry expired
        seen |= lab.reached("tcp", VIP, 80, 1).keys()
        if len(seen) > 1:
            break
        for key, val in lab.dp.affinity.items():  # age the entry instead of sleeping
            val.last_used_ns -= 2_000_000_000
            lab.dp.affinity.update(key, val)
    assert len(seen) > 1


def test_maps_follow_the_writer_and_survive_a_restart(lab: Lab) -> None:
    assert lab.dp is not None
    fe = Frontend(VIP, 80, "TCP")
    _program(lab)
    _program(lab, [lab.backends[2], lab.backends[0]])
    slots = sorted(k.slot for k, _ in lab.dp.services.items() if k.slot)
    front = [v for k, v in lab.dp.services.items() if k.slot == 0 and port_host(k.dport) == 80]
    assert front[0].count == 2 and slots == [1, 1, 2, 2]          # TCP and UDP slots
    by_id = {k.value: v for k, v in lab.dp.backends.items()}
    assert len(by_id) == 4                                       # 2 backends x 2 ports
    assert {ip_str(v.address) for v in by_id.values()} == {lab.backends[0], lab.backends[2]}
    # a new writer (agent restart) reads the same state back from the pinned maps
    again = ServiceDatapath(CLUSTER, f"s{lab.suffix}", lab.cgroup_path)
    try:
        assert again.frontends == lab.dp.frontends
        assert again.service_id(fe) == lab.dp.service_id(fe)
        again.apply(fe, [Backend(lab.backends[1], 8080)])        # and carries on from it
        assert lab.reached("tcp", VIP, 80, 10) == Counter({"b2": 10})
        assert again.retain([fe]) == [Frontend(VIP, 53, "UDP")]
        assert sorted(k.slot for k, _ in again.services.items()) == [0, 1]
        assert len(again.backends.items()) == 1
    finally:
        again.close()


def test_reattach_replaces_programs_atomically(lab: Lab) -> None:
    assert lab.dp is not None
    _program(lab)
    before = cgroup.query(lab.cgroup_path, cgroup.SockHook.CONNECT4)
    again = ServiceDatapath(CLUSTER, f"s{lab.suffix}", lab.cgroup_path)
    try:
        again.attach()
        after = cgroup.query(lab.cgroup_path, cgroup.SockHook.CONNECT4)
        assert len(before) == len(after) == 1 and before != after
        assert lab.reached("tcp", VIP, 80, 30).keys() == {"b1", "b2", "b3"}
    finally:
        again.close()
    for hook in cgroup.SockHook:
        assert cgroup.query(lab.cgroup_path, hook)


def test_service_table_drives_the_maps(lab: Lab) -> None:
    from villi.service.models import Service
    from villi.service.table import ServiceTable

    assert lab.dp is not None
    table = ServiceTable(lab.dp)
    model = Service.model_validate({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": "http"},
                           {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 8081}]},
    })
    table.upsert_service(model, VIP)
    assert lab.reached("tcp", VIP, 80, 3) == Counter({"errno 111": 3})  # no pods yet
    for ip in lab.backends:
        table.upsert_pod(ip, "shop", {"app": "web"}, {"http": [8080, "TCP"]})
    table.upsert_pod("10.202.9.9", "shop", {"app": "db"}, {"http": [8080, "TCP"]})
    assert lab.reached("tcp", VIP, 80, 60).keys() == {"b1", "b2", "b3"}
    assert lab.reached("udp", VIP, 53, 60).keys() == {"b1", "b2", "b3"}
    table.upsert_pod(lab.backends[0], "shop", {"app": "web"}, {})  # lost its named port
    assert lab.reached("tcp", VIP, 80, 30).keys() == {"b2", "b3"}
    assert "b1" in lab.reached("udp", VIP, 53, 60)                  # numeric target port
    table.delete_pod(lab.backends[1])
    assert lab.reached("tcp", VIP, 80, 10) == Counter({"b3": 10})
    assert table.service_of(VIP, 80) == ("shop", "web")
    assert table.service_of(lab.backends[2], 8080) == ("shop", "web")
    table.upsert_service(model.model_copy(update={"spec": model.spec.model_copy(
        update={"session_affinity": "ClientIP"})}), VIP)
    assert lab.dp.services.lookup(next(k for k, _ in lab.dp.services.items()
                                       if k.slot == 0)).flags == 1
    table.delete_service("shop", "web")
    assert lab.dp.services.items() == [] and lab.dp.backends.items() == []


def test_detach_removes_every_program(lab: Lab) -> None:
    assert lab.dp is not None
    _program(lab)
    lab.dp.detach()
    assert all(cgroup.query(lab.cgroup_path, hook) == [] for hook in cgroup.SockHook)
    assert cgroup.detach(lab.cgroup_path, cgroup.SockHook.CONNECT4) is False
    (r,), _ = lab.ask("tcp", VIP, 80)                  # untranslated: the VIP is nowhere
    assert "name" not in r
