"""Compressed gossip and overlap, measured side by side in one run on loopback.

Four parts (choose with --parts; every ratio is between rows of the same run):

- ``wire``: the multi-process gossip harness. ``--sites`` processes (complete graph, Gloo
  over 127.0.0.1) exchange a block of ``--numel`` fp32 parameters (default 21,240,576: one
  block of the embedded default, SmolLM2-135M at 6 layers per block), for every wire format
  in turn: bytes per step, encode / exchange / decode+mix ms, step ms. Then concurrent
  (batch_isend_irecv, the product path) vs sequential (one neighbour after the other) sends.
- ``overlap``: real DECA nodes (deca_flower.node.Node, the Flower ClientApp's code) in
  ``--sites`` processes, overlap off vs on, per format: phase seconds and time blocked on
  the exchange.
- ``table7``: the paper's Table 7 shape (forward, backward, aggregation+update ms, MB sent
  per step) for DECA, full D-Adam and Dec-LoRA, one client on this device, reusing
  simulation/bench_step_time.py; aggregation = the fp32 mix of the block with ``--degree``
  neighbours' copies (gossip.mix_blocks) + the optimizer's update halves.
- ``accuracy``: the in-process engine (equal to the nodes, tests/test_compression.py) at
  equal steps per format over ``--seeds``: final mean client accuracy and its spread.

    nice -n 19 python simulation/bench_compression.py --parts wire --steps 5
    nice -n 19 python simulation/bench_compression.py train.layers_per_block=6 --parts overlap
    nice -n 19 python simulation/bench_compression.py train.layers_per_block=6 --parts table7
    nice -n 19 python simulation/bench_compression.py model=tiny --parts accuracy --seeds 0 1 \
        --formats float32 int8 topk --runs accuracy-runs.jsonl    # resumable

(settings go before --parts, which takes several values)
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from deca_flower.cli import split_args
from deca_flower.compression import ChocoMixer, ChocoState, make_codec
from deca_flower.config import load_config
from deca_flower.gossip import GossipGroup, host_store, mix_blocks

HOST = "127.0.0.1"
EMBEDDED_BLOCK = 21_240_576  # SmolLM2-135M: 3,540,096 parameters per layer x 6 layers
FORMATS = ("float32", "bf16", "int8", "topk")
BENCH_KEY = "b3" * 32  # a fixed run key for the node harness (a benchmark, not a deployment)


class SequentialGossipGroup(GossipGroup):
    """The alternative to measure: one neighbour at a time, in ascending rank order (a
    total order, so it cannot deadlock), each exchange finished before the next starts."""

    def _run_p2p(self, send, recv, tag, *, what, during=None):  # noqa: ANN001
        self._run_during(during)
        for j in self.neighbours:
            ops = [
                dist.P2POp(dist.isend, send, j, tag=tag),
                dist.P2POp(dist.irecv, recv[j], j, tag=tag),
            ]
            for work in dist.batch_isend_irecv(ops):
                work.wait()


# ---------------------------------------------------------------------------- wire harness


def _wire_peer(rank: int, sites: int, port: int, numel: int, steps: int, out: Any) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    others = [j for j in range(sites) if j != rank]
    weights = {j: 1.0 / sites for j in others}
    gen = torch.Generator().manual_seed(rank)
    x0 = torch.randn(numel, generator=torch.Generator().manual_seed(0)) * 0.02
    cases = [(f, "concurrent") for f in FORMATS] + [(f, "sequential") for f in ("float32", "int8")]
    for fmt, mode in cases:
        codec = make_codec(fmt, topk_fraction=0.01)
        cls = SequentialGossipGroup if mode == "sequential" else GossipGroup
        name = f"bench/{port}/{fmt}/{mode}"
        x = x0.clone()
        rows = []
        # Plaintext: this harness measures the wire formats themselves (and the sequential
        # variant overrides _run_p2p); sealed vs plaintext is bench_secure_gossip.py's job.
        with cls(HOST, port, rank, sites, others, weights, 1.0 / sites, group_name=name,
                 codec=codec, timeout_s=600, encryption="none") as group:  # fmt: skip
            all_w = {**weights, rank: 1.0 / sites}
            mixer = (
                ChocoMixer(codec, rank, all_w, ChocoState.start(x))
                if codec.error_feedback
                else None
            )
            for step in range(steps + 1):  # step 0: handshake and buffers, not timed
                x_half = x + torch.randn(numel, generator=gen) * 1e-5
                t0 = time.perf_counter()
                if mixer is None:  # the product path: GossipGroup.mix (cast, move, mix)
                    inside = group.stats.seconds
                    x = group.mix(x_half, block_id=1)
                    step_s = time.perf_counter() - t0
                    exch_s = group.stats.seconds - inside  # cast + transfer + cast back
                    enc_s, wire = _timed(codec.encode, x_half)  # the codec alone, apart
                    dec_s, _ = _timed(codec.decode, wire, numel)
                else:  # the product path of ChocoGossip.mix_on_node
                    enc_s, wire = _timed(mixer.encode, x_half)
                    exch_s, got = _timed(partial(group.exchange_wire, wire, numel=numel))
                    dec_s, qs = _timed(mixer.decode, wire, got, numel)
                    x = mixer.combine(x_half, qs)
                    step_s = time.perf_counter() - t0
                if step:
                    rows.append((enc_s, exch_s, dec_s, step_s))
            sent = group.stats.bytes_sent / (steps + 1)
        med = [statistics.median(r[i] for r in rows) * 1e3 for i in range(4)]
        out.put((rank, fmt, mode, sent, *med))


def _timed(fn, *args):  # noqa: ANN001, ANN202
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def run_wire(sites: int, numel: int, steps: int) -> str:
    store, port = host_store(HOST, 0, timeout_s=600)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_wire_peer, args=(r, sites, port, numel, steps, out))
        for r in range(sites)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=3600) for _ in range(sites * (len(FORMATS) + 2))]
    for p in procs:
        p.join()
    del store
    table: dict[tuple[str, str], list] = {}
    for _rank, fmt, mode, sent, enc, exch, dec, step in results:
        table.setdefault((fmt, mode), []).append((sent, enc, exch, dec, step))
    base = _mean_row(table["float32", "concurrent"])
    lines = [
        f"{sites} processes, complete graph (degree {sites - 1}), Gloo on 127.0.0.1, block "
        f"{numel:,} fp32 parameters; medians of {steps} steps, mean over ranks",
        "",
        "| format | sends | MB sent / step / node | encode ms | exchange ms | decode ms "
        "| step ms | bytes vs fp32 | step vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (fmt, mode), rows in table.items():
        sent, enc, exch, dec, step = _mean_row(rows)
        lines.append(
            f"| {fmt} | {mode} | {sent / 1e6:.2f} | {enc:.1f} | {exch:.1f} | {dec:.1f} "
            f"| {step:.1f} | {sent / base[0]:.3f} | {step / base[4]:.2f} |"
        )
    return "\n".join(lines)


def _mean_row(rows: list) -> list[float]:
    return [statistics.mean(r[i] for r in rows) for i in range(len(rows[0]))]


# ---------------------------------------------------------------------------- overlap (nodes)


def _node_peer(
    rank: int, port: int, settings: list[str], presets: dict, cases: list, out: Any
) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    from deca_flower.node import Node, PhasePlan
    from deca_flower.task import build_topology
    from deca_flower.topology import neighbours

    for fmt, overlap, blocks in cases:
        # Plaintext unless the command line says gossip.encryption=aes-256-gcm (then the
        # run key below seals it), so the figures compare with the wire harness.
        cfg = load_config(
            presets,
            ["gossip.encryption=none", *settings, f"gossip.compression={fmt}",
             f"gossip.overlap={overlap}"],
        )  # fmt: skip
        graph, w = build_topology(cfg)
        row = neighbours(graph, rank)
        with tempfile.TemporaryDirectory() as root:
            node = Node(cfg, rank, Path(root) / f"n{rank}")
            times = []
            for phase, k in enumerate(blocks):
                plan = PhasePlan(
                    phase, 0, [k], cfg.train.steps_per_block, HOST, port,
                    f"ov/{port}/{fmt}/{overlap}/{phase}", rank, cfg.num_clients, row,
                    [float(w[rank, j]) for j in row], float(w[rank, rank]), store_key=BENCH_KEY,
                )  # fmt: skip
                t0 = time.perf_counter()
                stats = node.run_phase(plan)
                times.append(
                    (time.perf_counter() - t0, stats["communication_s"], stats["overlapped_s"])
                )
        # Phase 0 pays the join and allocation once: the mean is over the later phases.
        timed = times[1:] or times
        out.put((rank, fmt, overlap, *[statistics.mean(t[i] for t in timed) for i in range(3)],
                 stats["bytes_sent"] / cfg.train.steps_per_block))  # fmt: skip


def run_overlap(sites: int, presets: dict, overrides: list[str], formats: list[str]) -> str:
    settings = [f"num_clients={sites}", "topology.name=complete", *overrides]
    cfg = load_config(presets, settings)
    from deca_flower.task import load_base_model, make_partition

    model, _ = load_base_model(cfg, torch.device("cpu"))
    nblocks = make_partition(cfg, model).num_blocks
    del model
    # Deep blocks: the frozen prefix is largest there (block 0 has none).
    blocks = [nblocks - 1, nblocks - 1, max(nblocks - 2, 1)]
    cases = [(f, ov, blocks) for f in formats for ov in (False, True)]
    store, port = host_store(HOST, 0, timeout_s=600)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_node_peer, args=(r, port, settings, presets, cases, out))
        for r in range(sites)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=3600) for _ in range(sites * len(cases))]
    for p in procs:
        p.join()
    del store
    table: dict[tuple[str, bool], list] = {}
    for _rank, fmt, ov, phase_s, comm_s, over_s, sent in results:
        table.setdefault((fmt, ov), []).append((phase_s, comm_s, over_s, sent))
    steps = cfg.train.steps_per_block
    lines = [
        f"{sites} DECA nodes (deca_flower.node.Node), complete graph, Gloo on 127.0.0.1; model "
        f"{cfg.model.name}, {cfg.train.layers_per_block} layer(s)/block, blocks {blocks} "
        f"x {steps} steps, batch {cfg.data.batch_size} x {cfg.data.max_length}; mean over "
        "ranks and the phases after the first",
        "",
        "| format | overlap | s / step | blocked on exchange s / step | comm share "
        "| forward run during exchange s / step | MB sent / step | step vs same format, off |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (fmt, ov), rows in table.items():
        phase_s, comm_s, over_s, sent = _mean_row(rows)
        off = _mean_row(table[fmt, False])[0]
        lines.append(
            f"| {fmt} | {'on' if ov else 'off'} | {phase_s / steps:.3f} | {comm_s / steps:.3f} "
            f"| {comm_s / phase_s:.0%} | {over_s / steps:.3f} | {sent / 1e6:.2f} "
            f"| {phase_s / off:.3f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- table 7


def run_table7(presets: dict, overrides: list[str], degree: int, warmup: int, timed: int) -> str:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_step_time import PRESETS

    from deca_flower.peer import Peer
    from deca_flower.task import load_base_model, make_partition, make_stream, prepare_data

    rows = []
    for method in PRESETS:
        cfg = load_config({**presets, "algorithm": PRESETS[method]}, ["num_clients=2", *overrides])
        model, tok = load_base_model(cfg, torch.device("cpu"))
        part = make_partition(cfg, model)
        peer = Peer(0, model, part, make_stream(cfg, 0, prepare_data(cfg), tok), cfg)
        peer.begin_block(part.num_blocks - 1)  # deepest block: the longest backward
        samples = []
        for step in range(warmup + timed):
            res = peer.local_step()
            block = peer.block
            copies = {j: block.clone() for j in range(1, degree + 1)}
            t0 = time.perf_counter()
            mixed = mix_blocks(
                {0: block, **copies}, {j: 1.0 / (degree + 1) for j in range(degree + 1)}
            )
            block.copy_(mixed)
            mix_s = time.perf_counter() - t0
            upd_s = peer.consensus_update()
            if step >= warmup:
                samples.append((res.forward_s, res.backward_s, mix_s + upd_s + res.optimizer_s))
        numel = peer.opt.numel
        peer.end_block()
        med = [1e3 * statistics.median(s[i] for s in samples) for i in range(3)]
        rows.append((method, numel, *med, numel * 4 * degree / 1e6))
        del peer, model, part
    lines = [
        f"model {cfg.model.name}, {cfg.train.layers_per_block} layer(s) per DECA block, batch "
        f"{cfg.data.batch_size} x {cfg.data.max_length}, one client on CPU "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads); medians of {timed} "
        f"steps; MB = fp32 block x {degree} neighbours",
        "",
        "| method | trained params | forward ms | backward ms | aggregation+update ms "
        "| MB sent / step |",
        "|---|---|---|---|---|---|",
    ]
    for method, numel, fwd, bwd, agg, mb in rows:
        lines.append(f"| {method} | {numel:,} | {fwd:.1f} | {bwd:.1f} | {agg:.1f} | {mb:.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- accuracy


def run_accuracy(
    presets: dict, overrides: list[str], formats: list[str], seeds: list[int], runs: Path | None
) -> str:
    """`runs` (JSONL): every finished (format, seed) is appended there and not run again,
    so the part can run in pieces; delete the file after changing the settings."""
    from deca_flower.engine import Engine

    done = {}
    if runs and runs.exists():
        for line in runs.read_text().splitlines():
            rec = json.loads(line)
            done[rec["format"], rec["seed"]] = tuple(rec["row"])
    cfg = load_config(presets, overrides)  # the table's heading
    results: dict[str, list[tuple[float, float, float]]] = {}
    for fmt in formats:
        for seed in seeds:
            if (fmt, seed) in done:
                results.setdefault(fmt, []).append(done[fmt, seed])
                continue
            with tempfile.TemporaryDirectory() as root:
                settings = [f"seed={seed}", f"gossip.compression={fmt}", f"output_dir={root}"]
                run_cfg = load_config(presets, [*overrides, *settings, "eval.zero_shot=false"])
                result = Engine(run_cfg).run()
            last = result.evals()[-1]
            steps = [r["loss"] for r in result.records if r["type"] == "step"]
            row = (
                last["client_mean"]["accuracy"],
                last["client_mean"].get("ll_accuracy", float("nan")),
                # an unskewed split (eval.global_test_size), scored by likelihood
                last.get("global_test", {}).get("client_mean", {}).get("ll_accuracy", math.nan),
                statistics.mean(steps[-1]),  # the clients' loss at the last step
                last["consensus_distance"],
            )
            results.setdefault(fmt, []).append(row)
            print(f"[bench] accuracy {fmt} seed {seed}: {row}", flush=True)
            if runs:
                record = {"format": fmt, "seed": seed, "row": row, "settings": overrides}
                with runs.open("a") as f:
                    f.write(json.dumps({**record, "presets": presets}) + "\n")
    lines = [
        f"in-process engine, model {cfg.model.name}, data {cfg.data.name}, {cfg.num_clients} "
        f"clients, {cfg.train.rounds} round(s) x {cfg.train.steps_per_block} steps/block, "
        f"seeds {seeds}: final mean client accuracy (generated label, likelihood), the "
        "clients' likelihood accuracy on the unskewed global test split, last-step loss, "
        "consensus distance",
        "",
        "| format | accuracy per seed | mean | spread | likelihood acc. per seed | mean | "
        "global test (likelihood) per seed | mean | last-step loss per seed "
        "| consensus distance per seed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for fmt, rows in results.items():
        accs, lls, globs = ([r[k] for r in rows] for k in range(3))
        lines.append(
            f"| {fmt} | {_join(accs)} | {statistics.mean(accs):.3f} "
            f"| {max(accs) - min(accs):.3f} | {_join(lls)} | {statistics.mean(lls):.3f} "
            f"| {_join(globs)} | {statistics.mean(globs):.3f} "
            f"| {_join([r[3] for r in rows], '.4f')} | {_join([r[4] for r in rows], '.3e')} |"
        )
    return "\n".join(lines)


def _join(values: list[float], spec: str = ".3f") -> str:
    return ", ".join(format(v, spec) for v in values)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("settings", nargs="*", help="group=preset or key.path=value")
    parser.add_argument("--parts", nargs="+", default=["wire"],
                        choices=["wire", "overlap", "table7", "accuracy"])  # fmt: skip
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--numel", type=int, default=EMBEDDED_BLOCK)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--formats", nargs="+", default=["float32", "int8"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--degree", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also append the tables here")
    parser.add_argument("--runs", type=Path, help="accuracy: finished runs (JSONL); resume")
    args = parser.parse_args(argv)
    presets, overrides = split_args(args.settings)
    for part in args.parts:
        t0 = time.perf_counter()
        if part == "wire":
            table = run_wire(args.sites, args.numel, args.steps)
        elif part == "overlap":
            table = run_overlap(args.sites, presets, overrides, args.formats)
        elif part == "table7":
            table = run_table7(presets, overrides, args.degree, warmup=1, timed=args.steps)
        else:
            table = run_accuracy(presets, overrides, args.formats, args.seeds, args.runs)
        text = f"### {part} ({time.perf_counter() - t0:.0f} s)\n\n{table}\n"
        print(text, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
