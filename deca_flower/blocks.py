"""Block partition of a Hugging Face decoder model: DECA's trainable space.

DECA trains the transformer decoder layers only, `g` consecutive layers per
block, one block at a time. Embeddings, the final norm and the LM head are
never in a block and stay frozen for the whole run.

Why backward stops at the active block: `activate(k)` leaves every parameter
outside block k with `requires_grad=False`, and the embedding output does not
require grad, so autograd records no graph below block k; the layers above it
compute input gradients only. We never call `enable_input_require_grads()`
(that would build a graph down to the embeddings). Gradient checkpointing is
set up by `BlockPartition.enable_gradient_checkpointing`, which undoes the
`enable_input_require_grads()` that `transformers` performs on its own.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

BLOCK_ORDERS = ("ascending", "descending", "random")

# Where common HF causal LMs keep their decoder layers; preferred when several
# module lists pass the generic rule (same length, one child class).
_PREFERRED_PATHS = (
    "model.layers",  # Llama, Qwen2/2.5/3, Mistral, Gemma, Phi, Phi-3, SmolLM
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "model.language_model.layers",  # multimodal wrappers (Gemma 3, Qwen2-VL)
    "transformer.layers",
    "layers",
)
_LAYER_COUNT_ATTRS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


class BlockError(ValueError):
    """The model cannot be split into blocks as asked (or a bad block setting)."""


def find_decoder_layers(model: nn.Module, layers_attr: str | None = None) -> nn.ModuleList:
    """The model's decoder layers, found generically or at the dotted path `layers_attr`."""
    return _locate_layers(model, layers_attr)[1]


def _locate_layers(model: nn.Module, layers_attr: str | None) -> tuple[str, nn.ModuleList]:
    if layers_attr:
        return layers_attr, _resolve_path(model, layers_attr)
    expected = _expected_layer_count(model)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if _is_layer_stack(module) and (expected is None or len(module) == expected)
    ]
    if not candidates:
        raise BlockError(
            f"Could not find the decoder layers of {type(model).__name__} (looked for the largest "
            f"nn.ModuleList of one layer class with {expected or 'any number of'} entries). "
            "Set `model.layers_attr` to their dotted path (e.g. 'model.layers') and please "
            "report this model."
        )
    preferred = [c for c in candidates if c[0] in _PREFERRED_PATHS]
    # Several matches (e.g. a vision tower with the same depth): the known path wins,
    # then the stack holding the most parameters.
    return max(preferred or candidates, key=lambda c: _numel(c[1].parameters()))


def _resolve_path(model: nn.Module, path: str) -> nn.ModuleList:
    module: object = model
    for part in path.split("."):
        if not hasattr(module, part):
            raise BlockError(
                f"`model.layers_attr`={path!r}: {type(model).__name__} has no attribute path "
                f"{path!r} (failed at {part!r})."
            )
        module = getattr(module, part)
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        raise BlockError(
            f"`model.layers_attr`={path!r} is a {type(module).__name__}, "
            "not a non-empty nn.ModuleList of decoder layers."
        )
    return module


def _expected_layer_count(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    # Multimodal configs keep the language model's depth in a text sub-config.
    get_text = getattr(config, "get_text_config", None)
    configs = [get_text(), config] if callable(get_text) else [config]
    for cfg in configs:
        for attr in _LAYER_COUNT_ATTRS:
            value = getattr(cfg, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def _is_layer_stack(module: nn.Module) -> bool:
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        return False
    classes = {type(child) for child in module}
    return len(classes) == 1 and _numel(module.parameters()) > 0


def _numel(params: Iterator[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


class BlockPartition:
    """Split a model's decoder layers into `num_blocks` consecutive blocks of
    `layers_per_block` layers (the last block may be smaller)."""

    def __init__(
        self, model: nn.Module, layers_per_block: int = 1, layers_attr: str | None = None
    ) -> None:
        if not isinstance(layers_per_block, int) or layers_per_block < 1:
            raise BlockError(
                f"`train.layers_per_block` must be a positive integer, got {layers_per_block!r}."
            )
        self.model = model
        self.layers_path, self.layers = _locate_layers(model, layers_attr)
        self.layers_per_block = layers_per_block
        self.num_blocks: int = math.ceil(len(self.layers) / layers_per_block)
        self.active: int | None = None
        # Names come from the model (not the layer) so they match state_dict keys.
        name_of = {id(p): n for n, p in model.named_parameters()}
        self._blocks = [self._collect(k, name_of) for k in range(self.num_blocks)]
        self._check_disjoint()

    def _collect(self, k: int, name_of: dict[int, str]) -> list[tuple[str, nn.Parameter]]:
        named: list[tuple[str, nn.Parameter]] = []
        seen: set[int] = set()
        for i in self.layer_indices(k):
            for p in self.layers[i].parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    named.append((name_of[id(p)], p))
        return named

    def _check_disjoint(self) -> None:
        # A parameter shared across layers (ALBERT-style) would be updated by two blocks.
        owner: dict[int, int] = {}
        for k, block in enumerate(self._blocks):
            for name, p in block:
                if owner.setdefault(id(p), k) != k:
                    raise BlockError(
                        f"Parameter {name!r} is shared by blocks {owner[id(p)]} and {k}; "
                        "DECA needs disjoint blocks."
                    )

    def _check_index(self, k: int) -> None:
        if not 0 <= k < self.num_blocks:
            raise BlockError(f"Block index {k} out of range [0, {self.num_blocks}).")

    def layer_indices(self, k: int) -> list[int]:
        """Indices (into the decoder layer list) of the layers in block k."""
        self._check_index(k)
        start = k * self.layers_per_block
        return list(range(start, min(start + self.layers_per_block, len(self.layers))))

    def named_parameters(self, k: int) -> list[tuple[str, nn.Parameter]]:
        """Block k's parameters, named as in `model.named_parameters()`, in registration order."""
        self._check_index(k)
        return list(self._blocks[k])

    def parameters(self, k: int) -> list[nn.Parameter]:
        """Block k's parameters in module registration order (deterministic across clients)."""
        return [p for _, p in self.named_parameters(k)]

    def numel(self, k: int) -> int:
        """Number of scalar parameters in block k (what one gossip message carries)."""
        return sum(p.numel() for p in self.parameters(k))

    def activate(self, k: int) -> list[nn.Parameter]:
        """Make block k the only trainable part of the model; returns its parameters."""
        self._check_index(k)
        block = self.parameters(k)
        train_only(self.model, block)
        self.active = k
        return block

    def freeze_all(self) -> None:
        """No parameter trainable, no gradient kept (e.g. for evaluation)."""
        train_only(self.model, [])
        self.active = None

    def enable_gradient_checkpointing(
        self, model: nn.Module | None = None, *, use_reentrant: bool = False
    ) -> None:
        """Turn on HF activation checkpointing without building a graph below the active block.

        `transformers` calls `enable_input_require_grads()` inside
        `gradient_checkpointing_enable`; we remove that hook again. Each decoder layer's
        checkpoint function (HF calls `layer._gradient_checkpointing_func(fn, *args)`) is then
        wrapped so that (a) only the active block and the layers above it are checkpointed
        (below it there is no graph, so recomputing would be wasted) and (b) with reentrant
        checkpointing, which yields parameter gradients only when a layer's input requires
        grad, the hidden states require grad at the active block's input only, as BAdam does.
        Wrapping the function rather than hooking the layer works whether transformers
        checkpoints `__call__` (hooks run inside the checkpoint, < 5.2x) or `forward`.
        """
        if model is not None and model is not self.model:
            raise BlockError("enable_gradient_checkpointing: model is not the partitioned model.")
        if not all(hasattr(layer, "gradient_checkpointing") for layer in self.layers):
            raise BlockError(
                "gradient checkpointing per block needs decoder layers that checkpoint "
                "themselves (transformers' GradientCheckpointingLayer, transformers >= 4.53); "
                "upgrade transformers or set train.gradient_checkpointing=false"
            )
        kwargs = {"use_reentrant": use_reentrant}
        enable = getattr(self.model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers < 5 only has the older name
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if hasattr(self.model, "disable_input_require_grads"):
            self.model.disable_input_require_grads()
        for i, layer in enumerate(self.layers):
            hf_checkpoint = layer._gradient_checkpointing_func
            layer._gradient_checkpointing_func = self._block_checkpoint(
                i, hf_checkpoint, use_reentrant
            )

    def disable_gradient_checkpointing(self) -> None:
        """Undo `enable_gradient_checkpointing`."""
        disable = getattr(self.model, "activation_checkpointing_disable", None)
        if disable is None:
            disable = self.model.gradient_checkpointing_disable
        disable()

    def _block_checkpoint(self, index: int, hf_checkpoint: Callable, reentrant: bool) -> Callable:
        def checkpoint(fn: Callable, *args: object) -> object:
            first = None if self.active is None else self.layer_indices(self.active)[0]
            if first is None or index < first or not torch.is_grad_enabled():
                return fn(*args)  # no graph here: nothing to recompute in the backward
            if reentrant and index == first and args and _needs_grad_leaf(args[0]):
                args = (args[0].detach().requires_grad_(True), *args[1:])
            return hf_checkpoint(fn, *args)

        return checkpoint


def train_only(model: nn.Module, params: list[nn.Parameter]) -> None:
    """Make `params` the model's only trainable parameters; every other .grad is dropped
    (so gradient memory scales with what is trained now)."""
    trainable = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
        if id(p) not in trainable:
            p.grad = None


def _needs_grad_leaf(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad


def block_order(num_blocks: int, order: str, round_idx: int, seed: int) -> list[int]:
    """The order in which round `round_idx` visits the blocks.

    `random` draws a fresh permutation per round from (seed, round_idx) only, so
    every client computes the same order without communicating.
    """
    if num_blocks < 1:
        raise BlockError(f"num_blocks must be positive, got {num_blocks}.")
    blocks = list(range(num_blocks))
    if order == "ascending":
        return blocks
    if order == "descending":
        return blocks[::-1]
    if order == "random":
        # A str seed is hashed with SHA-512: stable across processes and PYTHONHASHSEED.
        random.Random(f"deca-block-order:{seed}:{round_idx}").shuffle(blocks)
        return blocks
    raise BlockError(f"`train.block_order`={order!r} is not one of {', '.join(BLOCK_ORDERS)}.")
