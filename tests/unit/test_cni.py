"""villi-cni run as a runtime runs it: a subprocess with CNI_* env and config on stdin.

The agent is :class:`tests.unit.cni_fake_agent.FakeAgent` on a temporary unix socket;
the network namespace is a plain file standing in for the netns path.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.unit.cni_fake_agent import FakeAgent, HangingAgent

PLUGIN = Path(sys.executable).parent / "villi-cni"
COMMAND = [str(PLUGIN)] if PLUGIN.exists() else [sys.executable, "-m", "villi.cni.main"]
VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
UNSET = object()

# -- JSON schemas written from the CNI spec (SPEC.md, "Success" / "Error") ----------------

_IP4 = r"^(25[0-5]|2[0-4]\d|1?\d?\d)(\.(25[0-5]|2[0-4]\d|1?\d?\d)){3}$"
_CIDR4 = _IP4[:-1] + r"/(3[0-2]|[12]?\d)$"
_MAC = r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$"
_STRINGS = {"type": "array", "items": {"type": "string"}}


def result_schema(version: str) -> dict[str, Any]:
    """The ADD result of ``version``: 1.1.0 adds interface/route fields, <1.0.0 ips.version."""
    legacy = version in ("0.3.0", "0.3.1", "0.4.0")
    modern = version == "1.1.0"
    iface: dict[str, Any] = {
        "name": {"type": "string", "minLength": 1, "maxLength": 15},
        "mac": {"type": "string", "pattern": _MAC},
        "sandbox": {"type": "string"},
    }
    route: dict[str, Any] = {"dst": {"type": "string", "pattern": _CIDR4},
                             "gw": {"type": "string", "pattern": _IP4}}
    if modern:
        iface |= {"mtu": {"type": "integer", "minimum": 0}, "socketPath": {"type": "string"},
                  "pciID": {"type": "string"}}
        route |= {k: {"type": "integer"} for k in ("mtu", "advmss", "priority", "table", "scope")}
    ip: dict[str, Any] = {
        "address": {"type": "string", "pattern": _CIDR4},
        "gateway": {"type": "string", "pattern": _IP4},
        "interface": {"type": "integer", "minimum": 0},
    }
    ip_required = ["address"]
    if legacy:
        ip["version"] = {"enum": ["4", "6"]}
        ip_required.append("version")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "required": ["cniVersion", "interfaces", "ips", "routes", "dns"],
        "additionalProperties": False,
        "properties": {
            "cniVersion": {"const": version},
            "interfaces": {"type": "array", "items": {
                "type": "object", "required": ["name"], "additionalProperties": False,
                "properties": iface}},
            "ips": {"type": "array", "items": {
                "type": "object", "required": ip_required, "additionalProperties": False,
                "properties": ip}},
            "routes": {"type": "array", "items": {
                "type": "object", "required": ["dst"], "additionalProperties": False,
                "properties": route}},
            "dns": {"type": "object", "additionalProperties": False, "properties": {
                "nameservers": _STRINGS, "domain": {"type": "string"}, "search": _STRINGS,
                "options": _STRINGS}},
        },
    }


ERROR_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["cniVersion", "code", "msg"],
    "additionalProperties": False,
    "properties": {
        "cniVersion": {"enum": VERSIONS},
        "code": {"type": "integer", "minimum": 1},
        "msg": {"type": "string", "minLength": 1},
        "details": {"type": "string"},
    },
}

# -- harness --------------------------------------------------------------------------


class Run:
    def __init__(self, proc: subprocess.CompletedProcess[bytes], elapsed: float) -> None:
        self.rc = proc.returncode
        self.stdout = proc.stdout.decode()
        self.stderr = proc.stderr.decode()
        self.elapsed = elapsed
        self.json: Any = json.loads(self.stdout) if self.stdout.strip() else None

    def error(self, code: int) -> dict[str, Any]:
        """Assert a CNI error with ``code`` and return it."""
        assert self.rc != 0, self.stdout
        jsonschema.validate(self.json, ERROR_SCHEMA)
        assert self.json["code"] == code, self.json
        return self.json

    def ok(self) -> Any:
        assert self.rc == 0, (self.stdout, self.stderr)
        return self.json


class Env:
    """One test's world: a socket directory, a netns stand-in, and a runner."""

    def __init__(self, root: Path, netns_dir: Path) -> None:
        self.root = root
        self.socket = str(root / "villi.sock")
        self.netns_dir = netns_dir

    def netns(self, name: str = "pod1") -> str:
        path = self.netns_dir / f"netns-{name}"
        path.touch()
        return str(path)

    def conf(self, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
        return {"cniVersion": version, "name": "villi", "type": "villi-cni",
                "agentSocket": self.socket, "agentTimeout": 3, **extra}

    def run(self, command: Any, conf: Any = None, *, cid: Any = "c0ffee01", netns: Any = UNSET,
            ifname: Any = "eth0", args: Any = UNSET, extra_env: dict[str, str] | None = None,
            stdin: bytes | None = None, timeout: float = 30) -> Run:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_PATH": "/usr/lib/cni"}
        values = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_IFNAME": ifname,
                  "CNI_NETNS": self.netns() if netns is UNSET else netns,
                  "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=pod1"
                  if args is UNSET else args}
        env.update({k: v for k, v in values.items() if isinstance(v, str)})
        env.update(extra_env or {})
        data = stdin if stdin is not None else json.dumps(conf or {}).encode()
        start = time.monotonic()
        proc = subprocess.run(COMMAND, input=data, env=env, capture_output=True, timeout=timeout)
        return Run(proc, time.monotonic() - start)

    def add(self, cid: str = "c0ffee01", version: str = "1.0.0", **kw: Any) -> dict[str, Any]:
        conf = kw.pop("conf", None) or self.conf(version)
        return self.run("ADD", conf, cid=cid, **kw).ok()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    # unix socket paths are limited to 108 bytes: keep the socket out of pytest's tmp_path
    root = Path(tempfile.mkdtemp(prefix="vcni-", dir="/tmp"))
    try:
        yield Env(root, tmp_path)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def agent(env: Env) -> Iterator[FakeAgent]:
    with FakeAgent(env.socket) as fake:
        yield fake


def check_result(result: dict[str, Any], version: str, netns: str, ifname: str = "eth0") -> None:
    jsonschema.validate(result, result_schema(version))
    for ip in result["ips"]:
        iface = result["interfaces"][ip["interface"]]
        assert iface["name"] == ifname and iface["sandbox"] == netns
    hosts = [i for i in result["interfaces"] if not i.get("sandbox")]
    assert len(hosts) == 1 and hosts[0]["name"].startswith("lxc")


# -- VERSION --------------------------------------------------------------------------


@pytest.mark.parametrize("stdin, echoed", [
    (b'{"cniVersion": "1.1.0"}', "1.1.0"),
    (b'{"cniVersion": "0.4.0"}', "0.4.0"),
    (b'{"cniVersion": "9.9.9"}', "1.1.0"),
    (b"", "1.1.0"),
])
def test_version_lists_supported_versions(env: Env, stdin: bytes, echoed: str) -> None:
    out = env.run("VERSION", stdin=stdin, cid=None, netns=None, ifname=None).ok()
    assert out == {"cniVersion": echoed, "supportedVersions": VERSIONS}


# -- ADD ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_add_result_is_spec_conformant(env: Env, agent: FakeAgent, version: str) -> None:
    netns = env.netns()
    result = env.add(version=version, netns=netns)
    check_result(result, version, netns)
    ep = agent.find("c0ffee01")
    assert ep is not None
    assert result["ips"][0]["address"] == f"{ep['ipv4']}/32"
    assert result["ips"][0]["gateway"] == "169.254.1.1"
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
    assert result["interfaces"] == [
        {"name": ep["hostIfname"], "mac": ep["hostMac"]},
        {"name": "eth0", "mac": ep["mac"], "sandbox": netns},
    ]
    assert result["dns"] == {}


def test_add_sends_one_request_with_pod_identity(env: Env, agent: FakeAgent) -> None:
    conf = env.conf("1.1.0", mtu=1450, dns={"nameservers": ["10.96.0.10"], "search": ["svc"]},
                    args={"cni": {
                        "labels": [{"key": "app", "value": "old"}, {"key": "team", "value": "a"}],
                        "ports": [{"name": "metrics", "containerPort": 9090}],
                    }})
    netns = env.netns()
    result = env.run("ADD", conf, netns=netns, args=(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;"
        "K8S_POD_INFRA_CONTAINER_ID=c0ffee01;VILLI_LABELS=app:web,tier:frontend;"
        "VILLI_PORTS=http:8080/tcp,dns:53/udp")).ok()
    posts = [r for r in agent.requests if r[0] == "POST"]
    assert len(agent.requests) == 1 and len(posts) == 1
    assert posts[0][3] == {
        "containerID": "c0ffee01", "netns": netns, "ifname": "eth0",
        "namespace": "shop", "podName": "web-0", "mtu": 1450,
        "labels": {"app": "web", "team": "a", "tier": "frontend"},
        "namedPorts": {"metrics": {"port": 9090, "protocol": "TCP"},
                       "http": {"port": 8080, "protocol": "TCP"},
                       "dns": {"port": 53, "protocol": "UDP"}},
    }
    check_result(result, "1.1.0", netns)
    assert result["interfaces"][1]["mtu"] == 1450
    assert result["dns"] == {"nameservers": ["10.96.0.10"], "search": ["svc"]}


def test_add_twice_is_idempotent(env: Env, agent: FakeAgent) -> None:
    netns = env.netns()
    first = env.add(netns=netns)
    second = env.add(netns=netns)
    assert first == second
    assert agent.allocated() == 1


def test_add_with_other_ifname_is_another_attachment(env: Env, agent: FakeAgent) -> None:
    netns = env.netns()
    a = env.add(netns=netns)
    b = env.add(netns=netns, ifname="net1")
    assert a["ips"][0]["address"] != b["ips"][0]["address"]
    check_result(b, "1.0.0", netns, "net1")


def test_add_chained_after_another_plugin_merges_prev_result(env: Env, agent: FakeAgent) -> None:
    netns = env.netns()
    prev: dict[str, Any] = {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "lo", "sandbox": netns}],
            "ips": [{"address": "127.0.0.1/8", "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "127.0.0.1"}],
            "dns": {"nameservers": ["1.1.1.1"]}}
    result = env.run("ADD", env.conf(prevResult=prev), netns=netns).ok()
    jsonschema.validate(result, result_schema("1.0.0"))
    names = [i["name"] for i in result["interfaces"]]
    assert names[0] == "lo" and names[2] == "eth0"
    assert result["ips"][0] == prev["ips"][0]
    assert result["ips"][1]["interface"] == 2
    assert result["routes"] == prev["routes"]  # one default route, the earlier plugin's
    assert result["dns"] == prev["dns"]


def test_add_chained_onto_existing_interface_is_refused(env: Env, agent: FakeAgent) -> None:
    netns = env.netns()
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": netns}],
            "ips": [{"address": "10.1.0.5/24", "interface": 0}]}
    err = env.run("ADD", env.conf(prevResult=prev), netns=netns).error(7)
    assert "created by an earlier plugin" in err["msg"]
    assert agent.requests == []


def test_env_socket_overrides_config(env: Env, agent: FakeAgent) -> None:
    conf = env.conf(agentSocket="/nonexistent/villi.sock")
    env.run("ADD", conf, extra_env={"VILLI_AGENT_SOCKET": env.socket}).ok()
    assert agent.allocated() == 1


# -- DEL ------------------------------------------------------------------------------


def test_del_is_idempotent(env: Env, agent: FakeAgent) -> None:
    netns = env.netns()
    result = env.add(netns=netns)
    conf = env.conf(prevResult=result)
    run = env.run("DEL", conf, netns=netns)
    assert run.ok() is None and run.stdout == ""
    assert agent.allocated() == 0
    assert env.run("DEL", conf, netns=netns).ok() is None  # again: 404 is success
    assert env.run("DEL", env.conf(), netns=None).ok() is None  # no CNI_NETNS
    os.unlink(netns)
    assert env.run("DEL", env.conf(), netns=netns).ok() is None  # netns already gone
    assert env.run("DEL", env.conf(prevResult="garbage"), netns=None).ok() is None
    methods = [r[0] for r in agent.requests]
    assert methods == ["POST"] + ["DELETE"] * 5


def test_del_survives_a_config_edited_after_add(env: Env, agent: FakeAgent) -> None:
    env.add()
    conf = env.conf(ipam={"type": "host-local"}, mtu=1, args={"cni": {"labels": 5}})
    del conf["name"]
    env.run("DEL", conf).ok()
    assert agent.allocated() == 0
    env.run("DEL", env.conf(agentTimeout="5s")).error(7)  # but it must reach the agent
    env.run("DEL", env.conf("0.2.0")).error(1)


def test_del_only_removes_its_interface(env: Env, agent: FakeAgent) -> None:
    netns = env.netns()
    env.add(netns=netns)
    env.add(netns=netns, ifname="net1")
    env.run("DEL", env.conf(), netns=netns, ifname="net1").ok()
    assert agent.find("c0ffee01", "eth0") is not None
    assert agent.find("c0ffee01", "net1") is None


def test_del_with_agent_down_asks_to_retry(env: Env) -> None:
    run = env.run("DEL", env.conf(agentTimeout=1))
    err = run.error(11)
    assert err["msg"] == (f"villi agent is not reachable at {env.socket}: no such socket "
                          "(is `villi agent` running?)")
    assert 0.9 < run.elapsed < 3  # DEL retries the connection for agentTimeout


def test_del_retries_until_the_agent_comes_back(env: Env) -> None:
    fake = FakeAgent(env.socket)
    fake.add_endpoint(containerID="c0ffee01", ifname="eth0", netns="/x")
    proc_env = {"PATH": os.environ.get("PATH", ""), "CNI_COMMAND": "DEL",
                "CNI_CONTAINERID": "c0ffee01", "CNI_IFNAME": "eth0"}
    proc = subprocess.Popen(COMMAND, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=proc_env)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(env.conf(agentTimeout=10)).encode())
    proc.stdin.close()
    time.sleep(0.5)
    with fake:
        assert proc.wait(10) == 0
        assert fake.allocated() == 0
    assert proc.stdout is not None
    proc.stdout.close()


# -- CHECK ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_check_after_add_passes(env: Env, agent: FakeAgent, version: str) -> None:
    netns = env.netns()
    result = env.add(version=version, netns=netns)
    run = env.run("CHECK", env.conf(version, prevResult=result), netns=netns)
    assert run.ok() is None and run.stdout == ""


def test_check_after_del_fails(env: Env, agent: FakeAgent) -> None:
    netns = env.netns()
    result = env.add(netns=netns)
    env.run("DEL", env.conf(), netns=netns).ok()
    err = env.run("CHECK", env.conf(prevResult=result), netns=netns).error(101)
    assert "has no such endpoint" in err["msg"]


def test_check_detects_other_address(env: Env, agent: FakeAgent) -> None:
    netns = env.netns()
    result = env.add(netns=netns)
    result["ips"][0]["address"] = "10.99.0.1/32"
    err = env.run("CHECK", env.conf(prevResult=result), netns=netns).error(101)
    assert "10.99.0.1" in err["msg"] and "10.64.1." in err["msg"]


def test_check_detects_missing_interface(env: Env, agent: FakeAgent) -> None:
    netns = env.netns()
    result = env.add(netns=netns)
    result["interfaces"] = result["interfaces"][:1]
    result["ips"][0]["interface"] = 0
    err = env.run("CHECK", env.conf(prevResult=result), netns=netns).error(101)
    assert f"no interface eth0 in {netns}" in err["msg"]


def test_check_needs_prev_result(env: Env, agent: FakeAgent) -> None:
    env.add()
    assert "prevResult" in env.run("CHECK", env.conf()).error(7)["msg"]


def test_check_needs_0_4_0(env: Env, agent: FakeAgent) -> None:
    result = env.add(version="0.3.1")
    env.run("CHECK", env.conf("0.3.1", prevResult=result)).error(1)


def test_check_with_netns_gone(env: Env, agent: FakeAgent) -> None:
    netns = env.netns()
    result = env.add(netns=netns)
    os.unlink(netns)
    env.run("CHECK", env.conf(prevResult=result), netns=netns).error(3)


# -- STATUS ---------------------------------------------------------------------------


def test_status_ready(env: Env, agent: FakeAgent) -> None:
    run = env.run("STATUS", env.conf("1.1.0"), cid=None, netns=None, ifname=None, args=None)
    assert run.ok() is None and run.stdout == ""
    assert agent.requests == [("GET", "/v1/healthz", {}, None)]


def test_status_pool_exhausted(env: Env) -> None:
    with FakeAgent(env.socket, pool_size=1) as fake:
        env.add()
        assert fake.allocated() == 1
        err = env.run("STATUS", env.conf("1.1.0")).error(50)
    assert err["msg"] == "villi agent has no free pod IPs"
    assert err["details"] == "IPv4: 1/1 allocated from 10.64.1.0/24"


def test_status_agent_down(env: Env) -> None:
    err = env.run("STATUS", env.conf("1.1.0")).error(50)
    assert "not reachable" in err["msg"]


def test_status_agent_error(env: Env, agent: FakeAgent) -> None:
    agent.health = {"status": "error", "kvstore": {"status": "error", "message": "etcd down"}}
    err = env.run("STATUS", env.conf("1.1.0")).error(50)
    assert "kvstore: etcd down" in err["details"]


def test_status_datapath_broken_limits_connectivity(env: Env, agent: FakeAgent) -> None:
    agent.health = {"status": "error",
                    "datapath": {"status": "error", "message": "programs not loaded"}}
    err = env.run("STATUS", env.conf("1.1.0")).error(51)
    assert "programs not loaded" in err["msg"]


def test_status_needs_1_1_0(env: Env, agent: FakeAgent) -> None:
    env.run("STATUS", env.conf("1.0.0")).error(1)


# -- GC -------------------------------------------------------------------------------


def _gc_world(env: Env) -> None:
    for cid in ("keep1", "stale2", "keep3"):
        env.add(cid=cid, netns=env.netns(cid))
    env.add(cid="keep3", netns=env.netns("keep3"), ifname="net1")
    env.add(cid="keep1", netns=env.netns("keep1"), ifname="net1")  # stale: not listed


@pytest.mark.parametrize("key", ["cni.dev/valid-attachments", "cni.dev/attachments"])
def test_gc_removes_only_unlisted_cni_endpoints(env: Env, agent: FakeAgent, key: str) -> None:
    _gc_world(env)
    agent.add_endpoint(containerID="", ifname="eth0", netns="/x")  # e.g. the health endpoint
    valid = [{"containerID": "keep1", "ifname": "eth0"}, {"containerID": "keep3"}]
    run = env.run("GC", env.conf("1.1.0", **{key: valid}), cid=None, netns=None, ifname=None)
    assert run.ok() is None and run.stdout == ""
    left = sorted((ep["containerID"], ep["ifname"]) for ep in agent.endpoints.values())
    assert left == [("", "eth0"), ("keep1", "eth0"), ("keep3", "eth0"), ("keep3", "net1")]


def test_gc_with_empty_list_removes_every_cni_endpoint(env: Env, agent: FakeAgent) -> None:
    _gc_world(env)
    env.run("GC", env.conf("1.1.0", **{"cni.dev/valid-attachments": []})).ok()
    assert agent.allocated() == 0


def test_gc_without_the_list_removes_nothing(env: Env, agent: FakeAgent) -> None:
    _gc_world(env)
    err = env.run("GC", env.conf("1.1.0")).error(7)
    assert "cni.dev/valid-attachments" in err["msg"]
    assert agent.allocated() == 5


def test_gc_reports_failures_and_keeps_going(env: Env, agent: FakeAgent) -> None:
    _gc_world(env)
    agent.fail[("DELETE", "/v1/endpoint/container-id:stale2")] = (
        500, {"error": "map update failed", "code": 0})
    err = env.run("GC", env.conf("1.1.0", **{"cni.dev/valid-attachments": [
        {"containerID": "keep1", "ifname": "eth0"}, {"containerID": "keep3"}]})).error(100)
    assert err["msg"] == "GC could not remove 1 of 2 stale attachments"
    assert "stale2/eth0: map update failed" in err["details"]
    assert agent.find("keep1", "net1") is None  # the other stale one went


def test_gc_needs_1_1_0(env: Env, agent: FakeAgent) -> None:
    env.run("GC", env.conf("1.0.0", **{"cni.dev/valid-attachments": []})).error(1)


def test_gc_agent_down(env: Env) -> None:
    env.run("GC", env.conf("1.1.0", agentTimeout=0.5,
                           **{"cni.dev/valid-attachments": []})).error(11)


# -- failures -------------------------------------------------------------------------


def test_agent_down_fails_fast_with_try_again(env: Env) -> None:
    run = env.run("ADD", env.conf(agentTimeout=5))
    err = run.error(11)
    assert err["msg"] == (f"villi agent is not reachable at {env.socket}: no such socket "
                          "(is `villi agent` running?)")
    assert run.elapsed < 2  # ADD does not wait for an agent that is not there


def test_agent_refusing_connections(env: Env) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(env.socket)
    sock.close()  # the socket file stays, nobody listens: ECONNREFUSED
    err = env.run("ADD", env.conf()).error(11)
    assert err["msg"].startswith(f"villi agent is not reachable at {env.socket}: "
                                 "connection refused")


def test_agent_hanging_times_out(env: Env) -> None:
    with HangingAgent(env.socket):
        run = env.run("ADD", env.conf(agentTimeout=0.5))
    err = run.error(11)
    assert "did not answer within 0.5 s" in err["msg"]
    assert 0.5 <= run.elapsed < 2.5


def test_netns_missing(env: Env, agent: FakeAgent) -> None:
    err = env.run("ADD", env.conf(), netns="/var/run/netns/villi-test-missing").error(3)
    assert err["msg"] == "network namespace /var/run/netns/villi-test-missing does not exist"
    assert agent.requests == []


def test_pool_exhausted(env: Env) -> None:
    with FakeAgent(env.socket, pool_size=2) as fake:
        env.add(cid="a1")
        env.add(cid="a2")
        err = env.run("ADD", env.conf(), cid="a3").error(11)
        assert fake.allocated() == 2
    assert "exhausted" in err["msg"] and "HTTP 503" in err["details"]


@pytest.mark.parametrize("stdin, detail", [
    (b'{"cniVersion": "1.0.0", "name": ', "not JSON"),
    (b"", "stdin is empty"),
    (b'["villi"]', "expected a JSON object, got list"),
])
def test_undecodable_config(env: Env, stdin: bytes, detail: str) -> None:
    err = env.run("ADD", stdin=stdin).error(6)
    assert detail in err["details"]
    assert err["cniVersion"] == "1.1.0"


@pytest.mark.parametrize("version", ["9.9.9", "0.2.0", None])
def test_unsupported_cni_version(env: Env, agent: FakeAgent, version: str | None) -> None:
    conf = env.conf()
    conf.pop("cniVersion")
    if version:
        conf["cniVersion"] = version
    err = env.run("ADD", conf).error(1)
    assert err["msg"] == "incompatible CNI version"
    assert "1.1.0" in err["details"]
    assert agent.requests == []


@pytest.mark.parametrize("unset, named", [
    ({"cid": None}, "[CNI_CONTAINERID]"),
    ({"ifname": None}, "[CNI_IFNAME]"),
    ({"netns": None}, "[CNI_NETNS]"),
    ({"cid": None, "ifname": None}, "[CNI_CONTAINERID,CNI_IFNAME]"),
])
def test_missing_env(env: Env, agent: FakeAgent, unset: dict[str, Any], named: str) -> None:
    err = env.run("ADD", env.conf(), **unset).error(4)
    assert err["msg"] == f"required env variables {named} missing"


@pytest.mark.parametrize("override, fragment", [
    ({"cid": "-bad"}, "invalid CNI_CONTAINERID"),
    ({"ifname": "a-very-long-ifname0"}, "longer than 15 bytes"),
    ({"ifname": "eth:0"}, "must not contain"),
    ({"netns": "netns/relative"}, "absolute path"),
    ({"args": "FOO=bar"}, "unknown key 'FOO'"),
    ({"args": "K8S_POD_NAME"}, "invalid pair"),
    ({"args": "VILLI_LABELS=app"}, "is not key:value"),
    ({"args": "VILLI_LABELS=app:we b"}, "value 'we b'"),
    ({"args": "VILLI_PORTS=http:99999/tcp"}, "not a port number"),
])
def test_invalid_env(env: Env, agent: FakeAgent, override: dict[str, Any], fragment: str) -> None:
    err = env.run("ADD", env.conf(), **override).error(4)
    assert fragment in err["msg"]
    assert err["cniVersion"] == "1.0.0"
    assert agent.requests == []


@pytest.mark.parametrize("command", ["FOO", "add", None])
def test_unknown_command(env: Env, command: str | None) -> None:
    err = env.run(command, env.conf()).error(4)
    assert err["msg"] == (f"unknown CNI_COMMAND: {command}" if command
                          else "required env variables [CNI_COMMAND] missing")


@pytest.mark.parametrize("change, code, fragment", [
    ({"type": "bridge"}, 7, "type: expected 'villi-cni', got \"bridge\""),
    ({"name": None}, 7, "missing network name"),
    ({"name": "-net"}, 7, "name:"),
    ({"agentTimeout": "5s"}, 7, "agentTimeout: expected a number"),
    ({"agentTimeout": 0}, 7, "agentTimeout"),
    ({"mtu": 10}, 7, "mtu"),
    ({"agentSocket": "villi.sock"}, 7, "agentSocket"),
    ({"dns": {"nameservers": "10.96.0.10"}}, 7, "dns.nameservers"),
    ({"args": {"cni": {"labels": [{"key": "app", "value": 1}]}}}, 7, "args.cni.labels[0]"),
    ({"args": {"cni": {"ports": [{"name": "HTTP", "containerPort": 80}]}}}, 7,
     "args.cni.ports[0]"),
    ({"ipam": {"type": "host-local"}}, 2, '"ipam": {"type": "host-local"}'),
    ({"prevResult": "garbage"}, 6, "prevResult"),
    ({"prevResult": {"ips": [{"address": "10.0.0.1"}]}}, 6, "prevResult"),
    ({"prevResult": {"interfaces": [], "ips": [{"address": "10.0.0.1/8", "interface": 3}]}}, 6,
     "prevResult"),
])
def test_invalid_config(env: Env, agent: FakeAgent, change: dict[str, Any], code: int,
                        fragment: str) -> None:
    conf = {k: v for k, v in {**env.conf(), **change}.items() if v is not None}
    err = env.run("ADD", conf).error(code)
    assert fragment in err["msg"] + err.get("details", "")
    assert agent.requests == []


@pytest.mark.parametrize("reply, code, fragment", [
    ((500, {"error": "identity allocation crashed", "code": 0}), 100,
     "identity allocation crashed"),
    ((400, {"error": "cannot create veth lxc1: File exists", "code": 0}), 100, "File exists"),
    ((503, {"error": "no pod CIDR yet", "code": 11}), 11, "no pod CIDR yet"),
    ((409, {"error": "IP conflict", "code": 7}), 7, "IP conflict"),
    ((502, "bad gateway"), 100, "HTTP 502"),
    ((201, {"id": 1}), 100, "without an IPv4 address"),
])
def test_agent_errors_are_passed_on(env: Env, agent: FakeAgent, reply: tuple[int, object],
                                    code: int, fragment: str) -> None:
    agent.fail[("POST", "/v1/endpoint")] = reply
    err = env.run("ADD", env.conf()).error(code)
    assert fragment in err["msg"]
