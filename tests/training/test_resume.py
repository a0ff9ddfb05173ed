"""Where a run goes and how it resumes (strsparse.training.resume): a run directory only
ever describes what ran in it; every epoch's loader order is a function of (seed, epoch)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from strsparse.config import config_to_dict
from strsparse.training import load_checkpoint, train
from strsparse.training.checkpoint import CheckpointError, capture_rng_state
from strsparse.training.resume import (
    Progress,
    RunMismatchError,
    RunPlace,
    config_differences,
    epoch_batches,
    for_rank,
    place_run,
    reseed_rank,
    save_progress,
    set_loader_epoch,
)
from tests.training.runs import synthetic_config


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


def test_the_generator_that_seeds_loader_workers_follows_seed_epoch_and_rank() -> None:
    seeds = {}
    for rank in range(2):
        for epoch in range(2):
            loader = _loader(distributed=True)  # a fresh loader, as a resumed run builds
            set_loader_epoch(loader, epoch, seed=0, rank=rank)
            seeds[rank, epoch] = loader.generator.initial_seed()
    assert seeds[0, 0] == 0 and seeds[0, 1] == 1  # one process: seed + epoch, as before
    assert len(set(seeds.values())) == 4


def test_a_mid_epoch_resume_skips_the_batches_already_trained() -> None:
    full = _order(_loader(False), 1)
    progress = Progress(epoch=1, batch=3)
    resume = {"rng": capture_rng_state()}
    batches, _ = epoch_batches(
        _loader(False), progress, seed=0, resume=resume, keep_epoch_start=False
    )
    assert progress.batch == 3
    assert torch.cat([indices for (indices,) in batches]).tolist() == full[3 * 8 :]


# -- where a run goes -------------------------------------------------------------------------

QUICK = {"train.epochs": 1, "train.max_steps_per_epoch": 2, "train.tensorboard": False}


def _snapshot(run: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != "train.log"
    }


def test_a_changed_config_never_rewrites_a_finished_run(tmp_path: Path) -> None:
    first = train(synthetic_config(tmp_path, **QUICK))
    run = tmp_path / "run"
    assert first.run_dir == run
    before = _snapshot(run)
    assert {"config.yaml", "metrics.csv", "checkpoints/last.pt"} <= set(before)

    changed = synthetic_config(tmp_path, **QUICK, **{"optim.weight_decay": 3e-3})
    second = train(changed)
    assert second.run_dir == tmp_path / "run-1"
    assert _snapshot(run) == before  # byte for byte
    saved = yaml.safe_load((tmp_path / "run-1" / "config.yaml").read_text())
    assert saved["name"] == "run-1" and saved["optim"]["weight_decay"] == 3e-3
    # rerunning either configuration finds its own run, finished: nothing is rewritten
    again = _snapshot(tmp_path / "run-1")
    assert train(changed).run_dir == tmp_path / "run-1"
    assert train(synthetic_config(tmp_path, **QUICK, **{"train.quiet": False})).run_dir == run
    assert _snapshot(run) == before and _snapshot(tmp_path / "run-1") == again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run-1"]


def test_more_epochs_is_a_new_run_not_a_longer_old_one(tmp_path: Path) -> None:
    train(synthetic_config(tmp_path, **QUICK))
    longer = train(synthetic_config(tmp_path, **{**QUICK, "train.epochs": 2}))
    assert longer.run_dir == tmp_path / "run-1"
    assert load_checkpoint(tmp_path / "run")["epoch"] == 1


def test_resume_continues_exactly_the_named_run_in_its_own_directory(tmp_path: Path) -> None:
    train(synthetic_config(tmp_path, "A", **{**QUICK, "train.epochs": 2}))
    last = tmp_path / "A" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    # a config named B asked to resume A: A's run continues in A, nothing goes to B
    result = train(synthetic_config(tmp_path, "B", **{**QUICK, "train.epochs": 2}), resume=last)
    assert result.run_dir == tmp_path / "A"
    assert not (tmp_path / "B").exists()
    assert last.read_bytes() == before  # finished: nothing to add

    changed = synthetic_config(tmp_path, "B", **{**QUICK, "optim.lr": 0.5})
    with pytest.raises(RunMismatchError, match=r"optim.lr 0.05 -> 0.5.*train.epochs 2 -> 1"):
        train(changed, resume=tmp_path / "A")
    assert not (tmp_path / "B").exists() and last.read_bytes() == before


def test_place_run_leaves_foreign_directories_alone(tmp_path: Path) -> None:
    config = {"name": "run", "optim": {"lr": 0.1}}
    (tmp_path / "run").mkdir()
    assert place_run(tmp_path, "run", config) == RunPlace(tmp_path / "run", None)  # empty
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert place_run(tmp_path, "run", config).run_dir == tmp_path / "run-1"
    assert config_differences({"train": {"quiet": True}, "seed": 0}, {"seed": 1}) == ["seed"]


def test_a_run_started_before_a_config_key_existed_still_matches(tmp_path: Path) -> None:
    cfg = synthetic_config(tmp_path, **QUICK)
    train(cfg)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    del saved["optim"]["lr_scaling"], saved["train"]["checkpoint_every_steps"]  # older file
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved))
    assert place_run(tmp_path, "run", config_to_dict(cfg)).run_dir == tmp_path / "run"


# -- every rank its own random state ------------------------------------------------------


def _saved_by_two_ranks(tmp_path: Path, batch: int) -> dict:
    """A checkpoint as rank 0 of two writes it, each rank with its own states and sums."""
    ranks = []
    for rank in range(2):
        torch.manual_seed(100 + rank)
        ranks.append({"rng": capture_rng_state(), "epoch_state": {"loss_sum": float(rank)}})
    state = {"config": {}, "model": {}}
    progress = Progress(epoch=1, step=5, batch=batch, epoch_state=ranks[0]["epoch_state"])
    return load_checkpoint(save_progress(tmp_path, progress, state, ranks=ranks))


def test_each_rank_resumes_with_its_own_random_state(tmp_path: Path) -> None:
    saved = _saved_by_two_ranks(tmp_path, batch=2)
    assert saved["world_size"] == 2 and len(saved["ranks"]) == 2
    draws = []
    for rank in range(2):
        mine = for_rank(saved, rank, 2)
        assert mine["epoch_state"] == {"loss_sum": float(rank)}
        assert mine["step"] == 5 and "ranks" in mine
        torch.set_rng_state(mine["rng"]["torch"])
        draws.append(torch.rand(3))
        torch.manual_seed(100 + rank)
        assert torch.equal(draws[-1], torch.rand(3))  # where that rank's stream was
    assert not torch.equal(draws[0], draws[1])


def test_a_checkpoint_without_per_rank_states_gives_every_rank_rank_0s(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    saved = _saved_by_two_ranks(tmp_path, batch=2)
    older = {k: v for k, v in saved.items() if k not in ("ranks", "world_size")}
    mine = for_rank(older, 1, 2)
    assert torch.equal(mine["rng"]["torch"], saved["rng"]["torch"])
    assert mine["epoch_state"] == {"loss_sum": 0.0}
    assert not caplog.text  # rank 0 alone warns: one warning per job
    for_rank(older, 0, 2)
    assert "not exactly" in caplog.text
    assert for_rank(older, 0, 1) == older  # one process: as it always was


def test_another_number_of_processes_resumes_only_at_an_epoch_boundary(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mid_epoch = _saved_by_two_ranks(tmp_path, batch=2)
    with pytest.raises(CheckpointError, match=r"inside epoch 2 by 2 process.*nproc_per_node=2"):
        for_rank(mid_epoch, 0, 4)
    boundary = _saved_by_two_ranks(tmp_path, batch=0)
    for rank in range(4):
        mine = for_rank(boundary, rank, 4)
        assert mine["rng"] is None and "epoch_state" not in mine  # the loop reseeds the rank
    assert caplog.text.count("not exactly") == 1
    draws = []
    for rank in range(2):
        reseed_rank(0, 5, rank)
        draws.append(torch.rand(3))
    assert not torch.equal(draws[0], draws[1])


def test_rerunning_a_finished_run_adds_no_tensorboard_file(tmp_path: Path) -> None:
    cfg = synthetic_config(tmp_path, **{**QUICK, "train.tensorboard": True})
    train(cfg)
    run = tmp_path / "run"
    events = sorted((run / "tensorboard").iterdir())
    assert len(events) == 1 and events[0].stat().st_size > 0
    before = _snapshot(run)
    train(cfg)  # finished: nothing is logged, so no writer is opened
    assert sorted((run / "tensorboard").iterdir()) == events
    assert _snapshot(run) == before
