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
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
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
        self.model.train()

    def local_step(self) -> StepResult:
        opt = self._require_opt()
        batch = {k: v.to(self.device) for k, v in self.stream.next_batch().items()}
        t0 = time.perf_counter()
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
        self.partition.freeze_all()

    def _require_opt(self) -> BMAAdam:
        if self.opt is None:
            raise RuntimeError("no active block: call begin_block(k) first")
        return self.opt


def _live_bytes(opt: BMAAdam) -> int:
    tensors = [*opt.state_tensors().values(), *(p.grad for p in opt.params if p.grad is not None)]
    return sum(t.numel() * t.element_size() for t in tensors)
