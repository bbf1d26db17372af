"""Optimizer memory and bytes on the wire: DECA vs full-parameter decentralized Adam.

Measured side by side on one model in one run (not computed from formulas):
- optimizer state: BMAAdam's live buffers for one active block vs torch Adam's state
  over every decoder layer after one step;
- gradient memory: .grad bytes after backward with one block active vs all layers;
- bytes sent per neighbour per inner step: the active block vs every decoder layer.

    python simulation/bench_memory_comm.py                       # embedded SmolLM2-135M
    python simulation/bench_memory_comm.py model=tiny train.layers_per_block=2
"""

from __future__ import annotations

import sys

import torch

from deca_flower.cli import split_args
from deca_flower.config import load_config
from deca_flower.optim import BMAAdam
from deca_flower.task import load_base_model, make_partition, make_stream, prepare_data


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main(argv: list[str]) -> None:
    presets, overrides = split_args(argv)
    cfg = load_config(presets, ["num_clients=2", *overrides])
    model, tokenizer = load_base_model(cfg, torch.device("cpu"))
    partition = make_partition(cfg, model)
    batch = make_stream(cfg, 0, prepare_data(cfg), tokenizer).next_batch()
    all_layers = [p for k in range(partition.num_blocks) for p in partition.parameters(k)]
    k = 0  # the deepest block: the largest backward, the same size as the others

    params = partition.activate(k)
    opt = BMAAdam(params, lr=cfg.algorithm.lr)
    model(**batch).loss.backward()
    deca_grad = tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
    opt.local_step()
    opt.consensus_update()
    deca_state = tensor_bytes(opt.state_tensors().values())
    partition.freeze_all()

    for p in all_layers:
        p.requires_grad_(True)
    adam = torch.optim.Adam(all_layers, lr=cfg.algorithm.lr)
    model(**batch).loss.backward()
    full_grad = tensor_bytes(p.grad for p in all_layers)
    adam.step()
    # Adam's moments, plus the fp32 copy decentralized Adam must send and mix.
    full_state = tensor_bytes(t for s in adam.state.values() for t in s.values() if t.dim() > 0)
    full_state += tensor_bytes(all_layers)

    wire = 4 if cfg.algorithm.wire_dtype == "float32" else next(model.parameters()).element_size()
    rows = [
        ("optimizer state (MiB)", deca_state, full_state),
        ("gradients (MiB)", deca_grad, full_grad),
        (
            "sent per neighbour per step (MiB)",
            partition.numel(k) * wire,
            sum(p.numel() for p in all_layers) * wire,
        ),
    ]
    print(
        f"model {cfg.model.name}: {partition.num_blocks} blocks of "
        f"{cfg.train.layers_per_block} layer(s); block {k} has {partition.numel(k):,} params"
    )
    print("| quantity | DECA (one block) | full-parameter D-Adam | ratio |")
    print("|---|---|---|---|")
    for name, deca, full in rows:
        print(f"| {name} | {deca / 2**20:.1f} | {full / 2**20:.1f} | {deca / full:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
