"""Where the CLI's commands go: which kvstore, which agents.

Precedence: explicit flags, then the environment (``VILLI_KVSTORE``,
``VILLI_AGENT_SOCKET``), then a running lab (its state file names its etcd, the
namespace to reach it from and every node's agent socket), then the single-node
defaults. So while ``villi lab up`` is running, ``villi apply/get/status/observe``
talk to the lab with no extra flags.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_KVSTORE = "embedded:///var/lib/villi/kvstore.db"
DEFAULT_SOCKET = "/var/run/villi/villi.sock"
LAB_STATE = Path(os.environ.get("VILLI_LAB_STATE", "/var/run/villi/lab/state.json"))


@dataclass
class Target:
    kvstore: str
    kvstore_netns: str | None = None
    agents: dict[str, str] = field(default_factory=dict)   # node name -> socket path
    lab: bool = False


def load_lab_state() -> dict | None:
    try:
        return json.loads(LAB_STATE.read_text())
    except (OSError, ValueError):
        return None


def lab_cluster(lab: dict) -> dict:
    """The lab state seen from the cluster ``villi --cluster NAME`` picked (env
    ``VILLI_LAB_CLUSTER``; default the first) — see ``villi.lab._state.view``."""
    name = os.environ.get("VILLI_LAB_CLUSTER")
    names = (lab.get("mesh") or {}).get("clusters") or []
    if not name or (names and name == names[0]):
        return lab
    if name not in names:
        from villi.errors import VilliError

        raise VilliError(f"--cluster {name}: the lab has no such cluster "
                         f"({', '.join(names) or 'it has one cluster'})")
    return {**lab, **lab["clusters"][name]}


def resolve(kvstore: str | None = None, socket: str | None = None) -> Target:
    lab = load_lab_state()
    if lab is not None:
        lab = lab_cluster(lab)
    kv = kvstore or os.environ.get("VILLI_KVSTORE")
    sock = socket or os.environ.get("VILLI_AGENT_SOCKET")
    if lab and not kv and not sock:
        _use_lab_tls(lab)
        return Target(kvstore=lab["kvstore"], kvstore_netns=lab.get("kvstore_netns"),
                      agents={n["name"]: n["socket"] for n in lab.get("nodes", [])}, lab=True)
    return Target(kvstore=kv or DEFAULT_KVSTORE,
                  agents={"local": sock or DEFAULT_SOCKET})


def _use_lab_tls(lab: dict) -> None:
    """The lab's etcd wants a client certificate: use the lab's (written by ``villi
    lab up``) unless the user named certificates already. Through the environment,
    like the ``--kvstore-*`` flags, so every store this CLI opens picks it up."""
    tls = lab.get("kvstore_tls") or {}
    names = {"ca": "VILLI_KVSTORE_CA", "cert": "VILLI_KVSTORE_CERT", "key": "VILLI_KVSTORE_KEY"}
    if any(os.environ.get(env) for env in names.values()):
        return
    for field_name, env in names.items():
        if tls.get(field_name):
            os.environ[env] = tls[field_name]
