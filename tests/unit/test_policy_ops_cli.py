"""CLI wiring of ``villi policy …``, ``villi bpf …``, ``villi endpoint/identity get``."""

from __future__ import annotations

import argparse

from villi.cli import bpf, policy_cmd
from villi.cli._groups import group
from villi.cli.main import _parser


def test_commands_parse_to_their_handlers() -> None:
    ap = _parser()
    args = ap.parse_args(["policy", "trace", "--src", "ns/a", "--dst", "ns/b", "--dport",
                          "80/tcp", "-o", "json"])
    assert args.handler is policy_cmd.trace_command and args.output == "json"
    args = ap.parse_args(["policy", "generate", "--since", "5m", "--verdict", "AUDIT",
                          "--verdict", "FORWARDED", "-n", "shop"])
    assert args.handler is policy_cmd.generate_command
    assert args.verdict == ["AUDIT", "FORWARDED"] and args.namespace == "shop"
    assert ap.parse_args(["bpf", "ct", "list", "node2"]).node == "node2"
    assert ap.parse_args(["bpf", "policy", "get", "ns/b", "--node", "n1"]).handler is \
        bpf.policy_get_command
    assert ap.parse_args(["endpoint", "get", "3"]).handler is bpf.endpoint_get_command
    assert ap.parse_args(["identity", "get", "257"]).identity == 257


def test_a_group_is_shared_by_modules_in_any_order() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command")
    other = group(sub, "policy", "policy operations")
    other.add_parser("degrade").set_defaults(handler="degrade")   # another module's verb
    policy_cmd.add_parsers(sub)
    assert group(sub, "policy", "again") is other
    assert ap.parse_args(["policy", "degrade"]).handler == "degrade"
    assert ap.parse_args(["policy", "selectors"]).handler is policy_cmd.selectors_command


def test_a_group_registered_with_plain_add_parser_is_reused() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command")
    ep = sub.add_parser("endpoint").add_subparsers(dest="endpoint_command", required=True)
    ep.add_parser("config").add_argument("endpoint")          # another module's verb
    bpf.add_parsers(sub)
    assert ap.parse_args(["endpoint", "config", "3"]).endpoint == "3"
    assert ap.parse_args(["endpoint", "get", "3"]).handler is bpf.endpoint_get_command


def test_port_text() -> None:
    row = {"protocol": "TCP", "port": 8000, "endPort": 8015}
    assert bpf._port_text(row) == "8000-8015/TCP"
    assert bpf._port_text({"protocol": "ANY", "port": 0, "endPort": 0}) == "ANY"
    assert bpf._port_text({"protocol": "UDP", "port": 0, "endPort": 0}) == "ANY/UDP"
    assert bpf._port_text({"protocol": "TCP", "port": 80, "endPort": 0}) == "80/TCP"
