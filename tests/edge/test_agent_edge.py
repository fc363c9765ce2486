"""Edge mode end to end: the real agent process against the Portainer stand-in, its chisel server and dockerd."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import stat
from pathlib import Path

import aiohttp
import asyncssh
import pytest

from agent import VERSION
from tests.edge.conftest import (
    EDGE_ID,
    AgentFactory,
    EdgeStand,
    Sshd,
    agent_log,
    http_get,
    start_agent,
    wait_for,
)
from tests.edge.portainer_standin import STATUS_ACTIVE, STATUS_IDLE, STATUS_REQUIRED, PortainerStandin, Tunnel
from tools.agentproc import AgentProcess
from tools.signer import Signer

pytestmark = [pytest.mark.edge, pytest.mark.engine]

MSG_NO_KEY = "Unable to use the unsecured agent API without Edge key"


def key_file(proc_workdir: Path) -> Path:
    return proc_workdir / "data" / "agent_edge_key"


def last_ok_poll_status(portainer: PortainerStandin, endpoint_id: int) -> int:
    return len([p for p in portainer.polls_for(endpoint_id) if p.status in (200, 304)])


async def set_status_after_first_poll(portainer: PortainerStandin, endpoint_id: int, status: str,
                                      proc: AgentProcess) -> Tunnel:
    """Portainer can only open a tunnel for an environment whose EdgeID it has seen (tunnel.go Open)."""
    await wait_for(lambda: last_ok_poll_status(portainer, endpoint_id) >= 1, 20, "a first poll", proc)
    tunnel = portainer.set_status(endpoint_id, status)
    assert tunnel is not None
    return tunnel


async def tunnel_ping(port: int) -> bool:
    got = await http_get(f"http://127.0.0.1:{port}/ping", timeout=3.0)
    return got is not None and got[0] == 204


async def test_malformed_edge_key_stops_the_agent(edge_agents: AgentFactory) -> None:
    proc = edge_agents({"EDGE_KEY": "not-a-key"})
    proc.start(wait=False)
    assert proc.proc is not None
    await wait_for(lambda: proc.proc is not None and proc.proc.poll() is not None, 30, "agent exit", proc)
    assert proc.proc.returncode == 1
    assert "EDGE_KEY_INVALID invalid Edge key" in agent_log(proc)


async def test_key_from_env_polls_with_go_headers_and_etags(stand: EdgeStand, edge_agents: AgentFactory) -> None:
    portainer = stand.portainer
    portainer.add_endpoint(3, checked_in=True)  # an environment that checked in before: first poll is IDLE
    key = portainer.key_for(3)
    proc = await start_agent(edge_agents({"EDGE_KEY": key}))

    # The key is persisted (atomically, 0600) and served by GET /key; POST /key refuses a second key.
    path = key_file(proc.workdir)
    assert path.read_text() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    got = await http_get(f"{proc.url}/key")
    assert got is not None and got[0] == 200 and json.loads(got[1]) == {"key": key}

    await wait_for(lambda: len(portainer.polls_for(3, 304)) >= 2, 20, "polls answered 304", proc)
    first = portainer.polls_for(3)[0]
    assert first.status == 200
    headers = first.headers
    assert headers["X-PortainerAgent-EdgeID"] == EDGE_ID
    assert headers["Portainer-Agent"] == VERSION
    assert headers["Portainer-Agent-Platform"] == "1"
    assert headers["X-PortainerAgent-Update-ID"] == "0"
    assert headers["X-PortainerAgent-TimeZone"]
    assert "If-None-Match" not in headers  # nothing cached yet
    etag = portainer.cache[3]
    assert portainer.polls_for(3, 304)[0].headers["If-None-Match"] == etag
    assert portainer.endpoints[3].edge_id == EDGE_ID
    assert portainer.endpoints[3].agent_version == VERSION
    assert not portainer.tunnels and not stand.chisel.sessions  # IDLE: no tunnel
    assert "EDGE_POLL_FAILED" not in agent_log(proc)


async def test_key_from_file_first_poll_opens_tunnel(stand: EdgeStand, edge_agents: AgentFactory) -> None:
    portainer = stand.portainer
    portainer.add_endpoint(4)  # never checked in: the first poll answers REQUIRED (Portainer's snapshot)
    proc = edge_agents()
    path = key_file(proc.workdir)
    path.parent.mkdir(parents=True)
    path.write_text(portainer.key_for(4) + "\n")
    await start_agent(proc)
    await wait_for(lambda: 4 in portainer.tunnels, 20, "REQUIRED on the first poll", proc)
    port = portainer.tunnels[4].port
    await wait_for(lambda: tunnel_ping(port), 20, "the agent's /ping through the tunnel", proc)
    assert "Edge key loaded from " + str(path) in agent_log(proc)


async def test_tunnel_follows_status_idle_required_active_idle(stand: EdgeStand, edge_agents: AgentFactory) -> None:
    portainer, chisel = stand.portainer, stand.chisel
    portainer.add_endpoint(5, checked_in=True)
    proc = await start_agent(edge_agents({"EDGE_KEY": portainer.key_for(5)}))
    await wait_for(lambda: last_ok_poll_status(portainer, 5) >= 1, 20, "a first IDLE poll", proc)
    assert not chisel.sessions

    tunnel = portainer.set_status(5, STATUS_REQUIRED)
    assert tunnel is not None
    await wait_for(lambda: tunnel_ping(tunnel.port), 20, "/ping through the tunnel", proc)
    assert chisel.records.auth_attempts[-1] == (tunnel.user, True)
    base = f"http://127.0.0.1:{tunnel.port}"
    unsigned = await http_get(f"{base}/containers/json")
    assert unsigned is not None and unsigned[0] == 403  # signatures are still checked through the tunnel
    signed = await http_get(f"{base}/containers/json?all=1", headers=Signer().headers())
    assert signed is not None and signed[0] == 200
    assert isinstance(json.loads(signed[1]), list)

    portainer.set_status(5, STATUS_ACTIVE)
    polls = len(portainer.polls_for(5))
    await wait_for(lambda: len(portainer.polls_for(5)) >= polls + 2, 20, "polls answered ACTIVE", proc)
    assert await tunnel_ping(tunnel.port)  # ACTIVE keeps the tunnel
    assert len(chisel.records.auth_attempts) == 1

    portainer.set_status(5, STATUS_IDLE)
    await wait_for(lambda: not chisel.sessions, 20, "the tunnel closed on IDLE", proc)
    assert await http_get(f"{base}/ping", timeout=2.0) is None
    assert "EDGE_TUNNEL_FAILED" not in agent_log(proc)


async def test_tunnel_reopens_after_the_server_drops_it(stand: EdgeStand, edge_agents: AgentFactory) -> None:
    portainer, chisel = stand.portainer, stand.chisel
    portainer.add_endpoint(6, checked_in=True)
    proc = await start_agent(edge_agents({"EDGE_KEY": portainer.key_for(6)}))
    tunnel = await set_status_after_first_poll(portainer, 6, STATUS_REQUIRED, proc)
    await wait_for(lambda: tunnel_ping(tunnel.port), 20, "/ping through the tunnel", proc)
    await chisel.drop_all()
    await wait_for(lambda: len(chisel.records.auth_attempts) >= 2 and not any(
        s.conn is None for s in chisel.sessions), 20, "a second connection", proc)
    await wait_for(lambda: tunnel_ping(tunnel.port), 20, "/ping through the reopened tunnel", proc)
    assert [ok for _, ok in chisel.records.auth_attempts] == [True, True]
    assert "tunnel closed by the server or the network" in agent_log(proc)


async def test_wrong_fingerprint_refuses_the_tunnel(stand: EdgeStand, edge_agents: AgentFactory) -> None:
    portainer, chisel = stand.portainer, stand.chisel
    portainer.add_endpoint(7, checked_in=True)
    other = asyncssh.generate_private_key("ecdsa-sha2-nistp256").public_data
    wrong = base64.b64encode(hashlib.sha256(other).digest()).decode()
    proc = await start_agent(edge_agents({"EDGE_KEY": portainer.key_for(7, fingerprint=wrong)}))
    await set_status_after_first_poll(portainer, 7, STATUS_REQUIRED, proc)
    await wait_for(lambda: "host key fingerprint is" in agent_log(proc), 20, "the fingerprint error", proc)
    line = next(x for x in agent_log(proc).splitlines() if "host key fingerprint is" in x)
    assert "EDGE_TUNNEL_FAILED" in line and chisel.fingerprint in line and wrong in line
    assert chisel.records.auth_attempts == []  # refused before any credentials were sent
    polls = len(portainer.polls_for(7))
    await wait_for(lambda: len(portainer.polls_for(7)) >= polls + 3, 20, "three more REQUIRED polls", proc)
    assert agent_log(proc).count("host key fingerprint is") == 1  # not retried for the same server session


async def test_tunnel_closes_after_inactivity(stand: EdgeStand, edge_agents: AgentFactory) -> None:
    portainer, chisel = stand.portainer, stand.chisel
    portainer.add_endpoint(8, checked_in=True)
    proc = await start_agent(edge_agents({"EDGE_KEY": portainer.key_for(8), "EDGE_INACTIVITY_TIMEOUT": "2s"}))
    tunnel = await set_status_after_first_poll(portainer, 8, STATUS_REQUIRED, proc)
    await wait_for(lambda: tunnel_ping(tunnel.port), 20, "/ping through the tunnel", proc)
    portainer.set_status(8, STATUS_ACTIVE)  # the server keeps it; only the agent's inactivity rule closes it
    await wait_for(lambda: not chisel.sessions, 30, "the tunnel closed for inactivity", proc)
    assert "without API requests" in agent_log(proc)


async def test_server_down_and_back(stand: EdgeStand, edge_agents: AgentFactory) -> None:
    portainer = stand.portainer
    portainer.add_endpoint(9, checked_in=True)
    proc = await start_agent(edge_agents({"EDGE_KEY": portainer.key_for(9)}))
    await wait_for(lambda: last_ok_poll_status(portainer, 9) >= 1, 20, "a first poll", proc)
    await portainer.stop()
    await wait_for(lambda: agent_log(proc).count("EDGE_POLL_FAILED") >= 2, 30, "failed polls", proc)
    answered = len(portainer.polls)
    await portainer.start()
    await wait_for(lambda: len(portainer.polls) > answered, 30, "polls after the server came back", proc)
    await wait_for(lambda: "succeeded again after" in agent_log(proc), 10, "the recovery log line", proc)
    got = await http_get(f"{proc.url}/ping")
    assert got is not None and got[0] == 204  # the agent itself never stopped


async def test_edge_job_runs_in_a_container_and_reports_its_log(stand: EdgeStand,
                                                                edge_agents: AgentFactory) -> None:
    portainer = stand.portainer
    portainer.add_endpoint(10, checked_in=True)
    proc = await start_agent(edge_agents({"EDGE_KEY": portainer.key_for(10), "KEELSON_EDGE_JOB_MEMORY": "64m"}))
    script = (b"#!/bin/sh\necho job-v1\nls /sys/class/net\n"
              b"cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes\n"
              b"echo to-stderr >&2\n")
    # Six fields: seconds last (croniter's extension), so the test does not wait for a minute boundary.
    portainer.add_job(1, "* * * * * */2", script, [10])
    log_path = proc.workdir / "data" / "edge_jobs" / "schedule_1.log"

    async def collected(marker: str) -> str:
        """Ask for the log as Portainer's UI does, until the uploaded log shows ``marker``."""
        async def has_marker() -> bool:
            logs = portainer.logs_for(1, 10)
            if logs and marker in logs[-1]:
                return True
            if not portainer.jobs[1].endpoints[10].collect_logs:
                portainer.request_logs(1, 10)
            return False

        await wait_for(has_marker, 30, f"a job log with {marker!r}", proc)
        return portainer.logs_for(1, 10)[-1]

    log1 = await collected("job-v1")
    # stdout and stderr are separate streams: their relative order in the log is not fixed.
    # Interfaces: only loopback (no network); the cgroup shows the 64m memory limit.
    assert sorted(log1.split()) == sorted(["job-v1", "lo", str(64 * 1024 * 1024), "to-stderr"])
    assert portainer.jobs[1].endpoints[10].logs_status == 2  # collected: CollectLogs went back to false

    portainer.update_job(1, script=b"echo job-v2\n")  # a new Version replaces the job
    await collected("job-v2")
    assert "Edge job 1 replaced (version 1 -> 2)" in agent_log(proc)

    portainer.remove_job(1)
    await wait_for(lambda: not log_path.exists(), 20, "the removed job's log file gone", proc)
    assert "Edge job 1 removed" in agent_log(proc)
    signer = Signer()

    async def no_job_containers() -> bool:  # a run cut short by the removal is deleted too
        got = await http_get(f"{proc.url}/containers/json?all=1", headers=signer.headers())
        assert got is not None and got[0] == 200
        return not [c for c in json.loads(got[1]) if "io.keelson.edge-job" in (c.get("Labels") or {})]

    await wait_for(no_job_containers, 20, "no Edge job container left", proc)
    log = agent_log(proc)  # ("still running: run skipped" may appear on a slow machine: that is by design)
    assert "could not run" not in log and "cannot be scheduled" not in log and "log of Edge job" not in log


async def http_post(url: str, body: bytes) -> tuple[int, bytes] | None:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http, \
                http.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            return resp.status, await resp.read()
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None


async def start_keyless_agent(edge_agents: AgentFactory) -> tuple[AgentProcess, str]:
    """An agent with no key anywhere: API gated with 403, association page up."""
    proc = edge_agents()
    proc.start(wait=False)
    ui = f"http://127.0.0.1:{proc.env['EDGE_SERVER_PORT']}"

    async def page_up() -> bool:
        got = await http_get(ui + "/", timeout=2.0)
        return got is not None and got[0] == 200

    await wait_for(page_up, 30, "the association page", proc)
    ping = await http_get(f"{proc.url}/ping")
    assert ping is not None and ping[0] == 403
    assert json.loads(ping[1]) == {"message": MSG_NO_KEY, "details": "Edge key not set"}
    containers = await http_get(f"{proc.url}/containers/json", headers=Signer().headers())
    assert containers is not None and containers[0] == 403
    missing = await http_get(f"{proc.url}/key")
    assert missing is not None and missing[0] == 404
    assert json.loads(missing[1]) == {"message": "No key associated to this agent", "details": "Edge key unavailable"}
    return proc, ui


async def associated(proc: AgentProcess, ui: str, portainer: PortainerStandin, endpoint_id: int, key: str) -> None:
    """After a key was given: page gone, key stored, API open, polling started."""

    async def page_gone() -> bool:
        return await http_get(ui + "/", timeout=1.0) is None

    await wait_for(page_gone, 20, "the association page closed", proc)
    assert key_file(proc.workdir).read_text() == key
    await wait_for(lambda: last_ok_poll_status(portainer, endpoint_id) >= 1, 20, "polls with the new key", proc)
    ping = await http_get(f"{proc.url}/ping")
    assert ping is not None and ping[0] == 204


async def test_key_via_post_key(stand: EdgeStand, edge_agents: AgentFactory) -> None:
    portainer = stand.portainer
    portainer.add_endpoint(12, checked_in=True)
    proc, ui = await start_keyless_agent(edge_agents)
    url = f"{proc.url}/key"
    for body, status, message in [
        (b"{not json", 400, "Invalid request payload"),
        (b'{"Key": ""}', 400, "Invalid request payload"),
        (b'{"Key": "bm90IGEga2V5"}', 400, "Unable to associate Edge key"),
    ]:
        got = await http_post(url, body)
        assert got is not None and got[0] == status and json.loads(got[1])["message"] == message, (body, got)
    key = portainer.key_for(12)
    got = await http_post(url, json.dumps({"key": key}).encode())  # Go decodes field names case-insensitively
    assert got is not None and got[0] == 204
    again = await http_post(url, json.dumps({"Key": key}).encode())
    assert again is not None and again[0] == 409
    assert json.loads(again[1]) == {"message": "An Edge key is already associated to this agent",
                                    "details": "Edge key already associated"}
    await associated(proc, ui, portainer, 12, key)
    shown = await http_get(url)
    assert shown is not None and json.loads(shown[1]) == {"key": key}


ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1100,760")


def drive_association_page(url: str, bad_key: str, good_key: str, profile: Path) -> tuple[str, str]:
    """Headless Chromium: paste a bad key, read the error, paste the good one, read the answer (screenshots)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        driver.set_page_load_timeout(20)
        driver.get(url)
        assert driver.title == "Portainer Edge Agent"
        driver.save_screenshot(str(ARTIFACTS / "edge_ui_1_form.png"))
        driver.find_element(By.ID, "key").send_keys(bad_key)
        driver.find_element(By.ID, "submit").click()
        error = WebDriverWait(driver, 10).until(expected_conditions.visibility_of_element_located((By.ID, "error")))
        error_text = error.text
        driver.save_screenshot(str(ARTIFACTS / "edge_ui_2_bad_key.png"))
        driver.find_element(By.ID, "key").send_keys(good_key)
        driver.find_element(By.ID, "submit").click()
        ok = WebDriverWait(driver, 10).until(expected_conditions.visibility_of_element_located((By.ID, "ok")))
        ok_text = ok.text
        driver.save_screenshot(str(ARTIFACTS / "edge_ui_3_accepted.png"))
        return error_text, ok_text
    finally:
        driver.quit()


@pytest.mark.skipif(not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()),
                    reason="chromium and chromium-driver are not installed (dev.sh installs them)")
async def test_key_from_the_association_page_in_chromium(stand: EdgeStand, edge_agents: AgentFactory,
                                                         tmp_path: Path) -> None:
    portainer = stand.portainer
    portainer.add_endpoint(13, checked_in=True)
    proc, ui = await start_keyless_agent(edge_agents)
    key = portainer.key_for(13)
    bad = base64.b64encode(b"http://portainer:9000|portainer:8000|nope|1").decode()
    # Selenium blocks: drive the browser from a thread so the stand-in keeps answering on this loop.
    error_text, ok_text = await asyncio.to_thread(drive_association_page, ui + "/", bad, key,
                                                  tmp_path / "chromium-profile")
    assert "This key cannot be used: invalid Edge key: tunnel fingerprint" in error_text
    assert ok_text == "Agent setup OK. You can close this page."
    await associated(proc, ui, portainer, 13, key)
    assert "Edge key loaded from association page" in agent_log(proc)


async def test_key_window_closes_with_the_association_page(edge_agents: AgentFactory) -> None:
    proc = edge_agents({"KEELSON_EDGE_UI_TIMEOUT": "1s"})
    proc.start(wait=False)
    ui = f"http://127.0.0.1:{proc.env['EDGE_SERVER_PORT']}/"

    async def page_gone_after_start() -> bool:
        return "closing the Edge key association page" in agent_log(proc) and await http_get(ui, timeout=1.0) is None

    await wait_for(page_gone_after_start, 30, "the association page closed after its window", proc)
    got = await http_post(f"{proc.url}/key", json.dumps({"Key": "anything"}).encode())
    assert got is not None and got[0] == 403  # as Go once nobody gave a key in time
    assert json.loads(got[1])["message"] == MSG_NO_KEY


async def test_ssh_transport_to_a_plain_sshd(sshd: Sshd, edge_agents: AgentFactory) -> None:
    """KEELSON_EDGE_TRANSPORT=ssh: the key's tunnel address is an OpenSSH server (remote forwarding)."""
    portainer = PortainerStandin(None, checkin=1, tunnel_user=sshd.user)
    await portainer.start()
    try:
        portainer.add_endpoint(14, checked_in=True)
        key = portainer.key_for(14, fingerprint=sshd.fingerprint, tunnel_addr=f"127.0.0.1:{sshd.port}")
        proc = await start_agent(edge_agents({"EDGE_KEY": key, "KEELSON_EDGE_TRANSPORT": "ssh",
                                              "KEELSON_EDGE_SSH_KEY": str(sshd.client_key)}))
        tunnel = await set_status_after_first_poll(portainer, 14, STATUS_REQUIRED, proc)
        await wait_for(lambda: tunnel_ping(tunnel.port), 20, "/ping through the SSH tunnel", proc)
        portainer.set_status(14, STATUS_IDLE)

        async def closed() -> bool:
            return await http_get(f"http://127.0.0.1:{tunnel.port}/ping", timeout=1.0) is None

        await wait_for(closed, 20, "the SSH forwarding gone on IDLE", proc)
        assert "ssh tunnel open" in agent_log(proc)
    finally:
        await portainer.stop()
