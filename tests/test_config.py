"""Tests for strsparse.config: strict typed loading, overrides, round trips, shipped configs."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import yaml

from strsparse.config import (
    Config,
    ConfigError,
    DataConfig,
    OptimConfig,
    config_from_dict,
    config_to_dict,
    list_configs,
    load_config,
    parse_override,
    save_config,
)


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(data: dict | None = None, *, overrides: tuple[str, ...] = ()) -> str:
    """The one-line message of the ConfigError that ``data`` + ``overrides`` raise."""
    with pytest.raises(ConfigError) as info:
        if overrides:
            load_config("fashion_mnist_str", overrides)
        else:
            config_from_dict(data or {})
    message = str(info.value)
    assert "\n" not in message
    return message


# -- defaults and YAML files -----------------------------------------------------------------


def test_defaults_match_the_documented_schema() -> None:
    cfg = Config()
    assert (cfg.name, cfg.output_dir, cfg.seed, cfg.device) == ("run", "runs", 0, "auto")
    assert cfg.model.name == "lenet5" and cfg.model.num_classes is None
    assert cfg.data.name == "fashion_mnist" and cfg.data.batch_size == 128
    assert cfg.sparsity.method == "str" and cfg.sparsity.options == {}
    assert cfg.optim.name == "sgd" and cfg.optim.lr == 0.1 and cfg.optim.betas == (0.9, 0.999)
    assert cfg.optim.threshold_weight_decay is None
    assert cfg.schedule.name == "cosine" and cfg.train.amp == "off"


def test_an_empty_file_is_refused(tmp_path: Path) -> None:
    for text in ("", "# only a comment\n"):
        with pytest.raises(ConfigError, match="the config is empty"):
            load_config(_write(tmp_path, text))
    assert load_config(_write(tmp_path, "name: x\n")) == Config(name="x")


def test_empty_section_gives_its_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "train:\n  # nothing changed yet\nseed: 3\n"))
    assert cfg.train == Config().train and cfg.seed == 3


def test_load_yaml_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
name: exp1
optim:
  lr: 1          # an int where a float is expected
  weight_decay: 1e-4   # YAML 1.1 would read this as a string
  betas: [0.8, 0.99]
schedule:
  name: multistep
  milestones: [3, 6]
train:
  amp: off       # YAML 1.1 would read this as False
sparsity:
  include: conv1  # one pattern without a list
""",
    )
    cfg = load_config(path)
    assert cfg.name == "exp1"
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == pytest.approx(1e-4)
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.schedule.milestones == (3, 6)
    assert cfg.train.amp == "off"
    assert cfg.sparsity.include == ("conv1",)


def test_float_fields_accept_float_strings() -> None:
    cfg = config_from_dict({"optim": {"weight_decay": "5e-5", "lr": "0.2"}})
    assert cfg.optim.weight_decay == 5e-5 and cfg.optim.lr == 0.2


def test_programmatic_construction_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"'optim\.lr': -1\.0; must be > 0"):
        OptimConfig(lr=-1.0)
    cfg = Config()
    with pytest.raises(ConfigError, match="data.batch_size"):
        dataclasses.replace(cfg.data, batch_size=0)
    # a mapping given for a section is converted and checked like YAML
    cfg = dataclasses.replace(cfg, data={"name": "synthetic", "train_limit": 64})
    assert isinstance(cfg.data, DataConfig) and cfg.data.train_limit == 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 0.5  # type: ignore[misc]


# -- errors ----------------------------------------------------------------------------------


def test_unknown_key_names_the_full_key_and_suggests() -> None:
    message = _error({"optim": {"lrr": 0.1}})
    assert message.startswith("unknown key 'optim.lrr' (value 0.1); did you mean 'optim.lr'?")
    assert "allowed: name, lr, momentum" in message
    message = _error({"data": {"synthetic": {"shap": [1, 2]}}})
    assert "'data.synthetic.shap'" in message and "did you mean 'data.synthetic.shape'" in message
    message = _error({"zzz_unrelated": 1})
    assert "unknown key 'zzz_unrelated'" in message and "did you mean" not in message
    assert "allowed: name, output_dir, seed, device, model, data" in message


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        ({"optim": {"lr": "fast"}}, ["'optim.lr'", "'fast'", "expected float"]),
        ({"train": {"epochs": True}}, ["'train.epochs'", "True (bool)", "expected int"]),
        ({"train": {"epochs": 2.5}}, ["'train.epochs'", "2.5", "expected int"]),
        ({"optim": {"threshold_weight_decay": []}}, ["expected float or null"]),
        ({"optim": {"nesterov": "yes"}}, ["'optim.nesterov'", "expected bool"]),
        ({"sparsity": {"include": [1]}}, ["'sparsity.include[0]'", "expected str"]),
        ({"sparsity": {"options": 3}}, ["'sparsity.options'", "expected mapping"]),
        ({"optim": {"betas": 0.9}}, ["'optim.betas'", "0.9", "list [float, float]"]),
        ({"model": "lenet5"}, ["'model'", "expected mapping"]),
        ({"name": None}, ["'name'", "expected str"]),
    ],
)
def test_wrong_type_names_key_value_and_expected_type(data: dict, fragments: list[str]) -> None:
    message = _error(data)
    assert message.startswith("invalid type for")
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    ("data", "key", "closest"),
    [
        ({"data": {"name": "fashoin_mnist"}}, "data.name", "fashion_mnist"),
        ({"sparsity": {"method": "strr"}}, "sparsity.method", "str"),
        ({"optim": {"name": "adamm"}}, "optim.name", "adam"),
        ({"schedule": {"name": "cosin"}}, "schedule.name", "cosine"),
        ({"train": {"amp": "bf61"}}, "train.amp", "bf16"),
        ({"model": {"name": "resnett50"}}, "model.name", "resnet50"),
        ({"device": "cdua"}, "device", "cuda"),
    ],
)
def test_bad_name_lists_the_allowed_values(data: dict, key: str, closest: str) -> None:
    message = _error(data)
    assert f"invalid value for {key!r}" in message
    assert f"did you mean {closest!r}?" in message
    assert "allowed:" in message and closest in message.split("allowed:")[1]


def test_sparsity_method_dense_and_all_registered_methods_are_accepted() -> None:
    from strsparse import list_methods

    for method in [*list_methods(), "dense"]:
        assert config_from_dict({"sparsity": {"method": method}}).sparsity.method == method


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"optim": {"lr": 0}}, "'optim.lr': 0.0; must be > 0"),
        ({"optim": {"momentum": 1.0}}, "'optim.momentum': 1.0; must be < 1"),
        ({"optim": {"betas": [0.9]}}, "'optim.betas': [0.9]; expected list [float, float]"),
        ({"optim": {"weight_decay": -1e-5}}, "'optim.weight_decay'"),
        ({"optim": {"lr": float("inf")}}, "must be finite"),
        ({"train": {"epochs": 0}}, "'train.epochs': 0; must be >= 1"),
        ({"train": {"label_smoothing": 1.0}}, "'train.label_smoothing'"),
        ({"data": {"batch_size": 0}}, "'data.batch_size'"),
        ({"data": {"train_limit": 0}}, "'data.train_limit'"),
        ({"data": {"num_workers": -1}}, "'data.num_workers'"),
        ({"data": {"synthetic": {"shape": [1, 0, 28]}}}, "'data.synthetic.shape'"),
        ({"schedule": {"milestones": [6, 3]}}, "strictly increasing"),
        ({"schedule": {"name": "multistep"}}, "schedule.milestones=[30,60,90]"),
        ({"schedule": {"min_lr": 1.0}}, "'schedule.min_lr'"),
        ({"optim": {"name": "adam", "nesterov": True}}, "'optim.nesterov'"),
        ({"seed": -1}, "'seed'"),
        ({"name": "a/b"}, "'name'"),
        ({"model": {"kwargs": {"x": object()}}}, "'model.kwargs.x'"),
    ],
)
def test_range_checks(data: dict, fragment: str) -> None:
    assert fragment in _error(data)


def test_yaml_problems_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"duplicate key 'lr' at line 3"):
        load_config(_write(tmp_path, "optim:\n  lr: 0.1\n  lr: 0.2\n"))
    with pytest.raises(ConfigError, match=r"invalid YAML at line"):
        load_config(_write(tmp_path, "optim: [unclosed\n"))
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))


def test_unknown_config_name_suggests_a_shipped_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'fashion_mnist_str'\?"):
        load_config("fashion_mnist_strr")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a directory, not a config file"):
        load_config(tmp_path)
    with pytest.raises(ConfigError) as info:  # the closest name, not a wall of all of them
        load_config("fashion_mnist_strr")
    assert "imagenet_resnet50" not in str(info.value)


# -- overrides -------------------------------------------------------------------------------


def test_overrides_are_parsed_as_yaml_and_type_checked() -> None:
    cfg = load_config(
        "fashion_mnist_str",
        [
            "optim.lr=0.05",
            "train.epochs=2",
            "sparsity.options.init_threshold=-3200",  # negative numbers work
            "sparsity.options.new_option=1.5e-3",  # free-form mappings take new keys
            "sparsity.include=[conv1,fc1]",
            "optim.threshold_weight_decay=null",
            "optim.weight_decay=-0.0",
            "model.kwargs={batch_norm: false}",
            "name=2024",  # a string field keeps the text
            "data.root=",  # empty means null, as in YAML
        ],
    )
    assert cfg.optim.lr == 0.05 and cfg.train.epochs == 2
    assert cfg.sparsity.options["init_threshold"] == -3200
    assert cfg.sparsity.options["new_option"] == pytest.approx(1.5e-3)
    assert cfg.sparsity.options["granularity"] == "layer"  # the file's other options stay
    assert cfg.sparsity.include == ("conv1", "fc1")
    assert cfg.optim.threshold_weight_decay is None
    assert cfg.model.kwargs == {"batch_norm": False}
    assert cfg.name == "2024" and cfg.data.root is None


def test_negative_number_overrides() -> None:
    cfg = load_config("fashion_mnist_str", ["sparsity.options.init_threshold=-4.5", "seed=0"])
    assert cfg.sparsity.options["init_threshold"] == -4.5
    assert "'seed': -3; must be >= 0" in _error(overrides=("seed=-3",))


@pytest.mark.parametrize("bad", ["optim.lr", "=0.1", "optim..lr=1", "optim.lr 0.1", "1x=2"])
def test_malformed_override_shows_the_expected_form(bad: str) -> None:
    message = _error(overrides=(bad,))
    assert f"invalid override {bad!r}" in message and "dotted.key=value" in message


def test_override_errors_name_the_key() -> None:
    message = _error(overrides=("optim.lrr=0.1",))
    assert "unknown key 'optim.lrr' (value 0.1); did you mean 'optim.lr'?" in message
    assert "'train.epochs'" in _error(overrides=("train.epochs=two",))
    assert "'optim.lr' is 0.1, not a section" in _error(overrides=("optim.lr.x=1",))


def test_parse_override() -> None:
    assert parse_override("a.b=[1, -2]") == (["a", "b"], [1, -2])
    assert parse_override("train.amp=off") == (["train", "amp"], "off")
    assert parse_override("x=a=b") == (["x"], "a=b")  # only the first '=' splits


# -- round trip ------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    cfg = load_config(
        "fashion_mnist_str",
        [
            "sparsity.include=[conv*,fc1]",
            "sparsity.options.init_threshold=-3200",
            "optim.weight_decay=3.0517578125e-05",
            "model.kwargs={batch_norm: false, note: '1e-3'}",
            "name=yes",
            "data.synthetic.shape=[3,8,8]",
            "schedule.milestones=[2,4]",
        ],
    )
    path = save_config(cfg, tmp_path / "sub" / "config.yaml")
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    again = load_config(path)
    assert again == cfg
    assert again.model.kwargs["note"] == "1e-3"  # a float-looking string stays a string
    assert config_from_dict(config_to_dict(cfg)) == cfg
    plain = yaml.safe_load(path.read_text())  # plain YAML for any reader
    assert plain["optim"]["weight_decay"] == 3.0517578125e-05
    assert plain["sparsity"]["include"] == ["conv*", "fc1"]


def test_save_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("old")
    save_config(Config(), path)
    assert load_config(path) == Config()
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


# -- shipped configs -------------------------------------------------------------------------


def test_list_configs_lists_the_shipped_files() -> None:
    names = list_configs()
    expected = {f"fashion_mnist_{m}" for m in ("str", "st3", "gmp", "dnw", "dense")}
    expected |= {"imagenet_resnet50_dense", "imagenet_mobilenet_v1_dense"}
    assert expected <= set(names)
    assert names == sorted(names)
    assert sum(n.startswith("imagenet_resnet50_str_") for n in names) == 16
    assert sum(n.startswith("imagenet_mobilenet_v1_str_") for n in names) == 5


@pytest.mark.parametrize("name", list_configs())
def test_every_shipped_config_loads_and_round_trips(name: str, tmp_path: Path) -> None:
    cfg = load_config(name)
    assert cfg.name == name  # the run directory is named after the config
    assert load_config(save_config(cfg, tmp_path / "c.yaml")) == cfg
    if cfg.sparsity.method != "dense":
        import strsparse

        assert cfg.sparsity.method in strsparse.list_methods()


def test_fashion_mnist_sparse_configs_target_ninety_percent() -> None:
    for method in ("st3", "gmp", "dnw"):
        cfg = load_config(f"fashion_mnist_{method}")
        assert cfg.sparsity.method == method and cfg.sparsity.options["sparsity"] == 0.9
        assert cfg.data.name == "fashion_mnist" and cfg.model.name == "lenet5"
    assert load_config("fashion_mnist_dense").sparsity.method == "dense"
    filters = load_config("fashion_mnist_str_filters").sparsity.options
    assert filters["structure"] == "filter" and filters["sparsity"] == 0.5


# Appendix Tables 10 (ResNet-50) and 11 (MobileNetV1): target -> (weight decay λ, s_init)
TABLE_10 = {
    "79.55": (1.7e-05, -3200),
    "81.27": (1.751757813e-05, -3200),
    "87.70": (2.051757813e-05, -3200),
    "90.23": (2.251757813e-05, -3200),
    "90.55": (2.051757813e-05, -800),
    "94.80": (3.051757813e-05, -3200),
    "95.03": (3.351757813e-05, -12800),
    "95.15": (3.051757813e-05, -1600),
    "96.11": (3.051757813e-05, -100),
    "96.53": (4.051757813e-05, -12800),
    "97.78": (5.217578125e-05, -12800),
    "98.05": (5.651757813e-05, -12800),
    "98.22": (6.051757813e-05, -12800),
    "98.79": (7.551757813e-05, -12800),
    "98.98": (8.551757813e-05, -12800),
    "99.10": (9.051757813e-05, -12800),
}
TABLE_11 = {
    "75.28": (1.551757813e-05, -100),
    "79.07": (1.551757813e-05, -25),
    "85.80": (3.051757813e-05, -3200),
    "89.01": (3.751757813e-05, -12800),
    "89.62": (3.751757813e-05, -3200),
}


@pytest.mark.parametrize(
    ("model", "target", "decay", "s_init"),
    [("resnet50", t, wd, s) for t, (wd, s) in TABLE_10.items()]
    + [("mobilenet_v1", t, wd, s) for t, (wd, s) in TABLE_11.items()],
)
def test_imagenet_str_configs_follow_the_paper(
    model: str, target: str, decay: float, s_init: int
) -> None:
    cfg = load_config(f"imagenet_{model}_str_{target}")
    assert cfg.model.name == model and cfg.sparsity.method == "str"
    assert cfg.optim.weight_decay == pytest.approx(decay, rel=1e-9)
    assert cfg.sparsity.options["init_threshold"] == s_init
    assert cfg.sparsity.options["granularity"] == "layer"
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum) == ("sgd", 0.256, 0.875)
    assert cfg.optim.nesterov is False and cfg.optim.threshold_weight_decay is None
    assert (cfg.schedule.name, cfg.schedule.warmup_epochs) == ("cosine", 5.0)
    assert cfg.train.epochs == 100 and cfg.train.label_smoothing == 0.1
    assert cfg.data.batch_size == 256 and cfg.data.name == "imagefolder"
    assert cfg.data.root is None  # must be given: data.root=/path/to/imagenet
    assert cfg.train.amp == "bf16" and cfg.train.channels_last is True


def test_imagenet_root_override() -> None:
    cfg = load_config("imagenet_resnet50_str_90.23", ["data.root=/data/imagenet"])
    assert cfg.data.root == "/data/imagenet"


def test_every_optimizer_and_schedule_a_config_accepts_is_implemented() -> None:
    from strsparse import config
    from strsparse.training.optim import build_optimizer
    from strsparse.training.schedules import learning_rate

    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "weight_decay": 0.0}]
    for name in config.OPTIMIZERS:
        assert isinstance(build_optimizer(groups, name, lr=0.1), torch.optim.Optimizer)
    for name in config.SCHEDULES:
        lr = learning_rate(0, base_lr=0.1, total_steps=10, steps_per_epoch=5, name=name)
        assert 0 < lr <= 0.1


def test_error_messages_are_one_line() -> None:
    for data in ({"optim": {"lrr": 1}}, {"data": {"name": "x"}}, {"optim": {"lr": "x"}}):
        assert re.fullmatch(r"[^\n]+", _error(data))


# Appendix Table 12 (low-rank FastGRNN with STR): dataset -> λ of each shipped config
TABLE_12 = {
    "har2_fastgrnn_str_rank": 0.001,
    "google12_fastgrnn_str_rank_0.001": 0.001,
    "google12_fastgrnn_str_rank_0.002": 0.002,
    "google12_fastgrnn_str_rank_0.005": 0.005,
}


@pytest.mark.parametrize(("name", "lam"), sorted(TABLE_12.items()))
def test_fastgrnn_configs_carry_table_12(name: str, lam: float) -> None:
    from strsparse.training.build import build_model

    cfg = load_config(name)
    assert cfg.optim.weight_decay == lam and cfg.sparsity.options["structure"] == "rank"
    assert cfg.sparsity.options["g"] == "exp" and cfg.sparsity.options["init_threshold"] <= -10
    model, handle, info = build_model(cfg)  # no data needed to build the model
    assert set(handle.layers) == {"w.weight2", "u.weight2"}
    assert info.input_shape == ((128, 9) if name.startswith("har2") else (99, 32))
    assert model.ranks() == ((9, 80) if name.startswith("har2") else (32, 100))
