"""A private Docker engine for tests, benchmarks and `./dev.sh local`.

Each engine lives in its own directory, and by default in its own network namespace, so it never touches the
host's docker0, iptables policy or /var/lib/docker. Only the processes started here are ever stopped, by PID.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import tarfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tools.procs import alive

DOCKER_CLI = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"
BUSYBOX = Path("/bin/busybox")
BUSYBOX_APPLETS = (
    "sh ls cat echo sleep true false env id mkdir rm mv cp ln touch head tail wc grep sed awk sort uniq tr "
    "printf test yes seq dd hostname date stat find xargs md5sum sha256sum du df ps kill nc wget vi less "
    "more chmod chown uname pwd basename dirname readlink realpath tee cut od hexdump base64 gzip gunzip tar"
).split()


def run(cmd: list[str], check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, text=True, capture_output=True, **kw)  # type: ignore[call-overload]


def new_run_id() -> str:
    """A short name unique to this run, used for namespaces and bridges (kernel names are <= 15 chars)."""
    return uuid.uuid4().hex[:6]


def netns_add(name: str) -> None:
    run(["ip", "netns", "add", name])
    run(["ip", "-n", name, "link", "set", "lo", "up"])


def netns_del(name: str) -> None:
    run(["ip", "netns", "del", name], check=False)


@dataclass
class PrivateDockerd:
    """One dockerd with its own data-root, exec-root, socket and (optionally) network namespace and hostname.

    `env`, when given, is added to the inherited environment of dockerd (for example
    DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1, so that Swarm tasks do not try a registry first).
    """

    root: Path
    netns: str | None = None
    hostname: str | None = None
    bip: str | None = None
    extra_args: list[str] = field(default_factory=list)
    owns_netns: bool = False
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] | None = None

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pidfile(self) -> Path:
        return self.root / "docker.pid"

    def start(self, timeout: float = 60.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        args = [
            "dockerd",
            "--data-root", str(self.root / "data"),
            "--exec-root", str(self.root / "exec"),
            "--pidfile", str(self.pidfile),
            "-H", self.host,
            "--userland-proxy=false",
            *(["--bip", self.bip] if self.bip else []),
            *self.extra_args,
        ]
        if self.netns is None:
            cmd = args
        else:
            if not Path(f"/var/run/netns/{self.netns}").exists():
                netns_add(self.netns)
                self.owns_netns = True
            # ip netns exec remounts /sys, and dockerd then fails to find the devices cgroup: use nsenter.
            inner = f"hostname {self.hostname}; exec " if self.hostname else "exec "
            inner += " ".join(f"'{a}'" for a in args)
            cmd = ["nsenter", f"--net=/var/run/netns/{self.netns}", "unshare", "--uts", "sh", "-c", inner]
        log = open(self.root / "dockerd.log", "ab")  # closed below: the child keeps its own copy
        env = {**os.environ, **self.env} if self.env else None
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited early; see {self.root / 'dockerd.log'}")
            if self.socket.exists() and self.cli("version", check=False).returncode == 0:
                return
            time.sleep(0.3)
        raise RuntimeError(f"dockerd did not answer within {timeout}s; see {self.root / 'dockerd.log'}")

    def cli(self, *args: str, check: bool = True, input: str | bytes | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """The Docker CLI against this engine directly (not through an agent)."""
        if isinstance(input, bytes):
            res = subprocess.run([DOCKER_CLI, "-H", self.host, *args], input=input, capture_output=True,
                                 timeout=timeout, check=False)
            out = subprocess.CompletedProcess(res.args, res.returncode,
                                              res.stdout.decode(errors="replace"),
                                              res.stderr.decode(errors="replace"))
        else:
            out = subprocess.run([DOCKER_CLI, "-H", self.host, *args], input=input, capture_output=True,
                                 text=True, timeout=timeout, check=False)
        if check and out.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} failed: {out.stderr.strip()}")
        return out

    def import_busybox(self, tag: str = "busybox:local") -> None:
        """No registry is reachable: build a tiny image from Debian's busybox-static."""
        self.cli("import", "-", tag, input=busybox_rootfs_tar())

    def stop(self) -> None:
        pid = self._pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and alive(pid):
                time.sleep(0.2)
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(Exception):
                self.proc.wait(timeout=10)
        # Whatever dockerd left mounted below its root (container rootfs, netns files) must go before rm.
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1].startswith(str(self.root))]
        for mount in sorted(mounts, key=len, reverse=True):
            run(["umount", "-l", mount], check=False)
        if self.netns and self.owns_netns:
            netns_del(self.netns)
        shutil.rmtree(self.root, ignore_errors=True)

    def _pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return self.proc.pid if self.proc is not None and self.proc.poll() is None else None




def busybox_rootfs_tar() -> bytes:
    """A root filesystem with busybox and its applets as symlinks, as a tar archive in memory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("bin", "tmp", "etc", "proc", "sys", "dev", "root", "data"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(str(BUSYBOX), arcname="bin/busybox")
        for applet in BUSYBOX_APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            tar.addfile(info)
        for name, text in (("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"), ("etc/group", "root:x:0:\n")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def engine_answers(host: str | None) -> bool:
    """Whether a Docker engine answers at DOCKER_HOST (or the default socket)."""
    args = [DOCKER_CLI] + (["-H", host] if host else []) + ["version", "--format", "{{.Server.Version}}"]
    try:
        return subprocess.run(args, capture_output=True, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def main() -> None:
    """`python -m tools.dockerd DIR`: run a private engine in the foreground until interrupted."""
    import sys

    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".local/dockerd").resolve()
    # Blocked, so that SIGINT/SIGTERM wait in sigwait below instead of killing us before the clean-up.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    engine = PrivateDockerd(root=root, netns=f"kls-local-{new_run_id()}", hostname="keelson-local")
    try:
        engine.start()
        engine.import_busybox()
        print(engine.host, flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
