"""Datasets and loaders for training: Fashion-MNIST, ImageFolder (ImageNet), synthetic, and
sequences (Fashion-MNIST row by row; HAR-2 and Google-12 from preprocessed ``.npy`` arrays).

Datasets live in a registry (``list_datasets()``); a new one is one decorated builder:

>>> @register_dataset("my_data", info=lambda cfg: DatasetInfo(10, 1, (1, 28, 28)))
... def _my_data(cfg: DataConfig) -> tuple[Dataset, Dataset, DatasetInfo]: ...

``build_datasets(cfg.data)`` returns ``(train, val, info)``; ``build_loaders`` wraps them in
seeded ``DataLoader``s. Fashion-MNIST is read from its IDX files (parsed here with NumPy, no
torchvision), kept in memory as uint8 and normalized batch by batch: a whole epoch needs no
per-image Python work. ImageFolder needs the optional torchvision extra
(``pip install 'strsparse[vision]'``), imported only when used.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from strsparse.errors import (
    MissingDependencyError,
    MissingFileError,
    OptionError,
    StrsparseError,
    did_you_mean,
)

if TYPE_CHECKING:  # annotations only: the config validates names against this registry
    from strsparse.config import DataConfig

__all__ = [
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_ROOT",
    "FASHION_MNIST_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DatasetError",
    "DatasetInfo",
    "DatasetSpec",
    "SEQUENCE_DATASETS",
    "SequenceDataset",
    "ShardSampler",
    "SyntheticDataset",
    "TensorImageDataset",
    "build_datasets",
    "build_loaders",
    "dataset_info",
    "get_dataset",
    "list_datasets",
    "load_fashion_mnist",
    "load_npy_sequences",
    "read_idx",
    "register_dataset",
]

logger = logging.getLogger(__name__)

# Debian's package ``dataset-fashion-mnist`` installs the four gzipped IDX files here.
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "val_images": "t10k-images-idx3-ubyte",
    "val_labels": "t10k-labels-idx1-ubyte",
}
# per-channel statistics of the training images on the [0, 1] scale
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# A synthetic dataset up to this many float32 elements (128 MiB) is generated once at
# construction; a bigger one (ImageNet-shaped benchmarks) generates each sample on demand.
_SYNTHETIC_MATERIALIZE_LIMIT = 2**25


class DatasetError(StrsparseError, ValueError):
    """A dataset is unknown, or its files are missing, corrupt or not what they should be."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about its data: classes, input channels, one input's
    shape (C, H, W)."""

    num_classes: int
    in_channels: int
    input_shape: tuple[int, ...]


# -- the registry ----------------------------------------------------------------------------

Builder = Callable[["DataConfig"], tuple[Dataset, Dataset, DatasetInfo]]
B = TypeVar("B", bound=Builder)


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: ``build(cfg) -> (train, val, info)`` loads it; ``info(cfg)``
    says what a model needs without loading anything (a checkpoint restore, FLOPs)."""

    name: str
    build: Builder
    info: Callable[[DataConfig], DatasetInfo]


_DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, *, info: Callable[[DataConfig], DatasetInfo]) -> Callable[[B], B]:
    """Decorator registering ``build(cfg: DataConfig) -> (train, val, info)`` as ``data.name``;
    ``info(cfg)`` gives the same ``DatasetInfo`` without loading the data."""

    def register(build: B) -> B:
        if name in _DATASETS:
            raise OptionError(f"a dataset named {name!r} is already registered")
        _DATASETS[name] = DatasetSpec(name, build, info)
        return build

    return register


def list_datasets() -> list[str]:
    """Names of the registered datasets (``data.name``), sorted."""
    return sorted(_DATASETS)


def get_dataset(name: str) -> DatasetSpec:
    """The dataset registered as ``name``; an unknown name lists the valid ones."""
    if name not in _DATASETS:
        valid = list_datasets()
        raise DatasetError(
            f"unknown dataset {name!r}{did_you_mean(name, valid)}; valid: {', '.join(valid)}"
        )
    return _DATASETS[name]


# -- IDX files -------------------------------------------------------------------------------

# IDX type codes (LeCun's MNIST format): the third byte of the magic number
_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """The array stored in an IDX file (gzipped or plain, detected from its first bytes).

    Format: magic ``00 00 <type> <ndim>``, then ``ndim`` big-endian uint32 sizes, then the
    data in C order, big-endian. Raises ``DatasetError`` naming the file when the magic
    number is wrong, the gzip stream is corrupt or the data is shorter/longer than the
    header says.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(f"{path}: corrupt or truncated gzip data ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(
            f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'}; expected "
            "00 00 <type 08/09/0b/0c/0d/0e> <ndim>)"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = math.prod(dims)
    expected = count * dtype.itemsize
    found = len(raw) - header
    if found != expected:
        kind = "truncated" if found < expected else "corrupt (trailing data)"
        raise DatasetError(
            f"{path}: {kind}: the header declares shape {tuple(dims)} ({expected} bytes of "
            f"data) but the file holds {found}"
        )
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # native byte order, writable copy


# -- in-memory image datasets ----------------------------------------------------------------


def random_crop_flip(images: Tensor, padding: int = 2) -> Tensor:
    """Random crop after zero padding by ``padding`` pixels, then a random horizontal flip,
    for a whole batch at once: images (B, C, H, W) -> (B, C, H, W).

    Draws from torch's default generator, so a seeded run is reproducible (in a loader
    worker: the worker's generator, which the DataLoader seeds from its own generator).
    """
    b, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))  # (B, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * padding + 1, (b,))
    dx = torch.randint(0, 2 * padding + 1, (b,))
    rows = dy[:, None] + torch.arange(h)  # (B, H)
    cols = dx[:, None] + torch.arange(w)  # (B, W)
    batch = torch.arange(b)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    out = out.permute(0, 3, 1, 2)
    flip = torch.rand(b) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out).contiguous()


class _BatchedDataset(Dataset):
    """A dataset that builds whole batches with tensor ops in ``batch``; single samples
    and ``DataLoader``'s ``__getitems__`` are views of it."""

    def batch(self, indices: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, y = self.batch([index])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        x, y = self.batch(indices)
        return list(zip(x.unbind(0), y.unbind(0), strict=True))


class TensorImageDataset(_BatchedDataset):
    """Images held in memory as uint8 (N, C, H, W) with int64 labels (N,), normalized to
    float on access: ``(x / 255 - mean) / std``.

    ``__getitems__`` (used by ``DataLoader`` for a whole batch) indexes, augments and
    normalizes the batch with tensor ops, then returns per-sample pairs for the default
    collate. With ``augment``, training batches get ``random_crop_flip``.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        num_classes: int,
        augment: bool = False,
        padding: int = 2,
    ) -> None:
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise OptionError(
                f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if labels.shape != (images.shape[0],):
            raise OptionError(
                f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}"
            )
        channels = images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise OptionError(f"mean and std need {channels} values each, got {mean}, {std}")
        self.images = images
        self.labels = labels.long()
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.num_classes = int(num_classes)
        self.augment = bool(augment)
        self.padding = int(padding)
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in self.std]).view(-1, 1, 1)
        self._shift = torch.tensor([m / s for m, s in zip(self.mean, self.std, strict=True)]).view(
            -1, 1, 1
        )

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, indices: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        """Normalized (and, when enabled, augmented) images (B, C, H, W) and labels (B,)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        images = self.images[index]  # (B, C, H, W) uint8
        if self.augment:
            images = random_crop_flip(images, self.padding)
        return images.float() * self._scale - self._shift, self.labels[index]

    def take(self, n: int | None) -> TensorImageDataset:
        """The first ``n`` samples (all when ``n`` is None or larger than the dataset)."""
        if n is None or n >= len(self):
            return self
        return TensorImageDataset(
            self.images[:n],
            self.labels[:n],
            mean=self.mean,
            std=self.std,
            num_classes=self.num_classes,
            augment=self.augment,
            padding=self.padding,
        )


# -- Fashion-MNIST ---------------------------------------------------------------------------


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz"):
        if (root / name).is_file():
            return root / name
    return None


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fashion-MNIST as uint8 images (N, 1, 28, 28) and int64 labels (N,):
    (train_images, train_labels, val_images, val_labels), 60,000 / 10,000 samples.

    ``root`` holds the four IDX files (each optionally ``.gz``); default: where Debian's
    ``dataset-fashion-mnist`` package puts them. The official test split is the validation
    set, as in the literature.
    """
    root = Path(root if root is not None else FASHION_MNIST_ROOT)
    paths = {key: _find_idx(root, stem) for key, stem in FASHION_MNIST_FILES.items()}
    missing = [FASHION_MNIST_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        wanted = ", ".join(f"{stem}[.gz]" for stem in FASHION_MNIST_FILES.values())
        what = "not found" if len(missing) == 4 else f"incomplete (missing {', '.join(missing)})"
        raise MissingFileError(
            f"Fashion-MNIST {what} in {root}: install Debian's package with "
            f"'apt-get install dataset-fashion-mnist', or set data.root to a directory "
            f"holding {wanted}"
        )
    arrays = {key: read_idx(path) for key, path in paths.items() if path is not None}
    out = []
    for split in ("train", "val"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        image_path, label_path = paths[f"{split}_images"], paths[f"{split}_labels"]
        if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
            raise DatasetError(
                f"{image_path}: expected uint8 images of shape (N, 28, 28), got "
                f"{images.dtype} {images.shape}"
            )
        if labels.shape != (images.shape[0],):
            raise DatasetError(
                f"{label_path}: expected {images.shape[0]} labels to match {image_path}, "
                f"got shape {labels.shape}"
            )
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise DatasetError(
                f"{label_path}: labels must lie in 0..9, found {labels.min()}..{labels.max()}"
            )
        out.append(torch.from_numpy(images).unsqueeze(1))  # (N, 1, 28, 28)
        out.append(torch.from_numpy(labels.astype(np.int64)))
    return out[0], out[1], out[2], out[3]


def _fashion_mnist_info(data_cfg: DataConfig) -> DatasetInfo:
    return DatasetInfo(num_classes=10, in_channels=1, input_shape=(1, 28, 28))


@register_dataset("fashion_mnist", info=_fashion_mnist_info)
def _fashion_mnist(data_cfg: DataConfig) -> tuple[Dataset, Dataset, DatasetInfo]:
    root = data_cfg.root
    train_x, train_y, val_x, val_y = load_fashion_mnist(root)
    common: dict[str, Any] = {
        "mean": FASHION_MNIST_MEAN,
        "std": FASHION_MNIST_STD,
        "num_classes": 10,
    }
    train = TensorImageDataset(train_x, train_y, augment=data_cfg.augment, **common)
    val = TensorImageDataset(val_x, val_y, augment=False, **common)
    logger.info(
        "Fashion-MNIST from %s: %d train, %d val",
        root or FASHION_MNIST_ROOT,
        len(train),
        len(val),
    )
    return train, val, _fashion_mnist_info(data_cfg)


# -- sequences: Fashion-MNIST row by row, HAR-2, Google-12 -----------------------------------


class SequenceDataset(_BatchedDataset):
    """Sequences held in memory as (N, T, F) with int64 labels (N,), returned as float
    ``x * scale - shift`` with per-feature ``scale`` and ``shift`` (F,): one affine pass per
    batch, so uint8 images read row by row stay uint8 in memory."""

    def __init__(
        self, data: Tensor, labels: Tensor, *, scale: Tensor, shift: Tensor, num_classes: int
    ) -> None:
        if data.dim() != 3:
            raise OptionError(f"data must be (N, T, F), got {tuple(data.shape)}")
        if labels.shape != (data.shape[0],):
            raise OptionError(
                f"labels must have shape ({data.shape[0]},), got {tuple(labels.shape)}"
            )
        self.data = data
        self.labels = labels.long()
        self.scale = scale.float().reshape(-1)  # (F,)
        self.shift = shift.float().reshape(-1)  # (F,)
        self.num_classes = int(num_classes)

    def __len__(self) -> int:
        return self.data.shape[0]

    def batch(self, indices: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        """Normalized sequences (B, T, F) and labels (B,)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.data[index].float() * self.scale - self.shift, self.labels[index]

    def take(self, n: int | None) -> SequenceDataset:
        """The first ``n`` samples (all when ``n`` is None or larger than the dataset)."""
        if n is None or n >= len(self):
            return self
        return SequenceDataset(
            self.data[:n],
            self.labels[:n],
            scale=self.scale,
            shift=self.shift,
            num_classes=self.num_classes,
        )


def _fashion_mnist_rows_info(data_cfg: DataConfig) -> DatasetInfo:
    return DatasetInfo(num_classes=10, in_channels=28, input_shape=(28, 28))


@register_dataset("fashion_mnist_rows", info=_fashion_mnist_rows_info)
def _fashion_mnist_rows(data_cfg: DataConfig) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Fashion-MNIST read row by row: 28 steps of 28 pixels (the (batch, time, features)
    input of a recurrent model), normalized like the images."""
    train_x, train_y, val_x, val_y = load_fashion_mnist(data_cfg.root)
    scale = torch.full((28,), 1.0 / (255.0 * FASHION_MNIST_STD[0]))
    shift = torch.full((28,), FASHION_MNIST_MEAN[0] / FASHION_MNIST_STD[0])
    common: dict[str, Any] = {"scale": scale, "shift": shift, "num_classes": 10}
    train = SequenceDataset(train_x[:, 0], train_y, **common)  # (N, 28 rows, 28 pixels)
    val = SequenceDataset(val_x[:, 0], val_y, **common)
    return train, val, _fashion_mnist_rows_info(data_cfg)


@dataclass(frozen=True)
class SequenceSpec:
    """A preprocessed sequence dataset users bring as ``.npy`` arrays (``load_npy_sequences``)."""

    title: str
    steps: int
    features: int
    num_classes: int


# The FastGRNN tasks of the STR paper (Appendix A.7); not redistributable here, so users bring
# the preprocessed arrays.
SEQUENCE_DATASETS = {
    "har2": SequenceSpec("HAR-2", steps=128, features=9, num_classes=2),
    "google12": SequenceSpec("Google-12", steps=99, features=32, num_classes=12),
}
SEQUENCE_FILES = ("x_train.npy", "y_train.npy", "x_test.npy", "y_test.npy")


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DatasetError(f"{path}: not a readable .npy array ({exc})") from exc


def _sequence_split(root: Path, split: str, spec: SequenceSpec) -> tuple[np.ndarray, np.ndarray]:
    """(x (N, T, F) float32, y (N,) int64) of ``split`` checked against ``spec``."""
    x_path, y_path = root / f"x_{split}.npy", root / f"y_{split}.npy"
    x, y = _read_npy(x_path), _read_npy(y_path)
    t, f = spec.steps, spec.features
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DatasetError(f"{x_path}: expected real numbers of shape (N, {t}, {f}), got {x.dtype}")
    if x.ndim == 2 and x.shape[1] == t * f:
        x = x.reshape(x.shape[0], t, f)  # flattened step-major rows, as the paper describes
    if x.ndim != 3 or x.shape[1:] != (t, f):
        raise DatasetError(
            f"{x_path}: expected {spec.title} features of shape (N, {t}, {f}) "
            f"(or (N, {t * f}) step-major), got {x.shape}"
        )
    if y.ndim == 2 and y.shape == (x.shape[0], spec.num_classes):
        y = y.argmax(axis=1)  # one-hot labels
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.number):
        raise DatasetError(
            f"{y_path}: expected {x.shape[0]} {spec.title} labels of shape ({x.shape[0]},) "
            f"(or one-hot ({x.shape[0]}, {spec.num_classes})) to match {x_path.name}, "
            f"got {y.dtype} {y.shape}"
        )
    if y.size and (
        not np.all(np.equal(np.mod(y, 1), 0)) or y.min() < 0 or y.max() >= spec.num_classes
    ):
        raise DatasetError(
            f"{y_path}: {spec.title} labels must be integers in 0..{spec.num_classes - 1}, "
            f"found {y.min()}..{y.max()}"
        )
    if not np.all(np.isfinite(x)):
        raise DatasetError(f"{x_path}: holds NaN or infinite values")
    return x.astype(np.float32, copy=False), y.astype(np.int64)


def load_npy_sequences(
    root: str | os.PathLike[str], name: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A preprocessed sequence dataset (``har2``: 128 steps x 9 channels, 2 classes;
    ``google12``: 99 steps x 32 log-mel features, 12 classes) from ``root``:
    ``x_train.npy`` / ``x_test.npy`` (N, T, F) (or (N, T * F), step-major) and ``y_train.npy``
    / ``y_test.npy`` (N,) integer labels (or one-hot). Returns float32 features and int64
    labels (train_x, train_y, test_x, test_y); a missing or malformed file is a
    ``DatasetError`` naming the file and the expected shape."""
    spec = SEQUENCE_DATASETS[name]
    root = Path(root)
    missing = [f for f in SEQUENCE_FILES if not (root / f).is_file()]
    if missing:
        raise DatasetError(
            f"{spec.title} not found in {root}: missing {', '.join(missing)}; data.root must hold "
            f"x_train.npy / x_test.npy of shape (N, {spec.steps}, {spec.features}) and "
            f"y_train.npy / y_test.npy of shape (N,) with labels 0..{spec.num_classes - 1}"
        )
    train_x, train_y = _sequence_split(root, "train", spec)
    test_x, test_y = _sequence_split(root, "test", spec)
    return (
        torch.from_numpy(train_x),
        torch.from_numpy(train_y),
        torch.from_numpy(test_x),
        torch.from_numpy(test_y),
    )


def _npy_sequences_info(data_cfg: DataConfig) -> DatasetInfo:
    spec = SEQUENCE_DATASETS[data_cfg.name]
    return DatasetInfo(
        num_classes=spec.num_classes,
        in_channels=spec.features,
        input_shape=(spec.steps, spec.features),
    )


def _npy_sequences(data_cfg: DataConfig) -> tuple[Dataset, Dataset, DatasetInfo]:
    """HAR-2 / Google-12 standardized per feature with the training split's mean and std,
    as the paper does ("zero mean, unit variance during training and prediction")."""
    name = data_cfg.name
    spec = SEQUENCE_DATASETS[name]
    if not data_cfg.root:
        raise DatasetError(
            f"data.name={name} needs data.root: a directory with {', '.join(SEQUENCE_FILES)} "
            f"({spec.title}: (N, {spec.steps}, {spec.features}) features, (N,) labels)"
        )
    train_x, train_y, test_x, test_y = load_npy_sequences(data_cfg.root, name)
    mean = train_x.mean(dim=(0, 1))  # (F,)
    std = train_x.std(dim=(0, 1)).clamp_min(1e-8)
    common: dict[str, Any] = {
        "scale": 1.0 / std,
        "shift": mean / std,
        "num_classes": spec.num_classes,
    }
    train = SequenceDataset(train_x, train_y, **common)
    val = SequenceDataset(test_x, test_y, **common)
    logger.info("%s from %s: %d train, %d test", spec.title, data_cfg.root, len(train), len(val))
    return train, val, _npy_sequences_info(data_cfg)


for _name in SEQUENCE_DATASETS:
    register_dataset(_name, info=_npy_sequences_info)(_npy_sequences)


# -- synthetic -------------------------------------------------------------------------------

_MASK63 = (1 << 63) - 1
_TRAIN, _VAL, _TEMPLATE, _LABELS = 1, 2, 3, 4


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64-style mixing), for per-sample generators."""
    state = 0x9E3779B97F4A7C15
    for v in values:
        state = (state ^ (v & ((1 << 64) - 1))) * 0xBF58476D1CE4E5B9 & ((1 << 64) - 1)
        state ^= state >> 31
    return state & _MASK63


class SyntheticDataset(Dataset):
    """Seeded random data a model can learn: sample i of class y_i is
    ``template[y_i] + noise_i``, with a unit-Gaussian template per class and unit-Gaussian
    noise, each drawn from its own generator seeded by (seed, split, index).

    A sample depends only on (seed, split, index), never on the batch it is drawn in, on the
    loader or on ``take``. The train and val splits share the templates and differ in
    noise and labels.
    """

    def __init__(
        self,
        num_samples: int,
        shape: Sequence[int],
        num_classes: int,
        *,
        seed: int = 0,
        split: str = "train",
    ) -> None:
        if split not in ("train", "val"):
            raise OptionError(f"split must be 'train' or 'val', got {split!r}")
        self.shape = tuple(int(d) for d in shape)
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.split = split
        self._split_id = _TRAIN if split == "train" else _VAL
        gen = torch.Generator().manual_seed(_mix(self.seed, self._split_id, _LABELS))
        self.labels = torch.randint(self.num_classes, (int(num_samples),), generator=gen)
        self._templates: dict[int, Tensor] = {}
        self._data: Tensor | None = None
        if len(self) * math.prod(self.shape) <= _SYNTHETIC_MATERIALIZE_LIMIT:
            self._data = torch.stack([self._sample(i) for i in range(len(self))])

    def _template(self, label: int) -> Tensor:
        if label not in self._templates:
            gen = torch.Generator().manual_seed(_mix(self.seed, _TEMPLATE, label))
            self._templates[label] = torch.randn(self.shape, generator=gen)
        return self._templates[label]

    def _sample(self, index: int) -> Tensor:
        gen = torch.Generator().manual_seed(_mix(self.seed, self._split_id, index))
        return self._template(int(self.labels[index])) + torch.randn(self.shape, generator=gen)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        x = self._data[index] if self._data is not None else self._sample(index)
        return x, self.labels[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        if self._data is not None:
            index = torch.as_tensor(indices, dtype=torch.long)
            return list(zip(self._data[index].unbind(0), self.labels[index].unbind(0), strict=True))
        return [self[i] for i in indices]

    def take(self, n: int | None) -> SyntheticDataset:
        """The first ``n`` samples (all when ``n`` is None or larger than the dataset)."""
        if n is None or n >= len(self):
            return self
        out = SyntheticDataset.__new__(SyntheticDataset)
        out.__dict__.update(self.__dict__)
        out.labels = self.labels[:n]
        out._data = self._data[:n] if self._data is not None else None
        return out


def _synthetic_info(data_cfg: DataConfig) -> DatasetInfo:
    shape = tuple(data_cfg.synthetic.shape)
    return DatasetInfo(
        num_classes=data_cfg.synthetic.num_classes, in_channels=shape[0], input_shape=shape
    )


@register_dataset("synthetic", info=_synthetic_info)
def _synthetic(data_cfg: DataConfig) -> tuple[Dataset, Dataset, DatasetInfo]:
    syn = data_cfg.synthetic
    shape, classes, seed = tuple(syn.shape), syn.num_classes, syn.seed
    train = SyntheticDataset(syn.num_train, shape, classes, seed=seed, split="train")
    val = SyntheticDataset(syn.num_val, shape, classes, seed=seed, split="val")
    return train, val, _synthetic_info(data_cfg)


# -- ImageFolder -----------------------------------------------------------------------------


def _imagefolder_root(data_cfg: DataConfig) -> Path:
    if not data_cfg.root:
        raise DatasetError(
            "data.name=imagefolder needs data.root: set data.root=/path/to/imagenet "
            "(a directory holding train/ and val/, one sub-directory per class)"
        )
    root = Path(data_cfg.root)
    missing = [split for split in ("train", "val") if not (root / split).is_dir()]
    if missing:
        raise MissingFileError(
            f"ImageFolder data not found: {root} has no {' or '.join(f'{m}/' for m in missing)} "
            "directory; data.root must hold train/ and val/, one sub-directory per class"
        )
    return root


def _class_dirs(folder: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def _import_torchvision() -> Any:
    try:
        import torchvision  # noqa: F401
        from torchvision import datasets, transforms
    except ImportError as exc:
        raise MissingDependencyError(
            "data.name=imagefolder needs torchvision, an optional extra: "
            "pip install 'strsparse[vision]'"
        ) from exc
    return datasets, transforms


def _imagefolder_info(data_cfg: DataConfig, num_classes: int | None = None) -> DatasetInfo:
    """From ``data.num_classes``, else by counting ``root/train``'s class directories."""
    classes = data_cfg.num_classes if num_classes is None else num_classes
    if classes is None:
        classes = len(_class_dirs(_imagefolder_root(data_cfg) / "train"))
    size = data_cfg.image_size
    return DatasetInfo(num_classes=classes, in_channels=3, input_shape=(3, size, size))


@register_dataset("imagefolder", info=_imagefolder_info)
def _imagefolder(data_cfg: DataConfig) -> tuple[Dataset, Dataset, DatasetInfo]:
    """torchvision ImageFolder train/val with the standard ImageNet augmentations:
    RandomResizedCrop + flip for training, Resize(size / 0.875) + CenterCrop for val."""
    root = _imagefolder_root(data_cfg)
    datasets, transforms = _import_torchvision()
    size = data_cfg.image_size
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    val_tf = transforms.Compose(
        [
            transforms.Resize(int(size / 0.875)),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            normalize,
        ]
    )
    train = datasets.ImageFolder(str(root / "train"), transform=train_tf)
    val = datasets.ImageFolder(str(root / "val"), transform=val_tf)
    if train.classes != val.classes:
        raise DatasetError(
            f"{root}: train/ and val/ hold different classes ({len(train.classes)} vs "
            f"{len(val.classes)} sub-directories)"
        )
    num_classes = len(train.classes)
    expected = data_cfg.num_classes
    if expected is not None and expected != num_classes:
        raise DatasetError(
            f"{root}: data.num_classes={expected} but train/ holds {num_classes} classes"
        )
    logger.info(
        "ImageFolder %s: %d train, %d val, %d classes", root, len(train), len(val), num_classes
    )
    return train, val, _imagefolder_info(data_cfg, num_classes)


def _limit(dataset: Dataset, n: int | None) -> Dataset:
    """The first ``n`` samples of ``dataset`` (a deterministic slice)."""
    if n is None:
        return dataset
    take = getattr(dataset, "take", None)
    if callable(take):
        return take(int(n))
    if n >= len(dataset):  # type: ignore[arg-type]
        return dataset
    return torch.utils.data.Subset(dataset, range(int(n)))


# -- public entry points ---------------------------------------------------------------------


def dataset_info(data_cfg: DataConfig) -> DatasetInfo:
    """num_classes, in_channels and input shape of ``data_cfg``'s dataset, without loading
    it (ImageFolder: from ``data.num_classes`` or by counting ``root/train``'s classes)."""
    return get_dataset(data_cfg.name).info(data_cfg)


def build_datasets(data_cfg: DataConfig) -> tuple[Dataset, Dataset, DatasetInfo]:
    """(train, val, info) for ``data_cfg``, with ``train_limit`` / ``val_limit`` applied as
    "the first N samples"."""
    train, val, info = get_dataset(data_cfg.name).build(data_cfg)
    return _limit(train, data_cfg.train_limit), _limit(val, data_cfg.val_limit), info


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` in order: a distributed evaluation shard
    without the padding of ``DistributedSampler`` (which repeats samples to even out the
    shards and would count them twice). Shards may differ in size by one."""

    def __init__(self, length: int, *, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise OptionError(f"rank {rank} out of range for world size {world_size}")
        self.length, self.rank, self.world_size = int(length), int(rank), int(world_size)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def build_loaders(
    train_ds: Dataset,
    val_ds: Dataset,
    data_cfg: DataConfig,
    *,
    seed: int,
    distributed: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """(train_loader, val_loader) with ``data.batch_size`` / ``data.eval_batch_size`` and
    ``data.num_workers``; the last partial batch is kept (drop_last=False).

    The training order is drawn from a ``torch.Generator`` seeded with ``seed`` (the
    sampler's ``generator``): reseed it per epoch (``seed + epoch``) to make each epoch's
    order a function of (seed, epoch) whatever happened before, e.g. on resume. When
    ``distributed`` (an initialized process group), training uses a ``DistributedSampler``
    seeded with ``seed``; the trainer must call ``train_loader.sampler.set_epoch(epoch)``
    before every epoch, or all epochs see the same order. Validation is sharded across ranks
    without padding (``ShardSampler``): sum the metrics over ranks.

    Training workers start afresh every epoch, seeded from the loader's ``generator`` (the
    trainer reseeds it per epoch too), so augmentation drawn in a worker is a function of
    the seed and the epoch and a resumed run draws what the uninterrupted one did; the
    validation workers persist.
    """
    batch_size, eval_batch_size = data_cfg.batch_size, data_cfg.eval_batch_size
    workers = data_cfg.num_workers
    common: dict[str, Any] = {"num_workers": workers, "pin_memory": torch.cuda.is_available()}
    train_common = {**common, "persistent_workers": False}
    common["persistent_workers"] = workers > 0
    generator = torch.Generator().manual_seed(int(seed))
    if distributed:
        import torch.distributed as dist
        from torch.utils.data.distributed import DistributedSampler

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "build_loaders(distributed=True) needs an initialized process group "
                "(torch.distributed.init_process_group, e.g. under torchrun)"
            )
        rank, world = dist.get_rank(), dist.get_world_size()
        train_sampler: Sampler[int] = DistributedSampler(
            train_ds, num_replicas=world, rank=rank, shuffle=True, seed=int(seed), drop_last=False
        )
        val_sampler = ShardSampler(len(val_ds), rank=rank, world_size=world)  # type: ignore[arg-type]
        train_loader = DataLoader(
            train_ds,
            batch_size=batch_size,
            sampler=train_sampler,
            drop_last=False,
            generator=generator,
            **train_common,
        )
        val_loader = DataLoader(val_ds, batch_size=eval_batch_size, sampler=val_sampler, **common)
        return train_loader, val_loader
    train_loader = DataLoader(
        train_ds,
        batch_size=batch_size,
        shuffle=True,
        drop_last=False,
        generator=generator,
        **train_common,
    )
    val_loader = DataLoader(val_ds, batch_size=eval_batch_size, shuffle=False, **common)
    return train_loader, val_loader
