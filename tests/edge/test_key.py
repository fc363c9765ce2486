"""Edge key parsing/encoding (format of portainer/agent edge/key.go and portainer api/chisel/key.go)."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from edge.key import (
    DEFAULT_TUNNEL_PORT,
    EdgeKey,
    EdgeKeyError,
    parse_edge_key,
    read_key_file,
    write_key_file,
)

pytestmark = pytest.mark.edge

SHA_FP = "4tX1GnHG1HFaWbkbLa8Oq8hvNGkgcnRx8uCRSi1gZTk="
MD5_FP = "46:99:4a:8d:a6:de:6a:bd:d8:e2:1c:99:81:60:54:55"


def raw_key(text: str) -> str:
    """base64 RawStd, as Go's base64.RawStdEncoding.EncodeToString."""
    return base64.b64encode(text.encode()).decode().rstrip("=")


def test_portainer_generated_key() -> None:
    # The example in portainer api/http/handler/endpoints/endpoint_association_delete.go.
    key = parse_edge_key(raw_key(f"http://10.116.1.178:9000|10.116.1.178:8000|{MD5_FP}|52"))
    assert key == EdgeKey("http://10.116.1.178:9000", "10.116.1.178:8000", MD5_FP, 52)
    assert key.tunnel_host == "10.116.1.178"
    assert key.tunnel_port == 8000
    assert key.tunnel_url == "ws://10.116.1.178:8000/"
    assert not key.is_global
    assert not key.tunnel_secure


def test_sha256_key_and_round_trip() -> None:
    text = raw_key(f"https://portainer.example.com|portainer.example.com:8000|{SHA_FP}|7")
    key = parse_edge_key(text)
    assert key.fingerprint == SHA_FP
    assert key.endpoint_id == 7
    assert key.encode() == text
    assert "=" not in key.encode()
    assert parse_edge_key(key.encode()) == key


def test_global_key() -> None:
    key = parse_edge_key(raw_key(f"https://p.example:9443|p.example:8000|{SHA_FP}|0"))
    assert key.is_global
    assert key.endpoint_id == 0


def test_padded_and_whitespace_accepted() -> None:
    raw = f"https://p.example:9443|p.example:8000|{SHA_FP}|12"
    padded = base64.b64encode(raw.encode()).decode()
    assert padded.endswith("=")
    assert parse_edge_key(padded + "\n").endpoint_id == 12
    assert parse_edge_key("  " + raw_key(raw) + "\r\n").endpoint_id == 12


def test_tunnel_port_default_and_forms() -> None:
    key = parse_edge_key(raw_key(f"https://p.example|tunnel.example|{SHA_FP}|3"))
    assert key.tunnel_port == DEFAULT_TUNNEL_PORT == 8000
    assert key.tunnel_url == "ws://tunnel.example:8000/"
    assert key.encode() == raw_key(f"https://p.example|tunnel.example|{SHA_FP}|3")  # verbatim

    wss = parse_edge_key(raw_key(f"https://p.example|wss://tunnel.example:443|{SHA_FP}|3"))
    assert wss.tunnel_secure and wss.tunnel_url == "wss://tunnel.example:443/"
    https = parse_edge_key(raw_key(f"https://p.example|https://tunnel.example|{SHA_FP}|3"))
    assert https.tunnel_url == "wss://tunnel.example:8000/"

    v6 = parse_edge_key(raw_key(f"https://p.example|[fd00::1]:8000|{SHA_FP}|3"))
    assert (v6.tunnel_host, v6.tunnel_port, v6.tunnel_url) == ("fd00::1", 8000, "ws://[fd00::1]:8000/")
    # Portainer builds "host:port" from net.SplitHostPort's unbracketed host.
    bare = parse_edge_key(raw_key(f"https://p.example|fd00::1:8001|{SHA_FP}|3"))
    assert (bare.tunnel_host, bare.tunnel_port) == ("fd00::1", 8001)


def test_sha256_fingerprint_in_ssh_keygen_form_accepted() -> None:
    key = parse_edge_key(raw_key(f"https://p.example|t:8000|SHA256:{SHA_FP.rstrip('=')}|3"))
    assert key.fingerprint == f"SHA256:{SHA_FP.rstrip('=')}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("!!!not-base64!!!", "not base64"),
        (raw_key("only|three|fields"), "expected 4"),
        (raw_key(f"a|b|{SHA_FP}|1|extra"), "expected 4"),
        (base64.b64encode(b"\xff\xfe|x|y|1").decode(), "not base64 text"),
        (raw_key(f"portainer.example.com|t:8000|{SHA_FP}|1"), "Portainer URL"),
        (raw_key(f"ftp://portainer.example.com|t:8000|{SHA_FP}|1"), "Portainer URL"),
        (raw_key(f"https://|t:8000|{SHA_FP}|1"), "Portainer URL"),
        (raw_key(f"https://p.example:99999|t:8000|{SHA_FP}|1"), "Portainer URL"),
        (raw_key(f"https://p.example|t:0|{SHA_FP}|1"), "tunnel port"),
        (raw_key(f"https://p.example|t:65536|{SHA_FP}|1"), "tunnel port"),
        (raw_key(f"https://p.example|t:80a|{SHA_FP}|1"), "tunnel port"),
        (raw_key(f"https://p.example|t:|{SHA_FP}|1"), "tunnel port"),
        (raw_key(f"https://p.example|:8000|{SHA_FP}|1"), "no host"),
        (raw_key(f"https://p.example||{SHA_FP}|1"), "tunnel address"),
        (raw_key(f"https://p.example|ftp://t:8000|{SHA_FP}|1"), "unsupported scheme"),
        (raw_key("https://p.example|t:8000||1"), "fingerprint"),
        (raw_key("https://p.example|t:8000|not-a-fingerprint|1"), "fingerprint"),
        (raw_key(f"https://p.example|t:8000|{SHA_FP}|"), "endpoint id"),
        (raw_key(f"https://p.example|t:8000|{SHA_FP}|-1"), "endpoint id"),
        (raw_key(f"https://p.example|t:8000|{SHA_FP}|abc"), "endpoint id"),
        (raw_key(f"https://p.example|t:8000|{SHA_FP}|1.5"), "endpoint id"),
    ],
)
def test_malformed_keys(text: str, message: str) -> None:
    with pytest.raises(EdgeKeyError, match=message):
        parse_edge_key(text)


def test_edge_key_error_is_value_error() -> None:
    assert issubclass(EdgeKeyError, ValueError)


def test_key_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "agent_edge_key"
    assert read_key_file(path) is None
    text = raw_key(f"https://p.example|t:8000|{SHA_FP}|1")
    write_key_file(path, text)
    assert read_key_file(path) == text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    write_key_file(path, text + "A")  # replaces, still private, no temp files left behind
    assert read_key_file(path) == text + "A"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent_edge_key"]


def test_key_file_empty_is_none(tmp_path: Path) -> None:
    path = tmp_path / "agent_edge_key"
    path.write_text("\n")
    assert read_key_file(path) is None
