"""Exploratory: downdate with the Fisher re-estimated K times along the 9 steps (MLPNet, 90 %).

``recompute_by="downdate"`` estimates F once and downdates it through all 9 steps of the
default schedule; ``"resample"`` re-estimates it at every step. This runs the steps in K
consecutive ``prune(..., recompute_by="downdate")`` calls (each a fresh gradient pass and
inversion at the current weights); the geometric schedule makes the composed steps those of
one 9-step prune. One thread, trained Fashion-MNIST MLPNet, m = 1000, B = 500, test accuracy.
K = 1 and K = 9 (resample) are in ``bench/results/end_to_end_scale_quick.json``.

Usage::

    WOODFISHER_BENCH_CACHE=/work/cache PYTHONPATH=src python bench/refresh_fisher.py 3 2
"""

import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import dense_checkpoint, machine_info  # noqa: E402

import woodfisher as wf  # noqa: E402
from woodfisher.checkpoint import atomic_save_json  # noqa: E402
from woodfisher.compare import pruning_batches  # noqa: E402
from woodfisher.data import load_dataset  # noqa: E402
from woodfisher.pruning.schedule import auto_steps, interpolate  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    model0, info = dense_checkpoint("mlpnet")
    splits = load_dataset("fashion-mnist", normalisation=info["dataset"])
    data = pruning_batches(splits.train, 2000, 0)
    steps = auto_steps(0.0, 0.9, 0.25)
    targets = interpolate(0.0, 0.9, steps, "geometric")
    rows = []
    for segs in [int(a) for a in sys.argv[1:]] or [2, 3]:
        model = copy.deepcopy(model0)
        cuts = [round(steps * (i + 1) / segs) for i in range(segs)]
        t0, c0, prev = time.perf_counter(), time.process_time(), 0
        for c in cuts:
            wf.prune(model, data, targets[c - 1], num_grads=1000, block_size=500,
                     recompute=c - prev, recompute_by="downdate")
            prev = c
        acc = wf.evaluate(model, splits.test)["accuracy"]
        rows.append({"segments": segs, "cuts": cuts, "accuracy": acc,
                     "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0})
        print(json.dumps(rows[-1]), flush=True)
    out = Path("bench/results/refresh_fisher.json")
    atomic_save_json({"machine": machine_info(), "rows": rows}, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
