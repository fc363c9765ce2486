"""Portainer's own calls to an agent, replayed: the server's environment snapshot and the web UI's main views.

Portainer cannot run here, so this is its side of the wire written from the public source of
portainer/portainer 2.23, file by file (cited on each step). Each step asserts what Portainer parses: status
codes, the fields it reads, node names, headers. The sequences take the API version as a parameter:

- the web UI pins every Docker call at `/v1.41` (app/portainer/services/dockerMaxApiVersionInterceptor.ts)
  and puts agent routes behind the same prefix (`/v1.41/v2/agents`, `/v1.41/v2/browse/ls`, ...);
- the server's Docker client negotiates with the entry node's `/_ping` (api/docker/client/client.go,
  `client.WithAPIVersionNegotiation()`), so it speaks up to the newest version it knows (1.45 and later),
  which may be newer than what another node of a mixed Swarm supports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from multidict import CIMultiDict

from tools.agentproc import insecure_context
from tools.signer import Signer

TARGET = "X-PortainerAgent-Target"
AGENT_HEADERS = ("Portainer-Agent", "Portainer-Agent-API-Version", "Portainer-Agent-Platform")


@dataclass
class Reply:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Portainer:
    """Portainer's side: the signature headers of api/docker/client/client.go (createAgentClient) on every call,
    the target header when a call names a node, and the agent's base URL."""

    base_url: str
    signer: Signer
    session: aiohttp.ClientSession
    calls: list[str] = field(default_factory=list)

    async def call(self, method: str, path: str, version: str | None, target: str | None = None,
                   json_body: Any = None, data: Any = None, headers: dict[str, str] | None = None) -> Reply:
        url_path = (f"/v{version}" if version else "") + path
        hdrs = {**self.signer.headers(), **(headers or {})}
        if target:
            hdrs[TARGET] = target
        self.calls.append(f"{method} {url_path}" + (f" [{target}]" if target else ""))
        async with self.session.request(method, self.base_url + url_path, headers=hdrs, json=json_body,
                                        data=data, ssl=insecure_context()) as resp:
            reply = Reply(resp.status, CIMultiDict(resp.headers), await resp.read())
        assert all(h in reply.headers for h in AGENT_HEADERS), (url_path, dict(reply.headers))
        return reply


def _ok(reply: Reply, what: str, status: int = 200) -> Any:
    assert reply.status == status, f"{what}: {reply.status} {reply.body[:300]!r}"
    return reply.json() if reply.body else None


@dataclass
class Cluster:
    """What the replay knows of the cluster behind the entry agent: node names and each node's containers."""

    entry: str
    nodes: list[str]
    swarm: bool
    containers: dict[str, str]
    """Name of a running container -> the node it runs on (made by the test, directly on each engine)."""


async def server_snapshot(p: Portainer, version: str, cluster: Cluster) -> dict[str, Any]:
    """pkg/snapshot/docker.go CreateDockerSnapshot, in its order: ping, info, (Swarm: services, nodes),
    containers with an inspect of each running one (no target), images, volumes, networks, version."""
    # The Go client pings `/_ping` unversioned, HEAD first (client/ping.go), and reads API-Version from it
    ping = await p.call("HEAD", "/_ping", None)
    assert ping.status == 200 and ping.headers.get("Api-Version"), ping
    info = _ok(await p.call("GET", "/info", version), "info")
    # dockerSnapshotInfo reads these; Swarm = Swarm.ControlAvailable (the manager answers /info in a Swarm)
    assert info["Swarm"]["ControlAvailable"] is cluster.swarm
    assert info["ServerVersion"] and info["NCPU"] > 0 and info["MemTotal"] > 0
    if cluster.swarm:
        services = _ok(await p.call("GET", "/services", version), "services")
        assert isinstance(services, list)
        nodes = _ok(await p.call("GET", "/nodes", version), "nodes")
        assert sorted(n["Description"]["Hostname"] for n in nodes) == sorted(cluster.nodes)
        assert all("NanoCPUs" in n["Description"]["Resources"] for n in nodes)
    containers = _ok(await p.call("GET", "/containers/json?all=1", version), "containers")
    by_name = {c["Names"][0].lstrip("/"): c for c in containers}
    for name, node in cluster.containers.items():
        assert name in by_name, f"{name} missing from the listing"
        item = by_name[name]
        assert item["State"] == "running" and isinstance(item["Labels"], dict)
        if cluster.swarm:
            assert item["Portainer"]["Agent"]["NodeName"] == node
    for name, node in cluster.containers.items():
        # dockerSnapshotContainers inspects every running container without a target; in a Swarm a
        # container of another node fails, and Portainer tolerates only the engine's "No such container"
        reply = await p.call("GET", f"/containers/{by_name[name]['Id']}/json", version)
        if node == cluster.entry:
            inspect = _ok(reply, f"inspect {name}")
            assert "Env" in inspect["Config"] and isinstance(inspect["HostConfig"], dict)
        else:
            assert reply.status == 404 and "No such container" in reply.json()["message"], reply
    images = _ok(await p.call("GET", "/images/json", version), "images")
    assert images and all("Id" in i and "RepoTags" in i for i in images)
    if cluster.swarm:
        # NodeNameTransport (api/docker/client/client.go) maps image IDs to Portainer.Agent.NodeName
        assert {i["Portainer"]["Agent"]["NodeName"] for i in images} == set(cluster.nodes)
    volumes = _ok(await p.call("GET", "/volumes", version), "volumes")
    assert isinstance(volumes["Volumes"], list)
    networks = _ok(await p.call("GET", "/networks", version), "networks")
    assert {"Name", "Id", "Driver"} <= set(networks[0])
    if cluster.swarm:
        assert {n["Portainer"]["Agent"]["NodeName"] for n in networks} == set(cluster.nodes)
    version_body = _ok(await p.call("GET", "/version", version), "version")
    assert version_body["ApiVersion"] and version_body["Version"] and "Components" in version_body
    return {"info": info, "containers": containers, "images": images}


UI = "1.41"
"""app/portainer/services/dockerMaxApiVersion.ts: the web UI's pinned Docker API version."""


async def ui_views(p: Portainer, cluster: Cluster, volume: str, version: str = UI) -> None:
    """The web UI's main views, as their services call the agent (through Portainer's proxy, which keeps
    the path and adds the signature). The target header comes from the node the UI shows for the item
    (app/portainer/services/httpRequestHelper.js, setPortainerAgentTargetHeader)."""
    # Agent detection and the cluster view: app/agent/rest/ping.js, app/agent/rest/agent.js (`v2/agents`)
    ping = await p.call("GET", "/ping", version)
    assert ping.status == 204 and ping.headers["Portainer-Agent-API-Version"] == "2"
    agents = await p.call("GET", "/v2/agents", version)
    if cluster.swarm:
        members = _ok(agents, "agents")
        assert sorted(a["NodeName"] for a in members) == sorted(cluster.nodes)
        assert all(a["NodeRole"] in ("manager", "worker") and a["Port"] for a in members)
    else:
        assert agents.status == 503 and agents.json()["message"].startswith("Agent management is not available")
    # Containers list: app/react/docker/containers/queries/useContainers.ts (`containers/json?all=1&filters=`)
    listing = _ok(await p.call("GET", '/containers/json?all=1&filters={"status":["running"]}', version), "list")
    names = {c["Names"][0].lstrip("/"): c for c in listing}
    for name, node in cluster.containers.items():
        ident = names[name]["Id"]
        target = names[name].get("Portainer", {}).get("Agent", {}).get("NodeName") if cluster.swarm else None
        assert target == (node if cluster.swarm else None)
        # A container's page: inspect (useContainerInspect.ts), logs and stats (app/docker/rest/container.js)
        inspect = _ok(await p.call("GET", f"/containers/{ident}/json", version, target), "inspect")
        assert inspect["Id"] == ident and inspect["State"]["Running"] is True
        logs = await p.call("GET", f"/containers/{ident}/logs?since=0&stderr=1&stdout=1&tail=100&timestamps=0",
                            version, target)
        assert logs.status == 200 and f"hello from {name}".encode() in logs.body
        stats = _ok(await p.call("GET", f"/containers/{ident}/stats?stream=false", version, target), "stats")
        assert "memory_stats" in stats and "cpu_stats" in stats
        # Console: exec create (app/docker/rest/container.js `exec`), then the agent's WebSocket with the
        # exec id (the server's api/http/handler/websocket/exec.go forwards to `/websocket/exec` on the agent,
        # with the target header), then a resize (app/docker/rest/exec.js)
        created = _ok(await p.call("POST", f"/containers/{ident}/exec", version, target, json_body={
            "AttachStdin": True, "AttachStdout": True, "AttachStderr": True, "Tty": True, "Cmd": ["sh"]}),
            "exec", status=201)
        await console(p, created["Id"], target, name)
    # Images: app/react/docker/images/queries/useImages.ts (`images/json?all=0`)
    images = _ok(await p.call("GET", "/images/json?all=0", version), "images")
    assert any("busybox:local" in (i["RepoTags"] or []) for i in images)
    # Volumes and browsing: app/docker/rest/volume.js; app/agent/rest/browse.js (v2 form, volumeID + path)
    volumes = _ok(await p.call("GET", "/volumes", version), "volumes")["Volumes"]
    listed = [v for v in volumes if v["Name"] == volume]
    assert listed, f"{volume} missing"
    vol_node = listed[0].get("Portainer", {}).get("Agent", {}).get("NodeName") if cluster.swarm else None
    form = aiohttp.FormData()
    form.add_field("Path", "/")
    form.add_field("file", b"replayed", filename="replay.txt")
    put = await p.call("POST", f"/v2/browse/put?volumeID={volume}", version, vol_node, data=form)
    assert put.status == 204, put
    ls = _ok(await p.call("GET", f"/v2/browse/ls?volumeID={volume}&path=/", version, vol_node), "browse ls")
    assert [e["Name"] for e in ls] == ["replay.txt"] and {"Name", "Size", "Dir", "ModTime"} <= set(ls[0])
    got = await p.call("GET", f"/v2/browse/get?volumeID={volume}&path=/replay.txt", version, vol_node)
    assert got.status == 200 and got.body == b"replayed"
    if cluster.swarm:
        # Services and tasks: app/docker/rest/service.js, task.js (manager operations, from any node)
        services = _ok(await p.call("GET", "/services", version), "services")
        assert isinstance(services, list)
        tasks = _ok(await p.call("GET", '/tasks?filters={"desired-state":["running"]}', version), "tasks")
        assert isinstance(tasks, list)
    # Docker Hub rate limits: app/react/docker/... `docker/v2/dockerhub/{registryId}`; Portainer's server
    # (api/http/proxy/factory/docker/transport.go, proxyAgentRequest) turns it into a POST with the
    # credentials and drops the registry id: POST /v1.41/v2/dockerhub
    hub = _ok(await p.call("POST", "/v2/dockerhub", version, json_body={
        "authentication": False, "username": "", "password": ""}), "dockerhub")
    assert hub == {"remaining": 76, "limit": 100}


async def console(p: Portainer, exec_id: str, target: str | None, name: str) -> None:
    headers = {**p.signer.headers(), **({TARGET: target} if target else {})}
    url = f"{p.base_url}/v{UI}/websocket/exec?id={exec_id}&endpointId=1" + (f"&nodeName={target}" if target else "")
    async with p.session.ws_connect(url, headers=headers, ssl=insecure_context()) as ws:
        resize = await p.call("POST", f"/exec/{exec_id}/resize?h=30&w=100", UI, target)
        assert resize.status in (200, 201), resize
        await ws.send_str("stty size; echo console-$((6*7)); exit\n")
        text = ""
        while "console-42" not in text or "30 100" not in text:
            msg = await ws.receive(timeout=30)
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            text += msg.data
        assert "console-42" in text and "30 100" in text, f"console of {name}: {text!r}"
