"""Data-plane security: an authenticated rendezvous store and sealed (AEAD) block chunks.

Framework-free (no ``flwr``), used by :mod:`deca_flower.gossip`. Threat model and settings:
``docs/security.md``. The pieces:

* **Run key** (:func:`new_run_key`): 32 random bytes made by the coordinator per run. It
  travels only in Flower messages (TLS in deployment), never through the gossip store.
* **Authenticated store** (:class:`AuthenticatedStore`): wraps the coordinator's
  ``TCPStore``; every value a peer writes carries HMAC-SHA256 under the run key, binding the
  group (scope), the full key, the rank the writer claims and the value. A value that does
  not verify is rejected (an event is recorded) and the reader keeps waiting for a valid one
  until its timeout; then it raises :class:`StoreAuthError` naming the key and the claimed rank.
  So a process without the run key cannot claim a rank, publish a row of W, or be paired by
  Gloo (Gloo's own address exchange goes through this store too).
* **Edge keys** (:class:`EdgeKeys`): a fresh X25519 key pair per group (phase attempt); the
  public halves travel in the authenticated store. Each *directed* edge i->j gets its own
  AES-256-GCM key from HKDF-SHA256 over the shared secret, salted with a hash of the run key and
  bound to the group name, both ranks and both public keys. The coordinator relays (stores)
  public keys only, so it never holds an edge key.
* **Sealing** (:class:`ChunkSealer`): a block's bytes are cut into chunks (8 MiB by default);
  chunk c of exchange (step) s goes out as ``AES-256-GCM(k_ij, nonce(kind, s, c), chunk, aad)``.
  The nonce is deterministic and unique per key: keys are fresh per group object and a group
  never reuses a (kind, step, chunk) triple, so a rolled-back or retried step (always a new
  group) never repeats a nonce. The receiver builds the AAD from what it expects (protocol
  version, run, group, step, block id, sender, receiver, dtype, numel, chunk index and count),
  so a replayed, reordered, truncated or spliced chunk fails authentication.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "ENCRYPTIONS",
    "PROTOCOL_VERSION",
    "AuthenticatedStore",
    "ChunkSealer",
    "EdgeKeys",
    "SealedOpenError",
    "StoreAuthError",
    "describe_data_plane",
    "new_run_key",
    "parse_run_key",
    "run_fingerprint",
    "security_event",
]

ENCRYPTIONS = ("aes-256-gcm", "none")
PROTOCOL_VERSION = 1
TAG_BYTES = 16
DEFAULT_CHUNK_BYTES = 8 << 20
KIND_HEADER, KIND_PAYLOAD, KIND_REDUCE = 0, 1, 2
_STORE_MAGIC = b"DSA1"  # deca store, authenticated, version 1
_STORE_HEAD = struct.Struct(">4si32s")  # magic, claimed writer rank, HMAC-SHA256
_RETRY_S = 0.05


class StoreAuthError(RuntimeError):
    """A store value failed its HMAC (or a write was refused) until the reader's deadline."""


class SealedOpenError(ValueError):
    """A sealed chunk failed authentication; ``chunk`` is its index, ``check`` what failed."""

    def __init__(self, message: str, chunk: int, check: str) -> None:
        super().__init__(message)
        self.chunk = chunk
        self.check = check


def security_event(what: str, source: str, check: str, **extra: Any) -> dict[str, Any]:
    """One rejection, in the shape ``metrics.jsonl`` records it: ``{"type": "security", ...}``."""
    return {"type": "security", "what": what, "from": source, "check": check, **extra}


def describe_data_plane(encryption: str, backend: str) -> str:
    """One line for the start of a run and for summary.md: is the data plane sealed?"""
    if str(backend).lower() == "nccl":
        return (
            "data plane: NCCL, PLAINTEXT (gossip.encryption does not apply to NCCL: use it only "
            "inside one trusted cluster)"
        )
    if encryption == "none":
        return (
            "data plane: PLAINTEXT (gossip.encryption=none): anyone who reaches the Gloo and "
            "store ports can read and alter blocks; for a trusted network only"
        )
    nccl = " (NCCL, if gossip.backend=auto picks it, stays plaintext)" if backend == "auto" else ""
    return (
        f"data plane: {encryption} per edge (X25519 + HKDF-SHA256 keys per phase), rendezvous "
        f"authenticated with HMAC-SHA256{nccl}"
    )


# ---------------------------------------------------------------------- run key


def new_run_key() -> str:
    """A fresh per-run key (hex). The coordinator makes it; only Flower messages carry it."""
    return secrets.token_hex(32)


def parse_run_key(key: str | bytes | None) -> bytes | None:
    """Hex (as it travels in Flower messages) or raw bytes -> 32 bytes; None/"" -> None."""
    if key is None or key == "" or key == b"":
        return None
    raw = bytes.fromhex(key) if isinstance(key, str) else bytes(key)
    if len(raw) < 16:
        raise ValueError(f"the run's store key has {len(raw)} bytes; expected at least 16")
    return raw


def run_fingerprint(run_key: bytes) -> bytes:
    """8 public bytes naming the run in every AAD (the key itself never goes there)."""
    return hashlib.sha256(b"deca-flower/run-id\0" + run_key).digest()[:8]


# ---------------------------------------------------------------------- authenticated store


class AuthenticatedStore(dist.Store):
    """A ``torch.distributed.Store`` whose values carry HMAC-SHA256 under the run key.

    ``inner`` is the group's ``PrefixStore`` over the coordinator's ``TCPStore``; ``scope``
    (the group name) is bound into every MAC, so a value copied from another group, phase or
    key never verifies. ``rank`` is the writer rank this process claims in its envelopes.
    Rejections are appended to ``events`` (see :func:`security_event`). Works as the store of
    ``init_process_group("gloo", store=...)``: Gloo's address exchange is authenticated too.
    Counters (``add``) cannot carry a MAC and are refused: fail closed.
    """

    def __init__(
        self, inner: dist.Store, run_key: bytes, rank: int, scope: str, timeout_s: float
    ) -> None:
        super().__init__()
        self.inner = inner
        self._key = run_key
        self.rank = int(rank)
        self.scope = scope
        self.timeout_s = float(timeout_s)
        self.events: list[dict[str, Any]] = []
        self._seen: set[bytes] = set()

    # -- envelopes

    def _mac(self, key: str, rank: int, value: bytes) -> bytes:
        msg = b"\0".join([b"deca-store/v1", self.scope.encode(), key.encode()])
        return hmac.new(self._key, msg + struct.pack(">i", rank) + value, hashlib.sha256).digest()

    def seal(self, key: str, value: bytes | str) -> bytes:
        """The envelope this process writes for ``key`` (public so tests can build forgeries)."""
        data = value.encode() if isinstance(value, str) else bytes(value)
        head = _STORE_HEAD.pack(_STORE_MAGIC, self.rank, self._mac(key, self.rank, data))
        return head + data

    def verify(self, key: str, raw: bytes) -> tuple[bytes | None, int | None, str]:
        """(value, claimed rank, "") if ``raw`` verifies, else (None, claimed rank, why)."""
        if len(raw) < _STORE_HEAD.size or raw[:4] != _STORE_MAGIC:
            return None, None, "no HMAC envelope (written without the run's store key)"
        _, rank, tag = _STORE_HEAD.unpack_from(raw)
        value = raw[_STORE_HEAD.size :]
        if not hmac.compare_digest(tag, self._mac(key, rank, value)):
            return None, rank, "HMAC-SHA256 under the run's store key does not verify"
        return value, rank, ""

    def reject(self, key: str, raw: bytes) -> str:
        """Record ``raw`` (found at ``key``) as rejected if it does not verify; say why."""
        value, rank, why = self.verify(key, raw)
        return "" if value is not None else self._reject(key, raw, rank, why)

    def _reject(self, key: str, raw: bytes, rank: int | None, why: str) -> str:
        claimed = "no rank" if rank is None else f"rank {rank}"
        message = f"store key {self.scope}/{key!r}, value claiming {claimed}: {why}"
        digest = hashlib.sha256(raw).digest()
        if digest not in self._seen:  # one event per distinct forged value, not per poll
            self._seen.add(digest)
            self.events.append(
                security_event(
                    "store value rejected",
                    claimed,
                    "store-hmac",
                    key=f"{self.scope}/{key}",
                    detail=why,
                )
            )
        return message

    # -- torch.distributed.Store interface

    def set(self, key: str, value: bytes | str) -> None:
        self.inner.set(key, self.seal(key, value))

    def get(self, key: str) -> bytes:
        """The verified value; a forged one is recorded and waited out until the deadline."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            raw = bytes(self.inner.get(key))
            value, rank, why = self.verify(key, raw)
            if value is not None:
                return value
            message = self._reject(key, raw, rank, why)
            if time.monotonic() > deadline:
                raise StoreAuthError(
                    f"{message}; no valid value arrived within {self.timeout_s:g} s. A process "
                    "that is not a member of this run wrote it (or a member has another run's "
                    "key); check who can reach the coordinator's store port (docs/security.md)"
                )
            time.sleep(_RETRY_S)

    def peek(self, key: str) -> bytes | None:
        """The verified value if ``key`` holds one now, else None (a forgery is recorded)."""
        if not self.inner.check([key]):
            return None
        raw = bytes(self.inner.get(key))
        value, rank, why = self.verify(key, raw)
        if value is None:
            self._reject(key, raw, rank, why)
        return value

    def multi_get(self, keys: list[str]) -> list[bytes]:
        return [self.get(k) for k in keys]

    def multi_set(self, keys: list[str], values: list[bytes | str]) -> None:
        for k, v in zip(keys, values, strict=True):
            self.set(k, v)

    def compare_set(self, key: str, expected: bytes | str, desired: bytes | str) -> bytes:
        """Write-once claims: only ``expected == ""`` (set if absent); returns the raw value."""
        if expected not in ("", b""):
            raise StoreAuthError("AuthenticatedStore.compare_set supports expected='' only")
        return bytes(self.inner.compare_set(key, "", self.seal(key, desired)))

    def add(self, key: str, amount: int) -> int:
        raise StoreAuthError(
            f"store key {self.scope}/{key!r}: counters (add) cannot be authenticated; "
            "the authenticated store refuses them"
        )

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        if timeout is None:
            self.inner.wait(keys)
        else:
            self.inner.wait(keys, timeout)

    def check(self, keys: list[str]) -> bool:
        return self.inner.check(keys)

    def delete_key(self, key: str) -> bool:
        return self.inner.delete_key(key)

    def num_keys(self) -> int:
        return self.inner.num_keys()

    def set_timeout(self, timeout: timedelta) -> None:
        self.inner.set_timeout(timeout)


# ---------------------------------------------------------------------- edge keys


class EdgeKeys:
    """This peer's ephemeral X25519 key pair for one group, and its directed edge keys."""

    def __init__(self, run_key: bytes, group_name: str, rank: int) -> None:
        self._private = X25519PrivateKey.generate()  # fresh per group: a rejoin gets new keys
        self.public = self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self._salt = hashlib.sha256(b"deca-flower/edge-salt\0" + run_key).digest()
        self.group_name = group_name
        self.rank = int(rank)

    def derive(self, peer: int, peer_public: bytes) -> tuple[AESGCM, AESGCM]:
        """(key for this rank -> peer, key for peer -> this rank)."""
        if len(peer_public) != 32:
            raise ValueError(f"rank {peer} published a {len(peer_public)}-byte X25519 key")
        shared = self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        pubs = {self.rank: self.public, int(peer): peer_public}
        return (
            AESGCM(self._hkdf(shared, self.rank, int(peer), pubs)),
            AESGCM(self._hkdf(shared, int(peer), self.rank, pubs)),
        )

    def _hkdf(self, shared: bytes, sender: int, receiver: int, pubs: dict[int, bytes]) -> bytes:
        info = b"\0".join(
            [
                b"deca-flower/edge-key/v%d" % PROTOCOL_VERSION,
                self.group_name.encode(),
                struct.pack(">ii", sender, receiver),
                pubs[sender],
                pubs[receiver],
            ]
        )
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=self._salt, info=info).derive(shared)


# ---------------------------------------------------------------------- sealing


def nonce(kind: int, step: int, chunk: int) -> bytes:
    """96-bit nonce: kind (1 byte), chunk (3 bytes), step (8 bytes); unique per edge key."""
    if not 0 <= chunk < 1 << 24 or not 0 <= step < 1 << 63:
        raise ValueError(f"nonce out of range: step {step}, chunk {chunk}")
    return struct.pack(">B", kind) + chunk.to_bytes(3, "big") + struct.pack(">Q", step)


@dataclass(frozen=True)
class ChunkContext:
    """What both ends of an edge bind into every chunk's AAD (the receiver's expectation)."""

    run: bytes  # run_fingerprint
    group: str
    sender: int
    receiver: int
    kind: int
    block_id: int
    dtype_code: int
    numel: int

    def aad(self, step: int, chunk: int, count: int) -> bytes:
        head = struct.pack(
            ">HB8sBqiiBqqII",
            0xDECA,
            PROTOCOL_VERSION,
            self.run,
            self.kind,
            step,
            self.sender,
            self.receiver,
            self.dtype_code,
            self.block_id,
            self.numel,
            chunk,
            count,
        )
        return head + self.group.encode()


def chunks(nbytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """(offset, length) of each plaintext chunk; at least one (possibly empty) chunk."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk size must be positive, got {chunk_bytes}")
    return [(o, min(chunk_bytes, nbytes - o)) for o in range(0, nbytes, chunk_bytes)] or [(0, 0)]


def sealed_size(nbytes: int, chunk_bytes: int) -> int:
    return nbytes + TAG_BYTES * len(chunks(nbytes, chunk_bytes))


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable, zero-copy byte view of a contiguous CPU tensor."""
    return memoryview(t.detach().view(torch.uint8).numpy()).cast("B")


class ChunkSealer:
    """Seals/opens one message (a block or a header) chunk by chunk into preallocated buffers.

    Sealed layout: chunk c's ciphertext and tag occupy ``[o_c + 16 c, o_c + 16 (c+1) + len_c)``.
    ``seal_chunk``/``open_chunk`` use ``encrypt_into``/``decrypt_into`` (no allocation: the
    spec measured allocation as most of the cost) and release the GIL, so Gloo's threads send
    chunk k while chunk k+1 is sealed.
    """

    def __init__(self, nbytes: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.nbytes = int(nbytes)
        self.layout = chunks(self.nbytes, int(chunk_bytes))
        self.sealed_bytes = self.nbytes + TAG_BYTES * len(self.layout)

    @property
    def count(self) -> int:
        return len(self.layout)

    def sealed_span(self, c: int) -> tuple[int, int]:
        offset, length = self.layout[c]
        return offset + TAG_BYTES * c, length + TAG_BYTES

    def iter_spans(self) -> Iterator[tuple[int, int, int]]:
        for c in range(self.count):
            yield (c, *self.sealed_span(c))

    def seal_chunk(
        self,
        key: AESGCM,
        ctx: ChunkContext,
        step: int,
        c: int,
        plain: memoryview,
        sealed: memoryview,
    ) -> None:
        offset, length = self.layout[c]
        start, size = self.sealed_span(c)
        aad = ctx.aad(step, c, self.count)
        key.encrypt_into(
            nonce(ctx.kind, step, c),
            plain[offset : offset + length],
            aad,
            sealed[start : start + size],
        )

    def open_chunk(
        self,
        key: AESGCM,
        ctx: ChunkContext,
        step: int,
        c: int,
        sealed: memoryview,
        plain: memoryview,
    ) -> None:
        """Verify and decrypt chunk c into ``plain``; raise :class:`SealedOpenError` if it fails.

        On failure ``plain`` may hold garbage for that chunk: callers decrypt into receive
        buffers and touch the committed block only after every chunk has verified.
        """
        offset, length = self.layout[c]
        start, size = self.sealed_span(c)
        aad = ctx.aad(step, c, self.count)
        try:
            key.decrypt_into(
                nonce(ctx.kind, step, c),
                sealed[start : start + size],
                aad,
                plain[offset : offset + length],
            )
        except InvalidTag:
            raise SealedOpenError(
                f"chunk {c} of {self.count} (step {step}) fails AES-256-GCM authentication "
                "(forged, tampered, truncated, replayed from another step or phase, reordered, "
                "or spliced from another edge or block)",
                chunk=c,
                check="aead",
            ) from None
