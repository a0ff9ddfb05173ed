"""``strsparse convert RUN --slim``: a filter-STR run written as a smaller model."""

from __future__ import annotations

from pathlib import Path

import torch

from strsparse.cli import main
from tests.test_cli import SYNTHETIC, _train


def test_convert_slim_writes_a_smaller_model_that_reloads(tmp_path: Path, capsys) -> None:
    from strsparse.export import load_slim
    from strsparse.training import restore_model

    _train(
        [
            "--config",
            "fashion_mnist_str",
            f"output_dir={tmp_path}",
            "name=filter_run",
            *SYNTHETIC,
            "train.epochs=1",
            "--quiet",
            "sparsity.options.structure=filter",
        ]
    )
    run = tmp_path / "filter_run"
    checkpoint = run / "checkpoints" / "last.pt"
    state = torch.load(checkpoint, weights_only=True)
    state["model"]["conv2.parametrizations.weight.0.m"][::2] = 0.0  # half of conv2's filters
    torch.save(state, checkpoint)

    out = tmp_path / "slim"
    assert main(["convert", str(run), "-o", str(out), "--slim"]) == 0
    assert "slim lenet5" in capsys.readouterr().out
    slim = load_slim(out)  # rebuilt from config.yaml alone, no training config
    assert slim.conv2.out_channels == 16 and slim.bn2.num_features == 16
    assert slim.fc1.in_features == 16 * 5 * 5
    model, _, _ = restore_model(run)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(slim(x), model(x), atol=1e-5, rtol=1e-5)
