"""Policy enforcement and audit settings: their names, their values, which one wins.

Cilium's settings, with Cilium's names and values:

- ``EnablePolicy`` (the agent's ``--enable-policy``): ``default`` enforces in a direction
  once a rule selects the endpoint in it, ``always`` enforces default deny on every
  endpoint in both directions, ``never`` enforces nothing (deny rules included).
- ``PolicyAuditMode``: ``enabled`` forwards what policy would drop and reports it with
  verdict AUDIT; ``disabled`` enforces.

Where they come from, weakest first: the agent's flags, the cluster-wide setting in the
kvstore (``villi config set``), the node's own setting there (``villi config set --node``).
Audit mode can also be set per endpoint (``villi endpoint config``), which only ever adds
audit: an endpoint in audit mode on an enforcing node audits, never the reverse.
``PolicyDegraded`` is the cluster-wide half of the last-resort switch (``villi policy
degrade --all``); the node-local half lives only in the node's pinned datapath state.

Pure logic: no kvstore, no kernel. The agent (``villi.agent.policymode``) and the CLI
(``villi.cli.policyops``) both use it, so both accept and reject the same values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from villi.errors import VilliError

ENFORCEMENT_MODES = ("default", "always", "never")
CONFIG_PREFIX = "villi/config/v1/"
CLUSTER_CONFIG_KEY = CONFIG_PREFIX + "cluster"
NODE_CONFIG_PREFIX = CONFIG_PREFIX + "nodes/"

#: Settings ``villi config set`` accepts, with the values each takes.
SETTINGS: dict[str, tuple[str, ...]] = {"EnablePolicy": ENFORCEMENT_MODES,
                                         "PolicyAuditMode": ("enabled", "disabled")}
#: Settings ``villi endpoint config`` accepts.
ENDPOINT_SETTINGS: dict[str, tuple[str, ...]] = {"PolicyAuditMode": ("enabled", "disabled")}
_TRUE = {"enabled", "true", "on", "1", "yes"}
_FALSE = {"disabled", "false", "off", "0", "no"}


class SettingError(VilliError):
    """A setting or value that does not exist; the message lists what does."""


def node_config_key(node: str) -> str:
    if not node or "/" in node:
        raise SettingError(f"bad node name {node!r}")
    return NODE_CONFIG_PREFIX + node


def parse_bool(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise SettingError(f"{name}={value!r}: use enabled or disabled")


def parse_enforcement(value: str) -> str:
    v = value.strip().lower()
    if v not in ENFORCEMENT_MODES:
        raise SettingError(f"EnablePolicy={value!r}: use one of {', '.join(ENFORCEMENT_MODES)}")
    return v


def parse_assignments(items: list[str], allowed: dict[str, tuple[str, ...]] = SETTINGS
                      ) -> dict[str, str]:
    """``["Key=value", ...]`` → {Key: canonical value}; every item is checked first."""
    if not items:
        raise SettingError("nothing to set: give KEY=VALUE, e.g. PolicyAuditMode=enabled")
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise SettingError(f"{item!r}: expected KEY=VALUE")
        if key not in allowed:
            raise SettingError(f"unknown setting {key!r}; settings: "
                               + ", ".join(f"{k} ({'|'.join(v)})" for k, v in allowed.items()))
        if key == "EnablePolicy":
            out[key] = parse_enforcement(value)
        else:
            out[key] = "enabled" if parse_bool(key, value) else "disabled"
    return out


@dataclass(frozen=True)
class PolicySettings:
    """One layer of settings (flags, cluster or node); None = not set in this layer."""

    enable_policy: str | None = None
    audit: bool | None = None
    degraded: bool = False          # cluster layer only: `villi policy degrade --all`

    @classmethod
    def from_json(cls, data: Any, where: str) -> PolicySettings:
        """A stored layer; a bad value is an error that names ``where`` and the field."""
        if not isinstance(data, dict):
            raise SettingError(f"{where}: expected a JSON object, not {type(data).__name__}")
        unknown = set(data) - {*SETTINGS, "PolicyDegraded"}
        if unknown:
            raise SettingError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")
        try:
            enable = data.get("EnablePolicy")
            audit = data.get("PolicyAuditMode")
            return cls(enable_policy=parse_enforcement(str(enable)) if enable is not None
                       else None,
                       audit=parse_bool("PolicyAuditMode", str(audit)) if audit is not None
                       else None,
                       degraded=parse_bool("PolicyDegraded",
                                           str(data.get("PolicyDegraded", "disabled"))))
        except SettingError as e:
            raise SettingError(f"{where}: {e}") from None

    @classmethod
    def from_bytes(cls, raw: bytes | None, where: str) -> PolicySettings:
        if not raw:
            return cls()
        try:
            return cls.from_json(json.loads(raw), where)
        except ValueError as e:
            raise SettingError(f"{where}: not JSON: {e}") from None


@dataclass(frozen=True)
class Effective:
    """The settings in force on one node, and which layer each came from."""

    enable_policy: str
    enable_policy_source: str
    audit: bool
    audit_source: str
    cluster_degraded: bool

    def as_dict(self) -> dict[str, Any]:
        return {"enablePolicy": self.enable_policy, "enablePolicySource": self.enable_policy_source,
                "auditMode": self.audit, "auditModeSource": self.audit_source,
                "clusterDegraded": self.cluster_degraded}


def effective(flags: PolicySettings, cluster: PolicySettings, node: PolicySettings
              ) -> Effective:
    """Node setting over cluster setting over the agent's flags."""
    enable, enable_src = flags.enable_policy or "default", "flag"
    audit, audit_src = bool(flags.audit), "flag"
    for layer, name in ((cluster, "cluster"), (node, "node")):
        if layer.enable_policy is not None:
            enable, enable_src = layer.enable_policy, name
        if layer.audit is not None:
            audit, audit_src = layer.audit, name
    return Effective(enable, enable_src, audit, audit_src, cluster.degraded)


def direction_text(selected: bool, mode: str, audit: bool, degraded: bool) -> str:
    """What ``villi get endpoints`` shows for one direction (Cilium's words).

    ``selected``: a rule selects the endpoint in this direction (default mode's test).
    """
    if mode == "never":
        return "disabled"
    if not (selected or mode == "always"):
        return "disabled"
    if degraded:
        return "disabled (degraded)"
    if audit:
        return "disabled (audit)"
    return "enabled"


def merge(stored: bytes | None, changes: dict[str, str], unset: tuple[str, ...] = (),
          where: str = "setting") -> bytes:
    """A stored layer with ``changes`` applied and ``unset`` keys removed (validated)."""
    data: dict[str, Any] = json.loads(stored) if stored else {}
    if not isinstance(data, dict):
        data = {}
    data.update(changes)
    for key in unset:
        data.pop(key, None)
    PolicySettings.from_json(data, where)
    return json.dumps(data, sort_keys=True).encode()


__all__ = ["CLUSTER_CONFIG_KEY", "CONFIG_PREFIX", "ENFORCEMENT_MODES", "Effective",
           "PolicySettings", "SettingError", "direction_text", "effective", "merge",
           "node_config_key", "parse_assignments"]
