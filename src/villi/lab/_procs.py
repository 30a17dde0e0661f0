"""The lab's long-running processes: start them detached, find them, stop them.

Each process runs in its own session (a Ctrl-C in the terminal that ran ``villi lab
up`` does not reach it) with its output in a log file in the lab directory, and its
command line names the lab (``villi-lab-<id>``): that is how ``villi lab down`` finds
every one of them again, even when the state file is lost. A pid alone is never
trusted: before a signal is sent, the process's command line must still name the lab
(pids get reused).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

# Popen objects of processes started by this process: kept so that garbage collection
# never warns about a running child (they are meant to outlive us).
_children: list[subprocess.Popen[bytes]] = []


def spawn(cmd: Sequence[str], log: Path, env: dict[str, str] | None = None,
          ready_line: str | None = None, timeout: float = 15.0) -> int:
    """Start ``cmd`` detached (new session, stdin from /dev/null, output to ``log``,
    its pid in ``log`` with the suffix ``.pid``).

    With ``ready_line``, stdout is read until that line comes (the echo server prints
    ``ready``); stderr still goes to the log.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE if ready_line else out, stderr=out,
                                start_new_session=True, env=env, close_fds=True)
    _children.append(proc)
    log.with_suffix(".pid").write_text(f"{proc.pid}\n")
    if ready_line is not None:
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), True)
        deadline = time.monotonic() + timeout
        line = b""
        # readline() blocks; the child either prints its line or dies (EOF).
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line or line.strip() == ready_line.encode():
                break
        proc.stdout.close()
        if line.strip() != ready_line.encode():
            kill([proc.pid], None)
            raise OSError(f"{cmd[0]} did not start (see {log})")
    return proc.pid


def exit_status(pid: int) -> str:
    """How a child of this process ended (``exit code 1``, ``killed by SIGKILL``)."""
    for proc in _children:
        if proc.pid == pid and proc.poll() is not None:
            rc = proc.returncode
            return f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
    return "ended"


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def alive(pid: int | None, marker: str | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, with ``marker``, still is ours."""
    if not pid or not _running(pid):
        return False
    if marker is None:
        return True
    for _ in range(3):   # the command line reads empty for an instant during execve
        line = cmdline(pid)
        if line:
            return marker in line
        time.sleep(0.01)
    return _running(pid)


def _ancestors() -> set[int]:
    pids, pid = {os.getpid()}, os.getpid()
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        pids.add(pid)
    return pids


def find(marker: str) -> list[int]:
    """Pids whose command line contains ``marker`` (never this process or its parents)."""
    mine = _ancestors()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in mine and marker in cmdline(int(entry)):
            found.append(int(entry))
    return sorted(found)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def kill(pids: Iterable[int], marker: str | None, grace: float = 5.0) -> list[int]:
    """SIGTERM ``pids`` (still carrying ``marker``), then SIGKILL what outlives
    ``grace`` seconds. Returns the pids that were signalled."""
    targets = [p for p in pids if alive(p, marker)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in targets:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            for pid in targets:
                _reap(pid)
            if not any(alive(p) for p in targets):
                break
            time.sleep(0.05)
    for pid in targets:
        _reap(pid)
    return targets
