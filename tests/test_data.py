from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from conftest import idx_bytes, write_fashion_dir
from woodfisher.data import (
    DEFAULT_FASHION_MNIST_DIR,
    DataError,
    as_batches,
    find_data_dir,
    load_dataset,
    read_idx,
    synthetic,
)


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_from_idx_matches_written_arrays(tmp_path, gz):
    arrays = write_fashion_dir(tmp_path, gz=gz)
    splits = load_dataset("fashion-mnist", data_dir=tmp_path)
    raw = arrays["train-images-idx3-ubyte"].astype(np.float32) / 255.0
    mean, std = raw.mean(), raw.std(ddof=1)
    x, y = splits.train.tensors
    assert x.shape == (40, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    np.testing.assert_allclose(x[:, 0].numpy(), (raw - mean) / std, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(y.numpy(), arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(splits.test.tensors[1].numpy(),
                                  arrays["t10k-labels-idx1-ubyte"])
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10
    assert splits.mean == pytest.approx(mean, rel=1e-5)


def test_given_normalisation_is_used(fashion_dir):
    splits = load_dataset("fashion-mnist", fashion_dir, normalisation={"mean": 0.0, "std": 1.0})
    assert float(splits.train.tensors[0].max()) <= 1.0
    assert splits.mean == 0.0 and splits.std == 1.0


def test_read_idx_raw_and_gz(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(arr))
    with gzip.open(tmp_path / "a.gz", "wb") as f:
        f.write(idx_bytes(arr))
    np.testing.assert_array_equal(read_idx(tmp_path / "a", 2051), arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz", 2051), arr)


def _corrupt(directory, name, data):
    (directory / name).write_bytes(data)
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", data_dir=directory)
    msg = str(err.value)
    assert name in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "\n" not in msg
    return msg


def test_wrong_magic(fashion_dir):
    arr = np.zeros((40, 28, 28), np.uint8)
    msg = _corrupt(fashion_dir, "train-images-idx3-ubyte", idx_bytes(arr, magic=2049))
    assert "magic number 2049" in msg and "2051" in msg


def test_truncated_data(fashion_dir):
    data = idx_bytes(np.zeros((40, 28, 28), np.uint8))[:-5]
    assert "truncated" in _corrupt(fashion_dir, "train-images-idx3-ubyte", data)


def test_truncated_header(fashion_dir):
    assert "truncated" in _corrupt(fashion_dir, "train-labels-idx1-ubyte", b"\x00\x00")


def test_label_out_of_range(fashion_dir):
    labels = np.full(40, 10, np.uint8)
    msg = _corrupt(fashion_dir, "train-labels-idx1-ubyte", idx_bytes(labels))
    assert "label 10" in msg and "0..9" in msg


def test_count_mismatch(fashion_dir):
    msg = _corrupt(fashion_dir, "train-labels-idx1-ubyte", idx_bytes(np.zeros(39, np.uint8)))
    assert "do not match" in msg


def test_wrong_image_size(fashion_dir):
    msg = _corrupt(fashion_dir, "t10k-images-idx3-ubyte", idx_bytes(np.zeros((20, 8, 8), np.uint8)))
    assert "(28, 28)" in msg


def test_bad_gzip(tmp_path):
    write_fashion_dir(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_missing_file(fashion_dir):
    (fashion_dir / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", data_dir=fashion_dir)
    msg = str(err.value)
    assert "t10k-images-idx3-ubyte" in msg and "--data-dir" in msg and "WOODFISHER_DATA" in msg
    assert isinstance(err.value, ValueError)


def test_lookup_order(tmp_path, monkeypatch):
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    write_fashion_dir(explicit, n_train=7)
    write_fashion_dir(env, n_train=9)
    monkeypatch.setenv("WOODFISHER_DATA", str(env))
    assert find_data_dir(explicit) == explicit
    assert len(load_dataset("fashion-mnist", data_dir=explicit).train) == 7
    assert len(load_dataset("fashion-mnist").train) == 9
    monkeypatch.delenv("WOODFISHER_DATA")
    assert find_data_dir() == DEFAULT_FASHION_MNIST_DIR


def test_digits():
    splits = load_dataset("digits")
    x, y = splits.train.tensors
    assert x.shape[1:] == (1, 8, 8) and splits.input_shape == (1, 8, 8)
    assert len(splits.train) + len(splits.test) == 1797
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    assert set(y.tolist()) == set(range(10))


def test_unknown_dataset():
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'.*digits.*fashion-mnist"):
        load_dataset("mnist")


class _ListDataset(Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


def test_as_batches_accepts_dataset_loader_and_iterable():
    ds = synthetic(n=10, input_shape=(3,), num_classes=2)
    x_all, y_all = ds.tensors
    expected = [(x_all[i : i + 4], y_all[i : i + 4]) for i in (0, 4, 8)]
    sources = [ds, _ListDataset(ds), DataLoader(ds, batch_size=4), expected, iter(expected)]
    for source in sources:
        got = list(as_batches(source, batch_size=4))
        assert len(got) == 3
        for (x, y), (ex, ey) in zip(got, expected, strict=True):
            assert torch.equal(x, ex) and torch.equal(y, ey)


def test_as_batches_shuffle_is_seeded_and_complete():
    ds = TensorDataset(torch.arange(20.0), torch.arange(20))
    a = torch.cat([y for _, y in as_batches(ds, 6, shuffle=True, seed=1)])
    b = torch.cat([y for _, y in as_batches(ds, 6, shuffle=True, seed=1)])
    c = torch.cat([y for _, y in as_batches(ds, 6, shuffle=True, seed=2)])
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sorted(a.tolist()) == list(range(20))
    d = torch.cat([y for _, y in as_batches(_ListDataset(ds), 6, shuffle=True, seed=1)])
    assert sorted(d.tolist()) == list(range(20))


def test_as_batches_rejects_bad_input():
    with pytest.raises(ValueError, match="batch_size"):
        list(as_batches(synthetic(), 0))
    with pytest.raises(ValueError, match=r"\(inputs, targets\)"):
        list(as_batches([torch.zeros(3)], 2))
    with pytest.raises(ValueError, match="cannot make batches"):
        list(as_batches(42, 2))


def test_synthetic_is_seeded():
    a, b = synthetic(seed=3), synthetic(seed=3)
    assert all(torch.equal(s, t) for s, t in zip(a.tensors, b.tensors, strict=True))
    x, y = a.tensors
    assert x.shape == (256, 1, 8, 8) and int(y.max()) < 3


@pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.is_dir(), reason="Debian files absent")
def test_real_fashion_mnist_files(monkeypatch):
    monkeypatch.delenv("WOODFISHER_DATA", raising=False)
    splits = load_dataset("fashion-mnist")
    assert len(splits.train) == 60000 and len(splits.test) == 10000
    assert torch.bincount(splits.train.tensors[1]).tolist() == [6000] * 10
