"""Prometheus metrics of one appservice, in a registry of its own.

Each :class:`Metrics` owns a private ``CollectorRegistry`` (never the global
one), so several appservices in one process, or in one test session, never
clash over metric names. A ``Metrics`` is also a homeserver-client observer:
append it to ``HomeserverClient.observers`` and it counts homeserver errors,
registrations, rate limits and retries by itself.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from bridge_kit.client.homeserver import ClientObserver
from bridge_kit.inbox.records import InboxStats

_REGISTER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TRANSACTION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 60.0)
_HANDLER_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics(ClientObserver):
    """Counters and histograms of an appservice, rendered in the Prometheus text format.

    ``namespace`` prefixes every metric name (default ``bridge_kit``).
    """

    def __init__(self, namespace: str = "bridge_kit") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.transactions = self._counter(
            namespace, "transactions", "Transactions accepted into the inbox"
        )
        self.events = self._counter(namespace, "events", "Events in accepted transactions")
        self.duplicate_transactions = self._counter(
            namespace,
            "duplicate_transactions",
            "Transactions answered without processing because their txnId and body were "
            "accepted before",
        )
        self.reused_txn_ids = self._counter(
            namespace,
            "reused_txn_ids",
            "Transactions accepted as new although their txnId was seen before with another "
            "body (the homeserver numbers its transactions anew, e.g. after a restart)",
        )
        self.refused_transactions = Counter(
            "refused_transactions",
            "Transactions refused as too large (413), by reason (body or items); the "
            "homeserver sends them again forever, so delivery is stuck until a limit is raised",
            ["reason"],
            namespace=namespace,
            registry=self.registry,
        )
        self.handler_failures = self._counter(
            namespace, "handler_failures", "Transactions that could not be accepted (answered 500)"
        )
        self.transaction_seconds = Histogram(
            "transaction_seconds",
            "Time to accept one transaction: parse, store in the inbox and dedup record",
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
        self.provisioning_refused = self._counter(
            namespace,
            "provisioning_refused",
            "User queries answered 'no such user' because puppets.provision_per_minute or "
            "puppets.provision_per_day was reached",
        )
        self.retries = Counter(
            "retries",
            "Requests to the homeserver retried, by reason",
            ["reason"],
            namespace=namespace,
            registry=self.registry,
        )

        self._add_inbox_metrics(namespace)

    def _add_inbox_metrics(self, namespace: str) -> None:
        self._oldest_received_at: float | None = None
        self.inbox_events = Gauge(
            "inbox_events",
            "Events waiting in the inbox",
            namespace=namespace,
            registry=self.registry,
        )
        oldest = Gauge(
            "inbox_oldest_seconds",
            "Age of the oldest event waiting in the inbox (0 when it is empty)",
            namespace=namespace,
            registry=self.registry,
        )
        oldest.set_function(self._oldest_age)
        self.parked_events = Gauge(
            "parked_events",
            "Events parked outside their room's lane, waiting (for a room key)",
            namespace=namespace,
            registry=self.registry,
        )
        self.dead_letters = Gauge(
            "dead_letters", "Events set aside as dead letters", namespace=namespace,
            registry=self.registry,
        )  # fmt: skip
        self.dead_lettered = Counter(
            "dead_lettered",
            "Events made dead letters, by reason (handler: it kept failing; invalid: malformed;"
            " not_ready: it waited too long, e.g. for a room key)",
            ["reason"],
            namespace=namespace,
            registry=self.registry,
        )
        self.handler_retries = self._counter(
            namespace, "handler_retries", "Handler failures that will be retried"
        )
        self.handler_seconds = Histogram(
            "handler_seconds",
            "Time one handler took for one event, by event type",
            ["event_type"],
            namespace=namespace,
            buckets=_HANDLER_BUCKETS,
            registry=self.registry,
        )

    def _oldest_age(self) -> float:
        oldest = self._oldest_received_at
        return 0.0 if oldest is None else max(0.0, time.time() - oldest)

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

    def count_reused_txn_id(self) -> None:
        """A txnId seen before came with another body and was accepted as new."""
        self.reused_txn_ids.inc()

    def count_refused_transaction(self, reason: str) -> None:
        """A transaction was refused with 413 (``reason``: ``body`` or ``items``)."""
        self.refused_transactions.labels(reason=reason).inc()

    def count_handler_failure(self) -> None:
        """A transaction handler raised."""
        self.handler_failures.inc()

    def set_inbox(self, stats: InboxStats, parked: int = 0) -> None:
        """The inbox as last read from the store (and how many items are parked)."""
        self.inbox_events.set(stats.depth)
        self.parked_events.set(parked)
        self.dead_letters.set(stats.dead_letters)
        self._oldest_received_at = stats.oldest_received_at

    def observe_handler(self, event_type: str, seconds: float) -> None:
        """One handler ran for one event of ``event_type`` in ``seconds``."""
        self.handler_seconds.labels(event_type=event_type).observe(seconds)

    def count_handler_retry(self) -> None:
        """A handler failed and its event will be tried again."""
        self.handler_retries.inc()

    def count_dead_letter(self, reason: str, count: int = 1) -> None:
        """``count`` events became dead letters (``handler`` or ``invalid``)."""
        self.dead_lettered.labels(reason=reason).inc(count)

    # -- homeserver side -------------------------------------------------------

    def count_puppets_registered(self, count: int = 1) -> None:
        """``count`` puppets were newly created on the homeserver."""
        self.puppets_registered.inc(count)

    def observe_register_latency(self, seconds: float) -> None:
        """One register request took ``seconds``."""
        self.register_latency.observe(seconds)

    def count_provisioning_refused(self) -> None:
        """A user query would have registered a puppet, but the provisioning limit said no."""
        self.provisioning_refused.inc()

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
