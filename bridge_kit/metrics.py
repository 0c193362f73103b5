"""Prometheus metrics of one appservice, in a registry of its own.

Each :class:`Metrics` owns a private ``CollectorRegistry`` (never the global
one), so several appservices in one process, or in one test session, never
clash over metric names. A ``Metrics`` is also a homeserver-client observer:
append it to ``HomeserverClient.observers`` and it counts homeserver errors,
registrations, rate limits and retries by itself.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from bridge_kit.client import ClientObserver

_REGISTER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TRANSACTION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 60.0)


class Metrics(ClientObserver):
    """Counters and histograms of an appservice, rendered in the Prometheus text format.

    ``namespace`` prefixes every metric name (default ``bridge_kit``).
    """

    def __init__(self, namespace: str = "bridge_kit") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.transactions = self._counter(
            namespace, "transactions", "Transactions processed successfully"
        )
        self.events = self._counter(namespace, "events", "Events in transactions processed")
        self.duplicate_transactions = self._counter(
            namespace,
            "duplicate_transactions",
            "Transactions answered without processing because their txnId was already done",
        )
        self.handler_failures = self._counter(
            namespace, "handler_failures", "Transactions whose handler raised (answered 500)"
        )
        self.transaction_seconds = Histogram(
            "transaction_seconds",
            "Time to process one transaction, handler and dedup record included",
            namespace=namespace,
            buckets=_TRANSACTION_BUCKETS,
            registry=self.registry,
        )
        self.puppets_registered = self._counter(
            namespace, "puppets_registered", "Puppets newly registered on the homeserver"
        )
        self.register_latency = Histogram(
            "register_latency_seconds",
            "Latency of one register request to the homeserver",
            namespace=namespace,
            buckets=_REGISTER_BUCKETS,
            registry=self.registry,
        )
        self.homeserver_errors = Counter(
            "homeserver_errors",
            "Error responses from the homeserver, by errcode (HTTP_<status> when none)",
            ["errcode"],
            namespace=namespace,
            registry=self.registry,
        )
        self.rate_limited = self._counter(
            namespace, "rate_limited", "429 responses the client waited out"
        )
        self.retries = Counter(
            "retries",
            "Requests to the homeserver retried, by reason",
            ["reason"],
            namespace=namespace,
            registry=self.registry,
        )

    def _counter(self, namespace: str, name: str, documentation: str) -> Counter:
        return Counter(name, documentation, namespace=namespace, registry=self.registry)

    # -- appservice side -------------------------------------------------------

    def count_transaction(self, events: int, seconds: float) -> None:
        """One transaction of ``events`` events was processed in ``seconds``."""
        self.transactions.inc()
        self.events.inc(events)
        self.transaction_seconds.observe(seconds)

    def count_duplicate(self) -> None:
        """A transaction was answered from the dedup record, not processed."""
        self.duplicate_transactions.inc()

    def count_handler_failure(self) -> None:
        """A transaction handler raised."""
        self.handler_failures.inc()

    # -- homeserver side -------------------------------------------------------

    def count_puppets_registered(self, count: int = 1) -> None:
        """``count`` puppets were newly created on the homeserver."""
        self.puppets_registered.inc(count)

    def observe_register_latency(self, seconds: float) -> None:
        """One register request took ``seconds``."""
        self.register_latency.observe(seconds)

    def count_homeserver_error(self, errcode: str) -> None:
        """The homeserver answered an error with ``errcode``."""
        self.homeserver_errors.labels(errcode=errcode).inc()

    # -- client observer interface ----------------------------------------------

    def on_response(
        self, method: str, endpoint: str, status: int, errcode: str | None, seconds: float
    ) -> None:
        """Count a homeserver response: errors by errcode, register latency and successes."""
        if status >= 400:
            self.count_homeserver_error(errcode or f"HTTP_{status}")
        if _is_register(method, endpoint):
            self.observe_register_latency(seconds)
            if status == 200:
                self.count_puppets_registered()

    def on_rate_limited(self, delay: float) -> None:
        """The client got a 429 and waits ``delay`` seconds."""
        self.rate_limited.inc()

    def on_retry(self, reason: str, delay: float) -> None:
        """The client retries a request after ``delay`` seconds because of ``reason``."""
        self.retries.labels(reason=reason).inc()

    # -- output ------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition: ``(body, content_type)``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _is_register(method: str, endpoint: str) -> bool:
    return method.upper() == "POST" and endpoint.rstrip("/").endswith("/register")
