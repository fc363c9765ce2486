from __future__ import annotations

import json

from proxy.fanout import NodeAnswer, merge, parse_node_body


def test_items_are_decorated_and_concatenated_in_member_order() -> None:
    a = parse_node_body("n1", 200, json.dumps([{"Id": "a", "Portainer": {"x": 1}}]).encode(), False)
    b = parse_node_body("n2", 200, json.dumps([{"Id": "b"}, {"Id": "c"}]).encode(), False)
    merged, failed = merge([a, b], False)
    assert failed == {}
    assert [i["Id"] for i in merged] == ["a", "b", "c"]
    assert merged[0]["Portainer"] == {"Agent": {"NodeName": "n1"}}  # overwrites, as Go does
    assert merged[2]["Portainer"] == {"Agent": {"NodeName": "n2"}}


def test_volumes_keep_warnings_and_name_failed_nodes() -> None:
    a = parse_node_body("n1", 200, json.dumps({"Volumes": [{"Name": "v"}], "Warnings": ["w1"]}).encode(), True)
    b = parse_node_body("n2", 200, json.dumps({"Volumes": None, "Warnings": None}).encode(), True)
    c = NodeAnswer("n3", error="no answer within 5s")
    merged, failed = merge([a, b, c], True)
    assert merged["Volumes"] == [{"Name": "v", "Portainer": {"Agent": {"NodeName": "n1"}}}]
    assert merged["Warnings"] == ["w1", "node n3 did not answer: no answer within 5s"]
    assert failed == {"n3": "no answer within 5s"}


def test_no_duplicates_are_removed() -> None:
    img = [{"Id": "sha256:same"}]
    merged, _ = merge([parse_node_body(n, 200, json.dumps(img).encode(), False) for n in ("a", "b")], False)
    assert len(merged) == 2


def test_error_bodies_and_bad_shapes_are_node_failures() -> None:
    assert parse_node_body("n", 500, b'{"message":"boom"}', False).error == "HTTP 500: boom"
    assert parse_node_body("n", 200, b"{}", False).error == "answer is not a JSON array"
    assert parse_node_body("n", 200, b"[1", False).error == "HTTP 200: invalid JSON"
    assert parse_node_body("n", 200, b"[]", True).error == "volumes answer is not an object"
    assert parse_node_body("n", 403, b"", False).error == "HTTP 403"
