"""The optimizer's share of a step: BMA-Adam's two half-steps vs torch's Adam, one block.

BMA-Adam does more than Adam (the discrepancy of eq (8) and the moment mixing of eqs
(9)-(10), on top of eqs (4)-(6)), so it cannot be cheaper; this measures how much dearer
it is, side by side in one process on one device, at the size of a real block (default:
15 SmolLM2-135M layers, the learning study's CPU block). Gradients are fixed tensors
handed in before each timed step; the mix is a scale of the block standing in for the
neighbours' average.

    python simulation/bench_optimizer_step.py
    python simulation/bench_optimizer_step.py --numel 100_000_000 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from deca_flower.optim import BMAAdam

SMOLLM2_15_LAYERS = 15 * 3_540_096  # parameters of 15 SmolLM2-135M decoder layers


def _timed(step: Callable[[], None], repeats: int, device: torch.device) -> float:
    """Median seconds per step over `repeats` steps, after two warm-up steps."""
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _bma_step(params, grads, **kwargs) -> Callable[[], None]:
    opt = BMAAdam(params, lr=3e-5, **kwargs)

    def step() -> None:
        for p, g in zip(params, grads):
            p.grad = g
        opt.local_step()
        opt.block.mul_(0.999)  # the neighbours' average stands in here
        opt.consensus_update()

    return step


def _adam_step(params, grads) -> Callable[[], None]:
    opt = torch.optim.Adam(params, lr=3e-5)

    def step() -> None:
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=lambda s: int(s.replace("_", "")),
                        default=SMOLLM2_15_LAYERS)  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    shards = 8  # a block is many tensors; BMA-Adam flattens them, Adam loops over them
    params = [torch.nn.Parameter(torch.randn(args.numel // shards, device=device))
              for _ in range(shards)]  # fmt: skip
    grads = [torch.randn_like(p) for p in params]
    variants = {
        "torch Adam (foreach)": _adam_step(params, grads),
        "BMA-Adam": _bma_step(params, grads),
        "BMA-Adam + diagnostics": _bma_step(params, grads, track_stats=True),
        "w/o BMA": _bma_step(params, grads, bma=None),
    }
    seconds = {name: _timed(step, args.repeats, device) for name, step in variants.items()}
    base = seconds["torch Adam (foreach)"]
    print(f"block of {args.numel:,} parameters on {device} "
          f"({torch.get_num_threads()} threads), median of {args.repeats} steps")  # fmt: skip
    print("| optimizer | ms/step | vs torch Adam |\n|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {s * 1e3:,.0f} | {s / base:.2f}x |")


if __name__ == "__main__":
    main()
