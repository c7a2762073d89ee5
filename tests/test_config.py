from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trgl_pipe.config import Config, load_config
from trgl_pipe.errors import ConfigError


def test_defaults_are_valid() -> None:
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.train.regime == "parallel" and cfg.model.num_modules == 4


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\noptim:\n  lr: 1e-3\nmodel:\n  split: [2, 4, 6]\n")
    cfg = load_config(path, ["train.epochs=5", "trgl.enabled=false", "log.live=off"])
    assert cfg.train.epochs == 5
    assert cfg.optim.lr == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as a string; accepted as a number
    assert cfg.model.split == [2, 4, 6]
    assert cfg.trgl.enabled is False
    assert cfg.log.live == "off"  # YAML reads off as false; mapped back to the allowed word


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.foo=1"], "unknown config key 'train.foo'; the keys of train are: regime"),
        (["bogus=1"], "unknown config key 'bogus'"),
        (["train.epochs=abc"], "train.epochs must be an integer, got 'abc' (str)"),
        (["train.regime=fast"], "train.regime must be one of e2e | parallel | sequential | multilap"),
        (
            ["model.num_modules=10"],
            "model.num_modules=10 is larger than the 9 residual blocks of a ResNet-20",
        ),
        (["model.depth=21"], "model.depth must be 6n+2"),
        (["model.split=[3, 6]"], "model.split lists 2 block indices; with model.num_modules=4 it needs 3"),
        (["model.split=[3, 3, 6]"], "must be strictly increasing"),
        (["trgl.tau=0"], "trgl.tau must be greater than 0"),
        (["train.regime=multilap", "train.epochs=5", "train.laps=2"], "must be a multiple of train.laps=2"),
        (["train.laps=2"], "train.laps=2 applies to train.regime=multilap only"),
        (["train.regime=sequential", "pipeline.transport=sim"], "runs the parallel regime only"),
        (["data=3"], "data must be a mapping of keys"),
        (["train.epochs"], "must look like section.key=value"),
        (  # the range error of an int, not "must be an integer or null, got <an integer>"
            ["data.train_size=100000000000000000000000"],
            "data.train_size=100000000000000000000000 is too large for a 64-bit integer",
        ),
        (
            ["pipeline.replicas=2", "data.batch_size=1"],
            "data.batch_size=1 is smaller than pipeline.replicas=2: each replica trains on a shard",
        ),
    ],
)
def test_bad_input_names_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_bad_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_a_key_given_twice_in_a_yaml_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  epochs: 3\n  regime: parallel\n  epochs: 5\n")
    with pytest.raises(ConfigError, match=r"gives key 'epochs' twice in one section \(line 4\); keep one"):
        load_config(path)
    path.write_text("train:\n  epochs: 3\noptim:\n  epochs: 3\n")  # the same name in two sections is fine
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.epochs'"):
        load_config(path)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    from trgl_pipe.config import save_config

    cfg = load_config(None, ["train.epochs=7", "model.split=[1,5,8]", "trgl.tau_schedule=halves"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["epochs"] == 7


IMAGE_SIZES = {"fashion_mnist": 28, "mnist": 28, "cifar10": 32, "cifar100": 32, "stl10": 96}
IMAGE_SIZES["tiny_imagenet"] = 64


def test_shipped_configs_are_valid_and_build_their_network() -> None:
    from trgl_pipe.context import resolve_partition
    from trgl_pipe.stage import build_parts

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
    assert len(configs) >= 16, configs
    for path in configs:
        cfg = load_config(path)
        size = IMAGE_SIZES[cfg.data.name]
        channels = 1 if size == 28 else 3
        parts = build_parts(cfg, (channels, size, size), 10)  # meta shapes: the windows and pools fit
        if cfg.model.split != "balanced":
            partition = resolve_partition(cfg, parts, None, 10, None)
            assert len(partition) == cfg.num_modules, path
