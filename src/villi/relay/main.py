"""``villi relay``: run the relay until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from villi.errors import VilliError
from villi.relay.peers import DEFAULT_AGENT_PORT, Peer, discover, parse_peer

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", action="append", default=[],
                   help="HTTP API address: unix:///PATH or HOST:PORT (repeatable; default "
                   "unix:///var/run/villi/relay.sock)")
    p.add_argument("--grpc-listen", action="append", default=[],
                   help="Hubble gRPC Observer API: unix:///PATH or HOST:PORT (Hubble's 4245)")
    p.add_argument("--peer", action="append", default=[], metavar="NAME=HOST:PORT",
                   help="an agent's TCP flow endpoint (repeatable); without --peer the "
                   "relay discovers the nodes in --kvstore")
    p.add_argument("--kvstore", default=argparse.SUPPRESS,
                   help="store URL, for discovering nodes and reading policies (also "
                   "accepted before the command, as for every villi command)")
    p.add_argument("--agent-port", type=int, default=DEFAULT_AGENT_PORT,
                   help="agents' --flows-listen port for discovered nodes (4244)")
    p.add_argument("--token-file", type=Path,
                   help="bearer token the agents' flow endpoints expect")
    p.add_argument("--tls-ca", type=Path,
                   help="connect to agents over TLS, verifying them with this CA")
    p.add_argument("--tls-cert", type=Path,
                   help="client certificate for agents that require mTLS")
    p.add_argument("--tls-key", type=Path, help="the client certificate's key")
    p.add_argument("--client-token-file", type=Path,
                   help="token TCP clients of the relay (HTTP and gRPC) must present; "
                   "required to listen on a non-loopback TCP address")
    p.add_argument("--dial-timeout", type=float, default=5.0,
                   help="seconds before a node counts as not answering (5)")


def run(args: argparse.Namespace) -> int:
    from aiohttp import web

    from villi.agent.flowserver import client_tls, read_token
    from villi.relay.grpc_api import start_grpc
    from villi.relay.hub import Relay
    from villi.relay.server import build_app, is_loopback, split_listen, start_site

    if args.token_file is None and args.tls_cert is None:
        raise VilliError("give --token-file and/or --tls-cert (the agents' flow endpoints "
                         "are authenticated)")
    token = read_token(args.token_file) if args.token_file else None
    tls = client_tls(args.tls_ca, args.tls_cert, args.tls_key)
    client_token = read_token(args.client_token_file) if args.client_token_file else None
    listens = args.listen or ["unix:///var/run/villi/relay.sock"]
    for addr in listens:
        kind, where = split_listen(addr)
        if kind == "tcp" and not is_loopback(where[0]) and client_token is None:  # type: ignore[index]
            raise VilliError(f"--listen {addr}: a non-loopback address needs "
                             "--client-token-file")
    grpc_tokens: dict[str, str | None] = {}
    for addr in args.grpc_listen:
        kind, where = split_listen(addr)
        remote = kind == "tcp" and not is_loopback(where[0])  # type: ignore[index]
        if remote and client_token is None:
            raise VilliError(f"--grpc-listen {addr}: a non-loopback address needs "
                             "--client-token-file (clients send it as 'authorization: "
                             "Bearer …' metadata)")
        grpc_tokens[addr] = client_token if remote else None
    static = [parse_peer(p) for p in args.peer]
    kvstore = getattr(args, "kvstore", None)
    if not static and not kvstore:
        raise VilliError("give --peer NAME=HOST:PORT or --kvstore to discover the nodes")

    async def main() -> None:
        store = None
        if kvstore:
            from villi.kvstore import open_store

            store = open_store(kvstore)

        async def peers() -> list[Peer]:
            if static:
                return static
            return await discover(store, args.agent_port)

        relay = Relay(peers, token, timeout=args.dial_timeout, tls=tls)
        runner = web.AppRunner(build_app(relay, store, client_token), access_log=None)
        await runner.setup()
        grpc_servers = []
        try:
            for addr in listens:
                await start_site(runner, addr)
            for addr in args.grpc_listen:
                grpc_servers.append(await start_grpc(relay, addr, grpc_tokens[addr]))
            log.info("relay ready: http %s grpc %s", ", ".join(listens),
                     ", ".join(args.grpc_listen) or "-")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        finally:
            for s in grpc_servers:
                await s.stop(0.5)
            await runner.cleanup()
            if store is not None:
                await store.close()

    asyncio.run(main())
    return 0
