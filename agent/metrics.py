"""Prometheus metrics: every request is measured by route kind, method and status.

With several worker processes (agent/workers.py) prometheus_client's multiprocess mode is on
(PROMETHEUS_MULTIPROC_DIR, set before this module is imported): each worker writes its values to files there
and `/metrics`, whichever worker serves it, sums them (gauges: over the live workers; the member count: the
largest any worker sees).
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

CONTENT_TYPE = CONTENT_TYPE_LATEST

METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"))
"""Methods counted by name; any other token a caller sends is counted as "other", so that no caller, signed
or not, can grow the set of series (and the multiprocess files) without bound."""

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)


class Metrics:
    """One registry per agent (not the global one), so tests and simulated clusters stay independent."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "keelson_requests", "Requests served, by route kind, method and status",
            ["route", "method", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "keelson_request_duration_seconds", "Time to the response headers (streams excluded)",
            ["route"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.bytes_streamed = Counter(
            "keelson_bytes_streamed", "Body bytes relayed, by direction",
            ["direction"], registry=self.registry,
        )
        self.signature_failures = Counter(
            "keelson_signature_failures", "Requests refused by the signature check, by reason",
            ["reason"], registry=self.registry,
        )
        self.signature_verifications = Gauge(
            "keelson_signature_verifications", "ECDSA verifications performed so far (signature cache misses)",
            registry=self.registry, multiprocess_mode="livesum",
        )
        self.in_flight = Gauge(
            "keelson_requests_in_flight", "Requests being served now", registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.hijacked = Gauge(
            "keelson_hijacked_streams", "Open attach/exec/websocket sessions", registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.fanout_node_failures = Counter(
            "keelson_fanout_node_failures", "Nodes that failed during a fan-out, by node",
            ["node"], registry=self.registry,
        )
        self.api_version_adapted = Counter(
            "keelson_api_version_adapted", "Requests sent to this node's engine at another API version than the "
            "caller's, because the engine does not support it (down: the caller's is newer; up: older)",
            ["direction"], registry=self.registry,
        )
        self.connections_closed = Counter(
            "keelson_connections_closed", "Client connections closed by a limit before their request, by cause "
            "(head_timeout, head_too_large, head_budget, unproven_cap)", ["cause"], registry=self.registry,
        )
        self.cluster_members = Gauge(
            "keelson_cluster_members", "Alive members seen by this agent", registry=self.registry,
            multiprocess_mode="livemax",
        )

        self._request_children: dict[tuple[str, str, int], Any] = {}
        self._latency_children: dict[str, Any] = {}
        self._streamed = {d: self.bytes_streamed.labels(d) for d in ("download", "upload")}

    def request_done(self, route: str, method: str, status: int) -> None:
        """Count one finished request (the labelled child is looked up once per label set, not per request)."""
        key = (route, method if method in METHODS else "other", status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(route, key[1], str(status))
        child.inc()

    def observe_latency(self, route: str, seconds: float) -> None:
        """Record one time to the response headers."""
        child = self._latency_children.get(route)
        if child is None:
            child = self._latency_children[route] = self.latency.labels(route)
        child.observe(seconds)

    def streamed(self, direction: str) -> Any:
        """The byte counter of one direction ("download" or "upload")."""
        return self._streamed[direction]

    def render(self) -> bytes:
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not folder:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=folder)
        return generate_latest(merged)
