"""DNS flows in the observer: Hubble's compact lines, --fqdn / --protocol dns / --type l7
filters, destination_names, and the hubble_dns_* metrics."""

from __future__ import annotations

import numpy as np
from prometheus_client import generate_latest

from villi.dnsproxy.records import DNSRecord
from villi.observer import dns
from villi.observer.filters import FilterSpec, Predicate, match
from villi.observer.flowfilter import flow_matches
from villi.observer.format import compact


def _flows() -> tuple[dict, dict, dict]:
    req = DNSRecord("REQUEST", "FORWARDED", ("10.64.0.5", 40000), ("192.0.2.53", 53), "UDP",
                    "api.example.com.", ["A"], time=1764745200.5).to_flow()
    resp = DNSRecord("RESPONSE", "FORWARDED", ("192.0.2.53", 53), ("10.64.0.5", 40000),
                     "UDP", "api.example.com.", ["A"], ips=["198.51.100.10"], ttl=30,
                     rrtypes=["A"], latency_ns=1_500_000, time=1764745200.6).to_flow()
    refused = DNSRecord("REQUEST", "DROPPED", ("10.64.0.5", 40001), ("192.0.2.53", 53),
                        "UDP", "evil.org.", ["A"], time=1764745200.7).to_flow()
    return req, resp, refused


def test_compact_lines_as_hubble_prints_them() -> None:
    req, resp, refused = _flows()
    assert "dns-request FORWARDED (DNS Query api.example.com. A)" in compact(req)
    line = compact(resp)
    assert 'dns-response FORWARDED (DNS Answer "198.51.100.10" TTL: 30 ' \
           '(Proxy api.example.com. A))' in line
    assert "dns-request DROPPED (DNS Query evil.org. A)" in compact(refused)
    assert line.startswith("Dec  3 07:00:00.600: ")
    assert resp["l7"]["dns"]["rcode"] == 0 and resp["l7"]["latency_ns"] == 1_500_000


def test_dict_filters_fqdn_protocol_and_type() -> None:
    req, resp, refused = _flows()
    fq = FilterSpec([Predicate("fqdn", ["*.example.com"])])
    assert flow_matches(fq, req) and flow_matches(fq, resp)
    assert not flow_matches(fq, refused)
    assert flow_matches(FilterSpec([Predicate("protocol", ["dns"])]), refused)
    assert flow_matches(FilterSpec([Predicate("type", ["l7"])]), resp)
    tcp = {"Type": "L3_L4", "verdict": "FORWARDED", "IP": {"source": "10.64.0.5",
           "destination": "198.51.100.10"}, "l4": {"TCP": {"destination_port": 80}}}
    dns.add_destination_names(tcp, lambda ip: ["api.example.com."] if ip ==
                              "198.51.100.10" else [])
    assert tcp["destination_names"] == ["api.example.com."]
    assert flow_matches(fq, tcp)
    assert not flow_matches(FilterSpec([Predicate("protocol", ["dns"])]), tcp)


class _Ctx:
    def node_name(self) -> str:
        return "node1"

    def fqdn_ips(self, pattern: str) -> list[str]:
        return ["198.51.100.10"] if pattern.endswith("example.com") else []


def test_numpy_path_fqdn_matches_learned_ips_and_l7_protocols_match_nothing() -> None:
    import socket
    import struct

    rec = np.zeros(2, dtype=[("src_ip", "<u4"), ("dst_ip", "<u4"), ("protocol", "u1")])
    rec["src_ip"] = struct.unpack("<I", socket.inet_aton("10.64.0.5"))[0]
    rec["dst_ip"][0] = struct.unpack("<I", socket.inet_aton("198.51.100.10"))[0]
    rec["dst_ip"][1] = struct.unpack("<I", socket.inet_aton("203.0.113.9"))[0]
    m = match(FilterSpec([Predicate("fqdn", ["api.example.com"])]), rec, _Ctx())  # type: ignore[arg-type]
    assert m.tolist() == [True, False]
    m = match(FilterSpec([Predicate("protocol", ["dns"])]), rec, _Ctx())  # type: ignore[arg-type]
    assert m.tolist() == [False, False]


def test_dns_metrics_with_hubble_labels() -> None:
    req, resp, refused = _flows()
    m = dns.DNSMetrics()
    for f in (req, resp, refused):
        m.observe(f)
    text = generate_latest(m.registry).decode()
    assert 'hubble_dns_queries_total{ips_returned="0",qtypes="A",rcode=""} 2.0' in text
    assert 'hubble_dns_responses_total{ips_returned="1",qtypes="A",rcode="No Error"} 1.0' \
        in text
    assert 'hubble_dns_response_types_total{qtypes="A",type="A"} 1.0' in text
