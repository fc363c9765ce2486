"""Edge stacks without sockets: the poll entries, the payload and its paths, the plan, statuses, the records."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.stacks import store
from edge.stacks.engines import compose_status, swarm_status
from edge.stacks.manager import plan, retry_delay
from edge.stacks.payload import (
    StackError,
    StackRef,
    parse_stack_payload,
    parse_stack_refs,
    safe_relative,
    write_project,
)
from edge.stacks.store import Phase, StackRecord


def payload(name: str = "web", entries: list[dict[str, object]] | None = None, **extra: object) -> bytes:
    if entries is None:
        entries = [{"Name": "docker-compose.yml", "Content": base64.b64encode(b"services: {}\n").decode(),
                    "IsFile": True, "Permissions": 384}]
    return json.dumps({"ID": 0, "Name": name, "StackFileContent": "", "DirEntries": entries,
                       "EntryFileName": "docker-compose.yml", **extra}).encode()


def test_poll_entries_null_means_no_news_and_a_list_is_the_whole_truth() -> None:
    assert parse_stack_refs(None) == (None, [])
    assert parse_stack_refs([]) == ((), [])
    refs, dropped = parse_stack_refs([{"ID": 3, "Version": 2}, {"ID": "x"}, "junk", {"ID": 0, "Version": 1}])
    assert refs == (StackRef(3, 2),)
    assert len(dropped) == 3


def test_payload_as_ce_sends_it() -> None:
    entries = [{"Name": "docker-compose.yml", "Content": base64.b64encode(b"services: {}\n").decode(),
                "IsFile": True, "Permissions": 384},
               {"Name": ".env", "Content": base64.b64encode(b"A=1\n").decode(), "IsFile": True, "Permissions": 384}]
    parsed = parse_stack_payload(payload(entries=entries, EnvVars=None, RegistryCredentials=None))
    assert parsed.project == "edge_web"
    assert [(str(f.path), f.content, f.mode) for f in parsed.files] == [
        ("docker-compose.yml", b"services: {}\n", 0o600), (".env", b"A=1\n", 0o600)]


def test_business_edition_fields_are_named_as_ignored() -> None:
    parsed = parse_stack_payload(payload(RegistryCredentials=[{"ServerURL": "r"}], PrePullImage=True, RetryDeploy=False,
                                         EdgeUpdateID=0))
    assert parsed.ignored == ("RegistryCredentials", "PrePullImage")
    assert parse_stack_payload(payload()).ignored == ()


def test_payload_from_an_old_server_uses_stack_file_content() -> None:
    parsed = parse_stack_payload(payload(entries=[], StackFileContent="services: {}\n"))
    assert parsed.files[0].content == b"services: {}\n"


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "a\x00b", "", "a\\..\\b", "."])
def test_entry_names_that_leave_the_folder_are_refused(name: str) -> None:
    entries = [{"Name": name, "Content": "", "IsFile": True}]
    with pytest.raises(StackError):
        parse_stack_payload(payload(entries=entries))


@pytest.mark.parametrize("name", ["", "Web", "web app", "../x", "-web", "a/b", None, 7])
def test_names_that_are_not_project_names_are_refused(name: object) -> None:
    with pytest.raises(StackError):
        parse_stack_payload(payload(name=name))  # type: ignore[arg-type]


def test_missing_entry_file_is_go_s_error() -> None:
    with pytest.raises(StackError, match="EntryFileName not found in DirEntries"):
        parse_stack_payload(payload(entries=[]))


@given(st.text(max_size=40))
def test_safe_relative_never_escapes(name: str) -> None:
    try:
        path = safe_relative(name)
    except StackError:
        return
    joined = os.path.normpath(os.path.join("/base", str(path)))
    assert joined.startswith("/base/") and not path.is_absolute()


def test_project_is_swapped_in_whole_and_links_are_not_followed(tmp_path: Path) -> None:
    folder = tmp_path / "stacks" / "1"
    write_project(folder, parse_stack_payload(payload()))
    assert (folder / "docker-compose.yml").read_bytes() == b"services: {}\n"
    assert oct((folder / "docker-compose.yml").stat().st_mode & 0o777) == oct(0o600)
    outside = tmp_path / "outside"
    outside.write_text("keep")
    # A link planted where a file will be written is replaced with the new folder, never written through.
    (folder / "docker-compose.yml").unlink()
    (folder / "docker-compose.yml").symlink_to(outside)
    write_project(folder, parse_stack_payload(payload()))
    assert outside.read_text() == "keep"
    assert not (folder / "docker-compose.yml").is_symlink()
    assert sorted(p.name for p in folder.parent.iterdir()) == ["1"]


def record(sid: int, version: int, phase: Phase = Phase.DEPLOYED) -> StackRecord:
    return StackRecord(sid, version, f"s{sid}", phase)


def test_plan_fetches_new_and_changed_and_removes_dropped() -> None:
    known = {1: record(1, 1), 2: record(2, 1), 3: record(3, 4), 4: record(4, 1, Phase.REMOVE),
             5: record(5, 2, Phase.REMOVE)}
    fetch, remove = plan(known, [StackRef(1, 1), StackRef(2, 2), StackRef(6, 1), StackRef(5, 2)])
    assert fetch == [StackRef(2, 2), StackRef(6, 1), StackRef(5, 2)]
    assert remove == [3]  # 4 is being removed already
    assert plan(known, []) == ([], [1, 2, 3])


def test_retry_delay_doubles_up_to_ten_times_the_base() -> None:
    assert [retry_delay(n, 30) for n in (1, 2, 3, 4, 5, 9)] == [30, 60, 120, 240, 300, 300]


def test_compose_status() -> None:
    def c(state: str, status: str = "", service: str = "app") -> dict[str, object]:
        return {"State": state, "Status": status, "Labels": {"com.docker.compose.service": service}}

    assert compose_status([]).state == "gone"
    assert compose_status([c("running"), c("exited", "Exited (0) 1 second ago")]).state == "running"
    assert compose_status([c("exited", "Exited (0) 2 seconds ago")]).state == "completed"
    failed = compose_status([c("running"), c("exited", "Exited (3) now", "db")])
    assert (failed.state, failed.error) == ("error", "service db exited with code 3")
    assert compose_status([c("created")]).state == "pending"


def test_swarm_status() -> None:
    svc = {"ID": "s1", "Spec": {"Name": "edge_x_app", "Mode": {"Replicated": {"Replicas": 2}}}}
    task = {"ServiceID": "s1", "DesiredState": "running", "Status": {"State": "running"}}
    failed = {"ServiceID": "s1", "DesiredState": "shutdown", "Status": {"State": "rejected", "Err": "no such image"}}
    assert swarm_status([], []).state == "gone"
    assert swarm_status([svc], [task, task]).state == "running"
    pending = swarm_status([svc], [task, failed])
    assert pending.state == "pending" and "no such image" in pending.error
    glob = {"ID": "g", "Spec": {"Name": "edge_x_agent", "Mode": {"Global": {}}}}
    assert swarm_status([glob], [{**task, "ServiceID": "g"}]).state == "running"


def test_records_survive_a_restart_and_a_broken_file_is_ignored(tmp_path: Path) -> None:
    records = {1: StackRecord(1, 3, "web", Phase.DEPLOYED, "docker-compose.yml", [["A", "1"]]),
               2: StackRecord(2, 1, "db", Phase.DEPLOY, attempts=2, retry_at=123.5)}
    store.save(tmp_path, records)
    assert store.load(tmp_path) == records
    (tmp_path / store.STORE_FILE).write_text("{not json")
    assert store.load(tmp_path) == {}


def test_relative_path_type() -> None:
    assert safe_relative("./a/./b.yml") == PurePosixPath("a/b.yml")
