"""The request target (proxy/target.py): normalisation, the anchored version segment, version adaptation.

Examples for each rule, then properties (hypothesis) that hold for any target a client can send."""

from __future__ import annotations

import posixpath
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.routing import Api, classify
from proxy.target import ApiRange, BadTarget, engine_version, normalise, parse_target, resolve_segments


@pytest.mark.parametrize(("raw", "path", "version", "query"), [
    ("/v1.41/containers/json?all=1", "/containers/json", "1.41", "all=1"),
    ("/v1.24/volumes", "/volumes", "1.24", None),
    ("/containers/json", "/containers/json", None, None),
    ("/v1.41", "/", "1.41", None),
    ("/v1.41/", "/", "1.41", None),
    ("/v2/browse/ls", "/v2/browse/ls", None, None),  # agent prefixes have no dot: not a Docker version
    ("/v1/agents", "/v1/agents", None, None),
    # anchored: a later segment that looks like a version is a name (Go's pattern mangles these)
    ("/containers/v1.2/json", "/containers/v1.2/json", None, None),
    ("/v1.41/images/v1.2/json", "/images/v1.2/json", "1.41", None),
    ("/v1.41/v1.40/info", "/v1.40/info", "1.41", None),  # only one leading segment is removed
    # dot-segments and repeated slashes are resolved before the version is looked for
    ("/v1.41/../../containers/json", "/containers/json", None, None),
    ("/services/../containers/json", "/containers/json", None, None),
    ("//v1.41//containers///json", "/containers/json", "1.41", None),
    ("/v1.41/./info", "/info", "1.41", None),
    ("/v1.41/%2e%2e/info", "/info", None, None),
    ("/containers/json?", "/containers/json", None, ""),
    ("/v1.041/info", "/info", "1.41", None),
    ("/containers/x/archive?path=/a/../b", "/containers/x/archive", None, "path=/a/../b"),  # query untouched
])
def test_parse_target(raw: str, path: str, version: str | None, query: str | None) -> None:
    target = parse_target(raw)
    assert (target.path, target.version, target.query) == (path, version, query)


@pytest.mark.parametrize("raw", ["http://host/x", "https://h:1/v1.41/info", "*", "host:443", "", "/a\x00b",
                                 "/a%00b", "/a\\b", "/x#frag"])
def test_refused_targets(raw: str) -> None:
    with pytest.raises(BadTarget):
        parse_target(raw)


def test_agent_endpoints_under_a_version_prefix() -> None:
    # Portainer's web UI prefixes agent routes with its pinned API version
    for raw, api in (("/v1.41/ping", Api.PING), ("/v1.41/agents", Api.AGENTS), ("/v1.41/host/info", Api.HOST_INFO),
                     ("/v1.41/browse/ls?volumeID=v", Api.BROWSE), ("/v1.41/v2/dockerhub", Api.DOCKERHUB),
                     ("/v1.41/v1/browse/vol/ls", Api.BROWSE), ("/v1.44/containers/json", Api.DOCKER)):
        method = "POST" if api is Api.DOCKERHUB else "GET"
        assert classify(method, parse_target(raw).route_path).api is api, raw


def test_forward_path_is_what_was_routed() -> None:
    target = parse_target("/v1.44/services/../containers//json?all=1")
    assert target.route_path == "/containers/json"
    assert target.as_sent == "/v1.44/containers/json?all=1"
    assert target.forward_path("1.41") == "/v1.41/containers/json?all=1"
    assert target.forward_path(None) == "/containers/json?all=1"


def test_route_path_is_decoded_but_forwarding_keeps_the_encoding() -> None:
    target = parse_target("/v1.41/images/my%20image/json")
    assert target.route_path == "/images/my image/json"
    assert target.as_sent == "/v1.41/images/my%20image/json"


ENGINE_20_10 = ApiRange((1, 12), (1, 41))


@pytest.mark.parametrize(("raw", "sent", "adapted"), [
    ("/v1.41/info", "/v1.41/info", False),
    ("/v1.30/info", "/v1.30/info", False),
    ("/v1.44/info", "/v1.41/info", True),
    ("/v1.45/info", "/v1.41/info", True),
    ("/v2.0/info", "/v1.41/info", True),
    ("/v1.11/info", "/v1.12/info", True),
    ("/v1.9/info", "/v1.12/info", True),  # 1.9 < 1.12: versions compare as numbers, not text
    ("/info", "/info", False),  # unversioned stays unversioned: the engine answers at its own default
])
def test_engine_version(raw: str, sent: str, adapted: bool) -> None:
    target = parse_target(raw)
    version, changed = engine_version(target, ENGINE_20_10)
    assert (target.forward_path(version), changed) == (sent, adapted)


def test_unknown_engine_range_keeps_the_callers_version() -> None:
    assert engine_version(parse_target("/v1.45/info"), None) == ("1.45", False)


def test_range_from_version_body() -> None:
    assert ApiRange.from_version_body({"ApiVersion": "1.41", "MinAPIVersion": "1.12"}) == ENGINE_20_10
    assert ApiRange.from_version_body({"ApiVersion": "1.44"}) == ApiRange((1, 44), (1, 44))
    assert ApiRange.from_version_body({"message": "x"}) is None


# --- properties -----------------------------------------------------------------------------------------

SEGMENT = st.one_of(
    st.sampled_from(["", ".", "..", "%2e", "%2E%2e", "v1.41", "v1.2", "containers", "json", "a b", "%2F", "x%20y"]),
    st.text(alphabet=st.characters(blacklist_characters="/?#\\\x00%", blacklist_categories=("Cs",)), max_size=8),
)
PATHS = st.lists(SEGMENT, max_size=10).map(lambda parts: "/" + "/".join(parts))


@given(PATHS)
def test_normalised_paths_have_no_dot_segments_or_empty_segments(path: str) -> None:
    result = normalise(path)
    assert result.startswith("/")
    inner = result[1:].rstrip("/").split("/") if result != "/" else []
    for segment in inner:
        assert segment != "" and unquote(segment) not in (".", "..")


@given(st.one_of(PATHS, st.text(max_size=40)))
def test_the_shortcut_agrees_with_resolving_every_segment(path: str) -> None:
    assert normalise(path) == resolve_segments(path)


@given(PATHS)
def test_normalising_twice_changes_nothing(path: str) -> None:
    once = normalise(path)
    assert normalise(once) == once


@given(PATHS)
def test_normalise_agrees_with_posix_for_plain_segments(path: str) -> None:
    if "%" in path:
        return
    expected = posixpath.normpath("/" + path.lstrip("/"))
    expected = "/" + expected.lstrip("/")
    assert (normalise(path).rstrip("/") or "/") == (expected.rstrip("/") or "/")


@given(PATHS, st.sampled_from(["", "all=1", "a=../b"]))
def test_forwarded_target_routes_the_same(path: str, query: str) -> None:
    target = parse_target(path + ("?" + query if query else ""))
    again = parse_target(target.as_sent)
    assert (again.path, again.version, again.route_path) == (target.path, target.version, target.route_path)
    assert target.query == (query or None)


@given(st.tuples(st.integers(0, 3), st.integers(0, 99)), st.tuples(st.integers(1, 1), st.integers(0, 60)),
       st.integers(0, 30))
def test_adapted_version_is_inside_the_range_and_closest(requested: tuple[int, int], low: tuple[int, int],
                                                         span: int) -> None:
    high = (low[0], low[1] + span)
    got = ApiRange(low, high).adapt(requested)
    assert low <= got <= high
    if low <= requested <= high:
        assert got == requested


@given(st.text(max_size=40))
def test_any_text_parses_or_is_refused_cleanly(raw: str) -> None:
    try:
        target = parse_target(raw)
    except BadTarget:
        return
    assert target.path.startswith("/")
