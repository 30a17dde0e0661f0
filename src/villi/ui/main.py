"""``villi ui``: serve the web page until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from villi.errors import VilliError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default="127.0.0.1:12000",
                   help="HOST:PORT or unix:///PATH (default 127.0.0.1:12000; the page has "
                   "no login, so keep it on loopback or a unix socket)")
    p.add_argument("--relay", default="unix:///var/run/villi/relay.sock",
                   help="the relay's HTTP API: unix:///PATH or http://HOST:PORT")
    p.add_argument("--relay-token-file", type=Path,
                   help="token for a relay on TCP (its --client-token-file)")


def run(args: argparse.Namespace) -> int:
    from aiohttp import web

    from villi.relay.server import is_loopback, split_listen, start_site
    from villi.ui.relayclient import RelayClient
    from villi.ui.server import build_app

    kind, where = split_listen(args.listen)
    if kind == "tcp" and not is_loopback(where[0]):  # type: ignore[index]
        raise VilliError(f"--listen {args.listen}: the UI has no login; listen on loopback "
                         "or a unix socket")
    token = None
    if args.relay_token_file:
        from villi.agent.flowserver import read_token

        token = read_token(args.relay_token_file)

    async def main() -> None:
        runner = web.AppRunner(build_app(RelayClient(args.relay, token)), access_log=None)
        await runner.setup()
        try:
            await start_site(runner, args.listen)
            print(f"villi ui: http://{args.listen}/" if kind == "tcp"
                  else f"villi ui on {args.listen}", flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())
    return 0
