"""Healing a returning site: the blocks trained while it was away, from a live neighbour.

A site that was lost and restarted (same key, same state dir) restores its committed
blocks, but the survivors went on training without it. Before it gossips again, the
coordinator pairs it with a donor (`membership.heal_donor`) in a two-member gossip group
on the same authenticated, sealed data plane as training; the donor sends each missed
block in fp32 (lossless, whatever the training wire format), the returning site replaces
its copy and commits them as the last committed phase. Both report a hash per block, so
the coordinator can check that the copies agree bit for bit.

Framework-free; the node-level engine replay is `Engine._apply_rejoins`.
"""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any

import torch

from deca_flower.gossip import GossipGroup

if TYPE_CHECKING:
    from deca_flower.node import Node, PhasePlan


def block_hash(params: list[torch.Tensor]) -> str:
    """sha256 of a block's values in fp32 (parameter order), first 16 hex digits."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def heal(node: Node, plan: PhasePlan, blocks: list[int], receive: bool, phase: int) -> dict:
    """Exchange `blocks` with the other member of the heal group; if `receive`, take the
    donor's copies and commit them as `phase` (the last phase every member committed)."""
    t0 = time.perf_counter()
    partition = node.peer.partition
    with _heal_group(node, plan) as group:
        for k in blocks:
            params = partition.parameters(k)
            flat = torch.cat([p.detach().float().reshape(-1) for p in params]).to(node.device)
            (theirs,) = group.exchange(flat, block_id=k).values()
            if receive:
                _copy_into(params, theirs)
        sent, received = group.stats.bytes_sent, group.stats.bytes_received
    if receive:
        for k in blocks:
            node.store.stage_block(
                k, partition.named_parameters(k), phase,
                extra={"stream": node.peer.stream.state_dict()},
            )  # fmt: skip
        node.store.commit_staged()
        node.last_phase = phase
    out: dict[str, Any] = {
        "blocks": list(blocks),
        "hashes": [block_hash(partition.parameters(k)) for k in blocks],
        "bytes_sent": sent,
        "bytes_received": received,
        "heal_s": time.perf_counter() - t0,
    }
    return out


def _copy_into(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        p.copy_(flat[offset : offset + n].view_as(p).to(p.dtype))
        offset += n


def _heal_group(node: Node, plan: PhasePlan) -> GossipGroup:
    other = 1 - plan.rank
    return GossipGroup(
        plan.store_host,
        plan.store_port,
        plan.rank,
        2,
        [other],
        {other: 0.5},
        0.5,
        group_name=plan.group_name,
        backend=node.cfg.gossip.backend,
        device=node.device,
        wire_dtype=torch.float32,  # lossless: a healed block must equal the donor's
        timeout_s=node.cfg.gossip.timeout_s,
        encryption=node.cfg.gossip.encryption,
        store_key=plan.store_key or None,
    )
