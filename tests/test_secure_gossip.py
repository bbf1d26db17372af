"""Data-plane security: every attack of issue 11 items 2-3 against real Gloo peer processes.

An on-path attacker is played by the sender's ``tap`` (it sees exactly the bytes handed to
Gloo and may replace them); a non-member is played by the test process writing into the
coordinator's store without the run key. Each test asserts the error, the neighbour (or key
and rank) it names, and that the receiver's state is bit-identical to before the attack.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from test_gossip import HOST, RUN_KEY, WORLD, PeerPool, make_block, ring_matrix, ring_row, unique

from deca_flower import secure_channel
from deca_flower.gossip import GossipError, GossipGroup, WireChunk, host_store
from deca_flower.secure_channel import (
    KIND_PAYLOAD,
    AuthenticatedStore,
    ChunkContext,
    ChunkSealer,
    EdgeKeys,
    SealedOpenError,
    StoreAuthError,
    run_fingerprint,
)

NUMEL = 1000  # 4000 bytes: four sealed chunks of CHUNK bytes (the last one shorter)
CHUNK = 1024
ATTACKER, VICTIM = 0, 1  # rank 0's messages to rank 1 are altered on the path
STEP = 1  # the attacked exchange (step 0 goes through untouched)
WRONG_KEY = "99" * 32


def group(rank: int, port: int, name: str, **kw: Any) -> GossipGroup:
    nbrs, w, sw = ring_row(rank)
    kw.setdefault("timeout_s", 10)
    kw.setdefault("store_key", RUN_KEY)
    kw.setdefault("chunk_bytes", CHUNK)
    return GossipGroup(HOST, port, rank, WORLD, nbrs, w, sw, group_name=name, **kw)


def bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int32).numpy().copy()


# ---------------------------------------------------------------------------- on-path attacks


class Attack:
    """A tap on rank ATTACKER that alters what it sends to VICTIM at the attacked step."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.captured: dict[tuple[int, int], bytes] = {}  # (step, chunk) -> sealed bytes

    def __call__(self, part: WireChunk) -> bytes | None:
        if part.receiver != VICTIM or part.kind != "block":
            return None
        self.captured.setdefault((part.step, part.chunk), bytes(part.data))
        if part.step != STEP or part.chunk != 1:
            return None
        data = part.data
        if self.kind == "forged":
            return os.urandom(len(data))
        if self.kind == "tampered":
            data[7] ^= 0x01  # one bit of the ciphertext, in place
            return None
        if self.kind == "truncated":
            return bytes(data[:-7])
        if self.kind in ("replayed-step", "spliced-block"):
            return self.captured[0, 1]  # the same chunk of step 0 (spliced-block: block 3)
        if self.kind == "reordered":
            return self.captured[STEP, 0]  # chunk 0 delivered in chunk 1's place
        if self.kind == "spliced-edge":
            return bytes(part.others[3])  # rank 0's chunk 1 sealed for rank 3
        raise AssertionError(self.kind)


def scenario_attack(rank: int, port: int, name: str, kind: str) -> dict[str, Any]:
    x = make_block(rank)
    before_x = bits(x)
    out = torch.empty_like(x)
    tap = Attack(kind) if rank == ATTACKER else None
    result: dict[str, Any] = {"error": None, "events": []}
    with group(rank, port, name, tap=tap) as g:
        # spliced-block: step 0 trains block 3, the attacked step block 5 (a new header).
        ids = (3, 5) if kind == "spliced-block" else (3, 3)
        g.mix(x, block_id=ids[0], out=out)
        result["after_step0"] = bits(out)
        try:
            g.mix(x, block_id=ids[1], out=out)
        except GossipError as exc:
            result["error"] = str(exc)
            result["events"] = getattr(exc, "security_events", [])
        result["out"] = bits(out)
    result["x_unchanged"] = np.array_equal(bits(x), before_x)
    return result


ATTACKS = ["forged", "tampered", "truncated", "replayed-step", "reordered", "spliced-edge"]


@pytest.fixture(scope="module")
def port() -> Any:
    store, actual = host_store(HOST, 0, timeout_s=60)
    yield actual
    del store


@pytest.fixture(scope="module")
def peers(port: int) -> Any:
    pool = PeerPool(port)
    yield pool
    pool.close()


def _check_rejected(res: dict[int, tuple[str, Any, float]], what: str = "block") -> None:
    status, value, _ = res[VICTIM]
    assert status == "ok", value
    msg = value["error"]
    assert msg is not None, "the altered payload was accepted"
    assert f"{what} from neighbour rank {ATTACKER}" in msg
    assert "fails AES-256-GCM authentication" in msg and "Nothing was mixed" in msg
    # No half-applied mix: the output still holds step 0's result, the input is untouched.
    assert np.array_equal(value["out"], value["after_step0"]) and value["x_unchanged"]
    (event,) = value["events"]
    assert event["type"] == "security" and event["from"] == f"rank {ATTACKER}"
    assert event["check"] == "aead" and event["step"] == STEP
    for r in range(WORLD):  # nobody else was attacked; nobody else may have failed on it
        if r != VICTIM:
            assert res[r][1]["error"] is None or "rank 1" in res[r][1]["error"], res[r]


@pytest.mark.parametrize("kind", ATTACKS)
def test_altered_payload_is_rejected_and_nothing_is_mixed(peers: PeerPool, kind: str) -> None:
    res = peers.run(scenario_attack, name=unique(f"attack-{kind}"), kind=kind)
    _check_rejected(res)
    if kind == "tampered":  # the event names the chunk that was changed
        assert res[VICTIM][1]["events"][0]["chunk"] == 1


def test_payload_spliced_from_another_block_is_rejected(peers: PeerPool) -> None:
    res = peers.run(scenario_attack, name=unique("attack-block"), kind="spliced-block")
    _check_rejected(res)


def scenario_replay_phase(rank: int, port: int, name: str) -> dict[str, Any]:
    """Capture rank 0 -> 1 in phase A; replay it at the same step and chunk in phase B."""
    x = make_block(rank)
    before = bits(x)
    captured: dict[int, bytes] = {}

    def tap(part: WireChunk) -> bytes | None:
        if part.receiver != VICTIM or part.kind != "block":
            return None
        if not replay:
            captured[part.chunk] = bytes(part.data)
            return None
        return captured[part.chunk]

    replay = False
    with group(rank, port, f"{name}/phaseA", tap=tap if rank == ATTACKER else None) as g:
        g.mix(x, block_id=3)
    replay = True
    out = torch.full_like(x, 7.0)
    sentinel = bits(out)
    result: dict[str, Any] = {"error": None, "events": []}
    with group(rank, port, f"{name}/phaseB", tap=tap if rank == ATTACKER else None) as g:
        try:
            g.mix(x, block_id=3, out=out)
        except GossipError as exc:
            result["error"] = str(exc)
            result["events"] = getattr(exc, "security_events", [])
    result["out"], result["after_step0"] = bits(out), sentinel
    result["x_unchanged"] = np.array_equal(bits(x), before)
    return result


def test_payload_replayed_from_an_earlier_phase_is_rejected(peers: PeerPool) -> None:
    res = peers.run(scenario_replay_phase, name=unique("replay-phase"))
    status, value, _ = res[VICTIM]
    assert status == "ok", value
    assert f"block from neighbour rank {ATTACKER}" in value["error"]
    assert "fails AES-256-GCM authentication" in value["error"]
    assert np.array_equal(value["out"], value["after_step0"]) and value["x_unchanged"]
    assert value["events"][0]["step"] == 0  # same step number, other phase: other key


def scenario_forged_header(rank: int, port: int, name: str) -> dict[str, Any]:
    def tap(part: WireChunk) -> bytes | None:
        if part.kind == "header" and part.receiver == VICTIM:
            return os.urandom(len(part.data))
        return None

    x = make_block(rank)
    try:
        with group(rank, port, name, tap=tap if rank == ATTACKER else None) as g:
            g.mix(x)
        return {"error": None}
    except GossipError as exc:
        return {"error": str(exc)}


def test_forged_header_is_rejected(peers: PeerPool) -> None:
    res = peers.run(scenario_forged_header, name=unique("header"))
    msg = res[VICTIM][1]["error"]
    assert msg is not None and f"header from neighbour rank {ATTACKER}" in msg


# ---------------------------------------------------------------------------- sealing, in-process


def test_aad_binds_every_field_the_receiver_expects() -> None:
    """Independent of the network: change one expected field and the chunk fails."""
    keys = {r: EdgeKeys(b"k" * 32, "run1/phase0", r) for r in (0, 1)}
    send, _ = keys[0].derive(1, keys[1].public)
    _, recv = keys[1].derive(0, keys[0].public)
    plain = torch.randn(NUMEL)
    sealer = ChunkSealer(NUMEL * 4, CHUNK)
    sealed = torch.empty(sealer.sealed_bytes, dtype=torch.uint8)
    run = run_fingerprint(b"k" * 32)
    ctx = ChunkContext(run, "run1/phase0", 0, 1, KIND_PAYLOAD, 3, 0, NUMEL)
    for c in range(sealer.count):
        sealer.seal_chunk(send, ctx, 5, c, secure_channel.byte_view(plain), _view(sealed))
    out = torch.empty(NUMEL)
    for c in range(sealer.count):
        sealer.open_chunk(recv, ctx, 5, c, _view(sealed), secure_channel.byte_view(out))
    assert torch.equal(out, plain)
    changes = {
        "run": {"run": run_fingerprint(b"other run key!!!" * 2)},
        "phase": {"group": "run1/phase1"},
        "sender": {"sender": 2},
        "receiver": {"receiver": 2},
        "block": {"block_id": 4},
        "dtype": {"dtype_code": 1},
        "shape": {"numel": NUMEL + 1},
        "kind": {"kind": KIND_PAYLOAD + 1},
    }
    for change in changes.values():
        other = ChunkContext(**{**ctx.__dict__, **change})
        with pytest.raises(SealedOpenError, match="chunk 0"):
            sealer.open_chunk(recv, other, 5, 0, _view(sealed), secure_channel.byte_view(out))
    with pytest.raises(SealedOpenError):  # another step
        sealer.open_chunk(recv, ctx, 6, 0, _view(sealed), secure_channel.byte_view(out))
    swapped = sealed.clone()  # chunks 1 and 2 (same length) delivered in each other's place
    (a, n), (b, _) = sealer.sealed_span(1), sealer.sealed_span(2)
    swapped[a : a + n], swapped[b : b + n] = sealed[b : b + n], sealed[a : a + n]
    with pytest.raises(SealedOpenError, match="chunk 2"):
        sealer.open_chunk(recv, ctx, 5, 2, _view(swapped), secure_channel.byte_view(out))
    # Direction matters: the 0 -> 1 key does not open what was sealed for 1 -> 0.
    _, wrong = keys[0].derive(1, keys[1].public)
    with pytest.raises(SealedOpenError):
        sealer.open_chunk(wrong, ctx, 5, 0, _view(sealed), secure_channel.byte_view(out))


def _view(t: torch.Tensor) -> memoryview:
    return secure_channel.byte_view(t)


# ---------------------------------------------------------------------------- nonce uniqueness


def scenario_nonces(rank: int, port: int, name: str) -> dict[str, Any]:
    """A phase fails after 2 steps; it is rolled back and retried as a new group attempt."""
    used: list[tuple[bytes, bytes]] = []
    real = secure_channel.AESGCM

    class Recording:  # records (key, nonce) of every seal this process makes
        def __init__(self, key: bytes) -> None:
            self.key, self.inner = bytes(key), real(key)

        def encrypt_into(self, nonce: bytes, data: Any, aad: bytes, buf: Any) -> int:
            used.append((self.key, bytes(nonce)))
            return self.inner.encrypt_into(nonce, data, aad, buf)

        def decrypt_into(self, nonce: bytes, data: Any, aad: bytes, buf: Any) -> int:
            return self.inner.decrypt_into(nonce, data, aad, buf)

    secure_channel.AESGCM = Recording
    try:
        x = make_block(rank)
        with group(rank, port, f"{name}/phase1/try0") as g:
            g.mix(x, block_id=2)
            g.mix(x, block_id=2)  # ... and the phase fails here: everything is rolled back
        first = len(used)
        with group(rank, port, f"{name}/phase1/try1") as g:  # the retry: same steps, same data
            g.mix(x, block_id=2)
            g.mix(x, block_id=2)
    finally:
        secure_channel.AESGCM = real
    return {
        "pairs": len(used),
        "unique_pairs": len(set(used)),
        "unique_nonces": len({n for _, n in used}),
        "keys_try0": sorted({k for k, _ in used[:first]}),
        "keys_try1": sorted({k for k, _ in used[first:]}),
    }


def test_nonces_never_repeat_under_a_key_across_a_retried_step(peers: PeerPool) -> None:
    res = peers.run(scenario_nonces, name=unique("nonces"))
    for r in range(WORLD):
        status, value, _ = res[r]
        assert status == "ok", value
        # 2 attempts x (1 header + 2 steps x 4 chunks) x 2 neighbours
        assert value["pairs"] == 2 * (1 + 2 * 4) * 2
        assert value["unique_pairs"] == value["pairs"]
        # The same nonces do recur (same steps, same chunks) ... under fresh keys only.
        assert value["unique_nonces"] < value["pairs"]
        assert len(value["keys_try0"]) == len(value["keys_try1"]) == 2
        assert not set(value["keys_try0"]) & set(value["keys_try1"])


# ---------------------------------------------------------------------------- store attacks


def scenario_join(rank: int, port: int, name: str, **kw: Any) -> dict[str, Any]:
    late = kw.pop("late", None)
    if rank == late:
        time.sleep(1.5)
    x = make_block(rank)
    try:
        with group(rank, port, name, **kw) as g:
            mixed = g.mix(x)
            return {"error": None, "mixed": mixed.numpy(), "events": g.events}
    except GossipError as exc:
        return {"error": str(exc), "events": getattr(exc, "security_events", [])}
    finally:
        assert not dist.is_initialized()


def test_non_member_cannot_claim_a_rank_or_join(peers: PeerPool) -> None:
    """Rank 3 is a process with another run's key: every member rejects it by key and rank."""
    name = unique("intruder-join")
    res = peers.run(scenario_join_keys, name=name, timeout_s=3, keys={3: WRONG_KEY})
    for r in (0, 1, 2):
        status, value, _ = res[r]
        assert status == "ok", value
        msg = value["error"]
        assert msg is not None and "rendezvous rejected" in msg
        assert f"{name}/'deca-gossip/join/3'" in msg and "claiming rank 3" in msg
        assert any(e["check"] == "store-hmac" and e["from"] == "rank 3" for e in value["events"])
    assert res[3][1]["error"] is not None  # nor can the intruder read the members' entries


def scenario_join_keys(rank: int, port: int, name: str, **kw: Any) -> dict[str, Any]:
    keys = kw.pop("keys", {})
    return scenario_join(rank, port, name, store_key=keys.get(rank, RUN_KEY), **kw)


def _raw(port: int, name: str) -> dist.Store:
    client = dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=10))
    return dist.PrefixStore(name, client)


@pytest.mark.parametrize("forgery", ["unsigned", "wrong-key", "copied-from-rank-0"])
def test_forged_rank_entry_fails_with_key_and_claimed_rank(
    peers: PeerPool, port: int, forgery: str
) -> None:
    """A non-member publishes rank 3's row of W; rank 3 never comes: members fail by name."""
    name = unique(f"forged-row-{forgery}")
    key = "deca-gossip/join/3"
    row = '{"world_size": 4, "backend": "gloo", "wire": 0, "neighbours": {"0": 0.5}}'
    if forgery == "unsigned":
        forged, claimed = row.encode(), "no rank"
    elif forgery == "wrong-key":
        other = AuthenticatedStore(_raw(port, name), bytes.fromhex(WRONG_KEY), 3, name, 5)
        forged, claimed = other.seal(key, row), "rank 3"
    else:  # a valid envelope (the run key) for rank 0's key, copied to rank 3's key
        member = AuthenticatedStore(_raw(port, name), bytes.fromhex(RUN_KEY), 0, name, 5)
        forged, claimed = member.seal("deca-gossip/join/0", row), "rank 0"
    _raw(port, name).set(key, forged)
    res = peers.run(scenario_join_keys, ranks=[0, 1, 2], name=name, timeout_s=3)
    for r in (0, 1, 2):
        status, value, _ = res[r]
        assert status == "ok", value
        assert f"'{key}', value claiming {claimed}" in value["error"]
        assert "no valid value arrived within 3 s" in value["error"]


def test_forged_row_is_outlived_when_the_real_rank_arrives(peers: PeerPool, port: int) -> None:
    """The intruder writes rank 2's entry first; rank 2 overwrites it: the run goes on, the
    rejection is recorded, and the mix is the one of the true W."""
    name = unique("outlived")
    row = '{"world_size": 4, "backend": "gloo", "wire": 0, "neighbours": {"1": 1.0}}'
    _raw(port, name).set("deca-gossip/join/2", row.encode())
    _raw(port, name).set("deca-gossip/claim/2", b"mine")
    res = peers.run(scenario_join_keys, name=name, timeout_s=10, late=2)
    x = np.stack([make_block(r).double().numpy() for r in range(WORLD)])
    expected = ring_matrix() @ x
    for r in range(WORLD):
        status, value, _ = res[r]
        assert status == "ok", value
        assert value["error"] is None, value["error"]
        np.testing.assert_allclose(value["mixed"], expected[r], atol=1e-5)
    seen = [e for r in (0, 1, 3) for e in res[r][1]["events"]]
    assert any(e["key"] == f"{name}/deca-gossip/join/2" for e in seen)
    assert any(e["key"] == f"{name}/deca-gossip/claim/2" for e in res[2][1]["events"])


def test_forged_gloo_address_is_rejected(port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gloo's own rendezvous goes through the authenticated store: a forged peer address
    (torch's key for rank 1) is refused by name, so an intruder cannot get itself paired."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    name = unique("gloo-address")
    _raw(port, name).set("0//cpu//0/1", os.urandom(170))  # what Gloo would read for rank 1
    store = AuthenticatedStore(_raw(port, name), bytes.fromhex(RUN_KEY), 0, name, 2)
    with pytest.raises((RuntimeError, StoreAuthError), match="claiming no rank"):
        dist.init_process_group(
            "gloo", store=store, rank=0, world_size=2, timeout=timedelta(seconds=10)
        )
    assert not dist.is_initialized()
    assert store.events[0]["key"] == f"{name}/0//cpu//0/1"


def test_store_refuses_counters_and_unsealed_values(port: int) -> None:
    name = unique("counters")
    store = AuthenticatedStore(_raw(port, name), bytes.fromhex(RUN_KEY), 1, name, 0.2)
    with pytest.raises(StoreAuthError, match="counters"):
        store.add("x", 1)
    store.set("ok", b"value")
    assert store.get("ok") == b"value"
    _raw(port, name).set("ok", b"value")  # overwritten without an envelope
    with pytest.raises(StoreAuthError, match="'ok', value claiming no rank"):
        store.get("ok")


# ---------------------------------------------------------------------------- the socket


def _capture_loopback(sock: socket.socket, stop: threading.Event, packets: list[bytes]) -> None:
    while not stop.is_set():
        try:
            packets.append(sock.recv(1 << 17))
        except TimeoutError:
            continue
    sock.close()


def scenario_big(rank: int, port: int, name: str, encryption: str) -> str:
    x = make_block(rank, 1 << 16)
    with group(rank, port, name, encryption=encryption, chunk_bytes=1 << 20) as g:
        g.mix(x)
    return "ok"


def _windows_on_wire(peers: PeerPool, encryption: str) -> float:
    """Share of 32-byte windows of the blocks found in what crossed the loopback socket."""
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003)).close()
    except (PermissionError, OSError, AttributeError):
        pytest.skip("capturing loopback packets needs CAP_NET_RAW (Linux)")
    # Bound before the peers send (warm peers exchange within milliseconds), with a buffer
    # large enough that a loaded machine drops no packet of the positive control.
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
    sock.bind(("lo", 0))
    sock.settimeout(0.1)
    stop, packets = threading.Event(), []
    thread = threading.Thread(target=_capture_loopback, args=(sock, stop, packets))
    thread.start()
    try:
        res = peers.run(scenario_big, name=unique(f"wire-{encryption}"), encryption=encryption)
    finally:
        stop.set()
        thread.join()
        sock.close()
    assert all(res[r][0] == "ok" for r in range(WORLD)), res
    wire = b"".join(packets)
    rng = random.Random(0)
    windows = []
    for r in range(WORLD):
        data = make_block(r, 1 << 16).numpy().tobytes()
        windows += [data[o : o + 32] for o in (rng.randrange(len(data) - 32) for _ in range(50))]
    return sum(w in wire for w in windows) / len(windows)


def test_no_plaintext_block_reaches_the_socket(peers: PeerPool) -> None:
    # Positive control first: with encryption=none the capture does see the blocks.
    assert _windows_on_wire(peers, "none") > 0.5
    assert _windows_on_wire(peers, "aes-256-gcm") == 0.0


def test_summary_says_whether_the_data_plane_was_sealed() -> None:
    from deca_flower.reporting import summary_markdown

    records = [
        {"type": "phase", "bytes_sent": [1, 2]},
        {"type": "coordinator", "max_reply_values": 0},
    ]
    sealed = summary_markdown(records, "gossip:\n  encryption: aes-256-gcm\n  backend: auto\n")
    assert "data plane: aes-256-gcm per edge" in sealed
    plain = summary_markdown(records, "gossip:\n  encryption: none\n  backend: gloo\n")
    assert "data plane: PLAINTEXT (gossip.encryption=none)" in plain
    nccl = summary_markdown(records, "gossip:\n  encryption: aes-256-gcm\n  backend: nccl\n")
    assert "NCCL, PLAINTEXT" in nccl
    # The in-process engine has no data plane: no such line.
    assert "data plane" not in summary_markdown(records[:1], "gossip:\n  encryption: none\n")


def test_handshake_barrier_counts_only_authenticated_arrivals(port: int) -> None:
    from deca_flower.gossip import handshake_barrier

    name = unique("barrier")
    _raw(port, name).set("arrived/1", b"1")  # a non-member "arrives" as rank 1
    with pytest.raises(TimeoutError, match="only 1 of 2 DECA peers"):
        handshake_barrier(HOST, port, name, 0, 2, 1.0, store_key=RUN_KEY)
    name = unique("barrier-ok")
    errors: list[BaseException] = []

    def arrive(rank: int) -> None:
        try:
            handshake_barrier(HOST, port, name, rank, 2, 10.0, store_key=RUN_KEY)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=arrive, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors
