"""The serving state behind the HTTP routes: the server's job (its model and settings), the loaded pipelines and
their workers, the queue, the metrics, and the admission of a request (body -> checked job -> queued work).
Nothing here needs the HTTP packages."""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass

from ...errors import FastSD35Error
from .. import jobs
from .batching import Batcher, Work, Worker
from .metrics import Metrics
from .schema import ImageRequest, bad_request, plan_request

DEFAULT_MAX_QUEUE = 64  # images waiting
DEFAULT_MAX_BODY_BYTES = 1 << 20  # two prompts of the 20,000-character limit take ~80 KB of JSON at most
DEFAULT_REQUEST_TIMEOUT_S = 600.0
DEFAULT_WINDOW_S = 0.01
MAX_WINDOW_S = 10.0


@dataclass(frozen=True)
class Limits:
    """What the server accepts (README "Serve", "Limits")."""

    max_batch: int = 1  # images per forward pass (1: every image exactly as `fastsd35 run --from-png` makes it)
    max_queue: int = DEFAULT_MAX_QUEUE  # images waiting
    window_s: float = DEFAULT_WINDOW_S  # how long a worker waits to fill a pass (max_batch > 1)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S

    def check(self, label=lambda name: name):
        from ...pipeline.inputs import MAX_BATCH

        def whole(name, value, low, high):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise FastSD35Error(f"{label(name)} must be an integer from {low} to {high}, got {value!r}")

        def seconds(name, value, low, high, low_open):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value <= high
            ok = ok and (value > low if low_open else value >= low)
            if not ok:
                raise FastSD35Error(f"{label(name)} must be a number of seconds {'>' if low_open else '>='} {low:g} "
                                    f"and <= {high:g}, got {value!r}")

        whole("max_batch", self.max_batch, 1, MAX_BATCH)
        whole("max_queue", self.max_queue, 1, 1_000_000)
        whole("max_body_bytes", self.max_body_bytes, 1024, 64 << 20)
        seconds("window_s", self.window_s, 0, MAX_WINDOW_S, False)
        seconds("request_timeout_s", self.request_timeout_s, 0, 7 * 24 * 3600.0, True)
        return self


class Service:
    """One served model: `start(pipes)` once it is loaded (one worker per pipeline, i.e. per device), `stop()` to
    drain. `state` is "loading", "ready", "failed" or "stopping" (GET /health)."""

    def __init__(self, base: jobs.Job, name: str, limits: Limits = Limits(), api_key: str | None = None):
        self.base, self.name, self.limits, self.api_key = base, name, limits.check(), api_key
        self.metrics = Metrics()
        self.batcher = Batcher(self.metrics, max_batch=limits.max_batch, max_queue=limits.max_queue,
                               window_s=limits.window_s if limits.max_batch > 1 else 0.0)  # fmt: skip
        self.pipes: list = []
        self.workers: list[Worker] = []
        self.state = "loading"
        self.created = int(time.time())
        self.lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def start(self, pipes: list):
        with self.lock:
            if self.state != "loading":
                return
            self.pipes = list(pipes)
            self.batcher.workers = len(self.pipes)
            self.workers = [Worker(self.batcher, p, f"fastsd35-worker-{i}") for i, p in enumerate(self.pipes)]
            for w in self.workers:
                w.start()
            self.state = "ready"
            self.metrics.ready = True

    def failed(self):
        with self.lock:
            self.state = "failed"

    def stop(self):
        """Stop taking requests; queued requests not started get 503; running passes finish."""
        with self.lock:
            self.state = "stopping"
            self.metrics.ready = False
        self.batcher.close()

    def join(self, timeout: float | None = None):
        for w in self.workers:
            w.join(timeout)

    def admit(self, body: dict) -> Work:
        """A request body as queued work: planned by the job layer, every prompt checked to fit the T5 length (as
        the CLI checks before its first image), then queued (429 when the queue is full). Raises ApiError."""
        request: ImageRequest = plan_request(body, self.base, self.name, self.limits.max_queue)
        pipe = self.pipes[0]
        try:
            jobs.check_prompts_fit(request.job, pipe)
        except FastSD35Error as e:
            raise bad_request(str(e)) from None
        with warnings.catch_warnings():  # CLIP's truncation warning comes once, when the pass encodes the prompt
            warnings.simplefilter("ignore")
            tokens = pipe.text_encoders.tokenize([request.prompt, request.job.negative_prompt])
        t5_length = 0 if tokens.t5 is None else tokens.t5.shape[1]
        work = Work(request, (request.job.settings, t5_length))
        self.batcher.submit(work)
        return work
