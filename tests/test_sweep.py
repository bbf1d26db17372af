"""The sweep runner and the tables on a tiny grid: cells, resume, numbers, plots."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "simulation"))

import sweep  # noqa: E402
import tables  # noqa: E402

from deca_flower.reporting import read_metrics  # noqa: E402

GRID = """
name: tiny-grid
shared: [model=tiny, data.max_examples=160, train.steps_per_block=1,
         eval.max_examples_per_client=4, eval.zero_shot=false]
defaults: {topology: ring, num_clients: 3, layers_per_block: 2}
variants:
  deca: [algorithm=deca]
  local-only: [algorithm=local]
experiments:
  methods:
    variants: [deca, local-only]
    seeds: [0, 1]
  topology:
    variants: [deca]
    axes: {topology: [ring, complete]}
    seeds: [0]
"""


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    grid = root / "grid.yaml"
    grid.write_text(GRID)
    out = root / "results"
    assert sweep.main([str(grid), "--out", str(out), "--jobs", "2"]) == 0
    return grid, out


def test_grid_expands_to_shared_unique_cells(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(GRID)
    experiments = sweep.expand(sweep.load_grid(path))
    assert len(experiments["methods"]) == 4 and len(experiments["topology"]) == 2
    cells = sweep.run_order(experiments)
    assert len(cells) == 5  # deca on a ring, seed 0, belongs to both experiments
    assert [c.seed for c in cells] == sorted(c.seed for c in cells)


def test_unknown_variant_in_a_grid_is_named(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(GRID.replace("variants: [deca]\n", "variants: [dcea]\n"))
    with pytest.raises(SystemExit, match="dcea"):
        sweep.load_grid(path)


def test_every_cell_writes_its_jsonl_and_summary(swept):
    _, out = swept
    summaries = [json.loads(p.read_text()) for p in (out / "cells").glob("*/cell.json")]
    assert len(summaries) == 5
    for s in summaries:
        records = read_metrics(out / s["run_dir"] / "metrics.jsonl")
        final = [r for r in records if r["type"] == "eval"][-1]
        assert s["client_accuracy"] == final["client_mean"]["accuracy"]
        if s["variant"] == "local-only":
            assert s["bytes_sent_per_client"] == 0
        else:
            assert s["bytes_sent_per_client"] > 0


def test_rerun_skips_finished_cells(swept, capsys):
    grid, out = swept
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/cell.json")}
    assert sweep.main([str(grid), "--out", str(out)]) == 0
    assert "5 cells, 5 already done" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_only_runs_a_subset_but_grid_json_keeps_every_experiment(tmp_path, capsys):
    path = tmp_path / "g.yaml"
    path.write_text(GRID)
    out = tmp_path / "results"
    assert sweep.main([str(path), "--out", str(out), "--only", "topology", "--dry-run"]) == 0
    assert "[sweep] 2 cells, 0 already done" in capsys.readouterr().out
    recorded = json.loads((out / "grid.json").read_text())
    assert sorted(recorded["experiments"]) == ["methods", "topology"]
    assert len(recorded["experiments"]["methods"]) == 4
    assert "--only" not in recorded["command"]


def test_tables_report_mean_and_std_over_seeds_and_plots(swept):
    _, out = swept
    tables.main([str(out)])
    text = (out / "tables.md").read_text()
    assert "## Table 1" in text and "## Table 3" in text and "## Table 4" in text
    deca = [
        json.loads(p.read_text()) for p in (out / "cells").glob("deca_topology-ring*/cell.json")
    ]
    accs = [c["client_accuracy"] * 100 for c in deca]
    expected = f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}"
    assert f"| deca | {expected} |" in text
    for png in ("loss_methods.png", "accuracy_vs_bytes.png", "accuracy_vs_memory.png",
                "loss_topology.png"):  # fmt: skip
        assert (out / png).stat().st_size > 0


def test_flower_engine_cells_reproduce_the_in_process_engine(tmp_path):
    """`--engine flower` runs the cell through `flwr run` (Flower's simulation engine)."""
    grid = tmp_path / "g.yaml"
    grid.write_text(
        GRID.replace(
            "variants: [deca, local-only]\n    seeds: [0, 1]", "variants: [deca]\n    seeds: [0]"
        )
    )
    losses = {}
    for engine in ("engine", "flower"):
        out = tmp_path / engine
        assert (
            sweep.main([str(grid), "--out", str(out), "--engine", engine, "--only", "methods"]) == 0
        )
        (cell,) = [json.loads(p.read_text()) for p in (out / "cells").glob("*/cell.json")]
        assert cell["engine"] == engine
        records = read_metrics(out / cell["run_dir"] / "metrics.jsonl")
        losses[engine] = [r["loss"] for r in records if r["type"] == "step"]
    assert len(losses["flower"]) == len(losses["engine"]) > 0
    for a, b in zip(losses["flower"], losses["engine"]):
        assert a == pytest.approx(b, rel=1e-4)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux affinity")
def test_cells_get_threads_from_the_cpus_this_process_may_use():
    # A runner pinned to one CPU (taskset, a cpuset) must not give its cells one thread
    # per CPU of the machine: oversubscribed OpenMP threads on one core crawl.
    one_cpu = min(os.sched_getaffinity(0))
    code = f"import os, sweep; os.sched_setaffinity(0, {{{one_cpu}}}); print(sweep.usable_cpus())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO / "simulation",
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "1"
    assert sweep.usable_cpus() == len(os.sched_getaffinity(0))
