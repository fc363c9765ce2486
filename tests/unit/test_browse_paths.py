"""browse.paths: every refusal, one by one, and the symlinks that stay inside."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from browse import fsops
from browse.paths import (
    PathForbidden,
    PathInvalid,
    Resolved,
    host_relative,
    resolve,
    split_user_path,
    validate_volume_name,
)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/{dir/file, top.txt} next to outside/{secret, sub/}."""
    root = tmp_path / "root"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "file").write_text("in")
    (root / "top.txt").write_text("top")
    (tmp_path / "outside" / "sub").mkdir(parents=True)
    (tmp_path / "outside" / "secret").write_text("secret")
    return root


def rel(root: Path, path: str, **kw: bool) -> tuple[str, ...]:
    return resolve(str(root), path, **kw).rel


# --- accepted -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "expected"), [
    ("", ()), ("/", ()), (".", ()), ("//./", ()),
    ("dir/file", ("dir", "file")), ("/dir/file", ("dir", "file")), ("/dir//./file/", ("dir", "file")),
    ("new/not/yet", ("new", "not", "yet")), ("a..b", ("a..b",)), ("...", ("...",)),
])
def test_leading_slash_is_relative_to_root(tree: Path, path: str, expected: tuple[str, ...]) -> None:
    assert rel(tree, path) == expected


def test_resolved_path_joins_the_real_root(tree: Path, tmp_path: Path) -> None:
    os.symlink(tree, tmp_path / "alias")
    res = resolve(str(tmp_path / "alias"), "/dir/file")
    assert res.root == str(tree) and res.path == str(tree / "dir" / "file")


def test_symlink_inside_is_followed(tree: Path) -> None:
    os.symlink("dir/file", tree / "rel_link")
    os.symlink(str(tree / "dir"), tree / "abs_link_dir")
    os.symlink("../top.txt", tree / "dir" / "up")
    assert rel(tree, "rel_link") == ("dir", "file")
    assert rel(tree, "abs_link_dir/file") == ("dir", "file")
    assert rel(tree, "dir/up") == ("top.txt",)


def test_symlink_chain_inside_is_followed(tree: Path) -> None:
    os.symlink("dir", tree / "a")
    os.symlink("a", tree / "b")
    assert rel(tree, "b/file") == ("dir", "file")


def test_dangling_symlink_inside_resolves_lexically(tree: Path) -> None:
    os.symlink("dir/missing", tree / "dangling")
    assert rel(tree, "dangling") == ("dir", "missing")


# --- 400: malformed -------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["..", "../x", "/..", "dir/../top.txt", "dir/..", "a\\..\\b", "..\\x"])
def test_dotdot_segment_is_invalid(tree: Path, path: str) -> None:
    with pytest.raises(PathInvalid, match=r"\.\."):
        resolve(str(tree), path)


@pytest.mark.parametrize("path", ["\x00", "dir/\x00file", "file\x00/../x"])
def test_nul_byte_is_invalid(tree: Path, path: str) -> None:
    with pytest.raises(PathInvalid, match="NUL"):
        resolve(str(tree), path)


def test_symlink_loop_is_invalid(tree: Path) -> None:
    os.symlink("loop2", tree / "loop1")
    os.symlink("loop1", tree / "loop2")
    with pytest.raises(PathInvalid, match="symbolic links"):
        resolve(str(tree), "loop1/x")


def test_non_string_path_is_invalid(tree: Path) -> None:
    with pytest.raises(PathInvalid):
        split_user_path(42)  # type: ignore[arg-type]


# --- 403: outside the root ------------------------------------------------------------------------------

def test_symlink_to_outside_file_as_last_component(tree: Path, tmp_path: Path) -> None:
    os.symlink(str(tmp_path / "outside" / "secret"), tree / "abs_secret")
    os.symlink("../outside/secret", tree / "rel_secret")
    for name in ("abs_secret", "rel_secret", "/abs_secret"):
        with pytest.raises(PathForbidden):
            resolve(str(tree), name)


def test_symlink_to_outside_dir_as_last_component(tree: Path, tmp_path: Path) -> None:
    os.symlink(str(tmp_path / "outside"), tree / "out")
    with pytest.raises(PathForbidden):
        resolve(str(tree), "out")


def test_symlink_to_outside_dir_as_middle_component(tree: Path, tmp_path: Path) -> None:
    os.symlink(str(tmp_path / "outside"), tree / "dir" / "out")
    os.symlink("../../outside", tree / "dir" / "rel_out")
    for path in ("dir/out/secret", "dir/out/sub/new_file", "dir/rel_out/secret"):
        with pytest.raises(PathForbidden):
            resolve(str(tree), path)


def test_symlink_to_root_parent_is_forbidden(tree: Path) -> None:
    os.symlink("..", tree / "parent")
    os.symlink("/", tree / "slash")
    for path in ("parent", "parent/outside/secret", "slash/etc/passwd"):
        with pytest.raises(PathForbidden):
            resolve(str(tree), path)


def test_chain_that_leaves_through_second_link(tree: Path, tmp_path: Path) -> None:
    os.symlink(str(tmp_path / "outside"), tree / "dir" / "out")
    os.symlink("dir/out", tree / "hop")
    with pytest.raises(PathForbidden):
        resolve(str(tree), "hop/secret")


def test_link_out_and_back_in_is_allowed(tree: Path, tmp_path: Path) -> None:
    """Only where the path lands counts, as with realpath."""
    os.symlink(f"../{tree.name}/dir", tree / "round_trip")
    assert rel(tree, "round_trip/file") == ("dir", "file")


def test_last_component_not_followed_for_delete_and_rename(tree: Path, tmp_path: Path) -> None:
    os.symlink(str(tmp_path / "outside" / "secret"), tree / "dir" / "abs_secret")
    assert rel(tree, "dir/abs_secret", follow_last=False) == ("dir", "abs_secret")
    os.symlink(str(tmp_path / "outside"), tree / "out")
    with pytest.raises(PathForbidden):  # the parent is still followed and confined
        resolve(str(tree), "out/secret", follow_last=False)


def test_links_in_root_resolve_like_a_chroot(tree: Path) -> None:
    """The host root: an absolute target is a host path, `..` stops at the root."""
    os.symlink("/dir/file", tree / "abs")
    os.symlink("../../../../top.txt", tree / "dir" / "climb")
    assert rel(tree, "abs", links_in_root=True) == ("dir", "file")
    assert rel(tree, "dir/climb", links_in_root=True) == ("top.txt",)
    with pytest.raises(PathForbidden):  # the same links taken literally leave the root
        resolve(str(tree), "dir/climb")


# --- the host browser's /host prefix --------------------------------------------------------------------

@pytest.mark.parametrize(("path", "expected"), [
    ("/host", ""), ("/host/", ""), ("/host/etc/passwd", "etc/passwd"), ("host/etc", "etc"),
    ("//host/./x", "x"),
])
def test_host_prefix_is_mapped(path: str, expected: str) -> None:
    assert host_relative(path) == expected


@pytest.mark.parametrize("path", ["/", "/etc/passwd", "/hostile/x", "/var/lib/docker", "", "/Host/etc"])
def test_absolute_path_outside_host_root_is_forbidden(path: str) -> None:
    with pytest.raises(PathForbidden):
        host_relative(path)


@pytest.mark.parametrize("path", ["/host/../etc", "/host/\x00"])
def test_host_path_still_validated(path: str) -> None:
    with pytest.raises(PathInvalid):
        host_relative(path)


# --- volume names ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["v", "my_vol-1.data", "0abc", "a" * 200])
def test_good_volume_names(name: str) -> None:
    assert validate_volume_name(name) == name


@pytest.mark.parametrize("name", [
    "", ".", "..", "-v", "_v", ".v", "a/b", "../x", "a b", "a\x00", "vol%2F..", "é", "a\n", 7,
])
def test_bad_volume_names(name: str) -> None:
    with pytest.raises(PathInvalid):
        validate_volume_name(name)


# --- browse.fsops: a symlink swapped in after the check is caught, not followed -----------------------------

def test_swapped_in_symlink_is_refused_by_every_operation(tree: Path, tmp_path: Path) -> None:
    """resolve() saw `dir` as a directory; a container then replaced it with a link to outside."""
    checked_file = resolve(str(tree), "dir/file")
    checked_dir = resolve(str(tree), "dir")
    (tree / "dir" / "file").unlink()
    (tree / "dir").rmdir()
    os.symlink(str(tmp_path / "outside"), tree / "dir")
    (tmp_path / "outside" / "file").write_text("outside")
    with pytest.raises(PathForbidden):
        fsops.list_dir(checked_dir)
    with pytest.raises(PathForbidden):
        fsops.open_dir(checked_file.root, checked_file.rel[:-1], create=True)
    with pytest.raises(PathForbidden):
        fsops.open_regular_file(checked_file)
    with pytest.raises(PathForbidden):
        fsops.remove(checked_file)
    with pytest.raises(PathForbidden):
        fsops.rename(checked_file, resolve(str(tree), "top2.txt"))
    with pytest.raises(PathForbidden):  # the final component swapped for a link
        fsops.open_regular_file(Resolved(str(tree), ("dir",)))
    assert (tmp_path / "outside" / "file").read_text() == "outside"


def test_remove_tree_unlinks_symlinks_without_following(tree: Path, tmp_path: Path) -> None:
    os.symlink(str(tmp_path / "outside"), tree / "dir" / "out")
    fsops.remove(resolve(str(tree), "dir"))
    assert not (tree / "dir").exists()
    assert (tmp_path / "outside" / "secret").read_text() == "secret"


def test_root_cannot_be_removed_or_renamed(tree: Path) -> None:
    with pytest.raises(PathForbidden):
        fsops.remove(resolve(str(tree), "/"))
    with pytest.raises(PathForbidden):
        fsops.rename(resolve(str(tree), "/"), resolve(str(tree), "x"))


def test_anonymous_spool_is_copied_into_place(tree: Path) -> None:
    """The path taken when the spool is not on the target's filesystem."""
    upload = fsops.TempFile.create_anonymous()
    upload.write(b"spooled")
    dir_fd = fsops.open_dir(str(tree), ("dir",))
    try:
        upload.commit(dir_fd, "file")
    finally:
        os.close(dir_fd)
        upload.discard()
    assert (tree / "dir" / "file").read_bytes() == b"spooled"
    assert sorted(os.listdir(tree / "dir")) == ["file"]


def test_list_dir_shape(tree: Path) -> None:
    os.symlink("dir", tree / "link")
    listing = fsops.list_dir(resolve(str(tree), ""))
    assert [f["Name"] for f in listing] == ["dir", "link", "top.txt"]
    assert listing[1]["Dir"] is False and listing[0]["Dir"] is True
    assert listing[2]["Size"] == 3 and listing[2]["ModTime"] == int((tree / "top.txt").stat().st_mtime)
