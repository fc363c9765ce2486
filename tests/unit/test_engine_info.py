"""The advertise address as the Go agent picks it, from the container's networks (no engine needed)."""

from __future__ import annotations

from agent.engine import pick_container_address


def container(*names: str) -> dict[str, object]:
    return {"NetworkSettings": {"Networks": {n: {"IPAddress": f"10.0.{i}.5"} for i, n in enumerate(names)}}}


def test_the_ingress_network_is_known_by_its_flag_not_its_name() -> None:
    infos = {"my-ingress": {"Scope": "swarm", "Ingress": True}, "agent_net": {"Scope": "swarm"}}
    assert pick_container_address(container("my-ingress", "agent_net"), infos, swarm=True) == "10.0.1.5"
    # a network that merely happens to be called "ingress" is an ordinary one when the engine says so
    infos = {"ingress": {"Scope": "swarm", "Ingress": False}}
    assert pick_container_address(container("ingress"), infos, swarm=True) == "10.0.0.5"


def test_in_a_swarm_only_swarm_scoped_networks_count() -> None:
    infos = {"bridge": {"Scope": "local"}, "overlay": {"Scope": "swarm"}}
    assert pick_container_address(container("bridge", "overlay"), infos, swarm=True) == "10.0.1.5"
    assert pick_container_address(container("bridge", "overlay"), infos, swarm=False) == "10.0.0.5"


def test_without_network_details_the_name_ingress_is_still_skipped() -> None:
    assert pick_container_address(container("ingress", "x"), {}, swarm=True) == "10.0.1.5"
