"""The node's message handlers on plain data: what a SuperNode does for each Flower message.

Framework-free (no `flwr` import). `client_app.py` turns a Flower message into
`(kind, request, run_config, node_config, run_id)` and calls :func:`handle`, either in its
own process (simulation) or in the site's resident worker (`resident.py`, deployment), which
keeps the model loaded between messages.

Kinds: `handshake`, `rejoin`, `train`, `heal`, `evaluate`, `finish` (see `client_app.py`).
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from deca_flower.config import parse_fault_injection
from deca_flower.flower_config import config_from_run_config
from deca_flower.gossip import handshake_barrier
from deca_flower.heal import heal
from deca_flower.node import Node, PhasePlan, config_key, forget_node, get_node
from deca_flower.state_store import NodeStateStore


class NodeRequest:
    """One message's inputs, as plain values (picklable: it may cross to the worker)."""

    def __init__(
        self,
        kind: str,
        request: Mapping[str, Any],
        run_config: Mapping[str, Any],
        node_config: Mapping[str, Any],
        run_id: int,
    ) -> None:
        self.kind = kind
        self.request = dict(request)
        self.run_config = dict(run_config)
        self.node_config = dict(node_config)
        self.run_id = run_id


def handle(req: NodeRequest) -> dict[str, Any]:
    """Run one handler; any failure becomes an `error` entry the coordinator reports."""
    started = time.perf_counter()
    try:
        payload = _HANDLERS[req.kind](req)
    except Exception as err:  # noqa: BLE001 - every failure must reach the coordinator
        payload = {
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc()[-4000:],
        }
        # Data-plane rejections ({"type": "security", ...}) travel as JSON strings.
        events = getattr(err, "security_events", None)
        if events:
            payload["security_events"] = [json.dumps(e) for e in events]
    payload["handler_s"] = time.perf_counter() - started
    return payload


# ---------------------------------------------------------------------- handlers


def _handshake(req: NodeRequest) -> dict[str, Any]:
    _barrier(req.request, _rank(req), _store_host(req))
    return _site_facts(req)


def _rejoin(req: NodeRequest) -> dict[str, Any]:
    """A lost site is back: what it loaded and the last phase it committed (no barrier:
    the others are busy training)."""
    return _site_facts(req)


def _heal(req: NodeRequest) -> dict[str, Any]:
    """Give (donor) or take (returning site) the blocks trained while the site was away."""
    node, load_s = _timed_node(req)
    blocks = [int(k) for k in req.request["heal_blocks"]]
    receive = str(req.request["heal_role"]) == "receiver"
    out = heal(node, _plan(req), blocks, receive, int(req.request["committed_phase"]))
    return {"rank": _rank(req), "load_s": load_s, **out}


def _site_facts(req: NodeRequest) -> dict[str, Any]:
    rank = _rank(req)
    _check_data_path(req, rank)
    node, load_s = _timed_node(req)
    return {
        "rank": rank,
        "num_partitions": int(req.node_config.get("num-partitions", -1)),
        "hostname": os.uname().nodename,
        "device": str(node.device),
        "num_blocks": node.peer.partition.num_blocks,
        "steps_per_phase": node.steps_per_phase,
        "label_counts": node.label_counts(),
        "last_phase": node.last_phase,
        "config_hash": config_key(config_from_run_config(req.run_config)),
        "model_hash": node.model_fingerprint(),
        "data_hash": node.data_fingerprint(),
        "load_s": load_s,
    }


class InjectedFault(RuntimeError):
    """faults.inject made this rank fail this phase (a rehearsal of a lost site)."""


def _train(req: NodeRequest) -> dict[str, Any]:
    plan = _plan(req)
    cfg = _site_config(req)
    rolled_back = _roll_back(req, cfg, plan.phase)
    if int(req.request.get("attempt", 0)) == 0 and (_rank(req), plan.phase) in (
        parse_fault_injection(cfg.faults.inject)
    ):
        raise InjectedFault(f"rank {_rank(req)} fails phase {plan.phase} (faults.inject)")
    node, load_s = _timed_node(req)
    stats = node.run_phase(plan)
    return {"rank": _rank(req), "load_s": load_s, "rolled_back": rolled_back, **stats}


def _roll_back(req: NodeRequest, cfg, phase: int) -> list[int]:
    """Undo this node's commit of a phase that not every member finished (then rerun it)."""
    committed = int(req.request.get("committed_phase", phase - 1))
    store = NodeStateStore(_state_dir(req, cfg, _rank(req)))
    rolled = store.rollback_to(committed)
    if rolled:
        forget_node(str(req.run_id), _rank(req))
    return rolled


def _evaluate(req: NodeRequest) -> dict[str, Any]:
    plan = _plan(req)
    node, _ = _timed_node(req)
    out = node.evaluate(plan, zero_shot=bool(req.request.get("zero_shot", False)))
    # A ConfigRecord is flat: {"metrics": {"rouge_l": x}} travels as {"metrics.rouge_l": x}.
    flat = {
        f"{key}.{name}": v
        for key, value in out.items()
        if isinstance(value, dict)
        for name, v in value.items()
    }
    return {"rank": _rank(req), **{k: v for k, v in out.items() if not isinstance(v, dict)}, **flat}


def _finish(req: NodeRequest) -> dict[str, Any]:
    """Export the final model if asked; a simulated node's state store is scratch space."""
    node, _ = _timed_node(req)
    out: dict[str, Any] = {"rank": node.rank}
    if req.request["export_models"]:
        out["exported"] = str(node.export_model())
    deployed = bool(req.node_config.get("state-dir"))
    if not deployed and not req.request["keep_state"]:
        node.delete_state()
    return out


_HANDLERS: dict[str, Callable[[NodeRequest], dict[str, Any]]] = {
    "handshake": _handshake,
    "rejoin": _rejoin,
    "heal": _heal,
    "train": _train,
    "evaluate": _evaluate,
    "finish": _finish,
}


# ---------------------------------------------------------------------- helpers


def _rank(req: NodeRequest) -> int:
    if "partition-id" not in req.node_config:
        raise KeyError(
            "this SuperNode has no partition-id: start it with --node-config "
            "'partition-id=<rank> num-partitions=<n>'"
        )
    return int(req.node_config["partition-id"])


def _timed_node(req: NodeRequest) -> tuple[Node, float]:
    t0 = time.perf_counter()
    cfg = _site_config(req)
    rank = _rank(req)
    data_path = req.node_config.get("data-path") or None
    node = get_node(cfg, rank, _state_dir(req, cfg, rank), str(req.run_id), data_path)
    return node, time.perf_counter() - t0


def _site_config(req: NodeRequest):
    """The run's config with what only this site knows: where its copy of the model lives
    (`model-name` in --node-config, e.g. a local directory). The coordinator compares the
    model fingerprints, so a site whose copy differs is named before anyone trains."""
    cfg = config_from_run_config(req.run_config)
    if req.node_config.get("model-name"):
        cfg.model.name = str(req.node_config["model-name"])
    return cfg


def _state_dir(req: NodeRequest, cfg, rank: int) -> Path:
    """`state-dir` from --node-config in deployment; under the run's output dir in simulation."""
    # A resumed run continues the state of the run it resumes (`state_id`).
    run = str(req.request.get("state_id") or req.run_id)
    base = req.node_config.get("state-dir")
    if base:
        return Path(str(base)) / f"run-{run}"
    return Path(cfg.output_dir).resolve() / "state" / f"run-{run}" / f"node-{rank}"


def _check_data_path(req: NodeRequest, rank: int) -> None:
    path = req.node_config.get("data-path")
    if not path:
        return
    p = Path(str(path))
    if not p.is_file() or not os.access(p, os.R_OK):
        why = "does not exist" if not p.exists() else "is not a readable file"
        raise FileNotFoundError(
            f"rank {rank}: data-path {str(p)!r} {why} on host {os.uname().nodename}; fix "
            "`data-path` in this SuperNode's --node-config"
        )


def _store_host(req: NodeRequest) -> str:
    """The gossip store's address: the site's `store-host` if set, else the coordinator's."""
    return str(req.node_config.get("store-host", req.request["store_host"]))


def _plan(req: NodeRequest) -> PhasePlan:
    r = req.request
    return PhasePlan(
        phase=int(r["phase"]),
        round=int(r["round"]),
        blocks=[int(b) for b in r["blocks"]],
        steps=int(r["steps"]),
        store_host=_store_host(req),
        store_port=int(r["store_port"]),
        group_name=str(r["group_name"]),
        # The rank inside this phase's gossip group (members numbered 0..m-1 in rank order);
        # it differs from the node's own rank once a site was lost.
        rank=int(r.get("group_rank", _rank(req))),
        world_size=int(r["world_size"]),
        neighbours=[int(j) for j in r["neighbours"]],
        weights=[float(w) for w in r["weights"]],
        self_weight=float(r["self_weight"]),
        store_key=str(r.get("store_key", "")),
        members=tuple(int(j) for j in r.get("members", ())),
    )


def _barrier(request: Mapping[str, Any], rank: int, host: str) -> None:
    """Arrive at the coordinator's store and wait until all peers have arrived."""
    handshake_barrier(
        host,
        int(request["store_port"]),
        str(request["group_name"]),
        rank,
        int(request["world_size"]),
        float(request["barrier_timeout_s"]),
        store_key=str(request.get("store_key", "")),
    )
