"""Configuration from the environment, with the Go agent's variable names, defaults and syntax.

A bad value stops start-up with one line naming the variable (ConfigError carries that line).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
LOG_LEVELS = ("DEBUG", "INFO", "WARN", "ERROR")
LOG_MODES = ("PRETTY", "NOCOLOR", "JSON")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the variable."""


def parse_go_duration(text: str) -> float:
    """Parse Go's time.ParseDuration syntax (`72h`, `1m30s`, `500ms`, `-1.5h`) into seconds."""
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    sign = 1.0
    if s[0] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    pos = 0
    total = 0.0
    while pos < len(s):
        match = _DURATION_PART.match(s, pos)
        if match is None:
            raise ValueError(f"invalid duration {text!r}")
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos == 0:
        raise ValueError(f"invalid duration {text!r}")
    return sign * total


def parse_go_bool(text: str) -> bool:
    """Go's strconv.ParseBool, which kingpin uses for the agent's boolean flags."""
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False", ""):
        return False
    raise ValueError(f"invalid boolean {text!r} (use true/false or 1/0)")


@dataclass(frozen=True)
class DockerEndpoint:
    """Where the local engine is, read as the Docker CLI reads DOCKER_HOST, DOCKER_TLS_VERIFY, DOCKER_CERT_PATH."""

    url: str = "unix:///var/run/docker.sock"
    tls_verify: bool = False
    cert_path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.url.startswith("unix://")

    @property
    def socket_path(self) -> str:
        return self.url[len("unix://"):]

    @property
    def uses_tls(self) -> bool:
        return not self.is_unix and (self.tls_verify or self.cert_path is not None)

    @property
    def http_base(self) -> str:
        """Base URL for HTTP requests (unix sockets use a dummy host)."""
        if self.is_unix:
            return "http://docker"
        hostport = self.url.split("://", 1)[1].rstrip("/")
        return f"{'https' if self.uses_tls else 'http'}://{hostport}"


TRANSPORTS = ("chisel", "ssh")
JOB_RUNNERS = ("cron", "container")
_SIZE = re.compile(r"^(\d+)([bkmg]?)$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


@dataclass(frozen=True)
class EdgeOptions:
    """Keelson-only Edge settings (no Go equivalent), read from ``KEELSON_EDGE_*`` variables."""

    transport: str = "chisel"
    """KEELSON_EDGE_TRANSPORT: ``chisel`` (Portainer's tunnel server) or ``ssh`` (the key's tunnel address is a
    plain SSH server; remote forwarding with the poll's credentials, or with KEELSON_EDGE_SSH_KEY)."""
    ssh_key: str = ""
    """KEELSON_EDGE_SSH_KEY: private key file for the ssh transport (password auth when empty)."""
    job_image: str = "busybox:latest"
    """KEELSON_EDGE_JOB_IMAGE: image of the throwaway container each Edge job runs in (needs /bin/sh)."""
    job_memory: int = 128 * 1024**2
    """KEELSON_EDGE_JOB_MEMORY: memory (and memory+swap) limit of a job container (``128m``, ``1g``)."""
    job_cpus: float = 0.5
    """KEELSON_EDGE_JOB_CPUS: CPU limit of a job container (like ``docker run --cpus``)."""
    job_timeout: float = 3600.0
    """KEELSON_EDGE_JOB_TIMEOUT: a run still going after this (Go duration) is killed."""
    ui_timeout: float = 15 * 60.0
    """KEELSON_EDGE_UI_TIMEOUT: the association page closes when no key was given within this (Go: 15m)."""
    poll_interval: float = 5.0
    """KEELSON_EDGE_POLL_INTERVAL: poll interval until the server's ``checkin`` says otherwise (Go: 5s)."""
    poll_max_backoff: float = 60.0
    """KEELSON_EDGE_POLL_MAX_BACKOFF: longest wait between polls while Portainer is unreachable."""
    job_runner: str = "cron"
    """KEELSON_EDGE_JOB_RUNNER: ``cron`` (Go's way: script and cron line in the host's root, run by the host's
    cron as root) or ``container`` (a throwaway container per run: no network, limits; the safer choice)."""
    stack_retry: float = 30.0
    """KEELSON_EDGE_STACK_RETRY: first wait before a failed stack deployment is tried again (doubling, at most
    ten times this)."""
    compose: str = "docker-compose"
    """KEELSON_EDGE_COMPOSE: the Docker Compose v2 command Edge stacks are deployed with."""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> EdgeOptions:
        transport = env.get("KEELSON_EDGE_TRANSPORT", "").strip().lower() or cls.transport
        if transport not in TRANSPORTS:
            raise ConfigError(f"KEELSON_EDGE_TRANSPORT: {transport!r} is not one of {', '.join(TRANSPORTS)}")
        ssh_key = env.get("KEELSON_EDGE_SSH_KEY", "")
        if ssh_key and not Path(ssh_key).is_file():
            raise ConfigError(f"KEELSON_EDGE_SSH_KEY: {ssh_key!r} is not a readable file")
        cpus_text = env.get("KEELSON_EDGE_JOB_CPUS", "")
        try:
            cpus = float(cpus_text) if cpus_text else cls.job_cpus
        except ValueError:
            raise ConfigError(f"KEELSON_EDGE_JOB_CPUS: {cpus_text!r} is not a number") from None
        if not 0 < cpus <= 1024:
            raise ConfigError(f"KEELSON_EDGE_JOB_CPUS: {cpus_text!r} must be > 0")
        runner = env.get("KEELSON_EDGE_JOB_RUNNER", "").strip().lower() or cls.job_runner
        if runner not in JOB_RUNNERS:
            raise ConfigError(f"KEELSON_EDGE_JOB_RUNNER: {runner!r} is not one of {', '.join(JOB_RUNNERS)}")
        return cls(
            transport=transport,
            ssh_key=ssh_key,
            job_image=env.get("KEELSON_EDGE_JOB_IMAGE", "") or cls.job_image,
            job_memory=_edge_size(env, "KEELSON_EDGE_JOB_MEMORY", cls.job_memory),
            job_cpus=cpus,
            job_timeout=_edge_duration(env, "KEELSON_EDGE_JOB_TIMEOUT", cls.job_timeout),
            ui_timeout=_edge_duration(env, "KEELSON_EDGE_UI_TIMEOUT", cls.ui_timeout),
            poll_interval=_edge_duration(env, "KEELSON_EDGE_POLL_INTERVAL", cls.poll_interval),
            poll_max_backoff=_edge_duration(env, "KEELSON_EDGE_POLL_MAX_BACKOFF", cls.poll_max_backoff),
            job_runner=runner,
            stack_retry=_edge_duration(env, "KEELSON_EDGE_STACK_RETRY", cls.stack_retry),
            compose=env.get("KEELSON_EDGE_COMPOSE", "") or cls.compose,
        )


def _edge_duration(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "")
    if not raw:
        return default
    try:
        value = parse_go_duration(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a duration (Go syntax, like 15m, 30s, 500ms)") from None
    if value <= 0:
        raise ConfigError(f"{name}: {raw!r} must be a positive duration")
    return value


def _edge_size(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    match = _SIZE.match(raw)
    if match is None:
        raise ConfigError(f"{name}: {raw!r} is not a size (like 64m, 1g)")
    value = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if value < 6 * 1024**2:  # Docker's own minimum for --memory
        raise ConfigError(f"{name}: {raw!r} is below Docker's 6m minimum")
    return value


@dataclass(frozen=True)
class Config:
    """Everything the agent reads from its environment (names and defaults of the Go agent 2.23)."""

    agent_host: str = "0.0.0.0"
    agent_port: int = 9001
    cluster_addr: str = ""
    cluster_probe_timeout: float = 0.5
    cluster_probe_interval: float = 1.0
    secret: str = ""
    secret_timeout: float = 72 * 3600.0
    data_path: Path = Path("/data")
    log_level: str = "INFO"
    log_mode: str = "PRETTY"
    edge: bool = False
    edge_async: bool = False
    edge_key: str = ""
    edge_id: str = ""
    edge_server_host: str = "0.0.0.0"
    edge_server_port: int = 80
    edge_inactivity_timeout: float = 300.0
    edge_insecure_poll: bool = False
    edge_tunnel: bool = True
    mtls_cert: str = ""
    mtls_key: str = ""
    mtls_ca: str = ""
    mtls_cert_retry_interval: float = 0.0
    update_id: int = 0
    edge_groups: tuple[int, ...] = ()
    portainer_group: int = 0
    portainer_tags: tuple[int, ...] = ()
    edge_tunnel_proxy: str = ""
    edge_options: EdgeOptions = field(default_factory=lambda: EdgeOptions())
    ignored: tuple[str, ...] = ()
    """Go options that are set but have no meaning here (logged once at start)."""
    docker: DockerEndpoint = field(default_factory=DockerEndpoint)
    # Keelson's own options (no Go equivalent); names start with KEELSON_.
    advertise_addr: str = ""
    fanout_timeout: float = 120.0
    peer_connect_timeout: float = 2.0
    websocket_ping: float = 50.0
    header_timeout: float = 30.0
    max_unproven: int = 1024
    workers: int = 0
    """KEELSON_WORKERS: worker processes on the agent port (0 = one per available CPU; Edge mode: 1)."""
    dockerhub_auth_url: str = "https://auth.docker.io"
    dockerhub_registry_url: str = "https://registry-1.docker.io"
    host_root: Path = Path("/host")
    serf_binary: str = "serf"
    serf_port: int = 7946
    serf_reconnect_timeout: float = 60.0


def _workers(env: Mapping[str, str]) -> int:
    raw = env.get("KEELSON_WORKERS", "").strip().lower()
    if raw in ("", "auto"):
        return 0
    return _int(env, "KEELSON_WORKERS", 0, lo=1, hi=64)


def _get(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name)
    return default if value is None or value == "" else value


def _int(env: Mapping[str, str], name: str, default: int, lo: int = 0, hi: int = 2**31) -> int:
    raw = _get(env, name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not an integer") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name}: {value} is out of range {lo}..{hi}")
    return value


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    return _int(env, name, default, 1, 65535)


def _duration(env: Mapping[str, str], name: str, default: str, allow_zero: bool = False) -> float:
    raw = _get(env, name, default)
    try:
        value = parse_go_duration(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a duration (Go syntax, like 72h, 1m30s, 500ms)") from None
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}: {raw!r} must be a positive duration")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return parse_go_bool(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _ip(env: Mapping[str, str], name: str, default: str) -> str:
    raw = _get(env, name, default)
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not an IP address") from None


_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


def _cluster_addr(env: Mapping[str, str]) -> str:
    """AGENT_CLUSTER_ADDR: comma-separated IPs or DNS names, each with an optional :port (`tasks.agent`)."""
    raw = env.get("AGENT_CLUSTER_ADDR", "")
    for item in (part.strip() for part in raw.split(",") if raw):
        host, sep, port = item.rpartition(":") if item.count(":") == 1 else ("", "", "")
        host = host if sep else item
        if sep and not (port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(f"AGENT_CLUSTER_ADDR: {item!r} has no valid port")
        try:
            ipaddress.ip_address(host.strip("[]"))
            continue
        except ValueError:
            pass
        if not host or len(host) > 253 or not all(_LABEL.match(label) for label in host.rstrip(".").split(".")):
            raise ConfigError(f"AGENT_CLUSTER_ADDR: {item!r} is not an IP address or a host name")
    return raw


def _url(env: Mapping[str, str], name: str, default: str) -> str:
    raw = _get(env, name, default).rstrip("/")
    if not raw.startswith(("http://", "https://")) or len(raw.split("://", 1)[1]) == 0:
        raise ConfigError(f"{name}: {raw!r} is not an http:// or https:// URL")
    return raw


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = _get(env, name, default).upper()
    if raw not in choices:
        raise ConfigError(f"{name}: {raw!r} is not one of {', '.join(choices)}")
    return raw


def _docker(env: Mapping[str, str]) -> DockerEndpoint:
    url = _get(env, "DOCKER_HOST", "unix:///var/run/docker.sock")
    if url.startswith("tcp://"):
        hostport = url[len("tcp://"):].rstrip("/")
        if ":" not in hostport:
            raise ConfigError(f"DOCKER_HOST: {url!r} needs a port (tcp://host:2376)")
    elif not url.startswith("unix://") or len(url) == len("unix://"):
        raise ConfigError(f"DOCKER_HOST: {url!r} must be unix:///path or tcp://host:port")
    tls_verify = bool(env.get("DOCKER_TLS_VERIFY"))  # the Docker CLI: any non-empty value enables it
    cert_path = env.get("DOCKER_CERT_PATH") or None
    if tls_verify and cert_path is None:
        cert_path = str(Path.home() / ".docker")
    if cert_path is not None and url.startswith("tcp://"):
        for name in ("ca.pem", "cert.pem", "key.pem"):
            if tls_verify and not (Path(cert_path) / name).is_file():
                raise ConfigError(f"DOCKER_CERT_PATH: {cert_path}/{name} is missing")
    return DockerEndpoint(url=url, tls_verify=tls_verify, cert_path=cert_path)


def _mtls(env: Mapping[str, str], wait_for_files: bool) -> tuple[str, str, str]:
    """The mTLS files. With MTLS_CERT_RETRY_INTERVAL set, certificate and key may appear after start (Go
    blocks until both exist: cmd/agent/main.go, edge/ssl.go); they are checked again once they are there."""
    cert, key, ca = env.get("MTLS_SSL_CERT", ""), env.get("MTLS_SSL_KEY", ""), env.get("MTLS_SSL_CA", "")
    if bool(cert) != bool(key):
        raise ConfigError("MTLS_SSL_CERT: MTLS_SSL_CERT and MTLS_SSL_KEY must be set together")
    if ca and not cert:
        raise ConfigError("MTLS_SSL_CA: needs MTLS_SSL_CERT and MTLS_SSL_KEY as well")
    for name, value in (("MTLS_SSL_CERT", cert), ("MTLS_SSL_KEY", key), ("MTLS_SSL_CA", ca)):
        if wait_for_files and name != "MTLS_SSL_CA":
            continue
        if value and not Path(value).is_file():
            raise ConfigError(f"{name}: {value!r} is not a readable file")
    return cert, key, ca


def _id_list(env: Mapping[str, str], name: str) -> tuple[int, ...]:
    """Go's colon-separated list of integer identifiers (`1:4:7`), as os/options.go parses EDGE_GROUPS."""
    raw = env.get(name, "")
    if not raw:
        return ()
    try:
        return tuple(int(part) for part in raw.split(":"))
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a colon-separated list of integers (like 1:4:7)") from None


# The Go agent's command-line flags (os/options.go, kingpin): each sets the variable it mirrors and wins over
# it. Boolean flags take no value (`--edge`, `--no-edge`).
FLAGS: dict[str, str] = {
    "host": "AGENT_HOST", "port": "AGENT_PORT", "secret-timeout": "AGENT_SECRET_TIMEOUT",
    "cluster-addr": "AGENT_CLUSTER_ADDR", "agent-cluster-timeout": "AGENT_CLUSTER_PROBE_TIMEOUT",
    "agent-cluster-interval": "AGENT_CLUSTER_PROBE_INTERVAL", "data": "DATA_PATH", "assets": "ASSETS_PATH",
    "secret": "AGENT_SECRET", "log-level": "LOG_LEVEL", "log-mode": "LOG_MODE", "update-id": "UPDATE_ID",
    "edge-key": "EDGE_KEY", "edge-id": "EDGE_ID", "edge-host": "EDGE_SERVER_HOST", "edge-port": "EDGE_SERVER_PORT",
    "edge-inactivity": "EDGE_INACTIVITY_TIMEOUT", "edge-tunnel-http-proxy": "HTTP_PROXY",
    "edge-tunnel-https-proxy": "HTTPS_PROXY", "edge-groups": "EDGE_GROUPS", "environment-group": "PORTAINER_GROUP",
    "tags": "PORTAINER_TAGS", "mtlscert": "MTLS_SSL_CERT", "mtlskey": "MTLS_SSL_KEY", "mtlscacert": "MTLS_SSL_CA",
    "sslcert": "MTLS_SSL_CERT", "sslkey": "MTLS_SSL_KEY", "sslcacert": "MTLS_SSL_CA",
    "certificate-retry-interval": "MTLS_CERT_RETRY_INTERVAL",
    "aws-cert": "AWS_CLIENT_CERT", "aws-key": "AWS_CLIENT_KEY", "aws-bundle": "AWS_CLIENT_BUNDLE",
    "aws-role-arn": "AWS_ROLE_ARN", "aws-trust-anchor-arn": "AWS_TRUST_ANCHOR_ARN",
    "aws-profile-arn": "AWS_PROFILE_ARN", "aws-region": "AWS_REGION",
}
IGNORED = ("ASSETS_PATH", "AWS_CLIENT_CERT", "AWS_CLIENT_KEY", "AWS_CLIENT_BUNDLE", "AWS_ROLE_ARN",
           "AWS_TRUST_ANCHOR_ARN", "AWS_PROFILE_ARN", "AWS_REGION")
"""Go options without an equivalent: the binaries folder (Keelson ships none) and AWS ECR credentials."""
BOOL_FLAGS: dict[str, str] = {
    "edge": "EDGE", "edge-async": "EDGE_ASYNC", "edge-insecurepoll": "EDGE_INSECURE_POLL", "edge-tunnel": "EDGE_TUNNEL",
}
USAGE = "usage: python -m agent [--flag=value ...]  (flags: " + ", ".join(
    f"--{name}" for name in sorted([*FLAGS, *BOOL_FLAGS])) + "; each mirrors the variable of the same meaning)"


def apply_flags(env: Mapping[str, str], argv: list[str]) -> dict[str, str]:
    """The environment with the Go agent's command-line flags applied on top (a flag beats its variable)."""
    merged = dict(env)
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"command line: unexpected argument {arg!r}; {USAGE}")
        name, eq, value = arg[2:].partition("=")
        if name in BOOL_FLAGS and not eq:
            merged[BOOL_FLAGS[name]] = "true"
        elif name.startswith("no-") and name[3:] in BOOL_FLAGS and not eq:
            merged[BOOL_FLAGS[name[3:]]] = "false"
        elif name in FLAGS:
            if not eq:
                if not args:
                    raise ConfigError(f"command line: --{name} needs a value")
                value = args.pop(0)
            merged[FLAGS[name]] = value
        else:
            raise ConfigError(f"command line: unknown flag --{name}; {USAGE}")
    return merged


def load_config(env: Mapping[str, str] | None = None, argv: list[str] | None = None) -> Config:
    """Read and validate the whole configuration; raises ConfigError naming the first bad variable."""
    env = os.environ if env is None else env
    if argv:
        env = apply_flags(env, argv)
    edge_inactivity = _duration(env, "EDGE_INACTIVITY_TIMEOUT", "5m")
    cert_retry = _duration(env, "MTLS_CERT_RETRY_INTERVAL", "0", allow_zero=True)
    mtls_cert, mtls_key, mtls_ca = _mtls(env, wait_for_files=cert_retry > 0)
    edge = _bool(env, "EDGE", False)
    edge_async = _bool(env, "EDGE_ASYNC", False)
    if edge_async and not edge:
        raise ConfigError("EDGE_ASYNC: Edge async mode needs Edge mode (EDGE=1), as in the Go agent")
    advertise = env.get("KEELSON_ADVERTISE_ADDR", "")
    if advertise:
        advertise = _ip(env, "KEELSON_ADVERTISE_ADDR", advertise)
    return Config(
        agent_host=_ip(env, "AGENT_HOST", "0.0.0.0"),
        agent_port=_port(env, "AGENT_PORT", 9001),
        cluster_addr=_cluster_addr(env),
        cluster_probe_timeout=_duration(env, "AGENT_CLUSTER_PROBE_TIMEOUT", "500ms"),
        cluster_probe_interval=_duration(env, "AGENT_CLUSTER_PROBE_INTERVAL", "1s"),
        secret=env.get("AGENT_SECRET", ""),
        secret_timeout=_duration(env, "AGENT_SECRET_TIMEOUT", "72h"),
        data_path=Path(_get(env, "DATA_PATH", "/data")),
        log_level=_choice(env, "LOG_LEVEL", "INFO", LOG_LEVELS),
        log_mode=_choice(env, "LOG_MODE", "PRETTY", LOG_MODES),
        edge=edge,
        edge_async=edge_async,
        edge_key=env.get("EDGE_KEY", ""),
        edge_id=env.get("EDGE_ID", ""),
        edge_server_host=_ip(env, "EDGE_SERVER_HOST", "0.0.0.0"),
        edge_server_port=_port(env, "EDGE_SERVER_PORT", 80),
        edge_inactivity_timeout=edge_inactivity,
        edge_insecure_poll=_bool(env, "EDGE_INSECURE_POLL", False),
        edge_tunnel=_bool(env, "EDGE_TUNNEL", True),
        mtls_cert=mtls_cert,
        mtls_key=mtls_key,
        mtls_ca=mtls_ca,
        mtls_cert_retry_interval=cert_retry,
        update_id=_int(env, "UPDATE_ID", 0),
        edge_groups=_id_list(env, "EDGE_GROUPS"),
        portainer_group=_int(env, "PORTAINER_GROUP", 0),
        portainer_tags=_id_list(env, "PORTAINER_TAGS"),
        edge_tunnel_proxy=env.get("HTTPS_PROXY", "") or env.get("HTTP_PROXY", ""),
        docker=_docker(env),
        advertise_addr=advertise,
        fanout_timeout=_duration(env, "KEELSON_FANOUT_TIMEOUT", "120s"),
        peer_connect_timeout=_duration(env, "KEELSON_PEER_CONNECT_TIMEOUT", "2s"),
        websocket_ping=_duration(env, "KEELSON_WEBSOCKET_PING", "50s"),
        header_timeout=_duration(env, "KEELSON_HEADER_TIMEOUT", "30s"),
        max_unproven=_int(env, "KEELSON_MAX_UNPROVEN", 1024, lo=1, hi=1_000_000),
        workers=_workers(env),
        dockerhub_auth_url=_url(env, "KEELSON_DOCKERHUB_AUTH_URL", "https://auth.docker.io"),
        dockerhub_registry_url=_url(env, "KEELSON_DOCKERHUB_REGISTRY_URL", "https://registry-1.docker.io"),
        host_root=Path(_get(env, "KEELSON_HOST_ROOT", "/host")),
        serf_binary=_get(env, "KEELSON_SERF_BINARY", "serf"),
        serf_port=_port(env, "KEELSON_SERF_PORT", 7946),
        serf_reconnect_timeout=_duration(env, "KEELSON_SERF_RECONNECT_TIMEOUT", "1m"),
        edge_options=EdgeOptions.from_env(env),
        ignored=tuple(name for name in IGNORED if env.get(name)),
    )
