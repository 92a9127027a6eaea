"""Prometheus metrics, in a registry of the app's own (several apps in one process never collide).

With a batched runtime (``--max-streams``) the engine's own figures are read at scrape time:
slots, busy slots and sessions waiting for one (gauges), and frames, streams stepped and
seconds spent in frames (counters). ``streams_stepped / frames`` over an interval is the mean
batch occupancy, ``frame_seconds / frames`` the mean time of one batched frame.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# Time to first audio: tens of ms on tiny models, seconds when the queue is long.
_TTFA_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Real-time factor (wall time / audio time): < 1 is faster than real time.
_RTF_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0)


class EngineCollector(Collector):
    """The batch engine's ``stats()`` as metrics, read when /metrics is scraped (the engine
    counts on its own thread; copying its figures on every frame would cost a lock per frame)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        yield GaugeMetricFamily("dia2_engine_slots", "Batch slots: streams stepped together in one graph call",
                                value=stats.slots)
        yield GaugeMetricFamily("dia2_engine_busy_slots", "Batch slots held by a session now", value=stats.busy)
        yield GaugeMetricFamily("dia2_engine_waiting_sessions", "Sessions waiting for a batch slot now",
                                value=stats.waiting)
        yield CounterMetricFamily("dia2_engine_frames", "Batched frames stepped", value=stats.frames)
        yield CounterMetricFamily("dia2_engine_streams_stepped", "Streams stepped, summed over frames "
                                  "(/ frames: the mean batch occupancy)", value=stats.streams_stepped)
        yield CounterMetricFamily("dia2_engine_frame_seconds", "Seconds spent stepping batched frames "
                                  "(/ frames: the mean time per frame)", value=stats.frame_seconds)


class Metrics:
    def __init__(self, engine=None) -> None:
        """``engine``: the runtime's BatchEngine, whose figures join the metrics (None: unbatched)."""
        self.registry = CollectorRegistry()
        r = self.registry
        if engine is not None:
            r.register(EngineCollector(engine))
        self.requests = Counter("dia2_requests", "Finished requests by endpoint and outcome "
                                "(ok, client_error, busy, cancelled, timeout, error)",
                                ["endpoint", "outcome"], registry=r)
        self.queue_depth = Gauge("dia2_queue_depth", "Requests waiting for a worker", registry=r)
        self.busy_workers = Gauge("dia2_busy_workers", "Workers generating now", registry=r)
        self.workers = Gauge("dia2_workers", "Worker slots", registry=r)
        self.ttfa = Histogram("dia2_time_to_first_audio_seconds",
                              "From the first text the server had to the first audio out, queueing included",
                              buckets=_TTFA_BUCKETS, registry=r)
        self.queued = Histogram("dia2_queue_wait_seconds", "Time a request waited for a worker",
                                buckets=_TTFA_BUCKETS, registry=r)
        self.rtf = Histogram("dia2_real_time_factor", "Generation wall time per second of audio",
                             buckets=_RTF_BUCKETS, registry=r)
        self.audio_seconds = Counter("dia2_audio_seconds", "Seconds of audio generated", registry=r)

    def pool_changed(self, pool) -> None:
        self.queue_depth.set(pool.waiting)
        self.busy_workers.set(pool.busy)
        self.workers.set(pool.workers)

    def finished(self, endpoint: str, event) -> None:
        """Record a Finished job's figures."""
        result = event.result
        self.requests.labels(endpoint, "ok").inc()
        self.queued.observe(event.queued_seconds)
        if event.first_audio_seconds is not None:
            self.ttfa.observe(event.first_audio_seconds)
        if result.audio_seconds:
            self.rtf.observe(result.real_time_factor)
            self.audio_seconds.inc(result.audio_seconds)

    def outcome(self, endpoint: str, outcome: str) -> None:
        self.requests.labels(endpoint, outcome).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
