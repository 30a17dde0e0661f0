"""``villi demo`` (``make demo``): Cilium's Star Wars scenario in a fresh 2-node lab.

The story, as in Cilium's getting-started guide: the Empire's ``deathstar`` (two pods,
one per node) accepts landing requests on port 80; a ``tiefighter`` (Empire) and an
``xwing`` (Alliance) both land while no policy exists; then an L3/L4
CiliumNetworkPolicy (``examples/sw_l3_l4_policy.yaml``, unchanged from Cilium's demo)
lets only ``org=empire`` in, so the tiefighter still lands and the xwing is dropped;
the flows of both attempts come from ``villi observe``. Then the L7 chapter: the
tiefighter can also blow up the deathstar (``PUT /v1/exhaust-port``), so Cilium's L7
policy (``examples/sw_l3_l4_l7_policy.yaml``, unchanged) allows only ``POST
/v1/request-landing``: the landing works, the exhaust port gets ``Access denied`` from
the node's villi-proxy, the xwing is still dropped at L3/L4, and ``villi observe --type
l7`` shows the HTTP requests. Then the FQDN chapter: a ``client`` pod may call one
outside host by name (``examples/fqdn_policy.yaml``): ``api.example.com`` answers,
``other.example.com`` — resolved, but not through a name the policy allows — is
dropped, and a name outside ``*.example.com`` is refused by the node's DNS proxy. The
lab stays up to explore.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.panel import Panel
from rich.rule import Rule
from rich.syntax import Syntax
from rich.table import Table

POLICY_FILE = "sw_l3_l4_policy.yaml"
# The same policy as examples/sw_l3_l4_policy.yaml, for installs without the repository.
POLICY_TEXT = """\
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: "rule1"
spec:
  description: "L3-L4 policy to restrict deathstar access to empire ships only"
  endpointSelector:
    matchLabels:
      org: empire
      class: deathstar
  ingress:
  - fromEndpoints:
    - matchLabels:
        org: empire
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
"""
L7_POLICY_FILE = "sw_l3_l4_l7_policy.yaml"
# The same policy as examples/sw_l3_l4_l7_policy.yaml (Cilium's, unchanged).
L7_POLICY_TEXT = """\
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: "rule1"
spec:
  description: "L7 policy to restrict access to specific HTTP call"
  endpointSelector:
    matchLabels:
      org: empire
      class: deathstar
  ingress:
  - fromEndpoints:
    - matchLabels:
        org: empire
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
      rules:
        http:
        - method: "POST"
          path: "/v1/request-landing"
"""
EXHAUST_ROUTE = "PUT /v1/exhaust-port=Panic: deathstar exploded"
FQDN_POLICY_FILE = "fqdn_policy.yaml"
# The policy of examples/fqdn_policy.yaml (without its comments).
FQDN_POLICY_TEXT = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: client-fqdn
  namespace: default
spec:
  endpointSelector:
    matchLabels: {app: client}
  egress:
  - toCIDR: ["192.0.2.53/32"]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns:
        - matchPattern: "*.example.com"
  - toFQDNs:
    - matchName: api.example.com
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
"""
CLIENT = "default/client"
SERVICE_FILE = "sw_deathstar_service.yaml"
SERVICE_TEXT = """\
apiVersion: v1
kind: Service
metadata:
  name: deathstar
  labels:
    app.kubernetes.io/name: deathstar
spec:
  type: ClusterIP
  ports:
  - port: 80
  selector:
    org: empire
    class: deathstar
"""
PODS = [  # name, node, labels, serves
    ("deathstar-1", "1", {"org": "empire", "class": "deathstar"}, True),
    ("deathstar-2", "2", {"org": "empire", "class": "deathstar"}, True),
    ("tiefighter", "1", {"org": "empire", "class": "tiefighter"}, False),
    ("xwing", "2", {"org": "alliance", "class": "xwing"}, False),
]
SHIPS = ("tiefighter", "xwing")
VILLI = [sys.executable, "-m", "villi.cli.main"]


def _example_path(name: str, text: str) -> tuple[str, str]:
    """(path to show and apply, its text): the repository's example when present."""
    repo = Path(__file__).resolve().parents[3] / "examples" / name
    if repo.exists():
        try:
            shown = str(repo.relative_to(Path.cwd()))
        except ValueError:
            shown = str(repo)
        return shown, repo.read_text()
    from villi.lab import _state

    tmp = _state.state_path().parent / name
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(text)
    return str(tmp), text


def _policy_path() -> tuple[str, str]:
    return _example_path(POLICY_FILE, POLICY_TEXT)


def _example(name: str, text: str) -> str:
    return _example_path(name, text)[0]


class VilliErrorForDemo(Exception):
    """The demo could not continue (raised as a VilliError by demo_command)."""


class Demo:
    def __init__(self) -> None:
        from villi.lab._view import console

        self.c = console()
        self.step_no = 0
        self.has_curl = shutil.which("curl") is not None

    # --- output helpers ---------------------------------------------------------------
    def step(self, title: str, text: str = "") -> None:
        self.step_no += 1
        self.c.print()
        self.c.print(Rule(f"[bold]{self.step_no}. {title}", align="left", style="cyan"))
        if text:
            self.c.print(text)

    def cmd(self, line: str) -> None:
        self.c.print(f"[dim]$[/] [bold]{line}[/]", highlight=False)

    def villi(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Show ``$ villi ARGS``, run it, print what it said."""
        self.cmd("villi " + " ".join(args))
        res = subprocess.run([*VILLI, *args], capture_output=True, text=True, timeout=timeout)
        self.c.print(res.stdout.rstrip() or res.stderr.strip(), highlight=False,
                     soft_wrap=True)
        return res

    def apply_shown(self, path: str, text: str) -> bool:
        """Show a policy file, apply it; whether the apply worked."""
        self.c.print(Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
        return self.villi("apply", "-f", path).returncode == 0

    def attempt(self, shown: str, what: str, ok: bool | None = None) -> None:
        """One try from inside a pod, as a user types it, then what came back (with ✓/✗
        when the outcome is a success or a failure rather than just an answer)."""
        self.cmd(shown)
        mark = "" if ok is None else "[green]✓[/] " if ok else "[red]✗[/] "
        self.c.print(f"  {mark}{what}", highlight=False)

    def curl(self, pod: str, *args: str, timeout: float = 2) -> tuple[int, str]:
        """curl inside ``pod``: (exit code, body)."""
        from villi.lab import pods

        res = subprocess.run(pods.exec_argv(pod, ["curl", "-s", "-m", str(timeout), *args]),
                             capture_output=True, text=True)
        return res.returncode, res.stdout.strip()

    def show_curl(self, pod: str, *args: str, marked: bool = False,
                  timeout: float = 2) -> tuple[int, str]:
        """curl inside ``pod``, shown as the user would type it, with what came back
        (``marked``: ✓ when curl succeeded, ✗ when not)."""
        code, body = self.curl(pod, *args, timeout=timeout)
        self.attempt(f"villi lab exec {pod} -- curl -s {' '.join(args)}",
                     _curl_outcome(code, body), code == 0 if marked else None)
        return code, body

    # --- the story --------------------------------------------------------------------
    def run(self) -> int:
        t0 = time.monotonic()
        self.c.print(Panel.fit(
            "[bold]villi demo[/] — Cilium's Star Wars scenario, on a real eBPF datapath\n"
            "A 2-node cluster in network namespaces on this machine: etcd, the operator, "
            "one agent per node,\npods plugged in by villi-cni. The Empire's deathstar "
            "accepts landings; who may land is up to policy.",
            border_style="yellow"))
        self.bring_up()
        ips = self.deploy()
        vip = self.service()
        self.step("No policy yet: every ship may land",
                  "Without a policy selecting it, a pod accepts all traffic (Kubernetes' "
                  "default). The ships ask the deathstar service's virtual IP; the "
                  "socket-level load balancer picks a deathstar pod at connect().")
        self.attempts(vip)
        path, text = _policy_path()
        self.step("Only the Empire may land: an L3/L4 CiliumNetworkPolicy",
                  "The policy from Cilium's demo, unchanged: it selects the deathstar pods "
                  "and allows ingress from org=empire to TCP port 80.")
        if not self.apply_shown(path, text):
            return 1
        self.wait_policy()
        since = _now()
        self.step("Both ships try again",
                  "The tiefighter (org=empire) lands; the xwing (org=alliance) is dropped "
                  "by the datapath on the deathstar's node: its SYN never gets an answer.")
        results = self.attempts(vip, timeout=2)
        self.step("What the datapath saw: the flows of both attempts")
        self.flows(since, ips)
        ok = all(v for (ship, _), v in results.items() if ship == "tiefighter") and \
            not any(v for (ship, _), v in results.items() if ship == "xwing")
        ok = self.l7_chapter(vip) and ok
        ok = self.fqdn_chapter() and ok
        self.outro(ok, time.monotonic() - t0)
        return 0 if ok else 1

    def bring_up(self) -> None:
        from rich.live import Live

        from villi.lab import cluster
        from villi.lab._view import Steps

        self.step("A fresh 2-node lab")
        old = cluster.running()
        if old is not None:
            self.c.print(f"A lab is already running (id {old['id']}): removing it so the "
                         "demo starts from scratch.")
        res = cluster.down()
        if res["lab"] and old is None:
            self.c.print(f"Removed the remains of a crashed lab ({res['lab']}).")
        self.cmd("villi lab up --nodes 2")
        steps = Steps("lab up")
        with Live(steps, console=self.c, refresh_per_second=10):
            try:
                state = cluster.up(2, "etcd", progress=steps)
            except BaseException:
                steps.fail_pending()
                raise
        self.state = state

    def deploy(self) -> dict[str, str]:
        from villi.lab import pods

        self.step("Deploy the Empire and the Alliance",
                  "Each pod gets its namespace, veth, IP and identity from villi-cni and "
                  "its node's agent; the deathstar pods serve HTTP on port 80.")
        for name, node, labels, serves in PODS:
            lbl = ",".join(f"{k}={v}" for k, v in labels.items())
            extra = f" --serve 80/tcp --http-route '{EXHAUST_ROUTE}'" if serves else ""
            self.cmd(f"villi lab pod add default/{name} --node {node} --labels {lbl}{extra}")
            pods.add(f"default/{name}", node=node, labels=labels,
                     serve=pods.parse_serve("80/tcp") if serves else [],
                     http_reply=f"Ship landed ({name} answered)" if serves else None,
                     http_routes=[EXHAUST_ROUTE] if serves else None)
        return self.pod_table()

    def service(self) -> str:
        """Apply the deathstar Service; returns its ClusterIP once agents program it."""
        from villi.lab._api import agent_call

        path = _example(SERVICE_FILE, SERVICE_TEXT)
        self.step("A ClusterIP service in front of the deathstar pods",
                  "A plain Kubernetes Service: villi allocates its virtual IP and every "
                  "node's socket load balancer spreads connects over both pods, wherever "
                  "they run.")
        self.villi("apply", "-f", path)
        deadline = time.monotonic() + 15
        vip = ""
        while time.monotonic() < deadline:
            views = [agent_call(n["socket"], "GET", "/v1/service") for n in self.state["nodes"]]
            ready = [s for v in views for s in v if s["name"] == "deathstar"
                     and s.get("clusterIP") and len(s["ports"][0]["backends"]) == 2]
            if len(ready) == len(views):
                vip = ready[0]["clusterIP"]
                break
            time.sleep(0.1)
        self.villi("get", "services")
        if not vip:
            raise VilliErrorForDemo("the deathstar service did not get its backends in time")
        return vip

    def pod_table(self) -> dict[str, str]:
        from villi.lab import _state, pods

        state = _state.require()
        t = Table(box=None, header_style="bold", pad_edge=False)
        for col in ("POD", "NODE", "IPv4", "IDENTITY", "LABELS"):
            t.add_column(col)
        ips = {}
        for name, _, labels, _ in PODS:
            rec = state["pods"][f"default/{name}"]
            ident = pods.endpoint(rec).get("identity", "?")
            ips[name] = rec["ip"]
            t.add_row(f"default/{name}", rec["node"], rec["ip"], str(ident),
                      ", ".join(f"{k}={v}" for k, v in labels.items()))
        self.c.print(t)
        self.c.print("[dim]Both deathstar pods share one identity: same labels, same "
                     "security identity, on every node.[/]")
        return ips

    def land(self, ship: str, target: str, ip: str, timeout: float) -> tuple[bool, str]:
        """One landing request, as a user would make it: curl inside the ship's pod."""
        from villi.lab import pods
        from villi.lab.probe import probe_detail

        if self.has_curl:
            code, body = self.curl(f"default/{ship}", "-XPOST",
                                   f"http://{ip}/v1/request-landing", timeout=timeout)
            return code == 0, _curl_outcome(code, body)
        rec = pods.get(f"default/{ship}")
        ok, why = probe_detail(rec["netns"], ip, 80, "tcp", timeout)
        return ok, why

    def attempts(self, vip: str, timeout: float = 2) -> dict[tuple[str, int], bool]:
        """Each ship asks for landing twice, through the service's virtual IP."""
        from concurrent.futures import ThreadPoolExecutor

        jobs = [(s, n) for s in SHIPS for n in (1, 2)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            futs = {j: pool.submit(self.land, j[0], "deathstar", vip, timeout) for j in jobs}
            out = {j: f.result() for j, f in futs.items()}
        for (ship, _n), (ok, what) in out.items():
            tool = f"curl -s -XPOST {vip}/v1/request-landing" if self.has_curl else \
                f"probe {vip}:80"
            self.attempt(f"villi lab exec default/{ship} -- {tool}", what, ok)
        return {k: v[0] for k, v in out.items()}

    def wait_policy(self) -> None:
        from villi.lab._api import agent_call

        deadline = time.monotonic() + 10
        for node in self.state["nodes"]:
            while time.monotonic() < deadline:
                view = agent_call(node["socket"], "GET", "/v1/policy")
                if any(r["name"] == "rule1" for r in view["resources"]):
                    break
                time.sleep(0.05)

    def flows(self, since: str, ips: dict[str, str]) -> None:
        help_text = subprocess.run([*VILLI, "observe", "--help"], capture_output=True,
                                   text=True).stdout
        if "--last" in help_text and "not built yet" not in help_text:
            res = self.villi("observe", "--since", since, "--to-pod", "default/deathstar",
                             "--tcp-flags", "SYN", "--not", "--tcp-flags", "ACK", timeout=30)
            if res.returncode == 0 and res.stdout.strip():
                self.c.print("[dim]Each SYN is seen leaving the ship's side (from-endpoint, "
                             "or to-stack towards the other node) and then on the deathstar's "
                             "side: to-endpoint when delivered, Policy denied DROPPED when the "
                             "deathstar's ingress policy refuses it — the xwing's SYN is "
                             "retried and dropped again.[/]")
                self.c.print()
                self.c.print("Why was the xwing dropped? Ask for an explanation:")
                self.villi("observe", "--verdict", "DROPPED", "--from-pod", "default/xwing",
                           "--to-pod", "default/deathstar-1", "--last", "1", "--explain",
                           timeout=30)
                return
            self.c.print(f"[yellow]villi observe did not answer ({res.returncode}): "
                         f"{res.stderr.strip()[:300]}[/]")
        self.c.print("[dim]villi observe is not available; here are the datapath's drop "
                     "counters instead:[/]")
        self.c.print(drop_counters(self.state))

    # --- the L7 chapter -----------------------------------------------------------------
    def show_http(self, ship: str, method: str, vip: str, path: str) -> tuple[int, str]:
        return self.show_curl(f"default/{ship}", f"-X{method}", f"http://{vip}{path}")

    def l7_chapter(self, vip: str) -> bool:
        if not self.has_curl:
            self.c.print("[yellow]curl is not installed: skipping the L7 chapter[/]")
            return True
        self.step("The Empire's own ships are a danger too",
                  "L3/L4 policy lets every Empire ship reach port 80, including the "
                  "deathstar's maintenance API:")
        _code, body = self.show_http("tiefighter", "PUT", vip, "/v1/exhaust-port")
        exploded = "Panic" in body
        path, text = _example_path(L7_POLICY_FILE, L7_POLICY_TEXT)
        self.step("L7: only landing requests, enforced per HTTP request",
                  "Cilium's L7 policy, unchanged: the same rule1 with an HTTP rule. The "
                  "datapath now steers the deathstar's port-80 connections (bpf_sk_assign) "
                  "to the node's villi-proxy, which judges every request.")
        if not self.apply_shown(path, text):
            return False
        since = _now()
        _until(lambda: all(   # both nodes' proxies enforce it
            self.curl("default/tiefighter", "-XPUT", f"http://{ip}/v1/exhaust-port")[1]
            == "Access denied" for ip in self.deathstar_ips()))
        self.step("The tiefighter lands, but cannot blow up the deathstar",
                  "Allowed requests reach the deathstar (which sees the tiefighter's own "
                  "address); the PUT gets a 403 from the proxy; the xwing is still dropped "
                  "at L3/L4.")
        landed = self.show_http("tiefighter", "POST", vip, "/v1/request-landing")
        denied = self.show_http("tiefighter", "PUT", vip, "/v1/exhaust-port")
        xwing = self.show_http("xwing", "POST", vip, "/v1/request-landing")
        self.step("What the proxy saw: L7 flows")
        self.villi("observe", "--since", since, "--type", "l7", "--protocol", "http",
                   timeout=30)
        return exploded and landed[0] == 0 and "Ship landed" in landed[1] and \
            denied == (0, "Access denied") and xwing[0] != 0

    # --- the FQDN chapter ---------------------------------------------------------------
    def fqdn_chapter(self) -> bool:
        from villi.lab import pods, world

        if not self.has_curl:
            self.c.print("[yellow]curl is not installed: skipping the FQDN chapter[/]")
            return True
        self.step("Outside the cluster: hosts by name",
                  "Two hosts outside the cluster (TEST-NET addresses in the lab's own "
                  "namespaces, registered in the lab's DNS server) and a client pod.")
        self.cmd(f"villi lab pod add {CLIENT} --node 1 --labels app=client")
        pods.add(CLIENT, node="1", labels={"app": "client"})
        for name, reply in (("api.example.com", "hello from api.example.com"),
                            ("other.example.com", None)):
            extra = f" --http-reply '{reply}'" if reply else ""
            self.cmd(f"villi lab external add {name} --serve 80/tcp{extra}")
            rec = world.external_add(name, pods.parse_serve("80/tcp"), http_reply=reply)
            self.c.print(f"  {name} at {rec['ip']}", highlight=False)
        path, text = _example_path(FQDN_POLICY_FILE, FQDN_POLICY_TEXT)
        self.step("DNS-aware policy: one outside host, by name",
                  "The client may look up *.example.com names only, and may call "
                  "api.example.com on port 80. The datapath steers the client's DNS packets "
                  "(bpf_sk_assign) to the DNS proxy in the node's villi-proxy: it refuses "
                  "other names, and before an answer reaches the pod it has the agent give "
                  "the answer's IPs an identity the toFQDNs rule selects.")
        if not self.apply_shown(path, text):
            return False
        since = _now()
        _until(lambda: self.curl(CLIENT, "http://api.example.com/")[0] == 0)  # proxy ready
        self.step("api.example.com answers; other.example.com is dropped; example.org is "
                  "refused",
                  "other.example.com resolves (the DNS rule allows *.example.com) but no "
                  "name the toFQDNs rule allows led to its address; www.example.org is "
                  "outside the DNS rule, so the proxy answers REFUSED.")
        api = self.show_curl(CLIENT, "http://api.example.com/", marked=True)
        other = self.show_curl(CLIENT, "http://other.example.com/", marked=True)
        refused = self.show_curl(CLIENT, "http://www.example.org/", marked=True)
        self.step("What the DNS proxy saw: DNS flows, and what the client learned")
        self.villi("observe", "--since", since, "--protocol", "dns", "--pod", CLIENT,
                   timeout=30)
        self.villi("get", "fqdn-cache")
        return api == (0, "hello from api.example.com") and other[0] == 28 and \
            refused[0] == 6

    def deathstar_ips(self) -> list[str]:
        from villi.lab import _state

        state = _state.require()
        return [state["pods"][f"default/{name}"]["ip"] for name, _, _, serves in PODS
                if serves]

    def outro(self, ok: bool, seconds: float) -> None:
        self.c.print()
        if ok:
            self.c.print(f"[bold green]✓ The Empire lands, the Alliance is dropped, the "
                         f"exhaust port is safe, the client calls api.example.com only[/] — demo "
                         f"finished in {seconds:.0f}s.")
        else:
            self.c.print("[bold red]✗ The outcome was not the expected one[/] (see above).")
        self.c.print(Panel(
            "The lab is still up. Explore it:\n"
            "  villi lab status                      nodes, agents, pods\n"
            "  villi get endpoints                   identities and policy enforcement\n"
            "  villi observe --follow --pod default/deathstar   live flows (then retry a ship)\n"
            "  villi lab exec default/xwing -- curl -s -m 2 -XPOST "
            "<deathstar VIP>/v1/request-landing\n"
            "  villi get services                    the VIP and its backends\n"
            "  villi lab pod label default/xwing org=empire      turn the xwing to the dark "
            "side\n"
            "  villi observe --type l7 --http-status 4+         denied HTTP requests\n"
            "  villi delete -f examples/sw_l3_l4_l7_policy.yaml  lift the policy\n"
            "  villi observe --fqdn api.example.com               DNS flows and flows to "
            "its IPs\n"
            "  villi get fqdn-cache                  what each pod resolved, TTLs\n"
            "  villi connectivity test               the built-in scenario suite\n"
            "Tear it all down with [bold]villi lab down[/].",
            title="next", border_style="cyan"))


def _now() -> str:
    """Now, as ``villi observe --since`` takes it."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _until(check: Callable[[], bool], within: float = 15.0) -> bool:
    """Poll ``check`` until it holds (policy reaching every node and proxy)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.3)
    return False


def _curl_outcome(code: int, body: str) -> str:
    """What a user learns from curl's exit code."""
    if code == 0:
        return body
    return {28: "timed out: no answer (dropped)",
            6: "could not resolve the name (the DNS proxy refused it)"}.get(
        code, f"curl exit code {code}")


def drop_counters(state: dict[str, Any]) -> Table:
    """Per node, the datapath's drop counters (read from its pinned metrics map)."""
    from villi.datapath import abi
    from villi.datapath.maps import BpfMap, TypedMap
    from villi.datapath.node import U32

    t = Table(box=None, header_style="bold")
    for col in ("NODE", "REASON", "DIRECTION", "PACKETS"):
        t.add_column(col)
    for node in state["nodes"]:
        path = f"/sys/fs/bpf/villi/{state['cluster']}/{node['name']}/villi_metrics"
        try:
            m = BpfMap.open_pinned(path)
        except Exception as e:
            t.add_row(node["name"], f"(cannot read {path}: {e})", "", "")
            continue
        try:
            for key, per_cpu in TypedMap(m, U32, abi.MetricsValue).items_percpu():
                reason, direction = key.value >> 1, key.value & 1
                pkts = sum(v.packets for v in per_cpu)
                if reason and pkts:
                    text = abi.DROP_REASON_TEXT.get(reason, (str(reason),))[0]
                    t.add_row(node["name"], text, "egress" if direction else "ingress",
                              str(pkts))
        finally:
            m.close()
    return t


def demo_command(args: argparse.Namespace) -> int:
    from villi.errors import VilliError

    try:
        return Demo().run()
    except (VilliError, VilliErrorForDemo) as e:
        from villi.lab._view import console_err

        console_err().print(f"[bold red]demo failed:[/] {e}")
        console_err().print("Clean up with `villi lab down`.")
        return 1
