"""End-to-end `flwr run .` through Flower's real simulation engine (Ray), tiny model.

One successful run (module fixture) is checked for outputs, falling loss, bytes on the
wire, no parameters reaching the coordinator, and equivalence with the in-process engine.
The failure tests check that bad settings stop the run with a message naming the fix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from deca_flower.config import load_config
from deca_flower.engine import Engine
from deca_flower.reporting import read_metrics
from deca_flower.topology import build_graph, neighbours

REPO = Path(__file__).resolve().parents[1]
NUM_NODES = 4
SETTINGS = {  # shared by the Flower run and the engine run it is compared with
    "num_clients": NUM_NODES,
    "train.steps_per_block": 2,
    "data.max_examples": 240,
    "eval.max_examples_per_client": 4,
    "topology.name": "er",
    "topology.p": 0.6,
    "flower.keep_state": "true",
    "flower.export_models": "true",
}

# `flwr` and the local SuperLink it starts must come from this environment.
_bin = str(Path(sys.executable).parent)


def flwr_run(
    out_dir: Path,
    overrides: dict,
    *,
    nodes: int = NUM_NODES,
    cpus: int | None = None,
    model: str = "tiny",
    algorithm: str = "deca",
    timeout: int = 600,
) -> subprocess.CompletedProcess:
    overrides = {"num_clients": nodes, **overrides}
    dotted = " ".join(f"{k}={v}" for k, v in overrides.items())
    run_config = (
        f'preset-model="{model}" preset-algorithm="{algorithm}" output-dir="{out_dir}" '
        f'overrides="{dotted}"'
    )
    federation = (
        f"num-supernodes={nodes} client-resources-num-cpus=1 init-args-num-cpus={cpus or nodes}"
    )
    env = {
        **os.environ,
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_DEDUP_LOGS": "0",
    }
    return subprocess.run(
        [
            "flwr",
            "run",
            str(REPO),
            "--stream",
            "--run-config",
            run_config,
            "--federation-config",
            federation,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def finished_runs(out_dir: Path) -> list[Path]:
    return [p for p in out_dir.glob("deca-*") if not p.name.endswith(".incomplete")]


@pytest.fixture(scope="module")
def flower_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("flower")
    proc = flwr_run(out_dir, {k: v for k, v in SETTINGS.items() if k != "num_clients"})
    runs = finished_runs(out_dir)
    assert len(runs) == 1, f"no result:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return out_dir, runs[0], read_metrics(runs[0] / "metrics.jsonl"), proc


def test_flower_run_writes_outputs_and_learns(flower_run):
    _, run, records, proc = flower_run
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.md",
        "loss.png",
        "accuracy.png",
        "consensus.png",
        "confusion.png",
        "label_distribution.png",
    ):
        assert (run / name).stat().st_size > 0, name
    steps = [r for r in records if r["type"] == "step"]
    data = next(r for r in records if r["type"] == "data")
    assert len(steps) == data["num_blocks"] * SETTINGS["train.steps_per_block"]
    assert np.mean(steps[-1]["loss"]) < np.mean(steps[0]["loss"])
    evals = [r for r in records if r["type"] == "eval"]
    assert [e["round"] for e in evals] == [-1, 0]  # zero-shot, then after round 1
    assert "phase 4/4" in proc.stdout + proc.stderr  # progress lines reach the console


def test_nodes_export_their_final_models(flower_run):
    from transformers import AutoModelForCausalLM

    _, _, records, _ = flower_run
    paths = next(r for r in records if r["type"] == "exported_models")["paths"]
    assert len(paths) == NUM_NODES
    model = AutoModelForCausalLM.from_pretrained(paths[1])
    assert model.config.num_hidden_layers == 4


def test_coordinator_never_receives_parameters(flower_run):
    _, _, records, _ = flower_run
    coordinator = next(r for r in records if r["type"] == "coordinator")
    smallest_block = min(r["block_numel"] for r in records if r["type"] == "phase")
    assert coordinator["array_records_received"] == 0
    assert coordinator["max_reply_values"] < smallest_block


def test_bytes_on_the_wire_are_block_times_degree(flower_run):  # invariant 12
    _, _, records, _ = flower_run
    graph = build_graph("er", NUM_NODES, p=SETTINGS["topology.p"], seed=0)
    for phase in (r for r in records if r["type"] == "phase"):
        for rank in range(NUM_NODES):
            degree = len(neighbours(graph, rank))
            expected = phase["block_numel"] * 4 * degree * SETTINGS["train.steps_per_block"]
            assert phase["bytes_sent"][rank] == expected
            assert phase["bytes_received"][rank] == expected


def test_flower_run_equals_in_process_engine(flower_run, tmp_path):
    out_dir, _, records, _ = flower_run
    cfg = load_config({"model": "tiny"}, {**SETTINGS, "output_dir": str(tmp_path)})
    assert_engine_reproduces(cfg, records, out_dir, block_atol=1e-5)


def test_flower_evaluation_and_diagnostics_equal_the_engine(tmp_path):
    settings = {
        **{k: v for k, v in SETTINGS.items() if k != "flower.export_models"},
        "num_clients": 3,
        "topology.name": "ring",
        "eval.global_test_size": 8,  # scored by every node's model and the average (sharded)
        "data.validation_fraction": 0.1,
        "algorithm.bias_correction": "exact",
    }
    out_dir = tmp_path / "flower"
    proc = flwr_run(out_dir, {k: v for k, v in settings.items() if k != "num_clients"}, nodes=3)
    runs = finished_runs(out_dir)
    assert len(runs) == 1, f"no result:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    records = read_metrics(runs[0] / "metrics.jsonl")
    cfg = load_config({"model": "tiny"}, {**settings, "output_dir": str(tmp_path)})
    engine_records = assert_engine_reproduces(cfg, records, out_dir, block_atol=1e-5)
    # Evaluation (generated and likelihood labels, validation, global test, majority
    # baselines) and the step diagnostics come out as the engine computes them.
    flower_evals = [r for r in records if r["type"] == "eval"]
    engine_evals = [r for r in engine_records if r["type"] == "eval"]
    assert [e["round"] for e in flower_evals] == [e["round"] for e in engine_evals] == [-1, 0]
    for f, e in zip(flower_evals, engine_evals):
        for key in ("predictions", "ll_predictions", "labels", "average_ll_predictions"):
            assert f.get(key) == e.get(key), key
        for part in ("client_mean", "global", "average"):
            assert _close(f.get(part), e.get(part)), part
        assert _close(f["validation"], e["validation"])
        assert f["global_test"]["num_examples"] == 8
        assert _close(f["global_test"], e["global_test"])
    flower_phases = [r for r in records if r["type"] == "phase"]
    engine_phases = [r for r in engine_records if r["type"] == "phase"]
    for key in ("local_step", "effective_step", "update_grad_cosine"):
        got = [p[key] for p in flower_phases]
        np.testing.assert_allclose(got, [p[key] for p in engine_phases], rtol=1e-3, atol=1e-5)
        assert all(v is not None for row in got for v in row)


def _close(a, b, tol: float = 1e-6) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, abs=tol, nan_ok=True)
    return a == b


def assert_engine_reproduces(
    cfg, records: list[dict], out_dir: Path, block_atol: float
) -> list[dict]:
    """The in-process engine on `cfg` gives the Flower run's losses and saved blocks."""
    torch.set_num_threads(1)
    engine = Engine(cfg)
    result = engine.run()
    engine_steps = [r["loss"] for r in result.records if r["type"] == "step"]
    flower_steps = [r["loss"] for r in records if r["type"] == "step"]
    np.testing.assert_allclose(flower_steps, engine_steps, rtol=1e-4, atol=1e-5)
    run_id = next(r for r in records if r["type"] == "data")["run_id"]
    for rank, peer in enumerate(engine.peers):
        state = out_dir / "state" / f"run-{run_id}" / f"node-{rank}"
        for k in range(peer.partition.num_blocks):
            saved = load_file(state / f"block_{k:04d}.safetensors")
            for name, param in peer.partition.named_parameters(k):
                torch.testing.assert_close(saved[name], param.detach(), rtol=1e-4, atol=block_atol)
    return result.records


@pytest.mark.parametrize("algorithm", ["decaf", "local"])
def test_baseline_through_flower_equals_the_engine(algorithm, tmp_path):
    # decaf exchanges factors and re-factorizes each product; local sends nothing.
    settings = {k: v for k, v in SETTINGS.items() if k != "flower.export_models"}
    settings["eval.zero_shot"] = "false"
    out_dir = tmp_path / "flower"
    proc = flwr_run(out_dir, {k: v for k, v in settings.items() if k != "num_clients"},
                    algorithm=algorithm)  # fmt: skip
    runs = finished_runs(out_dir)
    assert len(runs) == 1, f"no result:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    records = read_metrics(runs[0] / "metrics.jsonl")
    cfg = load_config(
        {"model": "tiny", "algorithm": algorithm}, {**settings, "output_dir": str(tmp_path)}
    )
    if algorithm == "local":
        assert all(sum(p["bytes_sent"]) == 0 for p in records if p["type"] == "phase")
    assert_engine_reproduces(cfg, records, out_dir, block_atol=1e-4)


@pytest.mark.parametrize("compression", ["bf16", "int8"])
def test_compressed_gossip_through_flower_equals_the_engine(compression, tmp_path):
    # int8 keeps CHOCO error-feedback state in each node's state store between phases.
    settings = {k: v for k, v in SETTINGS.items() if k != "flower.export_models"}
    settings.update({"eval.zero_shot": "false", "gossip.compression": compression})
    out_dir = tmp_path / "flower"
    proc = flwr_run(out_dir, {k: v for k, v in settings.items() if k != "num_clients"})
    runs = finished_runs(out_dir)
    assert len(runs) == 1, f"no result:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    records = read_metrics(runs[0] / "metrics.jsonl")
    cfg = load_config({"model": "tiny"}, {**settings, "output_dir": str(tmp_path)})
    assert_engine_reproduces(cfg, records, out_dir, block_atol=1e-6)
    engine_phases = [r for r in read_metrics(finished_runs(tmp_path)[0] / "metrics.jsonl")
                     if r["type"] == "phase"]  # fmt: skip
    flower_phases = [r for r in records if r["type"] == "phase"]
    assert [p["bytes_sent"] for p in flower_phases] == [p["bytes_sent"] for p in engine_phases]


def test_instruction_tuning_through_flower_equals_the_engine(tmp_path):
    """Alpaca-style data: training, per-client perplexity / ROUGE-L and the average model's
    (pooled from the nodes' own test slices) match the engine, which pools the test sets."""
    rows = [
        {
            "instruction": f"Name colour {i % 4}.",
            "input": "",
            "output": f"Colour {i % 4} is c{i % 4}.",
        }
        for i in range(60)
    ]
    data = tmp_path / "alpaca.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    settings = {
        "num_clients": 3,
        "train.steps_per_block": 2,
        "data.name": "alpaca",
        "data.path": str(data),
        "eval.max_examples_per_client": 4,
        "eval.max_new_tokens": 6,
        "eval.zero_shot": "true",
        "topology.name": "ring",
        "flower.keep_state": "true",
    }
    out_dir = tmp_path / "flower"
    proc = flwr_run(out_dir, {k: v for k, v in settings.items() if k != "num_clients"}, nodes=3)
    runs = finished_runs(out_dir)
    assert len(runs) == 1, f"no result:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    records = read_metrics(runs[0] / "metrics.jsonl")
    cfg = load_config({"model": "tiny"}, {**settings, "output_dir": str(tmp_path)})
    assert_engine_reproduces(cfg, records, out_dir, block_atol=1e-4)
    engine_evals = [
        r for r in read_metrics(next(tmp_path.glob("deca-*/metrics.jsonl"))) if r["type"] == "eval"
    ]
    flower_evals = [r for r in records if r["type"] == "eval"]
    assert [e["round"] for e in flower_evals] == [-1, 0] == [e["round"] for e in engine_evals]
    for f, e in zip(flower_evals, engine_evals):
        assert f["task"] == "generation"
        for fc, ec in zip(f["clients"], e["clients"]):
            assert fc["perplexity"] == pytest.approx(ec["perplexity"], rel=1e-4)
            assert fc["rouge_l"] == pytest.approx(ec["rouge_l"], abs=1e-6)
    average, expected = flower_evals[-1]["average"], engine_evals[-1]["average"]
    assert average["num_examples"] == expected["num_examples"] == 12
    assert average["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-4)
    assert average["rouge_l"] == pytest.approx(expected["rouge_l"], abs=1e-3)


def test_centralized_is_refused_by_the_flower_app(tmp_path):
    proc = flwr_run(tmp_path, {"num_clients": 2}, nodes=2, algorithm="centralized")
    _fails_with(proc, "deca-flower engine algorithm=centralized", tmp_path)


def _fails_with(proc: subprocess.CompletedProcess, text: str, out_dir: Path) -> None:
    output = proc.stdout + proc.stderr
    assert text in output, output[-6000:]
    assert finished_runs(out_dir) == []  # nothing presented as a result


def test_unknown_preset_fails_fast(tmp_path):
    proc = flwr_run(tmp_path, {"num_clients": 2}, nodes=2, model="gpt-17")
    _fails_with(proc, "unknown model preset 'gpt-17'", tmp_path)


def test_disconnected_file_topology_fails_fast(tmp_path):
    edges = tmp_path / "two_islands.edgelist"
    edges.write_text("0 1\n2 3\n")
    proc = flwr_run(tmp_path, {"topology.name": "file", "topology.path": str(edges)})
    _fails_with(proc, "topology.path", tmp_path)
    assert "disconnected" in (proc.stdout + proc.stderr).lower()


def test_too_few_concurrent_actors_names_the_federation_config(tmp_path):
    # 3 peers but Ray has CPUs for 2 actors: peers 0-1 wait at the barrier for peer 2.
    proc = flwr_run(tmp_path, {"num_clients": 3, "flower.barrier_timeout_s": 15}, nodes=3, cpus=2)
    _fails_with(proc, "num-supernodes=3 client-resources-num-cpus=1 init-args-num-cpus=3", tmp_path)


def test_more_peers_than_the_simulation_engine_runs_at_once_fails_fast(tmp_path):
    # flwr's simulation engine hands out at most min(32, CPUs + 4) messages at a time.
    limit = min(32, (os.cpu_count() or 1) + 4)
    proc = flwr_run(tmp_path, {}, nodes=limit + 1)
    _fails_with(proc, f"runs at most {limit} messages at once", tmp_path)
    assert f"num-clients={limit}" in proc.stdout + proc.stderr
