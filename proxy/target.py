"""The request target, parsed once: normalised path, the caller's Docker API version, the query. Pure.

Everything after this module sees one path: dot-segments and repeated slashes resolved, one leading
`/vN.M` removed (docs/protocol.md, "Paths and API versions"). Routing decides on `route_path`; what is
forwarded is `forward_path(version)`, built from the same segments, so the two can never disagree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

_VERSION = re.compile(r"v(\d{1,4})\.(\d{1,4})")
MAX_TARGET = 65536


class BadTarget(ValueError):
    """A request target the agent will not route (answered with 400)."""


ApiVersion = tuple[int, int]


def parse_version(text: str) -> ApiVersion | None:
    """`1.41` -> (1, 41); anything else -> None."""
    match = _VERSION.fullmatch("v" + text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def format_version(version: ApiVersion) -> str:
    return f"{version[0]}.{version[1]}"


@dataclass(frozen=True)
class Target:
    """One request's target after normalisation."""

    path: str
    """Normalised path without the version segment, still percent-encoded (always starts with `/`)."""
    version: str | None = None
    """The caller's API version as sent (`1.41`), or None for an unversioned request."""
    query: str | None = None
    """The raw query string without `?`; None when the target had no `?` at all."""

    @property
    def route_path(self) -> str:
        """The decoded path that routing and agent endpoints look at."""
        return unquote(self.path) if "%" in self.path else self.path

    @property
    def version_tuple(self) -> ApiVersion | None:
        return parse_version(self.version) if self.version is not None else None

    def forward_path(self, version: str | None) -> str:
        """Path and query to send upstream, at `version` (None: unversioned, as the caller sent it)."""
        prefix = f"/v{version}" if version is not None else ""
        return prefix + self.path + (f"?{self.query}" if self.query is not None else "")

    @property
    def as_sent(self) -> str:
        """Normalised path and query at the caller's own version: what a peer agent receives."""
        return self.forward_path(self.version)


def _is_dot(segment: str, dots: str) -> bool:
    """`.`/`..`, also percent-encoded (`%2e%2E`): RFC 3986 treats both as dot-segments."""
    if segment == dots:
        return True
    return "%" in segment and unquote(segment) == dots


def normalise(path: str) -> str:
    """Resolve dot-segments (never above the root) and collapse repeated slashes; keeps a trailing slash."""
    if path.startswith("/") and "//" not in path and "/." not in path and "%" not in path:
        return path  # no empty segment and no dot-segment, encoded or not: nothing to resolve (most requests)
    return resolve_segments(path)


def resolve_segments(path: str) -> str:
    """normalise() without its shortcut, segment by segment."""
    out: list[str] = []
    segments = path.split("/")[1:]
    trailing = False
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "" or _is_dot(segment, "."):
            trailing = last
            continue
        if _is_dot(segment, ".."):
            if out:
                out.pop()
            trailing = last
            continue
        out.append(segment)
        trailing = False
    text = "/" + "/".join(out)
    if trailing and out:
        text += "/"
    return text


def parse_target(raw: str) -> Target:
    """Parse an origin-form request target (`/v1.41/containers/json?all=1`).

    Absolute-form (`http://host/x`), authority-form and `*` are refused: the agent is not a forward proxy.
    """
    if not raw.startswith("/"):
        raise BadTarget("the request target must be a path (absolute-form and authority-form are refused)")
    if len(raw) > MAX_TARGET:
        raise BadTarget("the request target is too long")
    if "#" in raw:
        raise BadTarget("the request target must not carry a fragment")
    path, sep, query = raw.partition("?")
    if "\x00" in path or "\\" in path or "%00" in path:
        raise BadTarget("the request path holds a NUL byte or a backslash")
    path = normalise(path)
    version: str | None = None
    head, _, rest = path[1:].partition("/")
    match = _VERSION.fullmatch(head)
    if match is not None:
        version = f"{int(match.group(1))}.{int(match.group(2))}"
        path = "/" + rest
    return Target(path=path, version=version, query=query if sep else None)


# --- API version of the serving engine ------------------------------------------------------------------


@dataclass(frozen=True)
class ApiRange:
    """The API versions one engine accepts (`MinAPIVersion`..`ApiVersion` of its `GET /version`)."""

    low: ApiVersion
    high: ApiVersion

    @classmethod
    def from_version_body(cls, body: dict[str, object]) -> ApiRange | None:
        high = parse_version(str(body.get("ApiVersion") or ""))
        if high is None:
            return None
        low = parse_version(str(body.get("MinAPIVersion") or "")) or high
        return cls(min(low, high), high)

    def adapt(self, requested: ApiVersion) -> ApiVersion:
        """The caller's version when this engine supports it, else the nearest end of the range."""
        if requested < self.low:
            return self.low
        if requested > self.high:
            return self.high
        return requested


def engine_version(target: Target, api_range: ApiRange | None) -> tuple[str | None, bool]:
    """The version to send to this node's engine, and whether it differs from the caller's."""
    requested = target.version_tuple
    if requested is None or api_range is None:
        return target.version, False
    adapted = api_range.adapt(requested)
    if adapted == requested:
        return target.version, False
    return format_version(adapted), True
