"""Datasets: Fashion-MNIST from IDX files, scikit-learn's digits, synthetic tensors.

Every loader returns a :class:`DatasetSplits` holding ``train`` and ``test``
:class:`~torch.utils.data.TensorDataset` objects with float32 images of shape ``(N, C, H, W)``
normalised with the training mean and standard deviation, and int64 labels.

Anywhere woodfisher takes data it goes through :func:`as_batches`, so a user's own
``Dataset``, ``DataLoader`` or plain iterable of ``(x, y)`` batches works as well.

Example:
    >>> splits = load_dataset("digits")
    >>> splits.input_shape, splits.num_classes, len(splits.train) + len(splits.test)
    ((1, 8, 8), 10, 1797)
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = [
    "DATASETS",
    "DEFAULT_FASHION_MNIST_DIR",
    "DataError",
    "DatasetSplits",
    "FASHION_MNIST_FILES",
    "as_batches",
    "fashion_mnist_files",
    "find_data_dir",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "read_idx",
    "synthetic",
]

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "WOODFISHER_DATA"

#: Split name -> (images file, labels file), without the optional ``.gz`` suffix.
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

_HOW_TO_GET = (
    "get it with `apt-get install dataset-fashion-mnist`, or put the four files "
    "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
    f"t10k-labels-idx1-ubyte[.gz] in a directory DIR and pass --data-dir DIR or set {ENV_VAR}=DIR"
)


class DataError(ValueError):
    """A dataset file is missing or is not a valid IDX file of the expected kind."""


@dataclass(frozen=True)
class DatasetSplits:
    """Train and test splits of one dataset plus what a model needs to know about it.

    Attributes:
        name: Registry name of the dataset.
        train: Training split, ``(images, labels)``.
        test: Test split, ``(images, labels)``.
        input_shape: Shape of one image, ``(C, H, W)``.
        num_classes: Number of classes; labels lie in ``0..num_classes-1``.
        mean: Mean subtracted from the raw (0..1 scaled) pixels.
        std: Standard deviation the centred pixels were divided by.
    """

    name: str
    train: TensorDataset
    test: TensorDataset
    input_shape: tuple[int, ...]
    num_classes: int
    mean: float
    std: float

    @property
    def normalisation(self) -> dict[str, float]:
        """The normalisation as a plain dict, ``{"mean": ..., "std": ...}``."""
        return {"mean": self.mean, "std": self.std}


# --------------------------------------------------------------------------- IDX files


def _open_maybe_gz(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read IDX file {path}: {e}; {_HOW_TO_GET}") from e


def read_idx(path: str | os.PathLike, expected_magic: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (raw or gzip-compressed) into a numpy array.

    Args:
        path: The file; a name ending in ``.gz`` is decompressed.
        expected_magic: 2051 for an image file (3 dimensions), 2049 for a label file (1).

    Returns:
        A ``uint8`` array of shape ``(N, 28, 28)`` or ``(N,)``.

    Raises:
        DataError: If the file is missing, unreadable, has the wrong magic number, or its
            payload does not match the dimensions in its header.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file {path} not found; {_HOW_TO_GET}")
    raw = _open_maybe_gz(path)
    if len(raw) < 4:
        raise DataError(f"IDX file {path} is truncated ({len(raw)} bytes); {_HOW_TO_GET}")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataError(
            f"IDX file {path} has magic number {magic}, expected {expected_magic} "
            f"({'images' if expected_magic == IMAGES_MAGIC else 'labels'}); {_HOW_TO_GET}"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated inside its header; {_HOW_TO_GET}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(dims))
    if len(raw) - header != size:
        raise DataError(
            f"IDX file {path} holds {len(raw) - header} data bytes but its header {dims} "
            f"announces {size} (truncated or corrupt); {_HOW_TO_GET}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_file(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"Fashion-MNIST file {directory / stem}[.gz] not found; {_HOW_TO_GET}")


def find_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Choose the Fashion-MNIST directory.

    The first location that is *given* wins, with no silent fallback to the next one (so a
    typo in ``--data-dir`` is reported, not papered over): the explicit ``data_dir``, then the
    ``WOODFISHER_DATA`` environment variable, then ``/usr/share/datasets/fashion-mnist``.

    Args:
        data_dir: Explicit directory, e.g. from ``--data-dir``.

    Returns:
        The chosen directory (not yet checked for the files).
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir)
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return DEFAULT_FASHION_MNIST_DIR


def fashion_mnist_files(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Locate the four Fashion-MNIST files without reading them.

    Args:
        data_dir: Explicit directory (see :func:`find_data_dir` for the lookup order).

    Returns:
        The paths of the train images/labels and test images/labels.

    Raises:
        DataError: If a file is missing; the message names it and says how to get it.
    """
    directory = find_data_dir(data_dir)
    return [_find_file(directory, stem) for pair in FASHION_MNIST_FILES.values() for stem in pair]


def _read_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_stem, labels_stem = FASHION_MNIST_FILES[split]
    images_path = _find_file(directory, images_stem)
    labels_path = _find_file(directory, labels_stem)
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise DataError(
            f"IDX file {images_path} holds images of shape {images.shape[1:]}, expected (28, 28); "
            f"{_HOW_TO_GET}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"IDX files {images_path} ({len(images)} images) and {labels_path} "
            f"({len(labels)} labels) do not match; {_HOW_TO_GET}"
        )
    if len(labels) and int(labels.max()) > 9:
        raise DataError(
            f"IDX file {labels_path} has label {int(labels.max())}, allowed 0..9; {_HOW_TO_GET}"
        )
    return images, labels


def _make_splits(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    scale: float,
    num_classes: int,
    normalisation: dict[str, float] | None,
) -> DatasetSplits:
    xtr = torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32) / scale)
    xte = torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32) / scale)
    if normalisation is None:
        mean, std = float(xtr.mean()), float(xtr.std())
    else:
        mean, std = float(normalisation["mean"]), float(normalisation["std"])
    if not std > 0:
        raise DataError(f"dataset {name!r} has pixel std {std}; need a positive value")
    xtr = ((xtr - mean) / std).unsqueeze(1)
    xte = ((xte - mean) / std).unsqueeze(1)
    return DatasetSplits(
        name=name,
        train=TensorDataset(xtr, torch.tensor(np.asarray(y_train), dtype=torch.int64)),
        test=TensorDataset(xte, torch.tensor(np.asarray(y_test), dtype=torch.int64)),
        input_shape=tuple(xtr.shape[1:]),
        num_classes=num_classes,
        mean=mean,
        std=std,
    )


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None,
    normalisation: dict[str, float] | None = None,
) -> DatasetSplits:
    """Load Fashion-MNIST (60 000 train / 10 000 test 28×28 images, 10 classes).

    Args:
        data_dir: Directory with the four IDX files (see :func:`find_data_dir`).
        normalisation: ``{"mean", "std"}`` to use instead of the training statistics, e.g. the
            values stored in a checkpoint.

    Returns:
        The splits, images of shape ``(N, 1, 28, 28)``.

    Raises:
        DataError: If a file is missing or corrupt; the message says how to get the files.
    """
    directory = find_data_dir(data_dir)
    x_train, y_train = _read_split(directory, "train")
    x_test, y_test = _read_split(directory, "test")
    return _make_splits(
        "fashion-mnist", x_train, y_train, x_test, y_test, 255.0, 10, normalisation
    )


def load_digits(
    data_dir: str | os.PathLike | None = None,
    normalisation: dict[str, float] | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> DatasetSplits:
    """Load scikit-learn's bundled 8×8 digits (1797 images, 10 classes), always available.

    Args:
        data_dir: Ignored (the data ships with scikit-learn); accepted for a uniform signature.
        normalisation: ``{"mean", "std"}`` to use instead of the training statistics.
        test_fraction: Fraction of the images put in the (stratified) test split.
        seed: Seed of the train/test split.

    Returns:
        The splits, images of shape ``(N, 1, 8, 8)``.

    Raises:
        ValueError: If ``test_fraction`` is not in (0, 1).
    """
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = _sk_load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        bunch.images, bunch.target, test_size=test_fraction, random_state=seed,
        stratify=bunch.target,
    )
    return _make_splits("digits", x_train, y_train, x_test, y_test, 16.0, 10, normalisation)


#: Name -> loader ``(data_dir=None, normalisation=None) -> DatasetSplits``.
DATASETS: dict[str, Callable[..., DatasetSplits]] = {
    "fashion-mnist": load_fashion_mnist,
    "digits": load_digits,
}


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    normalisation: dict[str, float] | None = None,
) -> DatasetSplits:
    """Load a registered dataset by name.

    Args:
        name: One of ``DATASETS``: ``"fashion-mnist"`` or ``"digits"``.
        data_dir: Directory with the data files, where the dataset needs one.
        normalisation: ``{"mean", "std"}`` overriding the training statistics.

    Returns:
        The train/test splits and their metadata.

    Raises:
        ValueError: If ``name`` is not registered.
        DataError: If the dataset's files are missing or corrupt.

    Example:
        >>> load_dataset("digits").train.tensors[0].shape
        torch.Size([1437, 1, 8, 8])
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    return DATASETS[name](data_dir=data_dir, normalisation=normalisation)


def synthetic(
    n: int = 256,
    input_shape: tuple[int, ...] = (1, 8, 8),
    num_classes: int = 3,
    seed: int = 0,
    noise: float = 1.0,
) -> TensorDataset:
    """Small random classification problem: Gaussian blobs around one mean per class.

    Args:
        n: Number of samples.
        input_shape: Shape of one sample.
        num_classes: Number of classes.
        seed: Seed of the generator.
        noise: Standard deviation of the samples around their class mean.

    Returns:
        ``TensorDataset(x float32 (n, *input_shape), y int64 (n,))``.

    Raises:
        ValueError: If ``n`` or ``num_classes`` is not positive.
    """
    if n < 1 or num_classes < 1:
        raise ValueError(f"need n >= 1 and num_classes >= 1, got n={n}, num_classes={num_classes}")
    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(num_classes, *input_shape, generator=g)
    y = torch.randint(num_classes, (n,), generator=g)
    x = means[y] + noise * torch.randn(n, *input_shape, generator=g)
    return TensorDataset(x, y)


# --------------------------------------------------------------------------- batching


def _check_batch(batch: object, index: int) -> tuple[object, torch.Tensor]:
    from woodfisher.batch import split_batch

    return split_batch(batch, index)


def as_batches(
    data: Dataset | DataLoader | Iterable,
    batch_size: int = 128,
    shuffle: bool = False,
    seed: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches from a Dataset, a DataLoader or an iterable of batches.

    A ``Dataset`` is cut into batches of ``batch_size`` (a ``TensorDataset`` by fast slicing,
    others through a ``DataLoader``), shuffled with a generator seeded by ``seed`` when
    ``shuffle`` is true. A ``DataLoader`` or any other iterable is passed through as it is:
    its own batch size and order are kept and ``batch_size``/``shuffle``/``seed`` are ignored.

    Args:
        data: The data.
        batch_size: Batch size used to cut a Dataset.
        shuffle: Whether to shuffle a Dataset.
        seed: Seed of the shuffling.

    Yields:
        ``(inputs, targets)`` pairs (extra items of a batch are dropped; inputs are a tensor,
        a tuple or a dict, see :func:`woodfisher.batch.split_batch`).

    Raises:
        ValueError: If ``batch_size`` is not positive, or a batch is not an (x, y) pair.

    Example:
        >>> ds = synthetic(n=10)
        >>> [len(y) for _, y in as_batches(ds, batch_size=4)]
        [4, 4, 2]
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(data, TensorDataset):
        tensors = data.tensors
        n = len(tensors[0])
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        for start in range(0, n, batch_size):
            if shuffle:
                idx = order[start : start + batch_size]
                batch = tuple(t[idx] for t in tensors)
            else:
                batch = tuple(t[start : start + batch_size] for t in tensors)
            yield _check_batch(batch, start // batch_size)
        return
    if isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        loader = DataLoader(
            data, batch_size=batch_size, shuffle=shuffle,
            generator=torch.Generator().manual_seed(seed) if shuffle else None,
        )
        for i, batch in enumerate(loader):
            yield _check_batch(batch, i)
        return
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise ValueError(
            f"cannot make batches from a {type(data).__name__}; pass a torch Dataset, a "
            "DataLoader, or an iterable of (x, y) batches"
        )
    for i, batch in enumerate(data):
        yield _check_batch(batch, i)
