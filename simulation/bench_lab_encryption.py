"""Data-plane encryption in the deployment lab: sealed vs plaintext, side by side in one run.

    python simulation/bench_lab_encryption.py                   # embedded default, 3 sites
    python simulation/bench_lab_encryption.py --steps-per-block 1 --repeats 2

`deca-flower lab` (SuperLink with TLS and SuperNode auth, one network namespace per site;
run as root, else the lab falls back to loopback and says so) runs the same schedule with
`gossip.encryption=none` and `=aes-256-gcm`, alternating (`--repeats` pairs) so drift in the
machine's load hits both alike. Per mode it prints, from the run's own records:

- seconds per step: the phase's wall time (as the coordinator measured it) over its steps,
  and the training and communication seconds per step the nodes report (mean over sites);
- the communication share of the phase;
- payload bytes per site and step (the block bytes each site sent, `bytes_sent` of the
  phase records: the 16-byte tags are not counted) and bytes on the wire per site and step
  (what the hub side of each site's veth received during the run: every frame the site
  sent, tags, TCP/IP headers, Flower's TLS traffic and the store's included). The
  evaluation's parameter average is off (`eval.average_model=false`): its all-reduce is not a
  step's traffic.

Results: `<out>/bench_lab_encryption.{jsonl,md}`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lab_bench  # noqa: E402

MODES = ("none", "aes-256-gcm")


def lab_run(mode: str, args: argparse.Namespace, work: Path, index: int) -> Path:
    """One `deca-flower lab` run with `gossip.encryption=mode`; its run directory."""
    overrides = [
        f"gossip.encryption={mode}",
        "train.rounds=1",
        f"train.steps_per_block={args.steps_per_block}",
        "eval.zero_shot=false",
        "eval.average_model=false",  # its all-reduce would dominate the bytes per step
        f"eval.max_examples_per_client={args.eval_examples}",
        *args.override,
    ]
    return lab_bench.run_lab(f"{mode}-{index}", overrides, work, args.sites, args.preset_model)


def measure(mode: str, run_dir: Path) -> dict:
    row = lab_bench.measure(run_dir)
    return {"mode": mode, **row, "communication_share": row["communication_share_of_wall"]}


def mean_rows(rows: list[dict]) -> dict:
    out = dict(rows[0])
    for key, value in rows[0].items():
        if isinstance(value, float):
            out[key] = statistics.mean(r[key] for r in rows)
    out["runs"] = len(rows)
    return out


def table(rows: dict[str, dict]) -> str:
    head = (
        "| data plane | s / step | training s / step | comm s / step | comm share | "
        "payload bytes / site / step | wire bytes / site / step |"
    )
    lines = [head, "|" + "---|" * 7]
    for mode in MODES:
        r = rows[mode]
        wire = f"{r['wire_bytes_per_site_step']:,.0f}" if r["wire_bytes_per_site_step"] else "-"
        lines.append(
            f"| {mode} | {r['s_per_step']:.3f} | {r['training_s_per_step']:.3f} | "
            f"{r['communication_s_per_step']:.3f} | {100 * r['communication_share']:.1f}% | "
            f"{r['payload_bytes_per_site_step']:,.0f} | {wire} |"
        )
    plain, sealed = rows["none"], rows["aes-256-gcm"]

    def ratio(key: str) -> float:
        return sealed[key] / plain[key]

    step = ratio("s_per_step")
    lines.append("")
    lines.append(
        f"sealed / plaintext: step time {step:.3f}x ({100 * (step - 1):+.1f} %), "
        f"communication {ratio('communication_s_per_step'):.3f}x, "
        f"payload bytes {ratio('payload_bytes_per_site_step'):.6f}x"
    )
    if plain["wire_bytes_per_site_step"] and sealed["wire_bytes_per_site_step"]:
        lines[-1] += f", wire bytes {ratio('wire_bytes_per_site_step'):.4f}x"
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--steps-per-block", type=int, default=2)
    parser.add_argument("--eval-examples", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs (alternating)")
    parser.add_argument("--preset-model", help="e.g. tiny (default: the embedded default)")
    parser.add_argument("--override", action="append", default=[], help="extra config key=value")
    default_out = lab_bench.REPO / "docs" / "results" / "deployment"
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-lab-encryption-"))
    measured: dict[str, list[dict]] = {m: [] for m in MODES}
    started = time.perf_counter()
    for i in range(args.repeats):
        for mode in MODES if i % 2 == 0 else MODES[::-1]:
            measured[mode].append(measure(mode, lab_run(mode, args, work, i)))
            print(json.dumps(measured[mode][-1]), flush=True)
    rows = {m: mean_rows(measured[m]) for m in MODES}
    text = table(rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "bench_lab_encryption.jsonl").open("w") as f:
        for mode in MODES:
            for r in measured[mode]:
                f.write(json.dumps(r) + "\n")
    command = "python simulation/bench_lab_encryption.py " + shlex.join(sys.argv[1:])
    (args.out / "bench_lab_encryption.md").write_text(
        f"# Lab: sealed vs plaintext data plane\n\n`{command}`\n\n{text}\n"
    )
    print(f"{time.perf_counter() - started:.0f} s; logs in {work}")


if __name__ == "__main__":
    main()
