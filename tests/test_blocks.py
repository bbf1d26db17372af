"""Tests for deca_flower.blocks: partitioning, activation, backward stopping at the block.

Covers invariant 7 (after backward only active-block parameters have `.grad`)
and the "no autograd graph below the active block" rule, with and without
gradient checkpointing (both torch checkpoint variants).
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from torch import nn

from deca_flower.blocks import (
    BLOCK_ORDERS,
    BlockError,
    BlockPartition,
    block_order,
    find_decoder_layers,
)
from deca_flower.models import load_model

ARCHS = ("tiny-llama", "tiny-qwen2")
CKPT_MODES = ("none", "non_reentrant", "reentrant")


def _model(name: str = "tiny-llama", num_layers: int = 5) -> nn.Module:
    model, _ = load_model(name, num_layers=num_layers, seed=0)
    return model.train()


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, 12), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _setup(partition: BlockPartition, mode: str) -> None:
    if mode != "none":
        partition.enable_gradient_checkpointing(use_reentrant=mode == "reentrant")


# --- partition ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("num_layers", [4, 5])
@pytest.mark.parametrize("g", [1, 2, 3])
def test_partition_counts_cover_and_disjoint(arch: str, num_layers: int, g: int) -> None:
    model = _model(arch, num_layers)
    part = BlockPartition(model, layers_per_block=g)
    assert part.num_blocks == math.ceil(num_layers / g)
    indices = [part.layer_indices(k) for k in range(part.num_blocks)]
    assert [i for block in indices for i in block] == list(range(num_layers))
    assert all(len(b) == g for b in indices[:-1]) and 1 <= len(indices[-1]) <= g

    ids = [id(p) for k in range(part.num_blocks) for p in part.parameters(k)]
    assert len(ids) == len(set(ids)), "blocks overlap"
    layer_ids = {id(p) for p in model.model.layers.parameters()}
    assert set(ids) == layer_ids
    assert sum(part.numel(k) for k in range(part.num_blocks)) == sum(
        p.numel() for p in model.model.layers.parameters()
    )
    outside = [
        model.model.embed_tokens.weight,
        model.model.norm.weight,
        model.lm_head.weight,  # tied to the embedding
    ]
    assert not {id(p) for p in outside} & set(ids)


def test_named_parameters_match_model_names_and_order() -> None:
    model = _model()
    part = BlockPartition(model, layers_per_block=2)
    by_name = dict(model.named_parameters())
    for k in range(part.num_blocks):
        named = part.named_parameters(k)
        assert all(by_name[n] is p for n, p in named)
        assert [p for _, p in named] == part.parameters(k)
        expected = [
            n
            for n, _ in model.named_parameters()
            if n.startswith("model.layers.") and int(n.split(".")[2]) in part.layer_indices(k)
        ]
        assert [n for n, _ in named] == expected  # registration order, deterministic


def test_bad_settings_raise() -> None:
    model = _model()
    with pytest.raises(BlockError, match="train.layers_per_block"):
        BlockPartition(model, layers_per_block=0)
    part = BlockPartition(model)
    with pytest.raises(BlockError, match="out of range"):
        part.activate(part.num_blocks)
    with pytest.raises(BlockError, match="out of range"):
        part.parameters(-1)


# --- finding decoder layers -------------------------------------------------------------

SMALL = dict(vocab_size=257, hidden_size=32, num_attention_heads=2, num_hidden_layers=3)
GENERIC = [
    ("GPT2", lambda: transformers.GPT2Config(vocab_size=257, n_embd=32, n_head=2, n_layer=3,
                                             n_positions=64), "transformer.h"),
    ("GPTNeoX", lambda: transformers.GPTNeoXConfig(intermediate_size=64, **SMALL),
     "gpt_neox.layers"),
    ("OPT", lambda: transformers.OPTConfig(ffn_dim=64, word_embed_proj_dim=32,
                                           max_position_embeddings=64, **SMALL),
     "model.decoder.layers"),
    ("Mistral", lambda: transformers.MistralConfig(intermediate_size=64, num_key_value_heads=1,
                                                   **SMALL), "model.layers"),
    ("Gemma", lambda: transformers.GemmaConfig(intermediate_size=64, num_key_value_heads=1,
                                               head_dim=16, **SMALL), "model.layers"),
    ("Phi", lambda: transformers.PhiConfig(intermediate_size=64, **SMALL), "model.layers"),
    ("Qwen3", lambda: transformers.Qwen3Config(intermediate_size=64, num_key_value_heads=1,
                                               head_dim=16, **SMALL), "model.layers"),
]  # fmt: skip


@pytest.mark.parametrize(("label", "make_config", "path"), GENERIC, ids=[g[0] for g in GENERIC])
def test_find_decoder_layers_generic(label: str, make_config, path: str) -> None:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(make_config())
    expected = model.get_submodule(path)
    assert find_decoder_layers(model) is expected
    part = BlockPartition(model, layers_per_block=2)
    assert part.layers_path == path and part.num_blocks == 2
    block_ids = {id(p) for k in range(2) for p in part.parameters(k)}
    assert block_ids == {id(p) for p in expected.parameters()}
    # Embeddings (token and, for GPT-2/OPT, positional) are never in a block.
    assert id(model.get_input_embeddings().weight) not in block_ids
    assert id(model.get_output_embeddings().weight) not in block_ids


def test_layers_attr_override_and_errors() -> None:
    model = _model()
    assert find_decoder_layers(model, "model.layers") is model.model.layers
    with pytest.raises(BlockError, match="model.layers_attr"):
        find_decoder_layers(model, "model.nope")
    with pytest.raises(BlockError, match="not a non-empty nn.ModuleList"):
        find_decoder_layers(model, "model.norm")
    with pytest.raises(BlockError, match=r"Sequential.*model\.layers_attr"):
        find_decoder_layers(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))


# --- activation, gradients and the graph below the block --------------------------------


def _grads_after_step(model: nn.Module, part: BlockPartition, k: int) -> dict[str, torch.Tensor]:
    part.activate(k)
    model(**_batch()).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", CKPT_MODES)
def test_only_active_block_gets_grads_and_matches_reference(arch: str, mode: str) -> None:
    reference, model = _model(arch), _model(arch)
    ref_part, part = BlockPartition(reference, 2), BlockPartition(model, 2)
    _setup(part, mode)
    for k in range(part.num_blocks):
        grads = _grads_after_step(model, part, k)
        block_names = [n for n, _ in part.named_parameters(k)]
        assert sorted(grads) == sorted(block_names), f"block {k}: wrong set of .grad"
        assert len(grads) == len(part.parameters(k))
        assert all(g.abs().sum() > 0 for g in grads.values())
        ref = _grads_after_step(reference, ref_part, k)
        for name, grad in grads.items():
            assert torch.allclose(grad, ref[name], rtol=1e-5, atol=1e-7), (k, name)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == set(block_names)


@pytest.mark.parametrize("mode", CKPT_MODES)
def test_no_autograd_graph_below_active_block(mode: str) -> None:
    model = _model("tiny-llama", num_layers=5)
    part = BlockPartition(model, layers_per_block=1)
    _setup(part, mode)
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            outputs[name] = output[0] if isinstance(output, tuple) else output

        return hook

    model.get_input_embeddings().register_forward_hook(keep("embed"))
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(keep(f"layer{i}"))
    for k in (1, 3):
        part.activate(k)
        outputs.clear()
        model(**_batch()).loss.backward()
        assert outputs["embed"].grad_fn is None and not outputs["embed"].requires_grad
        for i in range(k):  # every layer below block k: no graph at all
            assert outputs[f"layer{i}"].requires_grad is False, (k, i)
            assert outputs[f"layer{i}"].grad_fn is None, (k, i)
        for i in range(k, len(model.model.layers)):  # the block and above: in the graph
            assert outputs[f"layer{i}"].requires_grad, (k, i)


@pytest.mark.parametrize("mode", CKPT_MODES)
def test_checkpointing_recomputes_only_the_block_and_above(mode: str) -> None:
    model = _model("tiny-llama", num_layers=5)
    part = BlockPartition(model, layers_per_block=2)
    _setup(part, mode)
    calls = [0] * 5

    def count(i: int):
        def hook(*_: object) -> None:
            calls[i] += 1

        return hook

    # Attention runs inside the checkpointed forward, so a recompute calls it again (a
    # pre-hook: non-reentrant recompute stops early, before the layer's last output).
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_pre_hook(count(i))
    part.activate(1)  # layers 2 and 3
    model(**_batch()).loss.backward()
    expected = [1, 1, 2, 2, 2] if mode != "none" else [1] * 5
    assert calls == expected


def test_checkpointing_removes_hf_input_require_grads_hook() -> None:
    model = _model()
    part = BlockPartition(model)
    part.enable_gradient_checkpointing()
    assert not getattr(model, "_require_grads_hooks", None)
    assert model.model.layers[0].gradient_checkpointing
    part.disable_gradient_checkpointing()
    assert not model.model.layers[0].gradient_checkpointing
    with pytest.raises(BlockError, match="not the partitioned model"):
        part.enable_gradient_checkpointing(_model())


def test_activate_switches_and_freeze_all_clears() -> None:
    model = _model()
    part = BlockPartition(model)
    _grads_after_step(model, part, 0)
    params = part.activate(2)
    assert part.active == 2 and params == part.parameters(2)
    # The previous block's gradients are dropped: memory scales with one block.
    assert all(p.grad is None for p in part.parameters(0))
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    part.freeze_all()
    assert part.active is None
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())


# --- block order --------------------------------------------------------------------------


def test_block_order_fixed_orders() -> None:
    assert block_order(4, "ascending", 3, 0) == [0, 1, 2, 3]
    assert block_order(4, "descending", 3, 0) == [3, 2, 1, 0]
    assert set(BLOCK_ORDERS) == {"ascending", "descending", "random"}


def test_block_order_random_is_seeded_per_round() -> None:
    orders = [block_order(12, "random", r, seed=7) for r in range(5)]
    assert all(sorted(o) == list(range(12)) for o in orders)
    assert orders == [block_order(12, "random", r, seed=7) for r in range(5)]  # every client
    assert len({tuple(o) for o in orders}) > 1  # a fresh permutation per round
    assert orders[0] != block_order(12, "random", 0, seed=8)
    assert orders[0] != list(range(12))


def test_block_order_errors() -> None:
    with pytest.raises(BlockError, match="train.block_order"):
        block_order(4, "shuffled", 0, 0)
    with pytest.raises(BlockError):
        block_order(0, "ascending", 0, 0)
