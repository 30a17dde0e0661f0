"""An HTTP/1.1 client for L7 end-to-end tests, run inside a pod's network namespace.

``interactive HOST``: one keep-alive connection; each stdin line ``METHOD PATH`` sends a
request on it and prints ``STATUS BODY`` (one line), so a test can change policy
between two requests of the same connection.

``loop HOST SECONDS``: requests back to back for SECONDS (a new connection every 5
requests), then prints a JSON summary ``{"ok": n, "failed": n, "errors": [...]}``.
"""

from __future__ import annotations

import json
import socket
import sys
import time


def _response(sock: socket.socket, buf: bytes) -> tuple[int, bytes, bytes]:
    while b"\r\n\r\n" not in buf:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("closed before a response")
        buf += more
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("closed in the body")
        rest += more
    return status, rest[:length], rest[length:]


def _request(method: str, path: str, host: str) -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive\r\n"
            f"Content-Length: 0\r\n\r\n").encode()


def interactive(host: str) -> None:
    sock = socket.create_connection((host, 80), timeout=5)
    buf = b""
    for line in sys.stdin:
        method, path = line.split()
        sock.sendall(_request(method, path, host))
        status, body, buf = _response(sock, buf)
        print(status, body.decode().strip(), flush=True)


def loop(host: str, seconds: float) -> None:
    ok = failed = 0
    errors: list[str] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, 80), timeout=5) as sock:
                buf = b""
                for _ in range(5):
                    sock.sendall(_request("POST", "/v1/request-landing", host))
                    status, _body, buf = _response(sock, buf)
                    if status == 200:
                        ok += 1
                    else:
                        failed += 1
                        errors.append(f"status {status}")
                    time.sleep(0.01)
        except OSError as exc:
            failed += 1
            errors.append(repr(exc))
    print(json.dumps({"ok": ok, "failed": failed, "errors": errors[:10]}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "interactive":
        interactive(sys.argv[2])
    else:
        loop(sys.argv[2], float(sys.argv[3]))
