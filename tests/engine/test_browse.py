"""Browse handlers against the private dockerd's real volumes (their Mountpoint is readable from here)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiodocker
import pytest
from aiohttp import FormData, web
from aiohttp.test_utils import TestClient

from agent.appkeys import DOCKER, HOST_ROOT_KEY
from browse.fsops import TEMP_PREFIX
from browse.handlers import handle_browse
from tools.dockerd import PrivateDockerd

pytestmark = pytest.mark.engine

Client = TestClient[Any, Any]


def build_app(engine: PrivateDockerd, host_root: str | None = None) -> web.Application:
    """What the agent's router will do: v2 reads `volumeID` from the query, v1 from the URL."""
    app = web.Application()
    app[DOCKER] = aiodocker.Docker(url=engine.host)
    if host_root is not None:
        app[HOST_ROOT_KEY] = host_root

    async def v2(request: web.Request) -> web.StreamResponse:
        return await handle_browse(request, request.match_info["op"], None)

    async def v1(request: web.Request) -> web.StreamResponse:
        return await handle_browse(request, request.match_info["op"], request.match_info["id"])

    async def close_docker(app: web.Application) -> None:
        await app[DOCKER].close()

    app.router.add_route("*", "/browse/{op}", v2)
    app.router.add_route("*", "/v1/browse/{id}/{op}", v1)
    app.on_cleanup.append(close_docker)
    return app


@pytest.fixture
def volume(engine: PrivateDockerd, run_id: str) -> Iterator[tuple[str, Path]]:
    """A fresh local volume and its Mountpoint; removed afterwards."""
    name = f"kls-{run_id}-{uuid.uuid4().hex[:8]}"
    engine.cli("volume", "create", name)
    mountpoint = engine.cli("volume", "inspect", "-f", "{{.Mountpoint}}", name).stdout.strip()
    try:
        yield name, Path(mountpoint)
    finally:
        engine.cli("volume", "rm", "-f", name, check=False)


@pytest.fixture
async def client(engine: PrivateDockerd, aiohttp_client: Callable[..., Any]) -> AsyncIterator[Client]:
    yield await aiohttp_client(build_app(engine))


def upload(name: str, data: bytes, path: str, file_first: bool = True) -> FormData:
    """Portainer's UI (ng-file-upload) sends `file` then `Path`; both orders must work."""
    form = FormData()
    if not file_first:
        form.add_field("Path", path)
    form.add_field("file", data, filename=name, content_type="application/octet-stream")
    if file_first:
        form.add_field("Path", path)
    return form


BOUNDARY = "keelsonboundary"


def raw_multipart(disposition_params: str, path: str) -> bytes:
    """A body FormData refuses to build (control characters in the file name)."""
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; {disposition_params}\r\n\r\n"
            f"x\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"Path\"\r\n\r\n{path}\r\n"
            f"--{BOUNDARY}--\r\n").encode()


async def expect_error(resp: Any, status: int) -> str:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert isinstance(body["message"], str) and body["message"]
    return str(body["message"]) + " " + str(body.get("details", ""))


def no_temp_left(root: Path) -> None:
    leftovers = [p for p in root.rglob(f"{TEMP_PREFIX}*")]
    assert leftovers == []


# --- the happy path, operation by operation ---------------------------------------------------------------

async def test_put_ls_get_rename_delete(client: Client, volume: tuple[str, Path]) -> None:
    name, mp = volume
    q = {"volumeID": name}

    resp = await client.post("/browse/put", params=q, data=upload("hello.txt", b"hello world", "/"))
    assert resp.status == 204, await resp.text()
    assert (mp / "hello.txt").read_bytes() == b"hello world"

    resp = await client.post("/browse/put", params=q, data=upload("n.bin", b"0123456789", "/sub/deep", False))
    assert resp.status == 204, await resp.text()
    assert (mp / "sub" / "deep" / "n.bin").read_bytes() == b"0123456789"  # Go's MkdirAll

    resp = await client.get("/browse/ls", params={**q, "path": "/"})
    assert resp.status == 200
    listing = await resp.json()
    assert [f["Name"] for f in listing] == ["hello.txt", "sub"]
    hello, sub = listing
    assert hello == {"Name": "hello.txt", "Size": 11, "Dir": False,
                     "ModTime": int((mp / "hello.txt").stat().st_mtime)}
    assert sub["Dir"] is True and isinstance(sub["ModTime"], int)

    resp = await client.get("/browse/ls", params={**q, "path": "sub/deep"})
    assert [f["Name"] for f in await resp.json()] == ["n.bin"]

    resp = await client.get("/browse/get", params={**q, "path": "/hello.txt"})
    assert resp.status == 200
    assert await resp.read() == b"hello world"
    assert resp.headers["Content-Disposition"].startswith('attachment; filename="hello.txt"')
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert resp.headers["Accept-Ranges"] == "bytes"

    resp = await client.get("/browse/get", params={**q, "path": "sub/deep/n.bin"},
                            headers={"Range": "bytes=2-5"})
    assert resp.status == 206
    assert await resp.read() == b"2345"
    assert resp.headers["Content-Range"] == "bytes 2-5/10"

    resp = await client.put("/browse/rename", params=q,
                            json={"CurrentFilePath": "/hello.txt", "NewFilePath": "/sub/renamed.txt"})
    assert resp.status == 204, await resp.text()
    assert not (mp / "hello.txt").exists()
    assert (mp / "sub" / "renamed.txt").read_bytes() == b"hello world"

    resp = await client.delete("/browse/delete", params={**q, "path": "/sub/renamed.txt"})
    assert resp.status == 204
    assert not (mp / "sub" / "renamed.txt").exists()

    resp = await client.delete("/browse/delete", params={**q, "path": "/sub"})  # a non-empty directory
    assert resp.status == 204, await resp.text()
    assert list(mp.iterdir()) == []
    no_temp_left(mp)


async def test_overwrite_truncates_and_keeps_owner_and_mode(client: Client, volume: tuple[str, Path]) -> None:
    name, mp = volume
    target = mp / "data.txt"
    target.write_bytes(b"a much longer original content")
    os.chown(target, 1234, 4321)
    target.chmod(0o640)
    for file_first in (True, False):
        resp = await client.post("/browse/put", params={"volumeID": name},
                                 data=upload("data.txt", b"short", "/", file_first))
        assert resp.status == 204, await resp.text()
        assert target.read_bytes() == b"short"
        st = target.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1234, 4321, 0o640)
    no_temp_left(mp)


async def test_large_upload_streams(client: Client, volume: tuple[str, Path]) -> None:
    name, mp = volume
    data = os.urandom(3 * 1024 * 1024 + 17)
    resp = await client.post("/browse/put", params={"volumeID": name}, data=upload("big", data, "/"))
    assert resp.status == 204
    assert (mp / "big").read_bytes() == data
    resp = await client.get("/browse/get", params={"volumeID": name, "path": "big"},
                            headers={"Range": "bytes=-100"})
    assert resp.status == 206 and await resp.read() == data[-100:]


async def test_v1_routes(client: Client, volume: tuple[str, Path]) -> None:
    name, mp = volume
    (mp / "f").write_text("v1")
    resp = await client.get(f"/v1/browse/{name}/ls")  # v1: path is optional, empty = the volume root
    assert [f["Name"] for f in await resp.json()] == ["f"]
    resp = await client.get(f"/v1/browse/{name}/get", params={"path": "f"})
    assert await resp.read() == b"v1"
    resp = await client.post(f"/v1/browse/{name}/put", data=upload("g", b"G", "/d"))
    assert resp.status == 204 and (mp / "d" / "g").read_bytes() == b"G"
    resp = await client.post(f"/v1/browse/{name}/put", data=upload("g", b"G", ""))  # v1 requires Path
    await expect_error(resp, 400)
    resp = await client.put(f"/v1/browse/{name}/rename", json={"CurrentFilePath": "f", "NewFilePath": "h"})
    assert resp.status == 204 and (mp / "h").exists()
    resp = await client.delete(f"/v1/browse/{name}/delete", params={"path": "h"})
    assert resp.status == 204 and not (mp / "h").exists()


async def test_symlinks_inside_the_volume(client: Client, volume: tuple[str, Path]) -> None:
    name, mp = volume
    (mp / "dir").mkdir()
    (mp / "dir" / "real").write_text("real")
    os.symlink("dir", mp / "dirlink")
    os.symlink("real", mp / "dir" / "filelink")
    os.symlink("/etc/passwd", mp / "out")
    q = {"volumeID": name}
    resp = await client.get("/browse/ls", params={**q, "path": "/dirlink"})
    assert sorted(f["Name"] for f in await resp.json()) == ["filelink", "real"]
    resp = await client.get("/browse/ls", params={**q, "path": "/"})
    entries = {f["Name"]: f for f in await resp.json()}
    assert entries["dirlink"]["Dir"] is False  # listed as itself (lstat), like Go's DirEntry.Info
    resp = await client.get("/browse/get", params={**q, "path": "/dirlink/filelink"})
    assert await resp.read() == b"real"
    # delete and rename act on a link itself, even one pointing outside (unlink/rename never follow it)
    resp = await client.put("/browse/rename", params=q, json={"CurrentFilePath": "out", "NewFilePath": "o2"})
    assert resp.status == 204 and os.readlink(mp / "o2") == "/etc/passwd"
    resp = await client.delete("/browse/delete", params={**q, "path": "o2"})
    assert resp.status == 204 and "o2" not in os.listdir(mp)
    resp = await client.delete("/browse/delete", params={**q, "path": "dirlink"})
    assert resp.status == 204 and sorted(os.listdir(mp / "dir")) == ["filelink", "real"]


# --- refusals -----------------------------------------------------------------------------------------------

async def test_forbidden_and_invalid_paths(client: Client, volume: tuple[str, Path], tmp_path: Path) -> None:
    name, mp = volume
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    os.symlink(str(outside), mp / "outdir")
    os.symlink(str(outside / "secret"), mp / "outfile")
    os.symlink("../../../../../../../../..", mp / "climb")
    q = {"volumeID": name}

    forbidden = [
        client.get("/browse/ls", params={**q, "path": "/outdir"}),
        client.get("/browse/ls", params={**q, "path": "/climb/etc"}),
        client.get("/browse/get", params={**q, "path": "/outfile"}),
        client.get("/browse/get", params={**q, "path": "/outdir/secret"}),
        client.get("/browse/get", params={**q, "path": "climb/etc/passwd"}),
        client.delete("/browse/delete", params={**q, "path": "/outdir/secret"}),
        client.delete("/browse/delete", params={**q, "path": "/"}),
        client.put("/browse/rename", params=q,
                   json={"CurrentFilePath": "/outdir/secret", "NewFilePath": "x"}),
        client.put("/browse/rename", params=q, json={"CurrentFilePath": "/", "NewFilePath": "/x"}),
        client.post("/browse/put", params=q, data=upload("f", b"x", "/outdir")),
        client.post("/browse/put", params=q, data=upload("f", b"x", "/outdir", False)),
        client.post("/browse/put", params=q, data=upload("outfile", b"x", "/")),
    ]
    for request in forbidden:
        resp = await request
        await expect_error(resp, 403)
    assert (outside / "secret").read_text() == "secret"
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]

    invalid = [
        client.get("/browse/ls", params={**q, "path": "../"}),
        client.get("/browse/ls", params={**q, "path": "/a/../.."}),
        client.get("/browse/get", params={**q, "path": "a\x00b"}),
        client.get("/browse/ls", params=q),  # v2: path is required
        client.delete("/browse/delete", params={**q, "path": ""}),
        client.put("/browse/rename", params=q, json={"CurrentFilePath": "../x", "NewFilePath": "y"}),
        client.put("/browse/rename", params=q, json={"CurrentFilePath": "x", "NewFilePath": ""}),
        client.put("/browse/rename", params=q, data=b"{not json"),
        client.put("/browse/rename", params=q, json=["CurrentFilePath"]),
        client.post("/browse/put", params=q, data=upload("f", b"x", "/../..")),
        client.post("/browse/put", params=q, data=upload("..", b"x", "/")),
        client.post("/browse/put", params=q, data=raw_multipart("filename*=utf-8''a%00b", "/"),
                    headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}),
        client.post("/browse/put", params=q, data={"Path": "/"}),  # no file part
        client.post("/browse/put", params=q, data=b"not multipart"),
    ]
    for request in invalid:
        resp = await request
        await expect_error(resp, 400)
    form = FormData()
    form.add_field("file", b"x", filename="f")  # v2: no Path field at all
    await expect_error(await client.post("/browse/put", params=q, data=form), 400)
    no_temp_left(mp)
    assert sorted(p.name for p in mp.iterdir()) == ["climb", "outdir", "outfile"]


async def test_upload_filename_keeps_its_last_element(client: Client, volume: tuple[str, Path]) -> None:
    """As Go's multipart FileName (filepath.Base): directories in the client's name are dropped."""
    name, mp = volume
    resp = await client.post("/browse/put", params={"volumeID": name},
                             data=raw_multipart('filename="../../etc/evil"', "/sub"),
                             headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert resp.status == 204
    assert (mp / "sub" / "evil").read_bytes() == b"x"


async def test_volume_errors(client: Client) -> None:
    msg = await expect_error(await client.get("/browse/ls", params={"volumeID": "nope-" + uuid.uuid4().hex,
                                                                    "path": "/"}), 404)
    assert "No such volume" in msg
    for bad in ("../containers", ".hidden", "a/b", ""):
        await expect_error(await client.get("/browse/ls", params={"volumeID": bad, "path": "/"}), 400)
    await expect_error(await client.get("/v1/browse/-x/ls"), 400)


async def test_not_found_and_wrong_kind(client: Client, volume: tuple[str, Path]) -> None:
    name, mp = volume
    q = {"volumeID": name}
    (mp / "dir").mkdir()
    (mp / "file").write_text("f")
    os.mkfifo(mp / "fifo")
    await expect_error(await client.get("/browse/ls", params={**q, "path": "/missing"}), 404)
    await expect_error(await client.get("/browse/get", params={**q, "path": "/missing"}), 404)
    await expect_error(await client.delete("/browse/delete", params={**q, "path": "/missing"}), 404)
    await expect_error(await client.get("/browse/ls", params={**q, "path": "/file"}), 400)
    await expect_error(await client.get("/browse/get", params={**q, "path": "/dir"}), 400)
    await expect_error(await client.get("/browse/get", params={**q, "path": "/fifo"}), 400)  # no hang
    await expect_error(await client.post("/browse/put", params=q, data=upload("dir", b"x", "/")), 400)
    await expect_error(await client.post("/browse/put", params=q, data=upload("x", b"x", "/file")), 400)


async def test_methods_and_unknown_operation(client: Client, volume: tuple[str, Path]) -> None:
    name, _ = volume
    resp = await client.post("/browse/ls", params={"volumeID": name, "path": "/"})
    await expect_error(resp, 405)
    assert resp.headers["Allow"] == "GET, HEAD"
    await expect_error(await client.get("/browse/delete", params={"volumeID": name, "path": "/x"}), 405)
    await expect_error(await client.get("/browse/chmod", params={"volumeID": name}), 404)


async def test_delete_does_not_cross_mount_points(client: Client, volume: tuple[str, Path]) -> None:
    name, mp = volume
    (mp / "d" / "m").mkdir(parents=True)
    mounted = await asyncio.to_thread(subprocess.run, ["mount", "-t", "tmpfs", "tmpfs", str(mp / "d" / "m")],
                                      check=False)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mp / "d" / "m" / "keep").write_text("k")
        resp = await client.delete("/browse/delete", params={"volumeID": name, "path": "/d"})
        await expect_error(resp, 403)
        assert (mp / "d" / "m" / "keep").exists()
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(mp / "d" / "m")], check=False)


# --- the host root (no volumeID) ----------------------------------------------------------------------------

async def test_host_root_mode(engine: PrivateDockerd, aiohttp_client: Callable[..., Any],
                              tmp_path: Path) -> None:
    host = tmp_path / "hostroot"
    (host / "etc").mkdir(parents=True)
    (host / "etc" / "hostname").write_text("myhost\n")
    (host / "usr" / "share" / "zoneinfo").mkdir(parents=True)
    (host / "usr" / "share" / "zoneinfo" / "UTC").write_text("TZif")
    os.symlink("/usr/share/zoneinfo/UTC", host / "etc" / "localtime")  # a host-absolute symlink
    client = await aiohttp_client(build_app(engine, host_root=str(host)))

    resp = await client.get("/browse/ls", params={"path": "/host"})
    assert sorted(f["Name"] for f in await resp.json()) == ["etc", "usr"]
    resp = await client.get("/browse/get", params={"path": "/host/etc/hostname"})
    assert await resp.read() == b"myhost\n"
    resp = await client.get("/browse/get", params={"path": "/host/etc/localtime"})
    assert resp.status == 200 and await resp.read() == b"TZif"  # resolved inside the host root

    resp = await client.post("/browse/put", data=upload("new.conf", b"n", "/host/etc"))
    assert resp.status == 204 and (host / "etc" / "new.conf").read_bytes() == b"n"
    resp = await client.put("/browse/rename", json={"CurrentFilePath": "/host/etc/new.conf",
                                                    "NewFilePath": "/host/etc/old.conf"})
    assert resp.status == 204 and (host / "etc" / "old.conf").exists()
    resp = await client.delete("/browse/delete", params={"path": "/host/etc/old.conf"})
    assert resp.status == 204 and not (host / "etc" / "old.conf").exists()
    no_temp_left(host)

    for path in ("/etc", "/", "/hostx/etc", "/proc/self/environ"):
        await expect_error(await client.get("/browse/ls", params={"path": path}), 403)
    await expect_error(await client.delete("/browse/delete", params={"path": "/host"}), 403)
    await expect_error(await client.put("/browse/rename", json={"CurrentFilePath": "/host/etc/hostname",
                                                                "NewFilePath": "/tmp/x"}), 403)
    await expect_error(await client.post("/browse/put", data=upload("x", b"x", "/tmp")), 403)
    await expect_error(await client.get("/browse/ls", params={"path": "/host/../etc"}), 400)
    assert (host / "etc" / "hostname").exists()
