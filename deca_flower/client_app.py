"""Flower ClientApp: one DECA peer per SuperNode, a thin adapter over `deca_flower.node_service`.

Message types (sent by `server_app.py`):
- `query.handshake`: report rank, data shard facts, device and what the site loaded (config,
  model and data fingerprints); join a barrier on the coordinator's store so the coordinator
  learns whether all peers can run at once.
- `train.deca`: run one phase (S inner steps per block, gossip every step); reply metrics.
- `query.rejoin`: a lost site is back: report what it loaded and its last committed phase.
- `train.heal`: a returning site takes the blocks it missed from a live neighbour (who
  gives them); both reply the blocks' hashes (`heal.py`).
- `evaluate.deca`: score the local test slice (labels, or perplexity / ROUGE-L for
  instruction tuning), also with the network average.
- `query.finish`: optionally export the final model; drop a simulated node's scratch state.

Node config (`--node-config`, deployment): `partition-id`, `num-partitions`, `state-dir`,
`data-path`, `store-host`, `resident-worker` (default true), `worker-idle-s`; see
docs/deployment.md.

In deployment (a `state-dir` is set) each message goes to the site's resident worker
(`resident.py`), which keeps the model loaded: the SuperNode's fresh ClientApp process per
message then costs a process start, not a torch import and a model load. In simulation the
Ray actors already live across messages, and the handler runs in this process.

Replies carry only scalars and short lists: parameters never travel through Flower.
This module imports neither torch nor the algorithm core at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query("handshake")
def handshake(msg: Message, context: Context) -> Message:
    return _reply(msg, _handle("handshake", msg, context))


@app.train("deca")
def train(msg: Message, context: Context) -> Message:
    return _reply(msg, _handle("train", msg, context))


@app.query("rejoin")
def rejoin(msg: Message, context: Context) -> Message:
    return _reply(msg, _handle("rejoin", msg, context))


@app.train("heal")
def heal(msg: Message, context: Context) -> Message:
    return _reply(msg, _handle("heal", msg, context))


@app.evaluate("deca")
def evaluate(msg: Message, context: Context) -> Message:
    return _reply(msg, _handle("evaluate", msg, context))


@app.query("finish")
def finish(msg: Message, context: Context) -> Message:
    return _reply(msg, _handle("finish", msg, context))


def _handle(kind: str, msg: Message, context: Context) -> dict[str, Any]:
    message = {
        "kind": kind,
        "request": dict(msg.content["request"]),
        "run_config": dict(context.run_config),
        "node_config": dict(context.node_config),
        "run_id": int(context.run_id),
    }
    node_config = context.node_config
    resident = str(node_config.get("resident-worker", "true")).lower() not in ("false", "0")
    if node_config.get("state-dir") and resident:
        from deca_flower import resident as worker

        idle_s = float(node_config.get("worker-idle-s", worker.DEFAULT_IDLE_S))
        try:
            return worker.call(message, Path(str(node_config["state-dir"])), idle_s)
        except worker.ResidentWorkerError as err:
            return {
                "error": f"ResidentWorkerError: {err}",
                "rank": node_config.get("partition-id", "?"),
            }
    from deca_flower import node_service

    return node_service.handle(node_service.NodeRequest(**message))


def _reply(msg: Message, payload: dict[str, Any]) -> Message:
    return Message(RecordDict({"reply": ConfigRecord(payload)}), reply_to=msg)
