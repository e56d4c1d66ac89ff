"""Measure how far FP8 moves the transformer's output, by depth: the error model behind the FP8 benchmark contender's
tolerance (fastsd35.benchmarks.precision) and README's FP8 table.

    python tools/fp8_error.py                         # depths 1, 2, 3, 4, 8, 16, 24 at their released widths
    python tools/fp8_error.py --depths 38 --heads 8    # depth 38 at width 512 (Large's 8B weights do not fit a CPU)
    python tools/fp8_error.py --depths 4 --latent 128  # 4096 image tokens, as at 1024x1024

Each depth is one MMDiT-X of the SD3.5 Large structure (qk RMS norm; width 64 x depth unless --heads) with the
benchmark's random weights (`random_weights_`: matrices N(0, 1/fan_in)) and one denoiser step on the benchmark's
inputs (CFG batch 2, 154 context tokens, sigma 0.75), computed four ways on the CPU:

    fp32        the truth
    bf16        the model in bf16 (the benchmark's baseline on a GPU)
    fp8 w       bf16, the block Linears' weights in FP8 and their GEMMs in bf16 (--dtype fp8 on an A100)
    fp8         bf16, the block Linears as FP8 GEMMs (weights per channel, activations per token: sm_89+)

and prints the relative L2 errors ||a - b|| / ||b|| as a Markdown table: each against fp32, and fp8 against bf16
(what the benchmark's output check compares). Several minutes per depth from 16 on (weights drawn on the CPU); depth 24
needs about 11 GB of memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastsd35.benchmarks import cases as bc  # noqa: E402
from fastsd35.models.fp8 import FP8Linear, quantize_  # noqa: E402
from fastsd35.models.mmditx import HEAD_DIM, MMDiTX, MMDiTXConfig  # noqa: E402
from fastsd35.pipeline.runner import TransformerPass  # noqa: E402


@dataclass(frozen=True)
class WidthConfig(MMDiTXConfig):
    """An MMDiT-X whose width is `heads` x 64 instead of depth x 64 (to separate depth from width)."""

    heads: int = 0

    @property
    def hidden_size(self) -> int:
        return HEAD_DIM * (self.heads or self.depth)

    @property
    def num_heads(self) -> int:
        return self.heads or self.depth


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def measure(depth: int, heads: int = 0, latent: int = 32, n_ctx: int = bc.CONTEXT_LENGTHS[0], batch: int = 2,
            seed: int = 0) -> dict:
    """The relative L2 errors of one step of a depth-`depth` model (see the module docstring)."""
    config = WidthConfig(depth=depth, heads=heads, pos_embed_max_size=max(32, latent // 2), qk_norm="rms")
    start = time.perf_counter()
    model = bc.random_weights_(MMDiTX.empty(config, dtype=torch.float32, device="cpu"), seed=seed)
    params = sum(p.numel() for p in model.parameters())
    geo = bc.Geometry("large", config, latent, torch.device("cpu"), torch.float32, batch)
    with bc._step_inputs(geo, batch, n_ctx) as inp:
        step = TransformerPass(model)
        truth = step(inp.x, inp.sigma, inp.y, inp.context).float()
        bf16_in = [t.bfloat16() for t in (inp.x, inp.y, inp.context)]
        x, y, context = bf16_in
        bf16 = TransformerPass(model.bfloat16())(x, inp.sigma, y, context).float()
        quantize_(model)  # from the bf16 weights, as the benchmark's FP8 contender quantizes its bf16 model
        fp8 = step(x, inp.sigma, y, context).float()
        for layer in model.modules():
            if isinstance(layer, FP8Linear):
                layer.fp8_matmul = False
        fp8_weights = step(x, inp.sigma, y, context).float()
    return {
        "depth": depth, "width": config.hidden_size, "params": params, "tokens": (latent // 2) ** 2 + n_ctx,
        "bf16": relative_l2(bf16, truth), "fp8_weights": relative_l2(fp8_weights, truth),
        "fp8": relative_l2(fp8, truth), "fp8_vs_bf16": relative_l2(fp8, bf16),
        "seconds": round(time.perf_counter() - start, 1),
    }


def table(rows: list[dict]) -> str:
    lines = ["| depth | width | image + context tokens | bf16 vs fp32 | fp8 weights vs fp32 | fp8 vs fp32 | fp8 vs bf16 |",
             "|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        pct = [f"{100 * r[k]:.1f}%" for k in ("bf16", "fp8_weights", "fp8", "fp8_vs_bf16")]
        lines.append(f"| {r['depth']} | {r['width']} | {r['tokens']} | " + " | ".join(pct) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", default="1,2,3,4,8,16,24", help="comma-separated depths")
    parser.add_argument("--heads", type=int, default=0, help="width = 64 x heads (default: 64 x depth, as released)")
    parser.add_argument("--latent", type=int, default=32, help="latent side (image tokens = (latent / 2)^2)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for depth in [int(d) for d in args.depths.split(",") if d.strip()]:
        rows.append(measure(depth, args.heads, args.latent))
        print(f"depth {depth}: {rows[-1]}", file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
