"""A DECA peer as one node of a Flower run: phases over gossip, state on local disk.

Framework-free (no `flwr` import): `client_app.py` turns Flower messages into
`PhasePlan`s and calls `Node.run_phase` / `Node.evaluate`. Between phases the
node lives in `NodeStateStore`; a process keeps the last node it served in
memory so that Ray actors serving the same node again reload nothing.
"""

from __future__ import annotations

import contextlib
import functools
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

from deca_flower.compression import ChocoMixer, ChocoState
from deca_flower.config import to_yaml
from deca_flower.decaf import decaf_mix, lora_layout
from deca_flower.evaluation import score_labels
from deca_flower.generation import generation_metrics, is_generation_task, load_judge
from deca_flower.gossip import GossipGroup
from deca_flower.methods import get_method, steps_per_phase
from deca_flower.optim import STEP_DIAGNOSTICS
from deca_flower.peer import Peer
from deca_flower.reporting import peak_memory_bytes
from deca_flower.state_store import NodeStateStore
from deca_flower.task import (
    RunData,
    gossip_codec,
    load_base_model,
    make_partition,
    make_stream,
    prepare_data,
    prepare_local_data,
    resolve_device,
)


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
        self.lora_layout = (
            lora_layout([(n, p.shape) for n, p in partition.named_parameters(0)])
            if self.method.mixing == "tsvd"
            else None
        )
        self.judge = load_judge(cfg.eval.judge)
        self.codec = gossip_codec(cfg)
        self.broken = False
        self.last_phase = -1
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
                    mixer = self._mixer(plan, k)
                    for r in range(plan.steps):
                        # The last step's prefix would run through the block being mixed.
                        prefetch = self.cfg.gossip.overlap and r < plan.steps - 1
                        self._inner_step(group, k, stats, mixer, prefetch)
                    stats["block_numel"] = peer.opt.numel
                    block_stats.append(peer.opt.step_stats())
                    if mixer is not None:
                        ef_states[k] = mixer.state.tensors()
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

    def _mixer(self, plan: PhasePlan, k: int) -> ChocoMixer | None:
        """CHOCO state of block k: as committed with the block, or fresh on its first phase."""
        if not self.codec.error_feedback or not self.method.communicates:
            return None
        saved = self.store.block_state(k)
        state = (
            ChocoState.start(self.peer.block)
            if saved is None
            else ChocoState.from_tensors(saved, self.device)
        )
        # Group ranks (plan.rank), as the group names the neighbours' wires; they keep the
        # order of the ranks, so the combine order equals the engine's.
        weights = {**plan.weight_map(), plan.rank: plan.self_weight}
        return ChocoMixer(self.codec, plan.rank, weights, state, self.cfg.gossip.consensus_step)

    def _inner_step(
        self,
        group: GossipGroup,
        k: int,
        stats: dict[str, Any],
        mixer: ChocoMixer | None = None,
        prefetch: bool = False,
    ) -> None:
        result = self.peer.local_step()
        t0 = time.perf_counter()
        overlapped = group.stats.overlapped_s
        self._mix(group, k, mixer, self.peer.prefetch if prefetch else None)
        overlapped = group.stats.overlapped_s - overlapped
        # Time blocked on the exchange; the prefix forward run meanwhile counts as forward.
        stats["communication_s"] += time.perf_counter() - t0 - overlapped
        stats["overlapped_s"] += overlapped
        stats["optimizer_s"] += result.optimizer_s + self.peer.consensus_update()
        stats["forward_s"] += result.forward_s + overlapped
        stats["backward_s"] += result.backward_s
        stats["loss"].append(result.loss)

    def _mix(
        self,
        group: GossipGroup,
        k: int,
        mixer: ChocoMixer | None = None,
        during: Callable[[], object] | None = None,
    ) -> None:
        """Eq (7) over the gossip group, or the method's replacement for it."""
        block = self.peer.block
        if self.method.mixing == "none":
            if during is not None:
                during()
            return
        if mixer is not None:
            wire = mixer.encode(block)
            received = group.exchange_wire(wire, numel=block.numel(), block_id=k, during=during)
            qs = mixer.decode(wire, received, block.numel())
            group.check_finite(block, {j: q for j, q in qs.items() if j != group.rank})
            block.copy_(mixer.combine(block, qs))
            return
        if self.method.mixing == "average":
            block.copy_(group.mix(block, block_id=k, during=during))
            return
        received = group.exchange(block, block_id=k, during=during)
        blocks = {**received, group.rank: block}
        weights = {**group.weights, group.rank: group.self_weight}
        block.copy_(decaf_mix(blocks, weights, self.lora_layout))

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
        if is_generation_task(self.cfg.data.name):
            return self._evaluate_generation(plan, zero_shot)
        limit = self.cfg.eval.max_examples_per_client
        sets = {"": self.run_data.eval_slice(self.rank, limit)}
        if self.run_data.validation is not None:
            sets["validation_"] = self.run_data.validation_slice(self.rank, limit)
        glob = self.run_data.global_test is not None
        texts, labels = self.run_data.global_slice() if glob else ([], [])
        # Rows rank::n of the global test are scored with the shared model (the average,
        # or the common base model at zero-shot); the coordinator puts them back in order.
        shard = texts[plan.rank :: plan.world_size]
        out: dict[str, Any] = {}
        for prefix, (x, y) in sets.items():
            self._put(out, prefix, x)
            out[f"{prefix}labels"] = y
        if glob:
            out["global_labels"] = labels
            if not zero_shot:
                self._put(out, "global_", texts)
        if zero_shot or not self.cfg.eval.average_model:
            if glob and zero_shot:
                self._put(out, "global_shard_", shard)
            return out

        def score_average() -> dict[str, Any]:
            scored: dict[str, Any] = {}
            for prefix, (x, _) in sets.items():
                self._put(scored, f"average_{prefix}", x)
            if glob:
                self._put(scored, "global_shard_", shard)
            return scored

        with self._group(plan) as group:
            averaged, out["squared_distance"] = self._with_average_model(
                plan, score_average, group
            )
        out.update(averaged)
        return out

    def _put(self, out: dict[str, Any], prefix: str, texts: list[str]) -> None:
        out[f"{prefix}predictions"], out[f"{prefix}ll_predictions"] = self._score(texts)

    def _evaluate_generation(self, plan: PhasePlan, zero_shot: bool) -> dict[str, Any]:
        limit = self.cfg.eval.max_examples_per_client
        test = self.run_data.clients[self.rank].test
        test = test.select(range(min(limit, len(test))))
        score = functools.partial(self._generation_metrics, test)
        out: dict[str, Any] = {"metrics": score()}
        if zero_shot or not self.cfg.eval.average_model:
            return out
        with self._group(plan) as group:
            out["average_metrics"], out["squared_distance"] = self._with_average_model(
                plan, score, group
            )
        return out

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

    def _generation_metrics(self, test: Any) -> dict[str, float]:
        return generation_metrics(
            self.peer.model,
            self.tokenizer,
            test,
            max_length=self.cfg.data.max_length,
            max_new_tokens=self.cfg.eval.max_new_tokens,
            batch_size=self.cfg.eval.batch_size,
            judge=self.judge,
        )

    def _score(self, texts: list[str]) -> tuple[list[int], list[int]]:
        """(generated labels, likelihood labels) of this node's current model."""
        return score_labels(self.peer.model, self.tokenizer, self.run_data.task, texts, self.cfg)

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
        if is_generation_task(self.cfg.data.name):
            return []  # instruction tuning: no labels
        labels = self.run_data.clients[self.rank].train["label"]
        return [
            sum(1 for y in labels if y == c) for c in range(len(self.run_data.task.verbalizers))
        ]


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
