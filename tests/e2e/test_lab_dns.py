"""Issue 13 end-to-end, on a real 1-node lab driven through the CLI: the lab's DNS server
and outside world (pods resolve through dnsmasq, external hosts in TEST-NET ranges,
nothing in the root namespace), and DNS-aware policy through the steered path — the
datapath hands pods' port-53 packets (UDP and TCP) to the DNS proxy in the node's
villi-proxy with ``bpf_sk_assign``; the proxy refuses names no ``rules.dns`` allows,
forwards the rest to the lab DNS, and releases an answer only once its IPs are allowed
(toFQDNs). Also: DNS flows and metrics, TTL expiry with and without a live connection,
an agent restart mid-test, toFQDNs + HTTP rules, AAAA and CNAME answers."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from villi._nsenter import in_netns
from villi.lab import _procs, _state, cluster, world
from villi.lab._api import agent_call, healthz
from villi.lab._state import LabError
from villi.netns import routes
from villi.policy.fqdn import fqdn_identity_labels

from .test_lab import Lab, _root_net

pytestmark = [pytest.mark.e2e]

CLIENT = "default/client"


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
        lab.ok("lab", "pod", "add", CLIENT, "--labels", "app=client")
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


def _query(lab: Lab, name: str, qtype: str = "A", *, tcp: bool = False,
           server: str = world.DNS_IP, timeout: float = 3.0) -> DNSRecord:
    """One query from inside the client pod (the pod's own path: steered when its
    policy has DNS rules)."""
    netns = lab.state["pods"][CLIENT]["netns"]
    with in_netns(netns):
        q = DNSRecord.question(name, qtype)
        return DNSRecord.parse(q.send(server, 53, tcp=tcp, timeout=timeout))


def _query_until(lab: Lab, name: str, rcode: int = RCODE.NOERROR, within: float = 20.0,
                 **kw: object) -> DNSRecord:
    """Ask until the answer has ``rcode``: right after a policy change the node's proxy
    may still be starting (the query is dropped, reason 178) or not have the new rules
    yet (REFUSED)."""
    deadline = time.monotonic() + within
    last: object = None
    while time.monotonic() < deadline:
        try:
            ans = _query(lab, name, timeout=1.0, **kw)  # type: ignore[arg-type]
        except (OSError, TimeoutError) as e:
            last = e
        else:
            if ans.header.rcode == rcode:
                return ans
            last = RCODE.get(ans.header.rcode)
        time.sleep(0.2)
    raise AssertionError(f"{name}: no {RCODE.get(rcode)} within {within} s (last: {last}); "
                         f"proxy log:\n{_proxy_log(lab)}")


def _steered_query(lab: Lab, name: str, **kw: object) -> DNSRecord:
    """After a policy change: wait until the client's DNS is steered to the proxy (a
    name outside every DNS rule gets REFUSED, which only the proxy says — dnsmasq says
    NXDOMAIN), then until ``name`` resolves through it (the proxy has the rules). A
    NOERROR alone could come straight from dnsmasq while the maps are being written,
    and then nothing was learned."""
    _query_until(lab, "steering-check.invalid", RCODE.REFUSED)
    return _query_until(lab, name, **kw)


def _a(ans: DNSRecord) -> list[str]:
    return [str(r.rdata) for r in ans.rr if r.rtype == QTYPE.A]


def _proxy_log(lab: Lab) -> str:
    path = Path(lab.state["nodes"][0]["state_dir"]) / "proxy.log"
    return path.read_text()[-3000:] if path.exists() else "(no proxy.log)"


def _connect(lab: Lab, ip: str, port: int = 80, timeout: float = 2.0) -> socket.socket:
    with in_netns(lab.state["pods"][CLIENT]["netns"]):
        return socket.create_connection((ip, port), timeout=timeout)


def _connects(lab: Lab, ip: str, port: int = 80) -> bool:
    try:
        _connect(lab, ip, port, timeout=1.0).close()
        return True
    except OSError:
        return False


def _blocked(lab: Lab, ip: str, within: float = 10.0) -> bool:
    """``ip`` is (or becomes, once a just-applied policy is in force) unreachable."""
    deadline = time.monotonic() + within
    while _connects(lab, ip):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@contextlib.contextmanager
def _policy(lab: Lab, name: str, text: str) -> Iterator[None]:
    """A policy for the body of a test, deleted even when it fails."""
    lab.apply(text, name)
    try:
        yield
    finally:
        lab.apply(f"""
            apiVersion: cilium.io/v2
            kind: CiliumNetworkPolicy
            metadata: {{name: {name}, namespace: default}}
            spec:
              endpointSelector: {{}}
            """, name, delete=True)


def _dns_rule(patterns: str = '"*.example.com"') -> str:
    return f"""
          - toCIDR: ["{world.DNS_IP}/32"]
            toPorts:
            - ports: [{{port: "53", protocol: ANY}}]
              rules:
                dns: [{{matchPattern: {patterns}}}]"""


def _cnp(name: str, egress: str) -> str:
    return f"""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: {name}, namespace: default}}
        spec:
          endpointSelector: {{matchLabels: {{app: client}}}}
          egress:{egress}
        """


def _external(lab: Lab, name: str, *args: str) -> str:
    """An outside host serving 80/tcp (kept if an earlier test made it); its IP."""
    if name not in lab.state.get("externals", {}):
        lab.ok("lab", "external", "add", name, "--serve", "80/tcp", *args)
    return str(lab.state["externals"][name]["ip"])


def _metrics(lab: Lab, port: int) -> str:
    with in_netns(lab.state["nodes"][0]["netns"]), urllib.request.urlopen(
            f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


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


def test_bad_fqdn_policy_and_bad_learned_input_are_clear_errors(lab: Lab) -> None:
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
    sock = lab.state["nodes"][0]["socket"]
    labels = [str(x) for x in fqdn_identity_labels("198.51.100.1", {"a.example.com."})]
    with pytest.raises(LabError, match="not an IPv4"):
        agent_call(sock, "POST", "/v1/fqdn/learned", json={"changed": {"x": labels}})


def test_steered_dns_opens_what_it_resolves_and_refuses_the_rest(lab: Lab) -> None:
    """Allowed name → resolves (UDP and TCP) and connects right after the answer; an
    outside host whose IP no allowed name resolved to → dropped; a name outside the
    pattern → REFUSED; DNS flows, names on flows to learned IPs, metrics, fqdn-cache."""
    _external(lab, "api.example.com", "--http-reply", "hello from api")
    _external(lab, "side.example.com")
    _external(lab, "evil.example.org")
    ext = lab.state["externals"]
    api_ip, side_ip, evil_ip = (ext[n]["ip"] for n in
                                ("api.example.com", "side.example.com", "evil.example.org"))
    assert _connects(lab, side_ip) and _connects(lab, evil_ip)   # no policy yet
    with _policy(lab, "fqdn", _cnp("fqdn", _dns_rule() + """
          - toFQDNs: [{matchName: api.example.com}]
            toPorts:
            - ports: [{port: "80", protocol: TCP}]""")):
        # before any lookup nothing outside is allowed: the toFQDNs rule selects nothing
        assert lab.eventually(CLIENT, evil_ip, "80", expect=False)
        assert not _connects(lab, api_ip)
        ans = _steered_query(lab, "api.example.com")
        assert _a(ans) == [api_ip]
        _connect(lab, api_ip).close()           # at once: the answer waited for the maps
        assert _a(_query(lab, "api.example.com", tcp=True)) == [api_ip]   # DNS over TCP
        page = lab.ok("lab", "exec", CLIENT, "--", "curl", "-s", "-m", "5",
                      "http://api.example.com/")
        assert "hello from api" in page
        # side.example.com resolves (the DNS rule allows it) but toFQDNs does not name it
        assert _a(_query(lab, "side.example.com")) == [side_ip]
        assert not lab.probe(CLIENT, "side.example.com", "80")
        # a name outside the pattern: REFUSED over UDP and TCP, and its host stays dropped
        assert _query(lab, "evil.example.org").header.rcode == RCODE.REFUSED
        assert _query(lab, "evil.example.org", tcp=True).header.rcode == RCODE.REFUSED
        res = lab.run("lab", "exec", CLIENT, "--", "getent", "hosts", "evil.example.org")
        assert res.returncode != 0
        assert not _connects(lab, evil_ip)

        # DNS flows as hubble prints them; --type l7 has them too
        out = lab.ok("observe", "--last", "300", "--protocol", "dns")
        assert "dns-request FORWARDED (DNS Query api.example.com. A)" in out
        assert f'dns-response FORWARDED (DNS Answer "{api_ip}" TTL: 30 ' \
               "(Proxy api.example.com. A))" in out
        assert "dns-request DROPPED (DNS Query evil.example.org. A)" in out
        assert "default/client" in out
        assert "dns-request" in lab.ok("observe", "--last", "300", "--type", "l7")
        # flows to the learned IP carry its name; --fqdn finds DNS flows and those
        deadline = time.monotonic() + 10
        while True:
            out = lab.ok("observe", "--last", "300", "--fqdn", "api.example.com",
                         "-o", "json")
            if '"destination_names": ["api.example.com."]' in out and '"dns"' in out:
                break
            assert time.monotonic() < deadline, out
            time.sleep(0.5)
        assert "evil.example.org" not in out
        # the to-proxy leg of the steered packets: L3/L4 events with verdict REDIRECTED
        assert "to-proxy" in lab.ok("observe", "--last", "300", "--verdict", "REDIRECTED")
        listing = lab.ok("get", "fqdn-cache")
        assert "api.example.com." in listing and api_ip in listing
        # hubble_dns_* from the real proxy traffic; the proxy's own counters
        deadline = time.monotonic() + 10
        while True:
            text = _metrics(lab, 9965)
            if 'hubble_dns_responses_total{ips_returned="1",qtypes="A",rcode="No Error"' in text:
                break
            assert time.monotonic() < deadline, text[-2000:]
            time.sleep(0.5)
        assert 'hubble_dns_queries_total{ips_returned="0",qtypes="A",rcode=""' in text
        assert 'hubble_dns_response_types_total{qtypes="A",type="A"' in text
        deadline = time.monotonic() + 10
        while "villi_proxy_dns_refused_total" not in (agent := _metrics(lab, 9962)) or \
                'villi_proxy_dns_refused_total 0.0' in agent:
            assert time.monotonic() < deadline, agent[-2000:]
            time.sleep(0.5)
        assert "villi_proxy_dns_hold_timeouts_total" in agent
    # the policy is gone: its DNS rules and toFQDNs identities with it
    assert lab.eventually(CLIENT, evil_ip, "80", expect=True)


def test_ttl_expiry_keeps_ips_with_a_live_connection(lab: Lab) -> None:
    """An expired IP stays allowed while the pod holds a connection to it (a zombie, seen
    in the pinned CT map) and goes once it closes; without a connection it goes at once."""
    _external(lab, "brief.example.com", "--ttl", "1")
    _external(lab, "short.example.com", "--ttl", "1")
    with _policy(lab, "ttl", _cnp("ttl", _dns_rule() + """
          - toFQDNs: [{matchPattern: "*.example.com"}]
            toPorts:
            - ports: [{port: "80", protocol: TCP}]""")):
        ip = _a(_steered_query(lab, "brief.example.com"))[0]
        conn = _connect(lab, ip)
        try:
            short = _a(_query(lab, "short.example.com"))[0]
            assert _connects(lab, short)
            # no live connection to short.example.com: it goes once its TTL is over
            assert lab.eventually(CLIENT, short, "80", expect=False, within=10), \
                _proxy_log(lab)
            listing = lab.ok("get", "fqdn-cache")
            assert "zombie" in listing, listing + _proxy_log(lab)
            conn.sendall(b"still here\n")
            assert conn.recv(64) == b"still here\n"
            assert _connects(lab, ip)       # still allowed: a live connection holds it
        finally:
            conn.close()
        assert lab.eventually(CLIENT, ip, "80", expect=False, within=10), _proxy_log(lab)


def test_agent_restart_keeps_dns_answered_and_learned_ips_allowed(lab: Lab) -> None:
    """The DNS proxy runs apart from the agent: while the agent is down, queries are
    answered (and IPs learned then are allowed), and after it has rebuilt its policy every
    learned IP is still allowed."""
    _external(lab, "api2.example.com")
    _external(lab, "during.example.com")
    _external(lab, "side2.example.com")
    state = lab.state
    node = state["nodes"][0]
    with _policy(lab, "restart", _cnp("restart", _dns_rule() + """
          - toFQDNs: [{matchName: api2.example.com}, {matchName: during.example.com}]
            toPorts:
            - ports: [{port: "80", protocol: TCP}]""")):
        ip = _a(_steered_query(lab, "api2.example.com"))[0]
        assert _connects(lab, ip)
        _procs.kill([node["pid"]], f"villi-lab-{state['id']}", grace=5.0)
        try:
            # agent away: DNS is answered, what was learned stays allowed, rules hold
            away = _query(lab, "api2.example.com")
            assert _a(away) == [ip], f"{away}\n{_proxy_log(lab)}"
            assert _connects(lab, ip)
            assert _query(lab, "evil.org").header.rcode == RCODE.REFUSED
            # a name learned while the agent is away: the answer is released after the
            # hold (counted), and the IP is opened once the agent is back
            during = _a(_query(lab, "during.example.com"))[0]
        finally:
            pid = _procs.spawn(cluster.agent_cmd(state, node), Path(node["log"]))
            with _state.update() as st:
                st["nodes"][0]["pid"] = pid
        deadline = time.monotonic() + 60
        while (healthz(node["socket"], timeout=1.0) or {}).get("status") != "ok":
            assert time.monotonic() < deadline, cluster.log_tail(node["log"])
            time.sleep(0.2)
        assert "IPs learned by the DNS proxy" in Path(node["log"]).read_text()
        assert _connects(lab, ip)
        assert lab.eventually(CLIENT, during, "80", expect=True, within=10), _proxy_log(lab)
        assert not lab.probe(CLIENT, "side2.example.com", "80")
        assert _a(_query(lab, "api2.example.com")) == [ip]


def test_fqdn_with_http_rules_goes_through_both_proxies(lab: Lab) -> None:
    """toFQDNs + an HTTP rule: the name is learned through the DNS proxy, and requests to
    its IP are judged by the HTTP proxy (GET / allowed, anything else 403)."""
    _external(lab, "web.example.com", "--http-reply", "hello from web")
    with _policy(lab, "fqdnhttp", _cnp("fqdnhttp", _dns_rule() + """
          - toFQDNs: [{matchName: web.example.com}]
            toPorts:
            - ports: [{port: "80", protocol: TCP}]
              rules:
                http: [{method: GET, path: "/"}]""")):
        _steered_query(lab, "web.example.com")
        url = "http://web.example.com/"
        ok = lab.ok("lab", "exec", CLIENT, "--", "curl", "-s", "-m", "5", url)
        assert "hello from web" in ok
        denied = lab.ok("lab", "exec", CLIENT, "--", "curl", "-s", "-m", "5", "-o",
                        "/dev/null", "-w", "%{http_code}", "-XPUT", url)
        assert denied == "403"
        other = lab.ok("lab", "exec", CLIENT, "--", "curl", "-s", "-m", "5",
                       "http://web.example.com/admin")
        assert "Access denied" in other
        out = lab.ok("observe", "--last", "300", "--type", "l7")
        assert "http-request DROPPED (HTTP/1.1 PUT http://web.example.com/)" in out
        assert "dns-request FORWARDED (DNS Query web.example.com. A)" in out


def test_aaaa_and_cname_answers(lab: Lab) -> None:
    """AAAA queries pass through the proxy (IPv6 answers are forwarded; the datapath is
    IPv4-only, so nothing is learned from them); a CNAME chain opens the A records' IPs
    for a toFQDNs rule naming the alias."""
    _external(lab, "target.example.com")
    lab.ok("lab", "dns", "add", "alias.example.com", "--cname", "target.example.com")
    lab.ok("lab", "dns", "add", "six.example.com", "2001:db8::6")
    target = lab.state["externals"]["target.example.com"]["ip"]
    with _policy(lab, "chain", _cnp("chain", _dns_rule() + """
          - toFQDNs: [{matchName: alias.example.com}]
            toPorts:
            - ports: [{port: "80", protocol: TCP}]""")):
        assert _blocked(lab, target)   # once the policy is in force
        ans = _steered_query(lab, "alias.example.com")
        assert [str(r.rdata) for r in ans.rr if r.rtype == QTYPE.CNAME] == \
            ["target.example.com."]
        assert _a(ans) == [target]
        assert _connects(lab, target)
        six = _query(lab, "six.example.com", "AAAA")
        assert [str(r.rdata) for r in six.rr if r.rtype == QTYPE.AAAA] == ["2001:db8::6"]
        out = lab.ok("observe", "--last", "300", "--fqdn", "alias.example.com")
        assert "dns-response FORWARDED (DNS Answer \"target.example.com.\"," in out
        assert "DNS Query six.example.com. AAAA" in \
            lab.ok("observe", "--last", "300", "--protocol", "dns")
    lab.ok("lab", "dns", "del", "alias.example.com")
    lab.ok("lab", "dns", "del", "six.example.com")


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
