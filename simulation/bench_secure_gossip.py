"""Data-plane encryption: sealed vs plaintext gossip, side by side in one run.

Three measurements, all in this one run on this machine:

1. **Seal/open throughput** (one thread, in process): AES-256-GCM ``encrypt_into`` /
   ``decrypt_into`` over the block in 8 MiB chunks into reused buffers (what the data plane
   does), and the allocating ``encrypt``/``decrypt`` for comparison.
2. **Gossip step** in the multi-process harness of ``tests/test_gossip.py``: ``--peers``
   spawned processes on a ring (degree 2) over Gloo on 127.0.0.1 exchange and mix a block of
   the embedded default's size; plaintext and encrypted groups alternate (``--rounds`` pairs)
   so drift hits both alike. Seconds per exchange (slowest peer, median) and payload bytes on
   the wire (what each peer hands to Gloo per step: block + 16-byte tags).
3. **Training step** of one embedded-default client (forward + backward + optimizer,
   ``deca_flower.peer.Peer``), so the overhead is also given as a share of a whole step.

Every peer shares this machine's cores here, so sealing by all peers at once competes for the
same CPUs; at separate sites each peer seals on its own CPU (the per-peer crypto time is
reported too).

    python simulation/bench_secure_gossip.py                   # embedded default
    python simulation/bench_secure_gossip.py --numel 2000000 --no-compute --steps 3
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from deca_flower.gossip import GossipGroup, host_store
from deca_flower.secure_channel import DEFAULT_CHUNK_BYTES, new_run_key

HOST = "127.0.0.1"
MODES = ("none", "aes-256-gcm")


# ---------------------------------------------------------------------- 1. throughput


def throughput(nbytes: int, repeats: int = 3) -> dict[str, float]:
    """GB/s of sealing/opening ``nbytes`` in 8 MiB chunks: reused buffers vs allocating."""
    key = AESGCM(os.urandom(32))
    plain = memoryview(bytearray(os.urandom(1 << 20)) * (nbytes >> 20 or 1))
    n = len(plain)
    chunks = [(o, min(DEFAULT_CHUNK_BYTES, n - o)) for o in range(0, n, DEFAULT_CHUNK_BYTES)]
    sealed = memoryview(bytearray(n + 16 * len(chunks)))
    opened = memoryview(bytearray(n))
    nonces = [i.to_bytes(12, "big") for i in range(len(chunks))]

    def spans(i: int, o: int, m: int) -> tuple[memoryview, memoryview]:
        return plain[o : o + m], sealed[o + 16 * i : o + 16 * i + m + 16]

    def seal_into() -> None:
        for i, (o, m) in enumerate(chunks):
            src, dst = spans(i, o, m)
            key.encrypt_into(nonces[i], src, b"aad", dst)

    def open_into() -> None:
        for i, (o, m) in enumerate(chunks):
            _, src = spans(i, o, m)
            key.decrypt_into(nonces[i], src, b"aad", opened[o : o + m])

    def seal_alloc() -> None:
        for i, (o, m) in enumerate(chunks):
            key.encrypt(nonces[i], bytes(plain[o : o + m]), b"aad")

    out = {}
    for name, fn in (
        ("seal_into", seal_into),
        ("open_into", open_into),
        ("seal_alloc", seal_alloc),
    ):
        fn()  # warm-up: touch the buffers once
        best = min(_timed(fn) for _ in range(repeats))
        out[f"{name}_gb_s"] = n / best / 1e9
        out[f"{name}_ms_per_mb"] = best / (n / 2**20) * 1e3
    assert bytes(opened) == bytes(plain)  # the benchmark opened what it sealed
    return out


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---------------------------------------------------------------------- 2. gossip harness


def _peer(rank: int, world: int, port: int, args: dict[str, Any], key: str, results: Any) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args["numel"], generator=gen)
    out = torch.empty_like(x)
    nbrs = sorted({(rank - 1) % world, (rank + 1) % world})
    weights = {j: 1.0 / 3.0 for j in nbrs}
    for r in range(args["rounds"]):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            with GossipGroup(
                HOST,
                port,
                rank,
                world,
                nbrs,
                weights,
                1.0 - sum(weights.values()),
                group_name=f"bench/{r}/{mode}",
                encryption=mode,
                store_key=key,
                timeout_s=600,
            ) as group:
                group.mix(x, block_id=0, out=out)  # warm-up: header, buffers, page faults
                group.stats.__init__()
                times = []
                for _ in range(args["steps"]):
                    start = time.perf_counter()
                    group.mix(x, block_id=0, out=out)
                    times.append(time.perf_counter() - start)
                results.put((rank, mode, times, asdict(group.stats), out.sum().item()))


def gossip(numel: int, peers: int, steps: int, rounds: int) -> dict[str, dict[str, float]]:
    store, port = host_store(HOST, 0, timeout_s=600)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    key = new_run_key()
    args = {"numel": numel, "steps": steps, "rounds": rounds}
    procs = [
        ctx.Process(target=_peer, args=(r, peers, port, args, key, results)) for r in range(peers)
    ]
    for p in procs:
        p.start()
    rows = [results.get(timeout=3600) for _ in range(peers * rounds * len(MODES))]
    for p in procs:
        p.join()
    del store
    out = {}
    for mode in MODES:
        mine = [row for row in rows if row[1] == mode]
        # A step lasts as long as its slowest peer; take the median over all timed steps.
        per_step = _slowest(mine, peers, steps)
        stats = [row[3] for row in mine]
        n_steps = steps * rounds
        out[mode] = {
            "s_per_step": statistics.median(per_step),
            "wire_bytes_per_peer_step": statistics.mean(s["wire_bytes_sent"] for s in stats)
            / steps,
            "payload_bytes_per_peer_step": statistics.mean(s["bytes_sent"] for s in stats) / steps,
            "crypto_s_per_peer_step": sum(s["crypto_seconds"] for s in stats) / peers / n_steps,
            "checksum": sum(row[4] for row in mine if row[0] == 0) / rounds,
        }
    return out


def _slowest(rows: list[tuple], peers: int, steps: int) -> list[float]:
    """Per (round, step): the slowest peer's time; rows come per (rank, mode, round)."""
    by_rank: dict[int, list[list[float]]] = {}
    for rank, _, times, _, _ in rows:
        by_rank.setdefault(rank, []).append(times)
    rounds = len(next(iter(by_rank.values())))
    return [
        max(by_rank[r][k][s] for r in range(peers)) for k in range(rounds) for s in range(steps)
    ]


# ---------------------------------------------------------------------- 3. training step


def training_step(overrides: list[str], timed: int) -> tuple[float, int]:
    """Seconds per local step of one embedded-default client, and its block's numel."""
    from deca_flower.config import load_config
    from deca_flower.peer import Peer
    from deca_flower.task import load_base_model, make_partition, make_stream, prepare_data

    cfg = load_config(None, ["model.device=cpu", *overrides])
    model, tokenizer = load_base_model(cfg, torch.device("cpu"))
    partition = make_partition(cfg, model)
    peer = Peer(0, model, partition, make_stream(cfg, 0, prepare_data(cfg), tokenizer), cfg)
    peer.begin_block(partition.num_blocks // 2)
    numel = peer.block.numel()
    peer.local_step()
    peer.consensus_update()
    times = []
    for _ in range(timed):
        start = time.perf_counter()
        peer.local_step()
        peer.consensus_update()
        times.append(time.perf_counter() - start)
    return statistics.median(times), numel


# ---------------------------------------------------------------------- report


def report(args: argparse.Namespace) -> str:
    compute_s, numel = (None, args.numel)
    if not args.no_compute:
        compute_s, numel = training_step(args.override, args.timed)
    if args.numel:
        numel = args.numel
    tput = throughput(numel * 4)
    res = gossip(numel, args.peers, args.steps, args.rounds)
    plain, sealed = res["none"], res["aes-256-gcm"]
    assert plain["checksum"] == sealed["checksum"], "sealing changed the mixed block"
    extra = sealed["s_per_step"] - plain["s_per_step"]
    lines = [
        "## Data-plane encryption",
        "",
        f"`python simulation/bench_secure_gossip.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"Block: {numel:,} fp32 parameters ({numel * 4 / 2**20:.1f} MiB), 8 MiB chunks; "
        f"{args.peers} peers on a ring (degree 2), Gloo over 127.0.0.1, "
        f"{args.rounds} x {args.steps} timed steps per mode, modes alternating; "
        f"torch threads 1 per peer; {os.cpu_count()} CPU cores shared by all peers.",
        "",
        "| data plane | s per gossip step | payload bytes / peer / step | on the wire "
        "| seal+open s / peer / step |",
        "|---|---|---|---|---|",
    ]
    for mode, r in res.items():
        lines.append(
            f"| {mode} | {r['s_per_step']:.3f} | {r['payload_bytes_per_peer_step']:,.0f} "
            f"| {r['wire_bytes_per_peer_step']:,.0f} | {r['crypto_s_per_peer_step']:.3f} |"
        )
    lines += [
        "",
        f"- gossip step: {sealed['s_per_step'] / plain['s_per_step']:.3f}x plaintext "
        f"(+{extra * 1e3:.0f} ms); wire overhead "
        f"{sealed['wire_bytes_per_peer_step'] / plain['wire_bytes_per_peer_step'] - 1:.2e} "
        "(one 16-byte tag per 8 MiB chunk); mixed blocks identical in both modes.",
    ]
    if compute_s is not None:
        step_plain = compute_s + plain["s_per_step"]
        lines.append(
            f"- whole training step (local step {compute_s:.3f} s + gossip): "
            f"{step_plain:.3f} s plaintext vs {compute_s + sealed['s_per_step']:.3f} s sealed: "
            f"**{extra / step_plain * 100:+.1f}%** step time (target <= 5%)."
        )
    lines += [
        "",
        "| cipher call (one thread, 8 MiB chunks) | GB/s | ms per MiB |",
        "|---|---|---|",
    ]
    for name, label in (
        ("seal_into", "AES-256-GCM encrypt_into, reused buffer"),
        ("open_into", "AES-256-GCM decrypt_into, reused buffer"),
        ("seal_alloc", "AES-256-GCM encrypt (allocating)"),
    ):
        lines.append(f"| {label} | {tput[name + '_gb_s']:.2f} | {tput[name + '_ms_per_mb']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per group")
    parser.add_argument("--rounds", type=int, default=2, help="plaintext/sealed pairs")
    parser.add_argument("--timed", type=int, default=3, help="timed local training steps")
    parser.add_argument("--numel", type=int, default=0, help="block size (default: the model's)")
    parser.add_argument("--no-compute", action="store_true", help="skip the training step")
    parser.add_argument("--override", nargs="*", default=[], help="config key=value")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.no_compute and not args.numel:
        args.numel = 21_240_576  # the embedded default's largest block (fp32 parameters)
    text = report(args)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
