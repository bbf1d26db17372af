"""Config loading: presets, overrides, validation errors that name the setting."""

from __future__ import annotations

import pytest

from deca_flower.config import PRESET_GROUPS, ConfigError, available_presets, load_config
from deca_flower.flower_config import config_from_run_config


@pytest.mark.parametrize("group", PRESET_GROUPS)
def test_every_preset_loads(group):
    names = available_presets(group)
    assert names
    for name in names:
        cfg = load_config({group: name})
        assert cfg.num_clients >= 2


def test_defaults_are_the_embedded_job():
    cfg = load_config()
    assert cfg.model.name == "embedded:smollm2-135m-instruct"
    assert cfg.data.name == "rotten-tomatoes"
    assert cfg.topology.name == "er"
    assert cfg.num_clients == 8
    assert cfg.algorithm.bma and (cfg.algorithm.mu1, cfg.algorithm.mu2) == (0.3, 0.333)
    assert cfg.gossip.encryption == "aes-256-gcm"  # fail closed: plaintext only if asked


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"overrides": ["train.rounz=2"]}, "train.rounz"),
        ({"overrides": ["topology.name=moebius"]}, "topology.name"),
        ({"overrides": ["algorithm.discrepancy_scale=huge"]}, "algorithm.discrepancy_scale"),
        ({"overrides": ["algorithm.lr=-1"]}, "algorithm.lr"),
        ({"overrides": ["algorithm.bias_correction=approx"]}, "algorithm.bias_correction"),
        ({"overrides": ["algorithm.mu1=1.5"]}, "algorithm.mu1"),
        ({"overrides": ["num_clients=1"]}, "num_clients"),
        ({"overrides": ["train.rounds=two"]}, "train.rounds"),
        ({"presets": {"model": "gpt-17"}}, "unknown model preset"),
        ({"overrides": ["topology.name=file"]}, "topology.path"),
        ({"overrides": ["gossip.encryption=rot13"]}, "gossip.encryption"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(**kwargs)


def test_algorithm_presets_set_the_ablations():
    assert not load_config({"algorithm": "no-bma"}).algorithm.bma
    trivial = load_config({"algorithm": "trivial-bma"}).algorithm
    assert trivial.bma and trivial.mu1 == 0.0 and trivial.mu2 == 0.0


def test_flower_run_config_maps_knobs_and_overrides():
    cfg = config_from_run_config(
        {
            "preset-model": "tiny",
            "preset-topology": "ring",
            "num-clients": 3,
            "rounds": 2,
            "lr": "",
            "overrides": "eval.batch_size=5 gossip.timeout_s=30",
        }
    )
    assert cfg.model.name == "tiny-llama" and cfg.topology.name == "ring"
    assert cfg.num_clients == 3 and cfg.train.rounds == 2
    assert cfg.algorithm.lr == load_config({"model": "tiny"}).algorithm.lr  # "" = preset's
    assert cfg.eval.batch_size == 5 and cfg.gossip.timeout_s == 30
    with pytest.raises(ConfigError, match="unknown run-config key"):
        config_from_run_config({"learning-rate": 1.0})
    with pytest.raises(ConfigError, match="unknown model preset"):
        config_from_run_config({"preset-model": "nope"})
