"""Shared fixtures: tiny, fast configs on the embedded rotten-tomatoes data."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from deca_flower.config import load_config

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# `flwr run .` starts a local SuperLink under $FLWR_HOME and leaves it running for the next
# run. The tests get a FLWR_HOME of their own (the user's ~/.flwr stays untouched), and the
# SuperLink they started there is stopped at the end of the session.
_FLWR_HOME: Path | None = None  # set by pytest_configure


def pytest_configure(config: pytest.Config) -> None:
    # Made here, in the pytest process only: the peers that tests spawn import this module
    # too (through their test module), and inherit FLWR_HOME instead of making their own.
    global _FLWR_HOME
    _FLWR_HOME = Path(tempfile.mkdtemp(prefix="deca-tests-flwr-home-"))
    os.environ["FLWR_HOME"] = str(_FLWR_HOME)


def _process_groups_started_under(path: Path) -> set[int]:
    """Process groups of the processes whose command line names `path` (the local
    SuperLink logs and keeps its database there)."""
    groups = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(path) in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                groups.add(os.getpgid(int(proc.name)))
        except (OSError, ValueError):
            continue
    return groups - {os.getpgid(0)}


@pytest.fixture(scope="session", autouse=True)
def _stop_the_local_superlink():
    yield
    if _FLWR_HOME is None:
        return
    groups = _process_groups_started_under(_FLWR_HOME)
    for group in groups:
        try:
            os.killpg(group, signal.SIGTERM)
        except ProcessLookupError:
            pass
    # Then remove the tests' FLWR_HOME, once nothing of theirs writes there any more.
    deadline = time.monotonic() + 10
    while _process_groups_started_under(_FLWR_HOME) and time.monotonic() < deadline:
        time.sleep(0.2)
    shutil.rmtree(_FLWR_HOME, ignore_errors=True)


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
