"""Data plane: per-step block gossip between DECA peers over ``torch.distributed``.

Each DECA peer sends its active block ``x_half`` (eq. 6) to its graph neighbours, receives
theirs, and mixes ``x_i = sum_j w_ij x_half_j`` (eq. 7). Peers are separate processes (Flower
ClientApps in Ray actors, or SuperNodes at different sites), so the exchange runs over
point-to-point ``torch.distributed`` (Gloo over TCP by default, NCCL where every peer owns a
distinct GPU). Rendezvous goes through a ``TCPStore`` hosted by the coordinator
(:func:`host_store`); every phase joins a fresh process group under its own store prefix.

This module is framework-free: it never imports ``flwr``.

Wire protocol of one :class:`GossipGroup`:

1. join: every rank publishes its row of W in the store and waits for all ranks, so a peer
   that never shows up, a duplicated rank and an asymmetric W fail fast with names.
2. header (tag 0), once per group and whenever the block size or block id changes: a tiny
   float64 vector (rank, numel, block id, wire dtype). Neighbours on another block or with
   another size are reported before any payload moves, because Gloo aborts the whole process
   when a payload is larger than the receive buffer.
3. payload (a tag derived from the header), every step: one wire tensor of
   ``codec.wire_numel(numel)`` elements to each neighbour and nothing else (invariant 12).
   The codec (:mod:`deca_flower.compression`, ``gossip.compression``) turns the fp32 block
   into that tensor and back; by default it is the plain ``algorithm.wire_dtype`` cast.

Layering of one exchange: ``encode`` (block -> wire tensor of a size known from ``numel``)
-> ``_transfer`` (the wire tensor, byte for byte: plain ``_run_p2p``, or sealed in chunks
when encrypted) -> ``decode``. A codec with error feedback
(int8, top-k: CHOCO-Gossip) keeps per-node state, so its caller encodes and decodes and
hands this module the wire tensor only (:meth:`GossipGroup.exchange_wire`).

Security (``gossip.encryption``, default ``aes-256-gcm``; ``docs/security.md``): with the
run's key every store value carries an HMAC (:class:`~deca_flower.secure_channel.
AuthenticatedStore`, also under Gloo's own rendezvous), the join entry carries a fresh X25519
public key, and the header and every payload travel sealed per directed edge in 8 MiB
AES-256-GCM chunks (:class:`~deca_flower.sealed_p2p.SealedLinks`), all verified before
anything is mixed. What is sealed is the codec's wire tensor (``encode`` -> seal -> send ->
open -> ``decode``), so compressed formats are encrypted exactly like the plain cast; the
AAD names the format's code and the wire tensor's element count. Without the key an
encrypted group refuses to start; ``"none"`` is plaintext (the store is still authenticated
when a key is given); NCCL is always plaintext.

Mixing order (shared with the in-process engine through :func:`mix_blocks`)::

    mixed_i = zeros(fp32)
    for j in sorted(neighbours + [i]):
        mixed_i = mixed_i + fp32(w_ij) * x_j      # one rounding for *, one for +

so a multi-process run and the in-process engine agree bit for bit.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from deca_flower.compression import CastCodec, Codec
from deca_flower.gossip_errors import GossipError, GossipSecurityError
from deca_flower.sealed_p2p import SealedLinks, WireChunk, WireTap
from deca_flower.secure_channel import (
    DEFAULT_CHUNK_BYTES,
    ENCRYPTIONS,
    KIND_HEADER,
    KIND_PAYLOAD,
    KIND_REDUCE,
    AuthenticatedStore,
    ChunkSealer,
    StoreAuthError,
    parse_run_key,
)

__all__ = [
    "GossipError",
    "GossipGroup",
    "GossipSecurityError",
    "WireChunk",
    "GossipStats",
    "choose_backend",
    "handshake_barrier",
    "host_store",
    "mix_blocks",
    "resolve_wire_dtype",
]

log = logging.getLogger(__name__)

_BACKENDS = ("gloo", "nccl")
_WIRE_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
# Codes put in the header so that a neighbour with another wire dtype is named, not misread.
_WIRE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_HEADER_MAGIC = 0x0DECA
_HEADER_LEN = 5  # magic, sender rank, numel, block id, wire code
_HEADER_TAG = 0
_REDUCE_TAG = (1 << 30) + (1 << 25)  # above every block tag (1 + crc % 2**30 + chunk)
_STORE_NS = "deca-gossip"  # our keys inside the group prefix; torch's own keys live elsewhere
_ROW_SUM_TOL = 1e-6
_SYMMETRY_TOL = 1e-9


@dataclass
class GossipStats:
    """Traffic counters of one group (bytes this peer sent / received).

    ``bytes_sent``/``bytes_received`` count block payload only (invariant 12): exactly the
    wire tensors (codes and scales of a compressed format); the per-group header goes to
    ``control_bytes`` (sent). ``seconds`` is wall time inside exchanges, ``overlapped_s`` the
    part of it spent computing while the transfer was in flight (``during=``), so the time
    blocked on the network is ``seconds - overlapped_s``.
    ``wire_bytes_sent``/``wire_bytes_received`` count what the block payload took on the wire:
    with encryption, the wire tensor plus one 16-byte tag per chunk; ``crypto_seconds`` is
    the time spent sealing and opening (partly overlapped with the transfer).
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    exchanges: int = 0
    control_bytes: int = 0
    wire_bytes_sent: int = 0
    wire_bytes_received: int = 0
    crypto_seconds: float = 0.0
    overlapped_s: float = 0.0


def host_store(
    host: str = "0.0.0.0",
    port: int = 0,
    world_size: int | None = None,
    timeout_s: float = 300,
) -> tuple[dist.TCPStore, int]:
    """Host the rendezvous store (coordinator side). Returns the store and its actual port.

    ``port=0`` lets the OS pick a free port. ``host`` "0.0.0.0" (or "" / "::") listens on all
    interfaces; any other address binds that interface only (torch's TCPStore would otherwise
    listen everywhere). The store itself accepts anyone: peers authenticate every value they
    write and read with the run's key (``AuthenticatedStore``), but anyone who reaches the
    port can still delete or overwrite keys (a denial of service): firewall it
    (docs/security.md).
    Keep the returned store alive for as long as peers may join groups: the server dies with it.
    """
    listen_fd = None
    if host not in ("", "0.0.0.0", "::"):
        # Bind the requested interface ourselves and hand the listening socket to TCPStore.
        sock = socket.create_server((host, port), backlog=1024)
        port = sock.getsockname()[1]
        listen_fd = sock.detach()  # the store owns the descriptor from here on
    store = dist.TCPStore(
        host or "0.0.0.0",
        port,
        world_size,
        is_master=True,
        timeout=timedelta(seconds=timeout_s),
        # The coordinator must not block here: peers join later, once per phase.
        wait_for_workers=False,
        master_listen_fd=listen_fd,
    )
    return store, int(store.port)


def handshake_barrier(
    host: str,
    port: int,
    group_name: str,
    rank: int,
    world_size: int,
    timeout_s: float,
    *,
    store_key: str | bytes | None = None,
) -> None:
    """Arrive at the coordinator's store and wait until all ``world_size`` peers have.

    Raises TimeoutError if they are not all there within ``timeout_s``, or if this peer
    arrived after others gave up. With the run's key each arrival is an authenticated entry
    (a forged one is recorded and ignored); without it, plain counters (trusted networks).
    """
    try:
        client = dist.TCPStore(
            host, port, is_master=False, wait_for_workers=False,
            timeout=timedelta(seconds=timeout_s),
        )  # fmt: skip
    except Exception as err:  # DistNetworkError, TimeoutError, socket errors
        raise ConnectionError(
            f"rank {rank} could not reach the gossip store at {host}:{port} within "
            f"{timeout_s:.0f} s ({type(err).__name__}). Set gossip.advertise_host (run config "
            "overrides) to an address of the coordinator's host that every site can reach, or "
            "the site's `store-host` in --node-config, and open that port (gossip.store_port) "
            "to the sites"
        ) from None
    run_key = parse_run_key(store_key)
    if run_key is None:
        arrived, gave_up = _counter_barrier(client, group_name, world_size, timeout_s)
    else:
        store = AuthenticatedStore(
            dist.PrefixStore(group_name, client), run_key, rank, group_name, timeout_s
        )
        arrived, gave_up = _sealed_barrier(store, rank, world_size, timeout_s)
    if arrived < world_size:
        raise TimeoutError(
            f"only {arrived} of {world_size} DECA peers were running at the same time after "
            f"{timeout_s:.0f} s (rank {rank} waited)"
        )
    if gave_up:  # we arrived last, after others had given up waiting for us
        raise TimeoutError(
            f"rank {rank} arrived after other peers gave up: not all {world_size} DECA peers "
            "were running at the same time"
        )


def _counter_barrier(
    store: dist.Store, group_name: str, world_size: int, timeout_s: float
) -> tuple[int, bool]:
    key, failed = f"{group_name}/arrived", f"{group_name}/gave-up"
    store.add(key, 1)
    deadline = time.monotonic() + timeout_s
    while (arrived := store.add(key, 0)) < world_size:
        if time.monotonic() > deadline:
            store.add(failed, 1)
            return arrived, True
        time.sleep(0.2)
    return arrived, bool(store.add(failed, 0))


def _sealed_barrier(
    store: AuthenticatedStore, rank: int, world_size: int, timeout_s: float
) -> tuple[int, bool]:
    # Each arrival carries this process's own token, so a second site with the same
    # partition-id is named here instead of leaving the barrier one arrival short.
    token = os.urandom(8).hex().encode()
    key = f"arrived/{rank}"
    if store.peek(key) not in (None, token):
        raise _duplicate_rank(rank)
    store.set(key, token)
    deadline = time.monotonic() + timeout_s
    while (arrived := sum(store.peek(f"arrived/{r}") is not None for r in range(world_size))) < (
        world_size
    ):
        if store.peek(key) != token:
            raise _duplicate_rank(rank)
        if time.monotonic() > deadline:
            store.set(f"gave-up/{rank}", b"1")
            return arrived, True
        time.sleep(0.2)
    return arrived, any(store.peek(f"gave-up/{r}") is not None for r in range(world_size))


def _duplicate_rank(rank: int) -> ValueError:
    return ValueError(
        f"two sites have partition-id={rank}: another site arrived with it first; give every "
        "site a distinct partition-id (its --node-config)"
    )


def choose_backend(requested: str = "auto", device: torch.device | str = "cpu") -> str:
    """Pick the process-group backend.

    ``"auto"`` gives ``"nccl"`` for a CUDA device when NCCL is available, else ``"gloo"``.
    NCCL needs a distinct GPU per peer; when several simulated peers share one GPU, set
    ``gossip.backend=gloo`` (blocks are then staged through host memory).
    """
    dev = torch.device(device)
    name = str(requested).strip().lower()
    if name == "auto":
        nccl_ok = dist.is_available() and dist.is_nccl_available()
        return "nccl" if dev.type == "cuda" and nccl_ok else "gloo"
    if name not in _BACKENDS:
        raise ValueError(
            f"gossip.backend={requested!r} is not supported; use 'auto', 'gloo' or 'nccl'"
        )
    if name == "nccl":
        if dev.type != "cuda":
            raise ValueError(
                f"gossip.backend='nccl' needs a CUDA device, but the block lives on {dev}; "
                "set gossip.backend=gloo (or auto)"
            )
        if not dist.is_nccl_available():
            raise ValueError(
                "gossip.backend='nccl' but this torch build has no NCCL; set gossip.backend=gloo"
            )
    return name


def resolve_wire_dtype(wire_dtype: torch.dtype | str | None) -> torch.dtype:
    """Map ``None``/dtype/name (``fp32``, ``bf16``, ``fp16``, ...) to the dtype sent on the wire."""
    if wire_dtype is None:
        return torch.float32
    if isinstance(wire_dtype, torch.dtype):
        if wire_dtype in _WIRE_CODES:
            return wire_dtype
    elif str(wire_dtype).strip().lower() in _WIRE_DTYPES:
        return _WIRE_DTYPES[str(wire_dtype).strip().lower()]
    raise ValueError(
        f"algorithm.wire_dtype resolved to {wire_dtype!r}, which is not supported; the wire "
        "carries float32, bfloat16 or float16"
    )


def mix_blocks(
    blocks: Mapping[int, torch.Tensor],
    weights: Mapping[int, float],
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference mixing ``sum_j w_j * x_j`` in fp32, in ascending rank order.

    ``acc = 0; for j in sorted(blocks): acc = acc + fp32(w_j) * x_j``, with a separate
    rounding for the product and for the sum (no fused multiply-add), so that the result is
    bit-reproducible and equal to the plain Python loop written that way. The in-process
    engine and :meth:`GossipGroup.mix` both call this function, which is what makes them agree
    bit for bit. ``out`` (optional) receives the result and must not alias any input.
    """
    if set(blocks) != set(weights):
        raise ValueError(
            f"mixing weights cover ranks {sorted(weights)} but blocks come from {sorted(blocks)}"
        )
    if not blocks:
        raise ValueError("mix_blocks needs at least one block (the peer's own)")
    order = sorted(blocks)
    first = blocks[order[0]]
    acc = torch.zeros_like(first, dtype=torch.float32) if out is None else out.zero_()
    scratch = torch.empty_like(acc)
    for j in order:
        x = blocks[j]
        if x.shape != acc.shape:
            raise ValueError(f"block of rank {j} has shape {tuple(x.shape)}, expected {acc.shape}")
        torch.mul(x.to(torch.float32), float(weights[j]), out=scratch)
        acc.add_(scratch)
    return acc


def _validate_row(
    rank: int,
    world_size: int,
    neighbours: list[int],
    weights: Mapping[int, float],
    self_weight: float,
) -> tuple[list[int], dict[int, float]]:
    """Check this peer's row of W locally (before any network), return it normalised."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    nbrs = sorted(int(j) for j in neighbours)
    if len(set(nbrs)) != len(nbrs):
        raise ValueError(f"rank {rank}: duplicate neighbours in {neighbours}")
    for j in nbrs:
        if j == rank or not 0 <= j < world_size:
            raise ValueError(f"rank {rank}: neighbour {j} is itself or outside [0, {world_size})")
    w = {int(j): float(v) for j, v in weights.items()}
    if set(w) != set(nbrs):
        raise ValueError(
            f"rank {rank}: weights are given for ranks {sorted(w)} but neighbours are {nbrs}"
        )
    if self_weight < 0 or any(v < 0 for v in w.values()):
        raise ValueError(f"rank {rank}: mixing weights must be non-negative, got {w}")
    row_sum = float(self_weight) + sum(w.values())
    if abs(row_sum - 1.0) > _ROW_SUM_TOL:
        raise ValueError(
            f"rank {rank}: mixing weights sum to {row_sum!r}, expected 1 (W must be doubly "
            "stochastic, or mixing no longer preserves the average)"
        )
    return nbrs, w


def _first_line(exc: BaseException) -> str:
    """torch's C++ errors carry a long stack trace: keep the sentence that says what happened."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _device_id(device: torch.device) -> str:
    """Identity of the accelerator this peer uses, to catch NCCL peers sharing one GPU."""
    if device.type != "cuda":
        return f"{socket.gethostname()}/{device}"
    props = torch.cuda.get_device_properties(device)
    return f"{socket.gethostname()}/{getattr(props, 'uuid', device.index)}"


class GossipGroup:
    """One peer's membership in the gossip process group of one phase.

    Joins with ``init_process_group(backend, store=PrefixStore(group_name, TCPStore client))``.
    ``group_name`` must be unique per phase *attempt* (e.g. ``f"run{run_id}/phase{i}/try{k}"``):
    the store keeps each group's keys, and a reused name is reported as a duplicate rank.
    torch.distributed allows one default group per process, so close the group (or use it as
    a context manager) before the same process joins the next one.

    For deployments across machines, Gloo picks its network interface from the host name;
    set ``GLOO_SOCKET_IFNAME`` on each site if that resolves to a loopback address.
    """

    def __init__(
        self,
        store_host: str,
        store_port: int,
        rank: int,
        world_size: int,
        neighbours: list[int],
        weights: dict[int, float],
        self_weight: float,
        *,
        group_name: str,
        backend: str = "gloo",
        device: torch.device | str = "cpu",
        wire_dtype: torch.dtype | str | None = None,
        timeout_s: float = 300,
        encryption: str = "aes-256-gcm",
        store_key: str | bytes | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        tap: WireTap | None = None,
        codec: Codec | None = None,
    ) -> None:
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.neighbours, self.weights = _validate_row(
            self.rank, self.world_size, neighbours, weights, self_weight
        )
        self.self_weight = float(self_weight)
        self.group_name = group_name
        self.device = self._normalise_device(device)
        self.backend = choose_backend(backend, self.device)
        if codec is not None and wire_dtype is not None:
            raise ValueError("give GossipGroup a wire_dtype or a codec, not both")
        self.codec = codec if codec is not None else CastCodec(resolve_wire_dtype(wire_dtype))
        self.wire_dtype = self.codec.wire_dtype
        self.timeout_s = float(timeout_s)
        self.stats = GossipStats()
        self._auth: AuthenticatedStore | None = None
        self._links: SealedLinks | None = None  # sealed transport, made at join
        self._run_key = parse_run_key(store_key)
        self.encryption = self._resolve_encryption(encryption)
        self.chunk_bytes = int(chunk_bytes)
        self._tap = tap
        self._step = 0  # payload exchanges so far: the nonce's step, never reused per key
        self._header_seq = 0
        self._reduce_seq = 0
        # Gloo moves host memory only: blocks on a GPU are staged through (pinned) CPU buffers.
        self._comm_device = self.device if self.backend == "nccl" else torch.device("cpu")
        self._key: tuple[int, int] | None = None
        self._tag = 1
        self._buffers: dict[str, Any] = {}
        self._broken = False
        self._joined = False
        self._store: dist.Store | None = None
        self._join(store_host, int(store_port))

    # ------------------------------------------------------------------ lifecycle

    def _resolve_encryption(self, encryption: str) -> str:
        """Fail closed: encryption needs the run key; only an explicit "none" is plaintext."""
        name = str(encryption).strip().lower()
        if name not in ENCRYPTIONS:
            raise ValueError(
                f"gossip.encryption={encryption!r} is not supported; use one of {list(ENCRYPTIONS)}"
            )
        if name == "none":
            return "none"
        if self.backend == "nccl":
            # NCCL moves GPU memory directly; sealing would stage every block through the host.
            log.warning(
                "rank %d: gossip.backend=nccl is plaintext: gossip.encryption does not apply "
                "(use NCCL only inside one trusted cluster)",
                self.rank,
            )
            return "none"
        if self._run_key is None:
            raise GossipError(
                f"rank {self.rank}: gossip.encryption={name!r} but this node has no keys for "
                f"group {self.group_name!r} (the coordinator's store key did not arrive): "
                "refusing to send. Plaintext needs an explicit gossip.encryption=none"
            )
        return name

    @property
    def encrypted(self) -> bool:
        return self.encryption != "none"

    @staticmethod
    def _normalise_device(device: torch.device | str) -> torch.device:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        return dev

    def _join(self, host: str, port: int) -> None:
        if dist.is_initialized():
            raise GossipError(
                f"rank {self.rank}: torch.distributed already has a process group in this "
                "process (a previous GossipGroup was not closed?); close it before joining "
                f"group {self.group_name!r}"
            )
        self._store = self._connect(host, port)
        try:
            self._rendezvous(self._store)
        except GossipError:
            raise
        except StoreAuthError as exc:
            raise self._store_error(exc) from exc
        except (RuntimeError, dist.DistError) as exc:  # the coordinator went away mid-join
            raise GossipError(
                f"rank {self.rank}: lost the coordinator's store at {host}:{port} while joining "
                f"group {self.group_name!r} ({_first_line(exc)}); the ServerApp may have stopped"
            ) from exc
        self._init_process_group(self._store)
        self._joined = True
        log.debug("rank %d joined gossip group %s", self.rank, self.group_name)

    def _connect(self, host: str, port: int) -> dist.Store:
        try:
            client = dist.TCPStore(
                host, port, is_master=False, timeout=timedelta(seconds=self.timeout_s)
            )
        except (RuntimeError, dist.DistError) as exc:
            raise GossipError(
                f"rank {self.rank}: cannot reach the coordinator's store at {host}:{port} "
                f"within {self.timeout_s:g} s ({_first_line(exc)}); check the address in the "
                "phase message and the firewall, or raise gossip.timeout_s"
            ) from exc
        # One prefix per phase: groups of different phases never see each other's keys.
        store = dist.PrefixStore(self.group_name, client)
        if self._run_key is None:
            return store
        self._auth = AuthenticatedStore(
            store, self._run_key, self.rank, self.group_name, timeout_s=self.timeout_s
        )
        return self._auth

    def _store_error(self, exc: BaseException) -> GossipError:
        """A store value that never verified: name the key and the claimed rank."""
        return GossipSecurityError(
            f"rank {self.rank}, group {self.group_name!r}: rendezvous rejected: {_first_line(exc)}",
            self.events,
        )

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every rejection so far: forged store values (also ones outlived) and bad payloads."""
        store_events = self._auth.events if self._auth is not None else []
        payload_events = self._links.events if self._links is not None else []
        return [*store_events, *payload_events]

    def _init_process_group(self, store: dist.Store) -> None:
        if self.backend == "nccl":
            torch.cuda.set_device(self.device)
        _reset_group_counter()
        try:
            dist.init_process_group(
                self.backend,
                store=store,
                rank=self.rank,
                world_size=self.world_size,
                timeout=timedelta(seconds=self.timeout_s),
                device_id=self.device if self.backend == "nccl" else None,
            )
        except (RuntimeError, dist.DistError) as exc:
            if "store key" in str(exc) and isinstance(store, AuthenticatedStore):
                raise self._store_error(exc) from exc  # Gloo's address exchange was forged
            raise GossipError(
                f"rank {self.rank}: could not set up the {self.backend} group "
                f"{self.group_name!r} ({_first_line(exc)}); raise gossip.timeout_s if peers "
                "are slow to start, or set gossip.backend=gloo if peers share a GPU"
            ) from exc

    def _rendezvous(self, store: dist.Store) -> None:
        """Publish this row of W, wait for every rank, and check the rows agree."""
        self._claim(store)
        info = {
            "world_size": self.world_size,
            "backend": self.backend,
            "wire": self._wire_code,
            "neighbours": {str(j): w for j, w in self.weights.items()},
            "device": _device_id(self.device),
            "encryption": self.encryption,
        }
        if self.encrypted:
            # A fresh key pair per group: its public half is authenticated by the store's HMAC.
            self._links = SealedLinks(
                self.rank,
                self.group_name,
                self._run_key,
                chunk_bytes=self.chunk_bytes,
                tap=self._tap,
                p2p_error=self._p2p_error,
            )
            info["x25519"] = self._links.public.hex()
        store.set(f"{_STORE_NS}/join/{self.rank}", json.dumps(info))
        keys = [f"{_STORE_NS}/join/{r}" for r in range(self.world_size)]
        try:
            store.wait(keys, timedelta(seconds=self.timeout_s))
        except (RuntimeError, dist.DistError) as exc:
            missing = [r for r, k in enumerate(keys) if not store.check([k])]
            raise GossipError(
                f"rank {self.rank}: ranks {missing} never joined group {self.group_name!r} "
                f"within {self.timeout_s:g} s (expected all {self.world_size} peers); check that "
                "those nodes are alive and that the simulation can run all peers at once, or "
                "raise gossip.timeout_s"
            ) from exc
        infos = [json.loads(raw) for raw in store.multi_get(keys)]
        self._check_rows(infos)
        if self.encrypted:
            self._links.set_publics(
                {r: bytes.fromhex(info["x25519"]) for r, info in enumerate(infos)}
            )

    def _claim(self, store: dist.Store) -> None:
        """Claim this rank once per group; a second claim is a duplicate rank or reused name."""
        key = f"{_STORE_NS}/claim/{self.rank}"
        duplicate = GossipError(
            f"rank {self.rank} joined group {self.group_name!r} 2 times: two peers "
            "share one rank (check partition-id in the node config), or the coordinator "
            "reused a group name; group names must be unique per phase attempt"
        )
        if not isinstance(store, AuthenticatedStore):
            claims = store.add(key, 1)
            if claims != 1:
                raise GossipError(str(duplicate).replace("2 times", f"{claims} times"))
            return
        token = json.dumps({"rank": self.rank, "nonce": os.urandom(16).hex()})
        mine = store.seal(key, token)
        current = store.compare_set(key, "", token)
        if current == mine:
            return
        if store.verify(key, current)[0] is not None:
            raise duplicate  # a member holding the run key claimed this rank first
        # A forged claim (no run key): record it, and take the rank with our valid claim.
        store.reject(key, current)
        store.set(key, token)

    def _check_rows(self, infos: list[dict[str, Any]]) -> None:
        """Every rank checks the whole W it can see, so all ranks fail together, by name."""
        mine = {
            "world_size": self.world_size,
            "backend": self.backend,
            "wire": self._wire_code,
            "encryption": self.encryption,
        }
        problems: list[str] = []
        for r, info in enumerate(infos):
            problems += [
                f"rank {r} has {key}={info.get(key)!r}, this rank {value!r}"
                for key, value in mine.items()
                if info.get(key) != value
            ]
            problems += self._edge_problems(r, info["neighbours"].get(str(self.rank)))
        if self.backend == "nccl":
            problems += self._shared_gpus(infos)
        if problems:
            raise GossipError(
                f"rank {self.rank}: peers of group {self.group_name!r} disagree: "
                + "; ".join(problems)
                + " (each peer must get its row of the same symmetric W and the same "
                "gossip.* settings; NCCL needs one GPU per peer, else gossip.backend=gloo)"
            )

    def _edge_problems(self, r: int, theirs: float | None) -> list[str]:
        """Compare w_ij (this row) with w_ji (rank r's row): W must be symmetric."""
        mine = self.weights.get(r)
        if theirs is None and mine is not None:
            return [f"rank {r} is a neighbour here but does not list rank {self.rank}"]
        if theirs is not None and mine is None:
            return [f"rank {r} lists rank {self.rank} as a neighbour, but not vice versa"]
        if theirs is not None and mine is not None and abs(theirs - mine) > _SYMMETRY_TOL:
            return [f"rank {r} uses w={theirs!r} for edge ({r},{self.rank}), this rank {mine!r}"]
        return []

    @staticmethod
    def _shared_gpus(infos: list[dict[str, Any]]) -> list[str]:
        seen: dict[str, int] = {}
        out = []
        for r, info in enumerate(infos):
            if info["device"] in seen:
                out.append(f"ranks {seen[info['device']]} and {r} share GPU {info['device']}")
            seen.setdefault(info["device"], r)
        return out

    def close(self) -> None:
        """Leave the group and free torch.distributed's default group for the next one."""
        self._joined, self._broken = False, True
        self._buffers.clear()
        if self._links is not None:
            self._links.close()  # the group's keys die with it: the next group makes new ones
        self._store = None
        if dist.is_initialized():  # ours (one group per process), even if joining failed
            dist.destroy_process_group()
            log.debug("rank %d left gossip group %s", self.rank, self.group_name)

    def __enter__(self) -> GossipGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def degree(self) -> int:
        return len(self.neighbours)

    # ------------------------------------------------------------------ exchange

    def exchange(
        self,
        block: torch.Tensor,
        *,
        block_id: int = -1,
        during: Callable[[], object] | None = None,
    ) -> dict[int, torch.Tensor]:
        """Send ``block`` to every neighbour and return ``{rank: their block}`` in fp32.

        The block goes through the group's codec (encode -> wire -> decode); the codec must
        be stateless (a cast): error-feedback codecs go through :meth:`exchange_wire`.
        The returned tensors are buffers reused by the next call: read (or copy) them first.
        ``block_id`` identifies the active block so a neighbour on another block of the same
        size is caught. ``during`` (optional) runs while the transfer is in flight: compute
        that does not depend on the result (the next minibatch's frozen layers).
        Raises :class:`GossipError` naming the neighbour on failure.
        """
        if self.codec.error_feedback:
            raise ValueError(
                f"the {self.codec.name} codec keeps error-feedback state: encode with a "
                "ChocoMixer and call exchange_wire"
            )
        self._check_block(block)
        numel = block.numel()
        received = self._exchange(numel, block_id, lambda: self._encode(block), during)
        self.check_finite(block, received)
        return received

    def exchange_wire(
        self,
        wire: torch.Tensor,
        *,
        numel: int,
        block_id: int = -1,
        during: Callable[[], object] | None = None,
    ) -> dict[int, torch.Tensor]:
        """Send an already encoded message of a ``numel``-element block; return the
        neighbours' wire tensors (on this group's device, reused by the next call)."""
        self._check_open()
        want = (self.codec.wire_dtype, self.codec.wire_numel(numel))
        if wire.dim() != 1 or (wire.dtype, wire.numel()) != want or not wire.is_contiguous():
            raise ValueError(
                f"{self.codec.name} wire for {numel} elements must be a contiguous 1-D "
                f"{want[0]} tensor of {want[1]} elements, got {wire.dtype} {tuple(wire.shape)}"
            )

        def staged() -> torch.Tensor:
            send = self._buffers["send"]
            if send is None:
                return wire
            send.copy_(wire)
            return send

        return self._exchange(numel, block_id, staged, during)

    def check_finite(self, block: torch.Tensor, received: dict[int, torch.Tensor]) -> None:
        """Raise :class:`GossipError` naming every rank whose (decoded) block is not finite."""
        try:
            self._check_finite(block, received)
        except GossipError:
            self._broken = True
            raise

    def _exchange(
        self,
        numel: int,
        block_id: int,
        encode: Callable[[], torch.Tensor],
        during: Callable[[], object] | None,
    ) -> dict[int, torch.Tensor]:
        """Handshake if the block changed, encode, move the wire tensors (sealed when
        encrypted), decode."""
        start = time.perf_counter()
        try:
            key = (numel, int(block_id))
            if key != self._key:
                self._prepare(key)
            send = encode()
            self._transfer(send, int(block_id), during)
            received = self._decode(numel)
        except GossipError:
            self._broken = True
            raise
        finally:
            self.stats.seconds += time.perf_counter() - start
            self._step += 1  # also after a failure: a step number is never sealed twice
        payload = send.numel() * send.element_size() * self.degree
        if not self.encrypted:
            self.stats.wire_bytes_sent += payload
            self.stats.wire_bytes_received += payload
        self.stats.bytes_sent += payload
        self.stats.bytes_received += payload
        self.stats.exchanges += 1
        return received

    def mix(
        self,
        block: torch.Tensor,
        *,
        block_id: int = -1,
        out: torch.Tensor | None = None,
        during: Callable[[], object] | None = None,
    ) -> torch.Tensor:
        """Exchange, then return ``sum_j w_ij x_j`` over neighbours and self (eq. 7).

        Accumulates in fp32 in ascending rank order via :func:`mix_blocks`. ``block`` itself
        (the fp32 master copy, never its wire-rounded form) is the self term and is never
        modified; with a bf16/fp16 wire the neighbours' terms carry the wire rounding.
        """
        if out is not None and out.untyped_storage().data_ptr() == (
            block.untyped_storage().data_ptr()
        ):
            raise ValueError("mix(out=...) must not alias the input block")
        received = self.exchange(block, block_id=block_id, during=during)
        blocks = {**received, self.rank: block}
        weights = {**self.weights, self.rank: self.self_weight}
        return mix_blocks(blocks, weights, out=out)

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks, in place (the evaluation's parameter average).

        Plaintext groups use the backend's ``all_reduce``. Encrypted groups run a ring
        reduce-scatter + all-gather over sealed point-to-point messages (edge keys of the ring
        r -> r+1), so parameters never cross the wire in the clear; every rank gets the same
        bits. Like every ring all-reduce, rank r+1 sees partial sums starting with rank r's
        slice: members learn more than with gossip alone (docs/security.md).
        """
        if not self.encrypted:
            dist.all_reduce(tensor)
            return tensor
        self._check_open()
        if self.world_size == 1:
            return tensor
        host = tensor.detach().reshape(-1).to("cpu", torch.float32, copy=True)
        try:
            self._ring_all_reduce(host)
        except GossipError:
            self._broken = True
            raise
        with torch.no_grad():
            tensor.copy_(host.view(tensor.shape).to(tensor.dtype))
        return tensor

    def _ring_all_reduce(self, flat: torch.Tensor) -> None:
        n, r = self.world_size, self.rank
        segs = list(torch.tensor_split(flat, n))
        for s in range(n - 1):  # reduce-scatter: rank r ends with the sum of segment r+1
            incoming = torch.empty_like(segs[(r - s - 1) % n])
            self._ring_message(segs[(r - s) % n], incoming)
            segs[(r - s - 1) % n].add_(incoming)
        for s in range(n - 1):  # all-gather
            incoming = torch.empty_like(segs[(r - s) % n])
            self._ring_message(segs[(r + 1 - s) % n], incoming)
            segs[(r - s) % n].copy_(incoming)

    def _ring_message(self, send: torch.Tensor, recv: torch.Tensor) -> None:
        nxt, prv = (self.rank + 1) % self.world_size, (self.rank - 1) % self.world_size
        size_send = ChunkSealer(send.numel() * 4, self.chunk_bytes).sealed_bytes
        size_recv = ChunkSealer(recv.numel() * 4, self.chunk_bytes).sealed_bytes
        self._sealed(
            "reduce",
            self._links.ctx(KIND_REDUCE, -2, 0),
            self._reduce_seq,
            _REDUCE_TAG,
            sends={nxt: (send.contiguous(), torch.empty(size_send, dtype=torch.uint8))},
            recvs={prv: (torch.empty(size_recv, dtype=torch.uint8), recv)},
        )
        self._reduce_seq += 1

    def _sealed(self, what: str, *args: Any, **kw: Any) -> None:
        """One sealed exchange; keeps the crypto time and every rejection in view."""
        try:
            self._links.exchange(what, *args, timeout_s=self.timeout_s, **kw)
        except GossipSecurityError as exc:
            exc.security_events = self.events  # also the store's rejections so far
            raise
        finally:
            self.stats.crypto_seconds = self._links.crypto_seconds

    def _sealed_header(self, header: torch.Tensor, recv: dict[int, torch.Tensor]) -> None:
        sealed = ChunkSealer(header.numel() * header.element_size()).sealed_bytes
        self._sealed(
            "header",
            self._links.ctx(KIND_HEADER, -1, 255),
            self._header_seq,
            _HEADER_TAG,
            sends={j: (header, torch.empty(sealed, dtype=torch.uint8)) for j in self.neighbours},
            recvs={j: (torch.empty(sealed, dtype=torch.uint8), recv[j]) for j in self.neighbours},
        )
        self._header_seq += 1
        self.stats.control_bytes += sealed * self.degree

    def _check_open(self) -> None:
        if self._broken or not self._joined:
            raise GossipError(
                f"rank {self.rank}: group {self.group_name!r} is closed or failed earlier; "
                "join a new group"
            )

    @property
    def _wire_code(self) -> int | str:
        # Plain casts keep the old integer codes; compressed formats name their parameters.
        return self.codec.code if isinstance(self.codec, CastCodec) else self.codec.describe()

    def _check_block(self, block: torch.Tensor) -> None:
        self._check_open()
        if block.dim() != 1 or block.dtype != torch.float32 or not block.is_contiguous():
            raise ValueError(
                "gossip blocks must be contiguous 1-D float32 tensors (the fp32 master copy), "
                f"got shape {tuple(block.shape)} dtype {block.dtype}"
            )
        if block.device != self.device:
            raise ValueError(f"block is on {block.device} but the group uses {self.device}")

    def _prepare(self, key: tuple[int, int]) -> None:
        """(Re)allocate buffers for a new block size and agree on it with every neighbour."""
        numel, block_id = key
        self._handshake(numel, block_id)
        wire, comm, dev = self.wire_dtype, self._comm_device, self.device
        size = self.codec.wire_numel(numel)
        pin = comm.type == "cpu" and dev.type == "cuda"
        cast = isinstance(self.codec, CastCodec)
        # A cast to fp32 on the comm device sends the block itself; anything else is staged.
        staged = comm != dev or (cast and wire != torch.float32)
        bufs: dict[str, Any] = {
            "send": torch.empty(size, dtype=wire, device=comm, pin_memory=pin) if staged else None,
            "recv": {
                j: torch.empty(size, dtype=wire, device=comm, pin_memory=pin)
                for j in self.neighbours
            },
        }
        out_dtype = torch.float32 if cast else wire
        bufs["out"] = (
            {j: torch.empty(size, dtype=out_dtype, device=dev) for j in self.neighbours}
            if staged
            else bufs["recv"]
        )
        if self.encrypted:
            # Reused every step: fresh buffers would cost more than the cipher (page faults).
            # Sealed is the wire tensor (codes and scales of a compressed format), not the block.
            size = ChunkSealer(self.codec.wire_bytes(numel), self.chunk_bytes).sealed_bytes
            bufs["sealed_send"] = {j: torch.empty(size, dtype=torch.uint8) for j in self.neighbours}
            bufs["sealed_recv"] = {j: torch.empty(size, dtype=torch.uint8) for j in self.neighbours}
        self._buffers = bufs
        self._key = key
        # A per-size tag: if neighbours ever disagree on the size without a new handshake,
        # Gloo times out on unmatched tags instead of aborting the process on a size mismatch.
        # Sealed chunk c goes with tag + c (< 2**24 chunks: the nonce's chunk field).
        ident = wire if cast else self.codec.describe()
        self._tag = 1 + zlib.crc32(f"{numel}:{block_id}:{ident}".encode()) % (2**30)

    def _handshake(self, numel: int, block_id: int) -> None:
        code = self.codec.code
        mine = [_HEADER_MAGIC, self.rank, numel, block_id, code]
        header = torch.tensor(mine, dtype=torch.float64, device=self._comm_device)
        recv = {j: torch.empty_like(header) for j in self.neighbours}
        if self.encrypted:
            self._sealed_header(header, recv)
        else:
            self._run_p2p(header, recv, _HEADER_TAG, what="header")
            self.stats.control_bytes += header.numel() * header.element_size() * self.degree
        problems = []
        for j, buf in recv.items():
            got = [int(v) for v in buf.tolist()]
            if got[0] != _HEADER_MAGIC or got[1] != j:
                problems.append(f"neighbour rank {j} sent a malformed header {got}")
            elif got[2:] != mine[2:]:
                problems.append(
                    f"neighbour rank {j} is on block {got[3]} with {got[2]} elements "
                    f"(wire code {got[4]}), this rank expected block {block_id} with {numel} "
                    f"elements (wire code {code})"
                )
        if problems:
            raise GossipError(
                f"rank {self.rank}, group {self.group_name!r}: "
                + "; ".join(problems)
                + " (all peers of a phase must train the same block of the same model with "
                "the same algorithm.wire_dtype, gossip.compression and train.layers_per_block)"
            )

    def _transfer(
        self, send: torch.Tensor, block_id: int, during: Callable[[], object] | None
    ) -> None:
        """Move the wire tensor ``send`` (already encoded) to every neighbour and theirs into
        the receive buffers: as is, or sealed chunk by chunk per edge when encrypted."""
        if not self.encrypted:
            self._run_p2p(send, self._buffers["recv"], self._tag, what="block", during=during)
            return
        bufs = self._buffers
        sends = {j: (send, bufs["sealed_send"][j]) for j in self.neighbours}
        recvs = {j: (bufs["sealed_recv"][j], bufs["recv"][j]) for j in self.neighbours}
        # The AAD names the wire format's code and the wire tensor's numel (what is sent).
        ctx = self._links.ctx(KIND_PAYLOAD, block_id, self.codec.code)
        # `during` runs once every chunk is sealed and posted, while the sealed chunks are in
        # flight and before any is opened (all are still verified before anything is mixed).
        overlap = None if during is None else functools.partial(self._run_during, during)
        self._sealed(
            "block", ctx, self._step, self._tag, sends, recvs, block_id=block_id, during=overlap
        )
        self.stats.wire_bytes_sent += sum(b.numel() for _, b in sends.values())
        self.stats.wire_bytes_received += sum(b.numel() for b, _ in recvs.values())

    def _encode(self, block: torch.Tensor) -> torch.Tensor:
        """The wire tensor of ``block`` on the comm device (the block itself for fp32)."""
        send = self._buffers["send"]
        if not isinstance(self.codec, CastCodec):
            wire = self.codec.encode(block)
            if send is None:
                return wire
            send.copy_(wire)
            return send
        if send is None:
            return block
        send.copy_(block, non_blocking=send.is_pinned())
        if block.is_cuda and send.device.type == "cpu":
            torch.cuda.current_stream(block.device).synchronize()  # pinned copy is async
        return send

    def _run_p2p(
        self,
        send: torch.Tensor,
        recv: dict[int, torch.Tensor],
        tag: int,
        *,
        what: str,
        during: Callable[[], object] | None = None,
    ) -> None:
        """Post all sends and receives at once, run ``during``, then wait under one deadline."""
        if not self.neighbours:
            self._run_during(during)
            return
        ops = [dist.P2POp(dist.isend, send, j, tag=tag) for j in self.neighbours]
        ops += [dist.P2POp(dist.irecv, recv[j], j, tag=tag) for j in self.neighbours]
        labels = [f"sending the {what} to" for _ in self.neighbours]
        labels += [f"receiving the {what} from" for _ in self.neighbours]
        peers = self.neighbours * 2
        try:
            works = dist.batch_isend_irecv(ops)
        except (RuntimeError, dist.DistError) as exc:
            raise self._p2p_error(
                f"posting the {what} exchange with", self.neighbours, exc
            ) from exc
        if len(works) != len(ops):  # NCCL coalesces the batch into one work
            labels, peers = [f"exchanging the {what} with"], [self.neighbours]
        self._run_during(during)
        deadline = time.monotonic() + self.timeout_s
        for work, label, peer in zip(works, labels, peers, strict=False):
            # timedelta(0) would mean "the group default"; keep at least 1 ms left.
            left = timedelta(seconds=max(deadline - time.monotonic(), 1e-3))
            try:
                work.wait(left)
            except (RuntimeError, dist.DistError) as exc:
                raise self._p2p_error(label, peer, exc) from exc

    def _run_during(self, during: Callable[[], object] | None) -> None:
        if during is None:
            return
        start = time.perf_counter()
        try:
            during()
        finally:
            self.stats.overlapped_s += time.perf_counter() - start

    def _p2p_error(self, label: str, peer: int | list[int], exc: BaseException) -> GossipError:
        text = _first_line(exc)
        who = f"neighbour rank {peer}" if isinstance(peer, int) else f"neighbour ranks {peer}"
        if "timed out" in text.lower() or "timeout" in text.lower():
            hint = (
                f"no progress within gossip.timeout_s={self.timeout_s:g} s: the neighbour is "
                "stuck, slower than the timeout, or on another phase; raise gossip.timeout_s "
                "if steps are legitimately slow"
            )
        else:
            hint = "the neighbour process died or closed the group (look at its log first)"
        return GossipError(
            f"rank {self.rank}, group {self.group_name!r}: failed {label} {who}: {hint}. "
            f"Backend said: {text}"
        )

    def _decode(self, numel: int) -> dict[int, torch.Tensor]:
        """Cast codecs: fp32 blocks on the block's device; others: their wire tensors there."""
        out, recv = self._buffers["out"], self._buffers["recv"]
        if isinstance(self.codec, CastCodec) or self.codec.error_feedback:
            if out is not recv:
                for j in self.neighbours:
                    out[j].copy_(recv[j])  # cast from the wire dtype / move to the device
            return dict(out)
        return {j: self.codec.decode(recv[j].to(self.device), numel) for j in self.neighbours}

    def _check_finite(self, block: torch.Tensor, received: dict[int, torch.Tensor]) -> None:
        """Name every neighbour (and this rank) whose block holds NaN/Inf."""
        ranks = [*received, self.rank]
        tensors = [*received.values(), block]
        # Fast path: a finite sum implies every element is finite; one sync for all blocks.
        sums_ok = torch.isfinite(torch.stack([t.sum() for t in tensors])).tolist()
        problems = []
        for r, t, ok in zip(ranks, tensors, sums_ok, strict=True):
            bad = 0 if ok else int((~torch.isfinite(t)).sum())
            if bad and r == self.rank:
                problems.append(f"this rank's own block has {bad} non-finite values of {t.numel()}")
            elif bad:
                problems.append(
                    f"neighbour rank {r} sent {bad} non-finite values of {t.numel()} "
                    "(expected all finite)"
                )
        if problems:
            raise GossipError(
                f"rank {self.rank}, group {self.group_name!r}: "
                + "; ".join(problems)
                + ": local training diverged there; lower the learning rate, and with "
                "a float16 wire (algorithm.wire_dtype=model on an fp16 model) check for overflow"
            )


def _reset_group_counter() -> None:
    """torch names the default group after a process-wide counter and prefixes Gloo's store
    keys with that name. A failed init_process_group advances the counter but leaves no group
    whose destruction would reset it, so a process that once failed to join (a dead peer)
    would look for other keys than a fresh or luckier process, and never meet it again.
    This process holds no group now: start from 0, as every other member does.
    (torch.distributed keeps the counter in a private attribute.)"""
    if not dist.is_initialized():
        dist.distributed_c10d._world.group_count = 0
