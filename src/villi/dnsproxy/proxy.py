"""The DNS proxy: check each query against the endpoint's DNS rules, forward it to where
the pod sent it, learn the answer's IPs, and release the answer only once the datapath
allows them.

One asyncio server per node serves UDP and TCP on one port. Transparent mode is how
the eBPF steering delivers pods' DNS packets: the listener has ``IP_TRANSPARENT``,
``bpf_sk_assign`` hands it packets addressed to the pod's DNS server, UDP datagrams carry
their original destination (``IP_RECVORIGDSTADDR``) and the answer goes back from that
address (a socket bound to it with ``IP_TRANSPARENT``), so the pod sees its own server
answer. A TCP connection's local address already is the original destination.

Per query (Cilium's sequence, ``pkg/fqdn/dnsproxy``):
  1. the source IP names the endpoint; its DNS rules (``rules.dns`` patterns) decide;
     a query no rule allows is answered REFUSED (or NXDOMAIN, ``reject_rcode``) and
     recorded as a DROPPED request;
  2. allowed queries are forwarded 1:1 to the original destination (no caching);
  3. the answer's A records go into the endpoint's DNS cache (TTL ≥ ``min_ttl``), the
     ``on_learned`` hook runs (identities, ipcache and policy map writes) and the answer
     is held until it completes, at most ``hold`` seconds (Cilium's
     ``--tofqdns-proxy-response-max-delay``, 100 ms); a hold that times out is counted
     and logged, and the answer released anyway.
Every step yields a :class:`~villi.dnsproxy.records.DNSRecord` for the observer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from dnslib import DNSError
from dnslib import DNSRecord as WireRecord

from villi.dnsproxy.cache import CacheStore
from villi.dnsproxy.records import DNSRecord, a_records, answer_fields, question, reject
from villi.policy.fqdn import DNSRuleSet

log = logging.getLogger("villi.dnsproxy")

SOL_IP = 0
IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = 20
MAX_UDP = 65535

Addr = tuple[str, int]
#: on_learned(endpoint IP, name, [IP]) — identities + ipcache + policy maps.
LearnedHook = Callable[[str, str, list[str]], Awaitable[object]]
RecordHook = Callable[[DNSRecord], None]


@dataclass
class ProxyConfig:
    reject_rcode: str = "refused"        # --tofqdns-dns-reject-response-code
    hold: float = 0.100                  # --tofqdns-proxy-response-max-delay
    upstream_timeout: float = 10.0
    transparent: bool = False            # steered by bpf_sk_assign (needs CAP_NET_ADMIN)
    #: a query from an endpoint with no rules here waits this long for rules naming it:
    #: the datapath redirects as soon as the policy maps are written, the agent's
    #: snapshot with the endpoint's rules follows a few ms later
    unknown_endpoint_wait: float = 0.25
    #: where to forward, given the original destination (tests map it to a local server)
    upstream: Callable[[Addr], Addr] = field(default=lambda dst: dst)

    def __post_init__(self) -> None:
        if self.reject_rcode not in ("refused", "nameError"):
            raise ValueError(f"--tofqdns-dns-reject-response-code must be refused or "
                             f"nameError, not {self.reject_rcode!r}")
        if not 0 < self.hold <= 10:
            raise ValueError("the response hold must be in (0, 10] seconds")


@dataclass
class ProxyStats:
    queries: int = 0
    refused: int = 0
    forwarded: int = 0
    upstream_errors: int = 0
    hold_timeouts: int = 0
    learned_ips: int = 0


class DNSProxy:
    def __init__(self, caches: CacheStore, *, config: ProxyConfig | None = None,
                 on_learned: LearnedHook | None = None,
                 on_record: RecordHook | None = None) -> None:
        self.caches = caches
        self.config = config or ProxyConfig()
        self.on_learned = on_learned
        self.on_record = on_record or (lambda r: None)
        self.stats = ProxyStats()
        self._rules: dict[str, DNSRuleSet] = {}
        self._rules_changed = asyncio.Event()
        self._udp: socket.socket | None = None
        self._tcp: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.address: Addr | None = None

    # -- rules ------------------------------------------------------------------------

    def set_rules(self, endpoint_ip: str, rules: DNSRuleSet | None) -> None:
        """The DNS rules of an endpoint (None: it has none, so every query is refused)."""
        if rules is None:
            self._rules.pop(endpoint_ip, None)
        else:
            self._rules[endpoint_ip] = rules

    def replace_rules(self, rules: dict[str, DNSRuleSet]) -> None:
        """Every endpoint's DNS rules at once (endpoints not named have none)."""
        self._rules = dict(rules)
        self._rules_changed.set()
        self._rules_changed = asyncio.Event()

    async def _rules_for(self, endpoint_ip: str) -> None:
        """Wait (bounded) for rules naming an endpoint the proxy does not know yet."""
        deadline = time.monotonic() + self.config.unknown_endpoint_wait
        while endpoint_ip not in self._rules:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rules_changed.wait(), left)

    def allows(self, endpoint_ip: str, qname: str) -> bool:
        rules = self._rules.get(endpoint_ip)
        return rules is not None and rules.allows(qname)

    # -- lifecycle --------------------------------------------------------------------

    async def start(self, host: str = "0.0.0.0", port: int = 0) -> Addr:
        """Listen on UDP and TCP ``host:port`` (port 0: pick one free for both)."""
        for attempt in range(50):
            try:
                return await self._start(host, port)
            except OSError as e:
                if port != 0 or e.errno != errno.EADDRINUSE or attempt == 49:
                    raise
        raise AssertionError("not reached")

    async def _start(self, host: str, port: int) -> Addr:
        loop = asyncio.get_running_loop()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.config.transparent:
            udp.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
        udp.setsockopt(SOL_IP, IP_RECVORIGDSTADDR, 1)
        udp.bind((host, port))
        udp.setblocking(False)
        port = udp.getsockname()[1]
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.config.transparent:
            tcp.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
        try:
            tcp.bind((host, port))
        except OSError:
            udp.close()
            tcp.close()
            raise
        self._udp = udp
        loop.add_reader(udp.fileno(), self._on_udp_readable)
        self._tcp = await asyncio.start_server(self._serve_tcp, sock=tcp)
        self.address = (host, port)
        return self.address

    async def stop(self) -> None:
        if self._udp is not None:
            asyncio.get_running_loop().remove_reader(self._udp.fileno())
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
            self._tcp = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.caches.save()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- UDP --------------------------------------------------------------------------

    def _on_udp_readable(self) -> None:
        assert self._udp is not None
        for _ in range(64):   # drain a burst without starving the loop
            try:
                data, anc, _flags, client = self._udp.recvmsg(MAX_UDP, 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("dns proxy: udp receive failed: %s", e)
                return
            orig = _orig_dst(anc) or self._udp.getsockname()
            self._spawn(self._udp_query(data, client, orig))

    async def _udp_query(self, data: bytes, client: Addr, orig: Addr) -> None:
        reply = await self.handle(data, client, orig, "UDP")
        if reply is not None:
            self._send_udp(reply, client, orig)

    def _send_udp(self, reply: bytes, client: Addr, orig: Addr) -> None:
        """Answer from the address the pod asked (transparent), else from the listener."""
        if not self.config.transparent or self._udp is None:
            if self._udp is not None:
                self._udp.sendto(reply, client)
            return
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
            s.bind(orig)
            s.sendto(reply, client)
        except OSError as e:
            log.warning("dns proxy: cannot answer %s from %s: %s", client, orig, e)
        finally:
            s.close()

    # -- TCP --------------------------------------------------------------------------

    async def _serve_tcp(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        client = writer.get_extra_info("peername")[:2]
        orig = writer.get_extra_info("sockname")[:2]   # the original destination
        try:
            while True:
                try:
                    head = await reader.readexactly(2)
                    data = await reader.readexactly(struct.unpack("!H", head)[0])
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                reply = await self.handle(data, client, orig, "TCP")
                if reply is None:
                    return
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # -- one query --------------------------------------------------------------------

    async def handle(self, data: bytes, client: Addr, orig: Addr, proto: str) -> bytes | None:
        """The answer to one query (None: nothing to send back)."""
        t0 = time.monotonic_ns()
        self.stats.queries += 1
        try:
            msg = WireRecord.parse(data)
        except (DNSError, Exception):   # dnslib raises assorted errors on garbage
            log.info("dns proxy: unparsable message from %s dropped", client)
            return None
        qname, qtypes = question(msg)
        endpoint = client[0]
        if endpoint not in self._rules and self.config.unknown_endpoint_wait > 0:
            await self._rules_for(endpoint)
        allowed = self.allows(endpoint, qname)
        self._record("REQUEST", "FORWARDED" if allowed else "DROPPED", client, orig, proto,
                     qname, qtypes, endpoint)
        if not allowed:
            self.stats.refused += 1
            return reject(msg, self.config.reject_rcode)
        try:
            answer = await self._forward(data, orig, proto)
        except (OSError, TimeoutError) as e:
            self.stats.upstream_errors += 1
            log.info("dns proxy: %s query %s to %s failed: %s", proto, qname, orig, e)
            return None   # the client retries, as after a lost datagram
        self.stats.forwarded += 1
        try:
            parsed = WireRecord.parse(answer)
        except (DNSError, Exception):
            return answer   # pass through what we cannot read; learn nothing
        await self._learn(endpoint, qname, parsed)
        fields = answer_fields(parsed)
        self._record("RESPONSE", "FORWARDED", orig, client, proto, qname, qtypes, endpoint,
                     latency_ns=time.monotonic_ns() - t0, **fields)
        return answer

    async def _forward(self, data: bytes, orig: Addr, proto: str) -> bytes:
        upstream = self.config.upstream(orig)
        timeout = self.config.upstream_timeout
        if proto == "TCP":
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*upstream),
                                                    timeout)
            try:
                writer.write(struct.pack("!H", len(data)) + data)
                await writer.drain()
                head = await asyncio.wait_for(reader.readexactly(2), timeout)
                return await asyncio.wait_for(
                    reader.readexactly(struct.unpack("!H", head)[0]), timeout)
            except asyncio.IncompleteReadError as e:
                raise OSError("upstream closed the connection") from e
            finally:
                writer.close()
        loop = asyncio.get_running_loop()
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        try:
            await loop.sock_connect(s, upstream)
            await loop.sock_sendall(s, data)
            return await asyncio.wait_for(loop.sock_recv(s, MAX_UDP), timeout)
        finally:
            s.close()

    async def _learn(self, endpoint: str, qname: str, msg: WireRecord) -> None:
        """Cache the answer's IPs and hold until the datapath allows them. Every name of
        a CNAME chain (the query, each CNAME target, each A record's owner) gets the
        chain's IPs, so a toFQDNs selector naming any of them opens them."""
        records = a_records(msg)
        chain = {qname} | {owner for owner, _ip, _ttl in records}
        chain |= {c if c.endswith(".") else c + "." for c in answer_fields(msg)["cnames"]}
        pairs = [(ip, ttl) for _owner, ip, ttl in records]
        by_name: dict[str, list[tuple[str, int]]] = (
            {name: pairs for name in sorted(chain)} if pairs else {})
        if not by_name:
            return
        cache = self.caches.for_endpoint(endpoint)
        for name, pairs in by_name.items():
            cache.update(name, pairs)
        self.stats.learned_ips += len(by_name.get(qname, []))
        if self.on_learned is None:
            return
        work = asyncio.gather(*(self.on_learned(endpoint, name, [ip for ip, _ in pairs])
                                for name, pairs in by_name.items()))
        try:
            await asyncio.wait_for(asyncio.shield(work), self.config.hold)
        except TimeoutError:
            self.stats.hold_timeouts += 1
            log.warning("dns proxy: datapath update for %s (%s) took longer than %.0f ms; "
                        "answer released anyway (hold timeouts: %d)", qname, endpoint,
                        self.config.hold * 1000, self.stats.hold_timeouts)
            work.add_done_callback(_log_failure)
        except Exception as e:   # the hook failed: the pod will see drops, say why
            log.error("dns proxy: datapath update for %s failed: %s", qname, e)

    def _record(self, kind: str, verdict: str, src: Addr, dst: Addr, proto: str,
                query: str, qtypes: list[str], endpoint: str, **fields: object) -> None:
        rec = DNSRecord(kind=kind, verdict=verdict, source=tuple(src[:2]),  # type: ignore[arg-type]
                        destination=tuple(dst[:2]), protocol=proto,  # type: ignore[arg-type]
                        query=query, qtypes=qtypes, endpoint=endpoint, **fields)  # type: ignore[arg-type]
        try:
            self.on_record(rec)
        except Exception as e:   # an observer problem must not break DNS
            log.warning("dns proxy: record hook failed: %s", e)


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("dns proxy: late datapath update failed: %s", fut.exception())


def _orig_dst(ancdata: list[tuple[int, int, bytes]]) -> Addr | None:
    """The ``IP_ORIGDSTADDR`` control message: a ``sockaddr_in``."""
    for level, kind, data in ancdata:
        if level == SOL_IP and kind == IP_RECVORIGDSTADDR and len(data) >= 8:
            port = struct.unpack("!H", data[2:4])[0]
            return socket.inet_ntoa(data[4:8]), port
    return None
