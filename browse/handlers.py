"""Volume and host file browser: the Go agent's /browse/{ls,get,delete,rename,put} (v2) and
/v1/browse/{volumeID}/... (v1), with every path confined to its root (see browse/paths.py).

Roots: with a volume ID, the volume's `Mountpoint` as the engine reports it (Go hard-codes
/var/lib/docker/volumes/<id>/_data); without one, the host root (`HOST_ROOT_KEY`, the host's `/` mounted in
the agent's container), which Portainer's host browser addresses as `/host/...`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import mimetypes
import os
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import quote

import aiohttp
from aiodocker.exceptions import DockerError
from aiodocker.volumes import DockerVolume
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.multipart import BodyPartReader

from agent.appkeys import DEFAULT_HOST_ROOT, DOCKER, HOST_ROOT_KEY
from agent.bodylimit import BodyTooLarge, read_bounded, too_large
from agent.errors import Code, json_error
from browse import fsops
from browse.paths import (
    PathError,
    PathForbidden,
    PathInvalid,
    Resolved,
    host_relative,
    resolve,
    split_user_path,
    validate_volume_name,
)

"""Where the host's `/` is visible to the agent (default `/host`, as the Go agent's HostRoot); `/` when the
agent runs on the host itself."""

UPLOAD_CHUNK = 256 * 1024
MAX_FIELD = 64 * 1024
"""Largest `Path` form value read into memory."""

_METHODS: dict[str, tuple[str, ...]] = {
    "ls": ("GET", "HEAD"),
    "get": ("GET", "HEAD"),
    "delete": ("DELETE",),
    "rename": ("PUT",),
    "put": ("POST",),
}
_FAILURE_MESSAGES = {  # the Go agent's messages for the same failures
    "ls": "Unable to list files inside specified directory",
    "get": "Unable to open file",
    "delete": "Unable to remove file",
    "rename": "Unable to rename file",
    "put": "Error saving file to disk",
}
_ERRNO_STATUS: dict[int, tuple[int, Code]] = {
    errno.ENOENT: (404, Code.BROWSE_NOT_FOUND),
    errno.ENOTDIR: (400, Code.BROWSE_BAD_REQUEST),
    errno.EISDIR: (400, Code.BROWSE_BAD_REQUEST),
    errno.EINVAL: (400, Code.BROWSE_BAD_REQUEST),
    errno.ENAMETOOLONG: (400, Code.BROWSE_BAD_REQUEST),
    errno.EXDEV: (400, Code.BROWSE_BAD_REQUEST),
    errno.ELOOP: (400, Code.BROWSE_BAD_REQUEST),
    errno.EEXIST: (409, Code.BROWSE_IO_ERROR),
    errno.ENOTEMPTY: (409, Code.BROWSE_IO_ERROR),
    errno.EBUSY: (409, Code.BROWSE_IO_ERROR),
    errno.EACCES: (403, Code.BROWSE_IO_ERROR),
    errno.EPERM: (403, Code.BROWSE_IO_ERROR),
    errno.EROFS: (403, Code.BROWSE_IO_ERROR),
}


class _Reply(Exception):
    """Short-circuit with a ready error response."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def _bad_request(message: str, details: str | None = None) -> _Reply:
    return _Reply(json_error(400, message, Code.BROWSE_BAD_REQUEST, details=details))


@dataclass(frozen=True)
class _Target:
    """Where a request's paths live: a volume's mountpoint, or the host root."""

    root: str
    volume: str | None

    def resolve(self, path: str, *, follow_last: bool = True) -> Resolved:
        if self.volume is None:
            return resolve(self.root, host_relative(path), follow_last=follow_last, links_in_root=True)
        return resolve(self.root, path, follow_last=follow_last)

    async def resolve_async(self, path: str, *, follow_last: bool = True) -> Resolved:
        """resolve() lstat()s every component: keep that off the event loop (volumes may be on NFS)."""
        return await asyncio.to_thread(partial(self.resolve, path, follow_last=follow_last))

    @property
    def spool_in_root(self) -> bool:
        """A volume is one filesystem: spooling there makes the final rename cheap. The host root is not."""
        return self.volume is not None


async def handle_browse(request: web.Request, op: str, volume_id: str | None) -> web.StreamResponse:
    """Serve one browse operation; `volume_id` comes from the v1 URL, None for v2 (query `volumeID`)."""
    methods = _METHODS.get(op)
    if methods is None:
        return json_error(404, f"Unknown browse operation: {op}", Code.BROWSE_NOT_FOUND)
    if request.method not in methods:
        return json_error(405, f"Method {request.method} not allowed on browse/{op}", Code.BROWSE_BAD_REQUEST,
                          headers={"Allow": ", ".join(methods)})
    v1 = volume_id is not None
    try:
        target = await _target(request, volume_id)
        return await _OPS[op](request, target, v1)
    except _Reply as reply:
        return reply.response
    except PathError as exc:
        code = Code.BROWSE_FORBIDDEN_PATH if isinstance(exc, PathForbidden) else Code.BROWSE_BAD_REQUEST
        message = "Forbidden path" if isinstance(exc, PathForbidden) else "Invalid path"
        return json_error(exc.status, message, code, details=str(exc), op=op)
    except OSError as exc:
        status, code = _ERRNO_STATUS.get(exc.errno or 0, (500, Code.BROWSE_IO_ERROR))
        return json_error(status, _FAILURE_MESSAGES[op], code, details=exc.strerror or str(exc), op=op)


async def _target(request: web.Request, volume_id: str | None) -> _Target:
    if volume_id is None:
        volume_id = request.query.get("volumeID")
        if volume_id is None:
            return _Target(request.app.get(HOST_ROOT_KEY, DEFAULT_HOST_ROOT), None)
        # Go treats `volumeID=` as "no volume" (the host root), but Portainer sees the parameter and checks
        # volume access only: an empty value must not turn a volume request into a host one.
    try:
        validate_volume_name(volume_id)
    except PathInvalid as exc:
        raise _bad_request("Invalid volume", str(exc)) from None
    return _Target(await _volume_mountpoint(request, volume_id), volume_id)


async def _volume_mountpoint(request: web.Request, name: str) -> str:
    """The engine's own answer (GET /volumes/{name}): right for any data-root, 404 for unknown volumes."""
    try:
        info = await DockerVolume(request.app[DOCKER], name).show()
    except DockerError as exc:
        if exc.status == 404:
            raise _Reply(json_error(404, f"No such volume: {name}", Code.BROWSE_NOT_FOUND,
                                    details=exc.message)) from None
        raise _Reply(json_error(502, "Unable to inspect the volume", Code.PROXY_DOCKER_UNREACHABLE,
                                details=exc.message, volume=name)) from None
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise _Reply(json_error(502, "Unable to reach the Docker engine", Code.PROXY_DOCKER_UNREACHABLE,
                                details=str(exc), volume=name)) from None
    mountpoint = info.get("Mountpoint") if isinstance(info, dict) else None
    if not isinstance(mountpoint, str) or not mountpoint.startswith("/"):
        raise _bad_request("Volume has no local mountpoint", name)
    return mountpoint


def _path_param(request: web.Request, v1: bool) -> str:
    """Go: `path` is required (non-empty) in v2 and optional in v1 (empty = the volume root)."""
    path = request.query.get("path", "")
    if not path and not v1:
        raise _bad_request("Invalid query parameter: path", "missing query parameter: path")
    return path


async def _ls(request: web.Request, target: _Target, v1: bool) -> web.StreamResponse:
    res = await target.resolve_async(_path_param(request, v1))
    files = await asyncio.to_thread(fsops.list_dir, res)
    return web.json_response(files)


async def _get(request: web.Request, target: _Target, v1: bool) -> web.StreamResponse:
    res = await target.resolve_async(_path_param(request, v1))
    fd, _ = await asyncio.to_thread(fsops.open_regular_file, res)
    name = res.rel[-1]
    return _DescriptorFileResponse(fd, headers={
        "Content-Type": mimetypes.guess_type(name)[0] or "application/octet-stream",
        "Content-Disposition": _attachment(name),
    })


class _DescriptorFileResponse(web.FileResponse):
    """FileResponse (Range, conditional requests) on the descriptor we opened and checked.

    /proc/self/fd/N re-opens that very file, so neither a symlink swapped in meanwhile nor FileResponse's
    `<name>.gz` sibling lookup can make it serve another one. The descriptor is closed once sent, or when
    the response is dropped unsent.
    """

    def __init__(self, fd: int, headers: dict[str, str]) -> None:
        super().__init__(f"/proc/self/fd/{fd}", headers=headers)
        self._close_fd = weakref.finalize(self, os.close, fd)

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        try:
            return await super().prepare(request)
        finally:
            self._close_fd()


def _attachment(name: str) -> str:
    """RFC 6266: an ASCII fallback plus the exact UTF-8 name."""
    fallback = "".join(c if " " <= c < "\x7f" and c not in '"\\' else "_" for c in name)
    encoded = quote(name.encode("utf-8", "surrogateescape"), safe="")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


async def _delete(request: web.Request, target: _Target, v1: bool) -> web.StreamResponse:
    res = await target.resolve_async(_path_param(request, v1), follow_last=False)
    await asyncio.to_thread(fsops.remove, res)
    return web.Response(status=204)


async def _rename(request: web.Request, target: _Target, v1: bool) -> web.StreamResponse:
    try:
        payload: Any = json.loads(await read_bounded(request))
    except BodyTooLarge as exc:
        raise _Reply(too_large(exc, path=request.path)) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad_request("Invalid request payload", f"invalid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise _bad_request("Invalid request payload", "expected a JSON object")
    current, new = payload.get("CurrentFilePath"), payload.get("NewFilePath")
    if not isinstance(current, str) or not current:
        raise _bad_request("Invalid request payload", "Current file path is invalid")
    if not isinstance(new, str) or not new:
        raise _bad_request("Invalid request payload", "New file path is invalid")
    src = await target.resolve_async(current, follow_last=False)
    dst = await target.resolve_async(new, follow_last=False)
    await asyncio.to_thread(fsops.rename, src, dst)
    return web.Response(status=204)


def _upload_name(filename: str | None) -> str:
    """Go keeps the multipart filename's last element (mime/multipart FileName); `.`, `..`, NUL refused."""
    if not filename:
        raise _bad_request("Invalid request payload", "invalid uploaded file")
    base = filename.rstrip("/").rsplit("/", 1)[-1]
    if base in ("", ".") or split_user_path(base) != [base]:
        raise PathInvalid(f"invalid file name: {filename!r}")
    return base


async def _put(request: web.Request, target: _Target, v1: bool) -> web.StreamResponse:
    """Stream the `file` part to a temporary file, then rename it over the target (atomic, truncating).

    Portainer's UI sends `file` before `Path`: the upload is then spooled (in the volume itself when it can,
    so the final move is a rename) and moved once the directory is known.
    """
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError) as exc:
        raise _bad_request("Invalid request payload", f"expected multipart/form-data: {exc}") from None
    dir_path: str | None = None
    upload: fsops.TempFile | None = None
    dest: Resolved | None = None
    dest_dir: int | None = None
    name = ""
    try:
        try:
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    await part.release()
                elif part.name == "Path" and dir_path is None:
                    dir_path = await _read_field(part)
                elif part.name == "file" and upload is None:
                    name = _upload_name(part.filename)
                    if dir_path is not None:
                        dest, dest_dir = await _open_destination(target, dir_path, name, v1)
                        upload = await asyncio.to_thread(fsops.TempFile.create_in, dest_dir)
                    else:
                        upload = await _spool(target)
                    await _receive(part, upload)
                else:
                    await part.release()
        except (AssertionError, ValueError, aiohttp.ClientPayloadError) as exc:
            raise _bad_request("Invalid request payload", f"malformed multipart body: {exc}") from None
        if upload is None:
            raise _bad_request("Invalid request payload", "invalid uploaded file")
        if dir_path is None:
            raise _bad_request("Invalid request payload", "invalid file path")
        if dest is None or dest_dir is None:
            dest, dest_dir = await _open_destination(target, dir_path, name, v1)
        await asyncio.to_thread(upload.commit, dest_dir, dest.rel[-1])
    finally:
        if upload is not None:
            upload.discard()
        if dest_dir is not None:
            os.close(dest_dir)
    return web.Response(status=204)


async def _spool(target: _Target) -> fsops.TempFile:
    def create() -> fsops.TempFile:
        if target.spool_in_root:
            with contextlib.suppress(OSError):
                root = fsops.open_dir(target.root, ())
                try:
                    return fsops.TempFile.create_in(root)
                finally:
                    os.close(root)
        return fsops.TempFile.create_anonymous()

    return await asyncio.to_thread(create)


async def _open_destination(target: _Target, dir_path: str, name: str, v1: bool) -> tuple[Resolved, int]:
    """Confine `Path`/name (the name too: it may be an existing symlink) and open, creating, its directory."""
    if v1 and not dir_path:
        raise _bad_request("Invalid request payload", "invalid file path")
    res = await target.resolve_async(f"{dir_path}/{name}")
    if res.is_root:
        raise PathForbidden("cannot write over the root")
    return res, await asyncio.to_thread(fsops.open_dir, res.root, res.rel[:-1], create=True)


async def _read_field(part: BodyPartReader) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(8192):
        data += chunk
        if len(data) > MAX_FIELD:
            raise _bad_request("Invalid request payload", "Path field too long")
    try:
        return data.decode(part.get_charset("utf-8"))
    except (UnicodeDecodeError, LookupError) as exc:
        raise _bad_request("Invalid request payload", f"Path field: {exc}") from None


async def _receive(part: BodyPartReader, upload: fsops.TempFile) -> None:
    while chunk := await part.read_chunk(UPLOAD_CHUNK):
        await asyncio.to_thread(upload.write, chunk)


_OPS: dict[str, Callable[[web.Request, _Target, bool], Awaitable[web.StreamResponse]]] = {
    "ls": _ls,
    "get": _get,
    "delete": _delete,
    "rename": _rename,
    "put": _put,
}
