"""`fastsd35 run` as one rank of a torchrun job (README "Many GPUs"): the worker model of
fastsd35.pipeline.distributed driven by the same job as one process."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import replace
from functools import partial

from ..errors import FastSD35Error
from ..pipeline.distributed import DEFAULT_TIMEOUT_S, LostContact, agree, close, generate, init, write_images
from .outputs import image_name, output_folder, png_bytes, write_png

def add_arguments(parser):
    group = parser.add_argument_group("many GPUs (under torchrun)")
    group.add_argument("--cfg-parallel", action="store_true", default=None,
                       help="run the cond and uncond passes on the two ranks of a pair (cfg > 1); without torchrun: "
                            "the two passes one after the other, with the same numerics")
    group.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                       help=f"seconds a rank waits for the others before giving up (default {DEFAULT_TIMEOUT_S:g})")


def run_command(args) -> int:
    """`fastsd35 run` as one rank of a torchrun job. Returns the exit status; only rank 0 prints."""
    rank = int(os.environ.get("RANK", "0"))
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
    from . import cli

    started = time.perf_counter()
    ranks = init(args.device, cfg_parallel=bool(args.cfg_parallel), timeout=args.dist_timeout)
    with ExitStack() as stack:
        job = out = error = None
        try:
            job = cli.plan(args)
            if ranks.rank == 0:
                out = stack.enter_context(output_folder(args.out))
        except FastSD35Error as e:
            error = e
        agree(ranks, error, None if error else fingerprint(job))
        job = replace(job, device=ranks.device)
        pipe = error = None
        try:
            pipe = cli.load(job, args)
        except FastSD35Error as e:
            error = e
        agree(ranks, error)
        try:
            control = cli.control_latent(pipe, job)
            timings = dict(pipe.timings)

            def unit_files():
                for j, gen in generate(pipe, ranks, job.prompts, **cli.generate_kwargs(job, control)):
                    for stage, seconds in gen.timings.items():
                        timings[stage] = timings.get(stage, 0.0) + seconds
                    yield j, [(image_name(job.preset.name, gen.prompts[0], seed),
                               png_bytes(image, cli.record(job, gen.prompts[0], seed, pipe)))
                              for image, seed in zip(gen.images, gen.seeds)] if ranks.writer else []

            write = partial(write_png, out, overwrite=args.overwrite) if ranks.rank == 0 else None
            written = write_images(ranks, len(job.prompts), unit_files(), write, total=len(job.prompts) * job.batch_size)
        except FastSD35Error as e:  # this rank's own failure after loading: it reports it and leaves
            print(f"fastsd35: error: rank {ranks.rank}: {e}", file=sys.stderr)
            return 2
    close()
    if ranks.rank == 0:
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
        print(f"wrote {', '.join(map(str, written))} in {time.perf_counter() - started:.1f} s on {ranks.world_size} "
              f"ranks (rank 0: {stages})")
    return 0


def fingerprint(job) -> str:
    """A digest of everything that decides the images of a `cli.Job` (not the device): equal on every rank."""
    digest = hashlib.sha256(repr((job.preset, str(job.model), job.prompts, job.negative_prompt, job.seed,
                                  job.batch_size, job.settings, job.dtype, job.t5, job.t5_tokens, job.cfg_parallel,
                                  job.loras, job.control and (job.control.strength, job.control.preprocess))).encode())
    for image in (job.init_image, job.control and job.control.image):
        if image is not None:
            digest.update(image.tobytes())
    return digest.hexdigest()


