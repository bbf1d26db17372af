"""The training methods a run can compare: DECA and the baselines of the paper.

Every method is the same loop (`Peer`: local step -> mix the trained vector with
neighbours -> consensus update) with three things changed:

- what is trained and gossiped ("block"): DECA's layer blocks one at a time, all
  adapter parameters, or every decoder layer at once;
- how neighbours' vectors are combined: the weighted average of eq (7), DeCAF's
  truncated-SVD consensus of LoRA products, or not at all (local-only);
- whose data a model sees: its own client's, or the pooled data (centralized).

Every method takes the same number of optimizer steps per round: K blocks x S
steps, where K is DECA's number of layer blocks for `train.layers_per_block`.
Methods with a single trainable set run K x S consecutive steps on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig
from transformers import PreTrainedModel

from deca_flower.adapters import (
    AdapterPartition,
    add_bottleneck_adapters,
    add_lora,
    is_bottleneck_parameter,
    is_lora_parameter,
)
from deca_flower.blocks import BlockPartition, find_decoder_layers
from deca_flower.compression import Codec
from deca_flower.mixing import MIXINGS, Mixing


class MethodError(ValueError):
    """The method cannot run where it was asked to; the message names the alternative."""


@dataclass(frozen=True)
class Method:
    name: str
    trains: str  # "blocks" | "lora" | "adapters" | "all-layers"
    mixing: str  # "average" (eq 7) | "tsvd" (DeCAF) | "none"
    pooled_data: bool = False  # one model on all clients' data
    description: str = ""

    @property
    def communicates(self) -> bool:
        return self.mixing != "none"

    @property
    def uses_bma(self) -> bool:
        return self.name == "deca"

    def mixer(
        self,
        partition: BlockPartition | AdapterPartition,
        codec: Codec | None = None,
        consensus_step: float = 1.0,
    ) -> Mixing:
        """The method's mixing rule, for blocks of `partition`; over `codec` (the
        `gossip.compression` wire, `task.compression_codec`) unless that is None (the plain
        `algorithm.wire_dtype` wire). `consensus_step`: CHOCO's gamma (int8 | topk)."""
        rule = MIXINGS[self.mixing](partition)
        return rule if codec is None else rule.compressed(codec, consensus_step)

    def training_sets(self, num_clients: int) -> list[list[int]]:
        """Per model the run trains, the clients whose training data it learns from."""
        if self.pooled_data:
            return [list(range(num_clients))]
        return [[rank] for rank in range(num_clients)]

    def faults_to_replay(self, injected: set[tuple[int, int]]) -> set[tuple[int, int]]:
        """The (rank, phase) site losses of faults.inject that this method replays: none
        for one model on the pooled data, which is no site's."""
        return set() if self.pooled_data else injected

    def check_deployable(self) -> None:
        """Raise MethodError if no decentralized deployment can run this method."""
        if self.pooled_data:
            raise MethodError(
                f"algorithm.method={self.name} trains one model on pooled data, the reference "
                "no decentralized deployment can run; use the in-process engine: "
                f"`deca-flower engine algorithm={self.name}`"
            )


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("deca", "blocks", "average", description="DECA: block-wise Adam + BMA"),
        Method("dec-lora", "lora", "average", description="Dec-LoRA: gossip LoRA A and B"),
        Method("decaf", "lora", "tsvd", description="DeCAF: TSVD consensus of LoRA products"),
        Method("dec-adapter", "adapters", "average", description="Dec-Adapter: gossip adapters"),
        Method("full-adam", "all-layers", "average", description="decentralized full Adam"),
        Method("local", "blocks", "none", description="local-only block Adam (no gossip)"),
        Method(
            "centralized",
            "blocks",
            "none",
            pooled_data=True,
            description="centralized block Adam on the pooled data",
        ),
    )
}


def get_method(cfg: DictConfig) -> Method:
    return METHODS[cfg.algorithm.method]


def prepare_model(cfg: DictConfig, model: PreTrainedModel) -> PreTrainedModel:
    """Add the method's trainable modules (in place); full-parameter methods add none."""
    method = get_method(cfg)
    algo = cfg.algorithm
    if method.trains == "lora":
        return add_lora(model, algo.lora_rank, algo.lora_alpha, list(algo.lora_targets), cfg.seed)
    if method.trains == "adapters":
        return add_bottleneck_adapters(
            model, algo.adapter_bottleneck, cfg.seed, cfg.model.layers_attr
        )
    return model


def make_partition(cfg: DictConfig, model: PreTrainedModel) -> BlockPartition | AdapterPartition:
    method = get_method(cfg)
    if method.trains == "lora":
        return AdapterPartition(model, is_lora_parameter)
    if method.trains == "adapters":
        return AdapterPartition(model, is_bottleneck_parameter)
    if method.trains == "all-layers":
        num_layers = len(find_decoder_layers(model, cfg.model.layers_attr))
        partition = BlockPartition(model, num_layers, cfg.model.layers_attr)
    else:
        partition = BlockPartition(model, cfg.train.layers_per_block, cfg.model.layers_attr)
    if cfg.model.gradient_checkpointing:
        partition.enable_gradient_checkpointing()
    return partition


def steps_per_phase(cfg: DictConfig, model: PreTrainedModel) -> int:
    """Inner steps per trained set, so that every method takes K x S steps per round."""
    if get_method(cfg).trains == "blocks":
        return cfg.train.steps_per_block
    num_layers = len(find_decoder_layers(model, cfg.model.layers_attr))
    return cfg.train.steps_per_block * math.ceil(num_layers / cfg.train.layers_per_block)
