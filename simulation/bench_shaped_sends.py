"""Sends to several neighbours over a shaped link: concurrent vs one after the other.

    python simulation/bench_shaped_sends.py                          # 3 sites, 100mbit
    python simulation/bench_shaped_sends.py --rate 1gbit --numel 20000000

Builds the lab's hosts (one network namespace per site on a private bridge, as root;
`deca_flower/lab/hosts.py`), shapes every site's link both ways with `tc tbf` to `--rate`,
and runs one gossip process per site on a complete graph (every site has the others as
neighbours, all over its one link). Each process exchanges an fp32 block of `--numel`
parameters for `--steps` timed steps, first with the product path (`GossipGroup`: every
send and receive posted at once, `batch_isend_irecv`), then with `SequentialGossipGroup`
(`bench_compression.py`: one neighbour at a time, in ascending rank order). Plaintext, so
only the link is measured. Prints seconds per step (median over steps, max over sites: a
step ends when the slowest site is done), the bytes each site sent, and the time the
bytes need at the measured link rate. Results: `<out>/bench_shaped_sends.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
MODES = ("concurrent", "sequential")


def worker(rank: int, sites: int, host: str, port: int, numel: int, steps: int) -> None:
    """One site's process: both send modes in turn; prints one JSON line per mode."""
    import torch
    from bench_compression import SequentialGossipGroup

    from deca_flower.gossip import GossipGroup

    torch.set_num_threads(1)
    others = [j for j in range(sites) if j != rank]
    weights = {j: 1.0 / sites for j in others}
    x = torch.randn(numel, generator=torch.Generator().manual_seed(rank)) * 0.02
    for mode in MODES:
        cls = SequentialGossipGroup if mode == "sequential" else GossipGroup
        name = f"shaped/{mode}"
        with cls(host, port, rank, sites, others, weights, 1.0 / sites,
                 group_name=name, timeout_s=600, encryption="none") as group:  # fmt: skip
            times = []
            for step in range(steps + 1):  # step 0: handshake and buffers, not timed
                t0 = time.perf_counter()
                x = group.mix(x, block_id=1)
                if step:
                    times.append(time.perf_counter() - t0)
            sent = group.stats.bytes_sent / (steps + 1)
        print(json.dumps({"rank": rank, "mode": mode, "step_s": times, "bytes_sent": sent}),
              flush=True)  # fmt: skip


def lab(args: argparse.Namespace) -> dict:
    """Inside the private namespace: hosts, shaping, link check, the workers."""
    from deca_flower.gossip import host_store
    from deca_flower.lab.hosts import HUB_ADDRESS, NamespaceHosts

    hosts = NamespaceHosts(args.sites)
    hosts.setup()
    hosts.shape(args.rate)
    links = [hosts.measure_link(site, 2.0) for site in hosts.sites]
    store, port = host_store(HUB_ADDRESS, 0, timeout_s=600)
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1"}
    common = ["--sites", str(args.sites), "--port", str(port), "--numel", str(args.numel),
              "--steps", str(args.steps)]  # fmt: skip
    procs = [
        subprocess.Popen(
            hosts.command(site, [sys.executable, __file__, "--worker", str(rank), *common]),
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for rank, site in enumerate(hosts.sites)
    ]
    rows = []
    for p in procs:
        out, _ = p.communicate(timeout=3600)
        if p.returncode != 0:
            raise SystemExit(f"a worker failed (exit {p.returncode}):\n{out}")
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    del store
    return {"rate": args.rate, "numel": args.numel, "sites": args.sites, "links": links,
            "rows": rows}  # fmt: skip


def report(result: dict, command: str) -> str:
    up = min(link["up_mbit_s"] for link in result["links"])
    lines = [
        "# Sends to several neighbours over a shaped link",
        "",
        f"`{command}`",
        "",
        f"{result['sites']} sites, complete graph, fp32 block of {result['numel']:,} "
        f"parameters, links shaped to {result['rate']} (measured up {up:.1f} Mbit/s, slowest "
        "site).",
        "",
        "| sends | s / step (median, slowest site) | MB sent / site / step | "
        "s the bytes need at the measured rate | step vs concurrent |",
        "|---|---|---|---|---|",
    ]
    per_mode = {}
    for mode in MODES:
        rows = [r for r in result["rows"] if r["mode"] == mode]
        steps = len(rows[0]["step_s"])
        slowest = [max(r["step_s"][s] for r in rows) for s in range(steps)]
        per_mode[mode] = (statistics.median(slowest), rows[0]["bytes_sent"])
    for mode in MODES:
        step, sent = per_mode[mode]
        need = sent * 8 / (up * 1e6)
        lines.append(
            f"| {mode} | {step:.2f} | {sent / 1e6:.1f} | {need:.2f} | "
            f"{step / per_mode['concurrent'][0]:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rate", default="100mbit")
    parser.add_argument("--numel", type=int, default=2_500_000, help="fp32 block size")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--port", type=int)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "links")
    args = parser.parse_args()
    if args.worker is not None:
        from deca_flower.lab.hosts import HUB_ADDRESS

        worker(args.worker, args.sites, HUB_ADDRESS, args.port, args.numel, args.steps)
        return
    from deca_flower.lab.hosts import INSIDE_ENV, namespace_support, reexec_in_private_namespace

    if os.environ.get(INSIDE_ENV) != "1":
        ok, why = namespace_support()
        if not ok:
            raise SystemExit(f"bench_shaped_sends needs network namespaces: {why}")
        raise SystemExit(reexec_in_private_namespace([sys.executable, *sys.argv]))
    result = lab(args)
    command = "python simulation/bench_shaped_sends.py " + shlex.join(sys.argv[1:])
    text = report(result, command)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_shaped_sends.json").write_text(json.dumps(result, indent=1))
    (args.out / "bench_shaped_sends.md").write_text(text)


if __name__ == "__main__":
    main()
