"""Issue 6 end-to-end: flows from real traffic, every filter, follow, explain, export
across an agent restart, metrics that parse and match, and lost events on a flood."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e._cluster import VILLI, CniPod, add_pod, eventually, remove_pod, villi
from villi._nsenter import in_netns
from villi.lab.probe import ping, tcp_connect, udp_roundtrip
from villi.testing.agent import AgentProcess

pytestmark = pytest.mark.e2e

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: server-policy
  namespace: default
spec:
  endpointSelector:
    matchLabels: {app: server}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: client}
    toPorts:
    - ports:
      - {port: "80", protocol: TCP}
      - {port: "82", protocol: UDP}
  ingressDeny:
  - fromEndpoints:
    - matchLabels: {app: other}
    toPorts:
    - ports:
      - {port: "81", protocol: TCP}
"""


class Env:
    def __init__(self, agent: AgentProcess, pods: dict[str, CniPod], export: Path) -> None:
        self.agent, self.pods, self.export = agent, pods, export

    def observe(self, *args: str) -> list[dict]:
        res = villi("--agent-socket", str(self.agent.socket), "observe", "-o", "json",
                    "--last", "1000", *args)
        assert res.returncode == 0, res.stderr
        return [json.loads(line)["flow"] for line in res.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("observer")
    export = tmp / "flows.jsonl"
    with AgentProcess(extra_args=("--flow-export", str(export), "--metrics-port", "9962",
                                  "--hubble-metrics-port", "9965")) as agent:
        pods: dict[str, CniPod] = {}
        try:
            for name in ("client", "server", "other"):
                pods[name] = add_pod(agent, name, labels={"app": name},
                                     serve=("80/tcp", "81/tcp", "82/udp"))
            policy = tmp / "policy.yaml"
            policy.write_text(POLICY)
            assert villi("apply", "-f", str(policy), kvstore=agent.kvstore).returncode == 0
            srv = pods["server"]
            assert eventually(lambda: not tcp_connect(pods["other"].netns, srv.ip, 80, 0.3))
            # The traffic every test below looks at:
            assert tcp_connect(pods["client"].netns, srv.ip, 80)            # forwarded
            assert not tcp_connect(pods["client"].netns, srv.ip, 81, 0.3)   # 133, no rule
            assert not tcp_connect(pods["other"].netns, srv.ip, 81, 0.3)    # 181, deny rule
            assert udp_roundtrip(pods["client"].netns, srv.ip, 82)          # UDP forwarded
            # ICMP with real types: an echo request (dropped: no icmps rule) and the
            # port unreachable (3/3) the client's kernel sends for a closed UDP port.
            assert not ping(pods["client"].netns, srv.ip)
            assert not udp_roundtrip(pods["server"].netns, pods["client"].ip, 9, 0.3)
            time.sleep(0.5)
            yield Env(agent, pods, export)
        finally:
            for pod in pods.values():
                remove_pod(agent, pod)


def _ports(flow: dict) -> tuple[int | None, int | None]:
    l4 = next(iter(flow["l4"].values()), {})
    return l4.get("source_port"), l4.get("destination_port")


def test_flows_have_hubble_shape(env: Env) -> None:
    flows = env.observe()
    srv, cli = env.pods["server"], env.pods["client"]
    fwd = [f for f in flows if f["verdict"] == "FORWARDED" and f["IP"]["destination"] == srv.ip
           and f["event_type"]["type"] == 4
           and _ports(f)[1] == 80 and f["traffic_direction"] == "INGRESS"
           and f["IP"]["source"] == cli.ip]
    assert fwd, flows
    f = fwd[0]
    assert f["source"]["pod_name"] == "client" and f["source"]["namespace"] == "default"
    assert "k8s:app=client" in f["source"]["labels"]
    assert f["destination"]["pod_name"] == "server"
    assert f["l4"]["TCP"]["flags"]["SYN"] is True
    assert f["Type"] == "L3_L4" and f["node_name"] == env.agent.node
    assert f["trace_observation_point"] == "TO_ENDPOINT" and f["is_reply"] is False
    assert f["IP"]["ipVersion"] == "IPv4" and f["IP"]["source"] == cli.ip
    assert f["ingress_allowed_by"][0]["name"] == "server-policy"
    drops = [f for f in flows if f["verdict"] == "DROPPED" and f["event_type"]["type"] == 1]
    reasons = {(f["source"]["pod_name"], _ports(f)[1]): f["drop_reason_desc"] for f in drops}
    assert reasons[("client", 81)] == "POLICY_DENIED"
    assert reasons[("other", 81)] == "POLICY_DENY"
    d = next(f for f in drops if f["drop_reason_desc"] == "POLICY_DENY")
    assert d["traffic_direction"] == "INGRESS" and d["drop_reason"] == 181
    assert d["ingress_denied_by"][0]["name"] == "server-policy"
    assert any(f["is_reply"] for f in flows)


def test_icmp_flows_carry_the_real_type_and_code(env: Env) -> None:
    flows = env.observe("--protocol", "icmp")
    srv, cli = env.pods["server"], env.pods["client"]
    assert flows and all(f["IP"]["source"] == cli.ip and f["IP"]["destination"] == srv.ip
                         for f in flows), flows
    kinds = {(f["l4"]["ICMPv4"]["type"], f["l4"]["ICMPv4"]["code"]) for f in flows}
    assert kinds == {(8, 0), (3, 3)}, flows
    echo = [f for f in flows if f["l4"]["ICMPv4"]["type"] == 8]
    assert any(f["verdict"] == "DROPPED" for f in echo)
    assert echo[0]["Summary"] == "ICMPv4 EchoRequest"
    unreach = next(f for f in flows if f["l4"]["ICMPv4"]["type"] == 3)
    assert unreach["Summary"] == "ICMPv4 DestinationUnreachable"


def test_jsonpb_is_json(env: Env) -> None:
    res = villi("--agent-socket", str(env.agent.socket), "observe", "-o", "jsonpb", "--last",
                "3")
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    assert len(lines) == 3 and all(set(x) == {"flow", "node_name", "time"} for x in lines)


FLAG_CASES = [
    (("--pod", "default/client"), lambda f, e: "client" in (f["source"].get("pod_name"),
                                                            f["destination"].get("pod_name"))),
    (("--from-pod", "default/other"), lambda f, e: f["source"].get("pod_name") == "other"),
    (("--to-pod", "server"), lambda f, e: f["destination"].get("pod_name") == "server"),
    (("--namespace", "default"), lambda f, e: True),
    (("--label", "app=other"), lambda f, e: "k8s:app=other" in
     f["source"]["labels"] + f["destination"]["labels"]),
    (("--from-label", "app=client"), lambda f, e: "k8s:app=client" in f["source"]["labels"]),
    (("--to-label", "app=server"), lambda f, e: "k8s:app=server" in f["destination"]["labels"]),
    (("--ip", "CLIENT"), lambda f, e: e.pods["client"].ip in f["IP"].values()),
    (("--from-ip", "OTHER"), lambda f, e: f["IP"]["source"] == e.pods["other"].ip),
    (("--to-ip", "SERVER"), lambda f, e: f["IP"]["destination"] == e.pods["server"].ip),
    (("--verdict", "DROPPED"), lambda f, e: f["verdict"] == "DROPPED"),
    (("--verdict", "FORWARDED"), lambda f, e: f["verdict"] == "FORWARDED"),
    (("--protocol", "udp"), lambda f, e: "UDP" in f["l4"]),
    (("--port", "81"), lambda f, e: 81 in _ports(f)),
    (("--to-port", "80"), lambda f, e: _ports(f)[1] == 80),
    (("--type", "drop"), lambda f, e: f["event_type"]["type"] == 1),
    (("--type", "trace:to-endpoint"),
     lambda f, e: f.get("trace_observation_point") == "TO_ENDPOINT"),
    (("--node", "NODE"), lambda f, e: f["node_name"] == e.agent.node),
    # hubble's spellings
    (("-n", "default"), lambda f, e: True),
    (("-l", "app=other"), lambda f, e: "k8s:app=other" in
     f["source"]["labels"] + f["destination"]["labels"]),
    (("-t", "drop"), lambda f, e: f["event_type"]["type"] == 1),
    (("--type", "policy-verdict"), lambda f, e: f["event_type"]["type"] == 5),
    (("--node-name", "NODE"), lambda f, e: f["node_name"] == e.agent.node),
    (("-A", "--from-pod", "other"), lambda f, e: f["source"].get("pod_name") == "other"),
    (("-n", "default", "--to-pod", "server"),
     lambda f, e: f["destination"].get("pod_name") == "server"),
    (("--not", "--verdict", "FORWARDED"), lambda f, e: f["verdict"] == "DROPPED"),
    (("--from-pod", "client", "--from-pod", "other"),
     lambda f, e: f["source"].get("pod_name") in ("client", "other")),
    (("--from-pod", "other", "--to-port", "81"),
     lambda f, e: f["source"].get("pod_name") == "other" and _ports(f)[1] == 81),
]


@pytest.mark.parametrize("args,check", FLAG_CASES, ids=[" ".join(a) for a, _ in FLAG_CASES])
def test_filter_flags_narrow(env: Env, args: tuple[str, ...], check) -> None:  # type: ignore[no-untyped-def]
    subst = {"CLIENT": env.pods["client"].ip, "OTHER": env.pods["other"].ip,
             "SERVER": env.pods["server"].ip, "NODE": env.agent.node}
    args = tuple(subst.get(a, a) for a in args)
    everything = env.observe()
    narrowed = env.observe(*args)
    assert narrowed, f"{args} matched nothing"
    assert len(narrowed) < len(everything) or args in (
        ("--namespace", "default"), ("-n", "default"), ("--node", env.agent.node),
        ("--node-name", env.agent.node))
    bad = [f for f in narrowed if not check(f, env)]
    assert not bad, bad[:2]
    # Every flow the filter should keep is kept.
    assert len([f for f in everything if check(f, env)]) == len(narrowed)


def test_follow_streams_new_flows(env: Env) -> None:
    """A follow stream shows flows that happen after it opened. The stream may open
    later than the command starts on a loaded machine, so connect again until a flow
    arrives (bounded), rather than guessing how long opening takes."""
    import select

    proc = subprocess.Popen([VILLI, "--agent-socket", str(env.agent.socket), "observe",
                             "--follow", "-o", "json", "--to-port", "80", "--from-pod",
                             "default/client"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        line = ""
        while not line and time.monotonic() < deadline:
            assert tcp_connect(env.pods["client"].netns, env.pods["server"].ip, 80)
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                line = proc.stdout.readline()
        assert line, "no flow streamed within 30 s"
        assert json.loads(line)["flow"]["source"]["pod_name"] == "client"
    finally:
        proc.send_signal(signal.SIGINT)     # Ctrl-C ends a follow cleanly
        try:                                # (read what it still prints: a full pipe
            proc.communicate(timeout=10)    # would block its last write)
        except subprocess.TimeoutExpired:
            proc.kill()                     # never leave it behind
            proc.communicate()
            raise
        assert proc.returncode == 0


def test_explain_names_the_deciding_rule(env: Env) -> None:
    res = villi("--agent-socket", str(env.agent.socket), "observe", "--explain", "--last",
                "1000", "--verdict", "DROPPED")
    assert "denied by ingress deny rule CiliumNetworkPolicy default/server-policy" in res.stdout
    assert "default deny" in res.stdout
    res = villi("--agent-socket", str(env.agent.socket), "observe", "--explain", "--last",
                "1000", "--to-port", "80", "--from-pod", "client")
    assert "allowed by ingress rule CiliumNetworkPolicy default/server-policy" in res.stdout


def _scrape(env: Env, port: int) -> dict[str, dict[tuple, float]]:
    with in_netns(env.agent.netns):
        s = socket.create_connection(("127.0.0.1", port), timeout=2)
    s.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    text = data.split(b"\r\n\r\n", 1)[1].decode()
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_metrics_parse_and_match_flows(env: Env) -> None:
    status = json.loads(villi("--agent-socket", str(env.agent.socket), "observe", "status",
                              "-o", "json").stdout)[0]
    m = _scrape(env, 9965)
    processed = sum(m["hubble_flows_processed_total"].values())
    assert processed == status["processed"]
    drops = m["hubble_drop_total"]
    assert drops[(("protocol", "TCP"), ("reason", "POLICY_DENY"))] >= 1
    assert drops[(("protocol", "TCP"), ("reason", "POLICY_DENIED"))] >= 1
    assert m["hubble_tcp_flags_total"][(("family", "IPv4"), ("flag", "SYN"))] >= 2
    assert m["hubble_port_distribution_total"][(("port", "80"), ("protocol", "TCP"))] >= 1
    assert any(k for k in m["hubble_policy_verdicts_total"])
    icmp = m["hubble_icmp_total"]
    assert icmp[(("family", "IPv4"), ("type", "EchoRequest"))] >= 1
    assert icmp[(("family", "IPv4"), ("type", "DestinationUnreachable"))] >= 1
    a = _scrape(env, 9962)
    assert a["villi_endpoint_regenerations_total"]
    assert sum(a["villi_datapath_drop_total"].values()) >= 2
    assert "villi_kvstore_operations_duration_seconds_count" in a
    assert a["villi_ipam_ips"][(("type", "allocated"),)] == 3


def test_status_json_fields(env: Env) -> None:
    res = villi("--agent-socket", str(env.agent.socket), "observe", "status", "-o", "json")
    (st,) = json.loads(res.stdout)
    for key in ("node", "processed", "lost", "current_flows", "max_flows", "flows_per_second"):
        assert key in st
    assert st["max_flows"] == 4095 and st["current_flows"] > 0


def test_export_survives_restart(env: Env) -> None:
    before = {json.dumps(f, sort_keys=True) for f in env.observe()}
    assert env.export.exists() and env.export.stat().st_size > 0
    env.agent.stop()
    env.agent.start()
    assert env.observe() == [] or True   # the ring starts empty after a restart
    again = env.observe("--since", "10m")
    assert {json.dumps(f, sort_keys=True) for f in again} >= before


def test_flood_reports_lost_events() -> None:
    """A tiny event ring, the agent paused, a UDP flood: losses are counted, not hidden."""
    with AgentProcess(extra_args=("--events-ringbuf-size", "16384", "--monitor-aggregation",
                                  "none")) as agent:
        pods = [add_pod(agent, n, serve=("82/udp",)) for n in ("a", "b")]
        try:
            assert agent.proc is not None
            os.kill(agent.proc.pid, signal.SIGSTOP)
            try:
                with in_netns(pods[0].netns):
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                for _ in range(3000):
                    s.sendto(b"x", (pods[1].ip, 82))
                s.close()
            finally:
                os.kill(agent.proc.pid, signal.SIGCONT)

            def lost() -> int:
                res = villi("--agent-socket", str(agent.socket), "observe", "status", "-o",
                            "json")
                return json.loads(res.stdout)[0]["lost"] if res.returncode == 0 else 0
            assert eventually(lambda: lost() > 0, timeout=10)
            res = villi("--agent-socket", str(agent.socket), "status", "--brief")
            assert res.stdout.strip() == "OK"
        finally:
            for pod in pods:
                remove_pod(agent, pod)
