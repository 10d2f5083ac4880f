"""Memory plans: hand counts of the biggest allocations, what fits, and the ``plan`` command."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import cli_bad, cli_ok
from woodfisher.cli.scale import parse_bytes
from woodfisher.fisher.dense import make_units, unit_ranges
from woodfisher.plan import activation_numel, fitting, plan_prune

MLPNET = [235_200, 30_000, 1_000]


def _block_entries(sizes, block):
    # Hand count: every layer cut in blocks of `block`, the last one shorter.
    total = 0
    for s in sizes:
        full, rest = divmod(s, block)
        total += full * block * block + rest * rest
    return total


def test_downdate_plan_counts_the_inverse_blocks_and_one_gradient_chunk():
    p = plan_prune(MLPNET, num_grads=1000, block_size=500)
    assert p.path == "downdate" and p.nproc == 1 and p.communication == {}
    assert p.parts["inverse blocks"] == 4 * _block_entries(MLPNET, 500) == 532_160_000
    assert p.chunk_rows == 250  # 4 chunks of 250 rows fit 256 MiB
    assert p.parts["gradient chunk"] == 250 * 266_200 * 4
    assert p.total_bytes == sum(p.parts.values())
    wide = plan_prune(MLPNET, num_grads=1000, block_size=500, dtype=torch.float64)
    assert wide.parts["inverse blocks"] == 2 * p.parts["inverse blocks"]


def test_ranks_split_the_inverse_blocks_and_count_what_they_send():
    one = plan_prune(MLPNET, 1000, 500, 1)
    two = plan_prune(MLPNET, 1000, 500, 2)
    units = make_units(MLPNET, 500)
    owned = [sum(u.entries for u in units[a:b]) for a, b in unit_ranges(units, 2)]
    assert sum(owned) == _block_entries(MLPNET, 500)
    assert two.parts["inverse blocks"] == 4 * max(owned) < one.parts["inverse blocks"]
    assert two.parts["inverse blocks"] <= 0.55 * one.parts["inverse blocks"]
    # Each rank computes 2 of the 4 chunks and sends the columns it does not own.
    cols = [units[b - 1].stop - units[a].start for a, b in unit_ranges(units, 2)]
    assert two.communication["gradients"] == 2 * 250 * (266_200 - max(cols)) * 4
    assert two.communication["assemble"] == 266_200 * 5
    assert "exchange buffers" in two.parts


def test_wide_blocks_take_the_resample_path_with_the_whole_gradients():
    p = plan_prune(MLPNET, num_grads=100, block_size=1000)
    assert p.path == "resample"
    assert p.parts["gradients"] == 100 * 266_200 * 4
    forced = plan_prune(MLPNET, num_grads=100, block_size=1000, recompute_by="downdate")
    assert forced.path == "downdate"


def test_fitting_names_the_smallest_p_and_largest_b_that_fit():
    sizes = [10**8]
    memory = 8 * 2**30
    alt = fitting(sizes, 1000, 500, 1, memory, device="cuda")
    p = alt["nproc"]
    assert p is not None and p > 1
    assert plan_prune(sizes, 1000, 500, p).total_bytes <= memory
    assert plan_prune(sizes, 1000, 500, p // 2).total_bytes > memory
    b = alt["block_size"]
    assert b is not None and plan_prune(sizes, 1000, b, 1).total_bytes <= memory


def test_activation_numel_counts_leaf_outputs_on_meta():
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert activation_numel(net, (4,)) == 3 + 3 + 2
    assert next(net.parameters()).device.type == "cpu"  # the model itself is untouched


def test_bad_plan_input_is_refused():
    with pytest.raises(ValueError, match="positive integers"):
        plan_prune([0, 5], 10, 4)
    with pytest.raises(ValueError, match="nproc"):
        plan_prune([5], 10, 4, 0)
    assert parse_bytes("16GiB") == 16 * 2**30 and parse_bytes("1.5k") == 1536
    with pytest.raises(ValueError, match="--memory"):
        parse_bytes("lots")


def test_plan_command_prints_json_and_says_what_fits():
    out = json.loads(cli_ok(["plan", "--params", "235200,30000,1000", "--num-grads", "1000",
                             "--block-size", "500", "--device", "cuda", "--json"]).stdout)
    assert out["path"] == "downdate" and out["parts"]["inverse blocks"] == 532_160_000
    assert out["total_bytes"] == sum(out["parts"].values())
    cli_ok(["plan", "--model", "mlpnet-small", "--input-shape", "1,8,8", "--nproc", "2"])
    err = cli_bad(["plan", "--params", "1e8", "--num-grads", "1000", "--device", "cuda",
                   "--memory", "8GiB"], "more than --memory 8GiB", "fits with --nproc")
    p = int(err.split("fits with --nproc ")[1].split()[0])
    # On cuda a --params plan has no baseline (no process RSS, no model bytes).
    assert plan_prune([10**8], 1000, 500, p).total_bytes <= 8 * 2**30
    assert plan_prune([10**8], 1000, 500, p // 2).total_bytes > 8 * 2**30
    cli_bad(["plan", "--params", "100", "--device", "tpu"], "--device must be cpu or cuda")
    cli_bad(["plan", "--model", "mlpnet", "--params", "100"], "exactly one of")
