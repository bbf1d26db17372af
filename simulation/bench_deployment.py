"""Where a phase's wall time goes: deployed (lab), simulated (`flwr run`), and in-process.

    python simulation/bench_deployment.py                       # embedded default, 3 sites
    python simulation/bench_deployment.py --models embedded qwen2-1.5b-shape

For each model the same config runs three ways, one after the other in this run:
- `lab`: `deca-flower lab` (SuperLink + SuperNodes with TLS and node auth, resident workers,
  one message per round as deployment does by default);
- `simulation`: `flwr run` on Flower's simulation engine (one message per block);
- `engine`: the in-process engine (the clients' steps run one after another in one process).

It prints, per mode, the wall time per phase and per step and the split of a phase into
start-up (Flower messaging, process start), load, training, communication and commit, and
the share of the phase that is not training (the issue's target: at most 10 % deployed).
Results: `<out>/bench_deployment.jsonl` and `<out>/bench_deployment.md`.

`qwen2-1.5b-shape` is Qwen2-1.5B's architecture (hidden 1536, 12 heads, 2 KV heads, MLP
8960, vocabulary 151936) with random weights, cut to `--qwen-layers` decoder layers so three
sites fit in a CPU host's memory; its embedding alone is 233 M parameters, so the model load
share is visible as the model grows.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

QWEN2_1_5B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "num_hidden_layers": 28,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}


def qwen_shape_dir(root: Path) -> Path:
    """Qwen2-1.5B's config.json beside the embedded SmolLM2 tokenizer (no hub needed)."""
    from deca_flower.models import embedded_smollm2_path

    target = root / "qwen2-1.5b-shape"
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(json.dumps(QWEN2_1_5B, indent=2))
    smol = embedded_smollm2_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smol / name).exists():
            (target / name).write_bytes((smol / name).read_bytes())
    return target


def model_overrides(model: str, work: Path, qwen_layers: int) -> list[str]:
    if model == "embedded":
        return []
    return [f"model.name=random:{qwen_shape_dir(work)}", f"model.num_layers={qwen_layers}"]


def run(cmd: list[str], log: Path, cwd: Path) -> float:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "OMP_NUM_THREADS": "1",
    }
    t0 = time.perf_counter()
    with log.open("w") as out:
        subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - t0


def newest_run(out_dir: Path) -> Path:
    runs = [p for p in out_dir.glob("*") if (p / "metrics.jsonl").exists()
            and not p.name.endswith(".incomplete")]  # fmt: skip
    return max(runs, key=lambda p: p.stat().st_mtime)


def phases(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == "phase"]


def summarize(mode: str, model: str, records: list[dict], steps_per_block: int) -> dict:
    """Mean over phases of each mode's time split (seconds), per phase and per step."""
    if mode == "engine":  # one process, clients in turn: a phase is all its clients' steps
        split = [
            {
                "wall_s": sum(p["forward_s"])
                + sum(p["backward_s"])
                + sum(p["optimizer_s"])
                + sum(p["communication_s"]),
                "training_s": sum(p["forward_s"]) + sum(p["backward_s"]) + sum(p["optimizer_s"]),
                "communication_s": sum(p["communication_s"]),
            }
            for p in records
        ]
        steps = [steps_per_block] * len(records)
    else:
        split = [p["time_split"] for p in records]
        steps = [len(p["blocks"]) * steps_per_block for p in records]
    keys = ["wall_s", "startup_s", "load_s", "training_s", "communication_s", "commit_s"]
    out = {
        "mode": mode,
        "model": model,
        "phases": len(records),
        "steps_per_phase": statistics.mean(steps),
    }
    for key in keys:
        out[key] = statistics.mean(s.get(key, 0.0) for s in split)
    out["wall_per_step_s"] = out["wall_s"] / out["steps_per_phase"]
    out["non_training_share"] = 1 - (out["training_s"] + out["communication_s"]) / out["wall_s"]
    return out


def bench_model(model: str, args, work: Path) -> list[dict]:
    overrides = [
        f"train.steps_per_block={args.steps_per_block}",
        "eval.zero_shot=false",
        f"eval.max_examples_per_client={args.eval_examples}",
        *model_overrides(model, work, args.qwen_layers),
        *args.override,
    ]
    rows = []
    # lab
    lab_out = work / f"{model}-lab"
    run_config = f'output-dir="{lab_out}" overrides="{" ".join(overrides)}"'
    lab_cmd = [
        str(BIN / "deca-flower"),
        "lab",
        "--app",
        str(REPO),
        "--sites",
        str(args.sites),
        "--run-config",
        run_config,
    ]
    run(lab_cmd, work / f"{model}-lab.log", work)
    rows.append(summarize("lab", model, phases(newest_run(lab_out)), args.steps_per_block))
    # simulation
    sim_out = work / f"{model}-sim"
    sim_cmd = [
        str(BIN / "flwr"),
        "run",
        str(REPO),
        "--stream",
        "--run-config",
        f'num-clients={args.sites} output-dir="{sim_out}" overrides="{" ".join(overrides)}"',
        "--federation-config",
        f"num-supernodes={args.sites} client-resources-num-cpus=1 init-args-num-cpus={args.sites}",
    ]
    run(sim_cmd, work / f"{model}-sim.log", work)
    rows.append(summarize("simulation", model, phases(newest_run(sim_out)), args.steps_per_block))
    # engine
    eng_out = work / f"{model}-engine"
    eng_cmd = [
        str(BIN / "deca-flower"),
        "engine",
        f"num_clients={args.sites}",
        f"output_dir={eng_out}",
        *overrides,
    ]
    run(eng_cmd, work / f"{model}-engine.log", work)
    rows.append(summarize("engine", model, phases(newest_run(eng_out)), args.steps_per_block))
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| model | mode | steps/phase | wall/phase s | wall/step s | start-up s | load s | "
        "training s | comm s | commit s | not training |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['steps_per_phase']:.0f} | {r['wall_s']:.1f} | "
            f"{r['wall_per_step_s']:.2f} | {r.get('startup_s', 0):.1f} | "
            f"{r.get('load_s', 0):.1f} | "
            f"{r['training_s']:.1f} | {r['communication_s']:.1f} | {r.get('commit_s', 0):.1f} | "
            f"{100 * r['non_training_share']:.1f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=["embedded"], choices=["embedded", "qwen2-1.5b-shape"]
    )
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--steps-per-block", type=int, default=4)
    parser.add_argument("--qwen-layers", type=int, default=4)
    parser.add_argument("--eval-examples", type=int, default=4)
    parser.add_argument("--override", action="append", default=[], help="extra config key=value")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "deployment")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-deployment-"))
    rows = []
    for model in args.models:
        rows += bench_model(model, args, work)
        print(table(rows), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "bench_deployment.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    command = "python simulation/bench_deployment.py " + shlex.join(sys.argv[1:])
    (args.out / "bench_deployment.md").write_text(
        f"# Phase wall time: lab vs simulation vs engine\n\n`{command}`\n\n{table(rows)}\n"
    )
    print(f"logs in {work}")


if __name__ == "__main__":
    main()
