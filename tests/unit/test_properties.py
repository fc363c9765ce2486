"""Property tests (hypothesis) for every parser of untrusted input: whatever a client sends, each parser
either answers within its contract or refuses with its own error, never anything else.

The request target (version stripping, normalisation) has its own properties in test_target.py."""

from __future__ import annotations

import base64
import os
import string
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.auth import SignatureVerifier, Verdict, verify_signature
from agent.cluster.membership import Member
from agent.config import ConfigError, apply_flags, parse_go_duration
from browse.paths import PathError, resolve, split_user_path
from edge.key import EdgeKey, EdgeKeyError, parse_edge_key
from proxy.forward import HijackError, parse_response_head
from proxy.routing import Api, Kind, classify, decide
from proxy.target import parse_target
from tools.signer import Signer

TEXT = st.text(max_size=60)
SEGMENT = st.sampled_from(["containers", "json", "v2", "v1", "browse", "ls", "agents", "ping", "host", "info",
                           "services", "tasks", "nodes", "volumes", "networks", "images", "websocket", "exec",
                           "key", "metrics", "dockerhub", "x", "..", ".", ""])
PATHS = st.lists(SEGMENT, max_size=6).map(lambda parts: "/" + "/".join(parts))
METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH"])
ME = Member("w1", "10.0.0.3", 9001)
MEMBERS = [Member("m1", "10.0.0.1", 9001, role="manager", is_leader=True), ME, Member("w2", "10.0.0.4", 9001)]


# --- routing ------------------------------------------------------------------------------------------------

@given(METHODS, PATHS)
def test_every_path_has_exactly_one_handler(method: str, raw: str) -> None:
    route = classify(method, parse_target(raw).route_path)
    assert isinstance(route.api, Api)
    # only /ping and /key skip the signature
    if route.needs_signature is False:
        assert route.api in (Api.PING, Api.KEY)


@given(METHODS, PATHS, st.sampled_from(["", "w1", "w2", "m1", "ghost"]), st.booleans(), st.booleans())
def test_a_decision_is_always_one_of_the_four_kinds(method: str, raw: str, target: str, manager_op: bool,
                                                    clustered: bool) -> None:
    headers = {"X-PortainerAgent-Target": target, **({"X-PortainerAgent-ManagerOperation": "1"}
                                                     if manager_op else {})}
    route = decide(method, parse_target(raw).route_path, headers, ME, MEMBERS, clustered)
    assert route.kind in (Kind.LOCAL, Kind.PEER, Kind.FANOUT, Kind.ERROR)
    if not clustered:
        assert route.kind is Kind.LOCAL
    if route.kind is Kind.PEER:
        assert route.member in MEMBERS and route.member != ME
    if route.kind is Kind.ERROR:
        assert route.status == 500 and route.message


# --- browse path confinement --------------------------------------------------------------------------------

USER_PATHS = st.lists(st.sampled_from(["a", "b", "..", ".", "", "link", "out", "\\..", "x\x00", "/etc"]),
                      max_size=6).map("/".join)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A volume root with files, a directory, a symlink inside and one pointing outside."""
    base = tmp_path_factory.mktemp("confine")
    root = base / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "f").write_text("f")
    (base / "secret").write_text("s")
    os.symlink("../../secret", root / "a" / "out")
    os.symlink("b", root / "a" / "link")
    os.symlink("/etc", root / "etc")
    return root


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(USER_PATHS, st.booleans(), st.booleans())
def test_a_resolved_path_never_leaves_its_root(tree: Path, path: str, follow_last: bool, links_in_root: bool) -> None:
    try:
        resolved = resolve(str(tree), path, follow_last=follow_last, links_in_root=links_in_root)
    except PathError:
        return
    real_root = os.path.realpath(tree)
    if resolved.is_root:
        assert resolved.path == real_root
        return
    # what the operation touches: the file itself, or (acting on a final link) the folder that holds it
    touched = os.path.realpath(resolved.path if follow_last else os.path.dirname(resolved.path))
    assert touched == real_root or touched.startswith(real_root + os.sep), (path, resolved.path)


@given(TEXT)
def test_user_paths_split_or_are_refused(path: str) -> None:
    try:
        parts = split_user_path(path)
    except PathError:
        assert "\x00" in path or ".." in path
        return
    assert all(part not in ("", ".", "..") and "/" not in part for part in parts)


# --- the response head of a hijack -------------------------------------------------------------------------

HEAD_LINES = st.lists(st.text(alphabet=string.printable, max_size=30), max_size=6)


@given(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", "SSH-2.0", ""]), st.text(max_size=5), HEAD_LINES)
def test_hijack_response_heads_parse_or_are_refused(version: str, status: str, lines: list[str]) -> None:
    head = ("\r\n".join([f"{version} {status} Reason", *lines]) + "\r\n\r\n").encode("latin-1", "replace")
    try:
        code, _, headers = parse_response_head(head)
    except HijackError:
        return
    assert 100 <= code <= 999 and version.startswith("HTTP/1.")
    assert all(name.strip() for name in headers)


def test_a_well_formed_upgrade_head() -> None:
    code, reason, headers = parse_response_head(
        b"HTTP/1.1 101 UPGRADED\r\nContent-Type: application/vnd.docker.raw-stream\r\nUpgrade: tcp\r\n\r\n")
    assert (code, reason, headers["Upgrade"]) == (101, "UPGRADED", "tcp")


# --- Edge key -----------------------------------------------------------------------------------------------

@given(st.one_of(TEXT, st.binary(max_size=80).map(lambda b: base64.b64encode(b).decode()),
                 st.lists(TEXT, min_size=4, max_size=4).map(
                     lambda f: base64.b64encode("|".join(f).encode()).decode().rstrip("="))))
def test_edge_keys_parse_or_are_refused(text: str) -> None:
    try:
        key = parse_edge_key(text)
    except EdgeKeyError:
        return
    assert parse_edge_key(key.encode()) == key


@given(st.sampled_from(["http://p.example:9000", "https://10.0.0.1"]), st.sampled_from(["p.example:8000",
       "10.0.0.1", "wss://t.example:443"]), st.integers(0, 10**6))
def test_valid_edge_keys_round_trip(url: str, tunnel: str, endpoint: int) -> None:
    fingerprint = base64.b64encode(bytes(32)).decode()
    key = EdgeKey(url, tunnel, fingerprint, endpoint)
    assert parse_edge_key(key.encode()) == key


# --- Go durations and flags ---------------------------------------------------------------------------------

@given(st.lists(st.tuples(st.integers(0, 10**4), st.sampled_from(["ns", "us", "ms", "s", "m", "h"])),
                min_size=1, max_size=4))
def test_go_durations_add_up(parts: list[tuple[int, str]]) -> None:
    unit = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    text = "".join(f"{n}{u}" for n, u in parts)
    assert parse_go_duration(text) == pytest.approx(sum(n * unit[u] for n, u in parts))


@given(TEXT)
def test_any_duration_text_parses_or_is_refused(text: str) -> None:
    try:
        parse_go_duration(text)
    except ValueError:
        pass


@given(st.lists(st.sampled_from(["--port", "9100", "--edge", "--no-edge", "--x", "y", "--log-mode=JSON", "--",
                                 "--secret=", "--edge=1"]), max_size=5))
def test_command_lines_apply_or_are_refused(argv: list[str]) -> None:
    try:
        env = apply_flags({}, argv)
    except ConfigError as exc:
        assert str(exc).startswith("command line")
        return
    assert set(env) <= {"AGENT_PORT", "EDGE", "LOG_MODE", "AGENT_SECRET"}


# --- signature headers --------------------------------------------------------------------------------------

SIGNER = Signer(ec.derive_private_key(12345, ec.SECP256R1()))
SIGNED = SIGNER.sign()


@given(st.one_of(TEXT, st.just(SIGNER.public_key_hex), st.text(alphabet="0123456789abcdef", max_size=200)),
       st.one_of(TEXT, st.just(SIGNED), st.binary(max_size=70).map(
           lambda b: base64.b64encode(b).decode().rstrip("="))))
def test_signature_headers_verify_or_are_refused(key: str, signature: str) -> None:
    if verify_signature(key, signature, "Portainer-App"):
        assert key == SIGNER.public_key_hex  # only the signer's own key verifies its signatures
    verdict = SignatureVerifier().check(key or None, signature or None)
    assert isinstance(verdict, Verdict)
    if not key or not signature:
        assert verdict is Verdict.MISSING


def test_a_real_signature_pins_its_key() -> None:
    verifier = SignatureVerifier()
    assert verifier.check(SIGNER.public_key_hex, SIGNER.sign()) is Verdict.OK
    other = Signer()
    assert verifier.check(other.public_key_hex, other.sign()) is Verdict.KEY_MISMATCH
