"""Shared fixtures: tiny, fast configs on the embedded rotten-tomatoes data."""

from __future__ import annotations

import os

import pytest

from deca_flower.config import load_config

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_config(tmp_path, **overrides):
    base = {
        "num_clients": 4,
        "output_dir": str(tmp_path / "outputs"),
        "train.steps_per_block": 2,
        "data.max_examples": 240,
        "data.max_length": 192,
        "eval.max_examples_per_client": 4,
        "eval.zero_shot": False,
    }
    base.update(overrides)
    presets = {"model": "tiny", "topology": base.pop("topology", "ring")}
    if "algorithm" in base:
        presets["algorithm"] = base.pop("algorithm")
    return load_config(presets, base)


@pytest.fixture
def make_config(tmp_path):
    def _make(**overrides):
        return tiny_config(tmp_path, **overrides)

    return _make


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Tiny models on 2 cores: thread start-up costs more than it saves.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
