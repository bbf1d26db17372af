"""In-process DECA: n virtual clients in one process, exact mixing as one tensor op.

This is the ground truth the Flower app is checked against and the quickest
way to run an ablation. Usage:

    python -m deca_flower.engine model=tiny topology=ring train.rounds=2
    # or from Python
    result = run_engine(load_config(...))
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from deca_flower.blocks import block_order
from deca_flower.config import ConfigError, parse_fault_injection, to_yaml
from deca_flower.heal import block_hash
from deca_flower.membership import full_membership, heal_donor, with_members, without
from deca_flower.methods import get_method, steps_per_phase
from deca_flower.mixing import mix_blocks  # noqa: F401  (engine.mix_blocks: its old home)
from deca_flower.optim import STEP_DIAGNOSTICS
from deca_flower.peer import Peer
from deca_flower.reporting import (
    Progress,
    RunDir,
    format_eval,
    peak_memory_bytes,
    plot_run,
    read_metrics,
    summary_markdown,
)
from deca_flower.task import (
    RunData,
    build_topology,
    clone_sharing_frozen,
    compression_codec,
    gossip_codec,
    load_base_model,
    make_partition,
    make_stream,
    prepare_data,
    resolve_device,
    wire_dtype,
)
from deca_flower.task_kinds import make_task
from deca_flower.topology import describe


@dataclass
class EngineResult:
    out_dir: Path
    records: list[dict[str, Any]]
    peers: list[Peer] = field(repr=False)

    def evals(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["type"] == "eval"]


class Engine:
    def __init__(self, cfg: DictConfig, out_dir: str | Path | None = None) -> None:
        # Everything that can fail on bad input is built before any output exists.
        if cfg.resume or cfg.faults.stop_coordinator_at >= 0:
            raise ConfigError(
                "resume and faults.stop_coordinator_at apply to Flower runs (`flwr run .`, a "
                "deployment, `deca-flower lab`); the in-process engine runs start to end: "
                "unset them"
            )
        self.cfg = cfg
        self.device = resolve_device(cfg.model.device)
        self.graph, self.weights = build_topology(cfg)
        self.run_data: RunData = prepare_data(cfg)
        self.method = get_method(cfg)
        self.task = make_task(cfg)
        self.peers = self._build_peers()
        self.steps = steps_per_phase(cfg, self.peers[0].model)
        self.wire = wire_dtype(cfg)
        # The byte counts of the wire; the mixing rule, over gossip.compression's wire.
        self.codec = gossip_codec(cfg)
        self.mixer = self.method.mixer(
            self.peers[0].partition, compression_codec(cfg), cfg.gossip.consensus_step
        )
        self.run_dir = RunDir(out_dir or cfg.output_dir, cfg.run_name, cfg)
        self.progress = Progress(self.total_phases)
        # faults.inject replays lost sites: from that phase on the run goes on without them,
        # with W rebuilt on the survivors, as the coordinator does (faults.on_peer_loss).
        self.membership = full_membership(self.graph, self.weights)
        self.injected = self.method.faults_to_replay(parse_fault_injection(cfg.faults.inject))
        self.rejoins = parse_fault_injection(cfg.faults.rejoin, "faults.rejoin")
        self.lost_at: dict[int, int] = {}
        self.phase_blocks: list[int] = []  # the block each phase trained
        self.phase = 0

    @property
    def num_blocks(self) -> int:
        return self.peers[0].partition.num_blocks

    @property
    def total_phases(self) -> int:
        return self.cfg.train.rounds * self.num_blocks

    def _build_peers(self) -> list[Peer]:
        base, self.tokenizer = load_base_model(self.cfg, self.device)
        base_partition = make_partition(self.cfg, base)
        peers = []
        for rank, clients in enumerate(self.method.training_sets(self.cfg.num_clients)):
            model = base if rank == 0 else clone_sharing_frozen(base, base_partition)
            partition = base_partition if rank == 0 else make_partition(self.cfg, model)
            stream = make_stream(self.cfg, rank, self.run_data, self.tokenizer, clients)
            peers.append(Peer(rank, model, partition, stream, self.cfg))
        return peers

    # ------------------------------------------------------------------ the run

    def run(self) -> EngineResult:
        cfg = self.cfg
        self.run_dir.write_text("config.yaml", to_yaml(cfg))
        self._log_setup()
        if cfg.eval.zero_shot:
            self._announce_eval(-1)
            self._evaluate(round_idx=-1)
        global_step = 0
        for t in range(cfg.train.rounds):
            for k in block_order(self.num_blocks, cfg.train.block_order, t, cfg.seed):
                self._apply_rejoins()
                self._apply_injected_faults()
                global_step = self._run_block(t, k, global_step)
                self.phase_blocks.append(k)
                self.phase += 1
            if (t + 1) % cfg.eval.every_rounds == 0 or t == cfg.train.rounds - 1:
                self._announce_eval(t)
                self._evaluate(round_idx=t)
        if cfg.train.final_average:
            self._average_all_models()
        return self._finish()

    @property
    def members(self) -> list[int]:
        """The ranks of the models that train now (one model on pooled data: rank 0)."""
        return [p.rank for p in self.peers if p.rank in self.membership.members]

    def _apply_injected_faults(self) -> None:
        lost = {r for r, p in self.injected if p == self.phase and r in self.members}
        if not lost:
            return
        faults = self.cfg.faults
        self.membership = without(
            self.membership, lost, self.graph, self.cfg.topology.mixing, faults.min_peers
        )
        for rank in lost:
            self.lost_at[rank] = self.phase
        self.run_dir.log({"type": "membership", "phase": self.phase, **self.membership.record()})
        self.progress.note(f"faults.inject: going on without rank(s) {sorted(lost)}")

    @torch.no_grad()
    def _apply_rejoins(self) -> None:
        """faults.rejoin: a lost rank is back; it takes the blocks trained since it was lost
        from its donor (`heal_donor`, the coordinator's rule), then trains again."""
        back = sorted(r for r, p in self.rejoins if p == self.phase and r in self.lost_at)
        for rank in back:
            blocks = sorted(set(self.phase_blocks[self.lost_at.pop(rank) :]))
            donor = heal_donor(rank, self.membership, self.graph)
            mine, theirs = self.peers[rank].partition, self.peers[donor].partition
            for k in blocks:
                for p, q in zip(mine.parameters(k), theirs.parameters(k), strict=True):
                    p.copy_(q)
            self.mixer.forget(rank, blocks)  # as a node's heal commits them without state
            hashes = [block_hash(mine.parameters(k)) for k in blocks]
            self.run_dir.log({"type": "heal", "phase": self.phase, "rank": rank, "from": donor,
                              "blocks": blocks, "hashes": hashes})  # fmt: skip
        if back:
            self.membership = with_members(self.membership, {*self.members, *back}, self.graph,
                                           self.weights, self.cfg.topology.mixing)  # fmt: skip
            self.run_dir.log({"type": "rejoined", "phase": self.phase, "ranks": back})
            self.run_dir.log(
                {"type": "membership", "phase": self.phase, **self.membership.record()}
            )
            self.progress.note(f"faults.rejoin: rank(s) {back} are back (healed)")

    def _announce_eval(self, round_idx: int) -> None:
        cfg = self.cfg
        average = cfg.eval.average_model and len(self.peers) > 1
        self.progress.evaluating(
            round_idx, cfg.num_clients, cfg.eval.max_examples_per_client, average
        )

    def _run_block(self, t: int, k: int, global_step: int) -> int:
        peers = [self.peers[r] for r in self.members]
        for peer in peers:
            peer.begin_block(k)
        # Stateful rules (CHOCO) keep their state per block across its phases, as the nodes
        # keep it in their state stores.
        self.mixer.begin_block(
            k,
            {peer.rank: peer.block for peer in peers},
            members=tuple(self.members),
            first_phase=t == 0,
        )
        n = len(self.peers)
        timing = {"forward_s": [0.0] * n, "backward_s": [0.0] * n, "optimizer_s": [0.0] * n}
        comm_s = 0.0
        losses: list[float | None] = []
        for r in range(self.steps):
            results = {peer.rank: peer.local_step() for peer in peers}
            t0 = time.perf_counter()
            self._mix()
            comm_s += time.perf_counter() - t0
            for peer in peers:
                i, res = peer.rank, results[peer.rank]
                timing["optimizer_s"][i] += res.optimizer_s + peer.consensus_update()
                timing["forward_s"][i] += res.forward_s
                timing["backward_s"][i] += res.backward_s
            losses = [results[i].loss if i in results else None for i in range(len(self.peers))]
            self.run_dir.log(
                {
                    "type": "step",
                    "round": t,
                    "block": k,
                    "step": r,
                    "global_step": global_step,
                    "loss": losses,
                }
            )
            global_step += 1
        block_numel = peers[0].opt.numel
        lost = dict.fromkeys(STEP_DIAGNOSTICS)  # a lost site has no step to describe
        stats = {peer.rank: peer.opt.step_stats() for peer in peers}
        diagnostics = step_diagnostics([stats.get(i, lost) for i in range(len(self.peers))])
        for peer in peers:
            peer.end_block()
        self._log_phase(t, k, block_numel, {**timing, **diagnostics}, comm_s)
        alive = [loss for loss in losses if loss is not None]
        self.progress.phase_done(f"round {t + 1} block {k}", sum(alive) / len(alive))
        return global_step

    def _mix(self) -> None:
        """Eq (7) (or the method's replacement for it), in place on every peer's block."""
        # Rows and columns of lost sites are 0 in W: they neither send nor receive.
        blocks = {i: self.peers[i].block for i in self.members}
        mixed = self.mixer.mix_in_process(self.membership.weights, blocks, self.wire)
        for i, block in mixed.items():
            self.peers[i].block.copy_(block)

    # ------------------------------------------------------------------ logging

    def _log_setup(self) -> None:
        info = describe(self.graph, self.weights)
        self.run_dir.log({"type": "topology", **info, "mixing_matrix": self.weights.tolist()})
        sizes = [len(c.train) for c in self.run_data.clients]
        self.run_dir.log(
            {
                "type": "data",
                "train_sizes": sizes,
                "test_sizes": [len(c.test) for c in self.run_data.clients],
                **(self.run_data.split or {}),
            }
        )
        self.task.plot_label_distribution(
            [c.train for c in self.run_data.clients],
            self.run_dir.path / "label_distribution.png",
            self.run_data.split,
        )
        self.progress.note(
            f"{self.method.description}; {self.cfg.num_clients} clients on a {info['name']} "
            f"graph (spectral gap {info['spectral_gap']:.3f}), {self.num_blocks} blocks x "
            f"{self.steps} steps x {self.cfg.train.rounds} rounds, "
            f"device {self.device}; writing {self.run_dir.path}"
        )

    def _log_phase(self, t: int, k: int, numel: int, timing: dict, comm_s: float) -> None:
        steps = self.steps
        degrees = [
            len(self.membership.neighbours(i))
            if self.method.communicates and i in self.members
            else 0
            for i in range(len(self.peers))
        ]
        sent = [self.codec.wire_bytes(numel) * d * steps for d in degrees]
        self.run_dir.log(
            {
                "type": "phase",
                "round": t,
                "block": k,
                "block_numel": numel,
                "members": self.members,
                "bytes_sent": sent,
                "bytes_received": sent,
                **timing,
                "communication_s": [comm_s / len(self.peers)] * len(self.peers),
                "peak_memory_bytes": [peak_memory_bytes(self.device)] * len(self.peers),
                "train_state_bytes": [p.train_state_bytes for p in self.peers],
            }
        )

    # ------------------------------------------------------------------ evaluation

    def _evaluate(self, round_idx: int) -> dict[str, Any]:
        limit = self.cfg.eval.max_examples_per_client
        slices = [self.run_data.test_rows(i, limit) for i in range(self.cfg.num_clients)]
        one_model = round_idx == -1 or len(self.peers) == 1  # one model for all test sets
        avg_model = None
        if not one_model and self.cfg.eval.average_model:
            avg_model = self._average_model()
        record = self._record(round_idx, slices, one_model, avg_model)
        if round_idx >= 0:
            record["consensus_distance"] = consensus_distance(self.peers)
        if self.run_data.validation is not None:
            val = [self.run_data.validation_rows(i, limit) for i in range(self.cfg.num_clients)]
            part = self._record(round_idx, val, one_model, avg_model)
            record["validation"] = {k: part[k] for k in ("clients", "client_mean", "average")
                                    if k in part}  # fmt: skip
        if self.run_data.global_test is not None:
            record["global_test"] = self._global_test(one_model, avg_model)
        del avg_model
        self.run_dir.log(record)
        self.progress.note(format_eval(record))
        return record

    def _record(self, round_idx, slices, one_model, avg_model) -> dict[str, Any]:
        """Every client's model on its own slice, and the parameter average on all of them
        (metrics pooled)."""
        task, tokenizer = self.task, self.tokenizer
        models = [self.peers[0 if one_model else i].model for i in range(len(slices))]
        clients = [{**task.score(m, tokenizer, rows), **task.truth(rows)}
                   for m, rows in zip(models, slices)]  # fmt: skip
        average = None if avg_model is None else task.score_union(avg_model, tokenizer, slices)
        return task.pool(round_idx, clients, average, self.train_counts)

    def _global_test(self, one_model: bool, avg_model) -> dict[str, Any]:
        rows, n = self.run_data.global_test, self.cfg.num_clients
        if one_model:
            scored = [self.task.score(self.peers[0].model, self.tokenizer, rows)] * n
        else:
            scored = [self.task.score(p.model, self.tokenizer, rows) for p in self.peers]
        average = None if avg_model is None else self.task.score(avg_model, self.tokenizer, rows)
        return self.task.global_record(self.task.truth(rows), scored, average, self.train_counts)

    @property
    def train_counts(self) -> list[list[int]]:
        return [self.task.label_counts(c.train) for c in self.run_data.clients]

    def _average_model(self):
        first = self.peers[0]
        avg = clone_sharing_frozen(first.model, first.partition)
        avg_partition = make_partition(self.cfg, avg)
        with torch.no_grad():
            for k in range(avg_partition.num_blocks):
                per_peer = [p.partition.parameters(k) for p in self.peers]
                for j, target in enumerate(avg_partition.parameters(k)):
                    stacked = torch.stack([params[j].detach().float() for params in per_peer])
                    target.copy_(stacked.mean(0).to(target.dtype))
        return avg

    def _average_all_models(self) -> None:
        avg = self._average_model()
        avg_params = [p for n, p in avg.named_parameters()]
        with torch.no_grad():
            for peer in self.peers:
                for target, source in zip(peer.model.parameters(), avg_params):
                    if target is not source:
                        target.copy_(source)
        self.run_dir.log({"type": "final_average"})

    def _finish(self) -> EngineResult:
        records = read_metrics(self.run_dir.metrics_path)
        self.run_dir.write_text("summary.md", summary_markdown(records, to_yaml(self.cfg)))
        plot_run(records, self.run_dir.path, self.task.label_names)
        out = self.run_dir.finish()
        self.progress.note(f"done: {out}/summary.md")
        return EngineResult(out, records, self.peers)


# ---------------------------------------------------------------------- shared helpers


def consensus_distance(peers: Sequence[Peer]) -> float:
    """sqrt(mean_i ||theta_i - mean(theta)||^2) over all decoder-layer parameters."""
    total = 0.0
    for k in range(peers[0].partition.num_blocks):
        per_peer = [p.partition.parameters(k) for p in peers]
        for j in range(len(per_peer[0])):
            stacked = torch.stack([params[j].detach().float() for params in per_peer])
            total += float(((stacked - stacked.mean(0)) ** 2).sum())
    return (total / len(peers)) ** 0.5


def step_diagnostics(stats: Sequence[dict[str, float | None]]) -> dict[str, list]:
    """Per client: mean step sizes over lr and update/gradient cosine of one phase."""
    return {key: [s[key] for s in stats] for key in STEP_DIAGNOSTICS}


def run_engine(cfg: DictConfig, out_dir: str | Path | None = None) -> EngineResult:
    return Engine(cfg, out_dir).run()


def main(argv: Sequence[str] | None = None) -> None:
    from deca_flower.cli import engine_main

    engine_main(argv)


if __name__ == "__main__":
    main()
