"""Compressed gossip: codec error bounds, CHOCO error feedback, byte counts, and the
in-process engine against multi-process nodes (real Gloo groups) per wire format."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_config
from test_gossip import (
    HOST,
    NUMEL,
    RUN_KEY,
    WORLD,
    PeerPool,
    host_store,
    make_block,
    ring_group,
    ring_matrix,
    unique,
)

from deca_flower.compression import (
    CastCodec,
    ChocoMixer,
    ChocoState,
    Int8Codec,
    TopKCodec,
    make_codec,
)
from deca_flower.config import ConfigError
from deca_flower.gossip import GossipError, WireChunk
from deca_flower.secure_channel import TAG_BYTES

SIZES = (1, 255, 256, 1000, 4099)


def _vector(n: int, seed: int = 0, scale: float = 0.05) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * scale
    if n > 300:
        x[7] = 3.0  # an outlier: only its own chunk's scale may suffer
        x[260:280] = 0.0
    return x


def _int8_reference(x: np.ndarray, chunk: int) -> np.ndarray:
    """Per-chunk absmax int8, written independently in numpy float32."""
    out = np.empty_like(x, dtype=np.float32)
    for start in range(0, len(x), chunk):
        c = x[start : start + chunk].astype(np.float32)
        scale = np.float32(np.abs(c).max()) / np.float32(127)
        q = np.zeros_like(c) if scale == 0 else np.clip(np.round(c / scale), -127, 127)
        out[start : start + chunk] = q.astype(np.float32) * scale
    return out


# ---------------------------------------------------------------------------- codecs


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", ["none", "float32", "bf16", "int8", "topk"])
def test_wire_size_is_the_encoded_size(name: str, n: int) -> None:
    codec = make_codec(name, chunk_size=256, topk_fraction=0.01)
    wire = codec.encode(_vector(n))
    assert wire.dim() == 1 and wire.is_contiguous() and wire.dtype == codec.wire_dtype
    assert wire.numel() == codec.wire_numel(n)
    assert codec.wire_bytes(n) == wire.numel() * wire.element_size()
    expected = {
        "none": 4 * n,
        "float32": 4 * n,
        "bf16": 2 * n,
        "int8": n + 4 * math.ceil(n / 256),
        "topk": 8 * math.ceil(0.01 * n),
    }[name]
    assert codec.wire_bytes(n) == expected


@pytest.mark.parametrize("n", SIZES)
def test_cast_error_bounds(n: int) -> None:
    x = _vector(n)
    assert torch.equal(CastCodec(torch.float32).decode(CastCodec(torch.float32).encode(x), n), x)
    bf16 = CastCodec(torch.bfloat16)
    err = (bf16.decode(bf16.encode(x), n) - x).abs()
    assert bool((err <= x.abs() * 2.0**-8).all())  # round to nearest, 8 significant bits


@pytest.mark.parametrize("chunk", [1, 64, 256])
@pytest.mark.parametrize("n", SIZES)
def test_int8_matches_reference_and_bound(n: int, chunk: int) -> None:
    x = _vector(n, seed=n)
    codec = Int8Codec(chunk)
    got = codec.decode(codec.encode(x), n).numpy()
    np.testing.assert_array_equal(got, _int8_reference(x.numpy(), chunk))
    # Documented bound: |error| <= max|x_chunk| / 254 per element (+ fp32 rounding).
    xs = x.numpy()
    for start in range(0, n, chunk):
        amax = np.abs(xs[start : start + chunk]).max()
        err = np.abs(got[start : start + chunk] - xs[start : start + chunk])
        assert err.max() <= amax / 254 * (1 + 1e-6) + 1e-12


@pytest.mark.parametrize("n", [1, 1000, 4099])
def test_topk_keeps_the_largest_entries_exactly(n: int) -> None:
    x = _vector(n, seed=3)
    codec = TopKCodec(0.05)
    got = codec.decode(codec.encode(x), n).numpy()
    k = math.ceil(0.05 * n)
    keep = np.argsort(-np.abs(x.numpy()), kind="stable")[:k]
    expected = np.zeros(n, dtype=np.float32)
    expected[keep] = x.numpy()[keep]
    np.testing.assert_array_equal(got, expected)


def test_config_validates_compression(make_config) -> None:
    assert make_config().gossip.compression == "none"
    with pytest.raises(ConfigError, match="gossip.compression"):
        make_config(**{"gossip.compression": "int4"})
    with pytest.raises(ConfigError, match="algorithm.wire_dtype"):
        make_config(**{"gossip.compression": "int8", "algorithm.wire_dtype": "model"})
    with pytest.raises(ConfigError, match="gossip.consensus_step"):
        make_config(**{"gossip.consensus_step": 1.5})
    with pytest.raises(ConfigError, match="gossip.chunk_size"):
        make_config(**{"gossip.chunk_size": 0})
    with pytest.raises(ConfigError, match="gossip.compression"):
        make_config(algorithm="decaf", **{"gossip.compression": "bf16"})


# ---------------------------------------------------------------------------- error feedback


def test_error_feedback_keeps_the_error_of_a_random_walk_bounded() -> None:
    """One node tracking a moving block: with EF the public copy stays within one step's
    quantisation error; summing compressed increments without EF drifts away."""
    n, steps, step_size = 2048, 400, 1e-3
    codec = Int8Codec(256)
    gen = torch.Generator().manual_seed(0)
    x = _vector(n)
    x_hat, naive = x.clone(), x.clone()
    worst = 0.0
    for _ in range(steps):
        step = torch.randn(n, generator=gen) * step_size
        naive += codec.decode(codec.encode(step), n)  # no error feedback
        x = x + step
        diff = x - x_hat
        x_hat = x_hat + codec.decode(codec.encode(diff), n)
        # Independent bound: the reference quantiser's worst error on this difference.
        bound = float(np.abs(_int8_reference(diff.numpy(), 256) - diff.numpy()).max())
        err = float((x - x_hat).abs().max())
        assert err <= bound + 2 * 2.0**-24 * float(x.abs().max())  # + fp32 rounding of x_hat
        worst = max(worst, err)
    assert worst <= 6 * step_size / 254  # |diff| <= |step| + previous error, step ~ N(0, 1e-3)
    assert float((x - naive).abs().max()) > 5 * worst  # the test can tell EF from no EF


def _choco_run(weights: np.ndarray, steps: int, gamma: float = 1.0) -> dict[str, Any]:
    """Clients on a ring: local noisy steps, then CHOCO mixing through the module."""
    n_clients, numel = weights.shape[0], 1024
    codec = Int8Codec(128)
    gen = torch.Generator().manual_seed(5)
    x = [_vector(numel, seed=0) for _ in range(n_clients)]  # identical start (DECA's setting)
    exact = np.stack([v.double().numpy() for v in x])
    mixers = [
        ChocoMixer(
            codec,
            i,
            {j: float(weights[i, j]) for j in range(n_clients) if weights[i, j] > 0},
            ChocoState.start(x[i]),
            gamma,
        )
        for i in range(n_clients)
    ]
    gaps, perturbations = [], []
    for _ in range(steps):
        updates = [torch.randn(numel, generator=gen) * 1e-3 for _ in range(n_clients)]
        half = [xi + u for xi, u in zip(x, updates)]
        wires = [m.encode(h) for m, h in zip(mixers, half)]
        new = []
        for i, m in enumerate(mixers):
            received = {j: wires[j] for j in range(n_clients) if j != i and weights[i, j] > 0}
            new.append(m.combine(half[i], m.decode(wires[i], received, numel)))
        half64 = np.stack([h.double().numpy() for h in half])
        new64 = np.stack([v.double().numpy() for v in new])
        # Invariant 5 survives compression: the clients' average is that of x_half.
        np.testing.assert_allclose(new64.mean(0), half64.mean(0), atol=1e-6)
        perturbations.append(np.linalg.norm(new64 - weights @ half64))
        exact = weights @ (exact + np.stack([u.double().numpy() for u in updates]))
        gaps.append(np.linalg.norm(new64 - exact))
        x = new
    return {"gaps": gaps, "perturbations": perturbations}


def test_choco_stays_within_a_bounded_distance_of_exact_mixing() -> None:
    """D_t = x_choco - x_exact obeys D_{t+1} = W D_t + P_t with P_t zero-sum over clients,
    so ||D_t|| <= max_s ||P_s|| / (1 - lambda_2): no accumulation (independent float64)."""
    weights = ring_matrix(6)
    run = _choco_run(weights, steps=150)
    eig = np.sort(np.abs(np.linalg.eigvalsh(weights)))[::-1]
    bound = max(run["perturbations"]) / (1 - eig[1])
    assert max(run["gaps"]) <= bound * (1 + 1e-3) + 1e-5
    # Each perturbation is a one-step quantisation error: far below one step (~1e-3 * sqrt).
    assert max(run["perturbations"]) < 1e-3 * math.sqrt(6 * 1024) / 50


def _choco_through_membership_changes(restart: bool, steps: int = 12) -> list[float]:
    """Six ring clients mix one block through `ChocoGossip` (the engine's path) while rank 2
    is lost (phase 2) and healed (phase 3, copying its donor's block, as `heal.py` does).
    Returns, per step, how far the mix moved the members' mean (float64 norm)."""
    import networkx as nx

    from deca_flower.membership import full_membership, heal_donor, with_members, without
    from deca_flower.mixing import ChocoGossip
    from deca_flower.topology import mixing_matrix

    graph = nx.cycle_graph(6)
    full_w = mixing_matrix(graph)
    mixer = ChocoGossip(Int8Codec(128))
    gen = torch.Generator().manual_seed(3)
    x = {i: _vector(1024) for i in range(6)}  # identical start
    full = full_membership(graph, full_w)
    lost = without(full, {2}, graph, "metropolis", 2)
    healed = with_members(lost, set(range(6)), graph, full_w, "metropolis")
    means = []
    for phase, m in enumerate([full, full, lost, healed]):
        if phase == 3:  # the heal: rank 2 takes its donor's block, without CHOCO state
            x[2] = x[heal_donor(2, lost, graph)].clone()
            mixer.forget(2, [0])
        members = m.members if restart else full.members  # the control keeps stale state
        blocks = {i: x[i] for i in m.members}
        mixer.begin_block(0, blocks, members=members, first_phase=phase == 0)
        for _ in range(steps):
            half = {i: v + torch.randn(1024, generator=gen) * 1e-3 for i, v in blocks.items()}
            mixed = mixer.mix_in_process(m.weights, half, torch.float32)
            before = torch.stack(list(half.values())).double().mean(0)
            after = torch.stack(list(mixed.values())).double().mean(0)
            means.append(float((after - before).norm()))
            blocks = mixed
        x.update(blocks)
    return means


def test_choco_state_restarts_when_members_change() -> None:
    """Invariant 5 (mixing keeps the members' average) holds through a lost and a healed
    site only because every member restarts its CHOCO state on a new W: the stale c_i
    still sums over the old matrix, and the control shows the average drifting."""
    step = 1e-3 * math.sqrt(1024)  # one client's local update, in norm
    assert max(_choco_through_membership_changes(restart=True)) < 1e-4 * step  # fp32 rounding
    stale = _choco_through_membership_changes(restart=False)
    assert max(stale[:24]) < 1e-4 * step  # phases 0 and 1: the same W, the state holds
    assert min(stale[24:]) > 1e-2 * step  # phases 2 and 3: c_i sums over the old W


# ---------------------------------------------------------------------------- engine vs nodes


def _settings(compression: str, overlap: bool, encryption: str = "aes-256-gcm") -> dict[str, Any]:
    return {
        "num_clients": WORLD,
        "gossip.encryption": encryption,
        "train.rounds": 2,  # two phases per block: the CHOCO state crosses the state store
        "gossip.compression": compression,
        "gossip.overlap": overlap,
        "gossip.chunk_size": 64,
        "gossip.topk_fraction": 0.1,
        "eval.average_model": False,
    }


def scenario_nodes(
    rank: int, port: int, name: str, root: str, settings: dict, restart: bool
) -> dict[str, Any]:
    """One node through all phases of a run, as the Flower coordinator would drive it."""
    from deca_flower.blocks import block_order
    from deca_flower.node import Node, PhasePlan
    from deca_flower.task import build_topology
    from deca_flower.topology import neighbours

    cfg = tiny_config(Path(root), **settings)
    graph, weights = build_topology(cfg)
    row = neighbours(graph, rank)
    state_dir = Path(root) / f"node{rank}"
    node = Node(cfg, rank, state_dir)
    losses, sent, overlapped, phase = [], 0, 0.0, 0
    for t in range(cfg.train.rounds):
        for k in block_order(4, cfg.train.block_order, t, cfg.seed):
            plan = PhasePlan(
                phase, t, [k], cfg.train.steps_per_block, HOST, port, f"{name}/p{phase}",
                rank, WORLD, row, [float(weights[rank, j]) for j in row],
                float(weights[rank, rank]), store_key=RUN_KEY,
            )  # fmt: skip
            stats = node.run_phase(plan)
            losses.append(stats["loss"])
            sent += stats["bytes_sent"]
            overlapped += stats["overlapped_s"]
            phase += 1
            if restart:  # a fresh process serves the node next time: all from the store
                node = Node(cfg, rank, state_dir)
    params = {n: p.detach().clone().numpy() for n, p in node.peer.model.named_parameters()}
    return {"losses": losses, "params": params, "sent": sent, "overlapped": overlapped}


@pytest.fixture(scope="module")
def node_pool() -> Any:
    store, port = host_store(HOST, 0, timeout_s=120)
    pool = PeerPool(port)
    yield pool
    pool.close()
    del store


def _run_nodes(pool: PeerPool, tmp: Path, settings: dict, restart: bool = False) -> dict:
    res = pool.run(
        scenario_nodes, limit=300, name=unique("nodes"), root=str(tmp), settings=settings,
        restart=restart,
    )  # fmt: skip
    for r in range(WORLD):
        assert res[r][0] == "ok", res[r][1]
    return {r: res[r][1] for r in range(WORLD)}


@pytest.mark.parametrize(
    ("compression", "restart", "encryption"),
    [
        ("none", False, "aes-256-gcm"),
        ("float32", False, "aes-256-gcm"),
        ("bf16", False, "aes-256-gcm"),
        ("int8", True, "aes-256-gcm"),
        ("topk", True, "aes-256-gcm"),
        ("int8", True, "none"),
    ],
)
def test_engine_equals_multiprocess_nodes_per_format(
    node_pool: PeerPool, tmp_path: Path, compression: str, restart: bool, encryption: str
) -> None:
    from deca_flower.engine import Engine

    settings = _settings(compression, overlap=False, encryption=encryption)
    nodes = _run_nodes(node_pool, tmp_path / "nodes", settings, restart)
    engine = Engine(tiny_config(tmp_path / "engine", **settings))
    result = engine.run()
    steps = [r["loss"] for r in result.records if r["type"] == "step"]
    phases = [r for r in result.records if r["type"] == "phase"]
    node_steps = [[nodes[r]["losses"][s // 2][s % 2] for r in range(WORLD)] for s in range(16)]
    if compression == "none":  # the engine mixes with one matmul: rounding differs
        np.testing.assert_allclose(node_steps, steps, rtol=1e-5, atol=1e-6)
    else:  # same code, same order: bit for bit
        assert node_steps == steps
    for r, peer in enumerate(engine.peers):
        for name, p in peer.model.named_parameters():
            got = nodes[r]["params"][name]
            if compression == "none":
                np.testing.assert_allclose(got, p.detach().numpy(), rtol=0, atol=1e-5)
            else:
                np.testing.assert_array_equal(got, p.detach().numpy(), err_msg=name)
        # Byte counters: exactly the encoded messages (2 neighbours, 2 steps, 8 phases).
        wire = make_codec(compression, chunk_size=64, topk_fraction=0.1)
        expected = sum(wire.wire_bytes(ph["block_numel"]) * 2 * 2 for ph in phases)
        assert nodes[r]["sent"] == expected == sum(ph["bytes_sent"][r] for ph in phases)


@pytest.mark.parametrize("compression", ["none", "int8"])
def test_overlap_is_bit_identical(node_pool: PeerPool, tmp_path: Path, compression: str) -> None:
    off = _run_nodes(node_pool, tmp_path / "off", _settings(compression, overlap=False))
    on = _run_nodes(node_pool, tmp_path / "on", _settings(compression, overlap=True))
    for r in range(WORLD):
        assert on[r]["losses"] == off[r]["losses"]
        for name, value in off[r]["params"].items():
            np.testing.assert_array_equal(on[r]["params"][name], value, err_msg=name)
        assert on[r]["overlapped"] > 0 and off[r]["overlapped"] == 0


# ---------------------------------------------------------------------------- sealed wires


SEAL_CHUNK = 256  # bytes per sealed chunk: several chunks per wire tensor here


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int32).numpy().copy()


def scenario_sealed_choco(
    rank: int, port: int, name: str, compression: str, encryption: str, tamper: bool
) -> dict[str, Any]:
    """Two CHOCO steps over exchange_wire; rank 0 may flip a bit of its step-1 chunk 1 to 1."""
    codec = make_codec(compression, chunk_size=64, topk_fraction=0.1)
    x = make_block(rank)
    # x_hat = 0, so even the first message carries the block (a non-trivial wire).
    state = ChocoState(torch.zeros(NUMEL), torch.zeros(NUMEL))
    nbrs = sorted({(rank - 1) % WORLD, (rank + 1) % WORLD})
    weights = {**{j: 1.0 / 3.0 for j in nbrs}, rank: 1.0 / 3.0}
    mixer = ChocoMixer(codec, rank, weights, state)
    sealed: list[bytes] = []

    def tap(part: WireChunk) -> bytes | None:
        if part.kind != "block":
            return None
        sealed.append(bytes(part.data))
        if tamper and (part.sender, part.receiver, part.step, part.chunk) == (0, 1, 1, 1):
            part.data[7] ^= 0x01
        return None

    kw: dict[str, Any] = {"encryption": encryption, "codec": codec, "chunk_bytes": SEAL_CHUNK}
    if encryption != "none":
        kw["tap"] = tap
    out: dict[str, Any] = {"blocks": [], "wires": [], "error": None, "during": 0}

    def during() -> None:
        out["during"] += 1

    with ring_group(rank, port, name, **kw) as g:
        for _ in range(2):
            wire = mixer.encode(x)
            out["wires"].append(bytes(wire.numpy()))
            before = [_bits(t) for t in state.tensors().values()]
            try:
                received = g.exchange_wire(wire, numel=NUMEL, block_id=3, during=during)
            except GossipError as exc:
                out["error"] = str(exc)
                after = [_bits(t) for t in state.tensors().values()]
                out["state_unchanged"] = all(map(np.array_equal, before, after))
                break
            x = mixer.combine(x, mixer.decode(wire, received, NUMEL))
            out["blocks"].append(_bits(x))
        out["bytes"] = (g.stats.bytes_sent, g.stats.bytes_received)
        out["wire_bytes"] = (g.stats.wire_bytes_sent, g.stats.wire_bytes_received)
    out["sealed"] = sealed
    return out


@pytest.fixture(scope="module")
def sealed_results(node_pool: PeerPool) -> dict[tuple[str, str, bool], dict[int, Any]]:
    runs = {}
    for compression in ("int8", "topk"):
        for encryption, tamper in (("aes-256-gcm", False), ("none", False), ("aes-256-gcm", True)):
            res = node_pool.run(
                scenario_sealed_choco, limit=120, name=unique(f"sealed-{compression}"),
                compression=compression, encryption=encryption, tamper=tamper,
            )  # fmt: skip
            for r in range(WORLD):
                assert res[r][0] == "ok", res[r][1]
            runs[compression, encryption, tamper] = {r: res[r][1] for r in range(WORLD)}
    return runs


@pytest.mark.parametrize("compression", ["int8", "topk"])
def test_sealed_compressed_wire_equals_plaintext_and_counts_tags(
    sealed_results: dict, compression: str
) -> None:
    sealed = sealed_results[compression, "aes-256-gcm", False]
    plain = sealed_results[compression, "none", False]
    wire = make_codec(compression, chunk_size=64, topk_fraction=0.1).wire_bytes(NUMEL)
    chunks = math.ceil(wire / SEAL_CHUNK)
    for r in range(WORLD):
        assert sealed[r]["error"] is None and plain[r]["error"] is None
        for a, b in zip(sealed[r]["blocks"], plain[r]["blocks"], strict=True):
            np.testing.assert_array_equal(a, b)
        assert sealed[r]["during"] == plain[r]["during"] == 2  # overlap callback ran each step
        payload = wire * 2 * 2  # 2 neighbours, 2 steps: the encoded size, sealed or not
        assert sealed[r]["bytes"] == plain[r]["bytes"] == (payload, payload)
        assert plain[r]["wire_bytes"] == (payload, payload)
        tagged = payload + TAG_BYTES * chunks * 2 * 2
        assert sealed[r]["wire_bytes"] == (tagged, tagged)


@pytest.mark.parametrize("compression", ["int8", "topk"])
def test_sealed_compressed_wire_never_reaches_the_socket_in_plaintext(
    sealed_results: dict, compression: str
) -> None:
    for r, res in sealed_results[compression, "aes-256-gcm", False].items():
        on_wire = b"".join(res["sealed"])
        assert len(res["sealed"]) == 2 * 2 * math.ceil(len(res["wires"][0]) / SEAL_CHUNK)
        for wire in res["wires"]:
            windows = {wire[o : o + 16] for o in range(0, len(wire) - 16, 16)}
            assert not any(w in on_wire for w in windows), f"rank {r}: plaintext on the wire"


@pytest.mark.parametrize("compression", ["int8", "topk"])
def test_tampered_compressed_chunk_is_rejected_before_any_mix(
    sealed_results: dict, compression: str
) -> None:
    clean = sealed_results[compression, "aes-256-gcm", False]
    attacked = sealed_results[compression, "aes-256-gcm", True]
    victim = attacked[1]
    assert victim["error"] is not None, "the altered chunk was accepted"
    assert "block from neighbour rank 0" in victim["error"]
    assert "fails AES-256-GCM authentication" in victim["error"]
    assert victim["state_unchanged"]  # decode/combine never ran: CHOCO state untouched
    np.testing.assert_array_equal(victim["blocks"][0], clean[1]["blocks"][0])
    assert len(victim["blocks"]) == 1


def test_ef_state_is_staged_committed_and_rolled_back_with_its_block(tmp_path: Path) -> None:
    from deca_flower.state_store import NodeStateStore

    store = NodeStateStore(tmp_path)
    params = [("w", torch.ones(3))]

    def phase(p: int, value: float) -> dict[str, torch.Tensor]:
        state = {"x_hat": torch.full((3,), value), "consensus": torch.full((3,), -value)}
        store.stage_block(2, params, p, extra={"stream": {}}, state=state)
        return state

    phase(0, 1.0)
    assert store.block_state(2) is None  # staged only: nothing committed yet
    store.commit_staged()
    phase(1, 2.0)
    store.discard_staged()  # a failed phase: the committed state stays phase 0's
    assert float(store.block_state(2)["x_hat"][0]) == 1.0
    phase(1, 3.0)
    store.commit_staged()
    assert float(store.block_state(2)["consensus"][0]) == -3.0
    assert store.rollback_to(0) == [2]
    state = store.block_state(2)
    assert float(state["x_hat"][0]) == 1.0 and float(state["consensus"][0]) == -1.0
    store.rollback_to(-1)  # before the block's first commit: no state, a fresh start
    assert store.block_state(2) is None
