"""Flower run config (`[tool.flwr.app.config]`, `--run-config`) -> validated DECA config.

Run-config values can only be bool/int/float/str, so the common knobs are
flat keys mapped onto config paths, and `overrides` takes any other key as
"a.b=value c.d=value". A knob set to "" leaves the value to the presets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig

from deca_flower.config import ConfigError, load_config

PRESET_KEYS = {
    "preset-model": "model",
    "preset-data": "data",
    "preset-topology": "topology",
    "preset-algorithm": "algorithm",
}
KNOBS = {
    "run-name": "run_name",
    "output-dir": "output_dir",
    "seed": "seed",
    "num-clients": "num_clients",
    "rounds": "train.rounds",
    "steps-per-block": "train.steps_per_block",
    "layers-per-block": "train.layers_per_block",
    "lr": "algorithm.lr",
    "mu1": "algorithm.mu1",
    "mu2": "algorithm.mu2",
    "alpha": "data.alpha",
    "topology-p": "topology.p",
    "partitioner": "data.partitioner",
    "partition-by": "data.partition_by",
    "tracking": "tracking",
    "verbose": "verbose",
    "resume": "resume",
}
FREE_FORM = "overrides"


def config_from_run_config(run_config: Mapping[str, Any]) -> DictConfig:
    unknown = set(run_config) - set(PRESET_KEYS) - set(KNOBS) - {FREE_FORM}
    if unknown:
        raise ConfigError(
            f"unknown run-config key(s) {sorted(unknown)}; known: "
            f"{sorted([*PRESET_KEYS, *KNOBS, FREE_FORM])}"
        )
    presets = {
        group: str(run_config[key])
        for key, group in PRESET_KEYS.items()
        if run_config.get(key, "") != ""
    }
    overrides = [
        f"{path}={_value(run_config[key])}"
        for key, path in KNOBS.items()
        if run_config.get(key, "") != ""
    ]
    overrides += str(run_config.get(FREE_FORM, "")).split()
    return load_config(presets, overrides)


def _value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
