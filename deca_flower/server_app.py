"""Flower ServerApp: the DECA coordinator. It never receives, holds or averages parameters.

It waits for the SuperNodes, learns their ranks by a handshake (which also
proves that all peers can run at once), builds the graph and mixing matrix,
hosts the rendezvous store of the gossip data plane, drives rounds -> blocks ->
phases, hands each node its neighbours and weights, collects metrics, runs the
evaluation at the end of every round, and writes the run's outputs.
"""

from __future__ import annotations

import os
import time
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from deca_flower.blocks import block_order
from deca_flower.config import to_yaml
from deca_flower.data import get_task
from deca_flower.evaluation import eval_record, global_test_record, pooled_metrics
from deca_flower.flower_config import config_from_run_config
from deca_flower.generation import (
    GENERATION_METRICS,
    is_generation_task,
    pool_generation_metrics,
)
from deca_flower.gossip import host_store
from deca_flower.methods import METHODS
from deca_flower.optim import STEP_DIAGNOSTICS
from deca_flower.reporting import (
    Progress,
    RunDir,
    format_eval,
    plot_label_counts,
    plot_run,
    read_metrics,
    summary_markdown,
)
from deca_flower.task import build_topology
from deca_flower.topology import describe, neighbours

app = ServerApp()

# Replies carry metrics only; anything near a block's size would mean parameters leak.
MAX_REPLY_VALUES = 100_000


class CoordinatorError(RuntimeError):
    pass


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = config_from_run_config(context.run_config)
    Coordinator(grid, cfg, context.run_id).run()


class Coordinator:
    def __init__(self, grid: Grid, cfg: DictConfig, run_id: int) -> None:
        self.grid, self.cfg, self.run_id = grid, cfg, run_id
        self.n = cfg.num_clients
        self.graph, self.weights = build_topology(cfg)  # a bad graph fails before any node works
        self.store, self.store_port = host_store(
            "0.0.0.0", cfg.gossip.store_port, timeout_s=cfg.gossip.timeout_s
        )
        self.rank_to_node: dict[int, int] = {}
        self.phase = 0
        self.max_reply_values = 0

    # ------------------------------------------------------------------ the run

    def run(self) -> None:
        if METHODS[self.cfg.algorithm.method].pooled_data:
            raise CoordinatorError(
                "algorithm.method=centralized trains one model on pooled data, the reference "
                "no decentralized deployment can run; use the in-process engine: "
                "`deca-flower engine algorithm=centralized`"
            )
        self._check_simulation_concurrency()
        node_ids = self._wait_for_nodes()
        info = self._handshake(node_ids)
        num_blocks = info[0]["num_blocks"]
        self.steps = int(info[0]["steps_per_phase"])
        run_dir = RunDir(self.cfg.output_dir, self.cfg.run_name)
        self.run_dir = run_dir
        run_dir.write_text("config.yaml", to_yaml(self.cfg))
        self._log_setup(info, num_blocks)
        progress = Progress(self.cfg.train.rounds * num_blocks)
        self.progress = progress
        if self.cfg.eval.zero_shot:
            self._evaluate(-1)
        global_step = 0
        for t in range(self.cfg.train.rounds):
            for blocks in self._phases(t, num_blocks):
                global_step = self._train_phase(t, blocks, global_step)
            if (t + 1) % self.cfg.eval.every_rounds == 0 or t == self.cfg.train.rounds - 1:
                self._evaluate(t)
        self._finish_nodes()
        run_dir.log(
            {
                "type": "coordinator",
                "max_reply_values": self.max_reply_values,
                "array_records_received": 0,
            }
        )
        records = read_metrics(run_dir.metrics_path)
        run_dir.write_text("summary.md", summary_markdown(records, to_yaml(self.cfg)))
        generation = is_generation_task(self.cfg.data.name)
        labels = None if generation else list(get_task(self.cfg.data.name).verbalizers)
        plot_run(records, run_dir.path, labels)
        out = run_dir.finish()
        progress.note(f"done: {out}/summary.md")

    def _finish_nodes(self) -> None:
        """Nodes export their final model if asked, and drop simulation-only state."""
        request = self._common_request("finish")
        request.update(
            {
                "keep_state": self.cfg.flower.keep_state,
                "export_models": self.cfg.flower.export_models,
            }
        )
        replies = self._send_to_ranks(request, "query.finish")
        exported = [replies[r].get("exported", "") for r in range(self.n)]
        if any(exported):
            self.run_dir.log({"type": "exported_models", "paths": exported})
            self.progress.note(f"final models saved by the nodes, e.g. {exported[0]}")

    def _phases(self, t: int, num_blocks: int) -> list[list[int]]:
        order = block_order(num_blocks, self.cfg.train.block_order, t, self.cfg.seed)
        return [order] if self.cfg.flower.phase == "round" else [[k] for k in order]

    # ------------------------------------------------------------------ nodes

    def _check_simulation_concurrency(self) -> None:
        """Fail before any work if Flower's simulation engine cannot run all peers at once.

        flwr's simulation engine hands messages to the Ray actors from a
        `ThreadPoolExecutor()` with Python's default size, min(32, CPUs + 4): no
        federation setting lifts that, so more peers than that would wait forever.
        """
        if type(self.grid).__name__ != "InMemoryGrid":  # deployment: every node is a process
            return
        limit = min(32, (os.cpu_count() or 1) + 4)
        if self.n > limit:
            raise CoordinatorError(
                f"num_clients={self.n}, but Flower's simulation engine runs at most {limit} "
                f"messages at once on this {os.cpu_count()}-CPU host (CPUs + 4), and all DECA "
                f"peers must run at the same time. Use --run-config 'num-clients={limit}' "
                f'with --federation-config "num-supernodes={limit} client-resources-num-cpus=1 '
                f'init-args-num-cpus={limit}", a host with at least {self.n - 4} CPUs, the '
                "in-process engine (deca-flower engine), or a deployment (docs/deployment.md)."
            )

    def _wait_for_nodes(self) -> list[int]:
        deadline = time.monotonic() + self.cfg.flower.min_nodes_wait_s
        while True:
            node_ids = sorted(self.grid.get_node_ids())
            if len(node_ids) >= self.n:
                break
            if time.monotonic() > deadline:
                raise CoordinatorError(
                    f"num_clients={self.n} but only {len(node_ids)} SuperNodes connected after "
                    f"{self.cfg.flower.min_nodes_wait_s:.0f} s. {_federation_hint(self.n)}"
                )
            time.sleep(1.0)
        if len(node_ids) > self.n:
            raise CoordinatorError(
                f"{len(node_ids)} SuperNodes connected but num_clients={self.n}: set "
                f"num-clients={len(node_ids)} (--run-config) or start {self.n} SuperNodes"
            )
        return node_ids

    def _handshake(self, node_ids: list[int]) -> dict[int, dict[str, Any]]:
        request = self._common_request("handshake")
        request["barrier_timeout_s"] = self.cfg.flower.barrier_timeout_s
        replies = self._send({nid: request for nid in node_ids}, "query.handshake")
        by_rank: dict[int, dict[str, Any]] = {}
        for node_id, reply in replies.items():
            rank = int(reply["rank"])
            if rank in by_rank or not 0 <= rank < self.n:
                raise CoordinatorError(
                    f"SuperNode {node_id} reports partition-id={rank}; every node needs a "
                    f"distinct partition-id in 0..{self.n - 1} (--node-config)"
                )
            self.rank_to_node[rank] = node_id
            by_rank[rank] = reply
        sizes = {r["num_blocks"] for r in by_rank.values()}
        if len(sizes) != 1:
            raise CoordinatorError(f"peers disagree on the number of blocks: {sorted(sizes)}")
        return by_rank

    # ------------------------------------------------------------------ phases

    def _train_phase(self, t: int, blocks: list[int], global_step: int) -> int:
        request = self._common_request(f"phase{self.phase}")
        request.update({"round": t, "blocks": blocks, "steps": self.steps})
        replies = self._send_to_ranks(request, "train.deca")
        losses = [replies[r]["loss"] for r in range(self.n)]
        for s in range(len(losses[0])):
            k = blocks[s // self.steps]
            self.run_dir.log(
                {
                    "type": "step",
                    "round": t,
                    "block": k,
                    "step": s % self.steps,
                    "global_step": global_step + s,
                    "loss": [losses[r][s] for r in range(self.n)],
                }
            )
        self.run_dir.log(self._phase_record(t, blocks, replies))
        self.progress.phase_done(
            f"round {t + 1} block(s) {blocks[0]}" + ("..." if len(blocks) > 1 else ""),
            sum(loss[-1] for loss in losses) / self.n,
        )
        self.phase += 1
        return global_step + len(losses[0])

    def _phase_record(self, t: int, blocks: list[int], replies: dict[int, dict]) -> dict:
        keys = (
            "bytes_sent",
            "bytes_received",
            "forward_s",
            "backward_s",
            "optimizer_s",
            "communication_s",
            "peak_memory_bytes",
            "train_state_bytes",
        )
        record = {
            "type": "phase",
            "round": t,
            "block": blocks[0],
            "blocks": blocks,
            "block_numel": replies[0].get("block_numel"),
        }
        record.update({key: [replies[r][key] for r in range(self.n)] for key in keys})
        # Step diagnostics (None where a node could not define one, as in the engine).
        diagnostics = {k: [replies[r].get(k) for r in range(self.n)] for k in STEP_DIAGNOSTICS}
        record.update(diagnostics)
        return record

    def _evaluate(self, t: int) -> None:
        request = self._common_request(f"eval{t + 1}")
        request.update({"round": t, "blocks": [], "steps": 0, "zero_shot": t == -1})
        replies = self._send_to_ranks(request, "evaluate.deca")
        if is_generation_task(self.cfg.data.name):
            record = self._generation_record(t, replies)
            self.run_dir.log(record)
            self.progress.note(format_eval(record))
            return
        record = self._classification_record(t, replies, "")
        if t >= 0 and self.cfg.eval.average_model:
            distance = sum(replies[r]["squared_distance"] for r in range(self.n)) / self.n
            record["consensus_distance"] = distance**0.5
        if "validation_labels" in replies[0]:
            part = self._classification_record(t, replies, "validation_")
            record["validation"] = {k: part[k] for k in ("clients", "client_mean", "average")
                                    if k in part}  # fmt: skip
        if "global_labels" in replies[0]:
            record["global_test"] = self._global_test(t, replies)
        self.run_dir.log(record)
        self.progress.note(format_eval(record))

    def _classification_record(self, t: int, replies: dict[int, dict], prefix: str) -> dict:
        """The engine's record from the nodes' predictions (generated and by likelihood)."""

        def column(key: str) -> list[list[int]]:
            return [list(replies[r][key]) for r in range(self.n)]

        labels = column(f"{prefix}labels")
        preds, ll = column(f"{prefix}predictions"), column(f"{prefix}ll_predictions")
        record = eval_record(t, labels, preds, self.num_labels, ll, self.label_counts)
        if t >= 0 and self.cfg.eval.average_model:
            avg = column(f"average_{prefix}predictions")
            avg_ll = column(f"average_{prefix}ll_predictions")
            record["average"] = pooled_metrics(labels, avg, self.num_labels, avg_ll,
                                               self.label_counts)  # fmt: skip
            record["average_predictions"] = avg
            record["average_ll_predictions"] = avg_ll
        return record

    def _global_test(self, t: int, replies: dict[int, dict]) -> dict[str, Any]:
        """Each node scored rows rank::n with the shared model (the average, or the base
        model at zero-shot): put them back in order, as the engine scores them."""
        labels = list(replies[0]["global_labels"])
        shared: tuple[list, list] | None = None
        if "global_shard_predictions" in replies[0]:
            shared = ([0] * len(labels), [0] * len(labels))
            for r in range(self.n):
                shared[0][r :: self.n] = list(replies[r]["global_shard_predictions"])
                shared[1][r :: self.n] = list(replies[r]["global_shard_ll_predictions"])
        if t == -1:
            preds, ll, average = [shared[0]] * self.n, [shared[1]] * self.n, None
        else:
            preds = [list(replies[r]["global_predictions"]) for r in range(self.n)]
            ll = [list(replies[r]["global_ll_predictions"]) for r in range(self.n)]
            average = shared
        return global_test_record(labels, preds, ll, average, self.num_labels, self.label_counts)

    def _generation_record(self, t: int, replies: dict[int, dict]) -> dict[str, Any]:
        """The engine's instruction-tuning eval record, from the nodes' own scores."""
        per_client = [_unflatten(replies[r], "metrics") for r in range(self.n)]
        record: dict[str, Any] = {
            "type": "eval",
            "task": "generation",
            "round": t,
            "clients": per_client,
            "client_mean": {
                k: sum(m[k] for m in per_client) / self.n
                for k in GENERATION_METRICS
                if k in per_client[0]
            },
        }
        if t >= 0 and self.cfg.eval.average_model:
            # Each node scored the average on its own test slice; pooled, that is the
            # average model on the union of the slices, as the engine computes it.
            parts = [_unflatten(replies[r], "average_metrics") for r in range(self.n)]
            record["average"] = pool_generation_metrics(parts)
            distance = sum(replies[r]["squared_distance"] for r in range(self.n)) / self.n
            record["consensus_distance"] = distance**0.5
        return record

    # ------------------------------------------------------------------ messaging

    def _common_request(self, tag: str) -> dict[str, Any]:
        return {
            "store_host": self.cfg.gossip.advertise_host,
            "store_port": self.store_port,
            "world_size": self.n,
            "group_name": f"run{self.run_id}/{tag}",
            "phase": self.phase,
        }

    def _send_to_ranks(self, request: dict[str, Any], message_type: str) -> dict[int, dict]:
        per_node = {}
        for rank, node_id in self.rank_to_node.items():
            row = neighbours(self.graph, rank)
            per_node[node_id] = {
                **request,
                "neighbours": row,
                "weights": [float(self.weights[rank, j]) for j in row],
                "self_weight": float(self.weights[rank, rank]),
            }
        replies = self._send(per_node, message_type)
        node_to_rank = {nid: r for r, nid in self.rank_to_node.items()}
        return {node_to_rank[nid]: reply for nid, reply in replies.items()}

    def _send(self, per_node: dict[int, dict[str, Any]], message_type: str) -> dict[int, dict]:
        messages = [
            Message(
                RecordDict({"request": ConfigRecord(payload)}),
                dst_node_id=nid,
                message_type=message_type,
            )
            for nid, payload in per_node.items()
        ]
        timeout = self.cfg.flower.phase_timeout_s
        replies = {
            m.metadata.src_node_id: m for m in self.grid.send_and_receive(messages, timeout=timeout)
        }
        missing = sorted(set(per_node) - set(replies))
        if missing:
            raise CoordinatorError(
                f"no reply to {message_type} from SuperNode(s) {missing} within "
                f"{timeout:.0f} s (flower.phase_timeout_s); node states are committed up to "
                "the last finished phase"
            )
        return {nid: self._unpack(nid, msg, message_type) for nid, msg in replies.items()}

    def _unpack(self, node_id: int, msg: Message, message_type: str) -> dict[str, Any]:
        if msg.has_error():
            raise CoordinatorError(f"SuperNode {node_id} failed {message_type}: {msg.error.reason}")
        if msg.content.array_records:
            raise CoordinatorError(f"SuperNode {node_id} sent arrays to the coordinator")
        reply = dict(msg.content["reply"])
        values = sum(len(v) if isinstance(v, list) else 1 for v in reply.values())
        self.max_reply_values = max(self.max_reply_values, values)
        if values > MAX_REPLY_VALUES:
            raise CoordinatorError(f"SuperNode {node_id} sent {values} values: too large")
        if "error" in reply:
            hint = ""
            if "DECA peers were running at the same time" in reply["error"]:
                hint = " " + _federation_hint(self.n)
            raise CoordinatorError(
                f"rank {reply.get('rank', '?')} (SuperNode {node_id}) failed {message_type}: "
                f"{reply['error']}.{hint}\n--- peer traceback ---\n{reply.get('traceback', '')}"
            )
        return reply

    # ------------------------------------------------------------------ outputs

    def _log_setup(self, info: dict[int, dict[str, Any]], num_blocks: int) -> None:
        topo = describe(self.graph, self.weights)
        self.run_dir.log({"type": "topology", **topo, "mixing_matrix": self.weights.tolist()})
        counts = [info[r]["label_counts"] for r in range(self.n)]
        self.num_labels = len(counts[0])
        self.label_counts = counts  # majority-class baselines, as the engine computes them
        self.run_dir.log(
            {
                "type": "data",
                "run_id": self.run_id,
                "state_dir_hint": "simulation: <output_dir>/state/run-<run_id>/node-<rank>",
                "label_counts": counts,
                "train_sizes": [sum(c) for c in counts],
                "num_blocks": num_blocks,
                "rank_to_node": {str(r): n for r, n in self.rank_to_node.items()},
            }
        )
        if counts[0]:  # instruction tuning has no labels to plot
            plot_label_counts(counts, self.run_dir.path / "label_distribution.png")
        Progress(0).note(
            f"{self.n} peers on a {topo['name']} graph (spectral gap {topo['spectral_gap']:.3f}),"
            f" {num_blocks} blocks x {self.cfg.train.steps_per_block} steps x "
            f"{self.cfg.train.rounds} rounds; gossip store on port {self.store_port}; "
            f"writing {self.run_dir.path}"
        )


def _federation_hint(n: int) -> str:
    return (
        f"All {n} DECA peers must run at the same time. In simulation run with "
        f'--federation-config "num-supernodes={n} client-resources-num-cpus=1 '
        f'init-args-num-cpus={n}" (on GPUs add client-resources-num-gpus=<gpus/{n}>); '
        f"in deployment start {n} SuperNodes that can reach the coordinator's store "
        "(gossip.advertise_host)."
    )


def _unflatten(reply: dict[str, Any], key: str) -> dict[str, Any]:
    """{"metrics.rouge_l": x} -> {"rouge_l": x} (client_app flattens nested replies)."""
    prefix = f"{key}."
    return {k.removeprefix(prefix): v for k, v in reply.items() if k.startswith(prefix)}
