"""In-process engine: invariants 3-6, 11, 12 on a tiny Llama, and a learning test."""

from __future__ import annotations

import copy

import numpy as np
import torch

from deca_flower.config import load_config
from deca_flower.engine import Engine, mix_blocks
from deca_flower.reporting import read_metrics
from deca_flower.topology import neighbours


def _flat_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_mixing_preserves_average_and_matches_numpy():  # invariant 5
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randn(5, 1000, generator=gen)
    w = np.zeros((5, 5))
    for i in range(5):
        for j in ((i - 1) % 5, (i + 1) % 5):
            w[i, j] = 1 / 3
        w[i, i] = 1 / 3
    mixed = mix_blocks(torch.tensor(w), blocks, torch.float32)
    expected = w @ blocks.double().numpy()
    np.testing.assert_allclose(mixed.double().numpy(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed.mean(0), blocks.mean(0), rtol=0, atol=1e-6)
    # a bf16 wire rounds the neighbours' blocks only
    mixed_bf16 = mix_blocks(torch.tensor(w), blocks, torch.bfloat16)
    received = blocks.bfloat16().double().numpy()
    expected_bf16 = (w - np.diag(np.diag(w))) @ received + np.diag(w)[:, None] * blocks.numpy()
    np.testing.assert_allclose(mixed_bf16.double().numpy(), expected_bf16, rtol=1e-5, atol=1e-6)


def test_schedule_bytes_and_outputs(make_config):  # invariants 11, 12
    cfg = make_config(**{"train.rounds": 2, "train.block_order": "random"})
    engine = Engine(cfg)
    result = engine.run()
    records = result.records
    steps = [r for r in records if r["type"] == "step"]
    num_blocks, s = engine.num_blocks, cfg.train.steps_per_block
    assert len(steps) == cfg.train.rounds * num_blocks * s
    for t in range(cfg.train.rounds):
        in_round = [r for r in steps if r["round"] == t]
        visited = [in_round[i]["block"] for i in range(0, len(in_round), s)]
        assert sorted(visited) == list(range(num_blocks))  # each block once per round
        for i in range(0, len(in_round), s):  # S consecutive steps, r = 0..S-1
            assert [r["block"] for r in in_round[i : i + s]] == [visited[i // s]] * s
            assert [r["step"] for r in in_round[i : i + s]] == list(range(s))
    phases = [r for r in records if r["type"] == "phase"]
    for phase in phases:
        numel = engine.peers[0].partition.numel(phase["block"])
        for i, sent in enumerate(phase["bytes_sent"]):
            assert sent == numel * 4 * len(neighbours(engine.graph, i)) * s
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.md",
        "loss.png",
        "accuracy.png",
        "label_distribution.png",
        "consensus.png",
        "confusion.png",
    ):
        assert (result.out_dir / name).stat().st_size > 0, name
    assert not result.out_dir.name.endswith(".incomplete")


def test_only_the_active_block_changes(make_config):  # invariant 6
    engine = Engine(make_config(**{"eval.average_model": False}))
    k = 1
    before = [_flat_params(p.model) for p in engine.peers]
    engine._run_block(0, k, 0)
    active = {n for n, _ in engine.peers[0].partition.named_parameters(k)}
    for peer, old in zip(engine.peers, before):
        for name, param in peer.model.named_parameters():
            if name in active:
                assert not torch.equal(param, old[name]), name
            else:
                assert torch.equal(param, old[name]), name
        assert all(not p.requires_grad and p.grad is None for p in peer.model.parameters())


def test_complete_graph_keeps_active_blocks_identical(make_config):  # invariant 3
    engine = Engine(make_config(topology="complete", **{"topology.mixing": "uniform"}))
    engine._run_block(0, 0, 0)
    blocks = [
        torch.cat([p.reshape(-1) for p in peer.partition.parameters(0)]) for peer in engine.peers
    ]
    for b in blocks[1:]:
        torch.testing.assert_close(b, blocks[0], rtol=0, atol=1e-7)


def test_identical_data_keeps_clients_identical(make_config):  # invariant 4
    engine = Engine(make_config())
    for peer in engine.peers[1:]:
        peer.stream = copy.deepcopy(engine.peers[0].stream)
    for k in range(engine.num_blocks):
        engine._run_block(0, k, 0)
    ref = _flat_params(engine.peers[0].model)
    for peer in engine.peers[1:]:
        for name, param in peer.model.named_parameters():
            torch.testing.assert_close(param, ref[name], rtol=0, atol=1e-6)


def test_frozen_parts_are_shared_and_layers_are_not(make_config):
    engine = Engine(make_config())
    a, b = engine.peers[0].model, engine.peers[1].model
    assert a.get_input_embeddings().weight is b.get_input_embeddings().weight
    layer_a = engine.peers[0].partition.parameters(0)[0]
    layer_b = engine.peers[1].partition.parameters(0)[0]
    assert layer_a is not layer_b and layer_a.data_ptr() != layer_b.data_ptr()


def test_deca_learns_the_embedded_non_iid_task(tmp_path):
    """DECA (with BMA) on the real pretrained SmolLM2-135M, rotten-tomatoes, alpha 0.3."""
    cfg = load_config(
        overrides={
            "num_clients": 4,
            "output_dir": str(tmp_path),
            "data.alpha": 0.3,
            "data.max_examples": 800,
            "train.rounds": 1,
            "eval.max_examples_per_client": 16,
            "eval.zero_shot": False,
            "eval.average_model": False,
        }
    )
    assert cfg.algorithm.bma and cfg.model.name.startswith("embedded:")
    result = Engine(cfg).run()
    steps = [np.mean(r["loss"]) for r in result.records if r["type"] == "step"]
    assert np.mean(steps[-4:]) < 0.5 * np.mean(steps[:4])
    final = result.evals()[-1]
    labels = [y for ys in final["labels"] for y in ys]
    majority = max(labels.count(0), labels.count(1)) / len(labels)
    assert final["global"]["accuracy"] > max(0.6, majority)  # chance is 0.5 on two labels


def test_bf16_model_and_wire(make_config):
    cfg = make_config(
        **{"model.dtype": "bfloat16", "algorithm.wire_dtype": "model", "eval.average_model": False}
    )
    engine = Engine(cfg)
    assert all(p.dtype == torch.bfloat16 for p in engine.peers[0].model.parameters())
    engine._run_block(0, 0, 0)
    phase = read_metrics(engine.run_dir.metrics_path)[-1]
    numel = engine.peers[0].partition.numel(0)
    for i, sent in enumerate(phase["bytes_sent"]):
        assert sent == numel * 2 * len(neighbours(engine.graph, i)) * cfg.train.steps_per_block
    step = read_metrics(engine.run_dir.metrics_path)[0]
    assert all(np.isfinite(step["loss"]))
