"""`/metrics`: what the server is doing, in Prometheus' text format (prometheus_client).

The names are the ones vLLM's dashboards use, under a `gemmalite:` prefix, so a dashboard made
for one maps onto the other by the prefix. Each app has a registry of its own, so that several
apps in one process (tests) never share counters. Gauges are read from the scheduler when
scraped; counters and histograms are fed once per request, when it ends (see RequestRecord).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

PREFIX = "gemmalite:"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self, model: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self.model = model
        self.scheduler = None  # set once the model is loaded
        labels = ["model_name"]
        r = self.registry

        def gauge(name, doc, read):
            g = Gauge(PREFIX + name, doc, labels, registry=r)
            g.labels(model).set_function(lambda: read(self.scheduler) if self.scheduler is not None else 0)

        gauge("num_requests_running", "Requests in a slot (prefilling or decoding).", lambda s: s.status()["busy"])
        gauge("num_requests_waiting", "Requests waiting for a free slot.", lambda s: s.status()["queued"])
        gauge("kv_cache_usage_perc", "Part of the KV cache's token capacity held by requests in flight (0 to 1).",
              lambda s: s.cache_usage())  # fmt: skip
        gauge("num_slots", "Slots: requests decoded together (--parallel).", lambda s: s.parallel)
        for name, doc, read in (
            ("spec_decode_num_drafts", "Speculative verification forwards run.", lambda c: c.rounds),
            ("spec_decode_num_draft_tokens", "Tokens drafted (prompt lookup, predictions, a draft model).", lambda c: c.drafted),
            ("spec_decode_num_accepted_tokens", "Drafted tokens accepted.", lambda c: c.accepted),
        ):
            r.register(SchedulerCount(self, name, doc, read))
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished requests.", labels, registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", labels, registry=r)
        self.cache_hits = Counter(PREFIX + "prefix_cache_hit_tokens", "Prompt tokens served from a slot's cache.", labels, registry=r)  # fmt: skip
        self.successes = Counter(PREFIX + "request_success", "Finished requests, by finish reason.", [*labels, "finished_reason"], registry=r)  # fmt: skip
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time from a request's arrival to its first token.",
                              labels, buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.token_gap = Histogram(PREFIX + "inter_token_latency_seconds", "Time between a request's successive tokens.",
                                   labels, buckets=TOKEN_GAP_BUCKETS, registry=r)  # fmt: skip
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Time from a request's arrival to its end.",
                             labels, buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        r.register(DecodeSteps(self))

    def observe(self, record) -> None:
        """Count a finished request (a RequestRecord)."""
        m = self.model
        self.prompt_tokens.labels(m).inc(record.prompt_tokens)
        self.generation_tokens.labels(m).inc(record.completion_tokens)
        self.cache_hits.labels(m).inc(record.cached_tokens)
        self.successes.labels(m, record.finish_reason or "abort").inc()
        if record.first_token is not None:
            self.ttft.labels(m).observe(record.first_token - record.arrived)
        for gap in record.token_gaps:
            self.token_gap.labels(m).observe(gap)
        self.e2e.labels(m).observe(record.ended - record.arrived)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class SchedulerCount:
    """A counter the scheduler keeps (its speculative rounds), read when scraped."""

    def __init__(self, metrics: Metrics, name: str, doc: str, read):
        self.metrics, self.name, self.doc, self.read = metrics, PREFIX + name, doc, read

    def describe(self):
        return [CounterMetricFamily(self.name, self.doc, labels=["model_name"])]

    def collect(self):
        family = self.describe()[0]
        scheduler = self.metrics.scheduler
        family.add_metric([self.metrics.model], self.read(scheduler.draft_counts) if scheduler is not None else 0)
        yield family


class DecodeSteps:
    """`gemmalite:decode_steps_total` by batch size: how many rows the decode steps have run."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self):
        return [CounterMetricFamily(PREFIX + "decode_steps", "Decode steps run, by batch size.", labels=["model_name", "batch_size"])]

    def collect(self):
        family = self.describe()[0]
        scheduler = self.metrics.scheduler
        for size, steps in sorted(dict(scheduler.decode_steps if scheduler is not None else {}).items()):
            family.add_metric([self.metrics.model, str(size)], steps)
        yield family
