"""Agent endpoints on a standalone engine: /agents, /metrics, /websocket, and the unversioned/v2 forms."""

from __future__ import annotations

import json

import aiohttp

from tools.agentproc import AgentProcess, insecure_context


async def _request(agent: AgentProcess, method: str, path: str, **kw: object) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.request(method, agent.url + path, headers=agent.signer.headers(), ssl=insecure_context(),
                             **kw) as r:  # type: ignore[arg-type]
            return r.status, await r.read()


async def test_agents_on_a_standalone_engine_is_503_like_go(agent: AgentProcess) -> None:
    for path in ("/agents", "/v1/agents", "/v2/agents"):
        status, body = await _request(agent, "GET", path)
        assert status == 503, path
        assert "message" in json.loads(body)


async def test_versioned_docker_paths_keep_their_version(agent: AgentProcess) -> None:
    status, body = await _request(agent, "GET", "/v1.41/version")
    assert status == 200 and json.loads(body)["ApiVersion"]
    status, body = await _request(agent, "GET", "/v1.11/version")  # below the engine's minimum: adapted up
    assert status == 200 and json.loads(body)["MinAPIVersion"]
    status, _ = await _request(agent, "GET", "/v2/ping")
    assert status == 204


async def test_metrics_count_requests_by_route_and_status(agent: AgentProcess) -> None:
    await _request(agent, "GET", "/_ping")
    await _request(agent, "GET", "/containers/no-such/json")
    status, body = await _request(agent, "GET", "/metrics")
    text = body.decode()
    assert status == 200
    assert 'keelson_requests_total{method="GET",route="local",status="200"}' in text
    assert 'keelson_requests_total{method="GET",route="local",status="404"}' in text
    assert "keelson_request_duration_seconds_bucket" in text
    async with aiohttp.ClientSession() as s:
        async with s.get(agent.url + "/metrics", ssl=insecure_context()) as r:
            assert r.status == 403  # metrics are signed like the rest of the API


async def test_unknown_agent_endpoints_are_clear_errors(agent: AgentProcess) -> None:
    status, body = await _request(agent, "GET", "/kubernetes/api")
    assert status == 501 and "message" in json.loads(body)
    status, body = await _request(agent, "GET", "/websocket/shell")
    assert status == 404
    status, body = await _request(agent, "GET", "/websocket/exec?id=../../etc")
    assert status == 400 and "id" in json.loads(body)["message"]


async def test_websocket_exec_console_with_resize(agent: AgentProcess) -> None:
    agent.cli("run", "-d", "--name", "wsexec", "busybox:local", "sleep", "300")
    try:
        status, body = await _request(agent, "POST", "/containers/wsexec/exec", json={
            "AttachStdin": True, "AttachStdout": True, "AttachStderr": True, "Tty": True, "Cmd": ["sh"]})
        assert status == 201
        exec_id = json.loads(body)["Id"]
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f"{agent.url}/websocket/exec?id={exec_id}&endpointId=1",
                                    headers=agent.signer.headers(), ssl=insecure_context()) as ws:
                status, _ = await _request(agent, "POST", f"/exec/{exec_id}/resize?h=40&w=132")
                assert status in (200, 201)
                await ws.send_str("stty size; printf 'caf\\303\\251 \\342\\202\\254\\n'; exit\n")
                text = ""
                async for msg in ws:
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        break
                    text += msg.data
        assert "40 132" in text
        assert "café €" in text  # multi-byte characters survive intact
    finally:
        agent.cli("rm", "-f", "wsexec")


async def test_websocket_attach(agent: AgentProcess) -> None:
    agent.cli("run", "-dit", "--name", "wsattach", "busybox:local", "sh")
    try:
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f"{agent.url}/websocket/attach?id=wsattach",
                                    headers=agent.signer.headers(), ssl=insecure_context()) as ws:
                await ws.send_str("echo attached-$((6*7))\n")
                text = ""
                while "attached-42" not in text:
                    msg = await ws.receive(timeout=30)
                    assert msg.type is aiohttp.WSMsgType.TEXT
                    text += msg.data
    finally:
        agent.cli("rm", "-f", "wsattach")


async def test_websocket_for_a_missing_container_is_a_docker_error(agent: AgentProcess) -> None:
    status, body = await _request(agent, "GET", "/websocket/attach?id=nosuchcontainer")
    assert status == 404 and "No such container" in json.loads(body)["message"]


async def test_browse_through_the_agent_v1_and_v2(agent: AgentProcess) -> None:
    vol = "browse-through-agent"
    agent.cli("volume", "create", vol)
    try:
        form = aiohttp.FormData()
        form.add_field("Path", "/")
        form.add_field("file", b"hello volume", filename="hello.txt")
        status, _ = await _request(agent, "POST", f"/v2/browse/put?volumeID={vol}", data=form)
        assert status == 204
        status, body = await _request(agent, "GET", f"/browse/ls?volumeID={vol}&path=/")
        assert status == 200 and [e["Name"] for e in json.loads(body)] == ["hello.txt"]
        status, body = await _request(agent, "GET", f"/v1/browse/{vol}/get?path=/hello.txt")
        assert (status, body) == (200, b"hello volume")
        status, body = await _request(agent, "GET", f"/browse/get?volumeID={vol}&path=../../../etc/passwd")
        assert status in (400, 403) and "message" in json.loads(body)
    finally:
        agent.cli("volume", "rm", "-f", vol)


def test_docker_py_with_the_signature_headers(agent: AgentProcess) -> None:
    import docker

    client = docker.DockerClient(base_url=f"https://127.0.0.1:{agent.port}",
                                 tls=docker.tls.TLSConfig(verify=False), version="1.41")
    client.api.headers.update(agent.signer.headers())
    client.api.trust_env = False  # a REQUESTS_CA_BUNDLE in the environment would override verify=False
    try:
        out = client.containers.run("busybox:local", ["echo", "via docker-py"], remove=True)
        assert out == b"via docker-py\n"
        assert any("busybox:local" in (i.tags or []) for i in client.images.list())
    finally:
        client.close()
