"""Relay, UI and metric-option pieces without a kernel: --hubble-metrics parsing, context
labels, flows-to-world, the service map, Hubble protobuf conversion, the agent's token
guard and the relay's reconnect-with-backoff (real HTTP servers on loopback)."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.test_observer_units import CTX, ip, records, with_policy_verdicts
from villi.observer.flow import to_flow
from villi.observer.metrics import HubbleMetrics
from villi.observer.metricsconfig import MetricsConfigError, parse
from villi.relay import convert
from villi.relay.peers import parse_peer, peers_from_entries
from villi.ui import servicemap

ROOT = Path(__file__).resolve().parents[2]


def _families(m: HubbleMetrics) -> dict:
    return {f.name: f for f in
            text_string_to_metric_families(generate_latest(m.registry).decode())}


def test_hubble_metrics_flag_parses_hubble_syntax() -> None:
    cfg = parse("drop flow policy:sourceContext=app|pod;destinationContext=pod;"
                "labelsContext=source_namespace,destination_namespace")
    assert set(cfg.metrics) == {"drop", "flow", "policy"}
    pol = cfg.options("policy")
    assert pol.source_context == ("app", "pod") and pol.destination_context == ("pod",)
    assert pol.labels_context == ("source_namespace", "destination_namespace")
    assert set(parse("dns,drop,tcp,flow,port-distribution,icmp,httpV2,policy,"
                     "flows-to-world").metrics) == set(parse(None).metrics)
    assert parse("flows-to-world:port;syn-only").options("flows-to-world").flags == \
        {"port", "syn-only"}


@pytest.mark.parametrize("bad, words", [
    ("drop kafka", "unknown metric 'kafka'"),
    ("policy:sourceContext=planet", "unknown context 'planet'"),
    ("drop:colour=red", "unknown option 'colour'"),
    ("policy:labelsContext=source_colour", "unknown label 'source_colour'"),
])
def test_hubble_metrics_flag_rejects_bad_values(bad: str, words: str) -> None:
    with pytest.raises(MetricsConfigError, match=re.escape(words)):
        parse(bad)


def test_agent_rejects_bad_hubble_metrics_before_starting() -> None:
    import argparse

    from villi.agent.config import add_arguments, from_args

    ap = argparse.ArgumentParser()
    add_arguments(ap)
    ok = from_args(ap.parse_args(["--node", "n", "--hubble-metrics", "drop,flow",
                                  "--flows-listen", "1.2.3.4:4244"]))
    assert ok.hubble_metrics == "drop,flow" and ok.flows_listen == "1.2.3.4:4244"
    with pytest.raises(MetricsConfigError, match="unknown metric 'dorp'"):
        from_args(ap.parse_args(["--node", "n", "--hubble-metrics", "dorp"]))


def test_relay_cli_errors_are_clear(tmp_path: Path) -> None:
    from villi.cli.main import main

    token = tmp_path / "t"
    token.write_text("short\n")
    assert main(["relay", "--token-file", str(token), "--peer", "a=1.2.3.4:1"]) == 1
    token.write_text("x" * 24 + "\n")
    assert main(["relay", "--token-file", str(token)]) == 1
    assert main(["relay", "--token-file", str(token), "--peer", "a=1.2.3.4:1",
                 "--grpc-listen", "0.0.0.0:4245"]) == 1   # remote gRPC needs a client token


def test_only_enabled_metrics_exist() -> None:
    fams = _families(HubbleMetrics(config=parse("drop")))
    assert "hubble_drop" in fams and "hubble_flows_processed" not in fams
    assert "hubble_lost_events" in fams      # always, as in Hubble


def test_context_labels_name_workloads() -> None:
    m = HubbleMetrics(config=parse("policy:sourceContext=app|pod;destinationContext=pod;"
                                   "labelsContext=source_namespace,traffic_direction"),
                      ctx=CTX)
    m.count(with_policy_verdicts(records()))
    samples = [s for s in _families(m)["hubble_policy_verdicts"].samples
               if s.name.endswith("_total")]
    got = {(s.labels["source"], s.labels["destination"], s.labels["source_namespace"],
            s.labels["traffic_direction"], s.labels["action"]): s.value for s in samples}
    assert got == {("client", "default/server", "default", "ingress", "forwarded"): 1.0,
                   ("other", "default/server", "prod", "ingress", "dropped"): 1.0,
                   ("client", "default/server", "default", "ingress", "dropped"): 1.0}


def test_series_of_a_departed_pod_expire() -> None:
    m = HubbleMetrics(config=parse("drop:sourceContext=pod policy:sourceContext=app"),
                      ctx=CTX)
    m.count(with_policy_verdicts(records()))
    before = {s.labels["source"] for s in _families(m)["hubble_drop"].samples}
    assert "prod/other" in before
    m.forget_pod("prod", "other", "10.1.0.3")       # no running loop: at once
    after = {s.labels["source"] for s in _families(m)["hubble_drop"].samples}
    assert "prod/other" not in after and "default/client" in after
    apps = {s.labels["source"] for s in _families(m)["hubble_policy_verdicts"].samples}
    assert "other" in apps        # keyed by app: the workload outlives the pod


def test_flows_to_world_counts_new_connections_to_world() -> None:
    r = records()
    r["dst_identity"][:3] = 2          # three flows to reserved:world, one reply
    m = HubbleMetrics(config=parse("flows-to-world:port"), ctx=CTX)
    m.count(r)
    got = {(s.labels["protocol"], s.labels["verdict"], s.labels["port"]): s.value
           for s in _families(m)["hubble_flows_to_world"].samples
           if s.name.endswith("_total")}
    assert got == {("TCP", "FORWARDED", "80"): 1.0, ("TCP", "DROPPED", "81"): 1.0,
                   ("UDP", "DROPPED", "53"): 1.0}


def test_l7_flows_feed_http_metrics() -> None:
    m = HubbleMetrics()
    m.count_l7({"traffic_direction": "INGRESS", "l7": {
        "type": "RESPONSE", "latency_ns": 2_000_000,
        "http": {"method": "GET", "code": 503, "protocol": "HTTP/1.1"}}})
    fams = _families(m)
    req = [s for s in fams["hubble_http_requests"].samples if s.name.endswith("_total")]
    assert [(s.labels["method"], s.labels["status"], s.labels["reporter"], s.value)
            for s in req] == [("GET", "503", "server", 1.0)]


def test_l7_metrics_carry_context_labels() -> None:
    m = HubbleMetrics(config=parse("httpV2:sourceContext=app;destinationContext=pod;"
                                   "labelsContext=destination_namespace"))
    m.count_l7({"traffic_direction": "INGRESS",
                "source": {"labels": ["k8s:app=frontend"], "namespace": "shop",
                           "pod_name": "fe-1"},
                "destination": {"labels": ["k8s:app=web"], "namespace": "shop",
                                "pod_name": "web-1"},
                "l7": {"type": "RESPONSE", "http": {"method": "POST", "code": 201}}})
    req = [s for s in _families(m)["hubble_http_requests"].samples
           if s.name.endswith("_total")]
    assert [(s.labels["source"], s.labels["destination"], s.labels["destination_namespace"])
            for s in req] == [("frontend", "shop/web-1", "shop")]


def test_flow_carries_hubble_identity_fields() -> None:
    a, b = to_flow(records()[0], 0, CTX), to_flow(records()[0], 0, CTX)
    assert a["uuid"] == b["uuid"] and len(a["uuid"]) == 36
    assert to_flow(records()[1], 0, CTX)["uuid"] != a["uuid"]


def _flow(src: tuple, dst: tuple, port: int, verdict: str, **extra: object) -> dict:
    def ep(t: tuple) -> dict:
        ns, pod, app = t
        return {"namespace": ns, "pod_name": pod, "labels": [f"k8s:app={app}"],
                "identity": 300}
    return {"source": ep(src), "destination": ep(dst), "verdict": verdict,
            "l4": {"TCP": {"destination_port": port}}, "IP": {}, **extra}


def test_service_map_cards_arrows_and_verdicts() -> None:
    web_, fe, bad = ("shop", "web-1", "web"), ("shop", "fe-1", "frontend"), \
        ("tools", "x-1", "intruder")
    flows = [
        _flow(fe, web_, 80, "FORWARDED", trace_observation_point="TO_STACK"),
        _flow(fe, web_, 80, "FORWARDED", trace_observation_point="TO_ENDPOINT",
              l7={"http": {"method": "GET", "url": "http://web/api", "code": 200}}),
        _flow(bad, web_, 80, "FORWARDED", trace_observation_point="TO_STACK"),
        _flow(bad, web_, 80, "DROPPED"),
        _flow(fe, web_, 81, "FORWARDED", trace_observation_point="TO_ENDPOINT"),
        _flow(fe, web_, 81, "DROPPED"),
        _flow(web_, fe, 40000, "FORWARDED", is_reply=True),
        {"source": {"namespace": "shop", "pod_name": "fe-1", "labels": ["k8s:app=frontend"]},
         "destination": {"labels": ["reserved:world"], "identity": 2}, "verdict": "FORWARDED",
         "l4": {"UDP": {"destination_port": 53}}, "trace_observation_point": "TO_STACK"},
    ]
    view = servicemap.build(flows)
    arrows = {a["id"]: a for a in view["arrows"]}
    assert arrows["shop/frontend->shop/web:80/TCP"]["verdict"] == "forwarded"
    assert arrows["shop/frontend->shop/web:80/TCP"]["methods"] == ["GET"]
    assert arrows["shop/frontend->shop/web:80/TCP"]["status_classes"] == ["2xx"]
    assert arrows["tools/intruder->shop/web:80/TCP"]["verdict"] == "dropped"
    assert arrows["shop/frontend->shop/web:81/TCP"]["verdict"] == "mixed"
    assert arrows["shop/frontend->reserved:world:53/UDP"]["verdict"] == "forwarded"
    assert not any(a["source"] == "shop/web" for a in view["arrows"])     # replies
    assert view["namespaces"] == ["shop", "tools"]
    cards = {c["id"]: c for c in view["cards"]}
    assert cards["shop/web"]["http"] == ["GET /api"]
    assert cards["reserved:world"]["kind"] == "reserved"
    only = servicemap.build(flows, "tools")
    assert [a["id"] for a in only["arrows"]] == ["tools/intruder->shop/web:80/TCP"]


def test_service_map_of_a_mesh_has_a_card_per_cluster() -> None:
    """Flows from a relay over two clusters: app=x of c1 and of c2 are distinct cards;
    flows of one cluster keep the plain ``ns/app`` ids."""
    def flow(src_cluster: str, dst_cluster: str) -> dict:
        f = _flow(("mesh", f"x-{src_cluster}", "x"), ("mesh", f"srv-{dst_cluster}", "srv"),
                  80, "FORWARDED")
        f["source"]["cluster_name"] = src_cluster
        f["destination"]["labels"].append(f"k8s:io.cilium.k8s.policy.cluster={dst_cluster}")
        return f

    view = servicemap.build([flow("c1", "c1"), flow("c2", "c1")])
    assert {a["id"] for a in view["arrows"]} == {"c1/mesh/x->c1/mesh/srv:80/TCP",
                                                 "c2/mesh/x->c1/mesh/srv:80/TCP"}
    assert {c["id"]: c["cluster"] for c in view["cards"]} == {
        "c1/mesh/x": "c1", "c2/mesh/x": "c2", "c1/mesh/srv": "c1"}
    one = servicemap.build([flow("c1", "c1")])
    assert {c["id"] for c in one["cards"]} == {"mesh/x", "mesh/srv"}


def test_flow_dict_to_hubble_protobuf() -> None:
    from villi.relay.proto import flow_pb2

    f = to_flow(records()[1], 0, CTX)
    pb = convert.to_proto(f)
    assert pb.verdict == flow_pb2.DROPPED and pb.drop_reason_desc == flow_pb2.POLICY_DENY
    assert pb.source.pod_name == "other" and pb.source.namespace == "prod"
    assert pb.l4.TCP.destination_port == 81 and pb.l4.TCP.flags.SYN
    assert pb.IP.source == "10.1.0.3" and pb.IP.ipVersion == flow_pb2.IPv4
    assert pb.traffic_direction == flow_pb2.INGRESS and pb.uuid == f["uuid"]
    assert [p.name for p in pb.ingress_denied_by] == ["p"]
    # Hubble's field numbers on the wire: uuid is field 34, node_name 11
    wire = flow_pb2.Flow(uuid="u", node_name="n").SerializeToString()
    assert wire == b"\x5a\x01n" + b"\x92\x02\x01u" or wire == b"\x92\x02\x01u\x5a\x01n"


def test_hubble_filter_to_villi_filter() -> None:
    from villi.relay.proto import flow_pb2

    spec = convert.to_spec(flow_pb2.FlowFilter(verdict=[flow_pb2.DROPPED],
                                               destination_pod=["shop/web"]))
    assert {(p.field, tuple(p.values)) for p in spec.predicates} == \
        {("verdict", ("DROPPED",)), ("to-pod", ("shop/web",))}
    with pytest.raises(convert.UnsupportedFilter, match="http_path"):
        convert.to_spec(flow_pb2.FlowFilter(http_path=["/x"]))


def test_peers() -> None:
    assert parse_peer("n1=10.0.0.1:4244").address == "10.0.0.1:4244"
    with pytest.raises(Exception, match="NAME=HOST:PORT"):
        parse_peer("10.0.0.1")
    from ipaddress import IPv4Address

    from villi.kvstore.schema import NodeEntry

    entries = {"b": NodeEntry("b", IPv4Address("1.1.1.2")),
               "a": NodeEntry("a", IPv4Address("1.1.1.1")), "c": NodeEntry("c", None)}
    assert [p.name for p in peers_from_entries(entries, 4244)] == ["a", "b"]


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def test_agent_flow_endpoint_guard_and_relay_reconnect(monkeypatch) -> None:
    """An agent-like flow app behind the real token guard: no token → 401, too many
    readers → 503; the relay's follow reconnects after the stream drops, with backoff,
    and reports the node's state changes."""
    from villi.agent.flowserver import build_flow_app
    from villi.relay import hub
    from villi.relay.peers import Peer

    monkeypatch.setattr(hub, "RECONNECT", hub.BackoffPolicy(base=0.01, cap=0.05,
                                                            max_attempts=None))
    token = "t" * 20
    connects = 0

    async def flows(request: web.Request) -> web.StreamResponse:
        nonlocal connects
        connects += 1
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write((json.dumps({"time": f"2026-01-01T00:00:0{connects}.0Z",
                                      "n": connects}) + "\n").encode())
        if request.query.get("hold"):
            await asyncio.sleep(0.6)
        return resp    # the stream ends: the relay must reconnect

    runner, port = await _serve(build_flow_app([("GET", "/v1/flows", flows)], token, 1))
    try:
        import httpx

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            assert (await c.get("/v1/flows")).status_code == 401
            auth = {"Authorization": f"Bearer {token}"}
            held = asyncio.create_task(c.get("/v1/flows", params={"hold": "1"},
                                             headers=auth))
            await asyncio.sleep(0.2)
            assert (await c.get("/v1/flows", headers=auth)).status_code == 503
            await held
        connects = 0

        async def peers() -> list[Peer]:
            return [Peer("n1", f"127.0.0.1:{port}")]

        relay = hub.Relay(peers, token)
        seen = []
        agen = relay.follow({})
        async for item in agen:
            seen.append(item)
            if sum("flow" in i for i in seen) >= 3:
                break
        await agen.aclose()
        assert any(i.get("node_status", {}).get("state_change") == "NODE_CONNECTED"
                   for i in seen)
        assert connects >= 3   # the stream ended after each flow; the relay came back

        bad = hub.Relay(peers, "w" * 20)
        out, missing = await bad.query({})
        assert out == [] and "401" in missing["n1"]
    finally:
        await runner.cleanup()


def _openssl(*args: str, cwd: Path) -> None:
    import subprocess

    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> None:
    """A CA, an agent certificate for 127.0.0.1 and a relay client certificate."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "1", "-subj", "/CN=villi-test-ca", cwd=d)
    for name, ext in (("agent", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                      ("relay", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile",
                 f"{name}.ext", cwd=d)


async def test_relay_reads_an_agent_over_mtls(tmp_path: Path) -> None:
    """Agent flow endpoint with mTLS and no token: the relay with its client certificate
    reads flows; without one the TLS handshake fails and the node is reported."""
    from villi.agent.flowserver import build_flow_app, client_tls, server_tls
    from villi.relay.hub import Relay
    from villi.relay.peers import Peer

    make_pki(tmp_path)

    async def flows(request: web.Request) -> web.Response:
        return web.Response(text=json.dumps({"time": "2026-01-01T00:00:00Z"}) + "\n")

    app = build_flow_app([("GET", "/v1/flows", flows)], None, 4)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_tls(
        tmp_path / "agent.pem", tmp_path / "agent.key", tmp_path / "ca.pem"))
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def peers() -> list[Peer]:
        return [Peer("n1", f"127.0.0.1:{port}")]

    try:
        good = Relay(peers, None, tls=client_tls(tmp_path / "ca.pem", tmp_path / "relay.pem",
                                                 tmp_path / "relay.key"))
        out, missing = await good.query({})
        assert out == [{"time": "2026-01-01T00:00:00Z"}] and not missing
        anonymous = Relay(peers, None, tls=client_tls(tmp_path / "ca.pem", None, None))
        out, missing = await anonymous.query({})
        assert out == [] and "n1" in missing
    finally:
        await runner.cleanup()


async def test_grpc_token_interceptor(tmp_path: Path) -> None:
    """The real gRPC server with the token interceptor on a unix socket: calls without the
    token are UNAUTHENTICATED; with it, ServerStatus answers (no peers)."""
    import grpc

    from villi.relay.grpc_api import start_grpc
    from villi.relay.hub import Relay
    from villi.relay.proto import observer_pb2, observer_pb2_grpc

    async def peers() -> list:
        return []

    addr = f"unix://{tmp_path}/g.sock"
    server = await start_grpc(Relay(peers, "x" * 20), addr, token="s" * 20)
    try:
        async with grpc.aio.insecure_channel(addr) as ch:
            stub = observer_pb2_grpc.ObserverStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.ServerStatus(observer_pb2.ServerStatusRequest())
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = await stub.ServerStatus(observer_pb2.ServerStatusRequest(),
                                         metadata=(("authorization", "Bearer " + "s" * 20),))
            assert ok.num_connected_nodes.value == 0 and ok.version.startswith("villi")
    finally:
        await server.stop(0)


def test_dashboards_query_hubble_metrics_villi_exports() -> None:
    """Every hubble_* series a dashboard queries exists in villi's flow registry (the
    agent's cilium_*/villi_* series are checked against a real agent in the e2e test)."""
    exported = set(_families(HubbleMetrics()).keys())
    names = dashboard_metric_names()
    hubble = {n for n in names if n.startswith("hubble_")}
    missing = sorted(n for n in hubble if n not in exported and _base(n) not in exported)
    assert hubble and not missing, missing


PROMQL_WORDS = {"sum", "rate", "by", "max", "min", "avg", "topk", "histogram_quantile",
                "label_values", "without", "count", "irate", "increase", "le", "on"}


def dashboard_metric_names() -> set[str]:
    names = set()
    for path in sorted((ROOT / "dashboards").glob("*.json")):
        dash = json.loads(path.read_text())
        exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
        exprs += [v["query"] for v in dash["templating"]["list"] if v.get("type") == "query"]
        for expr in exprs:
            expr = re.sub(r"\{[^}]*\}", "", expr)
            expr = re.sub(r"\[[^\]]*\]", "", expr)
            expr = re.sub(r"by \([^)]*\)", "", expr)
            expr = re.sub(r"\{\{[^}]*\}\}", "", expr)
            for word in re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*", expr):
                if word not in PROMQL_WORDS and "_" in word:
                    names.add(word)
    return names


def _base(name: str) -> str:
    """A series name → its family name as the Python parser reports it."""
    for suffix in ("_bucket", "_sum", "_count", "_total"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_records_fixture_is_shared() -> None:
    assert isinstance(records(), np.ndarray) and ip("10.1.0.1")


async def test_discover_names_remote_clusters_nodes_cluster_slash_node() -> None:
    """One relay for the mesh: the kvstoremesh's cached nodes are peers ``c2/node3``."""
    from ipaddress import IPv4Address

    from villi.clustermesh import keys as mesh_keys
    from villi.kvstore import EmbeddedStore
    from villi.kvstore.schema import NODES, NodeEntry
    from villi.relay.peers import discover

    async with EmbeddedStore(None) as store:
        await store.put(NODES + "node1", NodeEntry("node1", IPv4Address("10.9.0.1")).encode())
        await store.put(mesh_keys.NODES.cache_prefix("c2") + "node3",
                        NodeEntry("node3", IPv4Address("10.9.0.3")).encode())
        await store.put(mesh_keys.NODES.cache_prefix("c2") + "bad", b"{not json")
        await store.put(mesh_keys.IPCACHE.cache_prefix("c2") + "10.1.0.5", b"{}")
        peers = await discover(store, 4244)
    assert [(p.name, p.address) for p in peers] == [
        ("node1", "10.9.0.1:4244"), ("c2/node3", "10.9.0.3:4244")]
