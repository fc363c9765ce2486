"""What Portainer sends about Edge stacks, parsed and checked, and the project folder written from it.

* The poll answer's ``stacks``: ``[{"ID": int, "Version": int}, ...]``; null or absent means "no news" (nothing
  is removed), a list, even an empty one, is the whole truth (portainer/agent edge/poll.go processStacks).
* ``GET /api/endpoints/{id}/edge/stacks/{stackId}`` answers an ``edge.StackPayload``
  (portainer/portainer api/edge/edge.go): CE 2.23 fills ``Name``, ``EntryFileName`` and ``DirEntries``
  (``[{Name, Content (base64), IsFile, Permissions}]``, the entry file and the ``.env`` beside it;
  api/filesystem/serialize.go). Registry credentials, env vars, relative paths and pre-pull are Business
  Edition fields: parsed, and only ``EnvVars`` is used.

Beyond the Go agent: every entry name must be a relative path inside the project folder (no ``..``, no
absolute path, no NUL), the stack name must be a valid Compose project name, and files are written without
following links, so nothing the server sends lands outside DATA_PATH/edge_stacks/<id>.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

# Compose's own rule for project names (lowercase letters, digits, dashes, underscores); the UI's is stricter.
NAME_RE = re.compile(r"^[a-z0-9][-_a-z0-9]*$")
MAX_ENTRIES = 256
BUSINESS_FIELDS = ("RegistryCredentials", "PrePullImage", "RePullImage", "RetryDeploy", "EdgeUpdateID",
                   "SupportRelativePath", "FilesystemPath", "RollbackTo", "ReadyRePullImage")
"""What only Business Edition servers fill in a stack payload (CE 2.23 leaves them zero): not implemented."""
MAX_PROJECT_BYTES = 16 * 1024 * 1024


class StackError(Exception):
    """A stack Portainer sent that cannot be deployed as sent (the message goes into the Error status)."""


@dataclass(frozen=True)
class StackRef:
    """One entry of the poll answer's ``stacks``."""

    id: int
    version: int


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise StackError(f"{what} is not an integer")
    return value


def parse_stack_refs(raw: object) -> tuple[tuple[StackRef, ...] | None, list[str]]:
    """(refs or None for "no news", reasons for dropped entries)."""
    if raw is None:
        return None, []
    if not isinstance(raw, list):
        return None, [f"stacks is not a list ({type(raw).__name__})"]
    refs: dict[int, StackRef] = {}
    dropped: list[str] = []
    for item in raw:
        try:
            if not isinstance(item, dict):
                raise StackError("not an object")
            ref = StackRef(_int(item.get("ID"), "ID"), _int(item.get("Version", 0), "Version"))
            if ref.id <= 0:
                raise StackError(f"ID {ref.id} is not positive")
            refs[ref.id] = ref
        except StackError as exc:
            dropped.append(f"stack {str(item)[:80]}: {exc}")
    return tuple(refs.values()), dropped


@dataclass(frozen=True)
class ProjectFile:
    path: PurePosixPath
    """Relative to the project folder, checked by safe_relative."""
    content: bytes | None
    """None for a folder."""
    mode: int


@dataclass(frozen=True)
class StackPayload:
    name: str
    entry_file: PurePosixPath
    files: tuple[ProjectFile, ...]
    env: tuple[tuple[str, str], ...] = ()
    ignored: tuple[str, ...] = ()
    """Business Edition fields the server set, which Keelson does not act on."""

    @property
    def project(self) -> str:
        """The Compose project / Swarm stack name, as Go's (edge/stack/stack.go): ``edge_<Name>``."""
        return f"edge_{self.name}"


def safe_relative(name: object) -> PurePosixPath:
    """A path that stays inside the folder it is joined to; StackError otherwise."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise StackError(f"bad file name {str(name)[:80]!r}")
    path = PurePosixPath(name)
    if path.is_absolute() or any(part in ("..", "") for part in path.parts) or path == PurePosixPath("."):
        raise StackError(f"file name {name[:80]!r} leaves the stack folder")
    return PurePosixPath(*[p for p in path.parts if p != "."])


def parse_stack_payload(body: bytes) -> StackPayload:
    try:
        data = json.loads(body)
    except ValueError:
        raise StackError(f"the stack answer is not JSON ({body[:60]!r})") from None
    if not isinstance(data, dict):
        raise StackError("the stack answer is not a JSON object")
    name = data.get("Name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise StackError(f"stack name {str(name)[:80]!r} is not a valid project name")
    entry = safe_relative(data.get("EntryFileName") or "docker-compose.yml")
    raw_entries = data.get("DirEntries") or []
    if not isinstance(raw_entries, list) or len(raw_entries) > MAX_ENTRIES:
        raise StackError("DirEntries is not a list of at most 256 entries")
    files: list[ProjectFile] = []
    total = 0
    for item in raw_entries:
        if not isinstance(item, dict):
            raise StackError("a DirEntries item is not an object")
        path = safe_relative(item.get("Name"))
        mode = item.get("Permissions") or 0
        mode = (mode if isinstance(mode, int) and not isinstance(mode, bool) else 0) & 0o777
        if item.get("IsFile"):
            text = item.get("Content") or ""
            if not isinstance(text, str):
                raise StackError(f"content of {path} is not a string")
            try:
                content = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
            except (binascii.Error, ValueError):
                raise StackError(f"content of {path} is not base64") from None
            total += len(content)
            if total > MAX_PROJECT_BYTES:
                raise StackError("the stack's files exceed 16 MiB")
            files.append(ProjectFile(path, content, mode or 0o600))
        else:
            files.append(ProjectFile(path, None, mode or 0o755))
    if not any(f.path == entry and f.content is not None for f in files):
        # Go's message (edge/stack/stack.go): CE 2.19+ sends the file only in DirEntries.
        legacy = data.get("StackFileContent")
        if isinstance(legacy, str) and legacy:
            files.append(ProjectFile(entry, legacy.encode(), 0o600))
        else:
            raise StackError("EntryFileName not found in DirEntries")
    env: list[tuple[str, str]] = []
    for var in data.get("EnvVars") or []:
        if isinstance(var, dict) and isinstance(var.get("name"), str) and isinstance(var.get("value"), str):
            env.append((var["name"], var["value"]))
    ignored = tuple(f for f in BUSINESS_FIELDS if data.get(f))
    return StackPayload(name, entry, tuple(files), tuple(env), ignored)


def _write_file(folder: Path, item: ProjectFile) -> None:
    target = folder.joinpath(*item.path.parts)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    # Parents were created here from checked names; a link planted among them would still be refused by
    # O_NOFOLLOW on the last part and by the resolve check on the rest.
    if not parent.resolve().is_relative_to(folder.resolve()):
        raise StackError(f"{item.path} leaves the stack folder")
    if item.content is None:
        target.mkdir(exist_ok=True)
        os.chmod(target, item.mode | 0o700)
        return
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, item.mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(item.content)
    os.chmod(target, item.mode | 0o400)  # owner must read it: compose runs as us


def write_project(folder: Path, payload: StackPayload) -> None:
    """Replace ``folder`` with the payload's files (built beside it, then swapped in)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    fresh = folder.with_name(folder.name + ".new")
    old = folder.with_name(folder.name + ".old")
    for leftover in (fresh, old):
        shutil.rmtree(leftover, ignore_errors=True)
    fresh.mkdir(mode=0o700)
    try:
        for item in payload.files:
            _write_file(fresh, item)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    if folder.exists():
        folder.rename(old)
    fresh.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def remove_project(folder: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(folder)


def payload_summary(payload: StackPayload) -> dict[str, Any]:
    return {"name": payload.name, "entry": str(payload.entry_file), "files": len(payload.files)}
