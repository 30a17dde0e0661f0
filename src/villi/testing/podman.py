"""podman with its CNI backend, pointed at villi-cni, in a throw-away configuration.

Everything lives in one temp dir: containers.conf (CNI backend, villi-cni on the plugin
path, cgroupfs), the network's conflist, podman's storage and run roots, a busybox
image made with ``podman import`` from Debian's busybox-static (no registry), and the
runc wrapper this machine needs (it lacks CAP_SYS_RESOURCE, so the wrapper deletes
``process.rlimits`` from the OCI bundle before runc sees it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from pathlib import Path

IMAGE = "localhost/villi-busybox:latest"
BUSYBOX_APPLETS = ("sh", "nc", "httpd", "wget", "sleep", "cat", "ip", "ping", "echo", "ls")

RUNC_WRAPPER = """#!{python}
# Drop rlimits from the OCI bundle and from `exec --process` specs (this machine lacks
# CAP_SYS_RESOURCE, so runc's setrlimit fails with EPERM), then exec runc.
import json, os, sys
args = sys.argv[1:]
def value(flags):
    for i, a in enumerate(args):
        if a in flags and i + 1 < len(args):
            return args[i + 1]
        for f in flags:
            if a.startswith(f + "="):
                return a.split("=", 1)[1]
    return None
def strip(path, nested):
    if not path or not os.path.exists(path):
        return
    with open(path) as f:
        doc = json.load(f)
    target = doc.get("process", {{}}) if nested else doc
    if target.pop("rlimits", None) is not None:
        with open(path, "w") as f:
            json.dump(doc, f)
bundle = value(("--bundle", "-b"))
if bundle is None and "create" in args or "run" in args:
    bundle = bundle or os.getcwd()
if bundle:
    strip(os.path.join(bundle, "config.json"), True)
if "exec" in args:
    strip(value(("--process", "-p")), False)
os.execv("{runc}", ["runc"] + args)
"""


def available() -> str | None:
    """None when podman can run here, else why not."""
    for tool in ("podman", "runc"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    if not os.path.exists("/bin/busybox"):
        return "busybox-static is not installed"
    return None


class Podman:
    """A private podman configuration using villi-cni for network ``net_name``."""

    def __init__(self, agent_socket: str, net_name: str | None = None) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="villi-podman-"))
        self.net_name = net_name or f"villi{uuid.uuid4().hex[:6]}"
        self.agent_socket = agent_socket
        self.containers: list[str] = []
        self._write_config()
        self._build_image()

    def _write_config(self) -> None:
        cni_dir = self.tmp / "cni"
        cni_dir.mkdir()
        (cni_dir / f"{self.net_name}.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": self.net_name,
            "plugins": [{"type": "villi-cni", "agentSocket": self.agent_socket,
                         "agentTimeout": 10}]}))
        wrapper = self.tmp / "runc-wrapper"
        wrapper.write_text(RUNC_WRAPPER.format(python=sys.executable,
                                               runc=shutil.which("runc")))
        wrapper.chmod(0o755)
        plugin_dirs = [str(Path(sys.executable).parent), "/usr/lib/cni"]
        (self.tmp / "containers.conf").write_text(
            "[network]\n"
            'network_backend = "cni"\n'
            f"cni_plugin_dirs = {json.dumps(plugin_dirs)}\n"
            f'network_config_dir = "{cni_dir}"\n'
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{self.tmp}/events.log"\n'
            'runtime = "villirunc"\n'
            "[engine.runtimes]\n"
            f'villirunc = ["{wrapper}"]\n')

    def env(self) -> dict[str, str]:
        return dict(os.environ, CONTAINERS_CONF=str(self.tmp / "containers.conf"))

    def run(self, *args: str, check: bool = True, timeout: float = 120
            ) -> subprocess.CompletedProcess:
        cmd = ["podman", "--root", str(self.tmp / "storage"), "--runroot",
               str(self.tmp / "run"), "--cgroup-manager", "cgroupfs", *args]
        res = subprocess.run(cmd, env=self.env(), capture_output=True, text=True,
                             timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr}")
        return res

    def _build_image(self) -> None:
        tar_path = self.tmp / "rootfs.tar"
        with tarfile.open(tar_path, "w") as tar:
            for d in ("bin", "tmp", "proc", "sys", "dev", "etc", "www"):
                info = tarfile.TarInfo(d)
                info.type = tarfile.DIRTYPE
                info.mode = 0o1777 if d == "tmp" else 0o755
                tar.addfile(info)
            tar.add("/bin/busybox", arcname="bin/busybox")
            for applet in BUSYBOX_APPLETS:
                info = tarfile.TarInfo(f"bin/{applet}")
                info.type = tarfile.SYMTYPE
                info.linkname = "busybox"
                tar.addfile(info)
            index = b"villi\n"
            info = tarfile.TarInfo("www/index.html")
            info.size = len(index)
            import io

            tar.addfile(info, io.BytesIO(index))
        self.run("import", "--change", 'CMD ["/bin/sh"]', str(tar_path), IMAGE)

    def start(self, name: str, *cmd: str) -> str:
        """Run a detached container on the villi network; returns its IPv4."""
        self.run("run", "-d", "--name", name, "--network", self.net_name, IMAGE, *cmd)
        self.containers.append(name)
        return self.ip(name)

    def ip(self, name: str) -> str:
        out = self.run("inspect", name, "--format",
                       "{{json .NetworkSettings.Networks}}").stdout
        nets = json.loads(out)
        return nets[self.net_name]["IPAddress"]

    def exec(self, name: str, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return self.run("exec", name, *cmd, check=False, timeout=timeout)

    def remove(self, name: str) -> None:
        self.run("rm", "-f", "-t", "0", name, check=False)
        if name in self.containers:
            self.containers.remove(name)

    def close(self) -> None:
        for name in list(self.containers):
            self.remove(name)
        self.run("rmi", "-f", IMAGE, check=False)
        # podman leaves overlay mounts under its root; unmount before deleting.
        subprocess.run(["umount", "-R", str(self.tmp / "storage")], capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Podman:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
