"""The baselines: each one's defining property, checked against an independent computation."""

from __future__ import annotations

import pytest
import torch

from deca_flower.adapters import AdapterError, is_bottleneck_parameter, is_lora_parameter
from deca_flower.config import ConfigError
from deca_flower.decaf import decaf_mix, lora_layout, truncated_product_factors
from deca_flower.engine import Engine, run_engine
from deca_flower.peer import Peer
from deca_flower.task import load_base_model, make_partition, make_stream, prepare_data

# ---------------------------------------------------------------------- DeCAF's TSVD


def dense_best_rank(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def test_tsvd_consensus_is_the_best_rank_r_approximation_of_the_mixed_product():
    g = torch.Generator().manual_seed(0)
    out_dim, in_dim, r = 12, 9, 2
    bs = [torch.randn(out_dim, r, generator=g) for _ in range(3)]
    as_ = [torch.randn(r, in_dim, generator=g) for _ in range(3)]
    weights = [0.5, 0.3, 0.2]
    b_new, a_new = truncated_product_factors(bs, as_, weights, rank=r)
    dense = sum(w * b.double() @ a.double() for w, b, a in zip(weights, bs, as_))
    assert b_new.shape == (out_dim, r) and a_new.shape == (r, in_dim)
    torch.testing.assert_close(
        (b_new @ a_new).double(), dense_best_rank(dense, r), atol=1e-4, rtol=1e-4
    )
    # Balanced split: B and A carry the same singular values.
    torch.testing.assert_close(b_new.norm(dim=0), a_new.norm(dim=1), atol=1e-4, rtol=1e-4)


def test_tsvd_consensus_keeps_an_agreed_product():
    g = torch.Generator().manual_seed(1)
    b, a = torch.randn(8, 3, generator=g), torch.randn(3, 5, generator=g)
    b_new, a_new = truncated_product_factors([b, b], [a, a], [0.25, 0.75], rank=3)
    torch.testing.assert_close(b_new @ a_new, b @ a, atol=1e-4, rtol=1e-4)


def test_decaf_mix_uses_the_flat_layout_of_lora_pairs():
    shapes = [
        ("l.0.q.lora_A.default.weight", torch.Size([2, 4])),
        ("l.0.q.lora_B.default.weight", torch.Size([6, 2])),
    ]
    layout = lora_layout(shapes)
    assert layout[0].a_offset == 0 and layout[0].b_offset == 8
    g = torch.Generator().manual_seed(2)
    blocks = {0: torch.randn(20, generator=g), 3: torch.randn(20, generator=g)}
    mixed = decaf_mix(blocks, {0: 0.6, 3: 0.4}, layout)
    dense = sum(
        w * blocks[j][8:].view(6, 2).double() @ blocks[j][:8].view(2, 4).double()
        for j, w in ((0, 0.6), (3, 0.4))
    )
    product = mixed[8:].view(6, 2).double() @ mixed[:8].view(2, 4).double()
    torch.testing.assert_close(product, dense_best_rank(dense, 2), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="LoRA factors only"):
        lora_layout([("l.0.mlp.weight", torch.Size([2, 2]))])


# ---------------------------------------------------------------------- the engine's variants


def _phases(result):
    return [r for r in result.records if r["type"] == "phase"]


def _decoder_and_head(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_dec_lora_trains_and_sends_only_lora_and_mixes_them(make_config):
    cfg = make_config(algorithm="dec-lora", topology="complete", **{"topology.mixing": "uniform"})
    engine = Engine(cfg)
    before = _decoder_and_head(engine.peers[0].model)
    result = engine.run()
    lora_numel = sum(
        p.numel() for n, p in engine.peers[0].model.named_parameters() if is_lora_parameter(n)
    )
    (phase,) = _phases(result)  # one trained set: all adapters
    assert phase["block_numel"] == lora_numel
    steps = sum(1 for r in result.records if r["type"] == "step")
    assert steps == 4 * cfg.train.steps_per_block  # tiny: 4 layer blocks x S
    assert phase["bytes_sent"] == [lora_numel * 4 * 3 * steps] * 4  # fp32, 3 neighbours
    for peer in result.peers:
        for name, p in peer.model.named_parameters():
            if not is_lora_parameter(name):
                assert torch.equal(p, before[name]), name  # the backbone never moves
    # Complete graph, uniform weights: every step ends in exact agreement on A and B.
    first = dict(result.peers[0].model.named_parameters())
    for peer in result.peers[1:]:
        for name, p in peer.model.named_parameters():
            if is_lora_parameter(name):
                torch.testing.assert_close(p, first[name], rtol=1e-5, atol=1e-6)
    assert any(
        not torch.equal(first[n], before[n]) for n in first if ".lora_B." in n
    )  # B left its zero init


def test_dec_adapter_starts_at_the_pretrained_function_and_gossips_only_adapters(make_config):
    cfg = make_config(algorithm="dec-adapter")
    plain, _ = load_base_model(make_config(), torch.device("cpu"))
    adapted, _ = load_base_model(cfg, torch.device("cpu"))
    ids = torch.randint(0, 200, (2, 9))
    torch.testing.assert_close(adapted(input_ids=ids).logits, plain(input_ids=ids).logits)
    result = run_engine(cfg)
    (phase,) = _phases(result)
    model = result.peers[0].model
    assert phase["block_numel"] == sum(
        p.numel() for n, p in model.named_parameters() if is_bottleneck_parameter(n)
    )
    hidden = model.config.hidden_size
    bottleneck = cfg.algorithm.adapter_bottleneck
    per_layer = 2 * hidden * bottleneck + hidden + bottleneck
    assert phase["block_numel"] == per_layer * model.config.num_hidden_layers


def test_full_adam_trains_and_mixes_every_decoder_layer_at_once(make_config):
    cfg = make_config(algorithm="full-adam")
    result = run_engine(cfg)
    (phase,) = _phases(result)
    partition = make_partition(make_config(), result.peers[0].model)  # DECA's blocks
    every_layer = sum(partition.numel(k) for k in range(partition.num_blocks))
    assert phase["block_numel"] == every_layer
    steps = sum(1 for r in result.records if r["type"] == "step")
    assert steps == partition.num_blocks * cfg.train.steps_per_block
    degrees = [2] * 4  # ring of 4
    assert phase["bytes_sent"] == [every_layer * 4 * d * steps for d in degrees]


def test_local_only_sends_nothing_and_equals_training_each_client_alone(make_config):
    cfg = make_config(algorithm="local")
    result = run_engine(cfg)
    assert all(sum(p["bytes_sent"]) == 0 for p in _phases(result))
    # Independent computation: rank 2 trained by itself, with no engine around it.
    # On the engine's device: bit-identity only holds for the same kernels.
    model, tokenizer = load_base_model(cfg, result.peers[2].device)
    partition = make_partition(cfg, model)
    alone = Peer(2, model, partition, make_stream(cfg, 2, prepare_data(cfg), tokenizer), cfg)
    for k in range(partition.num_blocks):
        alone.begin_block(k)
        for _ in range(cfg.train.steps_per_block):
            alone.local_step()
            alone.consensus_update()
        alone.end_block()
    for (name, p), q in zip(model.named_parameters(), result.peers[2].model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_centralized_trains_one_model_on_all_clients_data(make_config):
    cfg = make_config(algorithm="centralized")
    engine = Engine(cfg)
    (peer,) = engine.peers
    pooled = sum(len(c.train) for c in engine.run_data.clients)
    assert len(peer.stream.dataset) == pooled
    assert peer.stream.next_batch()["input_ids"].shape[0] == cfg.data.batch_size * cfg.num_clients
    result = engine.run()
    final = result.evals()[-1]
    assert len(final["clients"]) == cfg.num_clients  # evaluated on every client's test set
    assert all(sum(p["bytes_sent"]) == 0 for p in _phases(result))


# ---------------------------------------------------------------------- bad settings


def test_bma_with_a_plain_adam_method_is_a_config_error(make_config):
    with pytest.raises(ConfigError, match="algorithm.bma=false"):
        make_config(**{"algorithm.method": "dec-lora"})


def test_unknown_method_names_the_choices(make_config):
    with pytest.raises(ConfigError, match="algorithm.method"):
        make_config(**{"algorithm.method": "fedavg"})


def test_lora_targets_that_match_nothing_list_the_linear_layers(make_config):
    cfg = make_config(algorithm="dec-lora", **{"algorithm.lora_targets": "[c_attn]"})
    with pytest.raises(AdapterError, match=r"algorithm.lora_targets.*q_proj"):
        load_base_model(cfg, torch.device("cpu"))
