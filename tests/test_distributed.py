"""One pruning job over 2 gloo processes on loopback equals the one-process job.

Each test spawns fresh processes (``woodfisher.distributed.spawn_local``), which write what
they saw to files that the test compares with a run in this process. Splits are uneven on
purpose: 3 gradient chunks over 2 ranks, an odd number of units, layers cut across ranks.
Only the MLP test runs by default (spawning processes that import torch takes ~10 s each on a
busy machine); the CLI, fault, world-size, selection and gradual tests are ``slow``.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import pytest
import torch

from woodfisher.distributed import (
    DistributedError,
    Group,
    init_from_env,
    order_key,
    shutdown,
    spawn_local,
)

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)

# Small chunks (bytes) so that m = 150 gradients make 3 chunks: P = 2 does not divide them.
CHUNK_BYTES = {"mlp": 60 * 4 * 3440, "cnn": 60 * 4 * 1184}


def _problem(kind: str):
    from woodfisher.data import synthetic
    from woodfisher.models import build_model

    shape = (1, 8, 8)
    ds = synthetic(n=300, input_shape=shape, num_classes=4, seed=5)
    torch.manual_seed(0)
    name = "mlpnet-small" if kind == "mlp" else "cnn"
    kwargs = {} if kind == "mlp" else {"channels": (4, 8)}
    model = build_model(name, shape, 4, **kwargs)
    x, y = ds.tensors
    data = [(x[i : i + 50], y[i : i + 50]) for i in range(0, 300, 50)]
    return model, data


def _prune(kind: str, scope: str = "global"):
    from woodfisher.pruning import prune

    model, data = _problem(kind)
    opts = dict(num_grads=150, block_size=64 if kind == "mlp" else 48, recompute=3,
                recompute_by="downdate", scope=scope, layer_sparsity={"fc3": 0.4}
                if kind == "mlp" else None)
    from woodfisher.pruning import downdate

    old = downdate.CHUNK_BYTES
    downdate.CHUNK_BYTES = CHUNK_BYTES[kind]
    try:
        res = prune(model, data, 0.8, **opts)
    finally:
        downdate.CHUNK_BYTES = old
    return model, res


def _worker(rank: int, world: int, kind: str, scope: str, out: str) -> None:
    torch.set_num_threads(1)
    try:
        init_from_env(torch.device("cpu"), timeout=60)
        model, res = _prune(kind, scope)
        torch.save({"state": model.state_dict(), "ranks": res.ranks, "steps": res.steps},
                   Path(out) / f"rank{rank}.pt")
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        shutdown()


def _single(kind: str, scope: str = "global"):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run one thread each: same kernels, same bits
    try:
        return _prune(kind, scope)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("kind", "scope"),
    [("mlp", "global"), pytest.param("cnn", "layerwise", marks=pytest.mark.slow)],
)
def test_two_ranks_give_the_masks_and_weights_of_one_process(kind, scope, tmp_path):
    codes = spawn_local(_worker, 2, kind, scope, str(tmp_path), timeout=300)
    errors = {p.name: p.read_text() for p in tmp_path.glob("*.err")}
    assert codes == [0, 0], errors
    model, res = _single(kind, scope)
    want = model.state_dict()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["steps"] == res.steps
        for name, value in want.items():
            if name.endswith("_mask"):
                assert torch.equal(got["state"][name], value), (rank, name)
            else:
                torch.testing.assert_close(got["state"][name], value, rtol=1e-5, atol=1e-7)
        ranks = got["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1]
        assert ranks[0]["lo"] == 0 and ranks[0]["hi"] == ranks[1]["lo"] < ranks[1]["hi"]
        assert all(r["peak_rss_bytes"] > 0 and r["times"]["inverse"] >= 0 for r in ranks)
    assert res.ranks is None


def _select_worker(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    try:
        group = init_from_env(torch.device("cpu"), timeout=60)
        scores, eligible, cut = _scores()
        lo, hi = (0, cut) if rank == 0 else (cut, scores.numel())
        picks = {}
        for dtype in (torch.float32, torch.float64):
            for k in (0, 1, 37, int(eligible.sum())):
                picks[(str(dtype), k)] = group.select_lowest(
                    scores[lo:hi].to(dtype), eligible[lo:hi], k
                )
        torch.save(picks, Path(out) / f"rank{rank}.pt")
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        shutdown()


def _scores():
    g = torch.Generator().manual_seed(0)
    # Negative and positive values, -0.0 and +0.0, many exact ties across the cut.
    scores = torch.randint(-20, 20, (101,), generator=g).float() / 4
    scores[::7] = -0.0
    scores[3::11] = 0.0
    eligible = torch.rand(101, generator=g) < 0.8
    return scores, eligible, 46


@pytest.mark.slow
def test_distributed_kth_value_selects_like_a_stable_sort(tmp_path):
    codes = spawn_local(_select_worker, 2, str(tmp_path), timeout=300)
    errors = {p.name: p.read_text() for p in tmp_path.glob("*.err")}
    assert codes == [0, 0], errors
    scores, eligible, cut = _scores()
    a = torch.load(tmp_path / "rank0.pt", weights_only=False)
    b = torch.load(tmp_path / "rank1.pt", weights_only=False)
    local = Group.local()
    for key, part in a.items():
        dtype, k = key
        want = local.select_lowest(scores.to(getattr(torch, dtype[6:])), eligible, k)
        got = torch.cat([part, b[key]])
        assert torch.equal(got, want), key
        assert int(got.sum()) == k


def test_order_key_sorts_like_the_floats():
    x = torch.tensor([3.0, -1.0, -0.0, 0.0, -2.5, float("inf"), -float("inf"), 1e-30, -1e-30])
    for dtype in (torch.float32, torch.float64):
        key, bits = order_key(x.to(dtype))
        assert bits == (64 if dtype == torch.float64 else 32)
        assert torch.equal(torch.argsort(key, stable=True), torch.argsort(x, stable=True))


def _cli_worker(rank: int, world: int, ckpt: str, out: str, fault: str) -> None:
    from typer.testing import CliRunner

    from woodfisher.cli import app

    torch.set_num_threads(1)
    os.environ["WOODFISHER_FAULT"] = fault
    os.environ["WOODFISHER_DIST_TIMEOUT"] = "60"
    res = CliRunner().invoke(app, ["prune", ckpt, "--sparsity", "0.7", "--num-grads", "96",
                                   "--block-size", "64", "--recompute-by", "downdate",
                                   "--out", out, "--json", "-q"])
    Path(out).with_name(f"rank{rank}.txt").write_text(f"{res.exit_code}\n{res.output}")


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory) -> Path:
    from conftest import cli_ok

    path = tmp_path_factory.mktemp("dist") / "small.pt"
    cli_ok(["train", "--model", "mlpnet-small", "--dataset", "digits", "--epochs", "3",
            "--out", str(path), "-q"])
    return path


@pytest.mark.slow
def test_cli_under_torchrun_writes_once_and_matches_one_process(digits_ckpt, tmp_path):
    out = tmp_path / "p.pt"
    codes = spawn_local(_cli_worker, 2, str(digits_ckpt), str(out), "", timeout=300)
    logs = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert codes == [0, 0] and logs[0].startswith("0\n") and logs[1].startswith("0\n"), logs
    import json

    report = json.loads(logs[0].split("\n", 1)[1])
    assert logs[1] == "0\n"  # only rank 0 prints
    assert len(report["prune"]["ranks"]) == 2 and report["prune"]["path"] == "downdate"
    from woodfisher.checkpoint import load_checkpoint

    two, _ = load_checkpoint(out)
    from conftest import cli_ok

    one_path = tmp_path / "one.pt"
    cli_ok(["prune", str(digits_ckpt), "--sparsity", "0.7", "--num-grads", "96",
            "--block-size", "64", "--recompute-by", "downdate", "--out", str(one_path), "-q"])
    one, _ = load_checkpoint(one_path)
    for (name, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items(),
                                 strict=True):
        if name.endswith("_mask"):
            assert torch.equal(a, b), name


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["inverse", "selection"])
def test_a_rank_that_dies_gives_a_clear_error_and_no_checkpoint(digits_ckpt, tmp_path, phase):
    out = tmp_path / "p.pt"
    codes = spawn_local(_cli_worker, 2, str(digits_ckpt), str(out), f"1:{phase}", timeout=300)
    assert codes[1] == 17  # the injected death
    log = (tmp_path / "rank0.txt").read_text()
    assert codes[0] == 0 and log.startswith("2\n"), log  # the CLI exits 2 with one line
    assert "Error: rank 0 of 2: lost the other ranks during" in log and "Traceback" not in log
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.suffix in (".pt", ".json")] == []


def _mismatch_worker(rank: int, world: int, out: str) -> None:
    try:
        init_from_env(torch.device("cpu"), timeout=8)
        msg = "joined"
    except DistributedError as e:
        msg = f"error: {e}"
    finally:
        shutdown()
    (Path(out) / f"rank{rank}.txt").write_text(msg)


@pytest.mark.slow
def test_mismatched_world_size_fails_on_every_rank(tmp_path):
    env = [{}, {"WORLD_SIZE": "3"}]  # rank 1 was told of a third rank
    codes = spawn_local(_mismatch_worker, 2, str(tmp_path), env=env, timeout=120)
    msgs = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert codes == [0, 0], msgs
    for rank, msg in enumerate(msgs):
        assert msg.startswith("error: "), msg
        assert "WORLD_SIZE" in msg or "disagree" in msg or "lost the other ranks" in msg, msg
        assert f"rank {rank}" in msg


GRADUAL = ["--sparsity", "0.8", "--epochs", "2", "--num-grads", "64", "--block-size", "64",
           "--recompute-by", "downdate", "--batch-size", "64", "--json", "-q"]


def _gradual_worker(rank: int, world: int, ckpt: str, out: str) -> None:
    from typer.testing import CliRunner

    from woodfisher.cli import app

    torch.set_num_threads(1)
    os.environ["WOODFISHER_DIST_TIMEOUT"] = "60"
    res = CliRunner().invoke(app, ["gradual", ckpt, "--out", out, *GRADUAL])
    crash = "".join(traceback.format_exception(res.exception)) if res.exit_code == 1 else ""
    Path(out).with_name(f"rank{rank}.txt").write_text(f"{res.exit_code}\n{res.output}{crash}")


@pytest.mark.slow
def test_gradual_under_torchrun_is_data_parallel_and_matches_one_process(digits_ckpt, tmp_path):
    import json

    from conftest import cli_ok
    from woodfisher.checkpoint import load_checkpoint

    out = tmp_path / "two" / "g.pt"
    out.parent.mkdir()
    codes = spawn_local(_gradual_worker, 2, str(digits_ckpt), str(out), timeout=600)
    logs = [(out.parent / f"rank{r}.txt").read_text() for r in range(2)]
    assert codes == [0, 0] and logs[1] == "0\n", logs
    two = json.loads(logs[0].split("\n", 1)[1])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = json.loads(cli_ok(["gradual", str(digits_ckpt), "--out",
                                 str(tmp_path / "g1.pt"), *GRADUAL]).stdout)
    finally:
        torch.set_num_threads(threads)
    assert two["sparsity"] == one["sparsity"]
    for a, b in zip(one["history"], two["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
    m1, _ = load_checkpoint(tmp_path / "g1.pt")
    m2, _ = load_checkpoint(out)
    for (name, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        if name.endswith("_mask"):
            assert (a == b).float().mean() > 0.99, name
        else:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(
        ["g.pt", "g.json", "g.png", "g.resume.pt", "rank0.txt", "rank1.txt"]
    )
