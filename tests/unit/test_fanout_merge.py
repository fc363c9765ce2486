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


def test_the_listing_is_written_node_by_node_and_each_node_dropped() -> None:
    import tempfile

    from proxy.fanout import MergedListing

    spool = tempfile.SpooledTemporaryFile(max_size=1024)  # small: this listing goes to disk
    listing = MergedListing(False, spool)
    nodes = [parse_node_body(f"n{i}", 200, json.dumps([{"Id": f"{i}-{j}", "Big": "x" * 100}
                                                       for j in range(20)]).encode(), False) for i in range(5)]
    for answer in [nodes[3], NodeAnswer("gone", error="no answer within 2s"), nodes[0], *nodes[1:3], nodes[4]]:
        listing.add(answer)
        assert answer.items == []  # written, then dropped
    listing.finish()
    spool.seek(0)
    merged = json.loads(spool.read())
    assert len(merged) == 100 and listing.size == len(json.dumps(merged, separators=(",", ":")).encode())
    # in the order the nodes answered
    assert [i["Portainer"]["Agent"]["NodeName"] for i in merged[::20]] == ["n3", "n0", "n1", "n2", "n4"]
    assert listing.failed == {"gone": "no answer within 2s"}


def test_an_empty_listing_is_valid_json() -> None:
    import io

    from proxy.fanout import MergedListing

    for volumes, expected in ((False, []), (True, {"Volumes": [], "Warnings": None})):
        out = io.BytesIO()
        listing = MergedListing(volumes, out)
        listing.add(parse_node_body("n", 200, b'{"Volumes":null}' if volumes else b"[]", volumes))
        listing.finish()
        assert json.loads(out.getvalue()) == expected
