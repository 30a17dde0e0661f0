"""The proxy's listeners: one transparent TCP listener per redirect direction.

Each listener is bound to ``0.0.0.0:<port>`` with ``IP_TRANSPARENT``: the datapath
assigns redirected connections to it with ``bpf_sk_assign`` (a lookup that only finds
listeners on the wildcard address), and the accepted socket's local address is the
connection's original destination.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from villi.policy.entry import Direction
from villi.proxy.relay import IP_TRANSPARENT, ClientConnection, Emit, Limits, Stats
from villi.proxy.store import PolicyStore

#: Mark of the proxy's upstream packets (the datapath never redirects them again);
#: Cilium's MARK_MAGIC_PROXY_EGRESS-like value, with the "from proxy" nibble 0xa00.
FROM_PROXY_MARK = 0x0A00

OrigDst = Callable[[asyncio.StreamWriter], tuple[str, int]]


def _sockname(writer: asyncio.StreamWriter) -> tuple[str, int]:
    name = writer.get_extra_info("sockname")
    return str(name[0]), int(name[1])


def transparent_listener(host: str, port: int, transparent: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if transparent:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


@dataclass
class ProxyServer:
    """Listeners + shared store, counters and limits."""

    store: PolicyStore
    emit: Emit
    limits: Limits = field(default_factory=Limits)
    stats: Stats = field(default_factory=Stats)
    transparent: bool = True
    mark: int = FROM_PROXY_MARK
    orig_dst: OrigDst = _sockname
    servers: list[asyncio.AbstractServer] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def listen(self, direction: Direction, port: int, host: str = "0.0.0.0") -> int:
        sock = transparent_listener(host, port, self.transparent)

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = ClientConnection(reader, writer, direction=direction, store=self.store,
                                    orig_dst=self.orig_dst(writer), stats=self.stats,
                                    limits=self.limits, emit=self.emit,
                                    transparent=self.transparent, mark=self.mark)
            task = asyncio.current_task()
            assert task is not None
            self.tasks.add(task)  # type: ignore[arg-type]
            try:
                await conn.run()
            except asyncio.CancelledError:
                pass  # shutting down; asyncio's stream callback must not see it
            finally:
                self.tasks.discard(task)  # type: ignore[arg-type]

        server = await asyncio.start_server(accept, sock=sock, limit=65536)
        self.servers.append(server)
        return int(sock.getsockname()[1])

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=5)
        for server in self.servers:
            await server.wait_closed()
