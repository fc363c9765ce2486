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


def test_log_modes_of_the_go_agent() -> None:
    for mode in ("PRETTY", "NOCOLOR", "JSON", "nocolor"):
        assert load_config({"LOG_MODE": mode}).log_mode == mode.upper()


def test_command_line_flags_mirror_the_variables_and_win() -> None:
    c = load_config({"AGENT_PORT": "9001", "LOG_LEVEL": "INFO"},
                    ["--port=9100", "--log-level", "DEBUG", "--edge", "--no-edge-tunnel", "--edge-id=abc",
                     "--secret-timeout=1h", "--agent-cluster-timeout", "2s", "--data=/tmp/d"])
    assert (c.agent_port, c.log_level, c.edge, c.edge_tunnel, c.edge_id) == (9100, "DEBUG", True, False, "abc")
    assert (c.secret_timeout, c.cluster_probe_timeout, c.data_path) == (3600.0, 2.0, Path("/tmp/d"))
    # the deprecated mTLS spellings of Go still work, and a flag's bad value names the variable
    with pytest.raises(ConfigError, match=r"^MTLS_SSL_CERT"):
        load_config({}, ["--sslcert=/a"])
    with pytest.raises(ConfigError, match=r"^AGENT_PORT"):
        load_config({}, ["--port=x"])


@pytest.mark.parametrize("argv", [["--nope=1"], ["positional"], ["--port"], ["--edge=true"]])
def test_bad_command_lines(argv: list[str]) -> None:
    with pytest.raises(ConfigError, match=r"^command line"):
        load_config({}, argv)


def test_edge_meta_fields_as_go_parses_them() -> None:
    c = load_config({"EDGE_GROUPS": "1:4:7", "PORTAINER_GROUP": "3", "PORTAINER_TAGS": "2"})
    assert (c.edge_groups, c.portainer_group, c.portainer_tags) == ((1, 4, 7), 3, (2,))
    with pytest.raises(ConfigError, match=r"^EDGE_GROUPS"):
        load_config({"EDGE_GROUPS": "1,2"})
    with pytest.raises(ConfigError, match=r"^EDGE_ASYNC"):
        load_config({"EDGE_ASYNC": "1"})


def test_certificates_may_appear_later_with_a_retry_interval() -> None:
    c = load_config({"MTLS_SSL_CERT": "/nope/c", "MTLS_SSL_KEY": "/nope/k", "MTLS_CERT_RETRY_INTERVAL": "5s"})
    assert (c.mtls_cert, c.mtls_cert_retry_interval) == ("/nope/c", 5.0)
    with pytest.raises(ConfigError, match=r"^MTLS_SSL_CERT"):
        load_config({"MTLS_SSL_CERT": "/nope/c", "MTLS_SSL_KEY": "/nope/k"})


def test_go_options_without_meaning_here_are_reported() -> None:
    assert load_config({"AWS_REGION": "eu-west-1", "ASSETS_PATH": "/app"}).ignored == ("ASSETS_PATH", "AWS_REGION")


def test_keelson_edge_settings_are_read_with_the_rest() -> None:
    c = load_config({"KEELSON_EDGE_TRANSPORT": "ssh", "KEELSON_EDGE_JOB_MEMORY": "64m", "KEELSON_EDGE_JOB_CPUS": "1"})
    assert (c.edge_options.transport, c.edge_options.job_memory, c.edge_options.job_cpus) == ("ssh", 64 * 2**20, 1.0)
    for env, name in (({"KEELSON_EDGE_TRANSPORT": "carrier-pigeon"}, "KEELSON_EDGE_TRANSPORT"),
                      ({"KEELSON_EDGE_JOB_MEMORY": "1m"}, "KEELSON_EDGE_JOB_MEMORY"),
                      ({"KEELSON_EDGE_POLL_INTERVAL": "soon"}, "KEELSON_EDGE_POLL_INTERVAL")):
        with pytest.raises(ConfigError, match=f"^{name}:"):
            load_config(env)
