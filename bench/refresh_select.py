"""Benchmark: how often the downdate path should re-estimate the Fisher (``prune(refresh=r)``).

Two models, pruned to 90 % with every other option at its default:

- MLPNet 784-300-100-10 on Fashion-MNIST (m = 1000, B = 500): accuracy on a validation split
  (10,000 training images after the 2,000 the prune draws, from the same seeded permutation)
  and on the test set, for each ``r`` and for ``recompute_by="resample"``, seeds 0-2;
- the small digits MLP of the CLI tests (``mlpnet-small``, m = 64, B = 64), test accuracy.

The rule for a default: the cheapest ``r`` whose mean validation accuracy is at least
resample's; the small model checks whether that choice carries over (docs/scale.md).

Usage::

    WOODFISHER_BENCH_CACHE=/work/cache PYTHONPATH=src python bench/refresh_select.py
    PYTHONPATH=src python bench/refresh_select.py --quick   # the digits model only (~1 min)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

REFRESH = (0.0, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 1.0)
SEEDS = (0, 1, 2)


def _arms():
    yield "resample", {"recompute_by": "resample"}
    for r in REFRESH:
        yield f"refresh={r}", {"recompute_by": "downdate", "refresh": r}


def mlpnet(log) -> list[dict]:
    import torch
    from common import dense_checkpoint

    import woodfisher as wf
    from woodfisher.compare import pruning_batches
    from woodfisher.data import load_dataset

    model, info = dense_checkpoint("mlpnet")
    splits = load_dataset("fashion-mnist", normalisation=info["dataset"])
    x, y = splits.train.tensors[:2]
    rows = []
    for seed in SEEDS:
        data = pruning_batches(splits.train, 2000, seed)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[2000:12000]
        val = [(x[order[s:s + 1000]], y[order[s:s + 1000]]) for s in range(0, 10000, 1000)]
        for arm, opts in _arms():
            net = copy.deepcopy(model)
            c0 = time.process_time()
            wf.prune(net, data, 0.9, num_grads=1000, block_size=500, seed=seed, **opts)
            cpu = time.process_time() - c0
            row = {"model": "mlpnet", "arm": arm, "seed": seed, "cpu_s": cpu,
                   "val": wf.evaluate(net, val)["accuracy"],
                   "test": wf.evaluate(net, splits.test)["accuracy"]}
            rows.append(row)
            log(row)
    return rows


def digits(log) -> list[dict]:
    import tempfile

    import woodfisher as wf
    from woodfisher.compare import pruning_batches
    from woodfisher.data import load_dataset
    from woodfisher.train import train_and_save

    with tempfile.TemporaryDirectory() as tmp:  # the model `woodfisher train` makes in tests
        path = str(Path(tmp) / "small.pt")
        train_and_save("mlpnet-small", "digits", out=path, epochs=20, seed=0, progress=False)
        model, info = wf.load_checkpoint(path)
    splits = load_dataset("digits", normalisation=info["dataset"])
    rows = []
    for seed in SEEDS:
        data = pruning_batches(splits.train, 64 + 1000, seed)
        for arm, opts in _arms():
            net = copy.deepcopy(model)
            wf.prune(net, data, 0.9, num_grads=64, block_size=64, seed=seed, **opts)
            row = {"model": "mlpnet-small-digits", "arm": arm, "seed": seed,
                   "test": wf.evaluate(net, splits.test)["accuracy"]}
            rows.append(row)
            log(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/refresh_select.json"))
    parser.add_argument("--quick", action="store_true", help="the digits model only")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch
    from common import machine_info

    from woodfisher.checkpoint import atomic_save_json

    torch.set_num_threads(args.threads)
    rows = digits(print) + ([] if args.quick else mlpnet(print))
    summary = {}
    for model in sorted({r["model"] for r in rows}):
        for arm, _ in _arms():
            rs = [r for r in rows if r["model"] == model and r["arm"] == arm]
            summary[f"{model} {arm}"] = {
                k: statistics.mean(r[k] for r in rs) for k in ("val", "test", "cpu_s")
                if k in rs[0]
            }
    for key, vals in summary.items():
        print(key, {k: round(v, 4) for k, v in vals.items()})
    atomic_save_json({"machine": machine_info(), "options": {"quick": args.quick},
                      "summary": summary, "runs": rows}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
