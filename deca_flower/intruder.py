"""Attacks a process outside the run can try on the data plane (for the lab's ``--intruder``).

Framework-free. Each function makes one attempt and returns a record of what it did
(``{"type": "intrusion", ...}``); the members' rejections are ``{"type": "security", ...}``
records in :attr:`deca_flower.gossip.GossipGroup.events`, which nodes return in their phase
reply (``security_events``, JSON strings) and inside the error of a failed phase.

- :func:`claim_rank`: join the coordinator's store without the run key and claim a rank of a
  group (a claim, a row of W with an X25519 key, a Gloo address), as a member would. Members
  reject every value (HMAC). Written *before* the real rank joins (group names are
  predictable: ``run<id>/phase<n>``), the forgery is overwritten and the run goes on, with
  the rejections recorded; written *after* members read, it costs the phase (a denial of
  service, see docs/security.md), never a member's identity or a block.
- :func:`gloo_addresses` + :func:`send_raw`: read the peers' Gloo listening addresses from the
  store (values are authenticated, not secret) and send bytes to one. Gloo pairs only the
  connections of its own rendezvous; anything else is dropped before any block buffer.
- :class:`CaptureTap` / :class:`ReplayTap`: play an on-path attacker: capture the sealed chunks
  a sender hands to Gloo and replay them later (another step or phase). Pass as
  ``GossipGroup(tap=...)`` in a lab node only. The receiver rejects the replay (AEAD) and
  raises a :class:`~deca_flower.gossip.GossipSecurityError` naming the sender; its state stays
  as committed, so a retried phase gives the same result.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from deca_flower.gossip import WireChunk
from deca_flower.secure_channel import AuthenticatedStore

__all__ = ["CaptureTap", "ReplayTap", "claim_rank", "gloo_addresses", "send_raw"]

_STORE_NS = "deca-gossip"


def _attempt(what: str, target: str, **extra: Any) -> dict[str, Any]:
    return {"type": "intrusion", "what": what, "target": target, **extra}


def _store(host: str, port: int, group_name: str, timeout_s: float) -> dist.Store:
    client = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    return dist.PrefixStore(group_name, client)


def claim_rank(
    store_host: str,
    store_port: int,
    group_name: str,
    rank: int,
    world_size: int,
    *,
    timeout_s: float = 10,
) -> dict[str, Any]:
    """Write a claim, a row of W and a Gloo address for ``rank`` of ``group_name``, sealed
    with a key of our own (the intruder has no run key). Returns the attempt record."""
    raw = _store(store_host, store_port, group_name, timeout_s)
    guess = AuthenticatedStore(raw, os.urandom(32), rank, group_name, timeout_s)
    row = {
        "world_size": world_size,
        "backend": "gloo",
        "wire": 0,
        "neighbours": {str(j): 1.0 / world_size for j in range(world_size) if j != rank},
        "device": "intruder",
        "encryption": "aes-256-gcm",
        "x25519": os.urandom(32).hex(),
    }
    entries = {
        f"{_STORE_NS}/claim/{rank}": json.dumps({"rank": rank, "nonce": os.urandom(16).hex()}),
        f"{_STORE_NS}/join/{rank}": json.dumps(row),
        f"0//cpu//0/{rank}": os.urandom(170),  # torch's key for rank's Gloo address
    }
    for key, value in entries.items():
        raw.set(key, guess.seal(key, value))
    return _attempt(
        "claim rank", f"{group_name} rank {rank}", keys=[f"{group_name}/{k}" for k in entries]
    )


def gloo_addresses(
    store_host: str, store_port: int, group_name: str, world_size: int, timeout_s: float = 10
) -> dict[int, tuple[str, int]]:
    """The IPv4 Gloo listening address each rank published in ``group_name`` (if any yet)."""
    raw = _store(store_host, store_port, group_name, timeout_s)
    out = {}
    for r in range(world_size):
        key = f"0//cpu//0/{r}"
        if raw.check([key]):
            addr = _sockaddr_in(bytes(raw.get(key)))
            if addr:
                out[r] = addr
    return out


def _sockaddr_in(blob: bytes) -> tuple[str, int] | None:
    """Find a ``struct sockaddr_in`` (AF_INET, port, address) inside Gloo's address blob."""
    if blob[:4] == b"DSA1":  # a member's authenticated envelope: the address follows it
        blob = blob[40:]
    start = 0
    while (i := blob.find(b"\x02\x00", start)) >= 0 and i + 8 <= len(blob):
        port = struct.unpack(">H", blob[i + 2 : i + 4])[0]
        ip = socket.inet_ntoa(blob[i + 4 : i + 8])
        if port and ip != "0.0.0.0":
            return ip, port
        start = i + 1
    return None


def send_raw(host: str, port: int, payload: bytes, timeout_s: float = 5) -> dict[str, Any]:
    """Connect to a peer's Gloo port and send ``payload`` (e.g. a block or a captured chunk).

    Returns the attempt record with what the socket saw: whether the connection was
    accepted, how many bytes went out, and whether the peer closed it.
    """
    record = _attempt("send a block to a Gloo port", f"{host}:{port}", bytes=len(payload))
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            record["connected"] = True
            sock.sendall(payload)
            sock.settimeout(1.0)
            try:
                record["peer_closed"] = sock.recv(1) == b""
            except TimeoutError:
                record["peer_closed"] = False  # kept open, never paired: nothing reaches a block
    except OSError as exc:
        record.update(connected=record.get("connected", False), error=str(exc))
    record["at"] = time.time()
    return record


class CaptureTap:
    """A sender tap that records the sealed chunks it hands to Gloo: what an eavesdropper or
    an on-path attacker sees. ``captured[(receiver, kind, step, chunk)] = bytes``."""

    def __init__(self) -> None:
        self.captured: dict[tuple[int, str, int, int], bytes] = {}

    def __call__(self, part: WireChunk) -> bytes | None:
        self.captured[part.receiver, part.kind, part.step, part.chunk] = bytes(part.data)
        return None


class ReplayTap:
    """A sender tap that replaces the block chunks of ``at_step`` with chunks captured earlier
    (by a :class:`CaptureTap`, possibly in another phase): an on-path replay.

    ``from_step`` selects which captured step to replay. ``attempts`` lists what was replayed.
    """

    def __init__(self, captured: CaptureTap, at_step: int, from_step: int = 0) -> None:
        self.captured = captured.captured
        self.at_step, self.from_step = at_step, from_step
        self.attempts: list[dict[str, Any]] = []

    def __call__(self, part: WireChunk) -> bytes | None:
        key = (part.receiver, "block", self.from_step, part.chunk)
        if part.kind != "block" or part.step != self.at_step or key not in self.captured:
            return None
        self.attempts.append(
            _attempt(
                "replay a captured payload",
                f"rank {part.sender} -> rank {part.receiver}",
                step=part.step,
                chunk=part.chunk,
                captured_step=self.from_step,
            )
        )
        return self.captured[key]
