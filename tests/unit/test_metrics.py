"""The request counters: label sets bounded whatever a caller sends, cached children counting right."""

from __future__ import annotations

from agent.metrics import Metrics


def _series(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + "{")]


def test_unknown_methods_share_one_series() -> None:
    metrics = Metrics()
    for i in range(200):  # any token is a valid HTTP method: none of them may add a series
        metrics.request_done("docker", f"X{i}", 403)
    metrics.request_done("docker", "GET", 200)
    metrics.request_done("docker", "GET", 200)
    text = metrics.render().decode()
    series = _series(text, "keelson_requests_total")
    assert 'keelson_requests_total{method="other",route="docker",status="403"} 200.0' in series
    assert 'keelson_requests_total{method="GET",route="docker",status="200"} 2.0' in series
    assert len(series) == 2
    assert "X1" not in text


def test_latency_observed_per_route() -> None:
    metrics = Metrics()
    metrics.observe_latency("docker", 0.002)
    metrics.observe_latency("docker", 0.2)
    metrics.observe_latency("ping", 0.0001)
    text = metrics.render().decode()
    assert 'keelson_request_duration_seconds_count{route="docker"} 2.0' in text
    assert 'keelson_request_duration_seconds_bucket{le="0.0025",route="docker"} 1.0' in text
    assert 'keelson_request_duration_seconds_count{route="ping"} 1.0' in text


def test_streamed_bytes_by_direction() -> None:
    metrics = Metrics()
    metrics.streamed("download").inc(10)
    metrics.streamed("upload").inc(3)
    text = metrics.render().decode()
    assert 'keelson_bytes_streamed_total{direction="download"} 10.0' in text
    assert 'keelson_bytes_streamed_total{direction="upload"} 3.0' in text
