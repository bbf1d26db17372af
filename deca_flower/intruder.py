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
- :func:`replay_store_entries`: copy a member's authenticated claim and row of W from an
  earlier group into a later one before that member joins it. The MAC binds the group name,
  so members reject the copy (HMAC) and the member's own write replaces it.
- :class:`WireSniffer`: record the TCP payloads two *other* hosts exchange, on a link where
  this host sees every frame (the lab's bridge forwards like a hub for this): the sealed
  block bytes an eavesdropper captures, for replaying to a member's Gloo port later
  (:func:`send_raw`). An off-path host cannot write into the members' established Gloo
  connections, so the replay arrives on a fresh connection, which Gloo never pairs.
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
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from deca_flower.gossip import WireChunk
from deca_flower.secure_channel import AuthenticatedStore

__all__ = [
    "CaptureTap",
    "ReplayTap",
    "Segment",
    "WireSniffer",
    "claim_rank",
    "gloo_addresses",
    "replay_store_entries",
    "send_raw",
]

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


def replay_store_entries(
    store_host: str,
    store_port: int,
    from_group: str,
    to_group: str,
    rank: int,
    *,
    timeout_s: float = 10,
) -> dict[str, Any]:
    """Replay ``rank``'s authenticated claim and row of W (captured from ``from_group``, where
    the member wrote them) into ``to_group``. Written only where the key is still absent, so
    a member's own value is never overwritten. Returns the attempt record; ``written`` lists
    the keys the replay got into before the member."""
    src = _store(store_host, store_port, from_group, timeout_s)
    dst = _store(store_host, store_port, to_group, timeout_s)
    captured, written = [], []
    for key in (f"{_STORE_NS}/claim/{rank}", f"{_STORE_NS}/join/{rank}"):
        if not src.check([key]):
            continue
        raw = bytes(src.get(key))
        captured.append(f"{from_group}/{key}")
        if bytes(dst.compare_set(key, "", raw)) == raw:
            written.append(f"{to_group}/{key}")
    return _attempt(
        "replay a captured payload",
        f"{to_group} rank {rank}",
        content="a member's authenticated store entries",
        captured=captured,
        written=written,
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


def send_raw(
    host: str,
    port: int,
    payload: bytes,
    timeout_s: float = 5,
    what: str = "send a block to a Gloo port",
    **extra: Any,
) -> dict[str, Any]:
    """Connect to a peer's Gloo port and send ``payload`` (e.g. a block or a captured chunk).

    Returns the attempt record with what the socket saw: whether the connection was
    accepted, how many bytes went out, and whether the peer closed it.
    """
    record = _attempt(what, f"{host}:{port}", bytes=len(payload), **extra)
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


@dataclass
class Segment:
    """One captured TCP segment's payload, with its flow and the stage (group) it was seen in."""

    src: str
    sport: int
    dst: str
    dport: int
    seq: int
    payload: bytes
    stage: int

    @property
    def flow(self) -> str:
        return f"{self.src}:{self.sport} -> {self.dst}:{self.dport}"


_ETH_P_ALL = 0x0003
_ETH_IPV4 = b"\x08\x00"


class WireSniffer:
    """Capture the TCP payloads between two hosts other than ``ignore`` on ``interface``
    (an ``AF_PACKET`` socket: root). ``stage`` labels what is captured from now on (the
    caller counts the run's groups).

    Keeps at most ``max_bytes`` of payload. Sees other hosts' traffic only where the link
    delivers it here: a hub, a mirror port, a shared medium (the lab floods its bridge).
    """

    def __init__(self, interface: str, ignore: set[str], max_bytes: int = 64 << 20) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
        # A large buffer: a Python reader falls behind Gloo's bursts on a loaded host.
        force = getattr(socket, "SO_RCVBUFFORCE", 33)
        self.sock.setsockopt(socket.SOL_SOCKET, force, 32 << 20)
        self.sock.bind((interface, 0))
        self.sock.settimeout(0.5)
        self.ignore, self.max_bytes = set(ignore), max_bytes
        self.segments: list[Segment] = []
        self.bytes = 0
        self.stage = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> WireSniffer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                frame = self.sock.recv(1 << 17)
            except TimeoutError:
                continue
            except OSError:
                return
            segment = _tcp_segment(frame, self.stage)
            if segment is None or not segment.payload:
                continue
            if {segment.src, segment.dst} & self.ignore or self.bytes >= self.max_bytes:
                continue
            self.segments.append(segment)
            self.bytes += len(segment.payload)

    def pick(self, dst: str, before_stage: int) -> Segment | None:
        """The largest payload captured towards ``dst`` in a stage before ``before_stage``."""
        found = [s for s in self.segments if s.dst == dst and s.stage < before_stage]
        return max(found, key=lambda s: len(s.payload), default=None)

    def flows(self) -> dict[str, int]:
        """Payload bytes captured per flow."""
        out: dict[str, int] = {}
        for s in self.segments:
            out[s.flow] = out.get(s.flow, 0) + len(s.payload)
        return out


def _tcp_segment(frame: bytes, stage: int) -> Segment | None:
    """Parse Ethernet II + IPv4 + TCP; None for anything else."""
    if len(frame) < 54 or frame[12:14] != _ETH_IPV4:
        return None
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    if ip[9] != 6 or len(ip) < ihl + 20:
        return None
    total = struct.unpack(">H", ip[2:4])[0] or len(ip)  # 0 in some offloaded frames
    tcp = ip[ihl:total]
    sport, dport, seq = struct.unpack(">HHI", tcp[:8])
    payload = bytes(tcp[(tcp[12] >> 4) * 4 :])
    src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
    return Segment(src, sport, dst, dport, seq, payload, stage)


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
