"""The web app's own Prometheus metrics (names documented in docs/streaming.md, "Metrics").

One registry per app, so two apps in one process (tests) never share counters.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# Latencies of a web request or a submit: from a millisecond (a cached read) to the publish time-out.
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class WebMetrics:
    """What the web app counts: requests, SSE followers and events, submit latency."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        disable_created_metrics()  # a `_created` timestamp per series is noise here (and doubles the output)
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "allinone_web_requests", "HTTP requests answered, by handler and status.", ["handler", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "allinone_web_request_seconds", "Time to the response's first byte, by handler.", ["handler"],
            buckets=_SECONDS, registry=r,
        )
        self.submit_seconds = Histogram(
            "allinone_web_submit_seconds", "Time to store and enqueue one message (POST ... /messages).",
            buckets=_SECONDS, registry=r,
        )
        self.sse_clients = Gauge("allinone_web_sse_clients", "Event streams open now.", registry=r)
        self.sse_events = Counter(
            "allinone_web_sse_events", "Events sent to SSE clients, by event type.", ["type"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware counting each request by the handler that answered it (the route, never the raw path, so
    ids do not explode the label set) and its time to the first byte."""

    def __init__(self, app: Any, metrics: WebMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500}

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                endpoint = scope.get("endpoint")
                self.metrics.request_seconds.labels(getattr(endpoint, "__name__", "none")).observe(
                    time.perf_counter() - t0
                )
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            endpoint = scope.get("endpoint")
            self.metrics.requests.labels(getattr(endpoint, "__name__", "none"), str(status["code"])).inc()
