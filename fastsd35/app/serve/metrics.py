"""The server's counters, as `GET /metrics` gives them in the Prometheus text format (version 0.0.4): queue depth,
running images, batch sizes, images made, request latency, and errors by kind. Written out by hand (a few lines)
rather than with prometheus_client, so the server needs no more packages. Thread-safe: the HTTP loop and the
worker threads both update it."""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
ERROR_KINDS = ("bad_request", "unauthorized", "not_found", "body_too_large", "queue_full", "timeout",
               "disconnected", "out_of_memory", "not_ready", "shutting_down", "internal")  # fmt: skip


@dataclass
class Histogram:
    buckets: tuple
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self):
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float):
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            out.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]
        return out


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.queued_images = 0
        self.queued_requests = 0
        self.running_images = 0
        self.images = 0
        self.requests = 0  # answered with images
        self.errors = dict.fromkeys(ERROR_KINDS, 0)
        self.batch = Histogram(BATCH_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS_S)
        self.image_seconds = 0.0  # worker time per image made, for Retry-After estimates
        self.ready = False

    def error(self, kind: str):
        with self.lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def answered(self, seconds: float, images: int):
        with self.lock:
            self.requests += 1
            self.latency.observe(seconds)

    def ran(self, images: int, seconds: float):
        """A batch of `images` finished in `seconds`."""
        with self.lock:
            self.batch.observe(images)
            self.images += images
            self.image_seconds += seconds

    def seconds_per_image(self) -> float | None:
        with self.lock:
            return self.image_seconds / self.images if self.images else None

    def render(self) -> str:
        with self.lock:
            lines = [
                "# HELP fastsd35_ready 1 once the model is loaded and the server takes requests.",
                "# TYPE fastsd35_ready gauge", f"fastsd35_ready {int(self.ready)}",
                "# HELP fastsd35_queue_images Images waiting for a worker.",
                "# TYPE fastsd35_queue_images gauge", f"fastsd35_queue_images {self.queued_images}",
                "# HELP fastsd35_queue_requests Requests with images waiting for a worker.",
                "# TYPE fastsd35_queue_requests gauge", f"fastsd35_queue_requests {self.queued_requests}",
                "# HELP fastsd35_running_images Images being generated now.",
                "# TYPE fastsd35_running_images gauge", f"fastsd35_running_images {self.running_images}",
                "# HELP fastsd35_images_total Images generated.",
                "# TYPE fastsd35_images_total counter", f"fastsd35_images_total {self.images}",
                "# HELP fastsd35_requests_total Requests answered with images.",
                "# TYPE fastsd35_requests_total counter", f"fastsd35_requests_total {self.requests}",
                "# HELP fastsd35_batch_images Images per forward pass (batch size).",
                "# TYPE fastsd35_batch_images histogram", *self.batch.lines("fastsd35_batch_images"),
                "# HELP fastsd35_request_seconds Time from a request's arrival to its answer with images.",
                "# TYPE fastsd35_request_seconds histogram", *self.latency.lines("fastsd35_request_seconds"),
                "# HELP fastsd35_errors_total Requests refused or failed, by kind.",
                "# TYPE fastsd35_errors_total counter",
                *(f'fastsd35_errors_total{{kind="{k}"}} {v}' for k, v in self.errors.items()),
            ]  # fmt: skip
        return "\n".join(lines) + "\n"
