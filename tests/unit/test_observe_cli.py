"""``villi observe`` speaks hubble's flags; service filters match addresses and backends."""

from __future__ import annotations

import socket
import struct

import numpy as np
import pytest

from villi.cli.main import _parser
from villi.cli.observe import resolve_namespaces
from villi.datapath.abi import FLOW_EVENT_DTYPE
from villi.errors import VilliError
from villi.observer.context import PodInfo, StaticContext
from villi.observer.filters import FilterSpec, Predicate, match
from villi.observer.flow import to_flow
from villi.observer.flowfilter import flow_matches


def parse(*argv: str) -> list[dict]:
    args = _parser().parse_args(["observe", *argv])
    return resolve_namespaces(args)


def test_hubble_short_flags() -> None:
    preds = parse("-n", "shop", "-l", "app=web", "-t", "drop", "--node-name", "n1")
    assert preds == [
        {"field": "namespace", "values": ["shop"], "negate": False},
        {"field": "label", "values": ["app=web"], "negate": False},
        {"field": "type", "values": ["drop"], "negate": False},
        {"field": "node", "values": ["n1"], "negate": False}]
    args = _parser().parse_args(["observe", "-o", "jsonpb", "--numeric"])
    assert args.output == "jsonpb" and args.numeric


def test_namespace_defaults_for_pods_and_services() -> None:
    assert parse("--pod", "web")[0]["values"] == ["default/web"]
    assert parse("-n", "shop", "--to-pod", "web", "--from-pod", "x/y")[1:] == [
        {"field": "to-pod", "values": ["shop/web"], "negate": False},
        {"field": "from-pod", "values": ["x/y"], "negate": False}]
    assert parse("-A", "--service", "web")[0]["values"] == ["/web"]
    with pytest.raises(VilliError, match="cannot be combined"):
        parse("-A", "-n", "shop")


def ip(s: str) -> int:
    return struct.unpack("<I", socket.inet_aton(s))[0]


CTX = StaticContext(
    pods={"10.1.0.1": PodInfo("default", "client", 1), "10.1.0.2": PodInfo("shop", "web-1", 2),
          "10.1.0.3": PodInfo("shop", "db-1", 3)},
    services={("10.96.0.10", 80): ("shop", "web"), ("10.1.0.2", 8080): ("shop", "web"),
              ("10.1.0.3", 5432): ("shop", "db")})


def records() -> np.ndarray:
    rows = [("10.1.0.1", 40000, "10.1.0.2", 8080),   # client -> web backend
            ("10.1.0.2", 8080, "10.1.0.1", 40000),   # its reply
            ("10.1.0.2", 41000, "10.1.0.3", 5432),   # web -> db
            ("10.1.0.1", 40001, "10.1.0.2", 9999)]   # not a service port
    r = np.zeros(len(rows), dtype=FLOW_EVENT_DTYPE)
    for i, (s, sp, d, dp) in enumerate(rows):
        r[i]["src_ip"], r[i]["sport"], r[i]["dst_ip"], r[i]["dport"] = ip(s), sp, ip(d), dp
        r[i]["protocol"], r[i]["event_type"] = 6, 4
    return r


@pytest.mark.parametrize(("field", "values", "want"), [
    ("to-service", ["shop/web"], [True, False, False, False]),
    ("from-service", ["shop/web"], [False, True, False, False]),
    ("service", ["shop/web"], [True, True, False, False]),
    ("service", ["shop/"], [True, True, True, False]),
    ("to-service", ["/db"], [False, False, True, False]),
    ("to-service", ["web"], [False, False, False, False]),   # default namespace
])
def test_service_filters_on_records_and_exported_flows(field: str, values: list[str],
                                                      want: list[bool]) -> None:
    rec = records()
    spec = FilterSpec([Predicate(field, values)])
    assert list(match(spec, rec, CTX)) == want
    flows = [to_flow(r, 0, CTX) for r in rec]
    assert [flow_matches(spec, f) for f in flows] == want
    assert flows[1]["source_service"] == {"name": "web", "namespace": "shop"}


def test_export_filter_from_agent_flag_accepts_services() -> None:
    import argparse

    from villi.agent.config import add_arguments, from_args

    ap = argparse.ArgumentParser()
    add_arguments(ap)
    cfg = from_args(ap.parse_args(["--node", "n1", "--flow-export-filter",
                                   "to-service=shop/db"]))
    spec = FilterSpec.from_json(cfg.extra["flow_export_filter"])
    assert list(match(spec, records(), CTX)) == [False, False, True, False]
