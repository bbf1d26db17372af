"""Time and peak memory of one client's training step: DECA vs the baselines, fp32 vs bf16.

Each variant builds one client (model, partition, data stream, optimizer) exactly as the
engine does (`deca_flower.peer.Peer`), runs warm-up steps, then times `timed` steps of
forward + backward + optimizer (the local step, then the consensus update with the block
left as it is: mixing itself is benchmarked by the gossip tests, not here). Everything is
measured side by side in one process on one device, so the ratios are comparable:

- ms/step: wall clock per step (CUDA synchronised before each clock read);
- peak MiB: the largest memory held during the timed steps (CUDA: max_memory_allocated;
  CPU: the optimizer state + gradients the peer measured, as the CPU cannot see a peak);
- ratios against full-parameter decentralized Adam at the same dtype.

    python simulation/bench_step_time.py                          # embedded SmolLM2-135M
    python simulation/bench_step_time.py model.device=cuda --out bench.md
    python simulation/bench_step_time.py model=tiny --methods deca full-adam --timed 3
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

from deca_flower.cli import split_args
from deca_flower.config import load_config
from deca_flower.peer import Peer
from deca_flower.task import (
    load_base_model,
    make_partition,
    make_stream,
    prepare_data,
    resolve_device,
)

PRESETS = {"deca": "deca", "full-adam": "full-adam", "dec-lora": "dec-lora"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cfg, device: torch.device, warmup: int, timed: int) -> dict[str, float]:
    """One client of `cfg`'s method: ms per step over the deepest block, and peak memory."""
    model, tokenizer = load_base_model(cfg, device)
    partition = make_partition(cfg, model)
    peer = Peer(0, model, partition, make_stream(cfg, 0, prepare_data(cfg), tokenizer), cfg)
    # The deepest block: its backward runs through the whole model, so it is the slowest.
    peer.begin_block(partition.num_blocks - 1)
    for _ in range(warmup):
        peer.local_step()
        peer.consensus_update()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(timed):
        _sync(device)
        start = time.perf_counter()
        peer.local_step()
        peer.consensus_update()
        _sync(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = peer.train_state_bytes + sum(
            p.numel() * p.element_size() for p in model.parameters()
        )
    result = {
        "ms_per_step": 1e3 * statistics.median(times),
        "peak_mib": peak / 2**20,
        "trained_params": partition.numel(partition.num_blocks - 1),
    }
    peer.end_block()
    del peer, model, partition
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("settings", nargs="*", help="group=preset or key.path=value")
    parser.add_argument("--methods", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timed", type=int, default=10)
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args(argv)
    presets, overrides = split_args(args.settings)
    rows = {}
    for dtype in args.dtypes:
        for method in args.methods:
            cfg = load_config(
                {**presets, "algorithm": PRESETS[method]},
                ["num_clients=2", f"model.dtype={dtype}", *overrides],
            )
            device = resolve_device(cfg.model.device)
            rows[method, dtype] = measure(cfg, device, args.warmup, args.timed)
            print(f"[bench] {method} {dtype}: {rows[method, dtype]}", flush=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak_what = "max_memory_allocated" if device.type == "cuda" else "params + opt state + grads"
    lines = [
        f"model {cfg.model.name}, {cfg.train.layers_per_block} layer(s) per DECA block, batch "
        f"{cfg.data.batch_size} x {cfg.data.max_length} tokens, on {name} "
        f"(torch {torch.__version__})",
        "",
        f"| method | dtype | trained params | ms/step | peak MiB ({peak_what}) "
        "| time vs full-adam | memory vs full-adam |",
        "|---|---|---|---|---|---|---|",
    ]
    for (method, dtype), r in rows.items():
        ref = rows.get(("full-adam", dtype))
        ratio_t = f"{r['ms_per_step'] / ref['ms_per_step']:.2f}" if ref else "-"
        ratio_m = f"{r['peak_mib'] / ref['peak_mib']:.2f}" if ref else "-"
        lines.append(
            f"| {method} | {dtype} | {r['trained_params']:,} | {r['ms_per_step']:.1f} "
            f"| {r['peak_mib']:.1f} | {ratio_t} | {ratio_m} |"
        )
    for method in args.methods:
        if (method, "float32") in rows and (method, "bfloat16") in rows:
            a, b = rows[method, "bfloat16"], rows[method, "float32"]
            lines.append(
                f"\n{method}: bf16 / fp32 time {a['ms_per_step'] / b['ms_per_step']:.2f}, "
                f"memory {a['peak_mib'] / b['peak_mib']:.2f}"
            )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
