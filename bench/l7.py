#!/usr/bin/env python3
"""L7 proxy benchmark (issue 12): wrk through villi-proxy against wrk straight to the
server, interleaved in the same run.

Topology (loopback, no namespaces, nothing added to the machine): an HTTP/1.1 server
(uvloop + httptools, keep-alive, a 2-byte body) on 127.0.0.1, and a ``villi-proxy``
process with ``--upstream`` pointing at it and an HTTP rule set that allows the
benchmark's ``GET /bench`` (the rule is evaluated on every request, as in production).
Per round, wrk (Debian's) runs ``--duration`` seconds with ``--connections`` keep-alive
connections, first one configuration then the other, alternating which goes first, so
drift of the shared machine spreads over both.

Reported per configuration (median over rounds): requests/s, p50 and p99 latency
(wrk's ``--latency`` distribution); for the proxy also its CPU time per request (from
``/proc/<pid>/stat`` utime+stime over the requests wrk counted) and the added p99.
Goals from the issue: proxy CPU <= 20 us per request, added p99 <= 1 ms at 32
connections. JSON goes to ``bench/results/l7.json``.

    .venv/bin/python bench/l7.py            # 5 rounds x 5 s
    .venv/bin/python bench/l7.py --quick    # 2 rounds x 2 s, about 15 seconds

Not a test (pytest does not collect bench/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "l7.json"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the upstream server (run as a subprocess: python bench/l7.py --serve PORT) ----------

def serve(port: int) -> None:
    import httptools
    import uvloop

    body = b"ok"
    reply = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n"
             + body)

    class Conn(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self.transport.close()  # type: ignore[attr-defined]

        def on_message_complete(self) -> None:
            self.transport.write(reply)  # type: ignore[attr-defined]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Conn, "127.0.0.1", port, backlog=1024)
        print("ready", flush=True)
        await server.serve_forever()

    uvloop.run(main())


# -- helpers -----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(url: str, seconds: float, connections: int, threads: int) -> dict[str, float]:
    out = subprocess.run(["wrk", "--latency", "-t", str(threads), "-c", str(connections),
                          "-d", f"{max(1, round(seconds))}s", url], capture_output=True, text=True,
                         check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    lat = {p: _ms(v, u) for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$",
                                                   out, re.M)}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "requests": total, "p50_ms": lat.get("50", 0.0),
            "p99_ms": lat.get("99", 0.0), "non2xx": int(non2xx.group(1)) if non2xx else 0}


def push_rules(control: Path, upstream_port: int) -> None:
    from villi.policy.entry import Direction
    from villi.policy.http import HTTPRule
    from villi.policy.l7table import L7Entry

    entry = L7Entry(Direction.INGRESS, 0, upstream_port, 0, 1,
                    (HTTPRule("POST", "/v1/.*"), HTTPRule("GET", "/bench")))
    msg = {"op": "snapshot", "snapshot": {"version": 1, "endpoints": [
        {"id": 1, "ip": "127.0.0.1", "identity": 1000, "l7": [entry.to_wire()]}]}}
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(control))
        s.sendall(json.dumps(msg).encode() + b"\n")
        reply = json.loads(s.makefile().readline())
    if reply.get("op") != "ack":
        raise RuntimeError(f"the proxy refused the rules: {reply}")


def wait_for(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 15
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="2 rounds x 2 s")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    if shutil.which("wrk") is None:
        print("wrk is not installed (make deps installs Debian's wrk)", file=sys.stderr)
        return 2
    if args.quick:
        args.rounds, args.duration = 2, 2
    server_port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="villi-bench-l7-") as tmp:
        try:
            server = subprocess.Popen([sys.executable, __file__, "--serve", str(server_port)],
                                      stdout=subprocess.PIPE)
            procs.append(server)
            assert server.stdout is not None
            server.stdout.readline()
            control, ready = Path(tmp) / "proxy.sock", Path(tmp) / "ready"
            proxy = subprocess.Popen([sys.executable, "-m", "villi.proxy.main", "--control",
                                      str(control), "--ingress-port", "0", "--egress-port",
                                      "0", "--upstream", f"127.0.0.1:{server_port}",
                                      "--ready-file", str(ready)])
            procs.append(proxy)
            wait_for(ready, proxy, "villi-proxy")
            proxy_port = int(ready.read_text().split()[0])
            push_rules(control, server_port)
            urls = {"direct": f"http://127.0.0.1:{server_port}/bench",
                    "proxy": f"http://127.0.0.1:{proxy_port}/bench"}
            wrk(urls["proxy"], 1, args.connections, args.threads)  # warm-up
            runs: dict[str, list[dict[str, float]]] = {"direct": [], "proxy": []}
            for r in range(args.rounds):
                order = ["direct", "proxy"] if r % 2 == 0 else ["proxy", "direct"]
                for name in order:
                    cpu0 = cpu_seconds(proxy.pid)
                    res = wrk(urls[name], args.duration, args.connections, args.threads)
                    cpu = cpu_seconds(proxy.pid) - cpu0
                    if name == "proxy":
                        res["proxy_cpu_us_per_request"] = cpu / max(res["requests"], 1) * 1e6
                    runs[name].append(res)
                    print(f"round {r + 1} {name:6s} {res['rps']:9.0f} req/s  "
                          f"p50 {res['p50_ms']:.3f} ms  p99 {res['p99_ms']:.3f} ms"
                          + (f"  proxy CPU {res['proxy_cpu_us_per_request']:.1f} us/req"
                             if name == "proxy" else ""), flush=True)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    summary = {
        "connections": args.connections, "rounds": args.rounds, "duration_s": args.duration,
        "direct": {k: med("direct", k) for k in ("rps", "p50_ms", "p99_ms")},
        "proxy": {k: med("proxy", k) for k in ("rps", "p50_ms", "p99_ms",
                                               "proxy_cpu_us_per_request")},
        "non2xx": sum(r["non2xx"] for rs in runs.values() for r in rs),
        "runs": runs,
    }
    summary["added_p99_ms"] = summary["proxy"]["p99_ms"] - summary["direct"]["p99_ms"]
    summary["rps_ratio"] = summary["proxy"]["rps"] / summary["direct"]["rps"]
    print()
    print(f"{'':8s}{'req/s':>10s}{'p50 ms':>10s}{'p99 ms':>10s}")
    for name in ("direct", "proxy"):
        s = summary[name]
        print(f"{name:8s}{s['rps']:10.0f}{s['p50_ms']:10.3f}{s['p99_ms']:10.3f}")
    print(f"proxy CPU per request: {summary['proxy']['proxy_cpu_us_per_request']:.1f} us "
          f"(goal <= 20); added p99: {summary['added_p99_ms']:.3f} ms (goal <= 1); "
          f"throughput ratio {summary['rps_ratio']:.2f}; non-2xx: {summary['non2xx']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
