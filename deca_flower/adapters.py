"""Parameter-efficient modules for the decentralized PEFT baselines.

- LoRA (Dec-LoRA, DeCAF): injected in place with `peft.inject_adapter_in_model`, so
  the model keeps its Hugging Face class and its parameter names (plus `lora_A/B`).
- Bottleneck adapters (Dec-Adapter): one Houlsby/Pfeiffer adapter after each decoder
  layer's MLP, `h + up(gelu(down(h)))` with `up` zero-initialised so the model
  starts exactly at the pretrained function. peft has no bottleneck adapter.

`AdapterPartition` presents the adapter parameters as a single "block", so the
same `Peer` / `BMAAdam` loop trains and gossips them.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from deca_flower.blocks import find_decoder_layers, train_only

ADAPTER_NAME = "adapter"  # submodule name of a bottleneck adapter inside `layer.mlp`


class AdapterError(ValueError):
    """An adapter setting that does not fit the model."""


# ---------------------------------------------------------------------- LoRA


def add_lora(
    model: PreTrainedModel, rank: int, alpha: float, targets: list[str], seed: int
) -> PreTrainedModel:
    """Inject LoRA (B=0, A random from `seed`) into every module named in `targets`.

    The seed makes every client start from the same A, as decentralized LoRA
    assumes; peft's own init would draw from the caller's global RNG.
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), bias="none"
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            inject_adapter_in_model(config, model)
        except ValueError as exc:
            found = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _linear(m)})
            raise AdapterError(
                f"algorithm.lora_targets={list(targets)} matched no module of this model "
                f"({exc}); linear layer names found: {found}"
            ) from None
    return model


def is_lora_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def _linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


# ---------------------------------------------------------------------- bottleneck adapters


class BottleneckAdapter(nn.Module):
    def __init__(self, hidden: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(nn.functional.gelu(self.down(hidden)))


def add_bottleneck_adapters(
    model: PreTrainedModel, bottleneck: int, seed: int, layers_attr: str | None = None
) -> PreTrainedModel:
    """Put a `BottleneckAdapter` on the output of every decoder layer's MLP."""
    layers = find_decoder_layers(model, layers_attr)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in layers:
            mlp = getattr(layer, "mlp", None)
            if not isinstance(mlp, nn.Module):
                raise AdapterError(
                    f"algorithm.method=dec-adapter needs decoder layers with an `mlp` submodule; "
                    f"{type(layer).__name__} has children {[n for n, _ in layer.named_children()]}"
                )
            hidden = model.config.hidden_size
            adapter = BottleneckAdapter(hidden, bottleneck).to(device=device, dtype=dtype)
            mlp.add_module(ADAPTER_NAME, adapter)
            mlp.register_forward_hook(_apply_adapter)
    return model


def _apply_adapter(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return getattr(module, ADAPTER_NAME)(output)


def is_bottleneck_parameter(name: str) -> bool:
    return f".mlp.{ADAPTER_NAME}." in name


# ---------------------------------------------------------------------- the single "block"


class AdapterPartition:
    """All adapter parameters as one block: what a PEFT client trains and gossips.

    Mirrors the parts of `BlockPartition` that `Peer`, the engine and the node use.
    """

    num_blocks = 1

    def __init__(self, model: nn.Module, is_adapter) -> None:
        self.model = model
        self._named = [(n, p) for n, p in model.named_parameters() if is_adapter(n)]
        if not self._named:
            raise AdapterError("the model has no adapter parameters to train")
        self.active: int | None = None

    def _check_index(self, k: int) -> None:
        if k != 0:
            raise AdapterError(f"adapter methods have a single block 0, got block {k}")

    def named_parameters(self, k: int) -> list[tuple[str, nn.Parameter]]:
        self._check_index(k)
        return list(self._named)

    def parameters(self, k: int) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters(k)]

    def numel(self, k: int) -> int:
        return sum(p.numel() for p in self.parameters(k))

    def activate(self, k: int) -> list[nn.Parameter]:
        params = self.parameters(k)
        train_only(self.model, params)
        self.active = k
        return params

    def freeze_all(self) -> None:
        train_only(self.model, [])
        self.active = None
