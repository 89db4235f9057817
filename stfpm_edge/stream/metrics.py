"""Live Prometheus metrics of a run (``run --metrics-port N``, prometheus-client): per source, frames
read / inspected / dropped / failed / anomalous (counters read from the run's own ``Counters`` at
scrape time, so they always agree with ``summary.json``), FPS since the previous scrape, and per-stage
latency histograms. Served on 127.0.0.1 unless another address is given.

    stfpm_frames_total{source="...", state="read|inspected|dropped|failed|anomalous"}
    stfpm_fps{source="..."}
    stfpm_drift{source="..."}                       1 while drift is raised (stfpm_edge.drift), else 0
    stfpm_drift_shift{source="...", quantity="score|brightness|contrast|sharpness"}  recent median - reference, in spreads
    stfpm_stage_latency_seconds_bucket{source="...", stage="wait|preprocess|inference|postprocess|output|end_to_end", le="..."}
"""

from __future__ import annotations

import time

from ..errors import StfpmError
from .outputs import Output

STATES = ("read", "inspected", "dropped", "failed", "anomalous")
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)


class _CountersCollector:
    def __init__(self, per_source, names):
        self.per_source, self.names = per_source, names
        self._last = [(time.perf_counter(), 0) for _ in per_source]

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        frames = CounterMetricFamily("stfpm_frames", "Frames per source and state (read = inspected + failed + dropped)", labels=["source", "state"])
        fps = GaugeMetricFamily("stfpm_fps", "Frames inspected per second since the previous scrape", labels=["source"])
        drift = GaugeMetricFamily("stfpm_drift", "1 while the good frames have drifted from the training images, else 0", labels=["source"])
        shift = GaugeMetricFamily("stfpm_drift_shift", "Median of the recent good frames minus the training reference, in reference spreads",
                                  labels=["source", "quantity"])
        now = time.perf_counter()
        for i, (c, name) in enumerate(zip(self.per_source, self.names)):
            if c.drift is not None:
                drift.add_metric([name], float(c.drift.drifting))
                for q, z in c.drift.z.items():
                    shift.add_metric([name, q], z)
            for state in STATES:
                frames.add_metric([name, state], getattr(c, state))
            t0, n0 = self._last[i]
            fps.add_metric([name], (c.inspected - n0) / (now - t0) if now > t0 else 0.0)
            self._last[i] = (now, c.inspected)
        yield frames
        yield fps
        yield drift
        yield shift


class LiveMetrics(Output):
    """Serves the metrics from ``start()`` to ``close()``; observes each inspected frame's stage latencies."""

    def __init__(self, port: int, host: str, per_source: list, names: list[str]):
        try:
            from prometheus_client import CollectorRegistry, Histogram
        except ImportError:
            raise StfpmError("--metrics-port needs prometheus-client (pip install 'stfpm-edge[serve]')") from None
        self.port, self.host, self.names = port, host, names
        self.registry = CollectorRegistry()
        self.latency = Histogram("stfpm_stage_latency_seconds", "Per-stage latency of inspected frames", ["source", "stage"],
                                 buckets=BUCKETS, registry=self.registry)
        self.registry.register(_CountersCollector(per_source, names))
        self._server = None

    def start(self) -> "LiveMetrics":
        from prometheus_client import start_http_server

        try:
            self._server, _ = start_http_server(self.port, addr=self.host, registry=self.registry)
        except OSError as exc:
            raise StfpmError(f"--metrics-port {self.port}: cannot listen on {self.host} ({exc.strerror or exc})") from None
        self.port = self._server.server_port
        return self

    def write(self, insp, picture) -> None:
        name = self.names[insp.source]
        for stage, ms in insp.latency_ms.items():
            self.latency.labels(name, stage).observe(ms / 1e3)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
