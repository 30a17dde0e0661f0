"""Issue 13 (lab part) end-to-end: the lab's DNS server and outside world, driven through
the CLI on a real 1-node lab. Pods resolve through dnsmasq (``getent hosts`` in ``villi
lab exec``), records come and go with their TTLs, external hosts in TEST-NET ranges are
reachable by name through the pod's node, nothing lands in the root namespace, and
toFQDNs/rules.dns policies are accepted by the agent (before any IP is learned a toFQDNs
rule allows nothing, so the external host is dropped while DNS itself passes)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from villi._nsenter import in_netns
from villi.dnsproxy.cache import CacheStore
from villi.lab import _procs, _state, cluster, world
from villi.lab._api import agent_call, healthz
from villi.lab._state import LabError
from villi.netns import routes
from villi.policy.fqdn import fqdn_identity_labels

from .test_lab import Lab, _root_net

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(tmp_path_factory.mktemp("dnslab") / "state.json")
    saved = os.environ.get("VILLI_LAB_STATE")
    os.environ["VILLI_LAB_STATE"] = str(lab.state_path)
    lab_id = None
    try:
        lab.root_before = _root_net()  # type: ignore[attr-defined]
        res = lab.run("lab", "up", "--nodes", "1", "--kvstore", "embedded")
        assert res.returncode == 0, f"lab up failed:\n{res.stdout}\n{res.stderr}"
        lab_id = lab.state["id"]
        lab.ok("lab", "pod", "add", "default/client", "--labels", "app=client")
        yield lab
    finally:
        if lab.state_path.exists():
            lab_id = lab_id or lab.state.get("id")
            lab.run("lab", "down")
        if lab_id:
            cluster.teardown(lab_id)
        if saved is None:
            os.environ.pop("VILLI_LAB_STATE", None)
        else:
            os.environ["VILLI_LAB_STATE"] = saved


def _query(lab: Lab, name: str) -> DNSRecord:
    netns = lab.state["pods"]["default/client"]["netns"]
    with in_netns(netns):
        return DNSRecord.parse(DNSRecord.question(name).send(world.DNS_IP, 53, timeout=3))


def test_pods_resolve_through_the_lab_dns(lab: Lab) -> None:
    lab.ok("lab", "dns", "add", "db.example.com", "198.51.100.200", "--ttl", "7")
    out = lab.ok("lab", "exec", "default/client", "--", "getent", "hosts", "db.example.com")
    assert out.split() == ["198.51.100.200", "db.example.com"]
    ans = _query(lab, "db.example.com")
    assert [(str(r.rdata), r.ttl) for r in ans.rr if r.rtype == QTYPE.A] == \
        [("198.51.100.200", 7)]
    assert _query(lab, "unknown.example.com").header.rcode == RCODE.NXDOMAIN
    lab.ok("lab", "dns", "del", "db.example.com")
    res = lab.run("lab", "exec", "default/client", "--", "getent", "hosts", "db.example.com")
    assert res.returncode != 0
    bad = lab.run("lab", "dns", "add", "bad name", "1.2.3.4")
    assert bad.returncode == 1 and "not a DNS name" in bad.stderr


def test_external_hosts_are_reachable_by_name(lab: Lab) -> None:
    out = lab.ok("lab", "external", "add", "api.example.com", "--serve", "80/tcp",
                 "--http-reply", "hello from api")
    assert "198.51.100." in out
    lab.ok("lab", "external", "add", "other.example.org", "--serve", "80/tcp,53/udp",
           "--ip", "203.0.113.20")
    assert lab.probe("default/client", "api.example.com", "80")
    assert lab.probe("default/client", "other.example.org", "53/udp")
    assert lab.probe("default/client", "203.0.113.20", "80")
    page = lab.ok("lab", "exec", "default/client", "--", "curl", "-s", "-m", "5",
                  "http://api.example.com/")
    assert "hello from api" in page
    res = lab.run("lab", "probe", "default/client", "nothere.example.org", "80")
    assert res.returncode == 1 and "NXDOMAIN" in res.stdout
    bad = lab.run("lab", "external", "add", "x.example.com", "--serve", "80/tcp",
                  "--ip", "10.255.0.9")
    assert bad.returncode == 1 and "TEST-NET" in bad.stderr
    lab.ok("lab", "external", "del", "other.example.org")
    assert not lab.probe("default/client", "203.0.113.20", "80")
    assert _query(lab, "other.example.org").header.rcode == RCODE.NXDOMAIN


def test_nothing_in_the_root_namespace_and_no_route_covers_the_resolver(lab: Lab) -> None:
    names, root_routes, addrs = _root_net()
    before_names, before_routes, before_addrs = lab.root_before  # type: ignore[attr-defined]
    assert names == before_names and root_routes == before_routes and addrs == before_addrs
    node = lab.state["nodes"][0]["netns"]
    for dst, _gw, _ in routes.routes(node):
        if dst and dst != "default":
            routes.check_safe_cidr(dst)   # raises if a route covers 10.255.0.0/16


def test_fqdn_policy_is_accepted_and_selects_nothing_before_a_lookup(lab: Lab) -> None:
    lab.ok("lab", "external", "add", "fqdn.example.com", "--serve", "80/tcp")
    assert lab.probe("default/client", "fqdn.example.com", "80")
    lab.apply(f"""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: fqdn, namespace: default}}
        spec:
          endpointSelector: {{matchLabels: {{app: client}}}}
          egress:
          - toCIDR: ["{world.DNS_IP}/32"]
            toPorts:
            - ports: [{{port: "53", protocol: ANY}}]
              rules:
                dns: [{{matchPattern: "*.example.com"}}]
          - toFQDNs: [{{matchName: fqdn.example.com}}]
            toPorts:
            - ports: [{{port: "80", protocol: TCP}}]
        """, "fqdn")
    # DNS passes (port 53 to the lab DNS); no IP was learned through a proxy yet, so
    # the toFQDNs rule selects nothing and the host is dropped
    assert lab.eventually("default/client", "fqdn.example.com", "80", expect=False)
    assert _query(lab, "fqdn.example.com").header.rcode == RCODE.NOERROR
    bad = Path(lab.state_path.parent / "bad.yaml")
    bad.write_text("""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bad, namespace: default}
spec:
  endpointSelector: {}
  ingress:
  - toFQDNs: [{matchName: a.com}]
""")
    res = lab.run("apply", "-f", str(bad))
    assert res.returncode != 0 and "bad.yaml:7" in res.stderr and "egress only" in res.stderr

    # What the DNS proxy does after an answer (its hook, until the steering lands): post
    # the learned IP with its fqdn labels; the agent answers once identity, ipcache and
    # policy map are written, and the connection passes. Another outside host stays out.
    sock = lab.state["nodes"][0]["socket"]
    ip = lab.state["externals"]["fqdn.example.com"]["ip"]
    assert agent_call(sock, "GET", "/v1/fqdn/patterns")["patterns"] == ["fqdn.example.com."]
    lab.ok("lab", "external", "add", "notmine.example.com", "--serve", "80/tcp")
    labels = [str(x) for x in fqdn_identity_labels(ip, {"fqdn.example.com."})]
    out = agent_call(sock, "POST", "/v1/fqdn/learned", json={"changed": {ip: labels}})
    assert out["identities"][ip] >= 1 << 24
    assert lab.probe("default/client", "fqdn.example.com", "80")   # at once: no settling
    assert not lab.probe("default/client", "notmine.example.com", "80")
    with pytest.raises(LabError, match="not an IPv4"):
        agent_call(sock, "POST", "/v1/fqdn/learned", json={"changed": {"x": labels}})
    agent_call(sock, "POST", "/v1/fqdn/learned", json={"removed": [ip]})
    assert not lab.probe("default/client", "fqdn.example.com", "80")

    # villi get fqdn-cache lists what the node's proxy persisted
    store = CacheStore(Path(lab.state["nodes"][0]["state_dir"]) / "fqdn-cache.json")
    client_ip = lab.state["pods"]["default/client"]["ip"]
    store.for_endpoint(client_ip).update("fqdn.example.com.", [(ip, 30)])
    store.save()
    listing = lab.ok("get", "fqdn-cache")
    assert client_ip in listing and "fqdn.example.com." in listing and ip in listing
    lab.apply("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: fqdn, namespace: default}
        spec:
          endpointSelector: {}
        """, "fqdn", delete=True)
    assert lab.eventually("default/client", "fqdn.example.com", "80", expect=True)


def test_dns_proxy_learns_and_the_datapath_allows_before_the_answer(lab: Lab) -> None:
    """The whole chain without the eBPF steering: the pod queries the node's DNS proxy
    directly; the proxy checks rules.dns, forwards to the lab DNS, posts the learned IP
    to the agent and releases the answer only when identity, ipcache and policy map are
    written, so a connection right after the answer passes. Names outside the pattern
    are REFUSED; an outside host not resolved through the proxy stays dropped."""
    state = lab.state
    node = state["nodes"][0]
    lab.ok("lab", "external", "add", "api2.example.com", "--serve", "80/tcp")
    lab.ok("lab", "external", "add", "side.example.com", "--serve", "80/tcp")
    lab.apply("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: proxy, namespace: default}
        spec:
          endpointSelector: {matchLabels: {app: client}}
          egress:
          - toEntities: [host]
            toPorts:
            - ports: [{port: "53", protocol: ANY}]
              rules:
                dns: [{matchPattern: "*.example.com"}]
          - toFQDNs: [{matchName: api2.example.com}]
            toPorts:
            - ports: [{port: "80", protocol: TCP}]
        """, "proxy")
    # the proxy listens on port 53 of the node (rules.dns apply to port 53)
    pin_dir = f"/sys/fs/bpf/villi/{state['cluster']}/{node['name']}"
    log = Path(state["dir"]) / "dnsproxy.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "villi.dnsproxy.service", "--netns", node["netns"],
         "--agent-socket", node["socket"], "--state-dir", node["state_dir"],
         "--listen", "0.0.0.0:53", "--upstream", world.DNS_IP, "--pin-dir", pin_dir,
         "--refresh", "0.3"],
        stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    try:
        assert (proc.stdout.readline() if proc.stdout else "").startswith("ready"), \
            log.read_text()
        client = state["pods"]["default/client"]
        deadline = time.monotonic() + 10
        while True:   # the proxy fetches the client's DNS rules within a refresh
            with in_netns(client["netns"]):
                ans = DNSRecord.parse(DNSRecord.question("api2.example.com").send(
                    node["ip"], 53, timeout=3))
            if ans.header.rcode == RCODE.NOERROR or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert ans.header.rcode == RCODE.NOERROR, log.read_text()
        ip = str(ans.rr[0].rdata)
        assert lab.probe("default/client", ip, "80")        # right after the answer
        assert not lab.probe("default/client", "side.example.com", "80")
        with in_netns(client["netns"]):
            refused = DNSRecord.parse(DNSRecord.question("evil.org").send(
                node["ip"], 53, timeout=3))
        assert refused.header.rcode == RCODE.REFUSED
        deadline = time.monotonic() + 5
        while "api2.example.com." not in lab.ok("get", "fqdn-cache"):
            assert time.monotonic() < deadline, "the proxy did not persist its cache"
            time.sleep(0.3)
        # flows to the learned IP carry its name, and --fqdn finds them
        deadline = time.monotonic() + 10
        while True:
            out = lab.ok("observe", "--last", "100", "--fqdn", "api2.example.com",
                         "-o", "json")
            if '"destination_names": ["api2.example.com."]' in out:
                break
            assert time.monotonic() < deadline, out
            time.sleep(0.5)

        # agent restart: DNS keeps being answered while it is away, and the learned IP
        # stays allowed while it is away and after it has rebuilt its policy
        marker = f"villi-lab-{state['id']}"
        _procs.kill([node["pid"]], marker, grace=5.0)
        with in_netns(client["netns"]):
            during = DNSRecord.parse(DNSRecord.question("api2.example.com").send(
                node["ip"], 53, timeout=3))
        assert during.header.rcode == RCODE.NOERROR
        assert lab.probe("default/client", ip, "80")
        pid = _procs.spawn(cluster.agent_cmd(state, node), Path(node["log"]))
        with _state.update() as st:
            st["nodes"][0]["pid"] = pid
        deadline = time.monotonic() + 60
        while (healthz(node["socket"], timeout=1.0) or {}).get("status") != "ok":
            assert time.monotonic() < deadline, cluster.log_tail(node["log"])
            time.sleep(0.2)
        assert "IPs learned by the DNS proxy" in Path(node["log"]).read_text()
        assert lab.probe("default/client", ip, "80")
        assert not lab.probe("default/client", "side.example.com", "80")
        with in_netns(client["netns"]):
            after = DNSRecord.parse(DNSRecord.question("api2.example.com").send(
                node["ip"], 53, timeout=3))
        assert after.header.rcode == RCODE.NOERROR
    finally:
        proc.terminate()
        proc.wait(10)
    lab.apply("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: proxy, namespace: default}
        spec:
          endpointSelector: {}
        """, "proxy", delete=True)


def test_ttl_expiry_keeps_ips_with_a_live_connection(lab: Lab) -> None:
    """TTL expiry through the real CT: an expired IP stays allowed while the pod holds a
    connection to it (a zombie, seen in the pinned CT map), and goes once it closes."""
    state = lab.state
    node = state["nodes"][0]
    client = state["pods"]["default/client"]
    lab.ok("lab", "external", "add", "brief.example.com", "--serve", "80/tcp", "--ttl", "1")
    lab.apply("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: ttl, namespace: default}
        spec:
          endpointSelector: {matchLabels: {app: client}}
          egress:
          - toEntities: [host]
            toPorts:
            - ports: [{port: "53", protocol: ANY}]
              rules:
                dns: [{matchPattern: "*.example.com"}]
          - toFQDNs: [{matchPattern: "*.example.com"}]
            toPorts:
            - ports: [{port: "80", protocol: TCP}]
        """, "ttl")
    log = Path(state["dir"]) / "dnsproxy-ttl.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "villi.dnsproxy.service", "--netns", node["netns"],
         "--agent-socket", node["socket"], "--state-dir", node["state_dir"],
         "--listen", "0.0.0.0:53", "--upstream", world.DNS_IP, "--refresh", "0.3",
         "--pin-dir", f"/sys/fs/bpf/villi/{state['cluster']}/{node['name']}"],
        stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    conn = None
    try:
        assert (proc.stdout.readline() if proc.stdout else "").startswith("ready")
        deadline = time.monotonic() + 10
        while True:
            with in_netns(client["netns"]):
                ans = DNSRecord.parse(DNSRecord.question("brief.example.com").send(
                    node["ip"], 53, timeout=3))
            if ans.header.rcode == RCODE.NOERROR or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert ans.header.rcode == RCODE.NOERROR, log.read_text()
        ip = str(ans.rr[0].rdata)
        with in_netns(client["netns"]):
            conn = socket.create_connection((ip, 80), timeout=3)
        time.sleep(2.5)   # TTL 1 s is over; several GC rounds ran
        conn.sendall(b"still here\n")
        assert conn.recv(64) == b"still here\n"
        assert "zombie" in lab.ok("get", "fqdn-cache")
        assert lab.probe("default/client", ip, "80")     # still allowed: live connection
        conn.close()
        conn = None
        assert lab.eventually("default/client", ip, "80", expect=False, within=10), \
            log.read_text()
    finally:
        if conn is not None:
            conn.close()
        proc.terminate()
        proc.wait(10)
    lab.apply("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: ttl, namespace: default}
        spec:
          endpointSelector: {}
        """, "ttl", delete=True)


def test_down_removes_dns_server_and_resolv_confs(lab: Lab) -> None:
    state = lab.state
    pod_netns = state["pods"]["default/client"]["netns"]
    assert (world.NETNS_ETC / pod_netns / "resolv.conf").exists()
    dns_pid = state["processes"]["dns"]["pid"]
    lab.ok("lab", "down")
    assert not (world.NETNS_ETC / pod_netns).exists()
    assert not Path(f"/proc/{dns_pid}").exists() or \
        "dnsmasq" not in Path(f"/proc/{dns_pid}/cmdline").read_text(errors="replace") or \
        subprocess.run(["ps", "-o", "stat=", "-p", str(dns_pid)], capture_output=True,
                       text=True).stdout.strip().startswith("Z")
