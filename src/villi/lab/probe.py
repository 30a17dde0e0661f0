"""Connectivity probes from inside a pod's namespace.

A probe opens its socket on a thread that has entered the source pod's network
namespace, so it needs no subprocess: TCP succeeds when the connection is
established (and a byte echoes back when ``echo`` is set), UDP when a reply datagram
comes back, ICMP when ``ping`` gets an answer.
"""

from __future__ import annotations

import socket
import subprocess

from villi._nsenter import in_netns


def tcp_connect(netns: str | None, ip: str, port: int, timeout: float = 1.0,
                echo: bool = True) -> bool:
    with in_netns(netns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((ip, port))
        if echo:
            s.sendall(b"villi\n")
            return s.recv(16) == b"villi\n"
        return True
    except OSError:
        return False
    finally:
        s.close()


def udp_roundtrip(netns: str | None, ip: str, port: int, timeout: float = 1.0) -> bool:
    with in_netns(netns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.sendto(b"villi", (ip, port))
        data, _ = s.recvfrom(64)
        return data == b"villi"
    except OSError:
        return False
    finally:
        s.close()


def ping(netns: str, ip: str, timeout: float = 1.0) -> bool:
    res = subprocess.run(["ip", "netns", "exec", netns, "ping", "-c", "1", "-W",
                          str(max(1, int(timeout))), ip], capture_output=True)
    return res.returncode == 0


def probe(netns: str, ip: str, port: int, proto: str = "tcp", timeout: float = 1.0) -> bool:
    if proto == "udp":
        return udp_roundtrip(netns, ip, port, timeout)
    if proto == "icmp":
        return ping(netns, ip, timeout)
    return tcp_connect(netns, ip, port, timeout)


def probe_detail(netns: str | None, ip: str, port: int, proto: str = "tcp",
                 timeout: float = 1.0) -> tuple[bool, str]:
    """Like :func:`probe`, with why it failed: ``connected``/``reply``, ``timeout``
    (dropped on the way), ``refused`` (reached, nothing listens), ``reset`` ..."""
    if proto == "icmp":
        ok = ping(netns or "", ip, timeout) if netns else False
        return ok, "reply" if ok else "no reply"
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    with in_netns(netns):
        s = socket.socket(socket.AF_INET, kind)
    s.settimeout(timeout)
    try:
        s.connect((ip, port))
        if proto == "udp":
            s.send(b"villi")
            ok = s.recv(64) == b"villi"
            return ok, "reply" if ok else "unexpected reply"
        s.sendall(b"villi\n")
        ok = s.recv(16) == b"villi\n"
        return ok, "connected" if ok else "connected, but no echo"
    except TimeoutError:
        return False, "timeout" if proto == "tcp" else "no reply (timeout)"
    except ConnectionRefusedError:
        return False, "refused"
    except ConnectionResetError:
        return False, "reset"
    except OSError as e:
        return False, e.strerror or str(e)
    finally:
        s.close()
