"""Two-process data-parallel training on CPU (gloo) through torchrun: identical replicas, and
interrupted runs that resume exactly (every rank with its own random states)."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from strsparse.training import load_checkpoint

WORKER = textwrap.dedent(
    """
    import json
    import sys

    import torch

    from strsparse.training import loop

    sys.path.insert(0, sys.argv[2])
    from tests.training.runs import synthetic_config

    finish = loop._finish

    def finish_and_dump(run, *args):
        # each rank's final state, to compare across ranks
        torch.save(run.model.state_dict(), f"{sys.argv[1]}/rank{run.env.rank}.pt")
        return finish(run, *args)

    loop._finish = finish_and_dump
    from pathlib import Path

    changes = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    loop.train(synthetic_config(Path(sys.argv[1]), "ddp", **changes))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, worker: str, *args: str) -> None:
    """Run ``worker`` (a script) on two gloo processes; its arguments: ``tmp_path``, the
    repository root (for ``tests.training.runs``), then ``args``."""
    script = tmp_path / "worker.py"
    script.write_text(worker)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(script),
        str(tmp_path),
        str(Path(__file__).parents[2]),
        *args,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-8000:]


# a target for structured STR: every rank's controller must prune the same filters
FILTERS = {
    "sparsity.options": {"sparsity": 0.5, "structure": "filter", "init_threshold": -1.0},
    "data.synthetic": {"num_train": 1024, "num_val": 128, "num_classes": 10},
}


# ... and a FLOPs target for it: every rank counts the same slim FLOPs
FILTER_FLOPS = {
    **FILTERS,
    "sparsity.options": {"flops": 0.5, "structure": "filter", "init_threshold": -1.0},
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "changes",
    [{}, FILTERS, FILTER_FLOPS],
    ids=["str", "str-filter-target", "str-filter-flops-target"],
)
def test_two_processes_train_identical_replicas(tmp_path: Path, changes: dict) -> None:
    _torchrun(tmp_path, WORKER, json.dumps(changes))

    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for key in rank0:  # weights, STR thresholds, BatchNorm statistics: all identical
        assert torch.equal(rank0[key], rank1[key]), key

    run = tmp_path / "ddp"
    state = load_checkpoint(run)  # written by rank 0 only
    assert state["epoch"] == 2
    # each rank trains on half the data: half the steps of a single process
    assert state["step"] == 2 * (4 if not changes else 16)
    for key in rank0:
        assert torch.equal(state["model"][key], rank0[key]), key
    assert (run / "summary.json").is_file() and (run / "metrics.csv").is_file()
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    if changes:  # the controllers pruned filters (the same ones: the replicas are equal)
        summary = json.loads((run / "summary.json").read_text())
        if changes is FILTERS:
            assert summary["target"]["kind"] == "filters"
            assert 0.2 < summary["target"]["achieved"] <= 0.5
        else:  # the slim model's share of the dense FLOPs
            assert summary["target"]["kind"] == "flops"
            assert 0.5 <= summary["target"]["achieved"] < 0.9


# Runs one after another in the same two processes (one process group): each argument is
# NAME:ACTION, ACTION one of none, fail@N (every rank stops dead in its N-th training
# forward, as if killed) and sigterm@N@R (rank R alone is sent SIGTERM in its N-th training
# forward). Dropout after conv1 makes every rank draw its own random numbers each step.
RUNS = textwrap.dedent(
    """
    import signal
    import sys
    from pathlib import Path

    import torch.distributed as dist
    from torch import nn

    from strsparse.training import loop

    sys.path.insert(0, sys.argv[2])
    from tests.training.runs import synthetic_config

    out = Path(sys.argv[1])
    build_model = loop.build_model


    class Killed(Exception):
        pass


    def builder(action, rank):
        kind, *where = action.split("@")

        def build(cfg, info=None, *, loading_weights=False):
            model, handle, info = build_model(cfg, info, loading_weights=loading_weights)
            model.conv1.register_forward_hook(
                lambda m, i, output: nn.functional.dropout(output, 0.3, m.training)
            )
            calls = {"n": 0}

            def hook(module, inputs, output):
                calls["n"] += module.training
                if kind != "none" and calls["n"] == int(where[0]) and module.training:
                    if kind == "fail":
                        raise Killed
                    if int(where[1]) == rank:
                        signal.raise_signal(signal.SIGTERM)

            model.register_forward_hook(hook)
            return model, handle, info

        return build


    dist.init_process_group("gloo")  # kept for all the runs
    rank = dist.get_rank()
    for run in sys.argv[3:]:
        name, action = run.split(":")
        loop.build_model = builder(action, rank)
        every = {"train.checkpoint_every_steps": 3} if action.startswith("fail") else {}
        cfg = synthetic_config(out, name, **{"train.tensorboard": False}, **every)
        try:
            loop.train(cfg)
            outcome = "finished"
        except Killed:
            outcome = "killed"
        except KeyboardInterrupt:
            outcome = "interrupted"
        with open(out / f"outcomes{rank}.txt", "a") as f:
            f.write(f"{name} {outcome}\\n")
    dist.destroy_process_group()
    """
)


def _outcomes(tmp_path: Path, rank: int) -> list[str]:
    return (tmp_path / f"outcomes{rank}.txt").read_text().splitlines()


def _assert_same_run(a: Path, b: Path) -> None:
    """The same weights and thresholds (the models' states) and the same metrics, bit for
    bit."""
    state_a, state_b = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key

    def rows(run: Path) -> list[dict[str, str]]:
        return [
            {k: v for k, v in row.items() if k != "time"}
            for row in csv.DictReader((run / "metrics.csv").open())
        ]

    assert rows(a) == rows(b)


@pytest.mark.slow
def test_a_two_process_run_resumes_exactly_mid_epoch(tmp_path: Path) -> None:
    # 2 epochs x 4 steps per rank; checkpoints at steps 3 and 6, killed in step 7
    _torchrun(tmp_path, RUNS, "full:none", "cut:fail@7", "cut:none")
    assert (
        _outcomes(tmp_path, 0)
        == _outcomes(tmp_path, 1)
        == [
            "full finished",
            "cut killed",
            "cut finished",
        ]
    )
    assert load_checkpoint(tmp_path / "cut")["step"] == 8
    _assert_same_run(tmp_path / "full", tmp_path / "cut")


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_all_at_one_step_and_resumes_exactly(tmp_path: Path) -> None:
    # rank 1 alone is signalled in step 3 of 4 of epoch 1: both ranks finish that step, agree
    # to stop, rank 0 writes last.pt with both ranks' states, and both leave cleanly
    _torchrun(tmp_path, RUNS, "full:none", "term:sigterm@3@1", "term:none")
    expected = ["full finished", "term interrupted", "term finished"]
    assert _outcomes(tmp_path, 0) == _outcomes(tmp_path, 1) == expected
    log = (tmp_path / "term" / "train.log").read_text()
    assert "interrupted: saved" in log and "epoch 1, step 3" in log
    _assert_same_run(tmp_path / "full", tmp_path / "term")


def test_all_reduce_sum_returns_once_the_backend_lets_go_of_its_tensor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # gloo's work object releases the tensor on its own thread after the call returns; a
    # release that fell in interpreter shutdown aborted the process
    import threading
    import time

    import torch.distributed as dist

    from strsparse.training import distributed

    backend_holds = threading.Event()
    released = threading.Event()

    def all_reduce(t: torch.Tensor) -> None:
        backend_holds.set()

        def let_go() -> None:
            time.sleep(0.05)
            backend_holds.clear()
            released.set()

        threading.Thread(target=let_go).start()

    def use_count(t: torch.Tensor) -> int:  # one more reference while the backend holds it
        return 2 if backend_holds.is_set() else 1

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.Tensor, "_use_count", use_count)
    assert distributed.all_reduce_sum([1.0, 2.0], torch.device("cpu")) == [1.0, 2.0]
    assert released.is_set()
