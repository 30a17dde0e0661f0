"""Hubble's metric options: which flow metrics are on and which context labels they carry.

Syntax as Hubble's ``--hubble-metrics``: metrics separated by spaces (or commas), options
after ``:`` separated by ``;``, e.g. ``drop flow policy:sourceContext=app|pod;
destinationContext=pod;labelsContext=source_namespace,destination_namespace``. Commas
inside ``labelsContext`` stay with their option. Every name and value is checked: an
unknown metric, option or context is an error naming it, never ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from villi.errors import VilliError

METRICS = ("dns", "drop", "tcp", "flow", "port-distribution", "icmp", "httpV2", "http",
           "policy", "flows-to-world")
DEFAULT = "dns,drop,tcp,flow,port-distribution,icmp,httpV2,policy,flows-to-world"
CONTEXTS = ("identity", "namespace", "pod", "pod-name", "dns", "ip", "reserved-identity",
            "workload", "workload-name", "app")
LABELS_CONTEXT = ("source_ip", "source_namespace", "source_pod", "source_workload",
                  "source_workload_kind", "source_app", "destination_ip",
                  "destination_namespace", "destination_pod", "destination_workload",
                  "destination_workload_kind", "destination_app", "traffic_direction")
FLAG_OPTIONS = {"dns": {"query", "ignoreAAAA"}, "flows-to-world": {"any-drop", "port",
                                                                   "syn-only"},
                "httpV2": {"exemplars"}, "http": {"exemplars"}}


class MetricsConfigError(VilliError):
    """A --hubble-metrics value that cannot be understood."""


@dataclass(frozen=True)
class MetricOptions:
    source_context: tuple[str, ...] = ()
    destination_context: tuple[str, ...] = ()
    labels_context: tuple[str, ...] = ()
    flags: frozenset[str] = frozenset()

    def context_labels(self) -> list[str]:
        """Extra Prometheus label names, in order."""
        out = []
        if self.source_context:
            out.append("source")
        if self.destination_context:
            out.append("destination")
        return out + list(self.labels_context)


@dataclass(frozen=True)
class MetricsConfig:
    metrics: dict[str, MetricOptions] = field(default_factory=dict)

    def enabled(self, name: str) -> bool:
        return name in self.metrics

    def options(self, name: str) -> MetricOptions:
        return self.metrics.get(name, MetricOptions())


def _contexts(metric: str, key: str, value: str) -> tuple[str, ...]:
    parts = tuple(v for v in value.split("|") if v)
    for v in parts:
        if v not in CONTEXTS:
            raise MetricsConfigError(f"--hubble-metrics {metric}: {key}={value}: unknown "
                                     f"context {v!r} (known: {', '.join(CONTEXTS)})")
    if not parts:
        raise MetricsConfigError(f"--hubble-metrics {metric}: {key} needs a value")
    return parts


def _options(metric: str, text: str) -> MetricOptions:
    src: tuple[str, ...] = ()
    dst: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    flags: set[str] = set()
    for opt in filter(None, text.split(";")):
        key, eq, value = opt.partition("=")
        if key == "sourceContext":
            src = _contexts(metric, key, value)
        elif key == "destinationContext":
            dst = _contexts(metric, key, value)
        elif key == "labelsContext":
            labels = tuple(v for v in value.split(",") if v)
            for v in labels:
                if v not in LABELS_CONTEXT:
                    raise MetricsConfigError(
                        f"--hubble-metrics {metric}: labelsContext: unknown label {v!r} "
                        f"(known: {', '.join(LABELS_CONTEXT)})")
        elif key in FLAG_OPTIONS.get(metric, ()):
            flags.add(key if not eq or value in ("true", "") else f"{key}={value}")
        else:
            raise MetricsConfigError(f"--hubble-metrics {metric}: unknown option {key!r}")
    return MetricOptions(src, dst, labels, frozenset(flags))


def parse(text: str | None) -> MetricsConfig:
    """``--hubble-metrics`` → config (None: every metric, no contexts)."""
    text = DEFAULT if text is None else text
    segments: list[str] = []
    for token in re.split(r"\s+", text.strip()):
        first = True
        for seg in token.split(","):
            in_list = not first and segments and "labelsContext=" in segments[-1] and \
                ":" not in seg and seg not in METRICS
            if in_list:
                segments[-1] += "," + seg      # a comma inside labelsContext's value
            elif seg:
                segments.append(seg)
            first = False
    out: dict[str, MetricOptions] = {}
    for seg in segments:
        name, _, opts = seg.partition(":")
        if name not in METRICS:
            raise MetricsConfigError(f"--hubble-metrics: unknown metric {name!r} (villi has "
                                     f"{', '.join(METRICS)})")
        out[name] = _options(name, opts)
    return MetricsConfig(out)
