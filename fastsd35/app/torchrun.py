"""`fastsd35 run` as one rank of a torchrun job (README "Many GPUs"): the worker model of
fastsd35.pipeline.distributed driven by the same job as one process."""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from functools import partial

from ..errors import FastSD35Error
from ..pipeline.distributed import (DEFAULT_TIMEOUT_S, LostContact, environment, agree, close, generate, init,
                                    write_images)
from . import jobs
from .outputs import output_folder, write_png


def add_arguments(parser):
    group = parser.add_argument_group("many GPUs (under torchrun)")
    group.add_argument("--cfg-parallel", action="store_true", default=None,
                       help="run the cond and uncond passes on the two ranks of a pair (cfg > 1); without torchrun: "
                            "the two passes one after the other, with the same numerics")
    group.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                       help=f"seconds a rank waits for the others before giving up (default {DEFAULT_TIMEOUT_S:g})")


def run_command(args) -> int:
    """`fastsd35 run` as one rank of a torchrun job. Returns the exit status; only rank 0 prints."""
    try:
        rank = environment()[0]
    except FastSD35Error as e:  # the same environment problem on every rank: every rank says it
        print(f"fastsd35: error: {e}", file=sys.stderr)
        return 2
    try:
        return _run(args)
    except FastSD35Error as e:  # agreed by every rank, or found alike by every rank before joining
        if rank == 0:
            print(f"fastsd35: error: {e}", file=sys.stderr)
        return 2
    except LostContact as e:
        print(f"fastsd35: error: rank {rank}: {e}", file=sys.stderr)
        return 1


def _run(args) -> int:
    started = time.perf_counter()
    ranks = init(args.device, cfg_parallel=bool(args.cfg_parallel), timeout=args.dist_timeout)
    with ExitStack() as stack:
        job = out = error = None
        try:  # the same job, and so the same checks, as one process makes before loading
            job = jobs.from_args(args)
            if ranks.rank == 0:
                out = stack.enter_context(output_folder(job.out))
        except FastSD35Error as e:
            error = e
        agree(ranks, error, None if error else jobs.fingerprint(job))
        pipe = error = None
        try:
            pipe = jobs.load(job, device=ranks.device)
            jobs.check_prompts_fit(job, pipe)  # as one process: no image is written before a prompt is refused
        except FastSD35Error as e:
            error = e
        agree(ranks, error)
        try:
            control = jobs.control_latent(job, pipe)
            timings = dict(pipe.timings)

            def unit_files():
                for j, gen in generate(pipe, ranks, job.prompts, **jobs.generate_kwargs(job, control)):
                    for stage, seconds in gen.timings.items():
                        timings[stage] = timings.get(stage, 0.0) + seconds
                    yield j, jobs.png_files(job, gen, pipe) if ranks.writer else []

            write = partial(write_png, out, overwrite=job.overwrite) if ranks.rank == 0 else None
            written = write_images(ranks, len(job.prompts), unit_files(), write, total=job.n_images)
        except FastSD35Error as e:  # this rank's own failure after loading: it reports it and leaves
            print(f"fastsd35: error: rank {ranks.rank}: {e}", file=sys.stderr)
            return 2
    close()
    if ranks.rank == 0:
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
        print(f"wrote {', '.join(map(str, written))} in {time.perf_counter() - started:.1f} s on {ranks.world_size} "
              f"ranks (rank 0: {stages})")
    return 0
