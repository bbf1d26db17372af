"""Run a named experiment grid, resumably: one run per cell, finished cells are skipped.

    python simulation/sweep.py simulation/grids/paper-cpu.yaml --out docs/results/paper-cpu
    python simulation/sweep.py GRID --out DIR --jobs 2          # two cells at a time
    python simulation/sweep.py GRID --out DIR --engine flower   # through `flwr run`
    python simulation/sweep.py GRID --out DIR --only methods --dry-run

A grid file (see `simulation/grids/`) names variants (preset + overrides), axes
(topology, num_clients, layers_per_block, alpha) and experiments (which variants
x which axis values x which seeds). Each cell runs in its own process, so a crash
or a memory peak stays in that cell, and writes under `<out>/cells/<cell id>/`:

    run-*/metrics.jsonl   the run's own JSONL (steps, phases, evals), config, plots
    log.txt               its console output
    cell.json             the cell's summary, written last: its presence = done

Then `python simulation/tables.py <out>` makes the tables and plots.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from deca_flower.cli import split_args
from deca_flower.reporting import read_metrics

APP_DIR = Path(__file__).resolve().parents[1]  # the Flower app: pyproject.toml is here
AXES = {  # axis -> how a value becomes a setting
    "topology": "topology={}",
    "num_clients": "num_clients={}",
    "layers_per_block": "train.layers_per_block={}",
    "alpha": "data.alpha={}",
}


@dataclass(frozen=True)
class Cell:
    variant: str
    axes: tuple[tuple[str, Any], ...]  # every axis, in AXES order
    seed: int

    @property
    def id(self) -> str:
        parts = [_slug(self.variant)] + [f"{k}-{v}" for k, v in self.axes] + [f"s{self.seed}"]
        return "_".join(parts)

    def settings(self, grid: dict) -> list[str]:
        axes = [AXES[k].format(v) for k, v in self.axes]
        return [*grid["shared"], *axes, *grid["variants"][self.variant], f"seed={self.seed}"]

    def describe(self) -> dict[str, Any]:
        return {"variant": self.variant, **dict(self.axes), "seed": self.seed}


def load_grid(path: str | Path) -> dict:
    grid = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    unknown = set(grid["defaults"]) - set(AXES)
    if unknown:
        raise SystemExit(f"{path}: unknown axis {sorted(unknown)} in defaults; axes: {list(AXES)}")
    for name, exp in grid["experiments"].items():
        for variant in exp["variants"]:
            if variant not in grid["variants"]:
                raise SystemExit(f"{path}: experiment {name} names unknown variant {variant!r}")
        bad = set(exp.get("axes", {})) - set(AXES)
        if bad:
            raise SystemExit(f"{path}: experiment {name} varies unknown axis {sorted(bad)}")
    return grid


def expand(grid: dict, only: list[str] | None = None) -> dict[str, list[Cell]]:
    """Experiment name -> its cells (cells are shared between experiments)."""
    out = {}
    for name, exp in grid["experiments"].items():
        if only and name not in only:
            continue
        varied = exp.get("axes", {})
        (axis, values), *rest = list(varied.items()) or [(None, [None])]
        if rest:
            raise SystemExit(f"experiment {name}: vary one axis at a time (got {list(varied)})")
        cells = []
        for seed in exp["seeds"]:
            for value in values:
                for variant in exp["variants"]:
                    axes = dict(grid["defaults"])
                    if axis is not None:
                        axes[axis] = value
                    ordered = tuple((k, axes[k]) for k in AXES if k in axes)
                    cells.append(Cell(variant, ordered, int(seed)))
        out[name] = cells
    return out


def run_order(experiments: dict[str, list[Cell]]) -> list[Cell]:
    """Unique cells, lowest seed first: one seed of everything before any repeat."""
    unique = list(dict.fromkeys(c for cells in experiments.values() for c in cells))
    return sorted(unique, key=lambda c: c.seed)


# ---------------------------------------------------------------------- running a cell


def engine_command(cell: Cell, grid: dict, cell_dir: Path) -> list[str]:
    settings = [*cell.settings(grid), f"output_dir={cell_dir}", "run_name=run"]
    return [sys.executable, "-m", "deca_flower.cli", "engine", *settings]


def flower_command(cell: Cell, grid: dict, cell_dir: Path) -> list[str]:
    presets, overrides = split_args(cell.settings(grid))
    n = dict(cell.axes).get("num_clients", 8)
    run_config = [f"preset-{g}='{p}'" for g, p in presets.items()]
    run_config += [
        f"output-dir='{cell_dir}'",
        "run-name='run'",
        f"num-clients={n}",
        "overrides='" + " ".join(o for o in overrides if not o.startswith("num_clients=")) + "'",
    ]
    federation = f"num-supernodes={n} client-resources-num-cpus=1 init-args-num-cpus={n}"
    return [
        "flwr", "run", str(APP_DIR), "--stream",
        "--run-config", " ".join(run_config),
        "--federation-config", federation,
    ]  # fmt: skip


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (`taskset`, a cpuset), which
    can be fewer than the machine's `os.cpu_count()`; cells get threads from this."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def run_cell(cell: Cell, grid: dict, out: Path, engine: str, threads: int) -> dict | None:
    cell_dir = out / "cells" / cell.id
    done = cell_dir / "cell.json"
    if done.exists():
        return json.loads(done.read_text())
    cell_dir.mkdir(parents=True, exist_ok=True)
    build = engine_command if engine == "engine" else flower_command
    command = build(cell, grid, cell_dir)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    start = time.perf_counter()
    with (cell_dir / "log.txt").open("w") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        if code != 0:  # a negative code is a signal: -9 is usually the kernel's OOM killer
            log.write(
                f"\n[sweep] exit code {code}{' (killed: out of memory?)' if code == -9 else ''}\n"
            )
    runs = sorted(p for p in cell_dir.glob("run-*") if not p.name.endswith(".incomplete"))
    if code != 0 or not runs:
        return None
    summary = {
        **cell.describe(),
        "cell": cell.id,
        "engine": engine,
        "run_dir": str(runs[-1].relative_to(out)),
        "seconds": time.perf_counter() - start,
        **summarize_run(runs[-1]),
    }
    done.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def summarize_run(run_dir: Path) -> dict[str, Any]:
    """The numbers the tables need, from a run's metrics.jsonl."""
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if r["type"] == "eval" and r["round"] >= 0]
    phases = [r for r in records if r["type"] == "phase"]
    final = evals[-1]
    average = final.get("average", final["global"])
    n = len(phases[0]["bytes_sent"])
    return {
        "client_accuracy": final["client_mean"]["accuracy"],
        "client_f1": final["client_mean"]["f1_weighted"],
        "average_accuracy": average["accuracy"],
        "average_f1": average["f1_weighted"],
        **_scores("client", final["client_mean"]),
        **_scores("average", average),
        **_eval_parts(evals, records),
        **_diagnostics(phases),
        "consensus_distance": final.get("consensus_distance", 0.0),
        "bytes_sent_per_client": sum(sum(p["bytes_sent"]) for p in phases) / n,
        "train_state_bytes": max(max(p.get("train_state_bytes", [0])) for p in phases),
        "peak_memory_bytes": max(max(p["peak_memory_bytes"]) for p in phases),
        "trained_numel": max(p["block_numel"] for p in phases),
        "steps": sum(1 for r in records if r["type"] == "step"),
        "final_loss": _tail_loss(records),
    }


SCORES = ("ll_accuracy", "f1_macro", "ll_f1_macro", "majority_accuracy", "majority_f1_macro")


def _scores(prefix: str, metrics: dict | None) -> dict[str, float]:
    """Likelihood, macro-F1 and majority-baseline scores (runs before issue 13 lack them);
    for client/average the plain accuracy and F1 already have their historical names."""
    keys = SCORES if prefix in ("client", "average") else ("accuracy", "f1_weighted", *SCORES)
    return {f"{prefix}_{k}": metrics[k] for k in keys if metrics and k in metrics}


def _eval_parts(evals: list[dict], records: list[dict]) -> dict[str, float]:
    """Validation (lr selection), global test and zero-shot scores of the run, if it has them."""
    final, out = evals[-1], {}
    val = final.get("validation")
    if val:
        out.update(_scores("val_client", val["client_mean"]))
        out.update(_scores("val_average", val.get("average")))
    glob = final.get("global_test")
    if glob:
        out.update(_scores("global_client", glob["client_mean"]))
        out.update(_scores("global_average", glob.get("average")))
    zero = next((r for r in records if r["type"] == "eval" and r["round"] == -1), None)
    if zero:
        out.update(_scores("zero_client", zero["client_mean"]))
        if zero.get("global_test"):
            out.update(_scores("zero_global", zero["global_test"]["client_mean"]))
    return out


def _diagnostics(phases: list[dict]) -> dict[str, float]:
    """Mean over phases and clients of the per-phase step diagnostics (None = undefined)."""
    out = {}
    for key in ("local_step", "effective_step", "update_grad_cosine"):
        values = [v for p in phases for v in p.get(key, []) if v is not None]
        if values:
            out[key] = sum(values) / len(values)
    return out


def _tail_loss(records: list[dict], window: int = 4) -> float:
    steps = [r for r in records if r["type"] == "step"][-window:]
    return sum(sum(r["loss"]) / len(r["loss"]) for r in steps) / len(steps)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("grid", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="+", help="experiments to run (default: all)")
    parser.add_argument("--engine", choices=("engine", "flower"), default="engine")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at the same time")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and stop")
    args = parser.parse_args(argv)

    grid = load_grid(args.grid)
    cells = run_order(expand(grid, args.only))
    args.out.mkdir(parents=True, exist_ok=True)
    # The whole grid, whatever --only ran now: tables.py reads every experiment from here.
    command = ["python", "simulation/sweep.py", str(args.grid), "--out", str(args.out)]
    (args.out / "grid.json").write_text(
        json.dumps(
            {
                "grid": grid,
                "experiments": {k: [c.id for c in v] for k, v in expand(grid, None).items()},
                "command": shlex.join(command),
            },
            indent=1,
        )
    )
    todo = [c for c in cells if not (args.out / "cells" / c.id / "cell.json").exists()]
    print(f"[sweep] {len(cells)} cells, {len(cells) - len(todo)} already done", flush=True)
    if args.dry_run:
        for c in todo:
            print("  " + c.id)
        return 0
    threads = max(1, usable_cpus() // args.jobs)
    start = time.perf_counter()
    failed = []

    def work(item: tuple[int, Cell]) -> None:
        i, cell = item
        print(f"[sweep] start {i}/{len(todo)}: {cell.id}", flush=True)
        result = run_cell(cell, grid, args.out, args.engine, threads)
        elapsed = time.perf_counter() - start
        if result is None:
            failed.append(cell.id)
            print(f"[sweep] FAILED {cell.id}: see {args.out}/cells/{cell.id}/log.txt", flush=True)
        else:
            print(
                f"[sweep] done {i}/{len(todo)}: {cell.id} acc {result['client_accuracy']:.3f} "
                f"in {result['seconds']:.0f}s (sweep {elapsed / 60:.1f} min)",
                flush=True,
            )

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(work, enumerate(todo, 1)))
    if failed:
        print(f"[sweep] {len(failed)} cell(s) failed: {failed}; rerun to retry them")
        return 1
    print(f"[sweep] all cells done; now: python simulation/tables.py {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
