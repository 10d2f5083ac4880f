"""Benchmark: time to the diagonal of the block-wise inverse Fisher (fast path vs reference).

MLPNet 784-300-100-10 weights (d = 266,200 in layers of 235,200, 30,000 and 1,000 entries),
block size 2000, float32, synthetic Gaussian gradients.

(a) m = 100: the fast path against the paper's Woodbury recursion. The recursion is slow, so it
    runs on the first few blocks only and its time is extrapolated to all blocks in proportion
    to Σ B² (its cost is m·B² per block). Also reports the largest relative difference of the
    diagonals on those blocks.
(b) m = 1000: the fast path against the time this machine needs for min(2m²d, 2mBd) FLOPs at
    its float32 matmul rate, measured in the same run.

Other jobs share this machine, so every comparison is interleaved: each repeat times the fast
path right after the thing it is compared with (the reference on the subset, or a 4096² torch.mm
for the matmul rate); the table gives medians of the repeats and the median of the per-repeat
ratios.

Usage::

    PYTHONPATH=src python bench/inverse_build.py --out bench/results/inverse_build.json
    PYTHONPATH=src python bench/inverse_build.py --quick   # fewer repeats
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from woodfisher.checkpoint import atomic_save_json
from woodfisher.fisher import EmpiricalFisherInverse, make_blocks
from woodfisher.fisher.woodbury import woodbury_inverse_blocks

SIZES = [784 * 300, 300 * 100, 100 * 10]


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def matmul_rate(n: int, repeats: int) -> float:
    """Float32 FLOP/s of a square torch.mm of size n."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    t, _ = median_time(lambda: torch.mm(a, b), repeats)
    return 2 * n**3 / t


def fast_diag(G: torch.Tensor, block: int, damp: float) -> torch.Tensor:
    return EmpiricalFisherInverse(G, block, damp, layout=SIZES).diag()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/inverse_build.json"))
    parser.add_argument("--block-size", type=int, default=2000)
    parser.add_argument("--damp", type=float, default=1e-5)
    parser.add_argument("--ref-blocks", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="1 repeat, 2 reference blocks")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.ref_blocks = 1, 2
    torch.manual_seed(args.seed)
    d, B = sum(SIZES), args.block_size
    blocks = make_blocks(SIZES, B)
    results: dict = {
        "d": d, "block_size": B, "dtype": "float32", "damp": args.damp, "seed": args.seed,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "repeats": args.repeats,
    }

    # (a) m = 100, fast path vs the Woodbury recursion on a subset of blocks.
    m = 100
    G = torch.randn(m, d)
    fast_diag(G, B, args.damp)  # warm-up
    sub = blocks[: args.ref_blocks]
    fast_t, ref_t = [], []
    for _ in range(args.repeats):
        t, inverses = median_time(lambda: woodbury_inverse_blocks(G, sub, args.damp), 1)
        ref_t.append(t)
        t, diag = median_time(lambda: fast_diag(G, B, args.damp), 1)
        fast_t.append(t)
    t_fast, t_ref_sub = statistics.median(fast_t), statistics.median(ref_t)
    ref_diag = torch.cat([inv.diagonal() for inv in inverses])
    stop = sub[-1][1]
    rel = ((diag[:stop] - ref_diag).abs() / ref_diag.abs()).max().item()
    cost_all = sum((e - s) ** 2 for s, e in blocks)
    cost_sub = sum((e - s) ** 2 for s, e in sub)
    t_ref = t_ref_sub * cost_all / cost_sub
    results["a"] = {
        "m": m, "fast_s": t_fast, "reference_s_on_subset": t_ref_sub,
        "reference_blocks_timed": len(sub), "blocks": len(blocks),
        "reference_s_extrapolated": t_ref, "speedup": t_ref / t_fast,
        "max_rel_diff_diag": rel, "fast_s_all": fast_t, "reference_s_on_subset_all": ref_t,
        "speedup_paired_median": statistics.median(
            r * cost_all / cost_sub / f for r, f in zip(ref_t, fast_t, strict=True)
        ),
    }

    # (b) m = 1000, fast path vs the FLOP floor at this machine's matmul rate.
    m = 1000
    G = torch.randn(m, d)
    flops = min(2 * m * m * d, 2 * m * B * d)
    fast_t, rates = [], []
    for _ in range(args.repeats):
        rates.append(matmul_rate(4096, 3))
        fast_t.append(median_time(lambda: fast_diag(G, B, args.damp), 1)[0])
    rate, t_fast1k = statistics.median(rates), statistics.median(fast_t)
    t_floor = flops / rate
    results["b"] = {
        "m": m, "fast_s": t_fast1k, "flops": flops, "matmul_gflops": rate / 1e9,
        "floor_s": t_floor, "ratio_to_floor": t_fast1k / t_floor,
        "fast_s_all": fast_t, "matmul_gflops_all": [r / 1e9 for r in rates],
        "ratio_paired_median": statistics.median(
            f * r / flops for f, r in zip(fast_t, rates, strict=True)
        ),
    }

    table = Table(title=f"inverse build to diag, d={d}, B={B}, float32")
    for col in ("case", "fast path (s)", "comparison (s)", "ratio", "note"):
        table.add_column(col)
    a, b = results["a"], results["b"]
    table.add_row("m=100", f"{a['fast_s']:.3f}", f"{a['reference_s_extrapolated']:.1f}",
                  f"{a['speedup']:.0f}× faster (paired {a['speedup_paired_median']:.0f}×)",
                  f"Woodbury timed on {a['reference_blocks_timed']}/{a['blocks']} blocks, "
                  f"extrapolated ∝ ΣB²; max rel diag diff {a['max_rel_diff_diag']:.1e}")
    table.add_row("m=1000", f"{b['fast_s']:.3f}", f"{b['floor_s']:.3f}",
                  f"{b['ratio_to_floor']:.2f}× floor (paired {b['ratio_paired_median']:.2f}×)",
                  f"floor = {b['flops']:.2e} FLOP at {b['matmul_gflops']:.0f} GFLOP/s")
    Console().print(table)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_json(results, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
