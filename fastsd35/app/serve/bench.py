"""`fastsd35 bench --only serve`: requests/s and p50/p95 latency of the real server (uvicorn on a loopback port)
at 1, 4 and 16 concurrent clients, batching off (`--max-batch 1`, the baseline) and on (`--max-batch 8`).

This is the app layer registering a part of fastsd35.benchmarks (which may not import the server): the CLI imports
this module before `fastsd35 bench` runs. One call of a contender is a wave of 2 x concurrency requests (at least
4; one image each, so images/s is requests/s), sent by `concurrency` client threads over plain HTTP; the wave's
p50 and p95 request latencies are reported as its "stages" (the median over the timed waves). On the CPU the server
serves the trained `tiny` preset at 64x64 with 4 steps; on CUDA `large_turbo` at 512x512 with full-size random weights
(the timings of the real weights), CUDA graphs on.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import threading
import time
from contextlib import contextmanager
from functools import partial

import numpy as np
import torch

from ...benchmarks.cases import PROMPT, Case, Contender, Failed, Prepared, Skip, register

CONCURRENCY = (1, 4, 16)
BATCHED = 8  # --max-batch of the "batching on" contender
CPU_SETTINGS = dict(preset="tiny", size="64x64", steps=4)
CUDA_SETTINGS = dict(preset="large_turbo", size="512x512", steps=4)


def requests_per_wave(concurrency: int) -> int:
    return max(4, 2 * concurrency)


@register("serve")
def serve_cases(device, models, dtype, full) -> list[Case]:
    device = torch.device(device)
    full = device.type == "cuda" if full is None else full
    settings = CUDA_SETTINGS if full else CPU_SETTINGS
    cases = []
    for c in CONCURRENCY:
        n = requests_per_wave(c)
        shape = dict(concurrency=c, requests=n, images_per_request=1, **settings)
        contenders = [Contender("batching off", partial(_contender, c, n, 1), baseline=True),
                      Contender(f"batching on (max {BATCHED})", partial(_contender, c, n, BATCHED))]  # fmt: skip
        cases.append(Case("serve", "requests", "large" if full else "tiny", shape, contenders,
                          partial(_pipeline, device, dtype, full), tag=f"c{c}", images=n))  # fmt: skip
    return cases


@contextmanager
def _pipeline(device, dtype, full):
    """The pipeline every contender of a case serves (loaded once per case)."""
    from . import missing_packages

    if missing_packages():
        yield Skip(f"needs {', '.join(missing_packages())}: pip install 'fastsd35[serve]'")
        return
    from ...pipeline.runner import Pipeline

    if not full:  # the reference ops (MMDiTX), as the other CPU parts time them: the interpreter is not timed
        from ...tiny.family import trained_model_dir

        yield Pipeline.from_pretrained(trained_model_dir(), "tiny", device=device, dtype=dtype, fast=False)
        return
    from ...benchmarks.cases import _e2e_components

    with _e2e_components(device, dtype or torch.bfloat16, True) as parts:
        yield Pipeline(parts.transformer, parts.vae, parts.text, "large_turbo", graphs=True)


@contextmanager
def _contender(concurrency: int, n: int, max_batch: int, pipe):
    if isinstance(pipe, Skip):
        raise pipe
    from . import app
    from .command import background

    settings = CUDA_SETTINGS if pipe.device.type == "cuda" else CPU_SETTINGS
    body = {k: v for k, v in settings.items() if k != "preset"}
    stages: list[dict] = []
    with background(app(pipe, max_batch=max_batch, max_queue=4 * n)) as url:

        def fn():
            latencies, images = _wave(url, body, concurrency, n)
            stages.append({"p50": _percentile(latencies, 50), "p95": _percentile(latencies, 95)})
            return images

        yield Prepared(fn, {"max_batch": max_batch, "concurrency": concurrency}, stages)


def _wave(url: str, body: dict, concurrency: int, n: int):
    """`n` requests (seeds 0 .. n-1) from `concurrency` threads: (latencies in seconds, the images in seed order)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    results: dict[int, tuple[float, np.ndarray]] = {}
    errors: list[str] = []
    lock = threading.Lock()
    seeds = iter(range(n))

    def client():
        conn = http.client.HTTPConnection(host, int(port), timeout=600)
        try:
            while True:
                with lock:
                    seed = next(seeds, None)
                if seed is None:
                    return
                start = time.perf_counter()
                conn.request("POST", "/v1/images/generations", json.dumps({**body, "prompt": PROMPT, "seed": seed}),
                             {"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
                took = time.perf_counter() - start
                if response.status != 200:
                    with lock:
                        errors.append(f"HTTP {response.status}: {data[:200]!r}")
                    return
                png = base64.b64decode(json.loads(data)["data"][0]["b64_json"])
                from PIL import Image

                with Image.open(io.BytesIO(png)) as image:
                    pixels = np.asarray(image.convert("RGB"))
                with lock:
                    results[seed] = (took, pixels)
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise Failed(errors[0])
    latencies = [results[s][0] for s in range(n)]
    return latencies, torch.from_numpy(np.stack([results[s][1] for s in range(n)]))


def _percentile(values, q: float) -> float:
    """The nearest-rank percentile: the smallest value with at least q% of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


__all__ = ["CONCURRENCY", "requests_per_wave", "serve_cases"]
