"""The intruder API the lab uses: each attempt is rejected, recorded, and changes no result."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
import torch
from test_gossip import HOST, RUN_KEY, WORLD, PeerPool, make_block, ring_matrix, ring_row, unique

from deca_flower.gossip import GossipError, GossipGroup, host_store
from deca_flower.intruder import (
    CaptureTap,
    ReplayTap,
    claim_rank,
    gloo_addresses,
    replay_store_entries,
    send_raw,
)


def _group(rank: int, port: int, name: str, **kw: Any) -> GossipGroup:
    nbrs, w, sw = ring_row(rank)
    return GossipGroup(
        HOST, port, rank, WORLD, nbrs, w, sw, group_name=name, store_key=RUN_KEY, **kw
    )


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


def scenario_two_steps(rank: int, port: int, name: str, pause: float) -> dict[str, Any]:
    x = make_block(rank)
    with _group(rank, port, name, timeout_s=20) as g:
        first = g.mix(x).clone()
        time.sleep(pause)  # the intruder acts now
        second = g.mix(first)
        return {"first": first.numpy(), "second": second.numpy(), "events": g.events}


def test_claimed_rank_and_raw_gloo_bytes_change_nothing(peers: PeerPool, port: int) -> None:
    name = unique("intruder")
    attempt = claim_rank(HOST, port, name, rank=2, world_size=WORLD)  # before rank 2 joins
    assert attempt["what"] == "claim rank" and len(attempt["keys"]) == 3
    sent: list[dict[str, Any]] = []

    def attack() -> None:  # while the group runs: every peer's Gloo port gets a fake block
        deadline = time.monotonic() + 20
        while len(addrs := gloo_addresses(HOST, port, name, WORLD)) < WORLD:
            assert time.monotonic() < deadline, addrs
            time.sleep(0.1)
        time.sleep(0.5)
        payload = make_block(0).numpy().tobytes()
        sent.extend(send_raw(host, p, payload) for host, p in addrs.values())

    thread = threading.Thread(target=attack)
    thread.start()
    res = peers.run(scenario_two_steps, name=name, pause=2.0)
    thread.join()
    # Gloo drops what it did not pair: reset, refused (listener closed after pairing) or
    # ignored; which one depends on timing. What matters is below: nothing changed.
    assert len(sent) == WORLD and all(s["what"] == "send a block to a Gloo port" for s in sent)
    x = np.stack([make_block(r).double().numpy() for r in range(WORLD)])
    w = ring_matrix()
    for r in range(WORLD):
        status, value, _ = res[r]
        assert status == "ok", value
        np.testing.assert_allclose(value["first"], (w @ x)[r], atol=1e-5)
        np.testing.assert_allclose(value["second"], (w @ w @ x)[r], atol=1e-4)
    # Rank 2 overwrote the forged claim (and recorded it); a member read the forged row first
    # or after rank 2's write: either way every rejection names the store check.
    events = [e for r in range(WORLD) for e in res[r][1]["events"]]
    assert any(e["key"] == f"{name}/deca-gossip/claim/2" for e in res[2][1]["events"])
    assert all(e["type"] == "security" and e["check"] == "store-hmac" for e in events)


def scenario_replay(rank: int, port: int, name: str) -> dict[str, Any]:
    capture = CaptureTap()
    x = make_block(rank)
    with _group(rank, port, f"{name}/a", tap=capture if rank == 0 else None) as g:
        g.mix(x)
    replay = ReplayTap(capture, at_step=0, from_step=0)  # same step number, next phase
    out = torch.zeros_like(x)
    try:
        with _group(rank, port, f"{name}/b", tap=replay if rank == 0 else None) as g:
            g.mix(x, out=out)
        return {"error": None, "attempts": replay.attempts}
    except GossipError as exc:
        return {
            "error": str(exc),
            "events": exc.security_events,
            "out_untouched": bool((out == 0).all()),
        }


def test_replayed_capture_is_rejected_by_the_receivers(peers: PeerPool) -> None:
    res = peers.run(scenario_replay, name=unique("replay"))
    assert len(res[0][1]["attempts"]) == 2  # rank 0 replayed to both neighbours
    for victim in (1, 3):
        value = res[victim][1]
        assert "block from neighbour rank 0" in value["error"] and value["out_untouched"]
        (event,) = value["events"]
        assert event["from"] == "rank 0" and event["check"] == "aead"


def scenario_one_step(rank: int, port: int, name: str) -> dict[str, Any]:
    with _group(rank, port, name, timeout_s=20) as g:
        return {"mixed": g.mix(make_block(rank)).numpy(), "events": g.events}


def test_store_entries_replayed_into_the_next_group_are_rejected(
    peers: PeerPool, port: int
) -> None:
    first, second = unique("replay-store") + "/phase0", unique("replay-store") + "/phase1"
    res = peers.run(scenario_one_step, name=first)
    assert all(res[r][0] == "ok" for r in range(WORLD)), res
    # Rank 2's valid claim and row of W, captured from the first group, written into the
    # second before rank 2 joins it: the MAC binds the group name, so they do not verify.
    attempt = replay_store_entries(HOST, port, first, second, rank=2)
    assert attempt["captured"] == [f"{first}/deca-gossip/claim/2", f"{first}/deca-gossip/join/2"]
    assert attempt["written"] == [f"{second}/deca-gossip/claim/2", f"{second}/deca-gossip/join/2"]
    res = peers.run(scenario_one_step, name=second)
    x = np.stack([make_block(r).double().numpy() for r in range(WORLD)])
    for r in range(WORLD):
        status, value, _ = res[r]
        assert status == "ok", value
        np.testing.assert_allclose(value["mixed"], (ring_matrix() @ x)[r], atol=1e-5)
    (claim,) = [e for e in res[2][1]["events"] if e["key"].endswith("claim/2")]
    assert claim["key"] == f"{second}/deca-gossip/claim/2" and claim["check"] == "store-hmac"
    assert claim["from"] == "rank 2"  # the envelope claims the victim's rank: a replay
    # A second replay finds the members' own values and never overwrites them.
    again = replay_store_entries(HOST, port, first, second, rank=2)
    assert again["written"] == []
