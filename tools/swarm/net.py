"""Network plumbing of the namespace Swarm (bridge, veths, namespaces, mounts) and reachability probes."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tools.dockerd import run
from tools.procs import pids_in_netns
from tools.swarm.base import SwarmError, sh, wait_for

if TYPE_CHECKING:
    from tools.swarm.node import SwarmNode


def root_networks() -> list[tuple[str, ipaddress.IPv4Network]]:
    """(device, network) of every IPv4 address and route of the root namespace."""
    nets: list[tuple[str, ipaddress.IPv4Network]] = []
    for line in sh(["ip", "-o", "-4", "addr"]).stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append((parts[1], ipaddress.IPv4Interface(parts[parts.index("inet") + 1]).network))
    for line in run(["ip", "-4", "route", "show", "table", "all"], check=False).stdout.splitlines():
        parts = line.split()
        dst = parts[1] if parts and parts[0] in ("local", "broadcast", "unicast") and len(parts) > 1 else (
            parts[0] if parts else "")
        dev = parts[parts.index("dev") + 1] if "dev" in parts else ""
        with contextlib.suppress(ValueError):
            if dst != "default":
                nets.append((dev, ipaddress.IPv4Network(dst, strict=False)))
    return nets


def free_subnet() -> ipaddress.IPv4Network:
    """A random /24 of 10.100.0.0-10.254.255.0 that no address or route of this machine overlaps.

    Kept away from 10.0.x (Swarm's default overlay pool) and 172.17-31 (dockerd's bridge pools, --bip)."""
    used = [net for _, net in root_networks()]
    for _ in range(500):
        cand = ipaddress.IPv4Network(f"10.{random.randint(100, 254)}.{random.randint(0, 255)}.0/24")
        if not any(cand.overlaps(u) for u in used if u.prefixlen > 0):
            return cand
    raise SwarmError("found no free private /24")


def link_exists(name: str) -> bool:
    return run(["ip", "link", "show", name], check=False).returncode == 0


def del_link(name: str) -> None:
    """Delete a link; one that vanished meanwhile is fine (a veth goes with its peer's namespace, asynchronously)."""
    if not link_exists(name):
        return
    res = run(["ip", "link", "del", name], check=False)
    if res.returncode != 0 and link_exists(name):
        raise SwarmError(f"ip link del {name} failed ({res.returncode}): {res.stderr.strip()}")


def del_netns(name: str) -> None:
    if Path(f"/var/run/netns/{name}").exists():
        sh(["ip", "netns", "del", name])


def kill_netns_processes(name: str, timeout: float = 10.0) -> None:
    path = Path(f"/var/run/netns/{name}")
    try:
        ns = f"net:[{path.stat().st_ino}]"
    except OSError:
        return
    pids = pids_in_netns(ns)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if not wait_for(lambda: not pids_in_netns(ns), time.monotonic() + timeout, "", raise_=False):
        raise SwarmError(f"processes {pids_in_netns(ns)} in namespace {name} do not die")


def umount_below(path: Path) -> None:
    prefix = str(path) + "/"
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
              if line.split()[1].startswith(prefix)]
    for mount in sorted(mounts, key=len, reverse=True):
        run(["umount", "-l", mount], check=False)


def remove_tree(path: Path) -> None:
    umount_below(path)
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        raise SwarmError(f"could not remove {path}")


def ping(node: SwarmNode, ip: str) -> bool:
    """Whether `ip` answers one ICMP echo (1 s) from node's network namespace."""
    return node.nsexec("busybox", "ping", "-c1", "-W1", ip, timeout=10).returncode == 0


def tcp_reachable(node: SwarmNode, ip: str, port: int, timeout: float = 1.0) -> bool:
    """Whether `ip:port` accepts a TCP connection from node's network namespace."""
    code = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), float(sys.argv[3]))"
    res = node.nsexec(sys.executable, "-c", code, ip, str(port), str(timeout), timeout=timeout + 10)
    return res.returncode == 0


def root_can_connect(ip: str, port: int, timeout: float = 1.0) -> bool:
    """Whether `ip:port` accepts a TCP connection from the root namespace."""
    try:
        with socket.create_connection((ip, port), timeout=timeout):
            return True
    except OSError:
        return False
