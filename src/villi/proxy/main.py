"""``villi-proxy``: run the node's HTTP proxy (in the node's network namespace).

    villi-proxy --control /run/villi/proxy.sock --ingress-port 15001 --egress-port 15002

It serves until SIGTERM/SIGINT. The agent connects to ``--control`` to feed policy and
collect L7 records; ``--state-file`` keeps the last policy across proxy restarts.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from villi.policy.entry import Direction
from villi.proxy.control import ControlServer
from villi.proxy.relay import Limits
from villi.proxy.server import ProxyServer
from villi.proxy.store import PolicyStore

DEFAULT_INGRESS_PORT = 15001
DEFAULT_EGRESS_PORT = 15002

#: Something else the proxy process hosts (the DNS proxy): started once the listeners
#: are up with the shared policy store and control server; returns its stop function.
Plugin = Callable[[PolicyStore, ControlServer], Awaitable[Callable[[], Awaitable[None]]]]


def parser() -> argparse.ArgumentParser:
    """villi-proxy's options (``villi.dnsproxy.host`` adds the DNS proxy's)."""
    p = argparse.ArgumentParser(prog="villi-proxy", description=__doc__.splitlines()[0])
    p.add_argument("--control", type=Path, required=True, help="unix socket for the agent")
    p.add_argument("--ingress-port", type=int, default=DEFAULT_INGRESS_PORT)
    p.add_argument("--egress-port", type=int, default=DEFAULT_EGRESS_PORT)
    p.add_argument("--state-file", type=Path, default=None,
                   help="where the last policy snapshot is kept for restarts")
    defaults = Limits()
    p.add_argument("--header-timeout", type=float, default=defaults.header_timeout,
                   help="seconds a request head may take to arrive (slowloris)")
    p.add_argument("--idle-timeout", type=float, default=defaults.idle_timeout,
                   help="seconds an idle keep-alive connection is kept")
    p.add_argument("--no-transparent", action="store_true",
                   help="plain listeners and upstream sockets (tests without a datapath)")
    p.add_argument("--ready-file", type=Path, default=None,
                   help="written once the listeners are up")
    p.add_argument("--upstream", metavar="HOST:PORT", default=None,
                   help="treat HOST:PORT as every connection's original destination "
                   "(benchmarks without a datapath; implies plain listeners on 127.0.0.1)")
    return p


async def serve(args: argparse.Namespace, plugins: Sequence[Plugin] = ()) -> None:
    try:
        import uvloop  # noqa: F401  (the loop policy is set in main)
    except ImportError:
        pass
    store = PolicyStore(args.state_file)
    limits = Limits(header_timeout=args.header_timeout, idle_timeout=args.idle_timeout)
    server: ProxyServer
    control = ControlServer(args.control, store, lambda: server.stats.as_dict())
    server = ProxyServer(store, control.emit, limits, transparent=not args.no_transparent)
    host = "0.0.0.0"
    if args.upstream:
        up_host, _, up_port = args.upstream.rpartition(":")
        fixed = (up_host, int(up_port))
        server.orig_dst = lambda _w: fixed
        server.transparent, server.mark, host = False, 0, "127.0.0.1"
    await control.start()
    ingress = await server.listen(Direction.INGRESS, args.ingress_port, host)
    egress = await server.listen(Direction.EGRESS, args.egress_port, host)
    stops = [await plugin(store, control) for plugin in plugins]
    if args.ready_file is not None:
        args.ready_file.write_text(f"{ingress} {egress}\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for stop_plugin in stops:
        await stop_plugin()
    await control.close()
    await server.close()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    run(args)
    return 0


def run(args: argparse.Namespace, plugins: Sequence[Plugin] = ()) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="villi-proxy %(levelname)s %(message)s")
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args, plugins))
    else:
        uvloop.run(serve(args, plugins))


if __name__ == "__main__":
    sys.exit(main())
