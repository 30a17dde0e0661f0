"""Build Ethernet/IPv4 frames for BPF_PROG_TEST_RUN tests."""

from __future__ import annotations

import socket
import struct

ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0800, 0x0806, 0x86DD
SYN, ACK, FIN, RST, PSH = 0x02, 0x10, 0x01, 0x04, 0x08

POD_MAC = bytes.fromhex("020000000001")
GW_MAC = bytes.fromhex("020000000002")


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def eth(proto: int, payload: bytes, src: bytes = POD_MAC, dst: bytes = GW_MAC) -> bytes:
    return dst + src + struct.pack("!H", proto) + payload


def ipv4(src: str, dst: str, proto: int, l4: bytes, frag_off: int = 0) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, frag_off, 64, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    return hdr + l4


def tcp(src: str, dst: str, sport: int, dport: int, flags: int = SYN,
        payload: bytes = b"") -> bytes:
    l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0) + payload
    return eth(ETH_P_IP, ipv4(src, dst, 6, l4))


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"x" * 8) -> bytes:
    l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return eth(ETH_P_IP, ipv4(src, dst, 17, l4))


def icmp_echo(src: str, dst: str, ident: int = 7, reply: bool = False) -> bytes:
    body = struct.pack("!BBHHH", 0 if reply else 8, 0, 0, ident, 1) + b"ping" * 4
    body = body[:2] + struct.pack("!H", _csum(body)) + body[4:]
    return eth(ETH_P_IP, ipv4(src, dst, 1, body))


def sctp(src: str, dst: str, sport: int, dport: int, chunk_type: int = 1) -> bytes:
    """An SCTP packet with one empty chunk (INIT by default); the CRC32c is left zero
    because the datapath never checks it."""
    l4 = struct.pack("!HHII", sport, dport, 0, 0) + struct.pack("!BBH", chunk_type, 0, 4)
    return eth(ETH_P_IP, ipv4(src, dst, 132, l4))


def icmp(src: str, dst: str, icmp_type: int, code: int = 0, body: bytes = bytes(28)) -> bytes:
    """Any ICMPv4 message (e.g. 3/3 port unreachable carrying the offending header)."""
    msg = struct.pack("!BBHI", icmp_type, code, 0, 0) + body
    msg = msg[:2] + struct.pack("!H", _csum(msg)) + msg[4:]
    return eth(ETH_P_IP, ipv4(src, dst, 1, msg))


def arp() -> bytes:
    return eth(ETH_P_ARP, bytes(28), dst=b"\xff" * 6)


def ipv6() -> bytes:
    return eth(ETH_P_IPV6, bytes(40))
