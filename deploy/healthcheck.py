"""The image's HEALTHCHECK: is this container's agent answering `GET /ping`?

Exit 0 when it is healthy, 1 when it is not (one line on stdout says why; Docker keeps it in the container's
health log). It reads the agent's own configuration (AGENT_PORT, AGENT_HOST, EDGE, ...) with the agent's own
parser, so it probes the listener the agent opened:

- standard agent: HTTPS (self-signed, not verified) on 127.0.0.1 (or AGENT_HOST), `GET /ping` must answer 204;
- Edge agent: plain HTTP on the container's own address; any HTTP answer will do (before a key is set the
  Edge API answers 403 on purpose).

With no AGENT_SECRET, an agent that nobody paired with within AGENT_SECRET_TIMEOUT closes its API on purpose
and keeps running (as the Go agent). A refused connection is then reported healthy: an unhealthy task would be
replaced by Swarm, and the new agent would open a fresh pairing window, which the timeout exists to prevent.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import sys
from collections.abc import Mapping
from pathlib import Path

TIMEOUT = 4.0


def process_uptime(pid: int = 1) -> float:
    """Seconds since process `pid` started (the agent is PID 1 of its container)."""
    ticks = os.sysconf("SC_CLK_TCK")
    stat = Path(f"/proc/{pid}/stat").read_text()
    start = int(stat[stat.rindex(")") + 2:].split()[19]) / ticks
    boot_uptime = float(Path("/proc/uptime").read_text().split()[0])
    return boot_uptime - start


def closed_on_purpose(secret: str, edge: bool, secret_timeout: float, uptime: float) -> bool:
    """Whether a closed API is the security shutdown (no secret, not Edge, older than the timeout)."""
    return not secret and not edge and uptime >= secret_timeout


def probe_target(agent_host: str, edge: bool) -> str:
    """The address to probe: AGENT_HOST unless it is a wildcard; an Edge agent listens on its own address."""
    if agent_host not in ("0.0.0.0", "::"):
        return agent_host
    if edge:
        return socket.gethostbyname(socket.gethostname())
    return "127.0.0.1"


def ping(host: str, port: int, tls: bool, timeout: float = TIMEOUT) -> int:
    """HTTP status of `GET /ping` (raises OSError or http.client.HTTPException when nothing answers)."""
    conn: http.client.HTTPConnection
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/ping")
        return conn.getresponse().status
    finally:
        conn.close()


def check(env: Mapping[str, str] | None = None, uptime: float | None = None) -> tuple[bool, str]:
    """(healthy, one line saying why)."""
    from agent.config import ConfigError, load_config

    try:
        config = load_config(env)
    except ConfigError as exc:
        return False, f"configuration invalid: {exc}"
    host = probe_target(config.agent_host, config.edge)
    try:
        status = ping(host, config.agent_port, tls=not config.edge)
    except ssl.SSLError as exc:
        # The listener answered the handshake and refused it (MTLS_SSL_CA requires a client certificate).
        return True, f"TLS listener on {host}:{config.agent_port} answers ({exc.reason})"
    except ConnectionRefusedError:
        age = process_uptime() if uptime is None else uptime
        if closed_on_purpose(config.secret, config.edge, config.secret_timeout, age):
            return True, "API closed on purpose: nobody paired within AGENT_SECRET_TIMEOUT"
        return False, f"nothing listens on {host}:{config.agent_port}"
    except (OSError, http.client.HTTPException) as exc:
        return False, f"{host}:{config.agent_port}: {type(exc).__name__}: {exc}"
    if config.edge or status == 204:
        return True, f"GET /ping on {host}:{config.agent_port}: {status}"
    return False, f"GET /ping on {host}:{config.agent_port}: {status}, want 204"


def main() -> int:
    healthy, why = check()
    print(why)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
