"""How a method combines neighbours' blocks: eq (7), DeCAF's TSVD consensus, or not at all.

Each rule runs in two places: in process, for all clients at once (the engine, the ground
truth), and on one node over its gossip group (the Flower app). `Method.mixing` names the
rule; `methods.py` maps the name to one of these classes, so no caller asks which it is.

Compressed gossip (`gossip.compression`, deca_flower/compression.py) is a variant of eq (7)
chosen in the same place (`Method.mixer` -> `Mixing.compressed`): a cast wire row by row
(`CastAverage`), or CHOCO-Gossip error feedback (`ChocoGossip`), whose state per rank and
block the rule keeps itself (`begin_block`, `block_state`). On a node, `during` (the next
minibatch's frozen prefix, `gossip.overlap`) runs while the exchange is in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch

from deca_flower.compression import ChocoMixer, ChocoState, Codec
from deca_flower.decaf import decaf_mix, lora_layout
from deca_flower.gossip import mix_blocks as mix_row

if TYPE_CHECKING:
    from deca_flower.adapters import AdapterPartition
    from deca_flower.blocks import BlockPartition
    from deca_flower.gossip import GossipGroup

# A node's committed state of one block (None: the block's first phase), by rank.
SavedState = Callable[[int], Mapping[str, torch.Tensor] | None]


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

    def compressed(self, codec: Codec, consensus_step: float = 1.0) -> Mixing:
        """This rule over a `gossip.compression` wire (config.py admits eq (7) only)."""
        raise ValueError(
            f"gossip.compression={codec.name} applies to averaging methods (eq 7); "
            "set gossip.compression=none"
        )

    def begin_block(
        self,
        k: int,
        blocks: Mapping[int, torch.Tensor],
        saved: SavedState | None = None,
        members: tuple[int, ...] = (),
        first_phase: bool = True,
    ) -> None:
        """Block k starts training (`blocks`: the fresh blocks, by rank; `members`: the run
        ranks mixing in this phase; `first_phase`: the block's first phase of the run, when
        every client holds the same block). Stateless rules ignore it."""

    def block_state(self, rank: int, k: int) -> dict[str, torch.Tensor] | None:
        """The state to commit with block k of `rank` (None: this rule keeps none)."""
        return None

    def forget(self, rank: int, blocks: list[int]) -> None:
        """`rank` took these blocks from a donor (a heal): their state starts afresh."""

    def mix_in_process(
        self, weights: torch.Tensor, blocks: dict[int, torch.Tensor], wire: torch.dtype
    ) -> dict[int, torch.Tensor]:
        """Every member's mixed block (`blocks`: the members' active blocks, by rank; W's
        rows and columns of the other ranks are 0)."""
        return {}

    def mix_on_node(
        self,
        group: GossipGroup,
        block: torch.Tensor,
        k: int,
        during: Callable[[], object] | None = None,
    ) -> None:
        """This node's block, mixed in place with its gossip group's (block id k); `during`
        runs meanwhile (here, with nothing to exchange, before returning)."""
        if during is not None:
            during()


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

    def compressed(self, codec: Codec, consensus_step: float = 1.0) -> Mixing:
        if codec.error_feedback:
            return ChocoGossip(codec, consensus_step)
        return CastAverage(codec)

    def mix_on_node(
        self,
        group: GossipGroup,
        block: torch.Tensor,
        k: int,
        during: Callable[[], object] | None = None,
    ) -> None:
        block.copy_(group.mix(block, block_id=k, during=during))


def _row(weights: torch.Tensor, i: int) -> list[int]:
    """Member i's neighbours in this epoch and itself (W's nonzero entries: every edge of
    the members' graph has a positive weight, lost ranks' rows and columns are 0)."""
    return [j for j in range(weights.shape[0]) if j == i or weights[i, j] != 0]


def _row_weights(weights: torch.Tensor, i: int) -> dict[int, float]:
    return {j: float(weights[i, j]) for j in _row(weights, i)}


class CastAverage(WeightedAverage):
    """Eq (7) over an explicit cast wire (`gossip.compression` float32 | bf16): in process,
    row by row in the gossip order (`gossip.mix_blocks`), so it equals the nodes bit for bit;
    on a node, the group's own codec does the cast."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec

    def mix_in_process(
        self, weights: torch.Tensor, blocks: dict[int, torch.Tensor], wire: torch.dtype
    ) -> dict[int, torch.Tensor]:
        codec = self.codec
        n = next(iter(blocks.values())).numel()
        received = {i: codec.decode(codec.encode(x), n) for i, x in blocks.items()}
        mixed = {}
        for i, x in blocks.items():
            row = {j: received[j] for j in _row(weights, i) if j != i}
            mixed[i] = mix_row({**row, i: x}, _row_weights(weights, i))
        return mixed


class ChocoGossip(Mixing):
    """Eq (7) over an int8 | top-k wire with CHOCO-Gossip error feedback
    (deca_flower/compression.py): the engine and the nodes call the same `ChocoMixer`.

    State per (rank, block): the engine keeps it in memory across the block's phases; a
    node holds the active block's only, read from and committed to its state store."""

    def __init__(self, codec: Codec, consensus_step: float = 1.0) -> None:
        self.codec, self.gamma = codec, float(consensus_step)
        self.states: dict[tuple[int, int], ChocoState] = {}
        self.active = -1

    def begin_block(
        self,
        k: int,
        blocks: Mapping[int, torch.Tensor],
        saved: SavedState | None = None,
        members: tuple[int, ...] = (),
        first_phase: bool = True,
    ) -> None:
        """Each rank's state of block k: as kept (in memory, or `saved` in a node's store)
        if it was built with these `members`; else a fresh one. A block's first phase
        starts from the block itself (all clients agree on it); after a membership change
        (a lost or healed site) every member restarts from x_hat = 0 (`ChocoState.restart`),
        since c_i was summed over another mixing matrix."""
        self.active = k
        members = tuple(members)
        if saved is not None:
            self.states = {}
        for rank, block in blocks.items():
            stored = saved(rank) if saved is not None else None
            state = (
                ChocoState.from_tensors(stored, block.device)
                if stored is not None
                else self.states.get((rank, k))
            )
            if state is not None and state.members == members:
                self.states[(rank, k)] = state
            elif state is None and first_phase:
                self.states[(rank, k)] = ChocoState.start(block, members)
            else:
                self.states[(rank, k)] = ChocoState.restart(block, members)

    def block_state(self, rank: int, k: int) -> dict[str, torch.Tensor] | None:
        return self.states[(rank, k)].tensors()

    def forget(self, rank: int, blocks: list[int]) -> None:
        for k in blocks:
            self.states.pop((rank, k), None)

    def _mixer(self, rank: int, k: int, weights: Mapping[int, float]) -> ChocoMixer:
        if (rank, k) not in self.states:
            raise RuntimeError(f"no CHOCO state for rank {rank} block {k}: call begin_block")
        return ChocoMixer(self.codec, rank, weights, self.states[(rank, k)], self.gamma)

    def mix_in_process(
        self, weights: torch.Tensor, blocks: dict[int, torch.Tensor], wire: torch.dtype
    ) -> dict[int, torch.Tensor]:
        """Every member encodes, then each decodes its row and combines."""
        mixers = {i: self._mixer(i, self.active, _row_weights(weights, i)) for i in blocks}
        wires = {i: m.encode(blocks[i]) for i, m in mixers.items()}
        mixed = {}
        for i, mixer in mixers.items():
            x = blocks[i]
            received = {j: wires[j] for j in _row(weights, i) if j != i}
            mixed[i] = mixer.combine(x, mixer.decode(wires[i], received, x.numel()))
        return mixed

    def mix_on_node(
        self,
        group: GossipGroup,
        block: torch.Tensor,
        k: int,
        during: Callable[[], object] | None = None,
    ) -> None:
        # Group ranks name the neighbours' wires; they keep the order of the run's ranks, so
        # the combine order equals the engine's.
        weights = {**group.weights, group.rank: group.self_weight}
        mixer = self._mixer(group.rank, k, weights)
        wire = mixer.encode(block)
        received = group.exchange_wire(wire, numel=block.numel(), block_id=k, during=during)
        qs = mixer.decode(wire, received, block.numel())
        group.check_finite(block, {j: q for j, q in qs.items() if j != group.rank})
        block.copy_(mixer.combine(block, qs))


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

    def mix_on_node(
        self,
        group: GossipGroup,
        block: torch.Tensor,
        k: int,
        during: Callable[[], object] | None = None,
    ) -> None:
        received = group.exchange(block, block_id=k, during=during)
        blocks = {**received, group.rank: block}
        weights = {**group.weights, group.rank: group.self_weight}
        block.copy_(decaf_mix(blocks, weights, self.layout))


MIXINGS: dict[str, type[Mixing]] = {
    "none": NoMixing,
    "average": WeightedAverage,
    "tsvd": TsvdConsensus,
}
