"""The invocation's environment: ``CNI_*`` variables and the ``CNI_ARGS`` pairs.

``CNI_ARGS`` is ``K1=V1;K2=V2`` (libcni splits pairs at ``;`` and each pair at ``=``, so
neither may appear in a value). villi reads the Kubernetes keys and two extensions whose
values avoid both separators::

    VILLI_LABELS=app:web,tier:frontend       labels, key:value joined by ","
    VILLI_PORTS=http:8080/tcp,dns:53/udp     named ports, name:port[/protocol] joined by ","

Label keys and values, and port names, follow Kubernetes' syntax, which contains neither
``:`` nor ``,``. Unknown keys are an error unless ``IgnoreUnknown=1`` (as in libcni).
"""

from __future__ import annotations

import re

from villi.cni._errors import INVALID_ENV, CNIError

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")

KNOWN_ARGS = (
    "IgnoreUnknown",
    "K8S_POD_NAMESPACE",
    "K8S_POD_NAME",
    "K8S_POD_INFRA_CONTAINER_ID",
    "K8S_POD_UID",
    "VILLI_LABELS",
    "VILLI_PORTS",
)

_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")
_LABEL_NAME = re.compile(r"([A-Za-z0-9]([A-Za-z0-9_.\-]*[A-Za-z0-9])?)?\Z")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([a-z0-9\-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9\-]*[a-z0-9])?)*\Z")
_PORT_NAME = re.compile(r"[a-z0-9]([a-z0-9\-]*[a-z0-9])?\Z")
PROTOCOLS = ("TCP", "UDP", "SCTP")


class Invocation:
    """The ``CNI_*`` variables of one run (empty strings when unset)."""

    __slots__ = ("command", "container_id", "netns", "ifname", "args", "path")

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = environ if environ is not None else {}
        self.command = env.get("CNI_COMMAND", "")
        self.container_id = env.get("CNI_CONTAINERID", "")
        self.netns = env.get("CNI_NETNS", "")
        self.ifname = env.get("CNI_IFNAME", "")
        self.args = env.get("CNI_ARGS", "")
        self.path = [p for p in env.get("CNI_PATH", "").split(":") if p]

    def check_command(self) -> None:
        if not self.command:
            raise CNIError(INVALID_ENV, "required env variables [CNI_COMMAND] missing")
        if self.command not in COMMANDS:
            raise CNIError(
                INVALID_ENV,
                f"unknown CNI_COMMAND: {self.command}",
                f"villi-cni understands {', '.join(COMMANDS)}",
            )

    def require(self, *names: str) -> None:
        """Fail with code 4 naming every missing variable, then validate the given ones."""
        values = {"CNI_CONTAINERID": self.container_id, "CNI_NETNS": self.netns,
                  "CNI_IFNAME": self.ifname}
        missing = [n for n in names if not values[n]]
        if missing:
            raise CNIError(
                INVALID_ENV, f"required env variables [{','.join(missing)}] missing",
                f"{self.command} needs {', '.join(names)}",
            )
        if "CNI_CONTAINERID" in names:
            validate_container_id(self.container_id)
        if "CNI_IFNAME" in names:
            validate_ifname(self.ifname)
        if "CNI_NETNS" in names and not self.netns.startswith("/"):
            raise CNIError(INVALID_ENV, f"CNI_NETNS must be an absolute path, got {self.netns!r}")


def validate_container_id(cid: str) -> None:
    if not _CONTAINER_ID.match(cid):
        raise CNIError(
            INVALID_ENV, f"invalid CNI_CONTAINERID {cid!r}",
            "it must start with a letter or digit, followed by letters, digits, '_', '.' or '-'",
        )


def validate_ifname(name: str) -> None:
    problem = ""
    if name in (".", ".."):
        problem = "must not be '.' or '..'"
    elif len(name.encode()) > 15:
        problem = "is longer than 15 bytes"
    elif any(c in name for c in "/:") or any(c.isspace() for c in name):
        problem = "must not contain '/', ':' or whitespace"
    if problem:
        raise CNIError(INVALID_ENV, f"invalid CNI_IFNAME {name!r}: it {problem}")


def label_problem(key: str, value: str) -> str:
    """Why ``key``/``value`` is not a valid Kubernetes label; empty when it is."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return f"label key {key!r}: the prefix must be a DNS subdomain"
    if not name or len(name) > 63 or not _LABEL_NAME.match(name):
        return (f"label key {key!r}: the name must be 1-63 characters, letters, digits, "
                "'-', '_' or '.', starting and ending with a letter or digit")
    if len(value) > 63 or not _LABEL_NAME.match(value):
        return (f"label {key}: value {value!r} must be at most 63 characters, letters, "
                "digits, '-', '_' or '.', starting and ending with a letter or digit")
    return ""


def port_problem(name: str, port: object, protocol: object) -> str:
    """Why this named port is invalid; empty when it is fine."""
    if not (0 < len(name) <= 15 and _PORT_NAME.match(name) and "--" not in name
            and any(c.isalpha() for c in name)):
        return (f"port name {name!r} must be 1-15 lowercase letters, digits or '-', "
                "with at least one letter (a Kubernetes IANA_SVC_NAME)")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        return f"port {name}: {port!r} is not a port number (1-65535)"
    if not isinstance(protocol, str) or protocol.upper() not in PROTOCOLS:
        return f"port {name}: protocol {protocol!r} is not one of tcp, udp, sctp"
    return ""


def parse_labels_value(text: str) -> dict[str, str]:
    """``app:web,tier:frontend`` → {"app": "web", "tier": "frontend"}."""
    labels: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, colon, value = item.partition(":")
        if not colon:
            raise CNIError(INVALID_ENV, f"CNI_ARGS VILLI_LABELS: {item!r} is not key:value",
                           "syntax: VILLI_LABELS=app:web,tier:frontend")
        problem = label_problem(key, value)
        if problem:
            raise CNIError(INVALID_ENV, f"CNI_ARGS VILLI_LABELS: {problem}")
        labels[key] = value
    return labels


def parse_ports_value(text: str) -> dict[str, dict[str, object]]:
    """``http:8080/tcp,dns:53/udp`` → {"http": {"port": 8080, "protocol": "TCP"}, ...}."""
    ports: dict[str, dict[str, object]] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, colon, rest = item.partition(":")
        number, _, proto = rest.partition("/")
        port: object = int(number) if number.isdigit() else number
        problem = "" if colon else f"{item!r} is not name:port[/protocol]"
        problem = problem or port_problem(name, port, proto or "tcp")
        if problem:
            raise CNIError(INVALID_ENV, f"CNI_ARGS VILLI_PORTS: {problem}",
                           "syntax: VILLI_PORTS=http:8080/tcp,dns:53/udp")
        ports[name] = {"port": port, "protocol": (proto or "tcp").upper()}
    return ports


class PodArgs:
    """What villi takes from ``CNI_ARGS``."""

    __slots__ = ("namespace", "pod_name", "labels", "ports")

    def __init__(self) -> None:
        self.namespace = ""
        self.pod_name = ""
        self.labels: dict[str, str] = {}
        self.ports: dict[str, dict[str, object]] = {}


def parse_cni_args(text: str) -> PodArgs:
    """Parse ``CNI_ARGS`` with libcni's rules (unknown keys need ``IgnoreUnknown``)."""
    pairs: list[tuple[str, str]] = []
    for pair in text.split(";"):
        if not pair.strip():
            continue
        kv = pair.split("=")
        if len(kv) != 2 or not kv[0]:
            raise CNIError(INVALID_ENV, f"CNI_ARGS: invalid pair {pair!r}",
                           "CNI_ARGS is KEY=VALUE pairs separated by ';'")
        pairs.append((kv[0], kv[1]))
    ignore_unknown = any(k == "IgnoreUnknown" and v.lower() in ("1", "true") for k, v in pairs)
    out = PodArgs()
    for key, value in pairs:
        if key == "K8S_POD_NAMESPACE":
            out.namespace = value
        elif key == "K8S_POD_NAME":
            out.pod_name = value
        elif key == "VILLI_LABELS":
            out.labels = parse_labels_value(value)
        elif key == "VILLI_PORTS":
            out.ports = parse_ports_value(value)
        elif key not in KNOWN_ARGS and not ignore_unknown:
            raise CNIError(
                INVALID_ENV, f"CNI_ARGS: unknown key {key!r}",
                f"villi-cni knows {', '.join(KNOWN_ARGS)}; add IgnoreUnknown=1 to skip others",
            )
    return out
