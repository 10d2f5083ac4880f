"""Benchmark on a CUDA device: inverse build, end-to-end prune, ResNet-50 one-shot.

Every number comes with two ratios measured in the same run: against this machine's CPU
doing the same work, and against the device's own fp32 matmul rate (so a slow run can be told
from a slow device). Run it through ``bench/gpu.sh`` on a machine with a GPU; it cannot run on
the 2-core development machine (no GPU there).

1. inverse build: Gram accumulation + block inversion for MLPNet's layout (d = 266,200),
   m = 1000 synthetic gradients, B = 500;
2. end to end: ``prune(MLPNet, 0.9, num_grads=1000)`` on the downdate path (Fashion-MNIST if
   installed, else random 28×28 inputs: timing does not depend on the data);
3. ResNet-50 (3×64×64 random inputs, 1000 classes) one-shot to 50 % with m = 256, B = 500
   (51 GB of inverse blocks: an H100/H200-class device).

Usage::

    bash bench/gpu.sh            # writes bench/results/gpu.json
    PYTHONPATH=src python bench/gpu.py --skip-resnet50 --skip-cpu
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, n: int = 4096, batch: int = 8) -> float:
    """Measured fp32 batched-matmul rate (FLOP/s), TF32 off."""
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(batch, n, n, device=device)
    b = torch.randn(batch, n, n, device=device)
    a @ b
    sync(device)
    reps = 5 if device.type == "cuda" else 1
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return reps * 2 * batch * n**3 / (time.perf_counter() - t0)


def inverse_build(device: torch.device, m: int = 1000, block: int = 500) -> dict:
    from woodfisher.fisher.dense import GramAccumulator, make_units

    sizes = [235_200, 30_000, 1_000]
    d = sum(sizes)
    g = torch.Generator(device=device).manual_seed(0)
    units = make_units(sizes, block)
    rows = 250
    chunk = torch.randn(rows, d, device=device, generator=g)
    sync(device)
    t0 = time.perf_counter()
    acc = GramAccumulator(units, torch.float32, device)
    for _ in range(m // rows):
        acc.add(chunk)
    inv = acc.finish(m, 1e-3)
    diag = inv.diag()
    sync(device)
    seconds = time.perf_counter() - t0
    flops = 0.75 * 2 * m * d * block + d * block * block * (1 / 3 + 1 / 3 + 2)
    return {"seconds": seconds, "flops": flops, "diag_mean": float(diag.mean())}


def end_to_end(device: torch.device, m: int = 1000) -> dict:
    import woodfisher as wf
    from woodfisher.models import build_model

    try:
        ds = wf.load_dataset("fashion-mnist")
        x, y = ds.train.tensors
    except Exception:  # noqa: BLE001 - no dataset on this machine: random inputs
        x, y = torch.randn(m + 1000, 1, 28, 28), torch.randint(0, 10, (m + 1000,))
    data = [(x[i : i + 100], y[i : i + 100]) for i in range(0, m + 1000, 100)]
    torch.manual_seed(0)
    model = build_model("mlpnet", (1, 28, 28), 10).to(device)
    wf.prune(model, data[:2], 0.5, num_grads=64, recompute=1)  # warm-up (kernels, vmap)
    torch.manual_seed(0)
    model = build_model("mlpnet", (1, 28, 28), 10).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    res = wf.prune(model, data, 0.9, num_grads=m, recompute_by="downdate")
    sync(device)
    out = {"seconds": time.perf_counter() - t0, "times": res.times, "steps": len(res.steps),
           "sparsity": res.sparsity}
    if device.type == "cuda":
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def resnet50(device: torch.device, m: int = 256, block: int = 500) -> dict:
    import woodfisher as wf
    from woodfisher.models import build_model
    from woodfisher.params import select_modules
    from woodfisher.plan import activation_numel, plan_prune

    torch.manual_seed(0)
    model = build_model("resnet50", (3, 64, 64), 1000).to(device)
    sizes = [mod.weight.numel() for mod in select_modules(model).values()]
    plan = plan_prune(sizes, m, block, device=device.type,
                      activations=activation_numel(model, (3, 64, 64)))
    x = torch.randn(m, 3, 64, 64)
    y = torch.randint(0, 1000, (m,))
    data = [(x[i : i + 32], y[i : i + 32]) for i in range(0, m, 32)]
    torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    res = wf.prune(model, data, 0.5, num_grads=m, block_size=block, recompute_by="downdate")
    sync(device)
    return {"seconds": time.perf_counter() - t0, "times": res.times, "steps": len(res.steps),
            "d": sum(sizes), "plan_bytes": plan.total_bytes,
            "peak_cuda_bytes": torch.cuda.max_memory_allocated(device),
            "gram_flops": 0.75 * 2 * m * sum(sizes) * block}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu.json"))
    parser.add_argument("--skip-cpu", action="store_true", help="no CPU comparison runs")
    parser.add_argument("--skip-resnet50", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: run bench/gpu.sh on a machine with a GPU")
    from common import machine_info

    from woodfisher.checkpoint import atomic_save_json

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    result = {"machine": machine_info(), "gpu": torch.cuda.get_device_name(gpu)}
    rate = {"cuda": matmul_rate(gpu)}
    if not args.skip_cpu:
        rate["cpu"] = matmul_rate(cpu, n=2048, batch=2)
    result["matmul_flops_per_s"] = rate
    print(f"fp32 matmul: {rate['cuda'] / 1e12:.1f} TFLOP/s on {result['gpu']}"
          + (f", {rate['cpu'] / 1e9:.0f} GFLOP/s on the CPU" if "cpu" in rate else ""),
          flush=True)

    for name, fn in (("inverse_build", inverse_build), ("end_to_end", end_to_end)):
        row = {"cuda": fn(gpu)}
        if not args.skip_cpu:
            row["cpu"] = fn(cpu)
            row["cpu_over_cuda"] = row["cpu"]["seconds"] / row["cuda"]["seconds"]
        if "flops" in row["cuda"]:
            row["fraction_of_matmul_rate"] = (
                row["cuda"]["flops"] / row["cuda"]["seconds"] / rate["cuda"]
            )
        result[name] = row
        print(f"{name}: {row['cuda']['seconds']:.2f} s on CUDA"
              + (f", {row['cpu']['seconds']:.2f} s on CPU ({row['cpu_over_cuda']:.1f}x)"
                 if "cpu" in row else "")
              + (f", {row['fraction_of_matmul_rate']:.0%} of the matmul rate"
                 if "fraction_of_matmul_rate" in row else ""), flush=True)

    if not args.skip_resnet50:
        r = resnet50(gpu)
        r["fraction_of_matmul_rate_gradients"] = (
            r["gram_flops"] / r["times"]["gradients"] / rate["cuda"]
        )
        result["resnet50"] = r
        print(f"resnet50 (d = {r['d']:,}, m = 256, B = 500) to 50 %: {r['seconds']:.1f} s "
              f"({json.dumps({k: round(v, 2) for k, v in r['times'].items()})}), peak "
              f"{r['peak_cuda_bytes'] / 2**30:.1f} GiB for a plan of "
              f"{r['plan_bytes'] / 2**30:.1f} GiB", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_json(result, args.out)
    print(f"wrote {args.out}")
    os.environ.pop("WOODFISHER_CHUNK_BYTES", None)


if __name__ == "__main__":
    main()
