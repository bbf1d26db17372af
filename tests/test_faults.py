"""Faults: bounded waits, membership epochs over the survivors, all-or-nothing commits,
fault injection in the engine and the Flower simulation.

Multi-process Gloo cases use the peer pool of test_gossip (real process groups on loopback).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import networkx as nx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_gossip import HOST, RUN_KEY, WORLD, make_block, peers, port, unique  # noqa: F401

from deca_flower.config import ConfigError, load_config
from deca_flower.engine import Engine
from deca_flower.gossip import GossipError, GossipGroup
from deca_flower.membership import MembershipError, full_membership, without
from deca_flower.reporting import read_metrics
from deca_flower.state_store import NodeStateStore
from deca_flower.topology import build_graph, mixing_matrix


def metropolis(graph: nx.Graph, n: int) -> np.ndarray:
    """Metropolis-Hastings weights on `graph` (nodes: any subset of 0..n-1), by hand."""
    w = np.zeros((n, n))
    for i, j in graph.edges:
        w[i, j] = w[j, i] = 1.0 / (1 + max(graph.degree(i), graph.degree(j)))
    for i in graph.nodes:
        w[i, i] = 1.0 - w[i].sum()
    return w


# ---------------------------------------------------------------------- membership


def test_survivors_get_metropolis_weights_on_their_subgraph():
    graph = build_graph("er", 6, p=0.6, seed=0)
    m0 = full_membership(graph, mixing_matrix(graph))
    m1 = without(m0, {2}, graph, "metropolis", min_peers=2)
    assert m1.epoch == 1 and m1.members == (0, 1, 3, 4, 5) and m1.lost == (2,)
    expected = metropolis(graph.subgraph(m1.members), 6)
    np.testing.assert_allclose(m1.weights.numpy(), expected, atol=1e-12)
    sub = m1.weights.numpy()[np.ix_(m1.members, m1.members)]
    np.testing.assert_allclose(sub.sum(axis=1), 1.0)  # doubly stochastic over the members
    np.testing.assert_allclose(sub, sub.T)
    eig = np.sort(np.abs(np.linalg.eigvalsh(sub)))[::-1]
    assert m1.spectral_gap() == pytest.approx(1 - eig[1])


def test_a_disconnected_survivor_graph_names_its_parts():
    path = nx.path_graph(4)  # 0-1-2-3: without 1, {0} and {2, 3} are cut apart
    m0 = full_membership(path, mixing_matrix(path))
    with pytest.raises(MembershipError, match=r"falls apart into \[\[0\], \[2, 3\]\]"):
        without(m0, {1}, path, "metropolis", min_peers=2)
    with pytest.raises(MembershipError, match="faults.min_peers=4"):
        without(m0, {3}, path, "metropolis", min_peers=4)


def test_timeouts_must_nest():
    with pytest.raises(
        ConfigError, match="gossip.timeout_s=900 must be smaller than flower.phase_timeout_s=600"
    ):
        load_config({}, ["gossip.timeout_s=900", "flower.phase_timeout_s=600"])
    with pytest.raises(ConfigError, match="faults.rejoin_wait_s"):
        load_config({}, ["faults.rejoin_wait_s=100"])
    with pytest.raises(ConfigError, match="faults.inject"):
        load_config({}, ["faults.inject=two@one"])


# ---------------------------------------------------------------------- all-or-nothing commits


def test_a_phase_commits_all_its_blocks_and_can_be_rolled_back(tmp_path):
    store = NodeStateStore(tmp_path)
    t = {k: torch.full((3,), float(k)) for k in range(3)}
    for k in range(2):  # phase 0 commits blocks 0 and 1
        store.stage_block(k, [(f"b{k}", t[k])], phase=0, extra={"stream": 10})
    assert store.saved_blocks() == {}  # nothing counts before the commit
    store.commit_staged()
    for k in (1, 2):  # phase 1 trains blocks 1 and 2
        store.stage_block(k, [(f"b{k}", t[k] + 100)], phase=1, extra={"stream": 20})
    store.commit_staged()
    assert store.latest()["phase"] == 1 and store.latest()["extra"] == {"stream": 20}
    # Another member did not finish phase 1: roll back to phase 0.
    assert sorted(store.rollback_to(0)) == [1, 2]
    assert {k: v["phase"] for k, v in store.saved_blocks().items()} == {0: 0, 1: 0}
    torch.testing.assert_close(load_file(store.block_path(1))["b1"], t[1])
    assert not store.block_path(2).exists()  # never committed before phase 1
    assert store.latest()["extra"] == {"stream": 10}
    # A failed phase leaves only staged files, which are discarded.
    store.stage_block(0, [("b0", t[0] - 1)], phase=1)
    store.discard_staged()
    assert store.rollback_to(0) == []
    torch.testing.assert_close(load_file(store.block_path(0))["b0"], t[0])


# ---------------------------------------------------------------------- Gloo: a peer is killed


TIMEOUT_S = 8  # gossip.timeout_s of the lost-peer scenarios (a fresh peer must join in it)


def scenario_killed_then_regroup(
    rank: int,
    port: int,  # noqa: F811
    name: str,
    victim: int,
    how: str = "kill",
) -> dict:
    """4-ring; the victim SIGKILLs (or SIGSTOPs) itself mid-exchange; survivors regroup as a
    3-path."""
    x = make_block(rank)
    nbrs = sorted({(rank - 1) % WORLD, (rank + 1) % WORLD})
    group = GossipGroup(
        HOST,
        port,
        rank,
        WORLD,
        nbrs,
        {j: 1 / 3 for j in nbrs},
        1 / 3,
        group_name=f"{name}/epoch0",
        store_key=RUN_KEY,
        timeout_s=TIMEOUT_S,
    )
    group.mix(x)
    if rank == victim and how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == victim:  # SIGSTOP: no RST, the neighbours see silence; continued later
        subprocess.Popen(["sh", "-c", f"sleep {3 * TIMEOUT_S}; kill -CONT {os.getpid()}"])
        os.kill(os.getpid(), signal.SIGSTOP)
        try:  # the others have moved on to epoch 1: its stale exchange must not land
            group.mix(x)
            return {"stale": "accepted"}
        except GossipError as exc:
            return {"stale": str(exc)}
        finally:
            group.close()
    start = time.monotonic()
    try:
        for _ in range(3):  # rank 1 (not a neighbour) fails once its neighbours gave up
            group.mix(x)
        error = None
    except GossipError as exc:
        error = str(exc)
    finally:
        group.close()
    detected_s = time.monotonic() - start
    # Epoch 1: the survivors (ranks 0, 1, 2 of the 4-ring minus 3 = the path 0-1-2) renumber
    # as group ranks 0..2 and mix with Metropolis weights on that path.
    graph = nx.cycle_graph(WORLD)
    m1 = without(full_membership(graph, mixing_matrix(graph)), {victim}, graph, "metropolis", 2)
    g = m1.group_rank(rank)
    row = m1.neighbours(rank)
    weights = {m1.group_rank(j): float(m1.weights[rank, j]) for j in row}
    with GossipGroup(
        HOST,
        port,
        g,
        len(m1.members),
        sorted(weights),
        weights,
        float(m1.weights[rank, rank]),
        group_name=f"{name}/epoch1",
        store_key=RUN_KEY,
        timeout_s=30,
    ) as regrouped:
        mixed = regrouped.mix(x)
    return {"error": error, "seconds": detected_s, "mixed": mixed.numpy(), "x": x.numpy()}


@pytest.mark.parametrize("how", ["stop", "kill"])  # stop on the original peers
def test_survivors_of_a_lost_peer_regroup_and_mix_over_the_survivors(peers, how):  # noqa: F811
    """SIGKILL (connections reset) or SIGSTOP (silence): the survivors give up within the
    timeout and mix over the survivors; a stopped peer, continued, cannot take part."""
    victim = 3
    res = peers.run(scenario_killed_then_regroup, name=unique(how), victim=victim, limit=80,
                    how=how)  # fmt: skip
    if how == "kill":
        assert victim not in res
    else:
        status, value, _ = res[victim]
        assert status == "ok" and value["stale"] != "accepted", value
        assert "neighbour rank" in value["stale"]
    survivors = [0, 1, 2]
    for r in survivors:
        status, value, _ = res[r]
        assert status == "ok", value
        assert value["error"] is not None and value["seconds"] < TIMEOUT_S + 5  # + slack
    for r in (0, 2):
        assert f"neighbour rank {victim}" in res[r][1]["error"]
    # Independent re-weighted mix: Metropolis on the path 0-1-2 is [[2/3,1/3,0],[1/3,1/3,1/3],
    # [0,1/3,2/3]] (degrees 1, 2, 1).
    w = np.array([[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]])
    xs = np.stack([res[r][1]["x"].astype(np.float64) for r in survivors])
    for i, r in enumerate(survivors):
        np.testing.assert_allclose(res[r][1]["mixed"], w[i] @ xs, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- the engine replays faults


def scenario_failed_join_then_mix(rank: int, port: int, name: str, unlucky: int) -> dict:  # noqa: F811
    """`unlucky` first fails to join a group (its peer never comes: Gloo's address exchange
    times out, as when a neighbour dies between rendezvous and connect); then all mix."""
    from datetime import timedelta

    import torch.distributed as dist
    from test_gossip import scenario_ring_mix

    if rank == unlucky:
        store = dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=10))
        try:
            dist.init_process_group("gloo", store=dist.PrefixStore(f"{name}/dead", store),
                                    rank=0, world_size=2, timeout=timedelta(seconds=2))  # fmt: skip
        except (RuntimeError, dist.DistError):
            pass
        assert not dist.is_initialized()
    return scenario_ring_mix(rank, port, name)


def test_a_peer_that_once_failed_to_join_meets_the_others_again(peers):  # noqa: F811
    """torch names a process's default group after a counter that a failed join advances;
    the failed peer (a survivor of a dead neighbour, or a donor) must still meet fresh ones."""
    res = peers.run(scenario_failed_join_then_mix, name=unique("after-failed-join"), unlucky=2)
    for rank in range(WORLD):
        status, value, _ = res[rank]
        assert status == "ok", value
        assert not value["initialized_after_close"]


def test_engine_goes_on_without_an_injected_rank(make_config):
    cfg = make_config(num_clients=4, topology="er", **{"topology.p": 0.6, "faults.inject": "1@2"})
    torch.set_num_threads(1)
    engine = Engine(cfg)
    before = {n: p.detach().clone() for n, p in engine.peers[1].model.named_parameters()}
    result = engine.run()
    steps = [r for r in result.records if r["type"] == "step"]
    spb = cfg.train.steps_per_block
    assert all(s["loss"][1] is not None for s in steps[: 2 * spb])
    assert all(s["loss"][1] is None for s in steps[2 * spb :])
    (membership,) = [r for r in result.records if r["type"] == "membership"]
    assert membership["members"] == [0, 2, 3] and membership["phase"] == 2
    # The lost rank's blocks 2.. are untouched from the moment it left.
    for k in range(2, engine.num_blocks):
        for name, p in engine.peers[1].partition.named_parameters(k):
            torch.testing.assert_close(p.detach(), before[name])
    phases = [r for r in result.records if r["type"] == "phase"]
    assert phases[-1]["bytes_sent"][1] == 0


# ---------------------------------------------------------------------- Flower: sim and lab


def _losses(records: list[dict]) -> np.ndarray:
    steps = [r["loss"] for r in records if r["type"] == "step"]
    return np.array([[np.nan if v is None else v for v in s] for s in steps], dtype=float)


def _engine_replay(tmp_path, settings: dict, inject: str) -> tuple[Engine, list[dict]]:
    cfg = load_config(
        {"model": "tiny"}, {**settings, "faults.inject": inject, "output_dir": str(tmp_path)}
    )
    torch.set_num_threads(1)
    engine = Engine(cfg)
    return engine, engine.run().records


FAULT_SETTINGS = {
    "num_clients": 4,
    "train.steps_per_block": 2,
    "data.max_examples": 240,
    "eval.max_examples_per_client": 4,
    "topology.name": "er",
    "topology.p": 0.6,
    "flower.phase": "block",
    "gossip.timeout_s": 10,
    "flower.phase_timeout_s": 300,  # a test that goes wrong ends in minutes, not hours
    "faults.rejoin_wait_s": 400,
    "flower.keep_state": "true",
}


def test_simulation_goes_on_without_an_injected_site_as_the_engine_replays(tmp_path):
    from test_flower_app import finished_runs, flwr_run

    settings = {k: v for k, v in FAULT_SETTINGS.items() if k != "num_clients"}
    proc = flwr_run(tmp_path / "sim", {**settings, "faults.inject": "1@1"})
    runs = finished_runs(tmp_path / "sim")
    assert len(runs) == 1, proc.stdout[-5000:] + proc.stderr[-5000:]
    records = read_metrics(runs[0] / "metrics.jsonl")
    (fault,) = [r for r in records if r["type"] == "fault"]
    assert fault["lost_ranks"] == [1] and fault["phase"] == 1
    (membership,) = [r for r in records if r["type"] == "membership"]
    assert membership["members"] == [0, 2, 3]
    assert "Timeline" in (runs[0] / "summary.md").read_text()
    assert (runs[0] / "participation.png").exists()
    engine, replay = _engine_replay(tmp_path / "engine", FAULT_SETTINGS, "1@1")
    np.testing.assert_allclose(_losses(records), _losses(replay), rtol=1e-4, atol=1e-5)
    run_id = next(r for r in records if r["type"] == "data")["run_id"]
    for rank, peer in enumerate(engine.peers):
        state = tmp_path / "sim" / "state" / f"run-{run_id}" / f"node-{rank}"
        # The lost rank committed only the blocks of the phases before it left.
        for k in range(peer.partition.num_blocks if rank != 1 else 1):
            saved = load_file(state / f"block_{k:04d}.safetensors")
            for name, param in peer.partition.named_parameters(k):
                torch.testing.assert_close(saved[name], param.detach(), rtol=1e-4, atol=1e-5)
        if rank == 1:
            assert not (state / "block_0001.safetensors").exists()


# ---------------------------------------------------------------------- resume


def test_resume_refuses_a_config_that_changes_the_result(tmp_path):
    from deca_flower.resume import check_resumable

    original = load_config({"model": "tiny"}, {"num_clients": 4})
    neutral = load_config(
        {"model": "tiny"},
        {"num_clients": 4, "flower.phase_timeout_s": 900, "faults.on_peer_loss": "stop",
         "output_dir": "elsewhere", "resume": str(tmp_path), "gossip.encryption": "none"},
    )  # fmt: skip
    check_resumable(original, neutral, tmp_path)  # nothing that changes the result differs
    changed = load_config(
        {"model": "tiny"}, {"num_clients": 4, "algorithm.lr": 5e-4, "train.rounds": 3}
    )
    with pytest.raises(ConfigError) as err:
        check_resumable(original, changed, tmp_path)
    assert "algorithm.lr: 0.001 -> 0.0005" in str(err.value)
    assert "train.rounds: 1 -> 3" in str(err.value)


def test_resume_needs_a_run_directory_with_a_checkpoint(tmp_path):
    from deca_flower.resume import Checkpoint, load_checkpoint

    with pytest.raises(ConfigError, match="no such run directory"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(ConfigError, match="has no coordinator.json"):
        load_checkpoint(tmp_path)
    Checkpoint(state_id="7", next_phase=3, global_step=6, evaluated=[-1]).save(tmp_path)
    back = load_checkpoint(tmp_path)
    assert (back.state_id, back.committed_phase, back.global_step) == ("7", 2, 6)


def test_the_engine_refuses_resume_settings(tmp_path):
    cfg = load_config({"model": "tiny"}, {"num_clients": 2, "faults.stop_coordinator_at": 1})
    with pytest.raises(ConfigError, match="faults.stop_coordinator_at"):
        Engine(cfg)


def _node_blocks(state_root, ranks) -> dict[tuple[int, str], torch.Tensor]:
    out = {}
    for rank in ranks:
        for path in sorted((state_root / f"node-{rank}").glob("block_????.safetensors")):
            for name, t in load_file(path).items():
                out[(rank, f"{path.name}:{name}")] = t
    return out


def test_simulation_resumed_after_the_coordinator_stops_is_bit_identical(tmp_path):
    """Stop the coordinator as phase 3 starts, resume from the run directory: the losses
    and every node's final blocks are bit-identical to a run that never stopped."""
    from test_flower_app import finished_runs, flwr_run

    settings = {k: v for k, v in FAULT_SETTINGS.items() if k != "num_clients"}
    out = tmp_path / "sim"
    first = flwr_run(out, {**settings, "faults.stop_coordinator_at": 2})
    stopped = list(out.glob("deca-*.incomplete"))
    assert len(stopped) == 1 and not finished_runs(out), first.stdout[-4000:] + first.stderr[-4000:]
    assert "faults.stop_coordinator_at=2" in first.stdout + first.stderr
    second = flwr_run(out, {**settings, "resume": stopped[0]})
    runs = finished_runs(out)
    assert len(runs) == 1, second.stdout[-5000:] + second.stderr[-5000:]
    assert runs[0].name == stopped[0].name.removesuffix(".incomplete")
    records = read_metrics(runs[0] / "metrics.jsonl")
    (resume,) = [r for r in records if r["type"] == "resume"]
    assert resume["phase"] == 2 and resume["phases_left"] == 2
    steps = [r["global_step"] for r in records if r["type"] == "step"]
    assert steps == list(range(len(steps)))  # no phase lost, none trained twice

    reference = flwr_run(tmp_path / "ref", settings)
    (ref,) = finished_runs(tmp_path / "ref")
    ref_records = read_metrics(ref / "metrics.jsonl")
    assert np.array_equal(_losses(records), _losses(ref_records)), reference.stdout[-3000:]
    state_id, ref_id = (
        next(r for r in recs if r["type"] == "data")["run_id"] for recs in (records, ref_records)
    )
    resumed = _node_blocks(out / "state" / f"run-{state_id}", range(4))
    uninterrupted = _node_blocks(tmp_path / "ref" / "state" / f"run-{ref_id}", range(4))
    assert resumed.keys() == uninterrupted.keys() and len(resumed) > 0
    for key, tensor in uninterrupted.items():
        assert torch.equal(resumed[key], tensor), key


def test_a_lost_site_that_comes_back_is_healed_as_the_engine_replays(tmp_path):
    """Rank 1 fails phase 2 (index 1), the others go on; as phase 4 starts it is back: it
    takes blocks 1 and 2 (trained without it) from its donor over the sealed data plane, and
    the original W is used again. Every rank's final blocks equal the engine's replay, which
    copies the donor's blocks in memory.

    Over an int8 CHOCO wire and two rounds, so the error-feedback state crosses both
    membership changes: round 2 keeps it for blocks 0 and 3 (trained by everyone) and
    restarts it for blocks 1 and 2 on every node (ChocoGossip.begin_block)."""
    from test_flower_app import finished_runs, flwr_run

    faults = {
        "faults.inject": "1@1",
        "faults.rejoin": "1@3",
        "gossip.compression": "int8",
        "gossip.chunk_size": 64,
        "train.rounds": 2,
    }
    settings = {k: v for k, v in FAULT_SETTINGS.items() if k != "num_clients"}
    proc = flwr_run(tmp_path / "sim", {**settings, **faults})
    runs = finished_runs(tmp_path / "sim")
    assert len(runs) == 1, proc.stdout[-5000:] + proc.stderr[-5000:]
    records = read_metrics(runs[0] / "metrics.jsonl")
    (heal,) = [r for r in records if r["type"] == "heal"]
    assert (heal["rank"], heal["phase"]) == (1, 3)
    assert heal["hashes"] == heal["donor_hashes"] and len(heal["hashes"]) == len(heal["blocks"])
    assert heal["bytes_received"] > 0
    topology = next(r for r in records if r["type"] == "topology")
    last = [r for r in records if r["type"] == "membership"][-1]
    assert last["members"] == [0, 1, 2, 3] and last["mixing_matrix"] == topology["mixing_matrix"]
    phases = [r for r in records if r["type"] == "phase"]
    everyone = [0, 1, 2, 3]
    assert [p["members"] for p in phases] == [everyone, [0, 2, 3], [0, 2, 3]] + [everyone] * 5

    cfg = load_config(
        {"model": "tiny"}, {**FAULT_SETTINGS, **faults, "output_dir": str(tmp_path / "engine")}
    )
    torch.set_num_threads(1)
    engine = Engine(cfg)
    replay = engine.run().records
    (engine_heal,) = [r for r in replay if r["type"] == "heal"]
    assert (engine_heal["from"], engine_heal["blocks"]) == (heal["from"], heal["blocks"])
    np.testing.assert_allclose(_losses(records), _losses(replay), rtol=1e-4, atol=1e-5)
    run_id = next(r for r in records if r["type"] == "data")["run_id"]
    for rank, peer in enumerate(engine.peers):
        state = tmp_path / "sim" / "state" / f"run-{run_id}" / f"node-{rank}"
        for k in range(peer.partition.num_blocks):
            saved = load_file(state / f"block_{k:04d}.safetensors")
            for name, param in peer.partition.named_parameters(k):
                torch.testing.assert_close(saved[name], param.detach(), rtol=1e-4, atol=1e-5)


def test_a_site_lost_before_the_coordinator_stopped_is_healed_on_resume(tmp_path):
    """Rank 1 fails phase 2 (index 1) and the run goes on; the coordinator stops as phase 3
    starts; on resume every site is there, and rank 1 is healed before it trains again:
    the result equals the engine replaying the loss and a return at phase index 2."""
    from test_flower_app import finished_runs, flwr_run

    settings = {k: v for k, v in FAULT_SETTINGS.items() if k != "num_clients"}
    out = tmp_path / "sim"
    first = flwr_run(out, {**settings, "faults.inject": "1@1", "faults.stop_coordinator_at": 2})
    stopped = list(out.glob("deca-*.incomplete"))
    assert len(stopped) == 1, first.stdout[-4000:] + first.stderr[-4000:]
    stopped = stopped[0]
    proc = flwr_run(out, {**settings, "faults.inject": "1@1", "resume": stopped})
    runs = finished_runs(out)
    assert len(runs) == 1, proc.stdout[-5000:] + proc.stderr[-5000:]
    records = read_metrics(runs[0] / "metrics.jsonl")
    (heal,) = [r for r in records if r["type"] == "heal"]
    assert (heal["rank"], heal["phase"], heal["blocks"]) == (1, 2, [1])
    assert heal["hashes"] == heal["donor_hashes"]
    cfg = load_config(
        {"model": "tiny"},
        {**FAULT_SETTINGS, "faults.inject": "1@1", "faults.rejoin": "1@2",
         "output_dir": str(tmp_path / "engine")},
    )  # fmt: skip
    torch.set_num_threads(1)
    engine = Engine(cfg)
    replay = engine.run().records
    np.testing.assert_allclose(_losses(records), _losses(replay), rtol=1e-4, atol=1e-5)
    run_id = next(r for r in records if r["type"] == "data")["run_id"]
    for rank, peer in enumerate(engine.peers):
        state = out / "state" / f"run-{run_id}" / f"node-{rank}"
        for k in range(peer.partition.num_blocks):
            saved = load_file(state / f"block_{k:04d}.safetensors")
            for name, param in peer.partition.named_parameters(k):
                torch.testing.assert_close(saved[name], param.detach(), rtol=1e-4, atol=1e-5)


def test_a_disconnected_survivor_graph_waits_then_names_the_lost_site(tmp_path):
    """The hub of a star fails: the others cannot reach consensus without it, so the
    coordinator waits (faults.rejoin_wait_s) and then stops, naming the site and settings."""
    from test_flower_app import finished_runs, flwr_run

    settings = {k: v for k, v in FAULT_SETTINGS.items() if k != "num_clients"}
    settings.update({"topology.name": "star", "gossip.timeout_s": 5, "faults.inject": "0@1",
                     "flower.phase_timeout_s": 90, "faults.rejoin_wait_s": 100})  # fmt: skip
    proc = flwr_run(tmp_path / "sim", settings)
    output = proc.stdout + proc.stderr
    assert not finished_runs(tmp_path / "sim")
    assert "did not come back within 100 s (faults.rejoin_wait_s)" in output, output[-9000:]
    assert "lost rank 0 (SuperNode" in output and "falls apart into [[1], [2], [3]]" in output
    assert "faults.on_peer_loss=continue, faults.min_peers" in output
    (stopped,) = (tmp_path / "sim").glob("deca-*.incomplete")
    (waiting,) = [r for r in read_metrics(stopped / "metrics.jsonl") if r["type"] == "waiting"]
    assert waiting["lost_ranks"] == [0] and waiting["phase"] == 1
