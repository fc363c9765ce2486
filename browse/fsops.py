"""Blocking file operations on paths already confined by `browse.paths.resolve` (run them in a thread).

Every operation re-opens its path from the root one component at a time with `O_NOFOLLOW` and then acts
through directory file descriptors (`dir_fd=`), so a symlink swapped in by a container between the check and
the operation is caught (`PathForbidden`) instead of followed out of the root.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import tempfile
from typing import Any

from browse.paths import PathForbidden, Resolved

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
TEMP_PREFIX = ".keelson-upload-"
NEW_FILE_MODE = 0o644
NEW_DIR_MODE = 0o755


class NotRegularFile(OSError):
    """Directories, FIFOs, sockets and devices are not downloadable (a FIFO would block, a disk is huge)."""


def open_dir(root: str, rel: tuple[str, ...], *, create: bool = False) -> int:
    """A descriptor on `root/rel`, walked without following any symlink; `create` makes missing ones."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in rel:
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, NEW_DIR_MODE, dir_fd=fd)
                nfd = _open_child_dir(fd, part)
            except NotADirectoryError:
                _refuse_symlink(fd, part)
                raise
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_child_dir(fd: int, part: str) -> int:
    try:
        return os.open(part, _DIR_FLAGS, dir_fd=fd)
    except NotADirectoryError:
        _refuse_symlink(fd, part)
        raise


def _refuse_symlink(dir_fd: int, name: str) -> None:
    """O_DIRECTORY|O_NOFOLLOW on a symlink says ENOTDIR: tell a swapped-in symlink from a plain file."""
    with contextlib.suppress(OSError):
        if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            raise PathForbidden("path changed while in use (symlink)")


def list_dir(res: Resolved) -> list[dict[str, Any]]:
    """Go's FileInfo list: lstat data (a symlink is listed as itself), sorted by name like os.ReadDir."""
    fd = open_dir(res.root, res.rel)
    try:
        files: list[dict[str, Any]] = []
        with os.scandir(fd) as entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed meanwhile
                files.append({
                    "Name": _display_name(entry.name),
                    "Size": st.st_size,
                    "Dir": stat.S_ISDIR(st.st_mode),
                    "ModTime": st.st_mtime_ns // 1_000_000_000,
                })
    finally:
        os.close(fd)
    files.sort(key=lambda f: f["Name"].encode("utf-8", "surrogatepass"))
    return files


def _display_name(name: str) -> str:
    """Go's JSON encoder replaces invalid UTF-8 with U+FFFD; Python would emit lone surrogates."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def open_regular_file(res: Resolved) -> tuple[int, os.stat_result]:
    """A read descriptor on a regular file (O_NONBLOCK so a FIFO cannot hang the thread)."""
    if res.is_root:
        raise IsADirectoryError(errno.EISDIR, "is a directory")
    parent = open_dir(res.root, res.rel[:-1])
    try:
        try:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(res.rel[-1], flags, dir_fd=parent)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise PathForbidden("path changed while in use (symlink)") from exc
            raise
    finally:
        os.close(parent)
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise IsADirectoryError(errno.EISDIR, "is a directory")
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotRegularFile(errno.EINVAL, "not a regular file")
    return fd, st


def remove(res: Resolved) -> None:
    """Delete a file, a symlink (itself) or a directory tree, never crossing into another mount."""
    if res.is_root:
        raise PathForbidden("the root itself cannot be deleted")
    parent = open_dir(res.root, res.rel[:-1])
    try:
        name = res.rel[-1]
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            _remove_tree(parent, name, os.fstat(parent).st_dev)
        else:
            os.unlink(name, dir_fd=parent)
    finally:
        os.close(parent)


def _remove_tree(parent: int, name: str, dev: int) -> None:
    """rm -r --one-file-system through descriptors: symlinks are unlinked, never followed."""
    fd = _open_child_dir(parent, name)
    try:
        if os.fstat(fd).st_dev != dev:
            raise PathForbidden(f"refusing to delete across a mount point: {name}")
        with os.scandir(fd) as entries:
            children = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
        for child, is_dir in children:
            if is_dir:
                _remove_tree(fd, child, dev)
            else:
                os.unlink(child, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent)


def rename(src: Resolved, dst: Resolved) -> None:
    """rename(2) between two confined paths: a final symlink is moved/replaced as itself."""
    if src.is_root or dst.is_root:
        raise PathForbidden("the root itself cannot be renamed")
    src_dir = open_dir(src.root, src.rel[:-1])
    try:
        dst_dir = open_dir(dst.root, dst.rel[:-1])
        try:
            os.rename(src.rel[-1], dst.rel[-1], src_dir_fd=src_dir, dst_dir_fd=dst_dir)
        finally:
            os.close(dst_dir)
    finally:
        os.close(src_dir)


class TempFile:
    """An upload being written: a hidden file in a directory (`dir_fd`, `name`) or an anonymous one."""

    def __init__(self, fd: int, dir_fd: int | None, name: str | None) -> None:
        self.fd = fd
        self.dir_fd = dir_fd
        self.name = name

    @classmethod
    def create_in(cls, dir_fd: int) -> TempFile:
        """A new hidden file next to the target, so the final os.replace is atomic; owns a dup of dir_fd."""
        name = f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     NEW_FILE_MODE, dir_fd=dir_fd)
        return cls(fd, os.dup(dir_fd), name)

    @classmethod
    def create_anonymous(cls) -> TempFile:
        """Spool in the agent's own temp dir when the target directory is not known yet."""
        fd, path = tempfile.mkstemp(prefix=TEMP_PREFIX)
        os.unlink(path)
        return cls(fd, None, None)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]

    def commit(self, dir_fd: int, name: str) -> None:
        """Move the upload to dir_fd/name atomically, copying it over first if it lives elsewhere."""
        if self.name is not None and self.dir_fd is not None:
            try:
                self._replace(dir_fd, name)
                return
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
        other = TempFile.create_in(dir_fd)
        try:
            _copy_fd(self.fd, other.fd)
            other.commit(dir_fd, name)
        except BaseException:
            other.discard()
            raise
        self.discard()

    def _replace(self, dir_fd: int, name: str) -> None:
        assert self.name is not None and self.dir_fd is not None
        try:
            old = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            old = None
        if old is not None and stat.S_ISDIR(old.st_mode):
            raise IsADirectoryError(errno.EISDIR, "a directory with that name exists")
        if old is not None and stat.S_ISREG(old.st_mode):
            # Go writes into the existing file, which keeps its mode and owner: so do we.
            os.fchmod(self.fd, stat.S_IMODE(old.st_mode))
            with contextlib.suppress(PermissionError):
                os.fchown(self.fd, old.st_uid, old.st_gid)
        os.fsync(self.fd)
        os.replace(self.name, name, src_dir_fd=self.dir_fd, dst_dir_fd=dir_fd)
        self.name = None
        self.close()

    def discard(self) -> None:
        """Remove a half-written upload; safe to call more than once."""
        if self.name is not None and self.dir_fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.name, dir_fd=self.dir_fd)
            self.name = None
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.dir_fd is not None:
            os.close(self.dir_fd)
            self.dir_fd = None


def _copy_fd(src: int, dst: int) -> None:
    os.lseek(src, 0, os.SEEK_SET)
    while True:
        chunk = os.read(src, 1 << 20)
        if not chunk:
            return
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view):]
