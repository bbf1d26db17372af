"""Data-plane tests: real Gloo process groups between spawned processes on 127.0.0.1.

The parent process hosts the rendezvous store (as the Flower ServerApp does); each peer is a
separate spawned process (as ClientApps in Ray actors are). Peers report plain Python/numpy
results through a queue; failure scenarios use short timeouts so the suite stays bounded.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from itertools import product
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

from deca_flower.gossip import (
    GossipError,
    GossipGroup,
    choose_backend,
    host_store,
    mix_blocks,
    resolve_wire_dtype,
)
from deca_flower.secure_channel import AuthenticatedStore

WORLD = 4
NUMEL = 1000
HOST = "127.0.0.1"
# The run's store key, as the coordinator would hand it out (a constant: every spawned peer
# imports this module). Groups are encrypted by default; plaintext cases say encryption="none".
RUN_KEY = "5e" * 32
THIRD = 1.0 / 3.0  # Metropolis weight of a 4-ring: 1 / (1 + max(2, 2)); diagonal 1 - 2/3


# ---------------------------------------------------------------------------- helpers


def ring_row(rank: int, world: int = WORLD) -> tuple[list[int], dict[int, float], float]:
    nbrs = sorted({(rank - 1) % world, (rank + 1) % world})
    return nbrs, {j: THIRD for j in nbrs}, THIRD


def ring_matrix(world: int = WORLD) -> np.ndarray:
    w = np.zeros((world, world))
    for i in range(world):
        for j in (i - 1, i, i + 1):
            w[i, j % world] = THIRD
    return w


def make_block(rank: int, numel: int = NUMEL) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234 + rank)
    return torch.randn(numel, generator=gen) * (rank + 1)


def loop_reference(blocks: dict[int, torch.Tensor], weights: dict[int, float]) -> torch.Tensor:
    """The documented reference order, written independently of mix_blocks."""
    acc = torch.zeros_like(blocks[min(blocks)])
    for j in sorted(blocks):
        acc = acc + weights[j] * blocks[j]
    return acc


def ring_group(rank: int, port: int, name: str, **kw: Any) -> GossipGroup:
    nbrs, w, sw = ring_row(rank)
    kw.setdefault("timeout_s", 20)
    kw.setdefault("store_key", RUN_KEY)
    return GossipGroup(HOST, port, rank, WORLD, nbrs, w, sw, group_name=name, **kw)


def _worker_loop(rank: int, jobs: Any, results: Any, ready: Any) -> None:
    """One long-lived peer process: importing torch once per peer keeps the suite fast."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    ready.set()
    while (job := jobs.get()) is not None:
        job_id, fn, port, kw = job
        start = time.monotonic()
        try:
            status, value = "ok", fn(rank, port, **kw)
        except GossipError as exc:
            status, value = "gossip_error", str(exc)
        except BaseException as exc:  # report, so the parent fails with the real cause
            status, value = "error", f"{type(exc).__name__}: {exc}"
        # A scenario must leave no process group behind (the next one would fail to join).
        leaked = dist.is_initialized()
        if leaked:
            dist.destroy_process_group()
        results.put((job_id, rank, status, value, time.monotonic() - start, leaked))
    results.close()
    results.join_thread()  # flush, then skip the slow interpreter teardown
    os._exit(0)


class PeerPool:
    """WORLD spawned peer processes that run scenario functions on demand."""

    def __init__(self, port: int) -> None:
        self.port = port
        # forkserver: a clean server process (no threads, no process group) imports torch and
        # this module once, and every peer is forked from it, so starting peers costs ~nothing.
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(["torch", "torch.distributed", "numpy", __name__])
        self.results = self.ctx.Queue()
        self.procs: dict[int, Any] = {}
        self.jobs: dict[int, Any] = {}
        self._start(range(WORLD))

    def _start(self, ranks: Any) -> None:
        ready = {}
        for rank in ranks:
            self.jobs[rank], ready[rank] = self.ctx.Queue(), self.ctx.Event()
            args = (rank, self.jobs[rank], self.results, ready[rank])
            self.procs[rank] = self.ctx.Process(target=_worker_loop, args=args)
            self.procs[rank].start()
        # Wait for imports, or a fresh peer would miss short join timeouts in the scenarios.
        deadline = time.monotonic() + 60
        for rank, event in ready.items():
            while not event.wait(0.2):
                assert self.procs[rank].is_alive(), f"peer {rank} died while starting"
                assert time.monotonic() < deadline, f"peer {rank} did not start"

    def run(
        self, fn: Callable[..., Any], ranks: Any = range(WORLD), limit: float = 45, **kw: Any
    ) -> dict[int, tuple[str, Any, float]]:
        """Run ``fn(rank, port, **kw)`` on the given ranks; {rank: (status, value, seconds)}."""
        # Replace peers that died in an earlier scenario.
        self._start([r for r in range(WORLD) if not self.procs[r].is_alive()])
        job_id = uuid.uuid4().hex
        for rank in ranks:
            self.jobs[rank].put((job_id, fn, self.port, kw))
        out: dict[int, tuple[str, Any, float]] = {}
        deadline = time.monotonic() + limit
        while len(out) < len(ranks) and time.monotonic() < deadline:
            try:
                jid, rank, status, value, secs, leaked = self.results.get(timeout=0.5)
            except queue.Empty:
                # A peer that exits on purpose never reports: stop once it is gone.
                if all(r in out or not self.procs[r].is_alive() for r in ranks):
                    break
                continue
            if jid == job_id:
                assert status != "error", value
                assert not leaked, f"rank {rank} left a process group initialised"
                out[rank] = (status, value, secs)
        for rank in ranks:  # a peer stuck past the limit would poison the next scenario
            if rank not in out and self.procs[rank].is_alive():
                self.procs[rank].kill()
                self.procs[rank].join()
        return out

    def close(self) -> None:
        for rank, proc in self.procs.items():
            if proc.is_alive():
                self.jobs[rank].put(None)
        for proc in self.procs.values():
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


@pytest.fixture(scope="module")
def port() -> Any:
    store, actual = host_store(HOST, 0, timeout_s=60)
    assert actual > 0
    yield actual
    del store


@pytest.fixture(scope="module")
def peers(port: int) -> Any:
    pool = PeerPool(port)
    yield pool
    pool.close()


def unique(name: str) -> str:
    return f"test/{name}/{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------- peer scenarios


def scenario_ring_mix(rank: int, port: int, name: str) -> dict[str, Any]:
    x = make_block(rank)
    before = x.clone()
    with ring_group(rank, port, name) as group:
        mixed = group.mix(x)
    return {
        "mixed": mixed.numpy(),
        "input_unchanged": torch.equal(x, before),
        "initialized_after_close": dist.is_initialized(),
    }


def scenario_bytes(rank: int, port: int, name: str, steps: int) -> dict[str, Any]:
    out = {}
    x = make_block(rank)
    for enc in ("aes-256-gcm", "none"):
        for wire in ("fp32", "bf16"):  # successive groups in the same process
            tag = f"{name}/{enc}/{wire}"
            with ring_group(rank, port, tag, wire_dtype=wire, encryption=enc) as group:
                for _ in range(steps):
                    mixed = group.mix(x, block_id=7)
                out[enc, wire] = {"stats": asdict(group.stats), "mixed": mixed.numpy()}
    return out


def scenario_successive(rank: int, port: int, name: str) -> dict[str, Any]:
    x = make_block(rank)
    with ring_group(rank, port, f"{name}/ring") as group:
        ring = group.mix(x)
    first_closed = not dist.is_initialized()
    others = [j for j in range(WORLD) if j != rank]
    uniform = {j: 1.0 / WORLD for j in others}
    with GossipGroup(
        HOST,
        port,
        rank,
        WORLD,
        others,
        uniform,
        1.0 / WORLD,
        group_name=f"{name}/complete",
        store_key=RUN_KEY,
    ) as group:
        complete = group.mix(x)
    return {
        "ring": ring.numpy(),
        "complete": complete.numpy(),
        "closed": first_closed and not dist.is_initialized(),
    }


def _failing_mix(rank: int, port: int, name: str, x: torch.Tensor, **kw: Any) -> dict:
    before = x.clone().view(torch.int32)  # bitwise: NaN != NaN
    block_id = kw.pop("block_id", -1)
    try:
        with ring_group(rank, port, name, **kw) as group:
            group.mix(x, block_id=block_id)
            group.mix(x, block_id=block_id)
        outcome: dict[str, Any] = {"error": None}
    except GossipError as exc:
        outcome = {"error": str(exc)}
    outcome["input_unchanged"] = torch.equal(x.view(torch.int32), before)
    outcome["initialized"] = dist.is_initialized()
    return outcome


def scenario_mismatch(rank: int, port: int, name: str, bad: int) -> dict[str, Any]:
    out = {}
    size = NUMEL + 1 if rank == bad else NUMEL
    out["numel"] = _failing_mix(rank, port, f"{name}/numel", make_block(rank, size), block_id=3)
    block_id = 5 if rank == bad else 3
    out["block_id"] = _failing_mix(rank, port, f"{name}/block", make_block(rank), block_id=block_id)
    # After failures and close(), the same process must join a healthy group again.
    with ring_group(rank, port, f"{name}/after") as group:
        out["after"] = group.mix(make_block(rank)).numpy()
    return out


def scenario_nonfinite(rank: int, port: int, name: str, bad: int) -> dict[str, Any]:
    x = make_block(rank)
    if rank == bad:
        x[17] = float("nan")
        x[99] = float("inf")
    out = _failing_mix(rank, port, f"{name}/nan", x)
    with ring_group(rank, port, f"{name}/after") as group:
        out["after"] = group.mix(make_block(rank)).numpy()
    return out


def scenario_join_only(rank: int, port: int, name: str, timeout_s: float) -> str:
    ring_group(rank, port, name, timeout_s=timeout_s).close()
    return "joined"


def scenario_peer_dies(rank: int, port: int, name: str, victim: int) -> dict[str, Any]:
    x = make_block(rank)
    group = ring_group(rank, port, name, timeout_s=10)
    group.mix(x)
    if rank == victim:
        time.sleep(0.5)  # let neighbours finish reading step 1, then vanish without close()
        os._exit(1)
    start = time.monotonic()
    try:
        # Neighbours of the victim fail at step 2; rank 1 only once they have given up.
        for _ in range(3):
            group.mix(x)
        return {"error": None}
    except GossipError as exc:
        return {"error": str(exc), "seconds": time.monotonic() - start}
    finally:
        group.close()


def scenario_stuck_peer(rank: int, port: int, name: str, victim: int, timeout_s: float) -> dict:
    x = make_block(rank)
    with ring_group(rank, port, name, timeout_s=timeout_s) as group:
        group.mix(x)
        if rank == victim:
            time.sleep(timeout_s + 1)  # alive but silent: neighbours must time out
            return {"error": None}
        start = time.monotonic()
        try:
            for _ in range(3):  # rank 1 fails once its neighbours (0, 2) have given up
                group.mix(x)
            return {"error": None}
        except GossipError as exc:
            return {"error": str(exc), "seconds": time.monotonic() - start}


# ---------------------------------------------------------------------------- tests: peers


def test_ring_mix_matches_float64_reference_and_preserves_average(peers: PeerPool) -> None:
    res = peers.run(scenario_ring_mix, name=unique("ring"))
    blocks = {r: make_block(r) for r in range(WORLD)}
    x = np.stack([blocks[r].double().numpy() for r in range(WORLD)])
    expected = ring_matrix() @ x
    mixed = np.stack([res[r][1]["mixed"] for r in range(WORLD)])
    for r in range(WORLD):
        status, value, _ = res[r]
        assert status == "ok", value
        assert value["input_unchanged"] and not value["initialized_after_close"]
        np.testing.assert_allclose(mixed[r], expected[r], rtol=0, atol=1e-5)
        # Bit-exact against the documented order (what the in-process engine uses).
        nbrs, w, sw = ring_row(r)
        ref = loop_reference({j: blocks[j] for j in [*nbrs, r]}, {**w, r: sw})
        assert torch.equal(torch.from_numpy(mixed[r]), ref)
    # Invariant 5: mixing preserves the clients' average.
    np.testing.assert_allclose(mixed.astype(np.float64).mean(0), x.mean(0), rtol=0, atol=1e-6)


def test_bytes_accounting_fp32_and_bf16_wire(peers: PeerPool) -> None:
    steps, degree = 3, 2
    res = peers.run(scenario_bytes, name=unique("bytes"), steps=steps)
    x = np.stack([make_block(r).double().numpy() for r in range(WORLD)])
    expected = ring_matrix() @ x
    for r in range(WORLD):
        status, value, _ = res[r]
        assert status == "ok", value
        for enc, (wire, size) in product(("aes-256-gcm", "none"), (("fp32", 4), ("bf16", 2))):
            stats = value[enc, wire]["stats"]
            sealed = enc != "none"
            # Invariant 12: |B_k| elements per neighbour per step, nothing else.
            assert stats["bytes_sent"] == steps * NUMEL * size * degree
            assert stats["bytes_received"] == steps * NUMEL * size * degree
            assert stats["exchanges"] == steps
            assert stats["seconds"] > 0
            # On the wire: one 16-byte GCM tag per chunk (one chunk here) when sealed.
            wire_bytes = steps * (NUMEL * size + 16 * sealed) * degree
            assert stats["wire_bytes_sent"] == stats["wire_bytes_received"] == wire_bytes
            # One header per group, counted apart: 5 float64 (+ a tag) to each neighbour.
            assert stats["control_bytes"] == (5 * 8 + 16 * sealed) * degree
        for enc in ("aes-256-gcm", "none"):
            np.testing.assert_allclose(value[enc, "fp32"]["mixed"], expected[r], atol=1e-5)
            # bf16 wire: neighbours' terms carry bf16 rounding (relative 2^-8), self's not.
            scale = np.abs(x).max()
            np.testing.assert_allclose(value[enc, "bf16"]["mixed"], expected[r], atol=scale / 128)
            # Sealing changes nothing in what is mixed: bit for bit.
            for wire in ("fp32", "bf16"):
                plain, sealed_mix = value["none", wire]["mixed"], value[enc, wire]["mixed"]
                assert np.array_equal(plain.view(np.int32), sealed_mix.view(np.int32))


def test_two_successive_groups_in_the_same_processes(peers: PeerPool) -> None:
    res = peers.run(scenario_successive, name=unique("successive"))
    x = np.stack([make_block(r).double().numpy() for r in range(WORLD)])
    for r in range(WORLD):
        status, value, _ = res[r]
        assert status == "ok", value
        assert value["closed"]
        np.testing.assert_allclose(value["ring"], (ring_matrix() @ x)[r], atol=1e-5)
    # Invariant 3: complete graph with W = 11^T/n gives identical blocks on every client.
    complete = [res[r][1]["complete"] for r in range(WORLD)]
    for r in range(1, WORLD):
        assert np.array_equal(complete[0], complete[r])
    np.testing.assert_allclose(complete[0], x.mean(0), atol=1e-6)


def test_mismatched_block_is_reported_by_neighbour_rank(peers: PeerPool) -> None:
    bad = 2
    res = peers.run(scenario_mismatch, name=unique("mismatch"), bad=bad)
    for r in range(WORLD):
        status, value, _ = res[r]
        assert status == "ok", value
        for case in ("numel", "block_id"):
            outcome = value[case]
            assert outcome["error"] is not None, f"rank {r} {case}: no error"
            assert outcome["input_unchanged"] and not outcome["initialized"]
        assert value["after"].shape == (NUMEL,)
    for r in (1, 3):  # bad rank's neighbours name it, with expected vs got
        numel_msg = res[r][1]["numel"]["error"]
        assert f"neighbour rank {bad}" in numel_msg
        assert f"{NUMEL + 1} elements" in numel_msg and f"{NUMEL} elements" in numel_msg
        block_msg = res[r][1]["block_id"]["error"]
        assert f"neighbour rank {bad} is on block 5" in block_msg
        assert "expected block 3" in block_msg
    bad_msg = res[bad][1]["numel"]["error"]
    assert "neighbour rank 1" in bad_msg and "neighbour rank 3" in bad_msg


def test_non_finite_block_is_reported_by_neighbour_rank(peers: PeerPool) -> None:
    bad = 1
    res = peers.run(scenario_nonfinite, name=unique("nonfinite"), bad=bad)
    for r in range(WORLD):
        status, value, _ = res[r]
        assert status == "ok", value
        assert value["input_unchanged"] and not value["initialized"]
        assert np.isfinite(value["after"]).all()
    for r in (0, 2):
        assert f"neighbour rank {bad} sent 2 non-finite values" in res[r][1]["error"]
    assert "own block has 2 non-finite values" in res[bad][1]["error"]


def test_peer_that_never_joins_fails_within_timeout(peers: PeerPool) -> None:
    timeout_s = 3.0
    res = peers.run(scenario_join_only, ranks=[0, 1, 2], name=unique("nojoin"), timeout_s=timeout_s)
    for r in (0, 1, 2):
        status, msg, secs = res[r]
        assert status == "gossip_error", msg
        assert "ranks [3] never joined" in msg and "gossip.timeout_s" in msg
        assert secs < timeout_s + 5


def test_peer_dying_mid_way_is_named_without_waiting_for_timeout(peers: PeerPool) -> None:
    victim = 3
    res = peers.run(scenario_peer_dies, name=unique("dies"), victim=victim)
    assert victim not in res
    for r in (0, 1, 2):
        status, value, _ = res[r]
        assert status == "ok", value
        assert value["error"] is not None and value["seconds"] < 10  # not the 10 s timeout
    for r in (0, 2):
        assert f"neighbour rank {victim}" in res[r][1]["error"]


def test_stuck_peer_times_out(peers: PeerPool) -> None:
    victim, timeout_s = 3, 3.0
    res = peers.run(scenario_stuck_peer, name=unique("stuck"), victim=victim, timeout_s=timeout_s)
    for r in (0, 2):
        status, value, _ = res[r]
        assert status == "ok", value
        assert f"neighbour rank {victim}" in value["error"]
        assert "gossip.timeout_s" in value["error"]
        assert value["seconds"] < timeout_s + 5
    assert res[1][1]["error"] is not None  # its neighbours gave up, so it cannot go on


# ---------------------------------------------------------------------------- tests: CUDA peers
# Run where a GPU is lent; skipped elsewhere. One GPU: every peer shares it, so blocks on the GPU
# travel through Gloo's pinned host staging, and NCCL must refuse with a clear message (NCCL
# itself rejects two ranks on one device). NCCL's own path needs one GPU per peer.

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def scenario_cuda_mix(rank: int, port: int, name: str, backend: str) -> dict[str, Any]:
    device = torch.device("cuda", rank % torch.cuda.device_count())
    x = make_block(rank).to(device)
    with ring_group(rank, port, name, backend=backend, device=device) as group:
        mixed = group.mix(x)
        used = group.backend
    return {"mixed": mixed.cpu().numpy(), "device": str(mixed.device), "backend": used}


def _check_cuda_ring(res: dict[int, tuple[str, Any, float]], backend: str) -> None:
    x = np.stack([make_block(r).double().numpy() for r in range(WORLD)])
    expected = ring_matrix() @ x
    for r in range(WORLD):
        status, value, _ = res[r]
        assert status == "ok", value
        assert value["backend"] == backend and value["device"].startswith("cuda")
        np.testing.assert_allclose(value["mixed"], expected[r], rtol=0, atol=1e-5)


@needs_cuda
def test_cuda_blocks_mix_through_gloo_staging(peers: PeerPool) -> None:
    res = peers.run(scenario_cuda_mix, name=unique("cuda-gloo"), backend="gloo", limit=120)
    _check_cuda_ring(res, "gloo")


@needs_cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() >= WORLD,
    reason="peers share a GPU only when there are fewer GPUs than peers",
)
def test_nccl_refuses_peers_that_share_a_gpu(peers: PeerPool) -> None:
    res = peers.run(scenario_cuda_mix, name=unique("nccl-shared"), backend="nccl", limit=120)
    for r in range(WORLD):
        status, value, _ = res[r]
        assert status == "gossip_error", value
        assert "share GPU" in value and "gossip.backend=gloo" in value


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < WORLD,
    reason=f"NCCL needs one GPU per peer ({WORLD})",
)
def test_nccl_ring_mix_matches_float64_reference(peers: PeerPool) -> None:
    res = peers.run(scenario_cuda_mix, name=unique("nccl"), backend="nccl", limit=120)
    _check_cuda_ring(res, "nccl")


# ---------------------------------------------------------------------------- tests: in-process


def test_choose_backend() -> None:
    assert choose_backend("auto", "cpu") == "gloo"
    assert choose_backend("GLOO", torch.device("cpu")) == "gloo"
    if not dist.is_nccl_available():
        assert choose_backend("auto", "cuda") == "gloo"
    with pytest.raises(ValueError, match="gossip.backend"):
        choose_backend("mpi")
    with pytest.raises(ValueError, match="gossip.backend"):
        choose_backend("nccl", "cpu")


def test_resolve_wire_dtype() -> None:
    assert resolve_wire_dtype(None) is torch.float32
    assert resolve_wire_dtype("bf16") is torch.bfloat16
    assert resolve_wire_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="algorithm.wire_dtype"):
        resolve_wire_dtype("int8")
    with pytest.raises(ValueError, match="algorithm.wire_dtype"):
        resolve_wire_dtype(torch.float64)


def test_mix_blocks_is_the_documented_loop() -> None:
    blocks = {r: make_block(r) for r in (3, 0, 2)}
    weights = {0: 0.2, 2: 0.3, 3: 0.5}
    ref = loop_reference(blocks, weights)
    assert torch.equal(mix_blocks(blocks, weights), ref)
    out = torch.full((NUMEL,), 7.0)
    assert mix_blocks(blocks, weights, out=out) is out and torch.equal(out, ref)
    with pytest.raises(ValueError, match="weights cover"):
        mix_blocks(blocks, {0: 1.0})


@pytest.mark.parametrize(
    ("nbrs", "weights", "self_w", "match"),
    [
        ([1], {1: 0.5}, 0.6, "sum to"),
        ([0], {0: 0.5}, 0.5, "itself"),
        ([1], {2: 0.5}, 0.5, "weights are given"),
        ([1, 1], {1: 0.5}, 0.5, "duplicate"),
        ([1], {1: -0.5}, 1.5, "non-negative"),
    ],
)
def test_bad_rows_are_rejected_before_any_network(
    nbrs: list[int], weights: dict[int, float], self_w: float, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        GossipGroup(HOST, 1, 0, 3, nbrs, weights, self_w, group_name="unused")


def test_single_peer_group_in_process(port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    x = make_block(0)
    solo = {"group_name": unique("solo"), "store_key": RUN_KEY}
    with GossipGroup(HOST, port, 0, 1, [], {}, 1.0, **solo) as group:
        assert torch.equal(group.mix(x), x)  # W = [[1]]: mixing is the identity
        assert group.stats.bytes_sent == 0 and group.stats.exchanges == 1
        with pytest.raises(ValueError, match="alias"):
            group.mix(x, out=x)
        with pytest.raises(ValueError, match="float32"):
            group.mix(x.double())
        with pytest.raises(GossipError, match="already has a process group"):
            GossipGroup(
                HOST, port, 0, 1, [], {}, 1.0, group_name=unique("solo2"), store_key=RUN_KEY
            )
    assert not dist.is_initialized()
    with pytest.raises(GossipError, match="closed"):
        group.mix(x)


def test_unreachable_store_fails_fast() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind((HOST, 0))
        free = sock.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(GossipError, match="gossip.timeout_s"):
        GossipGroup(
            HOST, free, 0, 2, [1], {1: 0.5}, 0.5, group_name="x", timeout_s=1, store_key=RUN_KEY
        )
    assert time.monotonic() - start < 10


def test_asymmetric_w_is_reported_at_join(port: int) -> None:
    name, errors = unique("asym"), {}
    rows = {0: ({1: 0.5}, 0.5), 1: ({0: 0.4}, 0.6)}

    def join(rank: int) -> None:  # the W check runs before init_process_group: threads suffice
        try:
            w, sw = rows[rank]
            GossipGroup(
                HOST,
                port,
                rank,
                2,
                list(w),
                w,
                sw,
                group_name=name,
                timeout_s=10,
                store_key=RUN_KEY,
            )
        except GossipError as exc:
            errors[rank] = str(exc)

    threads = [threading.Thread(target=join, args=(r,)) for r in rows]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert "rank 1 uses w=0.4 for edge (1,0)" in errors[0]
    assert "rank 0 uses w=0.5 for edge (0,1)" in errors[1]
    assert not dist.is_initialized()


def test_duplicate_rank_or_reused_group_name(port: int) -> None:
    name = unique("dup")
    master, _ = host_store(HOST, 0, timeout_s=5)
    dist.PrefixStore(name, master).add("deca-gossip/claim/0", 1)  # someone already joined as 0
    with pytest.raises(GossipError, match="2 times"):  # plaintext store: a counter
        GossipGroup(
            HOST,
            master.port,
            0,
            2,
            [1],
            {1: 0.5},
            0.5,
            group_name=name,
            timeout_s=5,
            encryption="none",
        )
    # Authenticated store: a valid claim (made with the run key) by another member.
    name = unique("dup-auth")
    other = AuthenticatedStore(
        dist.PrefixStore(name, master), bytes.fromhex(RUN_KEY), 0, name, timeout_s=5
    )
    other.compare_set("deca-gossip/claim/0", "", "someone else")
    with pytest.raises(GossipError, match="2 times"):
        GossipGroup(
            HOST,
            master.port,
            0,
            2,
            [1],
            {1: 0.5},
            0.5,
            group_name=name,
            timeout_s=5,
            store_key=RUN_KEY,
        )


def test_no_keys_refuses_to_send() -> None:
    """Fail closed: encryption is the default, and without the run key nothing is sent."""
    with pytest.raises(GossipError, match="refusing to send.*gossip.encryption=none"):
        GossipGroup(HOST, 1, 0, 2, [1], {1: 0.5}, 0.5, group_name="nokeys", timeout_s=1)
    with pytest.raises(ValueError, match="gossip.encryption"):
        GossipGroup(HOST, 1, 0, 2, [1], {1: 0.5}, 0.5, group_name="x", encryption="rot13")
