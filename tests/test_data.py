"""Tests for strsparse.data: IDX parsing, Fashion-MNIST, synthetic data, ImageFolder errors,
limits, augmentation and seeded loaders."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from strsparse import data as data_module
from strsparse.config import Config, DataConfig
from strsparse.data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_ROOT,
    FASHION_MNIST_STD,
    DatasetError,
    DatasetInfo,
    ShardSampler,
    SyntheticDataset,
    TensorImageDataset,
    build_datasets,
    build_loaders,
    dataset_info,
    load_fashion_mnist,
    random_crop_flip,
    read_idx,
)

_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    """Write ``array`` as an IDX file (big-endian), gzipped when ``gz``."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        array = array.astype(array.dtype.newbyteorder(">"))
    header = bytes([0, 0, _IDX_CODES[array.dtype], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def fake_fashion_mnist(root: Path, n_train: int = 40, n_val: int = 12, gz: bool = True) -> Path:
    """Four small IDX files with Fashion-MNIST's names; pixel values encode the index."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n) % 256  # a marker to check order
        labels = (np.arange(n) % 10).astype(np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images, gz=gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz=gz)
    return root


def data_cfg(**changes) -> DataConfig:
    return dataclasses.replace(Config().data, **changes)


def synthetic_cfg(**changes) -> DataConfig:
    """64 train / 32 val synthetic samples of shape (1, 28, 28)."""
    changes.setdefault(
        "synthetic", dataclasses.replace(DataConfig().synthetic, num_train=64, num_val=32)
    )
    return data_cfg(name="synthetic", **changes)


# -- IDX -------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([1, -2, 70000], dtype=">i4"),
        np.array([[0.5, -1.25]], dtype=">f4"),
    ],
    ids=["uint8-3d", "int32-1d", "float32-2d"],
)
def test_read_idx_round_trip(tmp_path: Path, array: np.ndarray, gz: bool) -> None:
    path = write_idx(tmp_path / "a.idx", array, gz=gz)
    got = read_idx(path)
    assert got.shape == array.shape
    np.testing.assert_array_equal(got, array)
    assert got.dtype.isnative and got.flags.writeable


def test_read_idx_rejects_a_bad_magic_number(tmp_path: Path) -> None:
    path = tmp_path / "bad.idx"
    path.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(DatasetError, match=r"bad\.idx: not an IDX file \(magic number 12340801"):
        read_idx(path)
    path.write_bytes(b"")
    with pytest.raises(DatasetError, match="not an IDX file"):
        read_idx(path)


def test_read_idx_rejects_truncated_and_oversized_files(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "img.idx", np.zeros((3, 4, 4), dtype=np.uint8))
    full = path.read_bytes()
    path.write_bytes(full[:-5])
    with pytest.raises(DatasetError, match=r"img\.idx: truncated: .*shape \(3, 4, 4\) \(48 bytes"):
        read_idx(path)
    path.write_bytes(full[:10])  # inside the header
    with pytest.raises(DatasetError, match="truncated IDX header"):
        read_idx(path)
    path.write_bytes(full + b"\x00")
    with pytest.raises(DatasetError, match="trailing data"):
        read_idx(path)


def test_read_idx_rejects_corrupt_gzip(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "img.idx.gz", np.zeros((3, 4, 4), dtype=np.uint8), gz=True)
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DatasetError, match=r"img\.idx\.gz: corrupt or truncated gzip"):
        read_idx(path)


# -- Fashion-MNIST ---------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_load_fashion_mnist_from_any_directory(tmp_path: Path, gz: bool) -> None:
    root = fake_fashion_mnist(tmp_path / "fm", gz=gz)
    train_x, train_y, val_x, val_y = load_fashion_mnist(root)
    assert train_x.shape == (40, 1, 28, 28) and train_x.dtype == torch.uint8
    assert val_x.shape == (12, 1, 28, 28)
    assert train_y.dtype == torch.int64 and train_y.tolist() == [i % 10 for i in range(40)]
    assert train_x[:, 0, 0, 0].tolist() == list(range(40))


def test_missing_fashion_mnist_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist(tmp_path)
    message = str(info.value)
    assert f"Fashion-MNIST not found in {tmp_path}" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "data.root" in message and "train-images-idx3-ubyte[.gz]" in message
    root = fake_fashion_mnist(tmp_path / "fm")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete \\(missing t10k-labels-idx1-ubyte\\)"):
        load_fashion_mnist(root)


def test_fashion_mnist_content_checks_name_the_file(tmp_path: Path) -> None:
    root = fake_fashion_mnist(tmp_path / "fm")
    write_idx(root / "train-labels-idx1-ubyte.gz", np.full(40, 11, dtype=np.uint8), gz=True)
    with pytest.raises(
        DatasetError, match=r"train-labels-idx1-ubyte\.gz: labels must lie in 0\.\.9"
    ):
        load_fashion_mnist(root)
    write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(39, dtype=np.uint8), gz=True)
    with pytest.raises(DatasetError, match="expected 40 labels"):
        load_fashion_mnist(root)
    write_idx(root / "train-images-idx3-ubyte.gz", np.zeros((40, 27, 28), np.uint8), gz=True)
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz: expected uint8 images"):
        load_fashion_mnist(root)


def test_build_datasets_fashion_mnist_normalizes_and_limits(tmp_path: Path) -> None:
    root = fake_fashion_mnist(tmp_path / "fm")
    train, val, info = build_datasets(data_cfg(root=str(root), train_limit=25, val_limit=100))
    assert (len(train), len(val)) == (25, 12)  # a limit above the size keeps everything
    assert (info.num_classes, info.in_channels, info.input_shape) == (10, 1, (1, 28, 28))
    assert info == dataset_info(data_cfg(root=str(root)))
    x, y = train[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and int(y) == 3
    raw = load_fashion_mnist(root)[0][3].float() / 255
    torch.testing.assert_close(x, (raw - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0])
    # the limit is the first N samples, in order
    assert [int(train[i][1]) for i in range(25)] == [i % 10 for i in range(25)]


def test_default_collate_and_batched_access_agree(tmp_path: Path) -> None:
    root = fake_fashion_mnist(tmp_path / "fm")
    _, val, _ = build_datasets(data_cfg(root=str(root)))
    xb, yb = next(iter(DataLoader(val, batch_size=5)))  # what `strsparse eval` does
    x_ref, y_ref = val.batch(range(5))
    assert xb.shape == (5, 1, 28, 28)
    torch.testing.assert_close(xb, x_ref)
    assert torch.equal(yb, y_ref)
    torch.testing.assert_close(val[2][0], x_ref[2])


@pytest.mark.skipif(
    not Path(FASHION_MNIST_ROOT).is_dir(),
    reason=f"Fashion-MNIST is not installed in {FASHION_MNIST_ROOT} "
    "(apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist() -> None:
    train, val, info = build_datasets(data_cfg())
    assert (len(train), len(val)) == (60_000, 10_000)
    assert info.num_classes == 10 and info.input_shape == (1, 28, 28)
    assert train.images.shape == (60_000, 1, 28, 28)
    assert sorted(train.labels.unique().tolist()) == list(range(10))
    assert torch.bincount(val.labels).tolist() == [1000] * 10  # balanced test split
    x, _ = train.batch(range(0, 60_000, 7))
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1.0) < 0.02


# -- augmentation ----------------------------------------------------------------------------


def test_random_crop_flip_moves_pixels_only() -> None:
    torch.manual_seed(0)
    images = torch.randint(1, 256, (16, 2, 6, 6), dtype=torch.uint8)
    out = random_crop_flip(images, padding=2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(16):
        candidates = [
            view
            for dy in range(5)
            for dx in range(5)
            for crop in [padded[i, :, dy : dy + 6, dx : dx + 6]]
            for view in (crop, crop.flip(-1))
        ]
        assert any(torch.equal(out[i], c) for c in candidates)
    assert not torch.equal(out, images)  # something moved


def test_augmentation_is_deterministic_given_the_seed(tmp_path: Path) -> None:
    root = fake_fashion_mnist(tmp_path / "fm")
    train, val, _ = build_datasets(data_cfg(root=str(root), augment=True))
    assert train.augment and not val.augment
    torch.manual_seed(1)
    a, _ = train.batch(range(20))
    torch.manual_seed(1)
    b, _ = train.batch(range(20))
    torch.manual_seed(2)
    c, _ = train.batch(range(20))
    assert torch.equal(a, b) and not torch.equal(a, c)
    plain, _ = build_datasets(data_cfg(root=str(root)))[0].batch(range(20))
    assert not torch.equal(a, plain)


def test_tensor_image_dataset_checks_its_inputs() -> None:
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        TensorImageDataset(images.float(), torch.zeros(4), mean=(0,), std=(1,), num_classes=2)
    with pytest.raises(ValueError, match="labels must have shape"):
        TensorImageDataset(images, torch.zeros(3), mean=(0,), std=(1,), num_classes=2)
    with pytest.raises(ValueError, match="mean and std need 1"):
        TensorImageDataset(images, torch.zeros(4), mean=(0, 0), std=(1,), num_classes=2)


# -- synthetic -------------------------------------------------------------------------------


def test_synthetic_is_deterministic() -> None:
    train_a, val_a, info = build_datasets(synthetic_cfg())
    train_b, val_b, _ = build_datasets(synthetic_cfg())
    assert info == dataset_info(synthetic_cfg())
    assert (info.num_classes, info.in_channels, info.input_shape) == (10, 1, (1, 28, 28))
    assert (len(train_a), len(val_a)) == (64, 32)
    for i in (0, 17, 63):
        assert torch.equal(train_a[i][0], train_b[i][0])
        assert int(train_a[i][1]) == int(train_b[i][1])
    assert not torch.equal(train_a[0][0], val_a[0][0])  # the splits differ
    other_seed = dataclasses.replace(synthetic_cfg().synthetic, seed=1)
    train_c, _, _ = build_datasets(synthetic_cfg(synthetic=other_seed))
    assert not torch.equal(train_a[0][0], train_c[0][0])


def test_synthetic_limits_and_lazy_generation_give_the_same_samples(monkeypatch) -> None:
    full, _, _ = build_datasets(synthetic_cfg())
    limited, val, _ = build_datasets(synthetic_cfg(train_limit=10, val_limit=5))
    assert (len(limited), len(val)) == (10, 5)
    for i in range(10):
        assert torch.equal(limited[i][0], full[i][0])
    monkeypatch.setattr(data_module, "_SYNTHETIC_MATERIALIZE_LIMIT", 0)
    lazy = SyntheticDataset(64, (1, 28, 28), 10, seed=0, split="train")
    assert lazy._data is None
    batch = lazy.__getitems__([5, 0, 63])
    for (x, y), i in zip(batch, [5, 0, 63], strict=True):
        assert torch.equal(x, full[i][0]) and int(y) == int(full[i][1])
    with pytest.raises(IndexError):
        lazy[64]


def test_synthetic_classes_are_learnable() -> None:
    """Nearest class mean (estimated on train) classifies val far above chance."""
    syn = dataclasses.replace(
        DataConfig().synthetic, num_train=400, num_val=200, num_classes=5, shape=(3, 8, 8)
    )
    train, val, info = build_datasets(data_cfg(name="synthetic", synthetic=syn))
    assert info.input_shape == (3, 8, 8) and info.in_channels == 3
    xt = torch.stack([train[i][0] for i in range(len(train))]).flatten(1)
    yt = train.labels
    means = torch.stack([xt[yt == c].mean(0) for c in range(5)])
    xv = torch.stack([val[i][0] for i in range(len(val))]).flatten(1)
    accuracy = (torch.cdist(xv, means).argmin(1) == val.labels).float().mean()
    assert accuracy > 0.9


# -- ImageFolder -----------------------------------------------------------------------------


def test_imagefolder_needs_a_root(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs data.root: set data.root=/path/to/imagenet"):
        build_datasets(data_cfg(name="imagefolder"))
    with pytest.raises(FileNotFoundError, match=r"has no train/ or val/ directory"):
        build_datasets(data_cfg(name="imagefolder", root=str(tmp_path)))
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no val/ directory"):
        build_datasets(data_cfg(name="imagefolder", root=str(tmp_path)))


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed"
)
def test_imagefolder_without_torchvision_says_which_extra(tmp_path: Path) -> None:
    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
    with pytest.raises(ImportError, match=r"pip install 'strsparse\[vision\]'"):
        build_datasets(data_cfg(name="imagefolder", root=str(tmp_path)))


def test_imagefolder_info_without_loading(tmp_path: Path) -> None:
    info = dataset_info(data_cfg(name="imagefolder", num_classes=1000, image_size=160))
    assert (info.num_classes, info.in_channels, info.input_shape) == (1000, 3, (3, 160, 160))
    for name in ("a", "b", "c"):
        (tmp_path / "train" / name).mkdir(parents=True)
    (tmp_path / "val").mkdir()
    (tmp_path / "train" / "README").write_text("not a class")
    assert dataset_info(data_cfg(name="imagefolder", root=str(tmp_path))).num_classes == 3


# -- loaders ---------------------------------------------------------------------------------


def _order(loader: DataLoader) -> list[int]:
    return [int(v) for _, y in loader for v in y]


def test_loaders_are_seeded_and_keep_the_last_batch() -> None:
    syn = dataclasses.replace(DataConfig().synthetic, num_train=50, num_val=20, shape=(4,))
    cfg = data_cfg(name="synthetic", synthetic=syn, batch_size=16, eval_batch_size=8)
    train, val, _ = build_datasets(cfg)
    # each sample's first feature identifies it: compare orders through the features
    ids = {float(train[i][0][0]): i for i in range(len(train))}

    def order(loader: DataLoader) -> list[int]:
        return [ids[float(v)] for x, _ in loader for v in x[:, 0]]

    a_train, a_val = build_loaders(train, val, cfg, seed=3)
    b_train, _ = build_loaders(train, val, cfg, seed=3)
    c_train, _ = build_loaders(train, val, cfg, seed=4)
    first = order(a_train)
    assert sorted(first) == list(range(50))  # one epoch sees every sample once
    assert first == order(b_train)
    assert first != order(c_train)
    assert order(a_train) != first  # the next epoch is reshuffled...
    a_train.sampler.generator.manual_seed(3)
    assert order(a_train) == first  # ...as a function of the generator's seed
    assert [len(y) for _, y in a_train] == [16, 16, 16, 2]  # drop_last=False
    assert [len(y) for _, y in a_val] == [8, 8, 4]
    assert _order(a_val) == val.labels.tolist()  # validation is not shuffled


def test_distributed_loaders_need_a_process_group() -> None:
    train, val, _ = build_datasets(synthetic_cfg())
    with pytest.raises(RuntimeError, match="initialized process group"):
        build_loaders(train, val, synthetic_cfg(), seed=0, distributed=True)


def test_distributed_loaders_shard_the_data(tmp_path: Path) -> None:
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    train, val, _ = build_datasets(synthetic_cfg())
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        train_loader, val_loader = build_loaders(
            train, val, synthetic_cfg(batch_size=16), seed=0, distributed=True
        )
    finally:
        dist.destroy_process_group()
    sampler = train_loader.sampler
    assert isinstance(sampler, torch.utils.data.DistributedSampler)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    assert sorted(epoch0) == list(range(64)) and list(sampler) != epoch0
    assert list(val_loader.sampler) == list(range(32))


def test_shard_sampler_covers_every_index_once() -> None:
    shards = [list(ShardSampler(10, rank=r, world_size=3)) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert [len(ShardSampler(10, rank=r, world_size=3)) for r in range(3)] == [4, 3, 3]
    with pytest.raises(ValueError, match="rank 3 out of range"):
        ShardSampler(10, rank=3, world_size=3)


def test_unknown_dataset_name_in_an_unvalidated_config() -> None:
    class Fake:
        name = "fashoin_mnist"

    with pytest.raises(ValueError, match="did you mean 'fashion_mnist'"):
        build_datasets(Fake())


def test_unknown_dataset_is_a_dataset_error_listing_the_registered_ones() -> None:
    with pytest.raises(DatasetError, match=r"'synthtic' \(did you mean 'synthetic'\?\)") as info:
        data_module.get_dataset("synthtic")
    assert all(name in str(info.value) for name in data_module.list_datasets())
    message = _config_error({"data": {"name": "fashoin_mnist"}})
    assert "did you mean 'fashion_mnist'?" in message


def _config_error(overrides: dict) -> str:
    from strsparse.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError) as info:
        config_from_dict(overrides)
    return str(info.value)


def test_a_registered_dataset_is_accepted_by_configs_and_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(data_module, "_DATASETS", dict(data_module._DATASETS))
    info = DatasetInfo(num_classes=3, in_channels=1, input_shape=(1, 4))

    @data_module.register_dataset("tiny", info=lambda cfg: info)
    def _tiny(cfg: DataConfig) -> tuple:
        x, y = torch.randn(6, 1, 4), torch.arange(6) % 3
        ds = torch.utils.data.TensorDataset(x, y)
        return ds, ds, info

    assert "tiny" in data_module.list_datasets()
    cfg = DataConfig(name="tiny", train_limit=4)
    assert dataset_info(cfg) == info
    train, val, built_info = build_datasets(cfg)
    assert (len(train), len(val), built_info) == (4, 6, info)
    with pytest.raises(ValueError, match="already registered"):
        data_module.register_dataset("tiny", info=lambda cfg: info)(_tiny)
