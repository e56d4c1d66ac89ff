"""The queue and the workers: requests wait in one bounded queue; each worker (one per loaded pipeline, i.e. per
device) takes the next pass, runs it and turns its images into PNGs with their records.

A pass holds images that can share a forward pass: the same settings (size, steps, cfg, shift, sampler, SLG) and the
same T5 length (prompts padded to different lengths would be conditioned differently). The LoRAs are the server's.
With `max_batch` 1 (the default) every image is its own pass, computed exactly as `fastsd35 run --from-png` computes it
from the image's record: bit for bit, whatever else is queued. With `max_batch` N > 1 a pass takes up to N images of
the oldest request's group, from any number of requests, in arrival order; a seed keeps its noise, but the GEMMs and
convolutions of a larger batch round differently in the last bits (README "Serve"), so a batched image may differ by a
level here and there from the same request served alone. A worker that finds less than a full pass waits up to
`window_s` after the oldest request's arrival for more; it never waits while a full pass is queued.

Failures stay with their request: a pass of several requests that fails with a user error (out of GPU memory, a
non-finite result, an SLG layer the model lacks) runs each request alone, so that only the one that fails alone gets
the error. A request whose client has gone (disconnected, timed out) is taken out of the queue, and a running pass
whose requests have all gone stops at its next step.
"""

from __future__ import annotations

import concurrent.futures
import math
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from functools import partial

import torch

from ...errors import FastSD35Error
from ...pipeline.runner import Generation
from ...pipeline.sampling import CFGDenoiser
from .. import jobs
from .metrics import Metrics
from .schema import ApiError, ImageRequest


class Cancelled(Exception):
    """Every request of a running pass has gone: the pass stops."""


class StoppableDenoiser(CFGDenoiser):
    """CFGDenoiser that asks `stop()` before each step and raises Cancelled when it says so (same numerics)."""

    def __init__(self, *args, stop, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop = stop

    def __call__(self, x, sigma, step):
        if self.stop():
            raise Cancelled
        return super().__call__(x, sigma, step)


@dataclass(eq=False)
class Work:
    """One request in the queue: its images are handed to passes in order; the future gets the PNGs (name, bytes)
    in image order, or an ApiError."""

    request: ImageRequest
    key: tuple  # what a pass shares: (settings, T5 length)
    arrived: float = field(default_factory=time.monotonic)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    taken: int = 0  # images handed to passes
    pngs: list = field(default_factory=list)
    cancelled: bool = False

    def __post_init__(self):
        self.pngs = [None] * self.request.n

    @property
    def waiting(self) -> int:
        return self.request.n - self.taken

    def settle(self, result=None, error: BaseException | None = None):
        if self.future.done():
            return
        try:
            self.future.set_exception(error) if error is not None else self.future.set_result(result)
        except concurrent.futures.InvalidStateError:  # cancelled by the HTTP side meanwhile
            pass


@dataclass
class Slice:
    work: Work
    start: int
    stop: int

    @property
    def seeds(self) -> list[int]:
        return self.work.request.seeds[self.start : self.stop]


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down: retry on another instance", kind="server_error",
                    code="shutting_down", metric="shutting_down")  # fmt: skip


class Batcher:
    """The bounded queue (at most `max_queue` images waiting) and the choice of each worker's next pass."""

    def __init__(self, metrics: Metrics, *, max_batch: int = 1, max_queue: int = 64, window_s: float = 0.0,
                 workers: int = 1):
        self.metrics, self.max_batch, self.max_queue, self.window_s = metrics, max_batch, max_queue, window_s
        self.workers = workers
        self.cond = threading.Condition()
        self.pending: list[Work] = []
        self.closed = False

    def _count(self):
        self.metrics.queued_images = sum(w.waiting for w in self.pending)
        self.metrics.queued_requests = len(self.pending)

    def submit(self, work: Work):
        """Queue `work`, or raise ApiError: 429 (with Retry-After) when its images do not fit in the queue, 503 when
        the server is stopping."""
        with self.cond:
            if self.closed:
                raise shutting_down()
            queued = sum(w.waiting for w in self.pending)
            if queued + work.request.n > self.max_queue:
                per_image = self.metrics.seconds_per_image() or 1.0
                retry = max(1, math.ceil((queued + self.metrics.running_images) * per_image / self.workers))
                raise ApiError(429, f"the queue is full ({queued} images waiting, at most {self.max_queue}): retry "
                                    f"after {retry} s", kind="rate_limit_error", code="queue_full",
                               headers={"Retry-After": str(retry)}, metric="queue_full")  # fmt: skip
            self.pending.append(work)
            self._count()
            self.cond.notify_all()

    def cancel(self, work: Work):
        """The client has gone: drop its waiting images; a running pass stops once all its requests have gone."""
        with self.cond:
            work.cancelled = True
            if work in self.pending:
                self.pending.remove(work)
                self._count()

    def close(self):
        """Stop taking requests: requests not started yet get 503; images of started ones still run."""
        with self.cond:
            self.closed = True
            for work in [w for w in self.pending if w.taken == 0]:
                self.pending.remove(work)
                work.settle(error=shutting_down())
            self._count()
            self.cond.notify_all()

    def take(self) -> list[Slice] | None:
        """The next pass (blocking); None once closed and nothing is left."""
        with self.cond:
            while True:
                if not self.pending:
                    if self.closed:
                        return None
                    self.cond.wait()
                    continue
                oldest = self.pending[0]
                group = [w for w in self.pending if w.key == oldest.key]
                wait = oldest.arrived + self.window_s - time.monotonic()
                if sum(w.waiting for w in group) < self.max_batch and wait > 0 and not self.closed:
                    self.cond.wait(wait)
                    continue
                slices, room = [], self.max_batch
                for work in group:
                    k = min(room, work.waiting)
                    slices.append(Slice(work, work.taken, work.taken + k))
                    work.taken += k
                    room -= k
                    if not work.waiting:
                        self.pending.remove(work)
                    if not room:
                        break
                self._count()
                return slices

    def drop(self, work: Work):
        """A failed request: its waiting images are not run."""
        with self.cond:
            if work in self.pending:
                self.pending.remove(work)
                self._count()


class Worker(threading.Thread):
    """Runs passes on one pipeline until the batcher closes."""

    def __init__(self, batcher: Batcher, pipe, name: str = "fastsd35-worker"):
        super().__init__(name=name, daemon=True)
        self.batcher, self.pipe = batcher, pipe

    def run(self):
        while (slices := self.batcher.take()) is not None:
            self.run_pass(slices)

    def run_pass(self, slices: list[Slice]):
        live = [s for s in slices if not s.work.cancelled and not s.work.future.done()]
        n = sum(s.stop - s.start for s in live)
        if not n:
            return
        metrics = self.batcher.metrics
        with metrics.lock:
            metrics.running_images += n
        try:
            self._run(live)
        finally:
            with metrics.lock:
                metrics.running_images -= n

    def _run(self, live: list[Slice]):
        started = time.perf_counter()
        try:
            gen = self.generate(live)
            for s, images in _split(gen, live):
                for i, png in zip(range(s.start, s.stop), jobs.png_files(s.work.request.job, images, self.pipe)):
                    s.work.pngs[i] = png
            self.batcher.metrics.ran(sum(s.stop - s.start for s in live), time.perf_counter() - started)
            for s in live:  # counted first: an answered request finds its images in /metrics
                if all(p is not None for p in s.work.pngs):
                    s.work.settle(s.work.pngs)
        except Cancelled:
            pass
        except (FastSD35Error, torch.cuda.OutOfMemoryError) as e:
            _release_memory(self.pipe)
            if len(live) > 1:  # several requests (one slice each): find the one that fails alone
                for s in live:
                    if not s.work.cancelled and not s.work.future.done():
                        self._run([s])
            else:
                self.fail(live[0].work, e)
        except Exception as e:  # a bug: every request of the pass gets a 500, the traceback goes to the log
            traceback.print_exc(file=sys.stderr)
            for s in live:
                self.fail(s.work, e)

    def fail(self, work: Work, e: BaseException):
        self.batcher.drop(work)
        if isinstance(e, torch.cuda.OutOfMemoryError) or str(e).startswith("out of GPU memory"):
            error = ApiError(400, f"{e} (for this request: lower n or size)" if isinstance(e, FastSD35Error) else
                             "out of GPU memory: lower n or size", code="out_of_memory", metric="out_of_memory")
        elif isinstance(e, FastSD35Error):
            error = ApiError(400, str(e))
        else:
            error = ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error", metric="internal")
        work.settle(error=error)

    def generate(self, slices: list[Slice]) -> Generation:
        """One pass: every image of `slices` with its own prompt, negative prompt and seed, on the first request's
        settings (the pass's key makes them the same for all)."""
        first = slices[0].work.request.job
        prompts, negatives, seeds = [], [], []
        for s in slices:
            job = s.work.request.job
            prompts += [job.prompts[0]] * (s.stop - s.start)
            negatives += [job.negative_prompt] * (s.stop - s.start)
            seeds += s.seeds
        works = [s.work for s in slices]
        stop = partial(_all_gone, works)
        kwargs = jobs.generate_kwargs(replace(first, seed=seeds[0], batch_size=1), None,
                                      partial(StoppableDenoiser, stop=stop))
        kwargs.update(negative_prompt=negatives, seeds=seeds, progress=False)
        return self.pipe.generate(prompts, **kwargs)


def _all_gone(works) -> bool:
    return all(w.cancelled or w.future.done() for w in works)


def _split(gen: Generation, slices: list[Slice]):
    at = 0
    for s in slices:
        k = s.stop - s.start
        yield s, Generation(gen.images[at : at + k], gen.prompts[at : at + k], gen.negative_prompts[at : at + k],
                            gen.seeds[at : at + k], gen.settings, gen.timings)  # fmt: skip
        at += k


def _release_memory(pipe):
    if pipe.device.type == "cuda":
        with torch.cuda.device(pipe.device):
            torch.cuda.empty_cache()
