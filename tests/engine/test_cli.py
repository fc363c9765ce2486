"""The real Docker CLI through the agent (TLS, signed with config.json HttpHeaders) on a real dockerd."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import time
import uuid
from pathlib import Path

from tools.agentproc import AgentProcess
from tools.dockerd import DOCKER_CLI, PrivateDockerd


def _in_flight(agent: AgentProcess) -> float:
    import urllib.request

    from tools.agentproc import insecure_context

    req = urllib.request.Request(agent.url + "/metrics", headers=agent.signer.headers())
    with urllib.request.urlopen(req, context=insecure_context(), timeout=10) as resp:
        text = resp.read().decode()
    return float(next(ln.split()[1] for ln in text.splitlines() if ln.startswith("keelson_requests_in_flight ")))


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_version_reports_the_engine_through_the_agent(agent: AgentProcess, engine: PrivateDockerd) -> None:
    out = agent.cli("version", "--format", "{{.Server.Version}}").stdout.decode().strip()
    direct = engine.cli("version", "--format", "{{.Server.Version}}").stdout.strip()
    assert out == direct != ""


def test_run_attaches_and_returns_output_and_exit_code(agent: AgentProcess) -> None:
    res = agent.cli("run", "--rm", "busybox:local", "sh", "-c", "echo out; echo err >&2; exit 7", check=False)
    assert res.returncode == 7
    assert res.stdout.decode() == "out\n"
    assert res.stderr.decode() == "err\n"


def test_stdin_piped_through_run_i_half_closes(agent: AgentProcess) -> None:
    res = agent.cli("run", "-i", "--rm", "busybox:local", "cat", input=b"x\n", timeout=60)
    assert res.stdout == b"x\n"
    big = bytes(range(256)) * 4096  # 1 MiB of every byte value, both ways through the hijacked stream
    res = agent.cli("run", "-i", "--rm", "busybox:local", "md5sum", input=big, timeout=60)
    import hashlib

    assert res.stdout.decode().split()[0] == hashlib.md5(big).hexdigest()


def test_logs_follow_and_exec(agent: AgentProcess) -> None:
    name = _name("chatty")
    agent.cli("run", "-d", "--name", name, "busybox:local", "sh", "-c",
              "i=0; while true; do echo line$i; i=$((i+1)); sleep 0.1; done")
    try:
        proc = subprocess.Popen(
            [DOCKER_CLI, "--config", str(agent.config_dir), "--tls", "-H", f"tcp://127.0.0.1:{agent.port}",
             "logs", "-f", name],
            stdout=subprocess.PIPE, env={"DOCKER_CERT_PATH": str(agent.config_dir), "PATH": "/usr/bin:/bin"},
        )
        assert proc.stdout is not None
        lines = [proc.stdout.readline().decode().strip() for _ in range(15)]
        proc.terminate()
        proc.wait(timeout=10)
        assert lines[:3] == ["line0", "line1", "line2"]
        assert lines[14] == "line14"  # kept streaming while the container kept writing
        res = agent.cli("exec", name, "sh", "-c", "echo in-exec; exit 3", check=False)
        assert (res.returncode, res.stdout) == (3, b"in-exec\n")
        res = agent.cli("exec", "-i", name, "sh", input=b"echo piped; exit 4\n", check=False)
        assert (res.returncode, res.stdout) == (4, b"piped\n")
    finally:
        agent.cli("rm", "-f", name)


def test_cp_both_ways(agent: AgentProcess, tmp_path: Path) -> None:
    name = _name("cp")
    agent.cli("run", "-d", "--name", name, "busybox:local", "sleep", "300")
    try:
        src = tmp_path / "payload.bin"
        src.write_bytes(bytes(range(256)) * 8192)  # 2 MiB
        agent.cli("cp", str(src), f"{name}:/tmp/payload.bin")
        back = tmp_path / "back.bin"
        agent.cli("cp", f"{name}:/tmp/payload.bin", str(back))
        assert back.read_bytes() == src.read_bytes()
    finally:
        agent.cli("rm", "-f", name)


def test_save_load_and_import(agent: AgentProcess, engine: PrivateDockerd, tmp_path: Path) -> None:
    archive = tmp_path / "busybox.tar"
    agent.cli("save", "-o", str(archive), "busybox:local")
    with tarfile.open(archive) as tar:
        assert "manifest.json" in tar.getnames()
    tag = f"reloaded:{uuid.uuid4().hex[:6]}"
    agent.cli("tag", "busybox:local", tag)
    agent.cli("rmi", tag)
    out = agent.cli("load", "-i", str(archive)).stdout.decode()
    assert "busybox:local" in out
    # docker import streams a chunked upload from stdin
    rootfs = io.BytesIO()
    with tarfile.open(fileobj=rootfs, mode="w") as tar:
        data = b"imported through the agent\n"
        info = tarfile.TarInfo("hello.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    itag = f"imported:{uuid.uuid4().hex[:6]}"
    agent.cli("import", "-", itag, input=rootfs.getvalue())
    assert engine.cli("image", "inspect", itag).returncode == 0
    engine.cli("rmi", itag)


def test_build_streams_the_context(agent: AgentProcess, tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "blob.bin").write_bytes(b"z" * 3_000_000)
    (ctx / "Dockerfile").write_text("FROM busybox:local\nCOPY blob.bin /blob.bin\nCMD wc -c /blob.bin\n")
    tag = f"built:{uuid.uuid4().hex[:6]}"
    import os

    env_before = os.environ.get("DOCKER_BUILDKIT")
    os.environ["DOCKER_BUILDKIT"] = "0"
    try:
        agent.cli("build", "-q", "-t", tag, str(ctx))
    finally:
        if env_before is None:
            os.environ.pop("DOCKER_BUILDKIT", None)
    out = agent.cli("run", "--rm", tag).stdout.decode()
    assert out.split()[0] == "3000000"
    agent.cli("rmi", tag)


def test_volumes_and_events(agent: AgentProcess) -> None:
    vol = _name("vol")
    events = subprocess.Popen(
        [DOCKER_CLI, "--config", str(agent.config_dir), "--tls", "-H", f"tcp://127.0.0.1:{agent.port}",
         "events", "--format", "{{json .}}", "--filter", f"volume={vol}"],
        stdout=subprocess.PIPE, env={"DOCKER_CERT_PATH": str(agent.config_dir), "PATH": "/usr/bin:/bin"},
    )
    try:
        time.sleep(0.5)  # let the events stream open before the event happens (not a timing assertion)
        agent.cli("volume", "create", vol)
        assert events.stdout is not None
        event = json.loads(events.stdout.readline())
        assert (event["Type"], event["Action"], event["Actor"]["ID"]) == ("volume", "create", vol)
    finally:
        events.terminate()
        events.wait(timeout=10)
    # the caller went away: the agent must drop its end of the engine stream too (no leaked stream)
    for _ in range(100):
        if _in_flight(agent) == 1:  # only the metrics request itself
            break
        time.sleep(0.1)
    assert _in_flight(agent) == 1
    listed = agent.cli("volume", "ls", "--format", "{{.Name}}").stdout.decode().split()
    assert vol in listed
    res = agent.cli("run", "--rm", "-v", f"{vol}:/data", "busybox:local", "sh", "-c",
                    "echo kept > /data/f && cat /data/f")
    assert res.stdout == b"kept\n"
    agent.cli("volume", "rm", vol)


def test_errors_come_back_in_docker_shape(agent: AgentProcess) -> None:
    res = agent.cli("inspect", "--type", "container", "no-such-container-xyz", check=False)
    assert res.returncode != 0
    assert "No such container" in res.stderr.decode()
