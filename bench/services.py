"""Connect latency through a ClusterIP: villi's socket LB vs kube-proxy-style iptables.

Many short TCP connections (connect, then an RST close so no TIME_WAIT piles up) to
service VIPs, with 10, 1,000 and 10,000 services programmed, measured in one run:

* ``direct``      the client connects to the backend's address: no service at all (floor).
* ``villi-N``     the client runs in a cgroup where ``sock.bpf.c`` is attached, with N
                  services in its LB maps (each its own pin root and cgroup, so all
                  sizes exist at once and rounds interleave).
* ``iptables-N``  the client runs in a namespace holding kube-proxy's iptables-mode
                  rules for the same N services: ``OUTPUT → KUBE-SERVICES`` with one
                  rule per service port jumping to ``KUBE-SVC-*`` (random
                  ``statistic`` split) → ``KUBE-SEP-*`` (``DNAT``), plus
                  ``KUBE-MARK-MASQ``/``KUBE-POSTROUTING``, loaded with iptables-restore.

Each service has two backends (two addresses of one server namespace). Every
configuration connects to the same 32 service indices spread evenly over its services,
so iptables walks on average half of ``KUBE-SERVICES`` — what an average service costs.
Rounds interleave the configurations in a shuffled order to spread the machine's noise.

Topology: a server namespace, one client namespace for villi (and ``direct``), one per
iptables size, joined by veth pairs; iptables rules live only in those client
namespaces, nothing in the root namespace. Prints latencies and ratios; writes
``bench/results/services.json``.

Goal (issue 7): villi-10000 ≤ 1.05 × villi-10, and clearly below iptables-10000.

    sudo .venv/bin/python bench/services.py [--rounds 12] [--per-round 400]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import textwrap
import time
import uuid
from base64 import b32encode
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from villi.datapath import cgroup
from villi.datapath.lb import Backend, Frontend, ServiceDatapath
from villi.datapath.loader import pin_root
from villi.datapath.node import remove_pins
from villi.netns import create_netns, delete_netns

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "services.json"
SIZES = (10, 1000, 10000)
CLUSTER = "bench"
PORT = 80
TARGET_PORT = 8080
SAMPLE_SERVICES = 32

SERVER = textwrap.dedent("""
    import os, socket, sys
    from villi._nsenter import enter_netns_for_good
    enter_netns_for_good(sys.argv[1])
    if sys.argv[3] != "-":
        os.sched_setaffinity(0, {int(sys.argv[3])})
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", int(sys.argv[2])))
    srv.listen(4096)
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        conn.close()
""")

CLIENT = textwrap.dedent("""
    import json, os, socket, struct, sys, time
    from villi._nsenter import enter_netns_for_good
    enter_netns_for_good(sys.argv[1])
    if sys.argv[2] != "-":
        os.sched_setaffinity(0, {int(sys.argv[2])})
    LINGER0 = struct.pack("ii", 1, 0)
    print("ready", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        targets = [tuple(t) for t in req["targets"]]
        out, errors = [], 0
        now = time.perf_counter_ns
        for i in range(req["n"]):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
            t = targets[i % len(targets)]
            t0 = now()
            try:
                s.connect(t)
            except OSError:
                errors += 1
            t1 = now()
            s.close()
            out.append((t1 - t0) / 1000)
        print(json.dumps({"us": out, "errors": errors}), flush=True)
""")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def vip(i: int) -> str:
    """Service i's ClusterIP, inside the default service CIDR 10.32.0.0/16."""
    return f"10.32.{(i + 1) // 250}.{(i + 1) % 250 + 1}"


def sample_indices(n: int) -> list[int]:
    """SAMPLE_SERVICES service indices spread evenly over 0..n-1 (all of them if n is small)."""
    k = min(n, SAMPLE_SERVICES)
    return sorted({(j * n) // k + (n // k) // 2 for j in range(k)})


def _chain(prefix: str, *parts: str) -> str:
    digest = hashlib.sha256("/".join(parts).encode()).digest()
    return prefix + b32encode(digest).decode()[:16]


def kube_proxy_rules(n: int, backends: list[str]) -> str:
    """iptables-restore input for n services as kube-proxy's iptables mode writes it."""
    lines = ["*nat", ":KUBE-SERVICES - [0:0]", ":KUBE-MARK-MASQ - [0:0]",
             ":KUBE-POSTROUTING - [0:0]"]
    rules = [
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" '
        '-j KUBE-POSTROUTING',
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring '
        'SNAT" -j MASQUERADE --random-fully',
    ]
    for i in range(n):
        name = f"bench/svc-{i}:http"
        svc = _chain("KUBE-SVC-", name)
        lines.append(f":{svc} - [0:0]")
        rules.append(f'-A KUBE-SERVICES -d {vip(i)}/32 -p tcp -m comment --comment '
                     f'"{name} cluster IP" -m tcp --dport {PORT} -j {svc}')
        rules.append(f'-A {svc} ! -s 10.64.0.0/10 -d {vip(i)}/32 -p tcp -m comment '
                     f'--comment "{name} cluster IP" -m tcp --dport {PORT} -j KUBE-MARK-MASQ')
        for j, ip in enumerate(backends):
            sep = _chain("KUBE-SEP-", name, ip)
            lines.append(f":{sep} - [0:0]")
            left = len(backends) - j
            stat = (f"-m statistic --mode random --probability {1 / left:.11f} "
                    if left > 1 else "")
            rules.append(f'-A {svc} -m comment --comment "{name} -> {ip}:{TARGET_PORT}" '
                         f"{stat}-j {sep}")
            rules.append(f'-A {sep} -s {ip}/32 -m comment --comment "{name}" '
                         "-j KUBE-MARK-MASQ")
            rules.append(f'-A {sep} -p tcp -m comment --comment "{name}" -m tcp '
                         f"-j DNAT --to-destination {ip}:{TARGET_PORT}")
    return "\n".join(lines + rules + ["COMMIT", ""])


class Bench:
    def __init__(self, sizes: tuple[int, ...], pin: bool = True) -> None:
        self.sizes = sizes
        # Server and clients on different CPUs: otherwise the server's wake-up on the
        # handshake's last ACK may preempt the client inside connect() on some rounds
        # and not others, and the medians jump between two modes (~6 and ~13 us here).
        cpus = sorted(os.sched_getaffinity(0))
        pinned = pin and len(cpus) >= 2
        self.server_cpu = str(cpus[0]) if pinned else "-"
        self.client_cpu = str(cpus[1]) if pinned else "-"
        self.suffix = uuid.uuid4().hex[:6]
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.cgroups: list[Path] = []
        self.datapaths: list[ServiceDatapath] = []
        self.nodes: list[str] = []
        self.clients: dict[str, subprocess.Popen] = {}
        self.targets: dict[str, list[tuple[str, int]]] = {}
        self.setup: dict[str, Any] = {}
        self.server_ns = self._ns("srv")

    # --- topology -------------------------------------------------------------------
    def _ns(self, role: str) -> str:
        name = f"villi-sb{self.suffix}-{role}"
        create_netns(name)
        self.namespaces.append(name)
        return name

    def _run(self, *args: str, stdin: str | None = None) -> None:
        res = subprocess.run(args, input=stdin, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:6])}: {res.stderr.strip()[:500]}")

    def link(self, client_ns: str, k: int) -> list[str]:
        """A veth client↔server on 10.203.k.0/24; the two backend addresses."""
        self._run("ip", "-n", client_ns, "link", "add", "eth0", "type", "veth", "peer", "name",
                  f"c{k}", "netns", self.server_ns)
        self._run("ip", "-n", client_ns, "addr", "add", f"10.203.{k}.100/24", "dev", "eth0")
        backends = [f"10.203.{k}.1", f"10.203.{k}.2"]
        for ip in backends:
            self._run("ip", "-n", self.server_ns, "addr", "add", f"{ip}/24", "dev", f"c{k}")
        self._run("ip", "-n", client_ns, "link", "set", "eth0", "up")
        self._run("ip", "-n", self.server_ns, "link", "set", f"c{k}", "up")
        # a default route, as every node has: the kernel routes a connect to a VIP before
        # iptables' nat OUTPUT rewrites it (villi rewrites the address before routing)
        self._run("ip", "-n", client_ns, "route", "add", "default", "via", backends[0])
        return backends

    def _spawn(self, code: str, *args: str, stdin: bool = False) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], text=True,
                                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                stdout=subprocess.PIPE)
        self.procs.append(proc)
        return proc

    @staticmethod
    def _ready(proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("a helper process did not start")

    def build(self) -> None:
        server = self._spawn(SERVER, self.server_ns, str(TARGET_PORT), self.server_cpu)
        self._ready(server)
        villi_ns = self._ns("villi")
        villi_backends = self.link(villi_ns, 0)
        direct = self._spawn(CLIENT, villi_ns, self.client_cpu, stdin=True)
        self._ready(direct)
        self.clients["direct"] = direct
        self.targets["direct"] = [(villi_backends[i % 2], TARGET_PORT)
                                  for i in range(SAMPLE_SERVICES)]
        for n in self.sizes:
            self._build_villi(n, villi_ns, villi_backends)
        for k, n in enumerate(self.sizes, 1):
            self._build_iptables(n, k)

    def _build_villi(self, n: int, netns: str, backends: list[str]) -> None:
        name = f"villi-{n}"
        node = f"sb{self.suffix}-{n}"
        cg = cgroup.cgroup2_root() / "villi-bench" / node
        self.cgroups.append(cg)
        self.nodes.append(node)
        t0 = time.perf_counter()
        dp = ServiceDatapath(CLUSTER, node, cg)
        self.datapaths.append(dp)
        dp.attach()
        for i in range(n):
            dp.apply(Frontend(vip(i), PORT, "TCP"), [Backend(ip, TARGET_PORT) for ip in backends])
        self.setup[name] = {"program_seconds": round(time.perf_counter() - t0, 3),
                            "lb_services_entries": len(dp.services.items())}
        client = self._spawn(CLIENT, netns, self.client_cpu, stdin=True)
        cgroup.move_pid(cg, client.pid)
        self._ready(client)
        self.clients[name] = client
        self.targets[name] = [(vip(i), PORT) for i in sample_indices(n)]
        log(f"  {name}: {n} services programmed in {self.setup[name]['program_seconds']} s")

    def _build_iptables(self, n: int, k: int) -> None:
        name = f"iptables-{n}"
        ns = self._ns(f"ipt{n}")
        backends = self.link(ns, k)
        rules = kube_proxy_rules(n, backends)
        t0 = time.perf_counter()
        self._run("ip", "netns", "exec", ns, "iptables-restore", "--noflush", stdin=rules)
        self.setup[name] = {"restore_seconds": round(time.perf_counter() - t0, 3),
                            "rules": rules.count("\n-A ")}
        client = self._spawn(CLIENT, ns, self.client_cpu, stdin=True)
        self._ready(client)
        self.clients[name] = client
        self.targets[name] = [(vip(i), PORT) for i in sample_indices(n)]
        log(f"  {name}: {self.setup[name]['rules']} rules restored in "
            f"{self.setup[name]['restore_seconds']} s")

    # --- measuring ------------------------------------------------------------------
    def measure(self, name: str, n: int) -> tuple[list[float], int]:
        proc = self.clients[name]
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({"targets": self.targets[name], "n": n}) + "\n")
        proc.stdin.flush()
        reply = json.loads(proc.stdout.readline())
        return reply["us"], reply["errors"]

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
        for dp in self.datapaths:
            try:
                dp.detach()
            finally:
                dp.close()
        for cg in self.cgroups:
            cgroup.remove_cgroup(cg)
        if self.cgroups:
            try:
                self.cgroups[0].parent.rmdir()
            except OSError:
                pass
        for node in self.nodes:
            remove_pins(pin_root(CLUSTER, node))
        for ns in self.namespaces:
            delete_netns(ns)


def summarise(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"n": len(s), "p50_us": round(s[len(s) // 2], 2),
            "p90_us": round(s[int(len(s) * 0.9)], 2), "p99_us": round(s[int(len(s) * 0.99)], 2),
            "mean_us": round(statistics.fmean(s), 2),
            "trimmed_mean_us": round(statistics.fmean(s[: int(len(s) * 0.95)]), 2)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    load0 = os.getloadavg()
    bench = Bench(tuple(args.sizes), pin=not args.no_pin)
    with ExitStack() as stack:
        stack.callback(bench.close)
        log("building namespaces, programming services ...")
        bench.build()
        names = list(bench.clients)
        for name in names:                      # warm-up: caches, ARP, conntrack modules
            bench.measure(name, 200)
        samples: dict[str, list[float]] = {name: [] for name in names}
        errors = dict.fromkeys(names, 0)
        rnd = random.Random(args.seed)
        log(f"measuring: {args.rounds} rounds x {args.per_round} connects per configuration")
        for r in range(args.rounds):
            order = names[:]
            rnd.shuffle(order)
            for name in order:
                us, err = bench.measure(name, args.per_round)
                samples[name].extend(us)
                errors[name] += err
            log(f"  round {r + 1}/{args.rounds}: " + ", ".join(
                f"{n} {statistics.median(samples[n]):.1f}" for n in names))
        setup = bench.setup
    stats = {name: {**summarise(s), "errors": errors[name], **setup.get(name, {})}
             for name, s in samples.items()}
    lo, hi = min(args.sizes), max(args.sizes)
    ratios = {
        f"villi-{hi}/villi-{lo}": stats[f"villi-{hi}"]["p50_us"] / stats[f"villi-{lo}"]["p50_us"],
        f"iptables-{hi}/villi-{hi}": (stats[f"iptables-{hi}"]["p50_us"]
                                      / stats[f"villi-{hi}"]["p50_us"]),
        f"iptables-{hi}/iptables-{lo}": (stats[f"iptables-{hi}"]["p50_us"]
                                         / stats[f"iptables-{lo}"]["p50_us"]),
        f"villi-{lo}/direct": stats[f"villi-{lo}"]["p50_us"] / stats["direct"]["p50_us"],
    }
    return {
        "benchmark": "services",
        "machine": {"kernel": platform.release(), "nproc": os.cpu_count(),
                    "python": platform.python_version(),
                    "iptables": subprocess.run(["iptables", "-V"], capture_output=True,
                                               text=True).stdout.strip(),
                    "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "git_commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                                 capture_output=True, text=True).stdout.strip(),
                    "loadavg_start": list(load0), "loadavg_end": list(os.getloadavg())},
        "params": {"sizes": list(args.sizes), "rounds": args.rounds,
                   "per_round": args.per_round, "backends_per_service": 2,
                   "sampled_services": SAMPLE_SERVICES, "seed": args.seed,
                   "pinned_cpus": {"server": bench.server_cpu, "clients": bench.client_cpu},
                   "metric": "connect() latency (SYN to SYN-ACK seen by the client), us"},
        "results": stats,
        "ratios_p50": {k: round(v, 3) for k, v in ratios.items()},
        "goals": {"villi_max_over_min_p50_le": 1.05,
                  "villi_ok": ratios[f"villi-{hi}/villi-{lo}"] <= 1.05,
                  "iptables_max_over_villi_max_gt": 1.0,
                  "iptables_ok": ratios[f"iptables-{hi}/villi-{hi}"] > 1.0},
        "wall_time_s": round(time.time() - started, 1),
    }


def report(result: dict[str, Any]) -> None:
    res = result["results"]
    print(f"\n{'config':15s} {'p50 us':>8s} {'p90 us':>8s} {'p99 us':>8s} {'tmean us':>9s} "
          f"{'errors':>6s}  setup")
    for name, s in res.items():
        setup = ", ".join(f"{k}={v}" for k, v in s.items()
                          if k in ("program_seconds", "restore_seconds", "rules"))
        print(f"{name:15s} {s['p50_us']:8.1f} {s['p90_us']:8.1f} {s['p99_us']:8.1f} "
              f"{s['trimmed_mean_us']:9.1f} {s['errors']:6d}  {setup}")
    print("\nratios (p50):")
    for k, v in result["ratios_p50"].items():
        print(f"  {k:28s} {v:.3f}")
    g = result["goals"]
    print(f"\ngoal villi-max/villi-min <= 1.05: {'met' if g['villi_ok'] else 'NOT met'}; "
          f"iptables-max above villi-max: {'met' if g['iptables_ok'] else 'NOT met'}")
    la0, la1 = result["machine"]["loadavg_start"], result["machine"]["loadavg_end"]
    print(f"load average at start {la0[0]:.2f}, at end {la1[0]:.2f} "
          f"({result['machine']['nproc']} CPUs)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES),
                    help="numbers of services (default: 10 1000 10000)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--per-round", type=int, default=400,
                    help="connects per configuration per round")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-pin", action="store_true",
                    help="do not pin the server and the clients to two different CPUs")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/services.py needs root (namespaces, cgroups, eBPF)", file=sys.stderr)
        return 2
    if max(args.sizes) > 60000:
        print("at most 60000 services (the VIP scheme and the LB map size)", file=sys.stderr)
        return 2
    result = run(args)
    report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out} ({result['wall_time_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
