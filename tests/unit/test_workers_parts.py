"""The parts the worker processes share, without processes: the pin file, the cluster view, the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.auth import PinFile, SignatureVerifier, Verdict
from agent.cluster.membership import Member
from agent.config import ConfigError, load_config
from agent.engine import EngineInfo
from agent.workers import parse_view, view_of
from tools.signer import Signer


def test_the_first_claim_wins_and_every_claim_says_which(tmp_path: Path) -> None:
    pin = PinFile(tmp_path / "pin")
    assert pin.current() is None
    assert pin.claim("key-a") == "key-a"
    assert pin.claim("key-b") == "key-a"
    assert pin.current() == "key-a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pin"], "nothing left aside"


def test_verifiers_sharing_a_pin_file_pin_one_key(tmp_path: Path) -> None:
    portainer, other = Signer(), Signer()
    one = SignatureVerifier(pin=PinFile(tmp_path / "pin"))
    two = SignatureVerifier(pin=PinFile(tmp_path / "pin"))
    h1, h2 = portainer.headers(), other.headers()
    key1, sig1 = h1["X-PortainerAgent-PublicKey"], h1["X-PortainerAgent-Signature"]
    key2, sig2 = h2["X-PortainerAgent-PublicKey"], h2["X-PortainerAgent-Signature"]
    assert one.check(key1, sig1) is Verdict.OK
    assert two.check(key2, sig2) is Verdict.KEY_MISMATCH, "the other worker adopts the pin before verifying"
    assert two.check(key1, sig1) is Verdict.OK and two.paired


def test_cluster_view_round_trip() -> None:
    members = [Member(node_name="n1", ip="10.0.0.1", agent_port=9001, role="manager", is_leader=True),
               Member(node_name="n2", ip="10.0.0.2", agent_port=9001)]
    info = EngineInfo(node_name="n1", node_id="id1", swarm=True, manager=True, leader=True)
    assert parse_view(view_of(members, info, frozenset({"id1"}))) == (members, info, frozenset({"id1"}))
    assert parse_view(view_of(members, info, None))[2] is None


@pytest.mark.parametrize("value, want", [("", 0), ("auto", 0), ("1", 1), ("4", 4)])
def test_workers_setting(value: str, want: int) -> None:
    assert load_config(env={"KEELSON_WORKERS": value}, argv=[]).workers == want


@pytest.mark.parametrize("value", ["0", "-1", "many", "65"])
def test_bad_workers_setting_names_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="KEELSON_WORKERS"):
        load_config(env={"KEELSON_WORKERS": value}, argv=[])
