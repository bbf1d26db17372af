"""A lost site in the deployment lab: how long until the run goes on, and what it costs.

    python simulation/bench_lab_faults.py                      # embedded default, 3 sites
    python simulation/bench_lab_faults.py --preset-model tiny  # a quick check of the script

Runs `deca-flower lab` (`simulation/lab_bench.py`) twice with the same schedule and seed:
once without a failure, once with `--kill SITE@PHASE --restart-after SECONDS` (SIGKILL of
the site's process group as that phase starts; the same key and state dir come back
later). From the second run's `lab/lab.json` and `metrics.jsonl` it reports, in seconds
after the SIGKILL: the failed phase detected (the `fault` record), the first phase
committed without the site, the site restarted, and the site healed and back in W; the
committed phases lost (the steps the run logged against those of the run without the
failure: 0 means none was lost or repeated); and the accuracy of both runs' last
evaluation, both scorings, the clients' mean and the parameter average.

Results: `<out>/bench_lab_faults.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lab_bench  # noqa: E402


def records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def accuracy(recs: list[dict[str, Any]]) -> dict[str, float | None]:
    last = [r for r in recs if r["type"] == "eval"][-1]
    clients, average = last.get("client_mean", {}), last.get("average", {})
    return {
        "client_accuracy": clients.get("accuracy"),
        "client_ll_accuracy": clients.get("ll_accuracy"),
        "average_accuracy": average.get("accuracy"),
        "average_ll_accuracy": average.get("ll_accuracy"),
    }


def timeline(run_dir: Path, baseline_steps: int) -> dict[str, Any]:
    """Seconds after the SIGKILL of each event of the failed run."""
    recs = records(run_dir)
    lab = json.loads((run_dir / "lab" / "lab.json").read_text())
    if not any("killed" in f for f in lab.get("faults", [])):
        raise SystemExit(f"{run_dir}: the lab killed no site (is --kill's phase in the run?)")
    kill = next(f for f in lab["faults"] if "killed" in f)
    restart = next((f for f in lab["faults"] if "restarted" in f), None)
    fault = next(r for r in recs if r["type"] == "fault")
    after = [r for r in recs if r["type"] == "phase" and r["time"] > fault["time"]]
    heal = next((r for r in recs if r["type"] == "heal"), None)
    steps = [r["global_step"] for r in recs if r["type"] == "step"]
    return {
        "killed": kill["killed"],
        "killed_at_phase": kill["phase"],
        "detected_s": fault["time"] - kill["time"],
        "first_phase_committed_s": after[0]["time"] - kill["time"] if after else None,
        "restarted_s": restart["time"] - kill["time"] if restart else None,
        "healed_s": heal["time"] - kill["time"] if heal else None,
        "healed_blocks": heal["blocks"] if heal else None,
        "hashes_equal": heal["hashes"] == heal["donor_hashes"] if heal else None,
        "steps_logged": len(steps),
        "steps_contiguous": steps == list(range(len(steps))),
        "phases_lost": abs(baseline_steps - len(steps)),
    }


def report(plain: dict, failed: dict, times: dict, command: str) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    lines = [
        "# Lab: a lost site, detected, gone on without, healed",
        "",
        f"`{command}`",
        "",
        f"{times['killed']} SIGKILLed as phase {times['killed_at_phase']} started.",
        "",
        "| event | seconds after the SIGKILL |",
        "|---|---|",
        f"| the failed phase detected (`fault` record) | {times['detected_s']:.1f} |",
        f"| first phase committed without the site | {_s(times['first_phase_committed_s'])} |",
        f"| the site restarted (same key, same state dir) | {_s(times['restarted_s'])} |",
        f"| healed (blocks {times['healed_blocks']}, hashes equal: {times['hashes_equal']}) "
        f"and back in W | {_s(times['healed_s'])} |",
        "",
        f"Committed phases lost: steps logged {times['steps_logged']} (the run without the "
        f"failure: {plain['steps']}), contiguous: {times['steps_contiguous']}.",
        "",
        "| run | client acc. | client acc. (likelihood) | avg-model acc. | "
        "avg-model acc. (likelihood) |",
        "|---|---|---|---|---|",
    ]
    for name, acc in (("no failure", plain["accuracy"]), ("lost, healed", failed["accuracy"])):
        lines.append(
            f"| {name} | {pct(acc['client_accuracy'])} | {pct(acc['client_ll_accuracy'])} | "
            f"{pct(acc['average_accuracy'])} | {pct(acc['average_ll_accuracy'])} |"
        )
    return "\n".join(lines) + "\n"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--kill", default="3@3", help="SITE@PHASE, 1-based, as for the lab")
    parser.add_argument("--restart-after", type=float, default=20.0)
    parser.add_argument("--steps-per-block", type=int, default=2)
    parser.add_argument("--preset-model", help="e.g. tiny (default: the embedded default)")
    parser.add_argument("--override", action="append", default=[], help="extra config key=value")
    default_out = lab_bench.REPO / "docs" / "results" / "faults"
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()
    overrides = [
        "topology.name=ring",  # 3 sites: a triangle, so the survivors stay connected
        "flower.phase=block",  # one phase per block, so --kill has phases to pick from
        "train.rounds=1",
        f"train.steps_per_block={args.steps_per_block}",
        "gossip.timeout_s=30",
        "eval.zero_shot=false",
        *args.override,
    ]
    work = Path(tempfile.mkdtemp(prefix="bench-lab-faults-"))
    started = time.perf_counter()
    runs = {}
    for name, lab_args in (
        ("no-failure", ()),
        ("killed", ("--kill", args.kill, "--restart-after", str(args.restart_after))),
    ):
        run_dir = lab_bench.run_lab(
            name, overrides, work, args.sites, args.preset_model, ("--timeout", "3600", *lab_args)
        )
        recs = records(run_dir)
        runs[name] = {
            "run_dir": str(run_dir),
            "steps": sum(1 for r in recs if r["type"] == "step"),
            "accuracy": accuracy(recs),
        }
        print(json.dumps({name: runs[name]}), flush=True)
    times = timeline(Path(runs["killed"]["run_dir"]), runs["no-failure"]["steps"])
    command = "python simulation/bench_lab_faults.py " + shlex.join(sys.argv[1:])
    text = report(runs["no-failure"], runs["killed"], times, command)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_lab_faults.json").write_text(
        json.dumps({"runs": runs, "timeline": times}, indent=1)
    )
    (args.out / "bench_lab_faults.md").write_text(text)
    print(f"{time.perf_counter() - started:.0f} s; logs in {work}")


if __name__ == "__main__":
    main()
