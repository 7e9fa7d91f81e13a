"""Prometheus metrics on a listener of their own (scrapers send no secret).

``prometheus_client`` is needed only when ``metrics_listen`` is set, so it is
imported here and nowhere else.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import falcon
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from ares_deployd.config import Listen
from ares_deployd.store import Deployment, Store

log = logging.getLogger(__name__)

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600)


class _Running:
    """Deployments running now, read from the history at each scrape."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "ares_deployd_deployments_running",
            "Deployments running now, by target",
            labels=["target"],
        )
        counts: dict[str, int] = {}
        for deployment in self._store.running():
            counts[deployment.target] = counts.get(deployment.target, 0) + 1
        for target, count in sorted(counts.items()):
            family.add_metric([target], count)
        yield family


class _Services:
    """Each service's state as a gauge, from the service monitor at each scrape."""

    def __init__(self, states: Callable[[], dict[str, str]]) -> None:
        self._states = states

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "ares_deployd_service_state",
            "1 for the state each service is in, 0 for the others",
            labels=["service", "state"],
        )
        for service, state in sorted(self._states().items()):
            for candidate in ("running", "degraded", "stopped"):
                family.add_metric([service, candidate], int(candidate == state))
        yield family


class Metrics:
    """The daemon's metrics, fed by the runner, the notifier and the API."""

    def __init__(self, store: Store) -> None:
        self.registry = CollectorRegistry()
        self.started = Counter(
            "ares_deployd_deployments_started",
            "Deployments started, by target",
            ["target"],
            registry=self.registry,
        )
        self.finished = Counter(
            "ares_deployd_deployments_finished",
            "Deployments finished, by target and status",
            ["target", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "ares_deployd_deployment_duration_seconds",
            "How long deployments took, from start to final status",
            ["target"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "ares_deployd_http_requests",
            "API requests answered, by route and status code",
            ["route", "method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ares_deployd_http_request_duration_seconds",
            "Time to answer API requests, by route",
            ["route"],
            registry=self.registry,
        )
        self.streams = Gauge(
            "ares_deployd_streams_open",
            "Event streams open now",
            registry=self.registry,
        )
        self.notifications = Counter(
            "ares_deployd_notifications",
            "Notification delivery attempts, by result (sent, failed, dropped)",
            ["result"],
            registry=self.registry,
        )
        self.registry.register(_Running(store))
        self._server: Any = None

    def watch_streams(self, count: Callable[[], int]) -> None:
        self.streams.set_function(count)

    def watch_services(self, states: Callable[[], dict[str, str]]) -> None:
        self.registry.register(_Services(states))

    def deployment_started(self, deployment: Deployment) -> None:
        self.started.labels(deployment.target).inc()

    def deployment_finished(self, deployment: Deployment) -> None:
        self.finished.labels(deployment.target, deployment.status).inc()
        if deployment.finished is not None:
            elapsed = deployment.finished - deployment.started
            self.duration.labels(deployment.target).observe(elapsed)

    def notification(self, result: str) -> None:
        self.notifications.labels(result).inc()

    def serve(self, listen: Listen) -> None:
        from prometheus_client import start_http_server

        self._server = start_http_server(
            listen.port, addr=listen.host, registry=self.registry
        )
        log.info("metrics on http://%s/metrics", listen)

    def stop(self) -> None:
        # Older releases return nothing to stop; their thread is a daemon one.
        server = self._server[0] if isinstance(self._server, tuple) else self._server
        if server is not None and hasattr(server, "shutdown"):
            server.shutdown()


class RequestMetrics:
    """Falcon middleware that counts and times every answered request."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.metrics_start = time.perf_counter()

    def process_response(
        self,
        req: falcon.Request,
        resp: falcon.Response,
        resource: object,
        req_succeeded: bool,
    ) -> None:
        route = req.uri_template if resource is not None else "unmatched"
        code = str(resp.status).split()[0] if resp.status else "200"
        self._metrics.requests.labels(route or "unmatched", req.method, code).inc()
        start = getattr(req.context, "metrics_start", None)
        if start is not None:
            elapsed = time.perf_counter() - start
            self._metrics.latency.labels(route or "unmatched").observe(elapsed)
