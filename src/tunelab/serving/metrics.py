"""What ``/metrics`` reports, in Prometheus' text format (``prometheus_client``, one registry per server)."""

from __future__ import annotations

from typing import Callable

UNMATCHED = "unmatched"  # the endpoint label of every request that matched no route (404s of any path)


class Metrics:
    """Requests, tokens, latency, batch sizes, queue depth and loaded adapters of one server.

    Args:
        queue_depth: Returns the jobs waiting or decoding now.
        adapters: Returns the number of adapters loaded now.
    """

    def __init__(self, queue_depth: Callable[[], int], adapters: Callable[[], int]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        # ``endpoint`` is a route template (or UNMATCHED), never the raw path: clients must not grow the series.
        self.requests = Counter("tunelab_requests", "Requests answered, by endpoint, model and status code",
                                ["endpoint", "model", "status"], registry=self.registry)
        self.prompt_tokens = Counter("tunelab_prompt_tokens", "Prompt tokens processed", ["model"], registry=self.registry)
        self.completion_tokens = Counter("tunelab_completion_tokens", "Tokens generated", ["model"], registry=self.registry)
        self.latency = Histogram("tunelab_request_latency_seconds", "Time from admission to the full answer",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.batch_rows = Histogram("tunelab_batch_rows", "Prompts decoded together in one batch", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        Gauge("tunelab_queue_depth", "Requests waiting or decoding", registry=self.registry).set_function(queue_depth)
        Gauge("tunelab_loaded_adapters", "Adapters loaded besides the base", registry=self.registry).set_function(adapters)

    def observe_request(self, endpoint: str, model: str, status: int, seconds: float | None = None) -> None:
        self.requests.labels(endpoint, model, str(status)).inc()
        if seconds is not None:
            self.latency.labels(endpoint).observe(seconds)

    def observe_tokens(self, model: str, prompt: int, completion: int) -> None:
        self.prompt_tokens.labels(model).inc(prompt)
        self.completion_tokens.labels(model).inc(completion)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the exposition."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
