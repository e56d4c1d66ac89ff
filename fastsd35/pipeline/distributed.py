"""Many processes, one job: torchrun data parallel and CFG-parallel over torch.distributed (README "Many GPUs").
This module is the worker model every front end shares (`fastsd35 run` under torchrun: fastsd35.app.torchrun; the
multi-GPU benchmark): joining, agreeing, splitting the units, the CFG-parallel pair and gathering the files.

Data parallel. Every rank computes the same plan: the prompts in order, each one `Pipeline.generate` call (the
prompt's batch, seeds seed .. seed+B-1), exactly as a single-process run makes them. Unit j (prompt j with its batch)
goes to worker j mod W. The unit is a whole generate call, not an image, because batch composition changes float
rounding (a sample in a batch of 2 differs in the last bits from the same sample alone): each image is computed in
the batch a single-process run computes it in, so it is bit for bit that run's image.

CFG-parallel. Ranks 2p and 2p+1 form pair p (W = N/2 workers); both run the same generate call. At each step the
even rank runs the cond pass and the odd rank the uncond pass, plus the skip-layer pass when SLG is active: the
passes cost the same, and the even ranks carry the output (rank 0, an even rank, writes every file), so the extra
pass goes to the odd rank. One all_gather within the pair gives both ranks every pass's output; both combine them
with `CFGDenoiser.combine` and take the same sampler step, so their latents stay identical, and the even rank sends
the images. The numerics are those of one process running the two passes one after the other
(`CFGDenoiser(split=True)`, `fastsd35 run --cfg-parallel` without torchrun), which `--from-png` uses to reproduce
such an image on one GPU; the default single-process run batches [cond, uncond] and differs in the last bits.

Writing: one decider. Once per round (W units) every worker's encoded PNGs go to rank 0 (gather over gloo); rank 0
writes them in plan order with the front end's writer (the CLI's `outputs.write_png`: a temporary file linked into place: never overwrites, even
racing another job, never leaves a partial file), so the names are those a single-process run picks, and broadcasts
the written paths. Only rank 0's --out folder is written to (on several nodes: rank 0's machine).

Failure. Bad input is found by every rank before anything loads, and the ranks agree on it: rank 0 prints one line
and every rank exits 2 (the same for a failed load). A rank that fails later prints its error and exits at once;
the others find the broken collective (gloo at once, NCCL at the process-group timeout, and torchrun ends the
remaining workers as soon as one exits non-zero), print one line and exit 1.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..errors import FastSD35Error
from .sampling import CFGDenoiser

DEFAULT_TIMEOUT_S = 600.0  # the longest any rank waits for the others at one collective
MAX_TIMEOUT_S = 7 * 24 * 3600.0


MAX_WORLD_SIZE = 1 << 20


def _env_int(name: str, default: str | None, low: int, high: int) -> int:
    """A torchrun environment variable as an int in [low, high]; FastSD35Error naming it otherwise."""
    text = os.environ.get(name, default)
    if text is None:
        raise FastSD35Error("not started by torchrun: RANK and WORLD_SIZE are not set "
                            "(run torchrun --nproc-per-node N -m fastsd35 run ...)")
    try:
        value = int(text.strip()) if text.strip().lstrip("+-").isdigit() else None
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        shown = text if len(text) <= 40 else f"{text[:40]}..."
        raise FastSD35Error(f"the environment's {name} is {shown!r}: torchrun sets it to a whole number from {low} to "
                            f"{high}; start the job with torchrun (or unset {name} for one process)")
    return value


def launched() -> bool:
    """True in a process that torchrun (or anything setting its environment) started as one of several; a
    WORLD_SIZE that is not a whole number >= 1 is a FastSD35Error."""
    return _env_int("WORLD_SIZE", "1", 1, MAX_WORLD_SIZE) > 1


class LostContact(Exception):
    """A collective failed: another rank died or was stopped (its own error is on its stderr)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job. A worker generates units: a rank in data parallel, a pair in CFG-parallel."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    cfg_parallel: bool = False
    pair: dist.ProcessGroup | None = None  # this rank's pair (CFG-parallel)
    control: dist.ProcessGroup | None = None  # gloo group for plans, status and PNG bytes (the default one on CPU)

    @property
    def workers(self) -> int:
        return self.world_size // 2 if self.cfg_parallel else self.world_size

    @property
    def worker(self) -> int:
        return self.rank // 2 if self.cfg_parallel else self.rank

    @property
    def writer(self) -> bool:
        """Whether this rank's images are the ones to keep (in a pair, the even rank's)."""
        return not self.cfg_parallel or self.rank % 2 == 0

    def units(self, n: int) -> range:
        """The unit indices this worker generates, in order: worker, worker + W, ..."""
        return range(self.worker, n, self.workers)


def environment() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) from torchrun's environment, each checked: 0 <= RANK < WORLD_SIZE and
    0 <= LOCAL_RANK <= RANK."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        _env_int("RANK", None, 0, 0)  # raises: not started by torchrun
    world_size = _env_int("WORLD_SIZE", None, 1, MAX_WORLD_SIZE)
    rank = _env_int("RANK", None, 0, world_size - 1)
    return rank, world_size, _env_int("LOCAL_RANK", "0", 0, rank)


def check(device: str | None = None, *, cfg_parallel: bool = False) -> tuple[int, int, torch.device]:
    """What can be checked from torchrun's environment alone (the same on every rank): (rank, world size, device)."""
    rank, world_size, local_rank = environment()
    if cfg_parallel and world_size % 2:
        raise FastSD35Error(f"--cfg-parallel pairs the ranks: run an even number of processes, not {world_size}")
    try:
        requested = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    except RuntimeError:
        raise FastSD35Error(f"unknown device {device!r}: use cuda or cpu") from None
    if requested.type == "cuda":
        if requested.index is not None and world_size > 1:
            raise FastSD35Error(f"--device {device}: under torchrun each rank takes the GPU LOCAL_RANK names; use --device cuda")
        if not torch.cuda.is_available():
            raise FastSD35Error("--device cuda but CUDA is not available here: use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise FastSD35Error(f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} GPUs: "
                                f"start at most that many processes per node")
        return rank, world_size, torch.device("cuda", local_rank)
    if requested.type != "cpu":
        raise FastSD35Error(f"--device {device}: torchrun jobs run on cuda (NCCL) or cpu (gloo)")
    return rank, world_size, requested


def init(device: str | None = None, *, cfg_parallel: bool = False, timeout: float = DEFAULT_TIMEOUT_S) -> Ranks:
    """Join the torchrun job (env://): NCCL on CUDA with the GPU LOCAL_RANK names, gloo on the CPU. `timeout` (s)
    bounds every wait for the other ranks. With `cfg_parallel`, ranks 2p and 2p+1 form a pair."""
    rank, world_size, device = check(device, cfg_parallel=cfg_parallel)
    if not (isinstance(timeout, (int, float)) and 0 < timeout <= MAX_TIMEOUT_S):
        raise FastSD35Error(f"--dist-timeout must be between 0 and {MAX_TIMEOUT_S:g} seconds, got {timeout}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    wait = timedelta(seconds=timeout)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=wait, device_id=device if device.type == "cuda" else None)
        except (RuntimeError, ValueError) as e:  # every rank says so: they may not fail alike
            raise LostContact(f"cannot join the torchrun job: {str(e).splitlines()[0]}") from None
    control = dist.new_group(backend="gloo", timeout=wait) if backend == "nccl" else None
    pair = None
    if cfg_parallel:
        for first in range(0, world_size, 2):  # every rank creates every group, in the same order
            group = dist.new_group([first, first + 1], timeout=wait)
            if rank in (first, first + 1):
                pair = group
    return Ranks(rank, world_size, int(os.environ.get("LOCAL_RANK", "0")), device, cfg_parallel, pair, control)


def close():
    if dist.is_initialized():
        dist.destroy_process_group()


# -- collectives --------------------------------------------------------------------------------------------------


def _collective(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, ConnectionError) as e:  # DistBackendError, gloo's "Connection closed by peer", timeouts
        first = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).splitlines() or [""])[0]).split(". ")[0]  # no source path
        raise LostContact(f"lost contact with the other ranks while {what} (another rank failed or was stopped): "
                          f"{first or type(e).__name__}") from None


def agree(ranks: Ranks, error: FastSD35Error | None, fingerprint: str | None = None):
    """Every rank says whether its step (checking the input, loading) failed; if any did, every rank raises the first
    failure's error (rank 0's, or 'rank k: ...'), so all stop alike. Likewise if the ranks' `fingerprint`s (of the
    plan) differ: they would write other images than the names say."""
    said = [None] * ranks.world_size
    _collective("comparing the ranks' checks", dist.all_gather_object, said,
                (None if error is None else str(error), fingerprint), group=ranks.control)
    for rank, (message, _) in enumerate(said):
        if message is not None:
            raise FastSD35Error(message if rank == 0 else f"rank {rank}: {message}")
    for rank, (_, theirs) in enumerate(said):
        if theirs != said[0][1]:
            raise FastSD35Error(f"rank {rank} planned other images than rank 0 (a prompts file, image or option that "
                                f"differs between machines?): give every rank the same inputs")


class PairDenoiser(CFGDenoiser):
    """CFGDenoiser for one rank of a CFG-parallel pair: the even rank runs the cond pass, the odd rank the uncond pass
    and (when SLG is active) the skip-layer pass; one all_gather per step gives both ranks all of them, and both
    combine them as CFGDenoiser does. Equal to CFGDenoiser(split=True) bit for bit on the same device type."""

    def __init__(self, group: dist.ProcessGroup, role: int, *args, **kwargs):
        super().__init__(*args, split=True, **kwargs)
        if self.cfg <= 1:
            raise FastSD35Error(f"CFG-parallel needs cfg > 1 (there is no uncond pass at cfg {self.cfg})")
        self.group, self.role = group, role

    def guidance(self):
        return [(1, self.context, self.y)] if self.role == 0 else [(1, *self.uncond)]

    def passes(self, x, sigma, skip: bool, step: int = 0):
        mine = self.run_guidance(x, sigma, step, self.guidance(), gather=self._gather_distances)
        if skip:  # all_gather takes equal shapes: the even rank's slot is a placeholder, the odd rank's is used
            mine.append(torch.zeros_like(mine[0]) if self.role == 0 else self.skip_pass(x, sigma))
        local = torch.stack(mine)
        both = [torch.empty_like(local) for _ in range(2)]
        _collective("exchanging the guidance passes", dist.all_gather, both, local, group=self.group)
        return both[0][0], both[1][0], both[1][1] if skip else None


    def _gather_distances(self, partial):
        """The pair's per-pass partial distances, cond rank's first: what one process running both passes sums."""
        both = [None, None]
        _collective("agreeing on the step cache", dist.all_gather_object, both, partial, group=self.group)
        return both[0] + both[1]


def denoiser_cls(ranks: Ranks):
    """The `denoiser_cls` for `Pipeline.generate` on this rank: the pair denoiser in CFG-parallel, else CFGDenoiser."""
    return partial(PairDenoiser, ranks.pair, ranks.rank % 2) if ranks.cfg_parallel else CFGDenoiser


# -- the Python API and the front ends' engine --------------------------------------------------------------------------


def generate(pipe, ranks: Ranks, prompts: Sequence[str], **kwargs) -> Iterator[tuple[int, object]]:
    """This worker's share of `pipe.generate(prompts[j], **kwargs)` for every j: yields (j, Generation) for
    j = worker, worker + W, ... Every rank calls it with the same arguments. In CFG-parallel both ranks of a pair
    take part in each generation and get the same images; keep those of the rank where `ranks.writer`."""
    kwargs = {"progress": False, **kwargs, "denoiser_cls": denoiser_cls(ranks)}
    for j in ranks.units(len(prompts)):
        yield j, pipe.generate(prompts[j], **kwargs)


def write_images(ranks: Ranks, n_units: int, files: Iterable[tuple[int, list[tuple[str, bytes]]]],
                 write: Callable[[str, bytes], Path] | None, *, progress: bool = True,
                 total: int | None = None) -> list[Path]:
    """Write every worker's images on rank 0, in plan order, and return all written paths (in plan order) on every
    rank. `files` yields this worker's units in order as (j, [(file name, PNG bytes), ...]); rank 0 calls
    `write(name, data)` for each, which returns the path it wrote (`fastsd35.app.outputs.write_png` with the folder:
    the CLI's never-overwrite naming). Runs in rounds of W units: one gather of the round's files to rank 0 and one
    broadcast of the paths it wrote. `write` matters on rank 0 only."""
    files = iter(files)
    written: list[Path] = []
    with tqdm(total=total, desc="images", unit="img", disable=not progress or ranks.rank != 0) as bar:
        for first in range(0, n_units, ranks.workers):
            written += _round(ranks, n_units, first, files, write, bar)
    return written


def _round(ranks: Ranks, n_units: int, first: int, files, write, bar) -> list[Path]:
    """Units first .. first+W-1: this worker's one (if any) made, everyone's written on rank 0, the paths shared."""
    payload = None
    if first + ranks.worker < n_units:
        j, unit_files = next(files)
        assert j == first + ranks.worker, (j, first, ranks.worker)
        payload = (j, unit_files) if ranks.writer else None
    gathered = [None] * ranks.world_size if ranks.rank == 0 else None
    _collective("sending images to rank 0", dist.gather_object, payload, gathered, dst=0, group=ranks.control)
    paths = [None]
    if ranks.rank == 0:
        paths[0] = [str(write(name, data)) for _, unit in sorted(p for p in gathered if p is not None) for name, data in unit]
        bar.update(len(paths[0]))
    _collective("sharing the file names", dist.broadcast_object_list, paths, src=0, group=ranks.control)
    return [Path(p) for p in paths[0]]
