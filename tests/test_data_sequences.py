"""Sequence datasets: Fashion-MNIST row by row, and HAR-2 / Google-12 from .npy arrays."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from strsparse.data import (
    DatasetError,
    SequenceDataset,
    build_datasets,
    dataset_info,
    load_npy_sequences,
)


def _cfg(name: str, root: Path | None = None, **extra: object) -> SimpleNamespace:
    return SimpleNamespace(name=name, root=None if root is None else str(root), **extra)


def _write(root: Path, steps: int, features: int, classes: int, n: int = 6) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        np.save(root / f"x_{split}.npy", rng.normal(3.0, 2.0, (n, steps, features)))
        np.save(root / f"y_{split}.npy", np.arange(n) % classes)


@pytest.mark.parametrize(
    ("name", "steps", "features", "classes"), [("har2", 128, 9, 2), ("google12", 99, 32, 12)]
)
def test_npy_sequences_load_and_standardize(
    tmp_path: Path, name: str, steps: int, features: int, classes: int
) -> None:
    _write(tmp_path, steps, features, classes)
    train, val, info = build_datasets(_cfg(name, tmp_path, train_limit=None, val_limit=4))
    assert info.input_shape == (steps, features) and info.num_classes == classes
    assert dataset_info(_cfg(name)).in_channels == features
    assert len(train) == 6 and len(val) == 4
    x, y = train.batch(range(6))
    assert x.shape == (6, steps, features) and y.dtype == torch.int64
    # zero mean, unit variance per feature with the training statistics
    torch.testing.assert_close(x.mean(dim=(0, 1)), torch.zeros(features), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 1)), torch.ones(features), atol=1e-3, rtol=0)


def test_flattened_features_and_one_hot_labels_are_accepted(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        np.save(tmp_path / f"x_{split}.npy", rng.normal(size=(4, 128 * 9)).astype(np.float32))
        np.save(tmp_path / f"y_{split}.npy", np.eye(2)[[0, 1, 1, 0]])
    train_x, train_y, _, _ = load_npy_sequences(tmp_path, "har2")
    assert train_x.shape == (4, 128, 9) and train_y.tolist() == [0, 1, 1, 0]


def test_missing_files_name_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(
        DatasetError, match=r"HAR-2 not found .*missing x_train\.npy.*\(N, 128, 9\)"
    ):
        load_npy_sequences(tmp_path, "har2")
    with pytest.raises(DatasetError, match="needs data.root"):
        build_datasets(_cfg("google12"))


@pytest.mark.parametrize(
    ("file", "array", "pattern"),
    [
        (
            "x_train.npy",
            np.zeros((6, 99, 31)),
            r"x_train\.npy: expected Google-12 features of shape \(N, 99, 32\)",
        ),
        (
            "y_train.npy",
            np.zeros((5,)),
            r"y_train\.npy: expected 6 Google-12 labels of shape \(6,\)",
        ),
        (
            "y_test.npy",
            np.full((6,), 12),
            r"y_test\.npy: Google-12 labels must be integers in 0\.\.11",
        ),
        ("x_test.npy", np.full((6, 99, 32), np.nan), r"x_test\.npy: holds NaN"),
    ],
)
def test_malformed_files_name_the_file_and_shape(
    tmp_path: Path, file: str, array: np.ndarray, pattern: str
) -> None:
    _write(tmp_path, 99, 32, 12)
    np.save(tmp_path / file, array)
    with pytest.raises(DatasetError, match=pattern):
        load_npy_sequences(tmp_path, "google12")


def test_unreadable_npy_file(tmp_path: Path) -> None:
    _write(tmp_path, 128, 9, 2)
    (tmp_path / "x_test.npy").write_bytes(b"not an array")
    with pytest.raises(DatasetError, match=r"x_test\.npy: not a readable \.npy array"):
        load_npy_sequences(tmp_path, "har2")


def test_fashion_mnist_rows() -> None:
    train, val, info = build_datasets(_cfg("fashion_mnist_rows", train_limit=32, val_limit=8))
    assert info.input_shape == (28, 28) and info.in_channels == 28 and info.num_classes == 10
    assert isinstance(train, SequenceDataset) and len(train) == 32 and len(val) == 8
    x, _ = train.batch(range(4))
    assert x.shape == (4, 28, 28) and x.dtype == torch.float32
    # row r of the sequence is row r of the image, normalized like the images
    image = train.data[0].float() / 255.0
    torch.testing.assert_close(x[0], (image - 0.2860) / 0.3530)
