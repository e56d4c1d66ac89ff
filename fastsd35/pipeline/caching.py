"""Step caching (DESIGN.md "Step caching"): skip the transformer work that barely changes from one step to the next.

Each guidance pass of a step first runs the transformer's first `blocks` blocks (the head). The change of the head's
residual (its output minus its input) since the last step whose passes were computed in full, relative L1 over every
guidance pass of the step, decides the step:

    distance = sum |r - r_ref| / sum |r_ref|        (r: this step's head residuals, r_ref: the last computed step's)

Below `threshold` the step reuses the residual the remaining blocks added at the last computed step (the tail
residual: their output minus their input), added to this step's head output, and runs only the final layer; with
`extrapolate` that residual is extrapolated to first order from the last two computed steps (TaylorSeer's first
term). Otherwise the remaining blocks run and their residual is kept. The first `warmup` steps and the last step are
always computed, and so is any step after `max_skip` reused ones in a row; threshold 0 computes every step, and the
images are then bit for bit those of no cache (the same operations in the same order). This is cache-dit's DBCache
with Bn = 0 (and ParaAttention's first-block cache for blocks = 1), written here from the published description.

One decision covers all the step's guidance passes: the batched [cond, uncond] pass, or the two passes of
`--cfg-parallel` (both ranks of a pair sum the same per-pass numbers in the same order, so they decide alike). The
skip-layer guidance pass is never cached: it runs on few early steps with other blocks skipped. A ControlNet still
runs every step (its residuals of the head's blocks are needed), and the reused tail residual includes what the
ControlNet added to those blocks at the last computed step.

The decisions are the step's record: `decisions` ("C" computed, "R" reused, one letter per step) goes into the PNG,
and a `schedule` replays it exactly (`fastsd35 run --from-png`), so a reproduced image never depends on the numbers
that happened to fall near the threshold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from ..errors import FastSD35Error
from .inputs import check, shown

# Defaults (README "Step caching"): measured on the trained tiny model against cache-dit's published DBCache settings
# (residual_diff_threshold 0.12, Fn_compute_blocks 1, max_warmup_steps 8 for 28-50 step schedules).
DEFAULT_THRESHOLD = 0.12
DEFAULT_WARMUP = 4
DEFAULT_MAX_SKIP = 3
DEFAULT_BLOCKS = 1
COMPUTED, REUSED = "C", "R"


@dataclass(frozen=True)
class CacheConfig:
    """How a generation caches steps (see the module docstring). `schedule`: decisions to replay, one letter per
    step ("C" computed, "R" reused), as a record keeps them; the other values are then what the record says."""

    threshold: float = DEFAULT_THRESHOLD
    warmup: int = DEFAULT_WARMUP
    max_skip: int = DEFAULT_MAX_SKIP
    blocks: int = DEFAULT_BLOCKS
    extrapolate: bool = False
    schedule: str | None = None

    def checked(self, depth: int | None = None, steps: int | None = None, label=None) -> "CacheConfig":
        """This config, checked (FastSD35Error naming the value by `label("cache_blocks")`, ...): `depth` is the
        transformer's (blocks must leave at least one to cache), `steps` the sampler steps a schedule must cover."""
        label = label or (lambda name: name.replace("_", " "))
        checked = replace(self, threshold=check("cache_threshold", self.threshold, label("cache_threshold")))
        for name in ("warmup", "max_skip", "blocks", "extrapolate"):
            check(f"cache_{name}", getattr(self, name), label(f"cache_{name}"))
        if depth is not None and depth < 2:
            raise FastSD35Error(f"step caching needs a transformer of 2 blocks or more; this one has {depth}")
        if depth is not None and self.blocks >= depth:
            raise FastSD35Error(f"{label('cache_blocks')} {self.blocks}: the transformer has {depth} blocks and at "
                                f"least one must be left to cache: use at most {depth - 1}")
        if self.schedule is not None:
            s = self.schedule
            if not isinstance(s, str) or not s or set(s) - {COMPUTED, REUSED} or s[-1] != COMPUTED:
                raise FastSD35Error(f"a cache schedule is a string of C (computed) and R (reused) ending in C, got "
                                    f"{shown(s)}")
            if steps is not None and len(s) != steps:
                raise FastSD35Error(f"the cache schedule has {len(s)} steps but this generation runs {steps}: decide "
                                    "anew (give --cache on) or keep the steps the record has")
        return checked

    def replaying(self, schedule: str) -> "CacheConfig":
        return replace(self, schedule=schedule)


def config_from(cache) -> CacheConfig | None:
    """`generate`'s `cache` argument: None or False (off), True (the defaults) or a CacheConfig."""
    if cache is None or cache is False:
        return None
    if cache is True:
        return CacheConfig()
    if isinstance(cache, CacheConfig):
        return cache
    raise FastSD35Error(f"cache must be None, True, False or a CacheConfig, got {shown(cache)}")


class StepCache:
    """One generation's cache: the per-step decisions, the head residuals of the last computed step and the tail
    residuals of the last two, per guidance pass. `calls` is the number of sampler steps (the last one is always
    computed)."""

    def __init__(self, config: CacheConfig, calls: int):
        self.config, self.calls = config, calls
        self.decisions: list[str] = []
        self.reference: list[torch.Tensor] | None = None  # head residuals at the last computed step, per pass
        self.tails: dict[int, list[tuple[int, torch.Tensor]]] = {}  # pass -> [(step, tail residual)] (last two)
        self.reused_in_a_row = 0
        self.passes = self.computed = 0  # guidance passes: all of them, and those computed in full
        self.decide_s = 0.0  # time spent deciding (the distance's reduction and its host synchronisation)

    @property
    def schedule(self) -> str:
        return "".join(self.decisions)

    def forced(self, step: int) -> bool | None:
        """The decision when no distance is needed: True/False, or None to measure."""
        c = self.config
        if c.schedule is not None:
            if step >= len(c.schedule):
                raise FastSD35Error(f"the cache schedule has {len(c.schedule)} steps; this generation runs more")
            return c.schedule[step] == COMPUTED
        if step < c.warmup or step >= self.calls - 1 or self.reference is None or c.threshold == 0:
            return True
        if self.reused_in_a_row >= c.max_skip:
            return True
        return None

    @staticmethod
    def partial_distance(residual: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """(sum |r - r_ref|, sum |r_ref|) of one pass, as a 2-vector on the device (reduced in fp32)."""
        r, ref = residual.float(), reference.float()
        return torch.stack([(r - ref).abs().sum(), ref.abs().sum()])

    def decide(self, step: int, residuals: list[torch.Tensor], gather=None) -> bool:
        """Whether step `step` computes its guidance passes in full, given their head residuals (in pass order).
        `gather` maps this process's per-pass partial distances to every pass of the step in order (a CFG-parallel
        pair exchanges them); the sums are then taken in that order on the host, so every process decides alike."""
        compute = self.forced(step)
        if compute is None:
            started = time.perf_counter()
            partial = [self.partial_distance(r, ref).tolist() for r, ref in zip(residuals, self.reference)]
            if gather is not None:
                partial = gather(partial)
            num = den = 0.0
            for a, b in partial:
                num, den = num + a, den + b
            compute = not (den > 0 and num / den < self.config.threshold)
            self.decide_s += time.perf_counter() - started
        self.decisions.append(COMPUTED if compute else REUSED)
        self.passes += len(residuals)
        if compute:
            self.reference = [r.detach() for r in residuals]
            self.reused_in_a_row = 0
            self.computed += len(residuals)
        else:
            self.reused_in_a_row += 1
        return compute

    def count_full_pass(self):
        """A pass this cache does not cover (the skip-layer pass): computed, and counted."""
        self.passes += 1
        self.computed += 1

    def keep(self, index: int, step: int, tail_residual: torch.Tensor):
        """The tail residual pass `index` computed at `step` (the last two are kept, for extrapolation)."""
        self.tails[index] = (self.tails.get(index, [])[-1:] + [(step, tail_residual.detach())])

    def tail(self, index: int, step: int) -> torch.Tensor:
        """The tail residual to reuse for pass `index` at `step`: the last computed one, or with `extrapolate` its
        first-order extrapolation from the last two computed steps."""
        history = self.tails[index]
        (s2, r2) = history[-1]
        if not self.config.extrapolate or len(history) < 2:
            return r2
        (s1, r1) = history[0]
        return r2 + (r2 - r1) * ((step - s2) / (s2 - s1))

    def summary(self) -> dict:
        """The settings, the decisions, the passes computed and the time spent deciding (not recorded in PNGs: it
        varies from run to run)."""
        c = self.config
        return {"threshold": c.threshold, "warmup": c.warmup, "max_skip": c.max_skip, "blocks": c.blocks,
                "extrapolate": c.extrapolate, "schedule": self.schedule, "passes": self.passes,
                "computed": self.computed, "decide_s": self.decide_s}  # fmt: skip


__all__ = ["COMPUTED", "REUSED", "CacheConfig", "StepCache", "config_from"]
