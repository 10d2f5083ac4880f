"""Benchmark: one prune over P = 1 and P = 2 processes (torchrun, gloo on loopback).

Runs the real command lines on the trained Fashion-MNIST MLPNet:

- ``python -m woodfisher prune CKPT --num-grads M --recompute-by downdate`` (P = 1, with 1 and
  with 2 threads),
- ``torchrun --nproc-per-node 2 -m woodfisher prune CKPT ...`` (P = 2, 1 thread per rank, as
  torchrun sets),

and reports the wall time of each, every rank's phase times and peak RSS (from the JSON report
rank 0 writes), whether the masks of P = 2 equal those of P = 1 at the same thread count, and
the memory plan of P = 8 ranks on ResNet-50 with m = 1000 (``woodfisher.plan``; not run here).

Usage::

    WOODFISHER_BENCH_CACHE=/work/cache PYTHONPATH=src python bench/distributed.py
    PYTHONPATH=src python bench/distributed.py --quick   # m = 300
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _run(cmd: list[str], threads: int) -> tuple[dict, float]:
    env = {**os.environ, "PYTHONPATH": "src", "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    return json.loads(out.stdout.strip().splitlines()[-1]), wall


def resnet50_plan(nproc: int = 8, num_grads: int = 1000, block_size: int = 500) -> dict:
    """The plan of ResNet-50 (224×224, 1000 classes) over ``nproc`` GPUs, built on meta."""
    import torch

    from woodfisher.models import build_model
    from woodfisher.params import select_modules
    from woodfisher.plan import activation_numel, plan_prune

    with torch.device("meta"):
        net = build_model("resnet50", (3, 224, 224), 1000)
    sizes = [m.weight.numel() for m in select_modules(net).values()]
    plan = plan_prune(sizes, num_grads, block_size, nproc, device="cuda",
                      activations=activation_numel(net, (3, 224, 224)))
    return plan.to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/distributed.json"))
    parser.add_argument("--quick", action="store_true", help="m = 300 instead of 1000")
    parser.add_argument("--num-grads", type=int, default=None)
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args()
    from common import dense_checkpoint, machine_info

    from woodfisher.checkpoint import atomic_save_json, load_checkpoint
    from woodfisher.fisher.memory import format_bytes

    m = args.num_grads or (300 if args.quick else 1000)
    dense_checkpoint("mlpnet")  # trains once if not cached
    from common import cache_dir

    ckpt = cache_dir() / "mlpnet-fashion-mnist-seed0-e10.pt"
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    tmp = Path(tempfile.mkdtemp(prefix="wf-dist-"))
    common = ["prune", str(ckpt), "--sparsity", str(args.sparsity), "--num-grads", str(m),
              "--recompute-by", "downdate", "--json", "-q"]
    runs = {}
    for name, cmd, threads in [
        ("P1-1thread", [sys.executable, "-m", "woodfisher", *common, "--out",
                        str(tmp / "p1t1.pt")], 1),
        ("P2", [torchrun, "--nproc-per-node", "2", "-m", "woodfisher", *common, "--out",
                str(tmp / "p2.pt")], 1),
        ("P1-2threads", [sys.executable, "-m", "woodfisher", *common, "--out",
                         str(tmp / "p1t2.pt")], 2),
    ]:
        load = os.getloadavg()
        report, wall = _run(cmd, threads)
        ranks = report["prune"].get("ranks") or [{"rank": 0, "times": report["prune"]["times"]}]
        runs[name] = {"wall_s": wall, "load_before": load, "accuracy": report["after"]["accuracy"],
                      "ranks": ranks, "times": report["prune"]["times"]}
        peaks = ", ".join(
            f"rank {r['rank']} {format_bytes(r['peak_rss_bytes'])}" for r in ranks
            if "peak_rss_bytes" in r
        )
        print(f"{name:12s} {wall:7.1f} s (load {load[0]:.1f}), accuracy "
              f"{report['after']['accuracy']:.4f}{', peak ' + peaks if peaks else ''}",
              flush=True)
    one, _ = load_checkpoint(tmp / "p1t1.pt")
    two, _ = load_checkpoint(tmp / "p2.pt")
    same = all(
        bool((a == b).all())
        for (n, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items(), strict=True)
        if n.endswith("_mask")
    )
    print(f"masks of P = 2 equal those of P = 1 (1 thread each): {same}")
    plan = resnet50_plan()
    print(f"ResNet-50 (224x224), m = 1000, B = 500, P = 8 on GPUs: "
          f"{format_bytes(plan['total_bytes'])} per rank; gradient columns sent per rank "
          f"{format_bytes(plan['communication']['gradients'])}")
    shutil.rmtree(tmp, ignore_errors=True)
    result = {"machine": machine_info(), "num_grads": m, "sparsity": args.sparsity,
              "runs": runs, "masks_equal_p1_p2": same, "resnet50_p8_plan": plan}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_json(result, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
