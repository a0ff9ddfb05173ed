"""Small, seconds-long training configurations shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from strsparse.config import Config, config_from_dict
from strsparse.training import loop


def synthetic_config(tmp_path: Path, name: str = "run", **changes: object) -> Config:
    """A seconds-long STR run of LeNet-5 on the synthetic dataset (8 steps per epoch);
    ``changes`` are dotted keys: ``synthetic_config(tmp_path, **{"train.epochs": 1})``."""
    data = {
        "name": name,
        "output_dir": str(tmp_path),
        "device": "cpu",
        "seed": 0,
        "model": {"name": "lenet5"},
        "data": {
            "name": "synthetic",
            "batch_size": 32,
            "eval_batch_size": 128,
            "synthetic": {"num_train": 256, "num_val": 128, "num_classes": 10},
        },
        "sparsity": {"method": "str", "options": {"init_threshold": -6.0}},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "cosine"},
        "train": {"epochs": 2, "quiet": True},
    }
    for key, value in changes.items():
        *sections, leaf = key.split(".")
        node = data
        for section in sections:
            node = node[section]
        node[leaf] = value
    return config_from_dict(data)


def nan_at_step(monkeypatch: pytest.MonkeyPatch, step: int, last: Path) -> dict[str, bytes]:
    """Make the model built by the training loop output NaN at its ``step``-th training
    forward (counted across epochs, from 1). The returned dict then holds, under
    ``"bytes"``, what ``last`` (the run's ``last.pt``) held at that moment."""
    original = loop.build_model
    kept: dict[str, bytes] = {}

    def build_with_nan(cfg, info=None, *, loading_weights=False):
        model, handle, info = original(cfg, info, loading_weights=loading_weights)
        calls = {"n": 0}

        def hook(module, inputs, output):
            if not module.training:
                return None
            calls["n"] += 1
            if calls["n"] == step:
                kept["bytes"] = last.read_bytes()
                return output * float("nan")
            return None

        model.register_forward_hook(hook)
        return model, handle, info

    monkeypatch.setattr(loop, "build_model", build_with_nan)
    return kept
