"""Does DECA learn better? The fair comparison of issue 13, resumably, in one command.

    python simulation/learning_study.py simulation/grids/learning-cpu.yaml \
        --out docs/results/learning
    python simulation/learning_study.py GRID --out DIR --max-cells 3   # run it in parts
    python simulation/learning_study.py GRID --out DIR --report-only   # tables from what ran

Protocol (equal tuning budget): every arm gets the same number of learning rates. Stage 1
runs each arm at each of its lrs on the tuning seeds; the lr with the best validation
score (a split carved from the clients' own training data, `data.validation_fraction`)
is chosen per arm. Stage 2 runs the arm's other seeds at that lr only. Test numbers are
reported at the chosen lr, mean ± std over seeds; nothing is tuned on a test split.

Cells are `simulation/sweep.py` cells (same runner, same `cell.json` resume marker), so
a crash or an interrupted study loses at most the cell in progress. Outputs in `--out`:
`results.md` (tables, verdict), `accuracy_vs_lr_<arm>.png`, `loss_curves.png`,
`effective_step.png`, `study.json`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sweep  # noqa: E402
import tables  # noqa: E402

# (cell key, column title); each reported as mean ± std over seeds, in % unless noted.
TEST_COLUMNS = (
    ("client_accuracy", "client acc."),
    ("client_ll_accuracy", "client acc. (likelihood)"),
    ("client_majority_accuracy", "majority acc."),
    ("client_f1_macro", "client macro-F1"),
    ("average_accuracy", "avg-model acc."),
    ("average_ll_accuracy", "avg-model acc. (likelihood)"),
    ("global_average_accuracy", "avg-model global acc."),
    ("global_average_ll_accuracy", "avg-model global acc. (likelihood)"),
    ("global_client_accuracy", "clients global acc."),
    ("global_client_ll_accuracy", "clients global acc. (likelihood)"),
    ("global_average_majority_accuracy", "global majority acc."),
)
RAW_COLUMNS = (  # not percentages
    ("local_step", "local step / lr"),
    ("effective_step", "effective step / lr"),
    ("update_grad_cosine", "cos(update, grad)"),
    ("consensus_distance", "consensus distance"),
    ("final_loss", "final train loss"),
)
VERDICT_METRICS = (
    ("client_accuracy", "client accuracy"),
    ("client_ll_accuracy", "client accuracy by likelihood"),
    ("global_average_accuracy", "parameter average on the global test"),
    ("global_average_ll_accuracy", "parameter average on the global test by likelihood"),
    # Each site's own model off its skew: what a site that keeps its model gets.
    ("global_client_accuracy", "clients on the global test"),
    ("global_client_ll_accuracy", "clients on the global test by likelihood"),
)


# ---------------------------------------------------------------------- the study grid


def load_study(path: str | Path) -> dict[str, Any]:
    study = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    arms = study["arms"]
    sizes = {name: len(arm["lrs"]) for name, arm in arms.items()}
    if len(set(sizes.values())) != 1:
        raise SystemExit(f"{path}: every arm needs the same number of lrs (equal tuning): {sizes}")
    for a, b in study.get("orderings", []):
        if a not in arms or b not in arms:
            raise SystemExit(f"{path}: ordering [{a}, {b}] names an arm not in arms")
    study.setdefault("tune_seeds", [0])
    study.setdefault("select_by", "val_client_accuracy")
    return study


def variant_name(arm: str, lr: float) -> str:
    return f"{arm} lr={lr:g}"


def sweep_grid(study: dict[str, Any]) -> dict[str, Any]:
    """The study as a sweep.py grid: one variant per (arm, lr), no axes."""
    variants = {}
    for arm, spec in study["arms"].items():
        extra = ["eval.zero_shot=true"] if spec.get("zero_shot") else []
        for lr in spec["lrs"]:
            variants[variant_name(arm, lr)] = [*spec["settings"], f"algorithm.lr={lr}", *extra]
    return {"name": study["name"], "shared": study["shared"], "defaults": {}, "variants": variants}


def arm_seeds(study: dict[str, Any], arm: str) -> list[int]:
    return sorted({*study["tune_seeds"], *study["arms"][arm].get("seeds", [])})


def tuning_cells(study: dict[str, Any], arm: str | None = None) -> list[sweep.Cell]:
    """Stage 1's cells: every lr of every arm (or of `arm`) on the tuning seeds."""
    return [
        sweep.Cell(variant_name(name, lr), (), seed)
        for name, spec in study["arms"].items()
        if arm is None or name == arm
        for seed in study["tune_seeds"]
        for lr in spec["lrs"]
    ]


def confirm_cells(study: dict[str, Any], chosen: dict[str, float]) -> list[sweep.Cell]:
    return [
        sweep.Cell(variant_name(arm, chosen[arm]), (), seed)
        for arm in study["arms"]
        if arm in chosen
        for seed in arm_seeds(study, arm)
        if seed not in study["tune_seeds"]
    ]


# ---------------------------------------------------------------------- lr selection


def load_cells(out: Path) -> dict[str, dict]:
    return {
        json.loads(p.read_text())["cell"]: json.loads(p.read_text())
        for p in sorted((out / "cells").glob("*/cell.json"))
    }


def choose_lrs(study: dict[str, Any], cells: dict[str, dict]) -> dict[str, float]:
    """Per arm, the lr whose tuning cells score best on validation (mean over tuning seeds).

    Ties go to the likelihood-scored validation accuracy, then to the smaller lr. An arm
    is chosen only when all its tuning cells are done.
    """
    key = study["select_by"]
    chosen = {}
    for arm, spec in study["arms"].items():
        scores = []
        for lr in spec["lrs"]:
            group = _cells_of(cells, arm, lr, study["tune_seeds"])
            if len(group) < len(study["tune_seeds"]):
                break
            main = statistics.mean(_value(c, key) for c in group)
            tie = statistics.mean(_value(c, "val_client_ll_accuracy") for c in group)
            scores.append((main, tie, -lr, lr))
        else:
            chosen[arm] = max(scores)[-1]
    return chosen


def _value(cell: dict, key: str) -> float:
    if key not in cell:
        raise SystemExit(
            f"cell {cell['cell']} has no {key!r}: the study needs data.validation_fraction > 0 "
            "in its shared settings"
        )
    return cell[key]


def _cells_of(cells: dict[str, dict], arm: str, lr: float, seeds) -> list[dict]:
    out = []
    for seed in seeds:
        cell = cells.get(sweep.Cell(variant_name(arm, lr), (), seed).id)
        if cell is not None:
            out.append(cell)
    return out


# ---------------------------------------------------------------------- running


def run_cells(
    todo: list[sweep.Cell], grid: dict, out: Path, budget: list[int], jobs: int = 1
) -> list[str]:
    """Run the unfinished cells (at most budget[0] of them, `jobs` at a time); return the
    ids of those that failed."""
    pending = [c for c in todo if not (out / "cells" / c.id / "cell.json").exists()]
    pending = pending[: max(budget[0], 0)]
    budget[0] -= len(pending)
    failed: list[str] = []

    def work(cell: sweep.Cell) -> None:
        print(f"[study] start {cell.id}", flush=True)
        result = sweep.run_cell(cell, grid, out, "engine", threads=sweep.usable_cpus() // jobs or 1)
        if result is None:
            failed.append(cell.id)
            print(f"[study] FAILED {cell.id}: see {out}/cells/{cell.id}/log.txt", flush=True)
            return
        print(
            f"[study] done {cell.id}: val acc {result.get('val_client_accuracy', 0):.3f}, "
            f"test acc {result['client_accuracy']:.3f} in {result['seconds']:.0f}s",
            flush=True,
        )

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(work, pending))
    return failed


# ---------------------------------------------------------------------- report


def report(study: dict[str, Any], out: Path) -> str:
    cells = load_cells(out)
    chosen = choose_lrs(study, cells)
    final = {arm: _cells_of(cells, arm, lr, arm_seeds(study, arm)) for arm, lr in chosen.items()}
    parts = [
        f"# {study['name']}: does DECA learn better?\n",
        f"Command: `{study_command(study, out)}`\n",
        "Shared settings: `" + " ".join(study["shared"]) + "`.\n",
        _protocol_text(study),
        "## Learning-rate selection (validation split of the clients' training data)\n",
        lr_table(study, cells, chosen),
        "\n## Test results at each arm's chosen lr (mean ± std over seeds, %)\n",
        result_table(final, chosen, TEST_COLUMNS, scale=100.0),
        "\n## Diagnostics at the chosen lr (per-step means over phases and clients)\n",
        result_table(final, chosen, RAW_COLUMNS, scale=1.0, digits=3),
        "",
        zero_shot_text(cells),
        "## Verdict (written by the runner from the numbers above)\n",
        verdict(study, final),
        "",
    ]
    missing = len(all_cells(study, chosen)) - sum(
        1 for c in all_cells(study, chosen) if c.id in cells
    )
    if missing or len(chosen) < len(study["arms"]):
        parts.insert(1, f"**Incomplete: {missing} cell(s) still to run** (rerun the study).\n")
    plots = plot_all(study, out, cells, chosen, final)
    parts.append(" ".join(f"![{p.stem}]({p.name})" for p in plots) + "\n")
    return "\n".join(parts)


def _protocol_text(study: dict[str, Any]) -> str:
    n = len(next(iter(study["arms"].values()))["lrs"])
    return (
        f"Every arm gets {n} learning rates, run on seed(s) {study['tune_seeds']}; the lr with "
        f"the best `{study['select_by']}` (mean over those seeds) is kept, and the arm's other "
        "seeds run only at that lr. *client acc.*: each client's model on its own local test "
        "split, mean over clients; *avg-model*: the parameter average on all clients' local "
        "tests; *global*: a stratified pooled test split carved before partitioning, which no "
        "client's skew shapes; *likelihood*: the label whose answer the model finds most "
        "probable (class learning, not format learning); *majority*: always answering the "
        "majority label of a client's training data, the score a model must beat.\n"
    )


def lr_table(study: dict[str, Any], cells: dict[str, dict], chosen: dict[str, float]) -> str:
    rows = [
        "| arm | lr | val client acc. | val client acc. (likelihood) | test client acc. | chosen |",
        "|---|---|---|---|---|---|",
    ]
    for arm, spec in study["arms"].items():
        for lr in spec["lrs"]:
            group = _cells_of(cells, arm, lr, study["tune_seeds"])
            mark = "**yes**" if chosen.get(arm) == lr else ""
            rows.append(
                f"| {arm} | {lr:g} | {tables.fmt([c.get('val_client_accuracy') for c in group])} "
                f"| {tables.fmt([c.get('val_client_ll_accuracy') for c in group])} "
                f"| {tables.fmt([c.get('client_accuracy') for c in group])} | {mark} |"
            )
    edges = grid_edges(study, chosen)
    if edges:
        rows.append(
            "\nChosen at the edge of its grid (a wider grid might have found a better lr, so "
            "this arm may be under-tuned): "
            + "; ".join(f"{arm} ({side}, {lr:g})" for arm, (side, lr) in edges.items())
            + "."
        )
    return "\n".join(rows)


def grid_edges(study: dict[str, Any], chosen: dict[str, float]) -> dict[str, tuple[str, float]]:
    """Arms whose chosen lr is the smallest or the largest of their grid."""
    edges = {}
    for arm, lr in chosen.items():
        lrs = study["arms"][arm]["lrs"]
        if len(lrs) > 1 and lr in (min(lrs), max(lrs)):
            edges[arm] = ("the largest" if lr == max(lrs) else "the smallest", lr)
    return edges


def result_table(final, chosen, columns, scale: float, digits: int = 2) -> str:
    head = "| arm | lr | " + " | ".join(t for _, t in columns) + " | seeds |"
    rows = [head, "|" + "---|" * (len(columns) + 3)]
    for arm, group in final.items():
        values = [tables.fmt([c.get(k) for c in group], scale, digits) for k, _ in columns]
        rows.append(f"| {arm} | {chosen[arm]:g} | " + " | ".join(values) + f" | {len(group)} |")
    return "\n".join(rows)


def zero_shot_text(cells: dict[str, dict]) -> str:
    zero = [c for c in cells.values() if "zero_client_accuracy" in c]
    if not zero:
        return ""
    acc = tables.fmt([c["zero_client_accuracy"] for c in zero])
    ll = tables.fmt([c.get("zero_client_ll_accuracy") for c in zero])
    glob = tables.fmt([c.get("zero_global_ll_accuracy") for c in zero])
    return (
        f"Zero-shot (the untrained model, {len(zero)} run(s)): client accuracy {acc} %, by "
        f"likelihood {ll} %, global test by likelihood {glob} %.\n"
    )


def verdict(study: dict[str, Any], final: dict[str, list[dict]]) -> str:
    """Each ordering the paper claims, per metric: holds, reversed, or no difference.

    A difference smaller than twice the larger seed std of the two arms is "no difference";
    with a single seed there is no spread and the ordering cannot be judged (the
    difference is then shown on the seed both arms ran). Cells of the
    same seed share the data split, the graph and the initial model, so the per-seed
    (paired) differences are printed beside the call: they show whether an ordering that
    the unpaired spread cannot resolve goes the same way on every seed.
    """
    lines = []
    for a, b in study.get("orderings", []):
        if a not in final or b not in final:
            lines.append(f"- {a} > {b}: not measured yet.")
            continue
        judged = [_judge(final[a], final[b], key, name) for key, name in VERDICT_METRICS]
        judged = [j for j in judged if j]
        lines.append(f"- **{a} > {b}**: " + "; ".join(judged) + ".")
    return "\n".join(lines) if lines else "(no orderings named in the study grid)"


def _judge(cells_a: list[dict], cells_b: list[dict], key: str, name: str) -> str | None:
    xs = [c[key] for c in cells_a if c.get(key) is not None]
    ys = [c[key] for c in cells_b if c.get(key) is not None]
    if not xs or not ys:
        return None
    diff = (statistics.mean(xs) - statistics.mean(ys)) * 100
    if len(xs) < 2 or len(ys) < 2:
        # No spread to judge by. Compare on the seed(s) both ran (same split, graph and
        # initial model), not one arm's mean over seeds against the other's single seed.
        pairs = _seed_pairs(cells_a, cells_b, key)
        if not pairs:
            return f"{name}: {diff:+.1f} points, no seed in common (one seed: not judged)"
        seeds = "/".join(str(seed) for seed, _ in pairs)
        shared = statistics.mean(d for _, d in pairs)
        return f"{name}: {shared:+.1f} points on seed {seeds}, the one both ran (not judged)"
    spread = max(statistics.stdev(xs), statistics.stdev(ys)) * 100
    if abs(diff) < 2 * spread:
        call = "no difference"
    else:
        call = "holds" if diff > 0 else "reversed"
    paired = _paired(cells_a, cells_b, key)
    return f"{name}: {call} ({diff:+.1f} points vs 2 x spread {2 * spread:.1f}{paired})"


def _paired(cells_a: list[dict], cells_b: list[dict], key: str) -> str:
    """'; per seed +3.1/-0.5, ahead on 1 of 2' over the seeds both arms ran, or ''."""
    pairs = _seed_pairs(cells_a, cells_b, key)
    if len(pairs) < 2:
        return ""
    diffs = [d for _, d in pairs]
    ahead = sum(d > 0 for d in diffs)
    return f"; per seed {'/'.join(f'{d:+.1f}' for d in diffs)}, ahead on {ahead} of {len(diffs)}"


def _seed_pairs(cells_a: list[dict], cells_b: list[dict], key: str) -> list[tuple[int, float]]:
    """(seed, A - B in points) for every seed both arms ran, by seed."""
    by_seed = {c["seed"]: c[key] for c in cells_b if c.get(key) is not None and "seed" in c}
    return sorted(
        (c["seed"], (c[key] - by_seed[c["seed"]]) * 100)
        for c in cells_a
        if c.get(key) is not None and c.get("seed") in by_seed
    )


# ---------------------------------------------------------------------- plots


def plot_all(study, out: Path, cells, chosen, final) -> list[Path]:
    paths = [plot_lr(study, out, cells, arm) for arm in study["arms"]]
    paths = [p for p in paths if p]
    if final:
        paths.append(tables.plot_losses(out, {(arm,): g for arm, g in final.items()},
                                        "training loss at the chosen lr (mean over seeds)",
                                        lambda k: k[0], out / "loss_curves.png"))  # fmt: skip
        paths.append(plot_steps(final, out / "effective_step.png"))
    return paths


def plot_lr(study, out: Path, cells, arm: str) -> Path | None:
    lrs = study["arms"][arm]["lrs"]
    series = {
        "validation": "val_client_accuracy",
        "validation, likelihood": "val_client_ll_accuracy",
        "test": "client_accuracy",
        "test, likelihood": "client_ll_accuracy",
    }
    points = {lr: _cells_of(cells, arm, lr, study["tune_seeds"]) for lr in lrs}
    if not any(points.values()):
        return None
    fig, ax = tables.plt.subplots(figsize=(5.5, 3.8))
    for label, key in series.items():
        xy = [(lr, statistics.mean(c.get(key, float("nan")) for c in g) * 100)
              for lr, g in points.items() if g]  # fmt: skip
        ax.plot(*zip(*xy), "o-" if "test" not in label else "s--", label=label)
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel="mean client accuracy (%)", title=arm)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"accuracy_vs_lr_{sweep._slug(arm)}.png"
    fig.savefig(path, dpi=110)
    tables.plt.close(fig)
    return path


def plot_steps(final: dict[str, list[dict]], path: Path) -> Path:
    arms = list(final)
    fig, ax = tables.plt.subplots(figsize=(7, 3.8))
    width = 0.4
    for offset, key in ((-width / 2, "local_step"), (width / 2, "effective_step")):
        values = [statistics.mean(c.get(key) or 0.0 for c in final[a]) for a in arms]
        ax.bar([i + offset for i in range(len(arms))], values, width, label=key.replace("_", " "))
    ax.set_xticks(range(len(arms)), arms, rotation=25, ha="right", fontsize=8)
    ax.set(ylabel="RMS step / lr (per inner step)", title="Step size per arm at the chosen lr")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    tables.plt.close(fig)
    return path


# ---------------------------------------------------------------------- main


def all_cells(study: dict[str, Any], chosen: dict[str, float]) -> list[sweep.Cell]:
    return tuning_cells(study) + confirm_cells(study, chosen)


def study_command(study: dict[str, Any], out: Path) -> str:
    return shlex.join(["python", "simulation/learning_study.py", study["_path"], "--out", str(out)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("study", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/results/learning"))
    parser.add_argument("--max-cells", type=int, default=10**9, help="new cells to run now")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at the same time")
    parser.add_argument("--report-only", action="store_true", help="only rewrite results.md")
    args = parser.parse_args(argv)

    study = load_study(args.study)
    study["_path"] = str(args.study)
    grid = sweep_grid(study)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study.json").write_text(json.dumps({"study": study, "grid": grid}, indent=1))
    failed: list[str] = []
    if not args.report_only:
        budget = [args.max_cells]
        # Arm by arm, in the grid's order (its tuning cells, then its other seeds at the
        # chosen lr): a study run in parts has whole arms to compare, not 24 lone cells.
        for arm in study["arms"]:
            failed += run_cells(tuning_cells(study, arm), grid, args.out, budget, args.jobs)
            chosen = choose_lrs(study, load_cells(args.out))
            if arm in chosen:
                print(f"[study] {arm}: chosen lr {chosen[arm]:g}", flush=True)
                todo = confirm_cells(study, {arm: chosen[arm]})
                failed += run_cells(todo, grid, args.out, budget, args.jobs)
    text = report(study, args.out)
    (args.out / "results.md").write_text(text)
    cells = all_cells(study, choose_lrs(study, load_cells(args.out)))
    left = sum(1 for c in cells if not (args.out / "cells" / c.id / "cell.json").exists())
    print(f"[study] {len(cells) - left}/{len(cells)} cells done; wrote {args.out}/results.md")
    if failed:
        print(f"[study] {len(failed)} cell(s) failed: {failed}; rerun to retry them")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
