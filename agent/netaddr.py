"""Host and port joined and split the one way every module needs (IPv6 literals in brackets)."""

from __future__ import annotations


def host_port(host: str, port: int | str) -> str:
    """'h:p', or '[v6]:p' for an IPv6 literal (one already in brackets is kept as is)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def split_host_port(item: str) -> tuple[str, str | None]:
    """'h', 'h:p', '[v6]:p' or a bare v6 literal -> (host, port or None)."""
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") and rest[1:] else None
    if item.count(":") == 1:
        host, port = item.split(":")
        return host, port or None
    return item, None
