"""How a method combines neighbours' blocks: eq (7), DeCAF's TSVD consensus, or not at all.

Each rule runs in two places: in process, for all clients at once (the engine, the ground
truth), and on one node over its gossip group (the Flower app). `Method.mixing` names the
rule; `methods.py` maps the name to one of these classes, so no caller asks which it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from deca_flower.decaf import decaf_mix, lora_layout

if TYPE_CHECKING:
    from deca_flower.adapters import AdapterPartition
    from deca_flower.blocks import BlockPartition
    from deca_flower.gossip import GossipGroup


def mix_blocks(weights: torch.Tensor, blocks: torch.Tensor, wire: torch.dtype) -> torch.Tensor:
    """Eq (7) for all clients at once: row i is sum_j w_ij x_j.

    Neighbours' blocks go through the wire dtype (as they would over the
    network); a client's own block does not.
    """
    w = weights.to(device=blocks.device, dtype=torch.float32)
    if wire == torch.float32:
        return w @ blocks
    self_weight = torch.diagonal(w).clone()
    off_diagonal = w - torch.diag(self_weight)
    received = blocks.to(wire).to(torch.float32)
    return off_diagonal @ received + self_weight[:, None] * blocks


class Mixing:
    """A mixing rule, bound to the run's partition (its parameter layout)."""

    def __init__(self, partition: BlockPartition | AdapterPartition) -> None:
        pass

    def mix_in_process(
        self, weights: torch.Tensor, blocks: dict[int, torch.Tensor], wire: torch.dtype
    ) -> dict[int, torch.Tensor]:
        """Every member's mixed block (`blocks`: the members' active blocks, by rank; W's
        rows and columns of the other ranks are 0)."""
        return {}

    def mix_on_node(self, group: GossipGroup, block: torch.Tensor, k: int) -> None:
        """This node's block, mixed in place with its gossip group's (block id k)."""


class NoMixing(Mixing):
    """Local-only and centralized training: nothing is exchanged."""


class WeightedAverage(Mixing):
    """Eq (7): x_i <- sum_j w_ij x_j over the neighbours and itself."""

    def mix_in_process(
        self, weights: torch.Tensor, blocks: dict[int, torch.Tensor], wire: torch.dtype
    ) -> dict[int, torch.Tensor]:
        # Lost sites neither send nor receive: their rows of the stack are zeros.
        zeros = torch.zeros_like(next(iter(blocks.values())))
        stacked = torch.stack([blocks.get(j, zeros) for j in range(weights.shape[0])])
        mixed = mix_blocks(weights, stacked, wire)
        return {i: mixed[i] for i in blocks}

    def mix_on_node(self, group: GossipGroup, block: torch.Tensor, k: int) -> None:
        block.copy_(group.mix(block, block_id=k))


class TsvdConsensus(Mixing):
    """DeCAF: the weighted average of the LoRA products, re-factorized by truncated SVD."""

    def __init__(self, partition: BlockPartition | AdapterPartition) -> None:
        self.layout = lora_layout([(n, p.shape) for n, p in partition.named_parameters(0)])

    def mix_in_process(
        self, weights: torch.Tensor, blocks: dict[int, torch.Tensor], wire: torch.dtype
    ) -> dict[int, torch.Tensor]:
        return {i: self._row(i, weights[i], blocks, wire) for i in blocks}

    def _row(
        self, i: int, row: torch.Tensor, blocks: dict[int, torch.Tensor], wire: torch.dtype
    ) -> torch.Tensor:
        ranks = [j for j in range(len(row)) if row[j] > 0]
        received = {j: blocks[j] if j == i else blocks[j].to(wire).float() for j in ranks}
        return decaf_mix(received, {j: float(row[j]) for j in ranks}, self.layout)

    def mix_on_node(self, group: GossipGroup, block: torch.Tensor, k: int) -> None:
        received = group.exchange(block, block_id=k)
        blocks = {**received, group.rank: block}
        weights = {**group.weights, group.rank: group.self_weight}
        block.copy_(decaf_mix(blocks, weights, self.layout))


MIXINGS: dict[str, type[Mixing]] = {
    "none": NoMixing,
    "average": WeightedAverage,
    "tsvd": TsvdConsensus,
}
