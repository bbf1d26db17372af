"""What the lab benchmarks share: one `deca-flower lab` run, and its step figures.

`run_lab` runs the embedded default (or `--preset-model`) on 3 sites of the deployment
lab (one network namespace per site, SuperLink with TLS and SuperNode auth; as root, else
the lab falls back to loopback and says so) and returns the run directory. `measure`
reads a run's own records:

- seconds per step: the phase's wall time (as the coordinator measured it) over its steps,
  and the training and communication seconds per step the nodes report (mean over sites);
  `step_s` is training + communication, a step without the per-phase Flower overheads;
- the communication share: time blocked on the exchange over `step_s` (and over the
  phase's wall time, `communication_share_of_wall`);
- payload bytes per site and step (what the codec put on the wire, `bytes_sent`) and bytes
  on the wire per site and step (what the hub side of each site's veth received during the
  run: every frame, tags, TCP/IP headers, Flower's TLS traffic and the store's included);
- the links as the lab measured them before the run (`--bandwidth`), and the accuracy of
  the run's last evaluation, both scorings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run_lab(
    name: str,
    overrides: list[str],
    work: Path,
    sites: int = 3,
    preset_model: str | None = None,
    lab_args: tuple[str, ...] = (),
) -> Path:
    """One `deca-flower lab` run with these config overrides; its run directory."""
    out = work / name
    run_config = f'output-dir="{out}" overrides="{" ".join(overrides)}"'
    cmd = [str(BIN / "deca-flower"), "lab", "--app", str(REPO), "--sites", str(sites)]
    cmd += ["--run-config", run_config, *lab_args]
    if preset_model:
        cmd += ["--run-config", f'preset-model="{preset_model}"']
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    log = work / f"{name}.log"
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"lab run {name} failed; see {log}:\n{log.read_text()[-3000:]}")
    return Path(log.read_text().strip().splitlines()[-1])  # the lab prints its run dir last


def measure(run_dir: Path) -> dict[str, Any]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    phases = [r for r in records if r["type"] == "phase"]
    steps = sum(1 for r in records if r["type"] == "step")
    lab = json.loads((run_dir / "lab" / "lab.json").read_text())
    sites = len(lab["site_addresses"])
    split = [p["time_split"] for p in phases]
    wall = sum(s["wall_s"] for s in split)
    training = sum(s["training_s"] for s in split)
    comm = sum(s["communication_s"] for s in split)
    payload = sum(sum(p["bytes_sent"]) for p in phases)
    wire = lab.get("interface_bytes_sent")
    evals = [r for r in records if r["type"] == "eval"]
    last = evals[-1] if evals else {}
    links = lab.get("links") or []
    return {
        "lab_mode": lab["mode"],
        "sites": sites,
        "steps": steps,
        "s_per_step": wall / steps,
        "step_s": (training + comm) / steps,
        "training_s_per_step": training / steps,
        "communication_s_per_step": comm / steps,
        "communication_share": comm / (training + comm),
        "communication_share_of_wall": comm / wall,
        "payload_bytes_per_site_step": payload / sites / steps,
        "wire_bytes_per_site_step": sum(wire.values()) / sites / steps if wire else None,
        "link_up_mbit_s": min((x["up_mbit_s"] for x in links), default=None),
        "client_accuracy": last.get("client_mean", {}).get("accuracy"),
        "client_ll_accuracy": last.get("client_mean", {}).get("ll_accuracy"),
        "run_dir": str(run_dir),
    }
