"""Two-process data-parallel training on CPU (gloo) through torchrun."""

from __future__ import annotations

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

    loop.train(synthetic_config(Path(sys.argv[1]), "ddp"))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_identical_replicas(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
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
        str(Path(__file__).parents[2]),  # the repository root, for tests.training.runs
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]

    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for key in rank0:  # weights, STR thresholds, BatchNorm statistics: all identical
        assert torch.equal(rank0[key], rank1[key]), key

    run = tmp_path / "ddp"
    state = load_checkpoint(run)  # written by rank 0 only
    assert state["epoch"] == 2
    # each rank trains on half the data: half the steps of a single process
    assert state["step"] == 2 * 4
    for key in rank0:
        assert torch.equal(state["model"][key], rank0[key]), key
    assert (run / "summary.json").is_file() and (run / "metrics.csv").is_file()
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
