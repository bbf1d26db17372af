"""A DECA node between phases: state store round trips, and a restarted node resumes exactly."""

from __future__ import annotations

import pytest
import torch

from deca_flower.gossip import host_store
from deca_flower.models import load_model
from deca_flower.node import Node, PhasePlan
from deca_flower.state_store import NodeStateStore, StateStoreError


def test_state_store_round_trip_and_mismatch(tmp_path):
    model, _ = load_model("tiny-llama", seed=0)
    other, _ = load_model("tiny-llama", seed=1)
    store = NodeStateStore(tmp_path / "node")
    named = [(n, p) for n, p in model.named_parameters() if ".layers.1." in n]
    store.save_block(1, named, phase=7, extra={"stream": {"epoch": 2}})
    assert store.latest() == {"block": 1, "phase": 7, "extra": {"stream": {"epoch": 2}}}
    assert store.restore_into(other) == [1]
    restored = dict(other.named_parameters())
    for name, param in named:
        assert torch.equal(restored[name], param)
    assert not list((tmp_path / "node").glob("*.tmp"))  # written atomically
    small, _ = load_model("tiny-qwen2", seed=0)  # other architecture, other parameter names
    with pytest.raises(StateStoreError, match="state-dir"):
        store.restore_into(small)


def _plan(phase: int, block: int, port: int) -> PhasePlan:
    return PhasePlan(
        phase=phase,
        round=0,
        blocks=[block],
        steps=2,
        store_host="127.0.0.1",
        store_port=port,
        group_name=f"test/phase{phase}/{id(object())}",
        rank=0,
        world_size=1,
        neighbours=[],
        weights=[],
        self_weight=1.0,
        store_key="a1" * 32,  # encryption is on by default: the node needs the run's key
    )


def test_restarted_node_resumes_from_its_last_phase(make_config, tmp_path):
    cfg = make_config(num_clients=2)
    _store, port = host_store("127.0.0.1", 0)
    uninterrupted = Node(cfg, 0, tmp_path / "a")
    for phase in range(2):
        uninterrupted.run_phase(_plan(phase, phase, port))
    first = Node(cfg, 0, tmp_path / "b")
    first.run_phase(_plan(0, 0, port))
    del first  # the process serving the node goes away after phase 0
    resumed = Node(cfg, 0, tmp_path / "b")
    assert resumed.last_phase == 0
    resumed.run_phase(_plan(1, 1, port))
    assert resumed.peer.stream.state_dict() == uninterrupted.peer.stream.state_dict()
    mine = dict(resumed.peer.model.named_parameters())
    for name, param in uninterrupted.peer.model.named_parameters():
        assert torch.equal(mine[name], param), name


def test_failed_phase_leaves_committed_state_and_is_not_reused(make_config, tmp_path):
    from deca_flower.node import get_node

    cfg = make_config(num_clients=2)
    _store, port = host_store("127.0.0.1", 0)
    node = get_node(cfg, 0, tmp_path / "n", "run-x")
    node.run_phase(_plan(0, 0, port))
    committed = {n: p.detach().clone() for n, p in node.peer.partition.named_parameters(1)}
    bad = _plan(1, 1, port)
    bad.steps = 3
    original = node.peer.local_step
    calls = []

    def dies_on_third_step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("neighbour died")
        return original()

    node.peer.local_step = dies_on_third_step
    with pytest.raises(RuntimeError, match="neighbour died"):
        node.run_phase(bad)
    assert NodeStateStore(tmp_path / "n").latest()["phase"] == 0
    fresh = get_node(cfg, 0, tmp_path / "n", "run-x")
    assert fresh is not node  # the half-trained block in memory is discarded
    for name, param in fresh.peer.partition.named_parameters(1):
        assert torch.equal(param, committed[name])
