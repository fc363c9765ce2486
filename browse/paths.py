"""Resolve a caller's path inside a root and refuse anything that would leave it.

The Go agent only rejects a `..` segment, then joins the path to the root and follows symlinks wherever they
lead. Here every path is checked before any file operation:

* a NUL byte or a `..` segment (split on `/` and on `\\`, as Go does) -> `PathInvalid` (400);
* a path that, once its symlinks are resolved, lands outside the root -> `PathForbidden` (403).

Leading `/`: the caller's path is always relative to the root. Portainer's volume browser sends `/`,
`/dir/file` and `file` for paths inside the volume, so `/dir/file` means `<root>/dir/file`. An absolute path
can therefore only leave the root through a symlink. The host browser sends paths under `/host` (the Go
agent's mount of the host's `/`); `host_relative` maps that prefix onto our host root and refuses the rest.

Only `os.lstat`/`os.readlink` are used: the resolution is done component by component (like `realpath`) so
that the caller can open the result again component by component with `O_NOFOLLOW` (see `browse/fsops.py`)
and catch a symlink swapped in after the check.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass

VOLUME_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
"""Docker's restricted name pattern: what `docker volume create` accepts for a name."""

HOST_PREFIX = "host"
"""First segment of the host browser's paths: Portainer's UI hard-codes `/host`, the Go agent's HostRoot."""

MAX_SYMLINKS = 40
"""Linux's own limit (ELOOP) on symlinks followed while resolving one path."""


class PathError(Exception):
    """A caller's path that is refused before any file operation; `status` is the HTTP answer."""

    status = 400


class PathInvalid(PathError):
    """Malformed: NUL byte, `..` segment, bad volume name, symlink loop."""

    status = 400


class PathForbidden(PathError):
    """Well-formed, but it would reach outside the root (or is the root where that is not allowed)."""

    status = 403


@dataclass(frozen=True)
class Resolved:
    """A path confined to `root`: `rel` are the components from `root` to it, none of them a symlink
    (except the last one when resolved with `follow_last=False`)."""

    root: str
    rel: tuple[str, ...]

    @property
    def path(self) -> str:
        return os.path.join(self.root, *self.rel)

    @property
    def is_root(self) -> bool:
        return not self.rel


def validate_volume_name(name: str) -> str:
    """Refuse a volume name Docker itself would refuse (it also ends up in an engine URL)."""
    if not isinstance(name, str) or VOLUME_NAME.fullmatch(name) is None:
        raise PathInvalid(f"invalid volume name: {name!r}")
    return name


def split_user_path(path: str) -> list[str]:
    """The caller's path as plain components: `/`, `//` and `.` collapse, NUL and `..` are refused."""
    if not isinstance(path, str):
        raise PathInvalid("path must be a string")
    if "\x00" in path:
        raise PathInvalid("path contains a NUL byte")
    if ".." in re.split(r"[/\\]", path):
        raise PathInvalid("path must not contain '..' elements")
    return [part for part in path.split("/") if part not in ("", ".")]


def host_relative(path: str) -> str:
    """Map the host browser's `/host/...` onto a path relative to our host root; refuse anything else.

    The Go agent would open any absolute path of its own container; ours only serves the host root.
    """
    parts = split_user_path(path)
    if not parts or parts[0] != HOST_PREFIX:
        raise PathForbidden(f"path is outside the host root (expected /{HOST_PREFIX}/...)")
    return "/".join(parts[1:])


def resolve(root: str, path: str, *, follow_last: bool = True, links_in_root: bool = False) -> Resolved:
    """Resolve `path` (relative to `root`, see the module docstring) and confine it to `root`.

    follow_last=False keeps a final symlink as is: delete and rename act on the link itself, like
    unlink(2)/rename(2), so where it points does not matter.
    links_in_root=True resolves symlinks as if `root` were `/` (chroot semantics: an absolute target starts
    at `root`, `..` stops at it). That is right for the host root, whose absolute symlinks name host paths;
    a volume's absolute symlinks name paths in some container, so there they are taken literally and
    refused when they leave the volume.
    """
    parts = split_user_path(path)
    root_real = os.path.realpath(root)
    last: str | None = None
    if not follow_last and parts:
        last = parts.pop()
    current = _walk(root_real, parts, links_in_root)
    if last is not None:
        current = os.path.join(current, last)
    if current != root_real and os.path.commonpath([root_real, current]) != root_real:
        raise PathForbidden("path resolves outside the root")
    rel = os.path.relpath(current, root_real)
    return Resolved(root_real, () if rel == "." else tuple(rel.split("/")))


def _walk(root_real: str, parts: list[str], links_in_root: bool) -> str:
    """Follow `parts` from `root_real` like realpath(3), by lstat/readlink; a missing tail stays lexical."""
    pending = list(reversed(parts))
    current = root_real
    followed = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":  # only ever from a symlink target
            if not (links_in_root and current == root_real):
                current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, part)
        try:
            st = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            current = candidate  # does not exist (yet): cannot be a symlink
            continue
        if not stat.S_ISLNK(st.st_mode):
            current = candidate
            continue
        followed += 1
        if followed > MAX_SYMLINKS:
            raise PathInvalid("too many levels of symbolic links")
        target = os.readlink(candidate)
        if target.startswith("/"):
            current = root_real if links_in_root else "/"
        pending.extend(reversed(target.split("/")))
    return current
