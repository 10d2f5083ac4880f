"""compress() and the `woodfisher qubo` command on a small CNN trained on digits."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("dimod")
pytest.importorskip("dwave.samplers")

from conftest import cli_bad, cli_ok  # noqa: E402
from woodfisher.checkpoint import load_checkpoint  # noqa: E402
from woodfisher.compare import pruning_batches  # noqa: E402
from woodfisher.data import load_dataset  # noqa: E402
from woodfisher.params import effective_weight, select_modules  # noqa: E402
from woodfisher.qubo import (  # noqa: E402
    Decision,
    Effort,
    apply_plan,
    compress,
    formulate,
    qubo_costs,
)

FAST = ["--num-grads", "64", "--reads", "8", "--sweeps", "200", "-q"]
CONTRACT = {"size_ratio", "layers", "energy", "solver", "solver_time_s"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qubo") / "cnn.pt"
    cli_ok(["train", "--model", "cnn", "--dataset", "digits", "--epochs", "1", "--out",
            str(path), "-q"])
    return path


def _levels_fit(w: torch.Tensor, bits: int) -> bool:
    rows = w.reshape(w.shape[0], -1)
    return all(len(torch.unique(r[r != 0])) <= 2 ** bits - 1 for r in rows)


@pytest.mark.parametrize("quantizer,constraint", [("rtn", "lagrange"), ("obq", "penalty")])
def test_compress_prunes_quantizes_and_reports(ckpt, quantizer, constraint):
    model, info = load_checkpoint(ckpt)
    splits = load_dataset("digits")
    data = pruning_batches(splits.train, 64, seed=0)
    before = copy.deepcopy(model)
    report = compress(model, data, budget=0.12, quantizer=quantizer, constraint=constraint,
                      num_grads=64, effort=Effort(reads=8, sweeps=200), block_size=64)
    json.dumps(report)
    assert CONTRACT <= set(report)
    assert report["size_ratio"] <= 0.12
    modules = select_modules(model)
    old = select_modules(before)
    assert [row["name"] for row in report["layers"]] == list(modules)
    size = 0
    for row in report["layers"]:
        w = effective_weight(modules[row["name"]])
        assert row["filters"] == w.shape[0] and 2 <= row["bits"] <= 8
        assert row["pruned_filters"] == len(row["pruned"])
        zero_rows = [i for i in range(w.shape[0]) if not w[i].any()]
        assert set(row["pruned"]) <= set(zero_rows)
        assert _levels_fit(w, row["bits"])
        if row["pruned"]:
            assert hasattr(modules[row["name"]], "weight_mask")
        size += (row["filters"] - row["pruned_filters"]) * w[0].numel() * row["bits"]
        if quantizer == "rtn":  # unpruned filters are their old weights rounded
            kept = [i for i in range(w.shape[0]) if i not in row["pruned"]]
            from woodfisher.quant import fake_quantize
            mask = torch.zeros_like(w)
            mask[kept] = 1
            want = fake_quantize(effective_weight(old[row["name"]]) * mask, row["bits"])
            assert torch.allclose(w, want)
    total = 32 * sum(effective_weight(m).numel() for m in modules.values())
    assert report["size_ratio"] == pytest.approx(size / total)


def test_cli_writes_checkpoint_and_json(ckpt, tmp_path):
    out = tmp_path / "q.pt"
    res = cli_ok(["qubo", str(ckpt), "--budget", "0.12", "--out", str(out), *FAST])
    assert "bits" in res.stdout and "size" in res.stdout
    report = json.loads(out.with_suffix(".json").read_text())
    assert CONTRACT <= set(report) and report["size_ratio"] <= 0.12
    model, info = load_checkpoint(out)
    assert info["meta"]["test_accuracy"] == report["after"]["accuracy"]
    assert any(hasattr(m, "weight_mask") for m in model.modules()) or all(
        row["pruned_filters"] == 0 for row in report["layers"]
    )


def test_cli_compares_solvers(ckpt):
    res = cli_ok(["qubo", str(ckpt), "--objective", "magnitude", "--solvers", "sa,tabu,ga,rl",
                  "--tabu-ms", "5", "--json", *FAST])
    report = json.loads(res.stdout)
    assert [r["solver"] for r in report["solvers"]] == ["sa", "tabu", "ga", "rl"]
    assert min(r["gap"] for r in report["solvers"]) == 0


def test_cli_exact_certifies_a_small_comparison(ckpt):
    # conv1 (4 of 16 filters free) and fc: few enough variables for ExactSolver
    res = cli_ok(["qubo", str(ckpt), "--objective", "magnitude", "--layers", "conv1",
                  "--layers", "fc", "--min-keep", "0.75", "--solvers", "exact,sa,tabu,ga,rl",
                  "--budget", "0.15", "--tabu-ms", "5", "--json", *FAST])
    report = json.loads(res.stdout)
    rows = {r["solver"]: r for r in report["solvers"]}
    assert report["variables"] <= 22 and list(rows) == ["exact", "sa", "tabu", "ga", "rl"]
    assert rows["exact"]["gap"] == pytest.approx(0, abs=1e-9)  # nothing beats the certificate
    assert all(r["energy"] >= rows["exact"]["energy"] - 1e-9 for r in rows.values())
    assert rows["exact"]["size_ratio"] <= 0.15


@pytest.mark.parametrize("args,fragment", [
    (["--budget", "1"], "budget must be"),
    (["--budget", "0"], "budget must be"),
    (["--bits", "0,8"], "bits"),
    (["--bits", "2,17"], "bits"),
    (["--solver", "quantum"], "unknown solver"),
    (["--solvers", "sa,exact"], "at most 22"),
    (["--objective", "hessian"], "unknown objective"),
])
def test_cli_bad_input(ckpt, tmp_path, args, fragment):
    out = tmp_path / "bad.pt"
    cli_bad(["qubo", str(ckpt), *args, "--out", str(out), *FAST], fragment)
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_cli_defaults_are_the_librarys():
    import inspect

    from woodfisher.cli.qubo import qubo as command

    cli = inspect.signature(command).parameters
    lib = inspect.signature(compress).parameters
    for name in ("budget", "objective", "solver", "constraint", "quantizer", "min_keep", "beta",
                 "fill_budget", "silence"):
        assert cli[name].default == lib[name].default, name


def test_pruned_filters_are_silenced_and_shrink_removes_them(ckpt):
    pytest.importorskip("torch_pruning")
    from woodfisher.shrink import kept_channels, shrink

    model, _ = load_checkpoint(ckpt)
    x = load_dataset("digits").test.tensors[0][:16]
    problem = formulate(qubo_costs(model, None, "magnitude"), 0.12)
    pruned = {name: free[:3] for name, free in problem.free.items()}
    plan = Decision({layer.name: 4 for layer in problem.costs.layers}, pruned)
    plain = copy.deepcopy(model)
    apply_plan(plain, problem, plan)
    with pytest.raises(ValueError, match="nothing to shrink"):
        shrink(plain, x)  # zero weights alone leave BatchNorm's shift on the channel
    report = apply_plan(model, problem, plan, example_inputs=x[:2])
    assert all(report[name]["silenced"] is None for name in pruned)
    small = shrink(model, x)  # checks that its outputs equal the masked model's
    kept = kept_channels(small)
    for name, idx in pruned.items():
        filters = effective_weight(select_modules(model)[name]).shape[0]
        assert kept[name] == [i for i in range(filters) if i not in idx]
        assert small.get_submodule(name).weight.shape[0] == filters - len(idx)
