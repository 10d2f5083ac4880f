"""Shared fixtures: tiny IDX files written by the tests themselves."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

# One intra-op thread for the test process. With torch 2.13's CPU build (MKL 2024.2), once any code
# calls torch.set_num_threads(n) with n >= 2 -- the latency, lowrank and torch.distributed tests
# restore the count they found -- batched LU (torch.linalg.inv/solve of 3-D tensors) fails with
# "MKL ERROR: Parameter 6 was incorrect on entry to DLASWP" and hangs, and batched eigh/SVD run
# 40x slower on a busy 2-core machine (nested OpenMP). Seen as a 15-minute hang in a doctest.
torch.set_num_threads(1)


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """Encode a uint8 array as an IDX file (the oracle is the format spec itself)."""
    array = np.asarray(array, dtype=np.uint8)
    magic = (0x0800 | array.ndim) if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_fashion_dir(
    directory: Path, n_train: int = 40, n_test: int = 20, gz: bool = False, seed: int = 0
) -> dict[str, np.ndarray]:
    """Write four small Fashion-MNIST-shaped IDX files; return the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        data = idx_bytes(arr)
        if gz:
            with gzip.open(directory / f"{name}.gz", "wb") as f:
                f.write(data)
        else:
            (directory / name).write_bytes(data)
    return arrays


@pytest.fixture
def fashion_dir(tmp_path: Path) -> Path:
    d = tmp_path / "fmnist"
    write_fashion_dir(d)
    return d


def cli_ok(args):
    """Invoke the CLI, assert exit code 0, return the result."""
    from typer.testing import CliRunner

    from woodfisher.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def cli_bad(args, *fragments):
    """Invoke the CLI, assert a one-line ``Error:`` with ``fragments``, exit 2, empty stdout."""
    from typer.testing import CliRunner

    from woodfisher.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    err = result.stderr.strip()
    assert err.startswith("Error: ") and "\n" not in err, err
    for f in fragments:
        assert f in err, err
    assert result.stdout == ""
    return err


def assert_same_state(a, b):
    """Two models' state dicts (weights, masks, buffers) are bit-identical."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
