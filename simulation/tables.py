"""Turn a sweep's cells into paper-shaped markdown tables and PNG plots.

    python simulation/tables.py docs/results/paper-cpu

Reads `<dir>/grid.json` and `<dir>/cells/*/cell.json` (see `simulation/sweep.py`),
writes `<dir>/tables.md` and `<dir>/*.png`. Numbers are mean +- std over the seeds
a cell was run with (just the value when there is one seed). Experiments named
`methods`, `topology`, `clients` and `layers_per_block` become the paper's Tables
1/3, 4, 5 and 6; any other experiment gets a generic table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from deca_flower.reporting import read_metrics  # noqa: E402

AXIS_TITLES = {
    "topology": "Topology",
    "num_clients": "Clients",
    "layers_per_block": "Layers per block",
    "alpha": "Dirichlet alpha",
}
ABLATIONS = ("deca", "w/o BMA", "trivial BMA")


def load(results: Path) -> tuple[dict, dict[str, dict]]:
    grid = json.loads((results / "grid.json").read_text())
    cells = {}
    for path in sorted((results / "cells").glob("*/cell.json")):
        cell = json.loads(path.read_text())
        cells[cell["cell"]] = cell
    return grid, cells


def group_seeds(cells: list[dict], axis: str | None) -> dict[tuple, list[dict]]:
    """(variant, axis value) -> the cells of all seeds, in first-seen order."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in cells:
        groups[(c["variant"], c.get(axis) if axis else None)].append(c)
    return groups


def fmt(values: list[float | None], scale: float = 100.0, digits: int = 2) -> str:
    """mean ± std (the value for one seed); "-" where a cell lacks the number."""
    if not values or any(v is None for v in values):
        return "-"
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def mean(cells: list[dict], key: str) -> float:
    return statistics.mean(c[key] for c in cells)


# ---------------------------------------------------------------------- tables


def accuracy_table(groups: dict[tuple, list[dict]], dataset: str, first: str | None) -> str:
    head = f"| {first} | Method |" if first else "| Method |"
    sep = "|---|---|" if first else "|---|"
    rows = [
        head + f" {dataset} Acc. | {dataset} F1 | Avg-model Acc. | Avg-model F1 |"
        " Acc. (likelihood) | Avg-model Acc. (likelihood) | majority Acc. | seeds |",
        sep + "---|---|---|---|---|---|---|---|",
    ]
    keys = ("client_accuracy", "client_f1", "average_accuracy", "average_f1",
            "client_ll_accuracy", "average_ll_accuracy", "client_majority_accuracy")  # fmt: skip
    for (variant, value), group in groups.items():
        lead = f"| {value} | {variant} |" if first else f"| {variant} |"
        cols = " |".join(f" {fmt([c.get(k) for c in group])}" for k in keys)
        rows.append(lead + cols + f" | {len(group)} |")
    return "\n".join(rows)


def ablation_table(groups: dict[tuple, list[dict]]) -> str:
    rows = [
        "| Method | Acc. | F1 | final train loss | consensus distance | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for (variant, _), group in groups.items():
        if variant not in ABLATIONS:
            continue
        rows.append(
            f"| {variant} | {fmt([c['client_accuracy'] for c in group])} |"
            f" {fmt([c['client_f1'] for c in group])} |"
            f" {fmt([c['final_loss'] for c in group], 1, 3)} |"
            f" {mean(group, 'consensus_distance'):.3e} | {len(group)} |"
        )
    return "\n".join(rows)


def resource_table(groups: dict[tuple, list[dict]]) -> str:
    rows = [
        "| Method | trained params per step | MB sent per client | optimizer state + grads "
        "MB | peak memory MB (whole engine: RSS on CPU, CUDA max allocated on GPU) | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for (variant, _), group in groups.items():
        c = group[0]
        rows.append(
            f"| {variant} | {c['trained_numel']:,} | {c['bytes_sent_per_client'] / 1e6:,.1f} |"
            f" {c['train_state_bytes'] / 1e6:,.1f} | {c['peak_memory_bytes'] / 1e6:,.0f} |"
            f" {mean(group, 'seconds'):.0f} |"
        )
    return "\n".join(rows)


# ---------------------------------------------------------------------- plots


def mean_loss_curve(results: Path, cells: list[dict]) -> list[float]:
    """Mean over clients per step, then mean over seeds."""
    curves = []
    for c in cells:
        records = read_metrics(results / c["run_dir"] / "metrics.jsonl")
        curves.append([sum(r["loss"]) / len(r["loss"]) for r in records if r["type"] == "step"])
    length = min(len(x) for x in curves)
    return [statistics.mean(x[i] for x in curves) for i in range(length)]


def plot_losses(results: Path, groups: dict[tuple, list[dict]], title: str, label_of, path: Path):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, group in groups.items():
        ax.plot(mean_loss_curve(results, group), label=label_of(key))
    ax.set_xlabel("optimizer step (per client)")
    ax.set_ylabel("training loss (mean over clients)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_tradeoff(groups: dict[tuple, list[dict]], key: str, xlabel: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (variant, _), group in groups.items():
        x = max(mean(group, key) / 1e6, 1e-3)  # local-only sends nothing: plot at 1 KB
        y = mean(group, "client_accuracy") * 100
        ax.scatter([x], [y])
        ax.annotate(variant, (x, y), fontsize=8, xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean client accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- main


def build(results: Path) -> str:
    grid, cells = load(results)
    experiments = grid["experiments"]
    dataset = next(
        (s.split("=", 1)[1] for s in grid["grid"]["shared"] if s.startswith("data=")),
        "task",
    )
    parts = [
        f"# {grid['grid']['name']}: results\n",
        f"Sweep: `{grid['command']}`  \nTables: `python simulation/tables.py {results}`\n",
        "Shared settings: `"
        + " ".join(grid["grid"]["shared"])
        + "`; defaults "
        + ", ".join(f"{k}={v}" for k, v in grid["grid"]["defaults"].items())
        + ". Accuracy and weighted F1 in %, of the generated label on each client's local "
        "test split, mean over clients (Avg-model: the parameter average of all clients).\n",
    ]
    missing = [cid for ids in experiments.values() for cid in ids if cid not in cells]
    if missing:
        parts.append(f"**{len(set(missing))} cell(s) not finished yet** (rerun the sweep).\n")
    for name, ids in experiments.items():
        done = [cells[i] for i in ids if i in cells]
        if not done:
            continue
        axis = _varied_axis(grid["grid"]["experiments"][name])
        groups = group_seeds(done, axis)
        parts += _experiment_section(results, name, axis, groups, dataset)
    return "\n".join(parts)


def _varied_axis(experiment: dict[str, Any]) -> str | None:
    axes = list(experiment.get("axes", {}))
    return axes[0] if axes else None


def _experiment_section(results, name, axis, groups, dataset) -> list[str]:
    out = []
    if name == "methods":
        out += [
            "## Table 1: methods (DECA vs the decentralized PEFT baselines and the bounds)\n",
            accuracy_table(groups, dataset, None),
            "\n## Table 3: BMA ablation\n",
            ablation_table(groups),
            "\n## Resources (per client, same run)\n",
            resource_table(groups),
            "",
        ]
        plot_losses(results, groups, "training loss per method", lambda k: k[0],
                    results / "loss_methods.png")  # fmt: skip
        plot_tradeoff(groups, "bytes_sent_per_client", "MB sent per client (log)",
                      results / "accuracy_vs_bytes.png")  # fmt: skip
        plot_tradeoff(groups, "train_state_bytes", "optimizer state + gradients, MB (log)",
                      results / "accuracy_vs_memory.png")  # fmt: skip
        out += [
            "![loss per method](loss_methods.png) ![accuracy vs bytes](accuracy_vs_bytes.png) "
            "![accuracy vs memory](accuracy_vs_memory.png)\n"
        ]
        return out
    titles = {
        "topology": "Table 4: topologies",
        "clients": "Table 5: number of clients",
        "layers_per_block": "Table 6: layers per block",
        "seeds": "Seed repeats (mean ± std over seeds)",
    }
    title = titles.get(name, f"Experiment {name}")
    out += [f"## {title}\n", accuracy_table(groups, dataset, AXIS_TITLES.get(axis)), ""]
    if axis:
        deca = {k: v for k, v in groups.items() if k[0] == "deca"} or groups
        png = f"loss_{name}.png"
        plot_losses(results, deca, f"DECA training loss per {axis}",
                    lambda k: f"{axis}={k[1]}", results / png)  # fmt: skip
        out.append(f"![loss per {axis}]({png})\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    text = build(args.results)
    (args.results / "tables.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
