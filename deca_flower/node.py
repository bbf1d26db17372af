"""A DECA peer as one node of a Flower run: phases over gossip, state on local disk.

Framework-free (no `flwr` import): `client_app.py` turns Flower messages into
`PhasePlan`s and calls `Node.run_phase` / `Node.evaluate`. Between phases the
node lives in `NodeStateStore`; a process keeps the last node it served in
memory so that Ray actors serving the same node again reload nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from deca_flower.config import to_yaml
from deca_flower.gossip import GossipGroup
from deca_flower.methods import get_method, steps_per_phase
from deca_flower.optim import STEP_DIAGNOSTICS
from deca_flower.peer import Peer
from deca_flower.reporting import peak_memory_bytes
from deca_flower.state_store import NodeStateStore
from deca_flower.task import (
    RunData,
    compression_codec,
    gossip_codec,
    load_base_model,
    make_partition,
    make_stream,
    prepare_data,
    prepare_local_data,
    resolve_device,
)
from deca_flower.task_kinds import make_task


@dataclass
class PhasePlan:
    """What the coordinator tells a node for one phase (all small scalars and lists)."""

    phase: int
    round: int
    blocks: list[int]
    steps: int
    store_host: str
    store_port: int
    group_name: str
    rank: int
    world_size: int
    neighbours: list[int]
    weights: list[float]
    self_weight: float
    store_key: str = ""  # the run's key (hex) from the coordinator; "" = none (plaintext only)
    members: tuple[int, ...] = ()  # the run ranks mixing in this phase (all but lost sites)
    extra: dict[str, Any] = field(default_factory=dict)

    def weight_map(self) -> dict[int, float]:
        return dict(zip(self.neighbours, self.weights, strict=True))


def config_key(cfg: DictConfig) -> str:
    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16]


class Node:
    def __init__(
        self, cfg: DictConfig, rank: int, state_dir: str | Path, data_path: str | None = None
    ) -> None:
        self.cfg = cfg
        self.rank = rank
        self.device = resolve_device(cfg.model.device, rank)
        self.store = NodeStateStore(state_dir)
        self.run_data: RunData = (
            prepare_local_data(cfg, rank, data_path) if data_path else _run_data(cfg)
        )
        model, self.tokenizer = load_base_model(cfg, self.device)
        partition = make_partition(cfg, model)
        stream = make_stream(cfg, rank, self.run_data, self.tokenizer)
        self.peer = Peer(rank, model, partition, stream, cfg)
        self.method = get_method(cfg)
        self.steps_per_phase = steps_per_phase(cfg, model)
        self.codec = gossip_codec(cfg)  # the group's wire
        self.mixer = self.method.mixer(partition, compression_codec(cfg), cfg.gossip.consensus_step)
        self.task = make_task(cfg)
        self.broken = False
        self.last_phase = -1
        # Of the base model, before any committed block is restored into it: a resumed or
        # returning site must match the others' base model, not their trained blocks.
        self.base_fingerprint = self._fingerprint()
        self.refresh()

    def refresh(self) -> None:
        """Load what another process committed for this node since we last served it."""
        latest = self.store.latest()
        committed = -1 if latest is None else latest["phase"]
        if committed == self.last_phase:
            return
        self.store.restore_into(self.peer.model)
        self.peer.stream.load_state_dict(latest["extra"]["stream"])
        self.last_phase = committed

    # ------------------------------------------------------------------ training

    def run_phase(self, plan: PhasePlan) -> dict[str, Any]:
        """S inner steps per block of the plan, gossiping every step; commit each block.

        If anything fails mid-phase, the half-trained block in memory is discarded
        (the node is rebuilt from its store next time): the store keeps the last
        committed phase, so no training state is lost or corrupted.
        """
        try:
            return self._run_phase(plan)
        except BaseException:
            self.broken = True
            raise

    def _run_phase(self, plan: PhasePlan) -> dict[str, Any]:
        peer = self.peer
        stats = {
            "loss": [],
            "forward_s": 0.0,
            "backward_s": 0.0,
            "optimizer_s": 0.0,
            "communication_s": 0.0,
            "bytes_sent": 0,
            "bytes_received": 0,
            "commit_s": 0.0,
            "overlapped_s": 0.0,
        }
        self.store.discard_staged()
        block_stats: list[dict[str, Any]] = []
        ef_states: dict[int, dict[str, torch.Tensor]] = {}  # committed with their blocks
        with self._group(plan) as group:
            for k in plan.blocks:
                peer.begin_block(k)
                try:
                    # A stateful rule's (CHOCO's) state of block k, as committed with it.
                    saved = lambda _rank, k=k: self.store.block_state(k)  # noqa: E731
                    self.mixer.begin_block(
                        k, {plan.rank: peer.block}, saved, plan.members, plan.round == 0
                    )
                    for r in range(plan.steps):
                        # The last step's prefix would run through the block being mixed.
                        prefetch = self.cfg.gossip.overlap and r < plan.steps - 1
                        self._inner_step(group, k, stats, prefetch)
                    stats["block_numel"] = peer.opt.numel
                    block_stats.append(peer.opt.step_stats())
                    state = self.mixer.block_state(plan.rank, k)
                    if state is not None:
                        ef_states[k] = state
                finally:
                    peer.end_block()
            stats["bytes_sent"] = group.stats.bytes_sent
            stats["bytes_received"] = group.stats.bytes_received
            if group.events:  # rejections outlived (e.g. a forged store value): report them
                stats["security_events"] = [json.dumps(e) for e in group.events]
        # All or nothing: the phase's blocks are committed together, after all were trained.
        t0 = time.perf_counter()
        for k in plan.blocks:
            self.store.stage_block(
                k,
                peer.partition.named_parameters(k),
                plan.phase,
                extra={"stream": peer.stream.state_dict()},
                state=ef_states.get(k),
            )
        self.store.commit_staged()
        stats["commit_s"] = time.perf_counter() - t0
        self.last_phase = plan.phase
        stats.update(_phase_diagnostics(block_stats))
        stats["peak_memory_bytes"] = peak_memory_bytes(self.device)
        stats["train_state_bytes"] = peer.train_state_bytes
        return stats

    def _inner_step(
        self,
        group: GossipGroup,
        k: int,
        stats: dict[str, Any],
        prefetch: bool = False,
    ) -> None:
        result = self.peer.local_step()
        t0 = time.perf_counter()
        overlapped = group.stats.overlapped_s
        # Eq (7) or the method's rule; the next minibatch's frozen prefix runs meanwhile.
        self.mixer.mix_on_node(group, self.peer.block, k, self.peer.prefetch if prefetch else None)
        overlapped = group.stats.overlapped_s - overlapped
        # Time blocked on the exchange; the prefix forward run meanwhile counts as forward.
        stats["communication_s"] += time.perf_counter() - t0 - overlapped
        stats["overlapped_s"] += overlapped
        stats["optimizer_s"] += result.optimizer_s + self.peer.consensus_update()
        stats["forward_s"] += result.forward_s + overlapped
        stats["backward_s"] += result.backward_s
        stats["loss"].append(result.loss)

    def _group(self, plan: PhasePlan) -> GossipGroup:
        return GossipGroup(
            plan.store_host,
            plan.store_port,
            plan.rank,
            plan.world_size,
            plan.neighbours,
            plan.weight_map(),
            plan.self_weight,
            group_name=plan.group_name,
            backend=self.cfg.gossip.backend,
            device=self.device,
            timeout_s=self.cfg.gossip.timeout_s,
            encryption=self.cfg.gossip.encryption,
            store_key=plan.store_key or None,
            codec=self.codec,
        )

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, plan: PhasePlan, zero_shot: bool = False) -> dict[str, Any]:
        """Score the local test slice with this node's model (and the network average)."""
        limit = self.cfg.eval.max_examples_per_client
        sets = {"": self.run_data.test_rows(self.rank, limit)}
        if self.run_data.validation is not None:
            sets["validation_"] = self.run_data.validation_rows(self.rank, limit)
        rows = self.run_data.global_test
        glob = rows is not None
        # Rows rank::n of the global test are scored with the shared model (the average,
        # or the common base model at zero-shot); the coordinator puts them back in order.
        shard = rows.select(range(plan.rank, len(rows), plan.world_size)) if glob else None
        out: dict[str, Any] = {}
        for prefix, x in sets.items():
            self._put(out, prefix, x)
            out.update(_prefixed(prefix, self.task.truth(x)))
        if glob:
            out.update(_prefixed("global_", self.task.truth(rows)))
            if not zero_shot:
                self._put(out, "global_", rows)
        if zero_shot or not self.cfg.eval.average_model:
            if glob and zero_shot:
                self._put(out, "global_shard_", shard)
            return out

        def score_average() -> dict[str, Any]:
            scored: dict[str, Any] = {}
            for prefix, x in sets.items():
                self._put(scored, f"average_{prefix}", x)
            if glob:
                self._put(scored, "global_shard_", shard)
            return scored

        with self._group(plan) as group:
            averaged, out["squared_distance"] = self._with_average_model(plan, score_average, group)
        out.update(averaged)
        return _with_security_events(out, group)

    def _put(self, out: dict[str, Any], prefix: str, rows: Any) -> None:
        """This node's current model's scores on `rows`, under `prefix`."""
        out.update(_prefixed(prefix, self.task.score(self.peer.model, self.tokenizer, rows)))

    def _with_average_model(
        self, plan: PhasePlan, score: Callable[[], Any], group: GossipGroup
    ) -> tuple[Any, float]:
        """score() with the network's parameter average loaded, then this node's own back;
        also this node's squared distance to the average."""
        own = _trainable(self.peer)
        averaged = [p.detach().float().clone() for p in own]
        squared_distance = 0.0
        for p, avg in zip(own, averaged):
            group.all_reduce_(avg)  # one collective per tensor keeps peak memory small
            avg.div_(plan.world_size)
            squared_distance += float(((p.detach().float() - avg) ** 2).sum())
        saved = [p.detach().clone() for p in own]
        with torch.no_grad():
            for p, avg in zip(own, averaged):
                p.copy_(avg.to(p.dtype))
        try:
            return score(), squared_distance
        finally:
            with torch.no_grad():
                for p, s in zip(own, saved):
                    p.copy_(s)

    def export_model(self) -> Path:
        """This node's fine-tuned model + tokenizer in Hugging Face format, beside its state."""
        target = self.store.root / "final_model"
        self.peer.model.save_pretrained(target)
        self.tokenizer.save_pretrained(target)
        return target

    def delete_state(self) -> None:
        shutil.rmtree(self.store.root, ignore_errors=True)
        with contextlib.suppress(OSError):  # the last node of the run removes the run dir
            self.store.root.parent.rmdir()
        _NODES.clear()

    def model_fingerprint(self) -> str:
        """What this site loaded as the base model and tokenizer, for the coordinator to
        compare across sites: names, shapes, dtypes and a few values of every tensor, the
        architecture config, and the tokenizer's vocabulary and special tokens."""
        return self.base_fingerprint

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self.peer.model.config.to_json_string(use_diff=False).encode())
        for name, t in self.peer.model.state_dict().items():
            flat = t.detach().reshape(-1)
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(flat[:64].float().cpu().numpy().tobytes())
            h.update(repr(float(flat.double().sum())).encode())
        vocab = sorted(self.tokenizer.get_vocab().items())
        h.update(repr((vocab, self.tokenizer.all_special_tokens)).encode())
        return h.hexdigest()[:16]

    def data_fingerprint(self) -> str:
        """The task this site's data defines (labels, prompts), not the rows it holds."""
        return hashlib.sha256(repr(self.run_data.task).encode()).hexdigest()[:16]

    def label_counts(self) -> list[int]:
        return self.task.label_counts(self.run_data.clients[self.rank].train)


def _phase_diagnostics(per_block: list[dict[str, Any]]) -> dict[str, float]:
    """Step-weighted means over the phase's blocks (one block per phase: that block's).

    A diagnostic that is undefined (None) is left out of the reply.
    """
    out = {}
    for key in STEP_DIAGNOSTICS:
        pairs = [(b["steps"], b[key]) for b in per_block if b[key] is not None]
        if pairs:
            out[key] = sum(n * v for n, v in pairs) / sum(n for n, _ in pairs)
    return out


def _with_security_events(out: dict[str, Any], group: GossipGroup) -> dict[str, Any]:
    """Rejections an evaluation group outlived (e.g. a replayed store entry): report them."""
    if group.events:
        out["security_events"] = [json.dumps(e) for e in group.events]
    return out


def _prefixed(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}{key}": value for key, value in values.items()}


def _trainable(peer: Peer) -> list[torch.nn.Parameter]:
    return [p for k in range(peer.partition.num_blocks) for p in peer.partition.parameters(k)]


# ---------------------------------------------------------------------- per-process cache

_RUN_DATA: dict[str, RunData] = {}
_NODES: dict[tuple[str, int], Node] = {}


def _run_data(cfg: DictConfig) -> RunData:
    key = config_key(cfg)
    if key not in _RUN_DATA:
        _RUN_DATA.clear()
        _RUN_DATA[key] = prepare_data(cfg)
    return _RUN_DATA[key]


def forget_node(run_key: str, rank: int) -> None:
    """Drop the cached node: its state store changed under it (a rollback)."""
    _NODES.pop((run_key, rank), None)


def get_node(
    cfg: DictConfig, rank: int, state_dir: str | Path, run_key: str, data_path: str | None = None
) -> Node:
    """The node from this process's cache, else rebuilt from its state store.

    Only one node is kept per process: an actor that serves another node next
    time frees this one (its state is already committed to disk).
    """
    key = (run_key, rank)
    node = _NODES.get(key)
    if node is None or node.broken:
        _NODES.clear()
        node = Node(cfg, rank, state_dir, data_path)
        _NODES[key] = node
    else:
        node.refresh()
    return node
