"""Flower ClientApp: one DECA peer per SuperNode, a thin adapter over `deca_flower.node`.

Message types (sent by `server_app.py`):
- `query.handshake`: report rank, data shard facts and device; join a barrier on the
  coordinator's store so the coordinator learns whether all peers can run at once.
- `train.deca`: run one phase (S inner steps per block, gossip every step); reply metrics.
- `evaluate.deca`: score the local test slice (labels, or perplexity / ROUGE-L for
  instruction tuning), also with the network average.
- `query.finish`: optionally export the final model; drop a simulated node's scratch state.

Node config (`--node-config`, deployment): `partition-id`, `num-partitions`, `state-dir`,
`data-path`, `store-host`; see docs/deployment.md.

Replies carry only scalars and short lists: parameters never travel through Flower.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from deca_flower.flower_config import config_from_run_config
from deca_flower.gossip import handshake_barrier
from deca_flower.node import PhasePlan, get_node

app = ClientApp()


@app.query("handshake")
def handshake(msg: Message, context: Context) -> Message:
    return _reply(msg, lambda: _handshake(msg, context))


@app.train("deca")
def train(msg: Message, context: Context) -> Message:
    return _reply(msg, lambda: _train(msg, context))


@app.evaluate("deca")
def evaluate(msg: Message, context: Context) -> Message:
    return _reply(msg, lambda: _evaluate(msg, context))


@app.query("finish")
def finish(msg: Message, context: Context) -> Message:
    return _reply(msg, lambda: _finish(msg, context))


# ---------------------------------------------------------------------- handlers


def _handshake(msg: Message, context: Context) -> dict[str, Any]:
    request = msg.content["request"]
    rank = _rank(context)
    _barrier(request, rank)
    node = _node(context)
    return {
        "rank": rank,
        "num_partitions": int(context.node_config.get("num-partitions", -1)),
        "hostname": os.uname().nodename,
        "device": str(node.device),
        "num_blocks": node.peer.partition.num_blocks,
        "steps_per_phase": node.steps_per_phase,
        "label_counts": node.label_counts(),
        "last_phase": node.last_phase,
    }


def _train(msg: Message, context: Context) -> dict[str, Any]:
    plan = _plan(msg, context)
    node = _node(context)
    stats = node.run_phase(plan)
    return {"rank": plan.rank, **stats}


def _evaluate(msg: Message, context: Context) -> dict[str, Any]:
    plan = _plan(msg, context)
    node = _node(context)
    zero_shot = bool(msg.content["request"].get("zero_shot", False))
    out = node.evaluate(plan, zero_shot=zero_shot)
    # A ConfigRecord is flat: {"metrics": {"rouge_l": x}} travels as {"metrics.rouge_l": x}.
    flat = {
        f"{key}.{name}": v
        for key, value in out.items()
        if isinstance(value, dict)
        for name, v in value.items()
    }
    return {"rank": plan.rank, **{k: v for k, v in out.items() if not isinstance(v, dict)}, **flat}


def _finish(msg: Message, context: Context) -> dict[str, Any]:
    """Export the final model if asked; a simulated node's state store is scratch space."""
    request = msg.content["request"]
    node = _node(context)
    out: dict[str, Any] = {"rank": node.rank}
    if request["export_models"]:
        out["exported"] = str(node.export_model())
    deployed = bool(context.node_config.get("state-dir"))
    if not deployed and not request["keep_state"]:
        node.delete_state()
    return out


# ---------------------------------------------------------------------- helpers


def _reply(msg: Message, handler) -> Message:
    """Run a handler; turn any failure into an `error` entry the coordinator reports."""
    try:
        payload = handler()
    except Exception as err:  # noqa: BLE001 - every failure must reach the coordinator
        payload = {
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc()[-4000:],
        }
        # Data-plane rejections ({"type": "security", ...}) travel as JSON strings.
        events = getattr(err, "security_events", None)
        if events:
            payload["security_events"] = [json.dumps(e) for e in events]
    return Message(RecordDict({"reply": ConfigRecord(payload)}), reply_to=msg)


def _rank(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise KeyError(
            "this SuperNode has no partition-id: start it with --node-config "
            "'partition-id=<rank> num-partitions=<n>'"
        )
    return int(context.node_config["partition-id"])


def _node(context: Context):
    cfg = config_from_run_config(context.run_config)
    rank = _rank(context)
    run_key = f"{context.run_id}"
    data_path = context.node_config.get("data-path") or None
    return get_node(cfg, rank, _state_dir(context, cfg, rank), run_key, data_path)


def _state_dir(context: Context, cfg, rank: int) -> Path:
    """`state-dir` from --node-config in deployment; under the run's output dir in simulation."""
    base = context.node_config.get("state-dir")
    if base:
        return Path(str(base)) / f"run-{context.run_id}"
    return Path(cfg.output_dir).resolve() / "state" / f"run-{context.run_id}" / f"node-{rank}"


def _plan(msg: Message, context: Context) -> PhasePlan:
    req = msg.content["request"]
    rank = _rank(context)
    return PhasePlan(
        phase=int(req["phase"]),
        round=int(req["round"]),
        blocks=[int(b) for b in req["blocks"]],
        steps=int(req["steps"]),
        store_host=str(context.node_config.get("store-host", req["store_host"])),
        store_port=int(req["store_port"]),
        group_name=str(req["group_name"]),
        rank=rank,
        world_size=int(req["world_size"]),
        neighbours=[int(j) for j in req["neighbours"]],
        weights=[float(w) for w in req["weights"]],
        self_weight=float(req["self_weight"]),
        store_key=str(req.get("store_key", "")),
    )


def _barrier(request: ConfigRecord, rank: int) -> None:
    """Arrive at the coordinator's store and wait until all peers have arrived."""
    handshake_barrier(
        str(request["store_host"]),
        int(request["store_port"]),
        str(request["group_name"]),
        rank,
        int(request["world_size"]),
        float(request["barrier_timeout_s"]),
        store_key=str(request.get("store_key", "")),
    )
