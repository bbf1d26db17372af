"""Wire formats and overlap over shaped links, in the deployment lab, side by side.

    python simulation/bench_lab_links.py                          # the full matrix below
    python simulation/bench_lab_links.py --bandwidths 100mbit --formats float32,int8

Runs `deca-flower lab` (3 sites on an ER graph of the embedded default, one network
namespace per site; `simulation/lab_bench.py` says what is measured) once per case: every
link unshaped, or shaped with `tc tbf` to each `--bandwidths` rate (`deca-flower lab
--bandwidth`, which also measures each link before the run), times every wire format of
`gossip.compression`, with `gossip.overlap` off, plus overlap on for `--overlap-formats`.
Each case runs the same schedule: `train.rounds=1`, `--steps-per-block` steps on each of
the 5 blocks. The evaluation's parameter average is off (its all-reduce is not a step's
traffic). Ratios are against fp32 at the same rate, in the same run of this script.

Results: `<out>/bench_lab_links.{jsonl,md}`; rows already in the jsonl are kept (a rerun
picks up where it stopped).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lab_bench  # noqa: E402

FORMATS = ("float32", "bf16", "int8", "topk")


def cases(args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    out = []
    for rate in args.bandwidths.split(","):
        for fmt in args.formats.split(","):
            out.append((rate, fmt, False))
        for fmt in filter(None, args.overlap_formats.split(",")):
            out.append((rate, fmt, True))
    return out


def case_name(rate: str, fmt: str, overlap: bool) -> str:
    return f"{rate}-{fmt}-{'overlap' if overlap else 'plain'}"


def run_case(rate: str, fmt: str, overlap: bool, args: argparse.Namespace, work: Path) -> dict:
    overrides = [
        f"gossip.compression={fmt}",
        f"gossip.overlap={str(overlap).lower()}",
        "train.rounds=1",
        f"train.steps_per_block={args.steps_per_block}",
        "eval.zero_shot=false",
        "eval.average_model=false",
        f"eval.max_examples_per_client={args.eval_examples}",
        *args.override,
    ]
    lab_args = () if rate == "unshaped" else ("--bandwidth", rate, "--measure-links", "2")
    name = case_name(rate, fmt, overlap)
    run_dir = lab_bench.run_lab(name, overrides, work, args.sites, args.preset_model, lab_args)
    return {"case": name, "rate": rate, "format": fmt, "overlap": overlap,
            **lab_bench.measure(run_dir)}  # fmt: skip


def table(rows: list[dict]) -> str:
    head = (
        "| link | format | overlap | measured link Mbit/s | step s (train + comm) | "
        "comm s / step | comm share | MB / site / step (payload) | MB on the wire | "
        "step vs fp32 | acc. | acc. (likelihood) |"
    )
    lines = [head, "|" + "---|" * 12]
    fp32 = {r["rate"]: r for r in rows if r["format"] == "float32" and not r["overlap"]}
    for r in rows:
        base = fp32.get(r["rate"])
        ratio = f"{r['step_s'] / base['step_s']:.2f}x" if base else "-"
        link = f"{r['link_up_mbit_s']:.0f}" if r["link_up_mbit_s"] else "-"
        wire = r["wire_bytes_per_site_step"]
        lines.append(
            f"| {r['rate']} | {r['format']} | {'on' if r['overlap'] else 'off'} | {link} | "
            f"{r['step_s']:.2f} | {r['communication_s_per_step']:.2f} | "
            f"{100 * r['communication_share']:.0f}% | "
            f"{r['payload_bytes_per_site_step'] / 1e6:.1f} | "
            f"{wire / 1e6 if wire else float('nan'):.1f} | {ratio} | "
            f"{_pct(r['client_accuracy'])} | {_pct(r['client_ll_accuracy'])} |"
        )
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--bandwidths", default="unshaped,1gbit,100mbit")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--overlap-formats", default="float32,int8")
    parser.add_argument("--steps-per-block", type=int, default=2)
    parser.add_argument("--eval-examples", type=int, default=8)
    parser.add_argument("--preset-model", help="e.g. tiny (default: the embedded default)")
    parser.add_argument("--override", action="append", default=[], help="extra config key=value")
    parser.add_argument("--out", type=Path, default=lab_bench.REPO / "docs" / "results" / "links")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    jsonl = args.out / "bench_lab_links.jsonl"
    rows = [json.loads(line) for line in jsonl.open()] if jsonl.exists() else []
    done = {r["case"] for r in rows}
    work = Path(tempfile.mkdtemp(prefix="bench-lab-links-"))
    started = time.perf_counter()
    for rate, fmt, overlap in cases(args):
        if case_name(rate, fmt, overlap) in done:
            continue
        row = run_case(rate, fmt, overlap, args, work)
        rows.append(row)
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    text = table(rows)
    print(text)
    command = "python simulation/bench_lab_links.py " + shlex.join(sys.argv[1:])
    (args.out / "bench_lab_links.md").write_text(
        f"# Lab: wire formats and overlap over shaped links\n\n`{command}`\n\n{text}\n"
    )
    print(f"{time.perf_counter() - started:.0f} s; logs in {work}")


if __name__ == "__main__":
    main()
