"""GET /host/info on a fake host root and on the real one; POST /v2/dockerhub against a loopback stand-in."""

from __future__ import annotations

import base64
import gzip
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from agent.api.dockerhub import DOCKERHUB_AUTH_URL, DOCKERHUB_REGISTRY_URL, dockerhub_status
from agent.api.host import host_info
from agent.appkeys import HOST_ROOT_KEY
from tests.hub_standin import HubStandIn

Client = TestClient[Any, Any]

PCI_IDS = """\
# a comment
8086  Intel Corporation
\t1237  440FX - 82441FX PMC [Natoma]
\t\t1af4 1100  Qemu virtual machine
\t7010  82371SB PIIX3 IDE [Natoma/Triton II]
1af4  Red Hat, Inc.
\t1000  Virtio network device
C 06  Bridge
\t00  Host bridge
"""


def modalias(vendor: str, device: str) -> str:
    return f"pci:v0000{vendor}d0000{device}sv00001AF4sd00001100bc06sc00i00\n"


def fake_host(root: Path, pci_ids: str | None = PCI_IDS, gz: bool = False) -> Path:
    """A few sysfs-like files: three PCI functions (one unparsable), two disks and a loop device."""
    devices = root / "sys" / "bus" / "pci" / "devices"
    functions = [
        ("0000:00:00.0", modalias("8086", "1237")), ("0000:00:03.0", modalias("1AF4", "1000")),
        ("0000:00:05.0", modalias("8086", "ABCD")), ("0000:00:06.0", modalias("ABCD", "0001")),
        ("0000:00:07.0", "garbage\n"),
    ]
    for addr, alias in functions:
        (devices / addr).mkdir(parents=True)
        (devices / addr / "modalias").write_text(alias)
    block = root / "sys" / "block"
    (block / "sda" / "device").mkdir(parents=True)
    (block / "sda" / "size").write_text("2048\n")
    (block / "sda" / "device" / "vendor").write_text("ATA     \n")
    (block / "nvme0n1").mkdir()
    (block / "nvme0n1" / "size").write_text("1000215216\n")
    (block / "loop0").mkdir()
    (block / "loop0" / "size").write_text("8\n")
    if pci_ids is not None:
        misc = root / "usr" / "share" / "misc"
        misc.mkdir(parents=True)
        if gz:
            (misc / "pci.ids.gz").write_bytes(gzip.compress(pci_ids.encode()))
        else:
            (misc / "pci.ids").write_text(pci_ids)
    return root


async def host_client(aiohttp_client: Callable[..., Any], root: str) -> Client:
    app = web.Application()
    app[HOST_ROOT_KEY] = root
    app.router.add_get("/host/info", host_info)
    client: Client = await aiohttp_client(app)
    return client


@pytest.mark.parametrize("gz", [False, True])
async def test_host_info_fake_root(aiohttp_client: Callable[..., Any], tmp_path: Path, gz: bool) -> None:
    client = await host_client(aiohttp_client, str(fake_host(tmp_path, gz=gz)))
    resp = await client.get("/host/info")
    assert resp.status == 200
    assert await resp.json() == {
        "PCIDevices": [
            {"Vendor": "Intel Corporation", "Name": "440FX - 82441FX PMC [Natoma]"},
            {"Vendor": "Red Hat, Inc.", "Name": "Virtio network device"},
            {"Vendor": "Intel Corporation", "Name": "unknown"},
            {"Vendor": "unknown", "Name": "unknown"},
        ],
        "PhysicalDisks": [
            {"Vendor": "unknown", "Size": 1000215216 * 512},
            {"Vendor": "ATA", "Size": 2048 * 512},
        ],
    }


async def test_host_info_without_pci_ids_uses_hex(aiohttp_client: Callable[..., Any], tmp_path: Path) -> None:
    client = await host_client(aiohttp_client, str(fake_host(tmp_path, pci_ids=None)))
    body = await (await client.get("/host/info")).json()
    assert body["PCIDevices"][:2] == [{"Vendor": "8086", "Name": "1237"}, {"Vendor": "1af4", "Name": "1000"}]


async def test_host_info_empty_root(aiohttp_client: Callable[..., Any], tmp_path: Path) -> None:
    client = await host_client(aiohttp_client, str(tmp_path))
    assert await (await client.get("/host/info")).json() == {"PCIDevices": [], "PhysicalDisks": None}


async def test_host_info_real_root(aiohttp_client: Callable[..., Any]) -> None:
    client = await host_client(aiohttp_client, "/")
    resp = await client.get("/host/info")
    assert resp.status == 200
    body = await resp.json()
    try:
        expected_disks = sorted(n for n in os.listdir("/sys/block") if not n.startswith("loop"))
    except OSError:
        expected_disks = []
    assert len(body["PhysicalDisks"] or []) == len(expected_disks)
    for disk in body["PhysicalDisks"] or []:
        assert isinstance(disk["Vendor"], str) and isinstance(disk["Size"], int) and disk["Size"] >= 0
    assert isinstance(body["PCIDevices"], list)
    for dev in body["PCIDevices"]:
        assert set(dev) == {"Vendor", "Name"} and all(isinstance(v, str) and v for v in dev.values())


# --- Docker Hub rate limits ---------------------------------------------------------------------------------

@pytest.fixture
async def hub(aiohttp_server: Callable[..., Any], aiohttp_client: Callable[..., Any],
              monkeypatch: pytest.MonkeyPatch) -> tuple[HubStandIn, Client]:
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    stand_in = HubStandIn()
    server: TestServer = await aiohttp_server(stand_in.app)
    base = str(server.make_url("")).rstrip("/")
    app = web.Application()
    app[DOCKERHUB_AUTH_URL] = base
    app[DOCKERHUB_REGISTRY_URL] = base
    app.router.add_post("/v2/dockerhub", dockerhub_status)
    return stand_in, await aiohttp_client(app)


async def test_dockerhub_anonymous(hub: tuple[HubStandIn, Client]) -> None:
    stand_in, client = hub
    resp = await client.post("/v2/dockerhub", json={"authentication": False, "username": "", "password": ""})
    assert resp.status == 200
    assert await resp.json() == {"remaining": 76, "limit": 100}
    assert stand_in.seen_auth == [None] and stand_in.seen_bearer == ["Bearer tok-123"]


async def test_dockerhub_authenticated(hub: tuple[HubStandIn, Client]) -> None:
    stand_in, client = hub
    resp = await client.post("/v2/dockerhub",
                             json={"authentication": True, "username": "u", "password": "p:w"})
    assert await resp.json() == {"remaining": 76, "limit": 100}
    assert stand_in.seen_auth == ["Basic " + base64.b64encode(b"u:p:w").decode()]


async def test_dockerhub_without_headers_is_null(hub: tuple[HubStandIn, Client]) -> None:
    stand_in, client = hub
    stand_in.limit_headers = {}
    resp = await client.post("/v2/dockerhub", json={"authentication": False})
    assert resp.status == 200 and await resp.text() == "null"
    stand_in.limit_headers = {"RateLimit-Limit": "100", "RateLimit-Remaining": "many"}
    assert await (await client.post("/v2/dockerhub", json={})).json() is None


async def test_dockerhub_upstream_failures(hub: tuple[HubStandIn, Client]) -> None:
    stand_in, client = hub
    stand_in.token_status = 401
    resp = await client.post("/v2/dockerhub",
                             json={"authentication": True, "username": "u", "password": "bad"})
    assert resp.status == 500
    assert (await resp.json())["message"] == "Unable to retrieve DockerHub token from DockerHub"
    stand_in.token_status = 200
    stand_in.limits_status = 429
    resp = await client.post("/v2/dockerhub", json={"authentication": False})
    assert resp.status == 500
    assert (await resp.json())["message"] == "Unable to retrieve DockerHub rate limits from DockerHub"


@pytest.mark.parametrize("body", [
    b"", b"{", b"[]", b'{"authentication": "yes"}', b'{"authentication": true, "username": "u"}',
    b'{"authentication": true, "password": "p"}', b'{"username": 5}',
])
async def test_dockerhub_bad_payload(hub: tuple[HubStandIn, Client], body: bytes) -> None:
    stand_in, client = hub
    resp = await client.post("/v2/dockerhub", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert (await resp.json())["message"] == "Invalid request payload"
    assert stand_in.seen_auth == []


async def test_dockerhub_unreachable(aiohttp_client: Callable[..., Any], unused_tcp_port: int) -> None:
    app = web.Application()
    app[DOCKERHUB_AUTH_URL] = f"http://127.0.0.1:{unused_tcp_port}"
    app[DOCKERHUB_REGISTRY_URL] = f"http://127.0.0.1:{unused_tcp_port}"
    app.router.add_post("/v2/dockerhub", dockerhub_status)
    client = await aiohttp_client(app)
    resp = await client.post("/v2/dockerhub", json={"authentication": False})
    assert resp.status == 500
