"""Prometheus metrics of one server (its own registry, so several can run in one process).

Exposed at ``/metrics`` in the Prometheus text format (prometheus_client: the
reference implementation, so the exposition format and its escaping are right
without pixicache maintaining them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    """The counters and gauges the server updates."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "pixicache_serve_requests",
            "Requests answered, by method, route and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.bytes_served = Counter(
            "pixicache_serve_bytes_served", "Response body bytes sent to clients", registry=r
        )
        self.cache = Counter(
            "pixicache_serve_cache",
            "Artifact requests by outcome: hit (from the store), miss (started a fill), "
            "coalesced (joined a fill in progress)",
            ["result"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "pixicache_serve_upstream_requests",
            "Requests sent upstream, by upstream name and kind (artifact, metadata)",
            ["upstream", "kind"],
            registry=r,
        )
        self.upstream_bytes = Counter(
            "pixicache_serve_upstream_bytes", "Body bytes received from upstreams", registry=r
        )
        self.upstream_errors = Counter(
            "pixicache_serve_upstream_errors",
            "Failed upstream transfers, by reason (status, connect, timeout, truncated, digest)",
            ["reason"],
            registry=r,
        )
        self.fills_in_flight = Gauge(
            "pixicache_serve_fills_in_flight", "Upstream downloads in progress", registry=r
        )
        self.connections = Gauge(
            "pixicache_serve_connections", "Open client connections", registry=r
        )
        self.store_bytes = Gauge(
            "pixicache_serve_store_bytes", "Bytes of committed blobs in the store", registry=r
        )
        self.store_blobs = Gauge(
            "pixicache_serve_store_blobs", "Committed blobs in the store", registry=r
        )
        self.evicted = Counter(
            "pixicache_serve_evicted_blobs", "Blobs removed to stay within --max-size", registry=r
        )
        self.refused = Counter(
            "pixicache_serve_refused",
            "Requests or connections refused, by reason (connections, per_client, path, store_full)",
            ["reason"],
            registry=r,
        )

    def count_front(self, answered: Callable[[], int], handed_off: Callable[[], int]) -> None:
        """Expose the front path's counts (:class:`pixicache.serve.front.FrontDoor`),
        read when the metrics are rendered: nothing is counted per request here."""
        self.registry.register(_FrontCollector(answered, handed_off))

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)


class _FrontCollector:
    def __init__(self, answered: Callable[[], int], handed_off: Callable[[], int]) -> None:
        self._answered, self._handed_off = answered, handed_off

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "pixicache_serve_front_answered",
            "Requests answered on the front path (repeated plain hits, without aiohttp)",
            value=self._answered(),
        )
        yield CounterMetricFamily(
            "pixicache_serve_front_handed_off",
            "Connections the front path handed to aiohttp (at a request it does not answer)",
            value=self._handed_off(),
        )
