"""Prometheus metrics of ``catalog-index serve``: requests by endpoint, method and status, a latency
histogram, client and server errors, and the loaded version.

One process keeps them in a private registry. ``--workers N`` shares them through prometheus_client's
multiprocess mode (``$PROMETHEUS_MULTIPROC_DIR``): a scrape of any worker adds up every worker's counts.
"""

from __future__ import annotations

import os
import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Endpoints get their own metric label; any other path is "other" (no label per scanned URL).
ENDPOINTS = frozenset({"/search", "/search/image", "/healthz", "/version", "/metrics", "/docs", "/redoc",
                        "/openapi.json", "/docs/oauth2-redirect"})
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _version_of(watcher):
    try:
        return watcher.current()
    except Exception:  # pylint: disable=broad-except - nothing loaded: no sample, the scrape still works
        return None


class _VersionCollector:
    """The loaded version as a labelled gauge, read from the watcher at scrape time (never stale)."""

    def __init__(self, watcher):
        self.watcher = watcher

    def collect(self):
        gauge = GaugeMetricFamily("catalog_index_loaded_version", "the index version and release being served "
                                  "(value 1)", labels=["version", "release"])
        items = GaugeMetricFamily("catalog_index_loaded_items", "items indexed in the version being served")
        searcher = _version_of(self.watcher)
        if searcher is not None:
            gauge.add_metric([str(searcher.version), str(searcher.release)], 1)
            indexed = (searcher.manifest or {}).get("counts", {}).get("indexed")
            if isinstance(indexed, int):
                items.add_metric([], indexed)
        yield gauge
        yield items


def _multiprocess() -> bool:
    """Whether the server runs as several processes (--workers N) that share their metrics through files."""
    return bool(os.environ.get(MULTIPROC_ENV))


class Metrics:
    """The service's Prometheus metrics.

    One process: a private registry, the loaded version read at scrape time. ``--workers N``: every
    worker writes its counts to files in $PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess
    mode) and a scrape, whichever worker answers it, adds up all of them; the loaded version is then a
    gauge per worker process (label ``pid``), set whenever that worker answers a request.
    """

    def __init__(self, watcher):
        from prometheus_client import Gauge, multiprocess

        self.watcher = watcher
        self.registry = CollectorRegistry(auto_describe=True)
        # In multiprocess mode the values live in files; the metrics are registered nowhere and the
        # scrape registry reads the files instead (registering both would count each sample twice).
        own = None if _multiprocess() else self.registry
        self.requests = Counter("catalog_index_http_requests", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=own)
        self.latency = Histogram("catalog_index_http_request_duration_seconds",
                                 "time from request to the end of the response, by endpoint",
                                 ["endpoint", "method"], buckets=_LATENCY_BUCKETS, registry=own)
        self.errors = Counter("catalog_index_http_errors", "error responses: kind=client (4xx) or server (5xx "
                              "and unhandled exceptions)", ["endpoint", "kind"], registry=own)
        self.version_gauge = None
        self._shown = None
        if _multiprocess():
            multiprocess.MultiProcessCollector(self.registry)
            self.version_gauge = Gauge("catalog_index_loaded_version", "the index version and release each "
                                       "worker process serves (value 1)", ["version", "release"], registry=None,
                                       multiprocess_mode="liveall")
            self.note_version()
        else:
            self.registry.register(_VersionCollector(watcher))

    def note_version(self):
        """Multiprocess mode: this worker's loaded version in its gauge (the previous one set to 0)."""
        searcher = _version_of(self.watcher)
        shown = None if searcher is None else (str(searcher.version), str(searcher.release))
        if self.version_gauge is None or shown == self._shown:
            return
        if self._shown is not None:
            self.version_gauge.labels(*self._shown).set(0)
        if shown is not None:
            self.version_gauge.labels(*shown).set(1)
        self._shown = shown

    def observe(self, endpoint, method, status, seconds):
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint, method).observe(seconds)
        if status >= 500:
            self.errors.labels(endpoint, "server").inc()
        elif status >= 400:
            self.errors.labels(endpoint, "client").inc()
        self.note_version()


class MetricsMiddleware:
    """Outermost ASGI layer: counts every response, including those of the layers inside it."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.observe(endpoint, scope["method"], status, time.perf_counter() - start)
