"""The Portainer stand-in itself follows the server source (endpointedge_status_inspect.go and friends)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from edge.credentials import decrypt_credentials
from tests.edge.chisel_server import ChiselTestServer
from tests.edge.portainer_standin import PortainerStandin, fnv1a32, go_json

pytestmark = pytest.mark.edge

EDGE_ID = "edge-abc"
HEADERS = {"X-PortainerAgent-EdgeID": EDGE_ID, "Portainer-Agent-Platform": "1", "Portainer-Agent": "2.23.0"}


@pytest.fixture
async def portainer() -> AsyncIterator[PortainerStandin]:
    chisel = ChiselTestServer({})
    await chisel.start()
    server = PortainerStandin(chisel, checkin=7)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
        await chisel.stop()


async def get(server: PortainerStandin, path: str, headers: dict[str, str]) -> tuple[int, bytes, str]:
    async with aiohttp.ClientSession() as http, http.get(server.url + path, headers=headers) as resp:
        return resp.status, await resp.read(), resp.headers.get("ETag", "")


def test_fnv1a32_and_go_json() -> None:
    assert fnv1a32(b"") == 0x811C9DC5
    assert format(fnv1a32(b"a"), "x") == "e40c292c"  # the published FNV-1a 32 test vector
    assert go_json({"a": [], "b": "<&>"}) == b'{"a":[],"b":"\\u003c\\u0026\\u003e"}'


async def test_status_check_order(portainer: PortainerStandin) -> None:
    path = "/api/endpoints/1/edge/status"
    status, body, _ = await get(portainer, "/api/endpoints/x/edge/status", HEADERS)
    assert status == 400 and json.loads(body)["message"] == "Invalid environment identifier route variable"
    # Unknown environment: no heartbeat -> 403.
    status, body, _ = await get(portainer, path, HEADERS)
    assert status == 403 and "has not been trusted yet" in json.loads(body)["message"]
    portainer.add_endpoint(1, trusted=False)
    status, body, _ = await get(portainer, path, {"Portainer-Agent-Platform": "1"})
    assert status == 403 and "missing Edge identifier" in json.loads(body)["details"]
    status, body, _ = await get(portainer, path, HEADERS)
    assert status == 403 and "Untrusted Edge environment access" in json.loads(body)["details"]
    portainer.endpoints[1].trusted = True
    status, body, _ = await get(portainer, path, {"X-PortainerAgent-EdgeID": EDGE_ID})
    assert status == 400
    assert json.loads(body) == {"message": "agent platform header is not valid",
                                "details": "Edge polling error: agent platform header is missing. "
                                           "Environment name: edge-1"}
    status, _, _ = await get(portainer, path, {**HEADERS, "Portainer-Agent-Platform": "0"})
    assert status == 400
    # The first good check-in opens the tunnel (REQUIRED with credentials for this EdgeID).
    status, body, etag = await get(portainer, path, HEADERS)
    assert status == 200
    data = json.loads(body)
    assert list(data) == ["status", "port", "schedules", "checkin", "credentials", "stacks"]
    assert data["status"] == "REQUIRED" and 49152 <= data["port"] < 65535 and data["checkin"] == 7
    assert data["schedules"] == [] and data["stacks"] == []
    assert b" " not in body and not body.endswith(b"\n")
    assert etag == format(fnv1a32(body), "x")
    tunnel = portainer.tunnels[1]
    assert decrypt_credentials(data["credentials"], EDGE_ID) == (tunnel.user, tunnel.password)
    assert portainer.chisel is not None and portainer.chisel.users[tunnel.user][1] == f"^R:0.0.0.0:{tunnel.port}$"
    # A matching If-None-Match is answered 304 before any identity check; the EdgeID is now bound.
    status, body, etag2 = await get(portainer, path, {"If-None-Match": f"deadbeef,{etag}"})
    assert (status, body, etag2) == (304, b"", etag)
    status, _, _ = await get(portainer, path, {**HEADERS, "X-PortainerAgent-EdgeID": "someone-else"})
    assert status == 403
    # IDLE: port 0, credentials "" and a new ETag.
    portainer.set_status(1, "IDLE")
    status, body, etag3 = await get(portainer, path, {**HEADERS, "If-None-Match": etag})
    assert status == 200 and etag3 != etag
    assert json.loads(body) == {"status": "IDLE", "port": 0, "schedules": [], "checkin": 7, "credentials": "",
                                "stacks": []}


async def test_global_key_and_job_logs(portainer: PortainerStandin) -> None:
    portainer.add_endpoint(4, edge_id=EDGE_ID)
    async with aiohttp.ClientSession() as http:
        async with http.post(portainer.url + "/api/endpoints/global-key", data=b"{}") as resp:
            assert resp.status == 400 and (await resp.json())["message"] == "Invalid Edge ID"
        async with http.post(portainer.url + "/api/endpoints/global-key", data=b"{}",
                             headers={"X-PortainerAgent-EdgeID": "unknown"}) as resp:
            assert resp.status == 404
        async with http.post(portainer.url + "/api/endpoints/global-key", data=b"{}", headers=HEADERS) as resp:
            assert resp.status == 200 and await resp.read() == b'{"endpointID":4}'
        portainer.add_job(2, "* * * * *", b"echo hi", [4])
        portainer.request_logs(2, 4)
        url = portainer.url + "/api/endpoints/4/edge/jobs/2/logs"
        async with http.post(url, data=b'{"FileContent":"x"}') as resp:
            assert resp.status == 403
        async with http.post(portainer.url + "/api/endpoints/5/edge/jobs/2/logs", data=b"{}") as resp:
            assert resp.status == 404
        async with http.post(url, data=b"nope", headers=HEADERS) as resp:
            assert resp.status == 400
        async with http.post(url, data=b'{"FileContent":"hello\\n"}', headers=HEADERS) as resp:
            assert resp.status == 200 and await resp.read() == b"null"
    assert portainer.logs_for(2, 4) == ["hello\n"]
    assert not portainer.jobs[2].endpoints[4].collect_logs


async def test_stack_endpoints_follow_ce(portainer: PortainerStandin) -> None:
    portainer.add_endpoint(4, edge_id=EDGE_ID)
    portainer.add_stack(9, "web", "services: {}\n", [4], env_file="A=1\n")
    # The poll answer lists the related stack with its version, nothing else.
    status, body, _ = await get(portainer, "/api/endpoints/4/edge/status", HEADERS)
    assert status == 200 and json.loads(body)["stacks"] == [{"ID": 9, "Version": 1}]

    path = "/api/endpoints/4/edge/stacks/9?version=1"
    assert (await get(portainer, "/api/endpoints/x/edge/stacks/9", HEADERS))[0] == 400
    assert (await get(portainer, "/api/endpoints/5/edge/stacks/9", HEADERS))[0] == 404
    assert (await get(portainer, path, {"X-PortainerAgent-EdgeID": "other"}))[0] == 403
    assert (await get(portainer, "/api/endpoints/4/edge/stacks/x", HEADERS))[0] == 400
    assert (await get(portainer, "/api/endpoints/4/edge/stacks/10", HEADERS))[0] == 404
    status, body, _ = await get(portainer, path, HEADERS)
    data = json.loads(body)
    assert status == 200 and list(data)[:4] == ["ID", "Name", "StackFileContent", "DirEntries"]
    assert data["StackFileContent"] == "", "agents from 2.19.0 on get the files in DirEntries only"
    assert [e["Name"] for e in data["DirEntries"]] == ["docker-compose.yml", ".env"]
    assert {e["Permissions"] for e in data["DirEntries"]} == {384}

    async def put(stack: str, payload: object, edge_id: str = EDGE_ID) -> tuple[int, bytes]:
        async with aiohttp.ClientSession() as http, http.put(
                f"{portainer.url}/api/edge_stacks/{stack}/status", json=payload,
                headers={"X-PortainerAgent-EdgeID": edge_id}) as resp:
            return resp.status, await resp.read()

    assert (await put("x", {"Status": 3, "EndpointID": 4}))[0] == 400
    assert (await put("9", {"EndpointID": 4}))[0] == 400
    assert (await put("9", {"Status": 3, "EndpointID": 0}))[0] == 400
    assert (await put("9", {"Status": 2, "EndpointID": 4, "Error": ""}))[0] == 400
    assert await put("77", {"Status": 3, "EndpointID": 4}) == (200, b"null")
    assert (await put("9", {"Status": 3, "EndpointID": 5}))[0] == 404
    assert (await put("9", {"Status": 3, "EndpointID": 4}, "other"))[0] == 403
    assert (await put("9", {"Status": 3, "EndpointID": 4, "Time": 0}))[0] == 200
    assert portainer.stacks[9].status[4][0]["Time"] > 0
    portainer.update_stack(9, "services: {x: {image: y}}\n")
    assert portainer.stacks[9].version == 2 and portainer.stacks[9].status == {4: []}
    assert (await put("9", {"Status": 4, "EndpointID": 4}))[0] == 200
    assert 4 not in portainer.stacks[9].status
    assert portainer.reports(9, 4) == [3, 4]
