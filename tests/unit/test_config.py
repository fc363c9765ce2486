from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, load_config, parse_go_duration


@pytest.mark.parametrize(("text", "seconds"), [
    ("72h", 259200.0), ("500ms", 0.5), ("1s", 1.0), ("1m30s", 90.0), ("20h2s", 72002.0), ("1.5h", 5400.0),
    ("0", 0.0), ("-1s", -1.0), ("100us", 1e-4), ("3µs", 3e-6), ("2h45m", 9900.0),
])
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "1d", "h", "1.2.3s", "1s x", "ms"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(text)


def test_defaults_are_the_go_agents() -> None:
    c = load_config({})
    assert (c.agent_host, c.agent_port, c.secret_timeout, c.data_path) == ("0.0.0.0", 9001, 259200.0, Path("/data"))
    assert (c.cluster_probe_timeout, c.cluster_probe_interval) == (0.5, 1.0)
    assert (c.edge, c.edge_server_host, c.edge_server_port, c.edge_inactivity_timeout) == (False, "0.0.0.0", 80, 300)
    assert (c.log_level, c.log_mode) == ("INFO", "PRETTY")
    assert c.docker.url == "unix:///var/run/docker.sock" and c.docker.is_unix


def test_docker_host_variants(tmp_path: Path) -> None:
    c = load_config({"DOCKER_HOST": "tcp://10.1.2.3:2375"})
    assert (c.docker.http_base, c.docker.uses_tls) == ("http://10.1.2.3:2375", False)
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    c = load_config({"DOCKER_HOST": "tcp://h:2376", "DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(tmp_path)})
    assert (c.docker.http_base, c.docker.tls_verify) == ("https://h:2376", True)
    with pytest.raises(ConfigError, match=r"^DOCKER_CERT_PATH"):
        load_config({"DOCKER_HOST": "tcp://h:2376", "DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": "/nope"})


@pytest.mark.parametrize(("env", "name"), [
    ({"AGENT_PORT": "x"}, "AGENT_PORT"),
    ({"AGENT_PORT": "0"}, "AGENT_PORT"),
    ({"EDGE_SERVER_PORT": "99999"}, "EDGE_SERVER_PORT"),
    ({"AGENT_SECRET_TIMEOUT": "72"}, "AGENT_SECRET_TIMEOUT"),
    ({"EDGE_INACTIVITY_TIMEOUT": "soon"}, "EDGE_INACTIVITY_TIMEOUT"),
    ({"LOG_MODE": "XML"}, "LOG_MODE"),
    ({"EDGE": "yes"}, "EDGE"),
    ({"EDGE_INSECURE_POLL": "2"}, "EDGE_INSECURE_POLL"),
    ({"DOCKER_HOST": "tcp://nohostport"}, "DOCKER_HOST"),
    ({"DOCKER_HOST": "unix://"}, "DOCKER_HOST"),
    ({"MTLS_SSL_CERT": "/a"}, "MTLS_SSL_CERT"),
    ({"MTLS_SSL_CA": "/a"}, "MTLS_SSL_CA"),
    ({"KEELSON_ADVERTISE_ADDR": "host.example"}, "KEELSON_ADVERTISE_ADDR"),
    ({"KEELSON_FANOUT_TIMEOUT": "0s"}, "KEELSON_FANOUT_TIMEOUT"),
    ({"UPDATE_ID": "x"}, "UPDATE_ID"),
])
def test_bad_values_name_the_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env)
    assert str(info.value).startswith(f"{name}:")


def test_go_booleans() -> None:
    assert load_config({"EDGE": "1"}).edge and load_config({"EDGE": "true"}).edge
    assert not load_config({"EDGE": "0"}).edge and not load_config({"EDGE": "FALSE"}).edge
    assert not load_config({"EDGE_TUNNEL": "false"}).edge_tunnel
