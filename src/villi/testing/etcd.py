"""A real, throw-away etcd for tests: loopback only, free ports, temporary data dir.

``EtcdServer`` starts ``etcd --name villi-test-<id>`` (the name lets the repository's
housekeeping hook spot leftovers with ``pgrep -f 'etcd --name villi'``) listening on
127.0.0.1 only, waits until it answers ``/health``, and can be stopped and started
again on the SAME ports and data directory, which is what restart tests need. Whatever
happens, :meth:`close` (also run by the context manager and at interpreter exit) kills
the process and removes the data directory.

The API is synchronous so it works in sync fixtures and subprocesses; from async code
call ``await asyncio.to_thread(server.start)``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

from villi.kvstore.tls import KvstoreTLS, Pki, make_pki

ETCD_BINARY = "/usr/bin/etcd"
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that sets ``PR_SET_PDEATHSIG`` (None where prctl is missing)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:  # runs in the child, between fork and exec
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def etcd_available(binary: str = ETCD_BINARY) -> bool:
    return os.access(binary, os.X_OK)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the kernel's pick for an ephemeral bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EtcdServer:
    """One single-member etcd cluster on loopback for the duration of a test."""

    def __init__(self, binary: str = ETCD_BINARY, *, unix_socket: bool = False,
                 tls: bool = False, extra_args: tuple[str, ...] = ()) -> None:
        self.binary = binary
        self.name = f"villi-test-{uuid.uuid4().hex[:10]}"
        self.host = "127.0.0.1"
        self.client_port = 0
        self.peer_port = 0
        self._tmp: Path | None = None
        self._unix = unix_socket
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None
        # tls: client URL https://, and etcd requires a client certificate signed by
        # the throw-away CA (``client_tls`` holds what a client needs).
        self.tls = tls
        self.extra_args = tuple(extra_args)
        self.pki: Pki | None = None

    # --- addresses -------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.client_port}"

    @property
    def client_tls(self) -> KvstoreTLS | None:
        """CA, client certificate and key for this server (None without TLS)."""
        return self.pki.client if self.pki is not None else None

    @property
    def socket_path(self) -> str | None:
        """Path of the unix socket etcd also listens on (``unix_socket=True``)."""
        if not self._unix or self._tmp is None:
            return None
        return str(self._tmp / f"localhost:{self.client_port + 1}")

    @property
    def data_dir(self) -> Path:
        assert self._tmp is not None, "server never started"
        return self._tmp / "data"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> None:
        """Start etcd (first time: on new free ports; later: on the same ports and data)
        and wait until it is healthy."""
        if self.running:
            return
        first = self._tmp is None
        if first:
            self._tmp = Path(tempfile.mkdtemp(prefix="villi-etcd-"))
            atexit.register(self.close)
            if self.tls:
                self.pki = make_pki(self._tmp / "pki", [self.host])
        for attempt in range(3):
            if first:
                self.client_port, self.peer_port = free_port(), free_port()
            try:
                self._spawn()
                self._wait_healthy(timeout)
                return
            except RuntimeError:
                self._kill()
                if first:
                    shutil.rmtree(self.data_dir, ignore_errors=True)
                # Another process may have taken a port between our probe and etcd's
                # bind; on first start pick new ones, on restarts the ports are fixed.
                if not first or attempt == 2:
                    self.close()
                    raise

    def _spawn(self) -> None:
        assert self._tmp is not None
        peer = f"http://{self.host}:{self.peer_port}"
        clients = self.endpoint
        if self._unix:
            # etcd takes unix URLs as unix://host:port and creates the socket file
            # "host:port" in its working directory.
            clients += f",unix://localhost:{self.client_port + 1}"
        args = [
            self.binary, "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", clients,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            "--initial-cluster-token", self.name,
            "--initial-cluster-state", "new",
        ]
        if self.pki is not None:
            args += ["--client-cert-auth", "--trusted-ca-file", self.pki.ca,
                     "--cert-file", self.pki.server_cert, "--key-file", self.pki.server_key]
        args += list(self.extra_args)
        self._log = self._tmp / "etcd.log"
        # Linux kills etcd if the thread that started it dies, so a test run killed by
        # SIGKILL leaves no etcd behind. Only for the main thread: a worker thread that
        # exits (asyncio.to_thread) would take etcd with it.
        on_main = threading.current_thread() is threading.main_thread()
        with open(self._log, "ab") as log:
            self._proc = subprocess.Popen(
                args, cwd=self._tmp, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,  # a Ctrl-C in the test run does not hit etcd first
                preexec_fn=_die_with_parent(os.getpid()) if on_main else None,
            )

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.01
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(f"etcd exited during start-up:\n{self.log_tail()}")
            try:
                ctx = self.pki.client.context() if self.pki is not None else None
                with urllib.request.urlopen(self.endpoint + "/health", timeout=1,
                                            context=ctx) as resp:
                    if b'"true"' in resp.read():
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(delay)  # polling a child process start-up, not a retry loop
            delay = min(0.2, delay * 2)
        raise RuntimeError(f"etcd not healthy after {timeout} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop etcd (SIGTERM, then SIGKILL); its ports and data are kept for start()."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        """Kill etcd and remove every file it had; safe to call any number of times."""
        self._kill()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
            with contextlib.suppress(Exception):
                atexit.unregister(self.close)

    def log_tail(self, lines: int = 20) -> str:
        if self._log is None or not self._log.exists():
            return ""
        return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> EtcdServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EtcdServer({self.name}, {self.endpoint}, {state})"
