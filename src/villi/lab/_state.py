"""The lab's state file, its directory and the registry of running labs.

One JSON file (default ``/var/run/villi/lab/state.json``, env ``VILLI_LAB_STATE``)
describes the running lab: its id, etcd URL and the namespace that reaches it, every
node (netns, underlay IP, agent socket, pid) and every pod. ``villi.cli.context``
reads it so that ``villi apply/get/status/observe`` talk to the lab with no flags;
keep the keys it reads (``kvstore``, ``kvstore_netns``, ``nodes[].name``,
``nodes[].socket``).

Every change is a read-modify-write under an ``flock`` on a lock file beside the
state, and the file is replaced atomically, so concurrent ``villi lab pod add`` runs
and readers never see half a file.

A registry entry per lab (``/var/run/villi/lab-registry/<id>.json`` → its state path)
lets ``villi lab down`` tell a crashed lab's leftovers from another live lab's
resources (a test's lab and a user's lab may run side by side).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from villi.errors import VilliError

DEFAULT_STATE = Path("/var/run/villi/lab/state.json")
REGISTRY = Path("/var/run/villi/lab-registry")
#: Every namespace, process command line, directory and pin of lab ``<id>`` contains
#: ``villi-lab-<id>`` (pins: ``/sys/fs/bpf/villi/lab-<id>``).
PREFIX = "villi-lab-"
ID_RE = re.compile(r"villi-lab-([0-9a-f]{6})\b")


class LabError(VilliError):
    """A lab operation failed (the message says what and what to do)."""


class NoLab(LabError):
    """No lab is running for this state file."""


def state_path() -> Path:
    """The state file (read at call time so tests can set ``VILLI_LAB_STATE``)."""
    env = os.environ.get("VILLI_LAB_STATE")
    return Path(env) if env else DEFAULT_STATE


def lab_dir(lab_id: str, state: Path | None = None) -> Path:
    """Sockets, logs, etcd data and agent state of lab ``lab_id``."""
    return (state or state_path()).parent / f"{PREFIX}{lab_id}"


def names(lab_id: str) -> dict[str, str]:
    return {"underlay": f"{PREFIX}{lab_id}-underlay", "cluster": f"lab-{lab_id}"}


def node_netns(lab_id: str, index: int) -> str:
    return f"{PREFIX}{lab_id}-node{index}"


def pod_netns(lab_id: str, namespace: str, name: str) -> str:
    # Namespace names are DNS labels (no dot), so "<ns>.<name>" is unambiguous.
    return f"{PREFIX}{lab_id}-{namespace}.{name}"


# --- the state file ------------------------------------------------------------------------

def load(path: Path | None = None) -> dict[str, Any] | None:
    try:
        data = json.loads((path or state_path()).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "id" in data else None


def require(path: Path | None = None) -> dict[str, Any]:
    """The lab's state, as seen from the selected cluster (:func:`select_cluster`)."""
    state = load(path)
    if state is None:
        raise NoLab("no lab is running (start one with `villi lab up`)")
    return view(state, selected_cluster())


# --- several clusters ---------------------------------------------------------------------
# A lab made with ``--clusters N`` keeps its first cluster at the top level of the state
# (so everything written for one cluster works unchanged) and every further cluster in
# ``state["clusters"][name]`` with the same keys (nodes, processes, pods, kvstore, ...).
# A *view* of cluster ``name`` is the top level overlaid with that entry: its nested
# dicts and lists are the state's own, so changes made through a view (a pod added, a
# process restarted) land in the state, and saving a view saves the whole state.

_selected: str | None = None


def select_cluster(name: str | None) -> None:
    """Make ``require()``/``update()`` return cluster ``name``'s view (None: the first)."""
    global _selected
    _selected = name


@contextlib.contextmanager
def using(name: str | None) -> Iterator[None]:
    """``select_cluster(name)`` for a block (nothing when ``name`` is None)."""
    global _selected
    if name is None:
        yield
        return
    old, _selected = _selected, name
    try:
        yield
    finally:
        _selected = old


def selected_cluster() -> str | None:
    return _selected or os.environ.get("VILLI_LAB_CLUSTER") or None


def cluster_names(state: dict[str, Any]) -> list[str]:
    """The lab's clusters, first first ([] for a one-cluster lab)."""
    mesh = state.get("mesh") or {}
    return list(mesh.get("clusters") or [])


def view(state: dict[str, Any], name: str | None) -> dict[str, Any]:
    root = state.get("_root", state)
    names = cluster_names(root)
    if not name or (names and name == names[0]):
        return root
    if name not in names:
        shown = ", ".join(names) if names else "none: this lab has one cluster"
        raise LabError(f"no cluster {name!r} in this lab (clusters: {shown})")
    return {**root, **root["clusters"][name], "_root": root}


def split_ref(ref: str) -> tuple[str | None, str]:
    """``CLUSTER:REST`` → (cluster, rest); a plain ref → (None, ref)."""
    cluster, sep, rest = ref.partition(":")
    if sep and cluster and "/" not in cluster:
        return cluster, rest
    return None, ref


def save(state: dict[str, Any], path: Path | None = None) -> None:
    state = state.get("_root", state)
    path = path or state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(path: Path | None = None, timeout: float = 60.0) -> Iterator[None]:
    """Serialise read-modify-write cycles of the state file across processes."""
    path = path or state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LabError(f"the lab state {path} is locked by another villi "
                                   f"command for more than {timeout:.0f}s") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def update(path: Path | None = None) -> Iterator[dict[str, Any]]:
    """``with update() as state: state[...] = ...`` — locked, saved on success."""
    require(path)   # fail fast, without creating a lock file, when there is no lab
    with locked(path):
        state = require(path)
        yield state
        save(state.get("_root", state), path)


def remove(path: Path | None = None) -> None:
    path = path or state_path()
    for p in (path, path.with_name(f".{path.name}.lock")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


# --- the registry of labs --------------------------------------------------------------

def register(lab_id: str, path: Path | None = None) -> None:
    REGISTRY.mkdir(parents=True, exist_ok=True)
    (REGISTRY / f"{lab_id}.json").write_text(
        json.dumps({"state": str((path or state_path()).resolve()), "pid": os.getpid()}))


def unregister(lab_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (REGISTRY / f"{lab_id}.json").unlink()
    with contextlib.suppress(OSError):
        REGISTRY.rmdir()


def owner_state(lab_id: str) -> Path | None:
    """The state file that still claims lab ``lab_id``, or None (an orphan)."""
    try:
        entry = json.loads((REGISTRY / f"{lab_id}.json").read_text())
        path = Path(entry["state"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    state = load(path)
    return path if state is not None and state.get("id") == lab_id else None
