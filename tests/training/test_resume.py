"""Resuming a run (strsparse.training.resume): the loader order of every epoch."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from strsparse.training.checkpoint import capture_rng_state
from strsparse.training.resume import Progress, epoch_batches


def _loader(distributed: bool) -> DataLoader:
    """A shuffling loader over 0..63 as ``build_loaders`` makes it, one rank of two for
    ``distributed`` (a DistributedSampler needs no process group when told its rank)."""
    dataset = TensorDataset(torch.arange(64))
    generator = torch.Generator().manual_seed(0)
    if distributed:
        sampler = DistributedSampler(dataset, num_replicas=2, rank=0, shuffle=True, seed=0)
        return DataLoader(dataset, batch_size=8, sampler=sampler, generator=generator)
    return DataLoader(dataset, batch_size=8, shuffle=True, generator=generator)


def _order(loader: DataLoader, epoch: int) -> list[int]:
    batches, _ = epoch_batches(
        loader, Progress(epoch=epoch), seed=0, resume=None, keep_epoch_start=False
    )
    return torch.cat([indices for (indices,) in batches]).tolist()


@pytest.mark.parametrize("distributed", [False, True], ids=["one-process", "distributed"])
def test_every_epoch_has_its_own_order_a_function_of_seed_and_epoch(distributed: bool) -> None:
    loader = _loader(distributed)
    orders = [_order(loader, epoch) for epoch in range(3)]
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    # a run resumed at epoch 2 builds a fresh loader: it must see the same order
    assert _order(_loader(distributed), 2) == orders[2]
    assert _order(_loader(distributed), 0) == orders[0]


def test_a_mid_epoch_resume_skips_the_batches_already_trained() -> None:
    full = _order(_loader(False), 1)
    progress = Progress(epoch=1, batch=3)
    resume = {"rng": capture_rng_state()}
    batches, _ = epoch_batches(
        _loader(False), progress, seed=0, resume=resume, keep_epoch_start=False
    )
    assert progress.batch == 3
    assert torch.cat([indices for (indices,) in batches]).tolist() == full[3 * 8 :]
