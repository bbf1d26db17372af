"""One DECA client's local compute: its model, block partition, data stream and BMAAdam.

The peer knows nothing about how blocks are mixed: the in-process engine mixes
all peers' `block`s with one tensor op, the Flower client over torch.distributed.
Both drive the same four calls per block:

    peer.begin_block(k)
    for r in range(S):
        peer.local_step()              # forward, backward, eqs (4)-(6)
        <overwrite peer.block in place with the mixed block>    # eq (7)
        peer.consensus_update()        # eqs (8)-(10), block -> model
    peer.end_block()

Overlap (``gossip.overlap``): the layers below the active block are frozen for the whole
block, so the next minibatch's forward through them does not depend on the mix.
``peer.prefetch()`` (called while the exchange is in flight) draws that minibatch and runs
it up to the active block's input; the next ``local_step`` replays those hidden states
instead of recomputing them. Same batch order, same ops on the same inputs: bit-exact.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from transformers import PreTrainedModel

from deca_flower.adapters import AdapterPartition
from deca_flower.blocks import BlockPartition
from deca_flower.config import bma_weights
from deca_flower.data import BatchStream
from deca_flower.optim import BMAAdam


@dataclass
class StepResult:
    loss: float
    forward_s: float
    backward_s: float
    optimizer_s: float


class Peer:
    def __init__(
        self,
        rank: int,
        model: PreTrainedModel,
        partition: BlockPartition | AdapterPartition,
        stream: BatchStream,
        cfg: DictConfig,
    ) -> None:
        self.rank = rank
        self.model = model
        self.partition = partition
        self.stream = stream
        self.cfg = cfg
        self.device = next(model.parameters()).device
        self.opt: BMAAdam | None = None
        self.active_block: int | None = None
        # Largest optimizer state + gradients held at once: the memory a method's training
        # needs beyond the model itself, measured on the live tensors (comparable on CPU).
        self.train_state_bytes = 0
        # (batch, hidden states at the active block's input or None) drawn by prefetch()
        self._prefetched: tuple[dict[str, torch.Tensor], Any] | None = None
        partition.freeze_all()

    @property
    def block(self) -> torch.Tensor:
        """The active block's fp32 master copy: what is sent to and mixed with neighbours."""
        return self._require_opt().block

    def begin_block(self, k: int) -> None:
        params = self.partition.activate(k)
        algo = self.cfg.algorithm
        self.opt = BMAAdam(
            params,
            lr=algo.lr,
            betas=(algo.beta1, algo.beta2),
            eps=algo.eps,
            bma=bma_weights(self.cfg),
            discrepancy_ref=algo.discrepancy_ref,
            discrepancy_scale=algo.discrepancy_scale,
            bias_correction=algo.bias_correction,
            track_stats=True,  # per-phase effective step and update/gradient cosine
        )
        self.active_block = k
        self._prefetched = None
        self.model.train()

    def prefetch(self) -> float:
        """Draw the next minibatch and run it through the frozen layers below the active
        block (see the module docstring); returns the seconds it took."""
        self._require_opt()
        t0 = time.perf_counter()
        batch = self._next_batch()
        first = self._first_active_layer()
        hidden = (
            None if first == 0 else frozen_prefix(self.model, self.partition.layers, first, batch)
        )
        self._prefetched = (batch, hidden)
        return time.perf_counter() - t0

    def local_step(self) -> StepResult:
        opt = self._require_opt()
        if self._prefetched is None:
            batch, hidden = self._next_batch(), None
        else:
            (batch, hidden), self._prefetched = self._prefetched, None
        t0 = time.perf_counter()
        with replayed_prefix(self.partition, self._first_active_layer(), hidden):
            loss = self.model(**batch).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.local_step()
        self.train_state_bytes = max(self.train_state_bytes, _live_bytes(opt))
        opt.zero_grad()
        t3 = time.perf_counter()
        return StepResult(float(loss.detach()), t1 - t0, t2 - t1, t3 - t2)

    def consensus_update(self) -> float:
        t0 = time.perf_counter()
        self._require_opt().consensus_update()
        return time.perf_counter() - t0

    def end_block(self) -> None:
        """Free all optimizer state of the block and freeze it again."""
        if self.opt is not None:
            self.opt.reset()
        self.opt = None
        self.active_block = None
        self._prefetched = None
        self.partition.freeze_all()

    def _next_batch(self) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in self.stream.next_batch().items()}

    def _first_active_layer(self) -> int:
        """Index of the active block's first decoder layer (0 for adapter partitions)."""
        if not hasattr(self.partition, "layer_indices") or self.active_block is None:
            return 0
        return self.partition.layer_indices(self.active_block)[0]

    def _require_opt(self) -> BMAAdam:
        if self.opt is None:
            raise RuntimeError("no active block: call begin_block(k) first")
        return self.opt


def _live_bytes(opt: BMAAdam) -> int:
    tensors = [*opt.state_tensors().values(), *(p.grad for p in opt.params if p.grad is not None)]
    return sum(t.numel() * t.element_size() for t in tensors)


class _StopForward(Exception):
    """Raised at the active block's input: the prefix pass needs nothing beyond it."""


class _Replay(nn.Module):
    """Stands in for a frozen layer below the active block: returns the cached output."""

    def __init__(self, output: Any, like: nn.Module) -> None:
        super().__init__()
        self.output = output
        if hasattr(like, "attention_type"):  # some models pick the mask by layer type
            self.attention_type = like.attention_type

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


@torch.no_grad()
def frozen_prefix(
    model: nn.Module, layers: nn.ModuleList, first: int, batch: dict[str, torch.Tensor]
) -> Any:
    """The output of ``layers[first - 1]`` on ``batch`` (what ``layers[first]`` receives)."""
    captured: dict[str, Any] = {}

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        captured["output"] = output

    def stop(module: nn.Module, args: Any) -> None:
        raise _StopForward

    hooks = [
        layers[first - 1].register_forward_hook(keep),
        layers[first].register_forward_pre_hook(stop),
    ]
    try:
        model(**batch)
    except _StopForward:
        pass
    finally:
        for h in hooks:
            h.remove()
    return captured["output"]


@contextmanager
def replayed_prefix(partition: Any, first: int, hidden: Any) -> Iterator[None]:
    """Inside: layers below ``first`` return ``hidden`` (their cached output) at no cost."""
    if hidden is None:
        yield
        return
    layers = partition.layers
    originals = [layers[i] for i in range(first)]
    try:
        for i, layer in enumerate(originals):
            layers[i] = _Replay(hidden, layer)
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
