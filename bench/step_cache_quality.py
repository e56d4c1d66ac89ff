"""What the step cache costs in quality, against what it saves: README "Step caching".

    python bench/step_cache_quality.py                                   # the trained tiny model, CPU
    python bench/step_cache_quality.py --thresholds 0,0.1,0.2 --seeds 23,24 --steps 16

For each threshold (0 is no cache) it generates the tiny scenes' test captions (every colour and shape) at each seed,
and reports the transformer passes computed of all, the wall time of the sampling stage relative to no cache (one
run, same process), the PSNR of each image against the same image without the cache (dB; identical images count as
99), the prompt adherence (`fastsd35.tiny.scenes.adherence`) and the share of images whose colours and whose shape
`fastsd35.tiny.scenes.judge` finds right (the tiny model's own bar: README "The tiny model"). The table is Markdown,
ready for README.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastsd35.pipeline.caching import CacheConfig  # noqa: E402
from fastsd35.pipeline.runner import Pipeline  # noqa: E402
from fastsd35.tiny import scenes  # noqa: E402

CAPTIONS = list(scenes.CHECK_CAPTIONS)  # every colour as the shape's and the background's, every shape


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


def measure(pipe, captions, seeds, steps, config):
    images, passes, computed, seconds = [], 0, 0, 0.0
    for caption in captions:
        for seed in seeds:
            started = time.perf_counter()
            gen = pipe.generate(caption, seed=seed, steps=steps, cache=config, progress=False)
            seconds += gen.timings.get("sample", time.perf_counter() - started)
            images.append(np.asarray(gen.images[0]))
            if gen.cache:
                passes, computed = passes + gen.cache["passes"], computed + gen.cache["computed"]
    return images, passes, computed, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model folder for --preset (default: the shipped tiny model)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--thresholds", default="0,0.05,0.08,0.12,0.2,0.3,0.5")
    parser.add_argument("--seeds", default="23,24,25")
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--max-skip", type=int, default=None)
    parser.add_argument("--blocks", type=int, default=None)
    parser.add_argument("--extrapolate", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pipe = (Pipeline.from_pretrained(args.model, args.preset, device="cpu") if args.model
            else Pipeline.from_preset(args.preset, device="cpu"))  # fmt: skip
    seeds = [int(s) for s in args.seeds.split(",")]
    steps = args.steps or pipe.preset.steps
    options = {k: v for k, v in (("warmup", args.warmup), ("max_skip", args.max_skip), ("blocks", args.blocks))
               if v is not None}  # fmt: skip
    base, _, _, base_s = measure(pipe, CAPTIONS, seeds, steps, None)
    print(f"{pipe.preset.name}: depth {pipe.transformer.depth}, {steps} steps, {len(CAPTIONS)} captions x "
          f"{len(seeds)} seeds, {CacheConfig(**options)}, extrapolate={args.extrapolate}; device cpu "
          f"({torch.get_num_threads()} threads)")
    print("| threshold | passes computed | sampling time vs no cache | PSNR vs no cache (mean / min) | adherence (mean) | colours right | shape right |")
    print("|---|---|---|---|---|---|---|")
    for threshold in (float(t) for t in args.thresholds.split(",")):
        config = None if threshold == 0 else CacheConfig(threshold=threshold, extrapolate=args.extrapolate, **options)
        images, passes, computed, seconds = (base, 0, 0, base_s) if config is None else measure(pipe, CAPTIONS, seeds,
                                                                                              steps, config)
        captions = [c for c in CAPTIONS for _ in seeds]
        scores = [scenes.adherence(im, c).score for im, c in zip(images, captions)]
        judged = [(scenes.judge(im, c), scenes.parse_caption(c).shape) for im, c in zip(images, captions)]
        colours, shapes = sum(j.colours_right for j, _ in judged), sum(j.shape == shape for j, shape in judged)
        ratios = [psnr(a, b) for a, b in zip(images, base)]
        share = "all" if config is None else f"{computed} / {passes} ({computed / passes:.0%})"
        print(f"| {threshold:g} | {share} | {seconds / base_s:.2f} | {np.mean(ratios):.1f} / {min(ratios):.1f} | "
              f"{np.mean(scores):.3f} | {colours} / {len(scores)} | {shapes} / {len(scores)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
