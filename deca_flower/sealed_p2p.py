"""Sealed point-to-point messages between the peers of one gossip group (over Gloo).

Framework-free. :class:`SealedLinks` holds one group's crypto state (its X25519 key pair, the
directed edge keys, the rejections) and moves messages sealed chunk by chunk with
``torch.distributed`` ``isend``/``irecv``: the wire format and the AAD are in
:mod:`deca_flower.secure_channel`, the threat model in ``docs/security.md``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from deca_flower.gossip_errors import GossipError, GossipSecurityError
from deca_flower.secure_channel import (
    ChunkContext,
    ChunkSealer,
    EdgeKeys,
    SealedOpenError,
    byte_view,
    run_fingerprint,
    security_event,
)

__all__ = ["SealedLinks", "WireChunk", "WireTap"]

# (peer, chunk, work, what keeps the buffer alive)
_Posted = list[tuple[int, int, Any, Any]]
# {peer: (plain, sealed)} to send; {peer: (sealed, plain out)} to receive
Legs = dict[int, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class WireChunk:
    """One message part about to be handed to the backend (the ``tap`` hook sees these).

    ``data`` is exactly what goes to the socket (sealed bytes, or plaintext with
    ``encryption="none"``) and may be modified in place; ``others`` holds the same part as
    sealed for the other neighbours. Tests and the lab use a tap to play an on-path attacker
    (capture, tamper, truncate, replay, reorder, splice): a tap that returns bytes sends those
    instead. Never set one in production.
    """

    kind: str  # "header" | "block" | "reduce"
    step: int
    chunk: int
    count: int
    sender: int
    receiver: int
    block_id: int
    data: memoryview
    others: dict[int, memoryview] = field(default_factory=dict)


WireTap = Callable[[WireChunk], bytes | None]


class SealedLinks:
    """One group's sealed links: a fresh key pair, edge keys per neighbour, rejections.

    ``p2p_error(label, peer, exc)`` turns a backend failure into the group's
    :class:`GossipError` (naming the neighbour and the timeout to raise).
    """

    def __init__(
        self,
        rank: int,
        group_name: str,
        run_key: bytes,
        *,
        chunk_bytes: int,
        tap: WireTap | None,
        p2p_error: Callable[[str, int, BaseException], GossipError],
    ) -> None:
        self.rank = rank
        self.group_name = group_name
        self.chunk_bytes = chunk_bytes
        self.events: list[dict[str, Any]] = []
        self.crypto_seconds = 0.0
        self._edge_keys: EdgeKeys | None = EdgeKeys(run_key, group_name, rank)
        self._run = run_fingerprint(run_key)
        self._publics: dict[int, bytes] = {}
        self._aead: dict[int, tuple[Any, Any]] = {}  # peer -> (send key, receive key)
        self._tap = tap
        self._p2p_error = p2p_error

    @property
    def public(self) -> bytes:
        return self._edge_keys.public if self._edge_keys else b""

    def set_publics(self, publics: dict[int, bytes]) -> None:
        """The public keys every rank published (already authenticated by the store)."""
        self._publics = dict(publics)

    def close(self) -> None:
        """Forget the keys: the next group makes new ones (events stay readable)."""
        self._aead.clear()
        self._edge_keys = None

    def ctx(self, kind: int, block_id: int, dtype_code: int) -> Callable[..., ChunkContext]:
        """AAD fields for (sender, receiver, numel): the receiver fills in what it expects."""

        def make(sender: int, receiver: int, numel: int) -> ChunkContext:
            return ChunkContext(
                self._run, self.group_name, sender, receiver, kind, block_id, dtype_code, numel
            )

        return make

    def _keys(self, peer: int) -> tuple[Any, Any]:
        """(AEAD for this rank -> peer, AEAD for peer -> this rank), derived on first use."""
        if peer not in self._aead:
            if self._edge_keys is None or peer not in self._publics:
                raise GossipError(
                    f"rank {self.rank}: no key for neighbour rank {peer} in group "
                    f"{self.group_name!r}: refusing to send in plaintext"
                )
            self._aead[peer] = self._edge_keys.derive(peer, self._publics[peer])
        return self._aead[peer]

    def exchange(
        self,
        what: str,
        ctx: Callable[..., ChunkContext],
        step: int,
        tag: int,
        sends: Legs,
        recvs: Legs,
        *,
        timeout_s: float,
        block_id: int = -1,
        during: Callable[[], object] | None = None,
    ) -> None:
        """Seal each ``sends`` plaintext chunk by chunk to its peer while receiving and
        opening ``recvs``.

        All receives are posted first; chunk k's sends go out before chunk k+1 is sealed, and
        chunks are opened as they arrive, so the cipher overlaps the transfer (the AEAD calls
        release the GIL). ``during`` (optional) runs once every chunk is sealed and posted,
        before any is opened: compute that overlaps the transfer and reads none of its
        buffers. Every chunk from every peer is verified before this returns; any
        failure raises :class:`GossipSecurityError` naming the peers, so no caller can mix a
        half-verified block.
        """
        deadline = time.monotonic() + timeout_s
        incoming = self._post_recvs(what, tag, recvs)
        outgoing = self._post_sends(what, ctx, step, tag, sends, block_id)
        if during is not None:
            t0 = time.monotonic()
            during()
            deadline += time.monotonic() - t0  # local compute is not a wait on the network
        failures: dict[int, SealedOpenError] = {}
        for peer, c, work, sealer in incoming:
            self._wait(work, deadline, f"receiving {what} chunk {c} from", peer)
            if peer not in failures:
                try:
                    self._open(sealer, ctx, step, c, peer, *recvs[peer])
                except SealedOpenError as exc:
                    failures[peer] = exc
        for peer, c, work, _ in outgoing:
            self._wait(work, deadline, f"sending {what} chunk {c} to", peer)
        if failures:
            raise self._failure(what, step, failures)

    def _open(
        self,
        sealer: ChunkSealer,
        ctx: Callable[..., ChunkContext],
        step: int,
        c: int,
        peer: int,
        sealed: torch.Tensor,
        plain: torch.Tensor,
    ) -> None:
        t0 = time.perf_counter()
        try:
            expected = ctx(peer, self.rank, plain.numel())
            key = self._keys(peer)[1]
            sealer.open_chunk(key, expected, step, c, byte_view(sealed), byte_view(plain))
        finally:
            self.crypto_seconds += time.perf_counter() - t0

    def _sealers(self, legs: Legs, plain_index: int) -> dict[int, ChunkSealer]:
        return {
            j: ChunkSealer(t[plain_index].numel() * t[plain_index].element_size(), self.chunk_bytes)
            for j, t in legs.items()
        }

    def _post_recvs(self, what: str, tag: int, recvs: Legs) -> _Posted:
        posted = []
        sealers = self._sealers(recvs, 1)
        count = max((s.count for s in sealers.values()), default=0)
        for c in range(count):  # chunk-major: chunk 0 of every peer is opened first
            for peer, (sealed, _) in recvs.items():
                if c >= sealers[peer].count:
                    continue
                start, size = sealers[peer].sealed_span(c)
                try:
                    work = dist.irecv(sealed[start : start + size], peer, tag=tag + c)
                except (RuntimeError, dist.DistError) as exc:
                    raise self._p2p_error(f"posting the {what} receive from", peer, exc) from exc
                posted.append((peer, c, work, sealers[peer]))
        return posted

    def _post_sends(
        self,
        what: str,
        ctx: Callable[..., ChunkContext],
        step: int,
        tag: int,
        sends: Legs,
        block_id: int,
    ) -> _Posted:
        posted = []
        sealers = self._sealers(sends, 0)
        views = {j: (byte_view(p), byte_view(b)) for j, (p, b) in sends.items()}
        count = max((s.count for s in sealers.values()), default=0)
        for c in range(count):
            t0 = time.perf_counter()
            spans = {}
            for peer, (plain, sealed) in views.items():
                if c < sealers[peer].count:
                    expected = ctx(self.rank, peer, sends[peer][0].numel())
                    key = self._keys(peer)[0]
                    sealers[peer].seal_chunk(key, expected, step, c, plain, sealed)
                    spans[peer] = sealers[peer].sealed_span(c)
            self.crypto_seconds += time.perf_counter() - t0
            for peer, (start, size) in spans.items():
                out = sends[peer][1][start : start + size]
                if self._tap is not None:
                    part = WireChunk(what, step, c, sealers[peer].count, self.rank, peer, block_id,
                                     byte_view(out), self._others(peer, spans, sends))  # fmt: skip
                    out = self._tapped(part, out)
                try:
                    work = dist.isend(out, peer, tag=tag + c)
                except (RuntimeError, dist.DistError) as exc:
                    raise self._p2p_error(f"posting the {what} send to", peer, exc) from exc
                posted.append((peer, c, work, out))  # keep `out` alive until sent
        return posted

    @staticmethod
    def _others(peer: int, spans: dict[int, tuple[int, int]], sends: Legs) -> dict[int, memoryview]:
        return {j: byte_view(sends[j][1][a : a + n]) for j, (a, n) in spans.items() if j != peer}

    def _tapped(self, part: WireChunk, out: torch.Tensor) -> torch.Tensor:
        """Hand a sealed chunk to the test/lab tap; send its replacement if it returns one."""
        replacement = self._tap(part)
        if replacement is None:
            return out
        return torch.tensor(bytearray(replacement), dtype=torch.uint8)

    def _wait(self, work: Any, deadline: float, label: str, peer: int) -> None:
        # timedelta(0) would mean "the group default"; keep at least 1 ms left.
        left = timedelta(seconds=max(deadline - time.monotonic(), 1e-3))
        try:
            work.wait(left)
        except (RuntimeError, dist.DistError) as exc:
            raise self._p2p_error(label, peer, exc) from exc

    def _failure(
        self, what: str, step: int, failures: dict[int, SealedOpenError]
    ) -> GossipSecurityError:
        for peer, exc in failures.items():
            self.events.append(
                security_event(
                    f"{what} rejected",
                    f"rank {peer}",
                    exc.check,
                    group=self.group_name,
                    step=step,
                    chunk=exc.chunk,
                    receiver=self.rank,
                )
            )
        problems = "; ".join(f"neighbour rank {j}: {exc}" for j, exc in failures.items())
        return GossipSecurityError(
            f"rank {self.rank}, group {self.group_name!r}: {what} from {problems}. Nothing was "
            "mixed: this rank's state is unchanged. Someone on the path (or a member holding "
            "another run's keys) altered the traffic; see docs/security.md",
            self.events,
        )
