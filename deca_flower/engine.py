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
from deca_flower.config import to_yaml
from deca_flower.data import plot_label_distribution
from deca_flower.decaf import decaf_mix, lora_layout
from deca_flower.evaluation import eval_record, pooled_metrics, predict_labels
from deca_flower.generation import (
    GENERATION_METRICS,
    generation_metrics,
    is_generation_task,
    load_judge,
)
from deca_flower.gossip import mix_blocks as mix_row
from deca_flower.methods import get_method, steps_per_phase
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
from deca_flower.topology import describe, neighbours


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
        self.mixers: list[ChocoMixer] = []
        if self.method.mixing == "tsvd":
            first = self.peers[0]
            self.lora_layout = lora_layout(
                [(n, p.shape) for n, p in first.partition.named_parameters(0)]
            )
        self.run_dir = RunDir(out_dir or cfg.output_dir, cfg.run_name)
        self.progress = Progress(self.total_phases)

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
            self._evaluate(round_idx=-1)
        global_step = 0
        for t in range(cfg.train.rounds):
            for k in block_order(self.num_blocks, cfg.train.block_order, t, cfg.seed):
                global_step = self._run_block(t, k, global_step)
            if (t + 1) % cfg.eval.every_rounds == 0 or t == cfg.train.rounds - 1:
                self._evaluate(round_idx=t)
        if cfg.train.final_average:
            self._average_all_models()
        return self._finish()

    def _run_block(self, t: int, k: int, global_step: int) -> int:
        peers = self.peers
        for peer in peers:
            peer.begin_block(k)
        self.mixers = self._mixers(k)
        n = len(peers)
        timing = {"forward_s": [0.0] * n, "backward_s": [0.0] * n, "optimizer_s": [0.0] * n}
        comm_s = 0.0
        losses: list[float] = []
        for r in range(self.steps):
            results = [peer.local_step() for peer in peers]
            t0 = time.perf_counter()
            self._mix()
            comm_s += time.perf_counter() - t0
            for i, (peer, res) in enumerate(zip(peers, results)):
                timing["optimizer_s"][i] += res.optimizer_s + peer.consensus_update()
                timing["forward_s"][i] += res.forward_s
                timing["backward_s"][i] += res.backward_s
            losses = [res.loss for res in results]
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
        for peer in peers:
            peer.end_block()
        self._log_phase(t, k, block_numel, timing, comm_s)
        self.progress.phase_done(f"round {t + 1} block {k}", sum(losses) / len(losses))
        return global_step

    def _mixers(self, k: int) -> list[ChocoMixer]:
        if not self.codec.error_feedback or not self.method.communicates:
            return []
        mixers = []
        for i, peer in enumerate(self.peers):
            state = self.ef_states.setdefault((i, k), ChocoState.start(peer.block))
            weights = {j: float(self.weights[i, j]) for j in self._row(i)}
            gamma = self.cfg.gossip.consensus_step
            mixers.append(ChocoMixer(self.codec, i, weights, state, gamma))
        return mixers

    def _row(self, i: int) -> list[int]:
        """Client i's neighbours and itself, as the nodes see them."""
        return sorted({*neighbours(self.graph, i), i})

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
        if self.method.mixing == "average":
            mixed = mix_blocks(self.weights, torch.stack([p.block for p in peers]), self.wire)
        else:
            mixed = [self._decaf_row(i) for i in range(len(peers))]
        for peer, row in zip(peers, mixed):
            peer.block.copy_(row)

    def _mix_choco(self) -> None:
        """CHOCO-Gossip with the nodes' own code: everyone encodes, then everyone combines."""
        blocks = [p.block for p in self.peers]
        wires = [m.encode(x) for m, x in zip(self.mixers, blocks)]
        for i, (mixer, x) in enumerate(zip(self.mixers, blocks)):
            received = {j: wires[j] for j in self._row(i) if j != i}
            qs = mixer.decode(wires[i], received, x.numel())
            x.copy_(mixer.combine(x, qs))

    def _mix_rows(self) -> None:
        """A compressed cast wire, row by row in the gossip order (bit-equal to the nodes)."""
        codec = self.codec
        blocks = [p.block for p in self.peers]
        n = blocks[0].numel()
        received = [codec.decode(codec.encode(x), n) for x in blocks]
        mixed = []
        for i, x in enumerate(blocks):
            row = {j: received[j] for j in self._row(i) if j != i}
            weights = {j: float(self.weights[i, j]) for j in self._row(i)}
            mixed.append(mix_row({**row, i: x}, weights))
        for x, new in zip(blocks, mixed):
            x.copy_(new)

    def _decaf_row(self, i: int) -> torch.Tensor:
        row = self.weights[i]
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
            }
        )
        if not self.generation:  # instruction data has no labels (IID shards)
            plot_label_distribution(
                [c.train for c in self.run_data.clients],
                self.run_dir.path / "label_distribution.png",
                label_names=list(self.run_data.task.verbalizers),
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
            len(neighbours(self.graph, i)) if self.method.communicates else 0
            for i in range(len(self.peers))
        ]
        sent = [self.codec.wire_bytes(numel) * d * steps for d in degrees]
        self.run_dir.log(
            {
                "type": "phase",
                "round": t,
                "block": k,
                "block_numel": numel,
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
        cfg = self.cfg
        slices = [
            self.run_data.eval_slice(i, cfg.eval.max_examples_per_client)
            for i in range(cfg.num_clients)
        ]
        if round_idx == -1 or len(self.peers) == 1:  # one model for all clients' test sets
            preds = [self._predict(self.peers[0].model, texts) for texts, _ in slices]
        else:
            preds = [self._predict(p.model, texts) for p, (texts, _) in zip(self.peers, slices)]
        record = eval_record(
            round_idx, [labels for _, labels in slices], preds, len(self.run_data.task.verbalizers)
        )
        if round_idx >= 0:
            record["consensus_distance"] = consensus_distance(self.peers)
            if cfg.eval.average_model and len(self.peers) > 1:
                avg_model = self._average_model()
                avg_preds = [self._predict(avg_model, texts) for texts, _ in slices]
                record["average"] = pooled_metrics(
                    [labels for _, labels in slices], avg_preds, len(self.run_data.task.verbalizers)
                )
                record["average_predictions"] = avg_preds
                del avg_model
        self.run_dir.log(record)
        self.progress.note(format_eval(record))
        return record

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

    def _predict(self, model, texts: Sequence[str]) -> list[int]:
        return predict_labels(
            model,
            self.tokenizer,
            self.run_data.task,
            texts,
            batch_size=self.cfg.eval.batch_size,
            max_length=self.cfg.data.max_length,
        )

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


def run_engine(cfg: DictConfig, out_dir: str | Path | None = None) -> EngineResult:
    return Engine(cfg, out_dir).run()


def main(argv: Sequence[str] | None = None) -> None:
    from deca_flower.cli import engine_main

    engine_main(argv)


if __name__ == "__main__":
    main()
