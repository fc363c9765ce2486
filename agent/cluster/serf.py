"""Cluster membership on a supervised `serf agent` child process (docs/cluster.md).

The Go agent embeds serf; we run the real binary and talk RPC to it (serf_rpc.py). This module owns the
child's life: start, log, watch, restart and re-join, stop by PID. The member list is kept in memory from
one snapshot plus the event stream, so `members()` never waits on I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

from agent.cluster.membership import ROLE_WORKER, Member, MembersListener
from agent.cluster.serf_rpc import Record, SerfMember, SerfRPCClient, SerfRPCError, decode_member
from agent.errors import Code, log_failure
from agent.lifetime import child_of_this_process
from agent.netaddr import host_port, split_host_port
from agent.tasks import spawn, supervise

log = logging.getLogger(__name__)

DEFAULT_SERF_PORT = 7946
TAG_AGENT_PORT = "AgentPort"
TAG_NODE_NAME = "NodeName"
TAG_NODE_ROLE = "DockerNodeRole"
TAG_ENGINE_STATUS = "DockerEngineStatus"
TAG_IS_LEADER = "NodeIsLeader"
TAG_EDGE_KEY_SET = "EdgeKeySet"
TAG_NODE_ID = "KeelsonNodeID"
TAG_STARTED = "KeelsonStarted"

# serf 0.9.4 has no probe_timeout/probe_interval setting (flag or config key; unknown config keys are
# fatal). Probe timing comes only from the timing profile, i.e. memberlist's Default{LAN,WAN,Local}Config:
# name -> (probe_timeout, probe_interval) in seconds.
SERF_PROFILES: dict[str, tuple[float, float]] = {"lan": (0.5, 1.0), "wan": (3.0, 5.0), "local": (0.2, 1.0)}
RECONNECT_INTERVAL = "10s"
STARTUP_TIMEOUT = 15.0
READY_TIMEOUT = 10.0
REJOIN_TIMEOUT = 15.0
STOP_GRACE = 1.0
LEAVE_TIMEOUT = 1.0


class SerfError(RuntimeError):
    """The serf child could not be started or reached."""


def choose_profile(probe_timeout: float, probe_interval: float) -> str:
    """The serf profile whose probe timing is closest (on a log scale) to what was asked for."""

    def distance(item: tuple[str, tuple[float, float]]) -> float:
        timeout, interval = item[1]
        return abs(math.log(max(probe_timeout, 1e-3) / timeout)) + abs(
            math.log(max(probe_interval, 1e-3) / interval)
        )

    name, timing = min(SERF_PROFILES.items(), key=distance)
    if timing != (probe_timeout, probe_interval):
        log.warning(
            "serf 0.9.4 cannot set probe timing directly: probe_timeout=%ss probe_interval=%ss "
            "mapped to profile %r (%ss/%ss)",
            probe_timeout,
            probe_interval,
            name,
            *timing,
        )
    return name


def normalize_join_address(addr: str, default_port: int = DEFAULT_SERF_PORT) -> str:
    """'ip' or 'ip:port' (names too) -> 'host:port' as serf's join expects."""
    host, port = split_host_port(addr.strip())
    return host_port(host, int(port) if port else default_port)


async def resolve_join_addresses(name: str) -> list[str]:
    """Resolve a comma-separated list of IPs/names (e.g. `tasks.agent`) to all their IPv4 addresses.

    A Swarm service's `tasks.<name>` returns one A record per task, so every agent is found. An optional
    ':port' on an item is kept. A name that does not resolve raises OSError: the caller decides (fatal).
    """
    loop = asyncio.get_running_loop()
    result: list[str] = []
    for item in (part.strip() for part in name.split(",")):
        if not item:
            continue
        host, port = split_host_port(item)
        try:
            addrs = [str(ipaddress.ip_address(host))]
        except ValueError:
            try:
                infos = await loop.getaddrinfo(host, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
            except UnicodeError as exc:  # the IDNA codec refuses the name before any lookup
                raise OSError(f"{host!r} is not a valid host name: {exc}") from None
            addrs = [str(info[4][0]) for info in infos]
        for addr in addrs:
            entry = addr if port is None else host_port(addr, int(port))
            if entry not in result:
                result.append(entry)
    return result


def member_from_serf(item: SerfMember) -> Member | None:
    """Member fields come from the tags; serf nodes that are not agents (no NodeName) are skipped."""
    tags = item.tags
    node_name = tags.get(TAG_NODE_NAME, "")
    try:
        agent_port = int(tags.get(TAG_AGENT_PORT, "9001"))
    except ValueError:
        return None
    if not node_name:
        return None
    return Member(
        node_name=node_name,
        ip=item.addr,
        agent_port=agent_port,
        role=tags.get(TAG_NODE_ROLE, ROLE_WORKER),
        is_leader=tags.get(TAG_IS_LEADER) == "1",
        edge_key_set=tags.get(TAG_EDGE_KEY_SET) == "set",
        engine_status=tags.get(TAG_ENGINE_STATUS, "swarm"),
        node_id=tags.get(TAG_NODE_ID, ""),
        started=int(started) if (started := tags.get(TAG_STARTED, "0")).isdigit() else 0,
    )


def _free_local_port() -> int:
    """A free loopback TCP port for the child's RPC listener (a lost race shows up as a failed start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SerfMembership:
    """`Membership` backed by a supervised `serf agent` child; call `start()` then `join()`."""

    def __init__(
        self,
        node_name: str,
        bind_ip: str,
        bind_port: int = DEFAULT_SERF_PORT,
        agent_port: int = 9001,
        role: str = ROLE_WORKER,
        is_leader: bool = False,
        engine_status: str = "swarm",
        data_dir: str | os.PathLike[str] | None = None,
        probe_timeout: float = 0.5,
        probe_interval: float = 1.0,
        serf_binary: str = "serf",
        extra_tags: dict[str, str] | None = None,
        advertise_ip: str | None = None,
        hostname: str | None = None,
        reconnect_timeout: float = 60.0,
    ) -> None:
        self.reconnect_timeout = reconnect_timeout
        self.node_name = node_name
        # Go's name is <NodeName>-<hostname>. An agent restarted in place (same container, same hostname, maybe
        # a new address) would then collide with its own dead twin, which Serf refuses until it is reaped:
        # a suffix unique to this start keeps them apart, and members() picks the newest of a node.
        self.serf_node_name = f"{node_name}-{hostname or socket.gethostname()}-{secrets.token_hex(3)}"
        self.bind_ip = bind_ip
        self.bind_port = bind_port
        self.advertise_ip = advertise_ip or bind_ip
        self.serf_binary = serf_binary
        self.profile = choose_profile(probe_timeout, probe_interval)
        self._data_dir = os.fspath(data_dir) if data_dir is not None else None
        self._own_data_dir = data_dir is None
        self._tags: dict[str, str] = {
            TAG_AGENT_PORT: str(agent_port),
            TAG_NODE_NAME: node_name,
            TAG_NODE_ROLE: role,
            TAG_ENGINE_STATUS: engine_status,
        }
        if is_leader:
            self._tags[TAG_IS_LEADER] = "1"
        self._tags.update(extra_tags or {})
        self._listeners: list[MembersListener] = []
        self._known: dict[str, SerfMember] = {}
        self._members: list[Member] = []
        self._join_addrs: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._rpc: SerfRPCClient | None = None
        self._rpc_port: int | None = None
        self._ready = asyncio.Event()
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()  # per-child: log pump, event consumer
        self._supervisor: asyncio.Task[None] | None = None
        self._joiner: asyncio.Task[None] | None = None
        self.restarts = 0

    # --- Membership protocol -------------------------------------------------------------------------

    def members(self) -> list[Member]:
        return list(self._members)

    def subscribe(self, listener: MembersListener) -> None:
        self._listeners.append(listener)

    async def set_tags(self, tags: dict[str, str]) -> None:
        """Merge into this node's tags; an empty value deletes the tag. Remembered for a restarted child."""
        updates = {k: v for k, v in tags.items() if v != ""}
        deletes = [k for k, v in tags.items() if v == ""]
        self._tags.update(updates)
        for key in deletes:
            self._tags.pop(key, None)
        rpc = await self._wait_rpc()
        if rpc is None:
            return  # the restarted child starts with the remembered tags
        try:
            await rpc.tags(updates, deletes)
        except (SerfRPCError, TimeoutError) as exc:
            log_failure(
                Code.CLUSTER_SERF_FAILED, "serf tags update failed", node=self.serf_node_name, error=exc
            )
            return
        await self._refresh(rpc)

    def keep_joining(self, resolve: Callable[[], Awaitable[list[str]]], interval: float = 2.0,
                     max_interval: float = 15.0) -> None:
        """Join again, for ever: every `interval` (backing off to `max_interval`) while this node is alone,
        every `max_interval` otherwise, the addresses `resolve()` gives now (so that new tasks are found),
        skipping the ones already alive.

        Agents of a global service start together, and the first joins may find nobody listening (the Go
        agent then stays a cluster of one). A partition that outlasts Serf's reconnect window is not
        merged by Serf itself: its members were reaped on both sides. Both heal here.
        """

        async def loop() -> None:
            delay = interval
            while not self._closing:
                await asyncio.sleep(delay)
                alone = not any(m.node_name != self.node_name for m in self._members)
                delay = min(delay * 2, max_interval) if alone else max_interval
                try:
                    targets = await resolve()
                except OSError as exc:
                    if alone:
                        log_failure(Code.CLUSTER_JOIN_FAILED, "cluster address lookup failed", error=exc)
                    targets = []
                alive = {host_port(m.addr, m.port) for m in self._known.values() if m.status == "alive"}
                wanted = [t for t in dict.fromkeys(targets) if normalize_join_address(t) not in alive]
                if not wanted:
                    continue
                joined = await self.join(wanted)
                if joined > 0 and alone:
                    log.info("joined the cluster on retry: node=%s", self.node_name)
                    delay = max_interval

        if self._joiner is None:
            self._joiner = supervise(loop, f"serf-joiner-{self.node_name}")

    async def close(self, leave: bool = True) -> None:
        """Stop supervising, leave the cluster (the others drop this member at once instead of after failure
        detection; Serf's `leave` also ends the child), then stop the child by PID if it is still there."""
        self._closing = True
        if leave and self._rpc is not None:
            try:
                async with asyncio.timeout(LEAVE_TIMEOUT):
                    await self._rpc.call("leave")
            except (SerfRPCError, OSError, TimeoutError) as exc:
                log.debug("serf leave: %s", exc)
        if self._joiner is not None:
            self._joiner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._joiner
            self._joiner = None
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        await self._teardown_child()
        self._known.clear()
        self._members = []
        if self._own_data_dir and self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None

    # --- lifecycle -----------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    @property
    def rpc_port(self) -> int | None:
        return self._rpc_port

    async def start(self) -> None:
        """Start the child and its supervisor; raises SerfError when serf cannot run at all."""
        if self._supervisor is not None:
            return
        self._closing = False
        self._write_config()
        try:
            await self._spawn_and_connect([])
        except (SerfError, OSError, SerfRPCError, TimeoutError) as exc:
            log_failure(
                Code.CLUSTER_SERF_FAILED, "serf agent failed to start", node=self.serf_node_name, error=exc
            )
            raise SerfError(f"serf agent failed to start: {exc}") from exc
        self._supervisor = supervise(self._supervise, f"serf-supervisor-{self.node_name}")

    async def join(self, addrs: Iterable[str]) -> int:
        """Join 'ip' or 'ip:port' addresses (port 7946 by default); returns how many answered.

        Failure is logged, not raised: an agent that cannot join is a cluster of one. The addresses are
        remembered and re-joined by a restarted child.
        """
        targets: list[str] = []
        for addr in addrs:
            target = normalize_join_address(addr)
            if target not in targets:
                targets.append(target)
            if target not in self._join_addrs:
                self._join_addrs.append(target)
        if not targets:
            return 0
        rpc = await self._wait_rpc()
        if rpc is None:
            log_failure(Code.CLUSTER_JOIN_FAILED, "serf join deferred: agent not running", addrs=targets)
            return 0
        try:
            joined = await rpc.join(targets)
        except (SerfRPCError, TimeoutError) as exc:
            log_failure(Code.CLUSTER_JOIN_FAILED, "serf join failed", addrs=targets, error=str(exc).strip())
            return 0
        await self._refresh(rpc)
        return joined

    def _write_config(self) -> None:
        """Settings serf only takes from a file; kept in a private (0700) data dir."""
        if self._data_dir is None:
            self._data_dir = tempfile.mkdtemp(prefix="keelson-serf-")
        os.makedirs(self._data_dir, mode=0o700, exist_ok=True)
        config = {
            "profile": self.profile,
            "reconnect_interval": RECONNECT_INTERVAL,
            # how long a failed member is retried before it is reaped (Go: 1m); a partition that lasts
            # longer is merged again by keep_joining
            "reconnect_timeout": f"{max(1, round(self.reconnect_timeout))}s",
        }
        with open(self._config_path, "w", encoding="utf-8") as fh:
            json.dump(config, fh)

    @property
    def _config_path(self) -> str:
        assert self._data_dir is not None
        return os.path.join(self._data_dir, "serf.json")

    def _command(self, rpc_port: int, tags: dict[str, str]) -> list[str]:
        cmd = [self.serf_binary, "agent", "-node", self.serf_node_name]
        cmd += ["-bind", host_port(self.bind_ip, self.bind_port), "-rpc-addr", f"127.0.0.1:{rpc_port}"]
        cmd += ["-config-file", self._config_path, "-log-level", "warn"]
        if not ipaddress.ip_address(self.advertise_ip).is_unspecified:
            cmd += ["-advertise", host_port(self.advertise_ip, self.bind_port)]
        for key, value in tags.items():
            cmd += ["-tag", f"{key}={value}"]
        return cmd

    async def _spawn_and_connect(self, rejoin: list[str]) -> None:
        """One child: spawn, RPC handshake, event stream, re-join, then the member snapshot."""
        rpc_port = _free_local_port()
        spawn_tags = dict(self._tags)
        proc = await asyncio.create_subprocess_exec(
            *self._command(rpc_port, spawn_tags),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            limit=1 << 20,
            preexec_fn=child_of_this_process(),  # a killed worker must not leave its serf holding the port
        )
        self._proc, self._rpc_port = proc, rpc_port
        self._spawn_task(self._pump_log(proc), "serf-log")
        try:
            rpc = await self._connect_rpc(proc, rpc_port)
            self._rpc = rpc
            queue: asyncio.Queue[Record] = asyncio.Queue()
            await rpc.stream(queue.put_nowait)
            if self._tags != spawn_tags:  # set_tags() ran while the child was starting
                await rpc.tags(self._tags, [k for k in spawn_tags if k not in self._tags])
            if rejoin:
                try:
                    async with asyncio.timeout(REJOIN_TIMEOUT):
                        await rpc.join(rejoin)
                except (SerfRPCError, TimeoutError) as exc:
                    log_failure(Code.CLUSTER_JOIN_FAILED, "serf re-join failed", addrs=rejoin, error=exc)
            snapshot = await rpc.members()
            if not any(m.name == self.serf_node_name for m in snapshot):
                raise SerfError(f"RPC port {rpc_port} is not our serf agent")
        except BaseException:
            await self._teardown_child()
            raise
        self._known = {m.name: m for m in snapshot}
        self._publish()
        self._spawn_task(self._consume(queue), "serf-events")
        self._ready.set()

    async def _connect_rpc(self, proc: asyncio.subprocess.Process, port: int) -> SerfRPCClient:
        """Serf opens its RPC port a moment after starting; retry until then or until it exits."""
        deadline = asyncio.get_running_loop().time() + STARTUP_TIMEOUT
        while True:
            if proc.returncode is not None:
                raise SerfError(f"serf agent exited with code {proc.returncode} during startup")
            try:
                async with asyncio.timeout(2.0):
                    return await SerfRPCClient.connect("127.0.0.1", port)
            except (OSError, SerfRPCError, TimeoutError):
                if asyncio.get_running_loop().time() > deadline:
                    raise SerfError("serf agent RPC did not come up") from None
            await asyncio.sleep(0.05)

    async def _supervise(self) -> None:
        """Restart a dead child (or one whose RPC broke) with backoff, then re-join the cluster."""
        loop = asyncio.get_running_loop()
        backoff = 0.5
        while not self._closing:
            proc, rpc = self._proc, self._rpc
            assert proc is not None and rpc is not None
            started = loop.time()
            waiters = [spawn(proc.wait(), "serf-wait-proc", owned=True),
                       spawn(rpc.wait_closed(), "serf-wait-rpc", owned=True)]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
            self._ready.clear()
            if self._closing:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):  # for the returncode in the log line
                    await proc.wait()
            log_failure(
                Code.CLUSTER_SERF_FAILED,
                "serf agent died, restarting" if proc.returncode is not None else "serf RPC lost, restarting",
                node=self.serf_node_name,
                pid=proc.pid,
                returncode=proc.returncode,
            )
            rejoin = self._rejoin_targets()
            await self._teardown_child()
            if loop.time() - started > 60:
                backoff = 0.5
            while not self._closing:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                try:
                    await self._spawn_and_connect(rejoin)
                except (SerfError, OSError, SerfRPCError, TimeoutError) as exc:
                    log_failure(Code.CLUSTER_SERF_FAILED, "serf agent restart failed", error=exc)
                    continue
                self.restarts += 1
                log.warning("serf agent restarted: node=%s pid=%s", self.serf_node_name, self.pid)
                break

    def _rejoin_targets(self) -> list[str]:
        """Everyone we last saw alive plus the addresses join() was given."""
        targets = [
            host_port(m.addr, m.port)
            for m in self._known.values()
            if m.status == "alive" and m.name != self.serf_node_name and m.addr
        ]
        return list(dict.fromkeys(targets + self._join_addrs))

    async def _teardown_child(self) -> None:
        """Close RPC, stop the child by PID (SIGTERM, then SIGKILL), stop its helper tasks."""
        self._ready.clear()
        rpc, self._rpc = self._rpc, None
        if rpc is not None:
            await rpc.close()
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                async with asyncio.timeout(STOP_GRACE):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        tasks, self._tasks = self._tasks, set()
        for task in tasks:
            if task.get_name() != "serf-log":
                task.cancel()
        if tasks:  # the log pump ends by itself at EOF once the child is gone
            _, pending = await asyncio.wait(tasks, timeout=2.0)
            for task in pending:
                task.cancel()

    def _spawn_task(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.add(spawn(coro, name))

    async def _wait_rpc(self) -> SerfRPCClient | None:
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await self._ready.wait()
        except TimeoutError:
            return None
        return self._rpc

    async def _pump_log(self, proc: asyncio.subprocess.Process) -> None:
        """Serf's own output, line by line with a prefix, at a matching level."""
        assert proc.stdout is not None
        prefix = f"serf[{self.serf_node_name} pid={proc.pid}]"
        try:
            async for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip()
                if not line:
                    continue
                level = (
                    logging.ERROR
                    if "[ERR]" in line
                    else logging.WARNING
                    if "[WARN]" in line
                    else logging.INFO
                )
                log.log(level, "%s %s", prefix, line)
        except (ValueError, OSError) as exc:
            log.warning("%s output unreadable: %s", prefix, exc)

    async def _consume(self, queue: asyncio.Queue[Record]) -> None:
        """Apply stream records in order; records queued during the snapshot are replayed on top of it."""
        while True:
            record = await queue.get()
            event = record.get("Event")
            for raw in record.get("Members") or []:
                try:
                    item = decode_member(raw)
                except (ValueError, TypeError) as exc:
                    log.warning("serf event %s with an undecodable member: %s", event, exc)
                    continue
                if event == "member-reap":
                    self._known.pop(item.name, None)
                else:
                    self._known[item.name] = item
            log.debug("serf event %s", event)
            self._publish()

    async def _refresh(self, rpc: SerfRPCClient) -> None:
        """Serf's agent coalesces member events (1 s quiet, up to 3 s): after our own join or tag change
        a snapshot makes members() current at once; later records still apply on top of it."""
        try:
            snapshot = await rpc.members()
        except (SerfRPCError, TimeoutError):
            return  # the supervisor deals with a broken child; the stream catches up otherwise
        self._known = {m.name: m for m in snapshot}
        self._publish()

    def _publish(self) -> None:
        """Recompute the alive list, one member per node name: the newest live agent of that node wins
        (its start tag, then its serf name, never merely the sort order); tell listeners when it changed."""
        newest: dict[str, Member] = {}
        for name in sorted(self._known):
            item = self._known[name]
            if item.status != "alive":
                continue
            member = member_from_serf(item)
            if member is None:
                continue
            current = newest.get(member.node_name)
            if current is None or member.started > current.started:
                newest[member.node_name] = member
        members = [newest[node] for node in sorted(newest)]
        if members == self._members:
            return
        self._members = members
        for listener in list(self._listeners):
            try:
                listener(list(members))
            except Exception:
                log.exception("membership listener failed")
