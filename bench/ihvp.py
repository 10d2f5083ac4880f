"""Benchmark: inverse-Fisher-vector products at memory speed, against the per-block loop.

MLPNet 784-300-100-10 weights (d = 266,200 in layers of 235,200, 30,000 and 1,000 entries),
float32, synthetic Gaussian gradients. For each (m, B):

- one vector: ``inv.mul(v)`` against the floor, a plain Python loop of two ``torch.mv`` per
  block over the same kept factor (``u = W_b v_b``, ``W_bᵀ u``; one ``mv`` per block when
  ``m > B`` keeps ``F_b⁻¹``), and ``inv.fmul(v)`` (``F v``) against the same loop over the
  gradients;
- k vectors (``V`` of shape (d, k)): ``inv.mul(V)`` against the FLOP floor at this machine's
  float32 matmul rate (a 4096² ``torch.mm``), measured in the same run;
- the memory rate (``torch.sum`` over a 256 MiB tensor): the factor's bytes read per second
  by ``mul`` against it.

K-FAC (per-layer ``S⁻¹ X A⁻¹``) and the diagonal estimate are timed too. Other jobs share the
machine, so every comparison is interleaved (floor, then ours, in each repeat) and the table
gives medians of the repeats; the load average is recorded before and after.

Usage::

    PYTHONPATH=src python bench/ihvp.py                 # writes bench/results/ihvp.json
    PYTHONPATH=src python bench/ihvp.py --quick         # small m, 3 repeats
    PYTHONPATH=src python bench/ihvp.py --threads 1     # one thread (see docs/ihvp.md)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from common import machine_info  # bench/ is the script's directory, hence on sys.path
from rich.console import Console
from rich.table import Table

from woodfisher.checkpoint import atomic_save_json
from woodfisher.fisher import (
    DiagonalFisherInverse,
    EmpiricalFisherInverse,
    KFACInverse,
)

SIZES = [784 * 300, 300 * 100, 100 * 10]
SHAPES = [(300, 784), (100, 300), (10, 100)]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, timed in turn within every repeat."""
    for fn in fns.values():
        fn()  # warm-up
    runs = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            runs[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in runs.items()}


def block_views(inv: EmpiricalFisherInverse) -> list[tuple[int, int, torch.Tensor, bool]]:
    """(start, stop, kept factor, sample space) of every block, in order."""
    out = []
    for b, (s, e) in enumerate(inv.blocks):
        g, j = inv._where[b]
        grp = inv._groups[g]
        out.append((s, e, grp.factor[j], grp.sample_space))
    return out


def loop_mul(views, v: torch.Tensor, damp: float) -> torch.Tensor:
    """The floor: two ``torch.mv`` per block (one for a dense block)."""
    out = torch.empty_like(v)
    for s, e, W, sample in views:
        if sample:
            out[s:e] = (v[s:e] - W.T.mv(W.mv(v[s:e]))) / damp
        else:
            out[s:e] = W.mv(v[s:e])
    return out


def loop_fmul(G: torch.Tensor, blocks, v: torch.Tensor, damp: float) -> torch.Tensor:
    out = torch.empty_like(v)
    for s, e in blocks:
        g = G[:, s:e]
        out[s:e] = damp * v[s:e] + g.T.mv(g.mv(v[s:e])) / G.shape[0]
    return out


def memory_rate(repeats: int) -> float:
    a = torch.randn(1 << 26)  # 256 MiB of float32
    t = interleaved({"sum": lambda: a.sum()}, repeats)["sum"]
    return a.numel() * 4 / t


def matmul_rate(repeats: int, n: int = 4096) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / interleaved({"mm": lambda: torch.mm(a, b)}, repeats)["mm"]


def bench_woodfisher(m: int, B: int, ks: list[int], repeats: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    d = sum(SIZES)
    G = torch.randn(m, d, generator=gen)
    inv = EmpiricalFisherInverse(G, B, 1e-3, layout=SIZES)
    views = block_views(inv)
    v = torch.randn(d, generator=gen)
    ref = loop_mul(views, v, inv.damp)
    err = float((inv.mul(v) - ref).norm() / ref.norm())
    factor_bytes = sum(W.numel() for _, _, W, _ in views) * 4
    grads_bytes = G.numel() * 4
    t = interleaved({
        "loop_mul": lambda: loop_mul(views, v, inv.damp),
        "mul": lambda: inv.mul(v),
        "loop_fmul": lambda: loop_fmul(G, inv.blocks, v, inv.damp),
        "fmul": lambda: inv.fmul(v),
    }, repeats)
    row = {
        "m": m, "block_size": B, "d": d, "blocks": len(inv.blocks),
        "sample_space": bool(views[0][3]), "factor_bytes": factor_bytes,
        "rel_diff_to_loop": err, **{f"{k}_s": x for k, x in t.items()},
        "mul_vs_loop": t["loop_mul"] / t["mul"], "fmul_vs_loop": t["loop_fmul"] / t["fmul"],
        "mul_gb_s": factor_bytes / t["mul"] / 1e9, "fmul_gb_s": grads_bytes / t["fmul"] / 1e9,
        "many": [],
    }
    for k in ks:
        V = torch.randn(d, k, generator=gen)
        flops = (4 if row["sample_space"] else 2) * factor_bytes / 4 * k
        tk = interleaved({"mul": lambda V=V: inv.mul(V)}, repeats)["mul"]
        row["many"].append({"k": k, "mul_s": tk, "flops": flops, "gflop_s": flops / tk / 1e9,
                            "per_vector_vs_one": tk / k / t["mul"]})
    return row


def bench_kfac_and_diagonal(repeats: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for i, (o, n) in enumerate(SHAPES):
        A = torch.randn(n, n + 10, generator=gen)
        S = torch.randn(o, o + 10, generator=gen)
        factors[f"fc{i + 1}"] = (A @ A.T / n, S @ S.T / o)
    kfac = KFACInverse(factors, damp=1e-3)
    d = sum(SIZES)
    v = torch.randn(d, generator=gen)

    def loop_kfac():
        out = torch.empty_like(v)
        for (s, e), name, (o, n) in zip(kfac.blocks, kfac.names, SHAPES, strict=True):
            out[s:e] = (kfac.S_inv[name] @ v[s:e].view(o, n) @ kfac.A_inv[name]).reshape(-1)
        return out

    diag = DiagonalFisherInverse(torch.randn(8, d, generator=gen), 1e-3)
    t = interleaved({"loop_kfac": loop_kfac, "kfac_mul": lambda: kfac.mul(v),
                     "kfac_fmul": lambda: kfac.fmul(v), "diag_mul": lambda: diag.mul(v),
                     "diag_fmul": lambda: diag.fmul(v)}, repeats)
    return {**{f"{k}_s": x for k, x in t.items()},
            "kfac_vs_loop": t["loop_kfac"] / t["kfac_mul"],
            "diag_gb_s": 3 * d * 4 / t["diag_mul"] / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small m, 3 repeats")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = [(1000, 2000), (500, 500), (100, 100), (1000, 500)]
    ks = [16, 128]
    if args.quick:
        args.repeats, configs, ks = 3, [(100, 2000), (100, 100), (200, 100)], [16]
    out = args.out or Path(
        "bench/results/ihvp" + ("_quick" if args.quick else "")
        + (f"_t{args.threads}" if args.threads else "") + ".json"
    )
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    rates = {"memory_gb_s": memory_rate(args.repeats) / 1e9,
             "matmul_gflop_s": matmul_rate(args.repeats) / 1e9}
    rows = []
    for m, B in configs:
        rows.append(bench_woodfisher(m, B, ks, args.repeats, args.seed))
        print(f"m={m} B={B}: mul {rows[-1]['mul_s']:.3f}s, loop {rows[-1]['loop_mul_s']:.3f}s",
              file=sys.stderr, flush=True)
    other = bench_kfac_and_diagonal(args.repeats, args.seed)
    rates_after = {"memory_gb_s": memory_rate(args.repeats) / 1e9,
                   "matmul_gflop_s": matmul_rate(args.repeats) / 1e9}

    table = Table(title=f"IHVP, d={sum(SIZES)}, float32, {torch.get_num_threads()} threads; "
                        f"memory {rates['memory_gb_s']:.1f} GB/s, matmul "
                        f"{rates['matmul_gflop_s']:.0f} GFLOP/s (load {load_before[0]:.1f})")
    for col in ("m", "B", "loop (s)", "mul (s)", "loop/mul", "mul GB/s", "F v loop/ours",
                "k=16 GFLOP/s", "k=16 s/vector ÷ k=1"):
        table.add_column(col, justify="right")
    for r in rows:
        many = r["many"][0]
        table.add_row(str(r["m"]), str(r["block_size"]), f"{r['loop_mul_s']:.4f}",
                      f"{r['mul_s']:.4f}", f"{r['mul_vs_loop']:.2f}", f"{r['mul_gb_s']:.1f}",
                      f"{r['fmul_vs_loop']:.2f}", f"{many['gflop_s']:.0f}",
                      f"{many['per_vector_vs_one']:.2f}")
    Console().print(table)
    Console().print(f"K-FAC mul {other['kfac_mul_s'] * 1e3:.1f} ms (per-layer loop "
                    f"{other['loop_kfac_s'] * 1e3:.1f} ms); diagonal mul "
                    f"{other['diag_mul_s'] * 1e3:.2f} ms ({other['diag_gb_s']:.1f} GB/s)")
    result = {
        "command": "PYTHONPATH=src python bench/ihvp.py" + (" --quick" if args.quick else "")
        + (f" --threads {args.threads}" if args.threads else ""),
        "seed": args.seed, "repeats": args.repeats, "dtype": "float32",
        "rates_before": rates, "rates_after": rates_after, "woodfisher": rows,
        "kfac_and_diagonal": other, "load_average_before": load_before,
        "load_average_after": os.getloadavg(), "seconds": time.perf_counter() - t0,
        "machine": machine_info(),
    }
    atomic_save_json(result, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
