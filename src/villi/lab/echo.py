"""A tiny echo server for lab pods: TCP accept + echo, UDP echo, on several ports.

Run inside a pod's namespace (``ip netns exec POD python -m villi.lab.echo 80/tcp
81/udp``, or ``python -m villi.lab.echo --netns POD 80/tcp``, which enters the namespace
itself and so keeps the namespace's name in its command line, where ``villi lab down``
finds it). TCP connections echo each line back (and can stay open for long-lived
connection tests); UDP datagrams are echoed to their sender. One thread per listener,
one per TCP connection: lab traffic is small.

A TCP connection that starts with an HTTP request line gets one HTTP answer instead
(``200 OK``, body from ``--http-reply``, default ``villi echo: METHOD PATH``), so
``curl`` works against any lab pod; the Star Wars demo's deathstar answers
``Ship landed`` this way. ``--http-route 'PUT /v1/exhaust-port=Panic: deathstar
exploded'`` (repeatable) sets the answer for one method and path, as Cilium's deathstar
does; ``GET /.villi/peer`` answers the client's IP as the server sees it. A request with
``Connection: keep-alive`` keeps the connection open for the next one.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading


def parse_port(spec: str) -> tuple[int, str]:
    """``80/tcp``, ``81/udp``, ``web=8080/tcp`` or ``80`` (TCP) → (port, proto)."""
    if "=" in spec:
        spec = spec.split("=", 1)[1]
    port, _, proto = spec.partition("/")
    proto = (proto or "tcp").lower()
    if proto not in ("tcp", "udp"):
        raise ValueError(f"{spec!r}: protocol must be tcp or udp")
    n = int(port)
    if not 1 <= n <= 65535:
        raise ValueError(f"{spec!r}: port out of range")
    return n, proto


HTTP_METHODS = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"PATCH ", b"OPTIONS ")
_http_reply: str | None = None
_http_routes: dict[tuple[str, str], str] = {}


def parse_route(spec: str) -> tuple[tuple[str, str], str]:
    """``'PUT /v1/exhaust-port=Panic: deathstar exploded'`` → ((PUT, /v1/...), body)."""
    target, eq, body = spec.partition("=")
    method, _, path = target.strip().partition(" ")
    if not eq or not method or not path.startswith("/"):
        raise ValueError(f"{spec!r}: expected 'METHOD /path=reply'")
    return (method.upper(), path.strip()), body


def _answer_http(conn: socket.socket, data: bytes) -> bytes | None:
    """Answer one request; returns the bytes after it when the client asked for
    ``Connection: keep-alive`` (None: the connection closes, the default)."""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        more = conn.recv(65536)
        if not more:
            break
        data += more
    head, _, rest_bytes = data.partition(b"\r\n\r\n")
    keep = b"\r\nconnection: keep-alive" in head.lower()
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            length = int(value.strip())
    while len(rest_bytes) < length:
        more = conn.recv(65536)
        if not more:
            break
        rest_bytes += more
    rest_bytes = rest_bytes[length:]
    method, _, rest = data.partition(b"\r\n")[0].decode(errors="replace").partition(" ")
    path = rest.split(" ", 1)[0]
    body = _http_routes.get((method, path))
    if path == "/.villi/peer":  # who connected (the L7 proxy must preserve the client IP)
        body = conn.getpeername()[0]
    if body is None:
        body = _http_reply if _http_reply is not None else f"villi echo: {method} {path}"
    raw = (body.rstrip("\n") + "\n").encode()
    reply = (f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(raw)}"
             f"\r\nConnection: {'keep-alive' if keep else 'close'}\r\n\r\n").encode()
    conn.sendall(reply + (b"" if method == "HEAD" else raw))
    return rest_bytes if keep else None


def _serve_tcp_conn(conn: socket.socket) -> None:
    with conn:
        first = True
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            if first and data.startswith(HTTP_METHODS):
                try:
                    rest: bytes | None = _answer_http(conn, data)
                    while rest is not None:
                        if not rest:
                            rest = conn.recv(65536)
                            if not rest:
                                break
                        rest = _answer_http(conn, rest)
                except OSError:
                    pass
                return
            first = False
            try:
                conn.sendall(data)
            except OSError:
                return


def bind_tcp(port: int, host: str = "0.0.0.0") -> socket.socket:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(512)
    return srv


def bind_udp(port: int, host: str = "0.0.0.0") -> socket.socket:
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind((host, port))
    return srv


def serve_tcp(srv: socket.socket) -> None:
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_serve_tcp_conn, args=(conn,), daemon=True).start()


def serve_udp(srv: socket.socket) -> None:
    while True:
        data, peer = srv.recvfrom(65536)
        srv.sendto(data, peer)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--netns", help="network namespace (name or path) to serve in")
    ap.add_argument("--http-reply", help="body of the answer to HTTP requests")
    ap.add_argument("--http-route", action="append", default=[],
                    help="'METHOD /path=reply': the answer for one method and path")
    ap.add_argument("--bind", default="0.0.0.0", help="address to serve on (lab "
                    "external hosts share one namespace, each on its own address)")
    ap.add_argument("ports", nargs="+", help="PORT/tcp or PORT/udp")
    args = ap.parse_args(argv)
    global _http_reply
    _http_reply = args.http_reply
    try:
        _http_routes.update(parse_route(r) for r in args.http_route)
    except ValueError as e:
        ap.error(str(e))
    specs = [parse_port(p) for p in args.ports]
    if args.netns:
        from villi._nsenter import enter_netns_for_good

        enter_netns_for_good(args.netns)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # Bind every socket before saying "ready": a probe right after must not race the
    # listener threads.
    bound = [(bind_tcp(p, args.bind), serve_tcp) if proto == "tcp"
             else (bind_udp(p, args.bind), serve_udp)
             for p, proto in specs]
    for srv, serve in bound:
        threading.Thread(target=serve, args=(srv,), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
