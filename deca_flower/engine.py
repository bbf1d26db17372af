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

import datasets
import torch
from omegaconf import DictConfig

from deca_flower.blocks import block_order
from deca_flower.compression import ChocoMixer, ChocoState
from deca_flower.config import parse_fault_injection, to_yaml
from deca_flower.data import label_counts, plot_label_distribution
from deca_flower.decaf import decaf_mix, lora_layout
from deca_flower.evaluation import (
    eval_record,
    global_test_record,
    pooled_metrics,
    score_labels,
)
from deca_flower.generation import (
    GENERATION_METRICS,
    generation_metrics,
    is_generation_task,
    load_judge,
)
from deca_flower.gossip import mix_blocks as mix_row
from deca_flower.membership import full_membership, without
from deca_flower.methods import get_method, steps_per_phase
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
    gossip_codec,
    load_base_model,
    make_partition,
    make_pooled_stream,
    make_stream,
    prepare_data,
    resolve_device,
    wire_dtype,
)
from deca_flower.topology import describe


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
        self.cfg = cfg
        self.device = resolve_device(cfg.model.device)
        self.graph, self.weights = build_topology(cfg)
        self.run_data: RunData = prepare_data(cfg)
        self.method = get_method(cfg)
        self.generation = is_generation_task(cfg.data.name)
        self.judge = load_judge(cfg.eval.judge)
        self.peers = self._build_peers()
        self.steps = steps_per_phase(cfg, self.peers[0].model)
        self.wire = wire_dtype(cfg)
        self.codec = gossip_codec(cfg)
        # CHOCO state per (client, block): kept across a block's phases, as nodes keep it
        # in their state stores (see deca_flower/compression.py for the reset policy).
        self.ef_states: dict[tuple[int, int], ChocoState] = {}
        self.mixers: dict[int, ChocoMixer] = {}
        if self.method.mixing == "tsvd":
            first = self.peers[0]
            self.lora_layout = lora_layout(
                [(n, p.shape) for n, p in first.partition.named_parameters(0)]
            )
        self.run_dir = RunDir(out_dir or cfg.output_dir, cfg.run_name, cfg)
        self.progress = Progress(self.total_phases)
        # faults.inject replays lost sites: from that phase on the run goes on without them,
        # with W rebuilt on the survivors, as the coordinator does (faults.on_peer_loss).
        self.membership = full_membership(self.graph, self.weights)
        self.injected = parse_fault_injection(cfg.faults.inject)
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
        if self.method.pooled_data:
            stream = make_pooled_stream(self.cfg, self.run_data, self.tokenizer)
            return [Peer(0, base, base_partition, stream, self.cfg)]
        peers = []
        for rank in range(self.cfg.num_clients):
            model = base if rank == 0 else clone_sharing_frozen(base, base_partition)
            partition = base_partition if rank == 0 else make_partition(self.cfg, model)
            stream = make_stream(self.cfg, rank, self.run_data, self.tokenizer)
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
                self._apply_injected_faults()
                global_step = self._run_block(t, k, global_step)
                self.phase += 1
            if (t + 1) % cfg.eval.every_rounds == 0 or t == cfg.train.rounds - 1:
                self._announce_eval(t)
                self._evaluate(round_idx=t)
        if cfg.train.final_average:
            self._average_all_models()
        return self._finish()

    @property
    def members(self) -> list[int]:
        return [0] if self.method.pooled_data else list(self.membership.members)

    def _apply_injected_faults(self) -> None:
        lost = {r for r, p in self.injected if p == self.phase and r in self.members}
        if not lost or self.method.pooled_data:
            return
        faults = self.cfg.faults
        self.membership = without(
            self.membership, lost, self.graph, self.cfg.topology.mixing, faults.min_peers
        )
        self.run_dir.log({"type": "membership", "phase": self.phase, **self.membership.record()})
        self.progress.note(f"faults.inject: going on without rank(s) {sorted(lost)}")

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
        self.mixers = self._mixers(k)
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

    def _mixers(self, k: int) -> dict[int, ChocoMixer]:
        """One CHOCO mixer per member, over this epoch's W (as the nodes get it in the plan).

        The EF state is kept across membership epochs, as a node keeps it in its store; after
        a loss the survivors' consensus terms still hold the lost site's past ``q`` (a known
        limitation of CHOCO under membership changes, docs/performance.md)."""
        if not self.codec.error_feedback or not self.method.communicates:
            return {}
        mixers = {}
        gamma = self.cfg.gossip.consensus_step
        for i in self.members:
            if (i, k) not in self.ef_states:
                self.ef_states[(i, k)] = ChocoState.start(self.peers[i].block)
            state = self.ef_states[(i, k)]
            weights = {j: float(self.membership.weights[i, j]) for j in self._row(i)}
            mixers[i] = ChocoMixer(self.codec, i, weights, state, gamma)
        return mixers

    def _row(self, i: int) -> list[int]:
        """Member i's neighbours in this epoch and itself, as the nodes see them."""
        return sorted({*self.membership.neighbours(i), i})

    def _mix(self) -> None:
        """Eq (7) (or the method's replacement for it), in place on every peer's block."""
        peers = self.peers
        if self.method.mixing == "none":
            return
        if self.mixers:
            self._mix_choco()
            return
        if self.method.mixing == "average" and self.cfg.gossip.compression != "none":
            self._mix_rows()
            return
        members = self.members
        if self.method.mixing == "average":
            # Rows and columns of lost sites are 0 in W: they neither send nor receive.
            weights = self.membership.weights
            active = peers[members[0]].block
            blocks = [p.block if p.rank in members else torch.zeros_like(active) for p in peers]
            mixed = mix_blocks(weights, torch.stack(blocks), self.wire)
        else:
            mixed = {i: self._decaf_row(i) for i in members}
        for i in members:
            peers[i].block.copy_(mixed[i])

    def _mix_choco(self) -> None:
        """CHOCO-Gossip with the nodes' own code: every member encodes, then each combines."""
        blocks = {i: self.peers[i].block for i in self.mixers}
        wires = {i: m.encode(blocks[i]) for i, m in self.mixers.items()}
        for i, mixer in self.mixers.items():
            x = blocks[i]
            received = {j: wires[j] for j in self._row(i) if j != i}
            qs = mixer.decode(wires[i], received, x.numel())
            x.copy_(mixer.combine(x, qs))

    def _mix_rows(self) -> None:
        """A compressed cast wire, row by row in the gossip order (bit-equal to the nodes)."""
        codec = self.codec
        blocks = {i: self.peers[i].block for i in self.members}
        n = next(iter(blocks.values())).numel()
        received = {i: codec.decode(codec.encode(x), n) for i, x in blocks.items()}
        mixed = {}
        for i, x in blocks.items():
            row = {j: received[j] for j in self._row(i) if j != i}
            weights = {j: float(self.membership.weights[i, j]) for j in self._row(i)}
            mixed[i] = mix_row({**row, i: x}, weights)
        for i, x in blocks.items():
            x.copy_(mixed[i])

    def _decaf_row(self, i: int) -> torch.Tensor:
        row = self.membership.weights[i]
        ranks = [j for j in range(len(self.peers)) if row[j] > 0]
        blocks = {
            j: self.peers[j].block if j == i else self.peers[j].block.to(self.wire).float()
            for j in ranks
        }
        return decaf_mix(blocks, {j: float(row[j]) for j in ranks}, self.lora_layout)

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
        if not self.generation:  # instruction data has no labels
            plot_label_distribution(
                [c.train for c in self.run_data.clients],
                self.run_dir.path / "label_distribution.png",
                label_names=list(self.run_data.task.verbalizers),
                split=self.run_data.split,
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
        if self.generation:
            return self._evaluate_generation(round_idx)
        limit = self.cfg.eval.max_examples_per_client
        slices = [self.run_data.eval_slice(i, limit) for i in range(self.cfg.num_clients)]
        one_model = round_idx == -1 or len(self.peers) == 1  # one model for all test sets
        avg_model = None
        if not one_model and self.cfg.eval.average_model:
            avg_model = self._average_model()
        record = self._classification_record(round_idx, slices, one_model, avg_model)
        if round_idx >= 0:
            record["consensus_distance"] = consensus_distance(self.peers)
        if self.run_data.validation is not None:
            val = [self.run_data.validation_slice(i, limit) for i in range(self.cfg.num_clients)]
            part = self._classification_record(round_idx, val, one_model, avg_model)
            record["validation"] = {k: part[k] for k in ("clients", "client_mean", "average")
                                    if k in part}  # fmt: skip
        if self.run_data.global_test is not None:
            record["global_test"] = self._global_test(one_model, avg_model)
        del avg_model
        self.run_dir.log(record)
        self.progress.note(format_eval(record))
        return record

    def _classification_record(self, round_idx, slices, one_model, avg_model) -> dict[str, Any]:
        """Generated and likelihood labels of every client's model on its own slice, and of
        the parameter average on all of them (metrics pooled)."""
        num_labels = len(self.run_data.task.verbalizers)
        models = [self.peers[0 if one_model else i].model for i in range(len(slices))]
        scored = [self._score(m, texts) for m, (texts, _) in zip(models, slices)]
        labels = [y for _, y in slices]
        preds, ll = [s[0] for s in scored], [s[1] for s in scored]
        record = eval_record(round_idx, labels, preds, num_labels, ll, self.train_counts)
        if avg_model is not None:
            avg = [self._score(avg_model, texts) for texts, _ in slices]
            avg_preds, avg_ll = [a[0] for a in avg], [a[1] for a in avg]
            record["average"] = pooled_metrics(labels, avg_preds, num_labels, avg_ll,
                                               self.train_counts)  # fmt: skip
            record["average_predictions"] = avg_preds
            record["average_ll_predictions"] = avg_ll
        return record

    def _global_test(self, one_model: bool, avg_model) -> dict[str, Any]:
        texts, labels = self.run_data.global_slice()
        n = self.cfg.num_clients
        if one_model:
            scored = [self._score(self.peers[0].model, texts)] * n
        else:
            scored = [self._score(p.model, texts) for p in self.peers]
        average = None if avg_model is None else self._score(avg_model, texts)
        num_labels = len(self.run_data.task.verbalizers)
        return global_test_record(labels, [s[0] for s in scored], [s[1] for s in scored],
                                  average, num_labels, self.train_counts)  # fmt: skip

    @property
    def train_counts(self) -> list[list[int]]:
        num_labels = len(self.run_data.task.verbalizers)
        return label_counts([c.train for c in self.run_data.clients], "label", num_labels)

    def _evaluate_generation(self, round_idx: int) -> dict[str, Any]:
        """Perplexity and ROUGE-L per client on its local test split (instruction tuning)."""
        cfg = self.cfg
        tests = [
            c.test.select(range(min(cfg.eval.max_examples_per_client, len(c.test))))
            for c in self.run_data.clients
        ]
        one_model = round_idx == -1 or len(self.peers) == 1
        models = [self.peers[0 if one_model else i].model for i in range(cfg.num_clients)]
        per_client = [self._generation_metrics(m, test) for m, test in zip(models, tests)]
        record: dict[str, Any] = {
            "type": "eval",
            "task": "generation",
            "round": round_idx,
            "clients": per_client,
            "client_mean": {
                k: _mean([m[k] for m in per_client])
                for k in GENERATION_METRICS
                if k in per_client[0]
            },
        }
        if round_idx >= 0:
            record["consensus_distance"] = consensus_distance(self.peers)
            if cfg.eval.average_model and len(self.peers) > 1:
                avg_model = self._average_model()
                pooled = datasets.concatenate_datasets(tests)
                record["average"] = self._generation_metrics(avg_model, pooled)
                del avg_model
        self.run_dir.log(record)
        self.progress.note(format_eval(record))
        return record

    def _generation_metrics(self, model, test) -> dict[str, float]:
        return generation_metrics(
            model,
            self.tokenizer,
            test,
            max_length=self.cfg.data.max_length,
            max_new_tokens=self.cfg.eval.max_new_tokens,
            batch_size=self.cfg.eval.batch_size,
            judge=self.judge,
        )

    def _score(self, model, texts: Sequence[str]) -> tuple[list[int], list[int]]:
        """(generated labels, likelihood labels) of `model` on `texts`."""
        return score_labels(model, self.tokenizer, self.run_data.task, texts, self.cfg)

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
        labels = None if self.generation else list(self.run_data.task.verbalizers)
        plot_run(records, self.run_dir.path, labels)
        out = self.run_dir.finish()
        self.progress.note(f"done: {out}/summary.md")
        return EngineResult(out, records, self.peers)


# ---------------------------------------------------------------------- shared helpers


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


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
