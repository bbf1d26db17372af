"""Compressed gossip: wire codecs and CHOCO-Gossip error feedback (framework-free).

A *codec* turns the fp32 master copy of the active block into one contiguous 1-D wire
tensor of a size known from the block size alone (:meth:`Codec.wire_numel`), and back.
Whatever goes on the wire is that tensor, so byte counters count it exactly, and a layer
that authenticates or encrypts the payload can wrap ``wire.view(torch.uint8)``.

Formats (``gossip.compression``):

==========  ============================================  =================================
format      wire                                          error of one decode (per element)
==========  ============================================  =================================
``none``    ``algorithm.wire_dtype`` (fp32 or the model   fp32: 0; bf16: <= 2^-8 |x|;
            dtype), exactly as before compression         fp16: <= 2^-11 |x| (in range)
``float32`` fp32                                          0
``bf16``    bfloat16                                      <= 2^-8 |x|
``int8``    per chunk of ``chunk`` elements: one fp32     <= max|x_chunk| / 254
            scale ``max|x_chunk| / 127``, then int8
            ``round(x / scale)``; CHOCO error feedback
``topk``    the ``ceil(fraction * n)`` largest ``|x|``:   0 on the kept entries, |x| on
            int32 indices + fp32 values; CHOCO EF         the others (<= the k+1-th largest)
==========  ============================================  =================================

Casts are sent afresh every step, so their rounding never accumulates: each mix sees the
neighbours' current blocks rounded once. ``int8`` and ``topk`` would accumulate their much
larger errors into the model if applied to the block itself, so they compress the
*difference* to a public copy instead, following CHOCO-Gossip (A. Koloskova, S. U. Stich,
M. Jaggi, "Decentralized Stochastic Optimization and Gossip Algorithms with Compressed
Communication", ICML 2019, Algorithm 1 / CHOCO-SGD Algorithm 2), in its memory-efficient
form (each node stores its own public copy and the weighted consensus term only, as in
Koloskova, Lin, Stich, Jaggi, ICLR 2020, Algorithm 1):

    q_i     = Q(x_half_i - x_hat_i)                     # sent to every neighbour
    x_hat_i = x_hat_i + q_i                             # every node's view of i's copy
    c_i     = c_i + sum_{j in N_i + {i}} w_ij q_j - q_i  # c_i = sum_j w_ij (x_hat_j - x_hat_i)
    x_i     = x_half_i + gamma * c_i                    # replaces eq (7)

What DECA then computes instead of eq (7), ``x_i = sum_j w_ij x_half_j``: with
``e_j = x_hat_j - x_half_j`` (the error of the public copy after this step's update) and
``gamma = 1``,

    x_i = sum_j w_ij x_half_j + (sum_j w_ij e_j - e_i),

i.e. eq (7) plus a zero-sum (over clients, W doubly stochastic) perturbation. ``e_j`` is the
codec error of ``x_half_j - x_hat_j(before)``, a one-step difference, not of the block, so it
does not accumulate: for int8, ``|e_j| <= max|x_half_j - x_hat_j(before)|_chunk / 254``,
and ``x_half_j - x_hat_j(before)`` is one optimizer step plus the previous ``e_j``. The
clients' average of the block is preserved exactly as by eq (7) (up to fp32 rounding).
With a lossless Q the public copies equal ``x_half`` and the step is eq (7) exactly (in
exact arithmetic); ``gamma < 1`` interpolates towards no mixing (CHOCO's consensus step).

State and reset policy: ``(x_hat_i, c_i)`` belong to one block. They are created on the
block's first phase with ``x_hat_i = x_i`` (the block as loaded: all clients start from the
same pretrained weights and a block never changes before its first phase, so every node's
public copy agrees with its neighbours' views without any exchange) and ``c_i = 0``, and
are kept *across* that block's later phases (they are committed with the block in the
node's state store), because re-initialising them at a later phase would need each node to
know its neighbours' current blocks, i.e. one uncompressed exchange.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

FORMATS = ("none", "float32", "bf16", "int8", "topk")
EF_FORMATS = ("int8", "topk")
# Identity codes (gossip header and join check): 0-2 are the plain dtypes of the old wire.
_CAST_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_INT8_CODE = 3
_TOPK_CODE = 4
_INT8_MAX = 127


class Codec:
    """Block (1-D fp32) <-> one 1-D wire tensor whose size depends on ``numel`` only."""

    name: str = "codec"
    code: int = -1
    wire_dtype: torch.dtype = torch.uint8
    error_feedback: bool = False

    def wire_numel(self, numel: int) -> int:
        raise NotImplementedError

    def wire_bytes(self, numel: int) -> int:
        """Bytes one message of a ``numel``-element block puts on the wire (payload + scales)."""
        return self.wire_numel(numel) * torch.empty((), dtype=self.wire_dtype).element_size()

    def describe(self) -> str:
        """Everything a neighbour must share to read this wire (checked when a group joins)."""
        return self.name

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, wire: torch.Tensor, numel: int) -> torch.Tensor:
        """The fp32 block a neighbour reconstructs from ``wire`` (a new tensor)."""
        raise NotImplementedError


class CastCodec(Codec):
    """Send the block in ``dtype``: fp32 as is, else rounded to nearest once per step."""

    def __init__(self, dtype: torch.dtype) -> None:
        if dtype not in _CAST_CODES:
            raise ValueError(f"cannot send blocks as {dtype}; use float32, bfloat16 or float16")
        self.wire_dtype = dtype
        self.code = _CAST_CODES[dtype]
        self.name = str(dtype).removeprefix("torch.")

    def wire_numel(self, numel: int) -> int:
        return numel

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.dtype == self.wire_dtype else x.to(self.wire_dtype)

    def decode(self, wire: torch.Tensor, numel: int) -> torch.Tensor:
        return wire.to(torch.float32, copy=True)


class Int8Codec(Codec):
    """Per-chunk absmax int8: wire = fp32 scales (one per chunk), then int8 codes.

    Scales go first so both views start 4-byte aligned. A chunk of zeros has scale 0 and
    decodes to zeros. Round to nearest (even): the error per element is at most
    ``scale / 2 = max|x_chunk| / 254`` (plus fp32 rounding of ``x / scale``).
    """

    name = "int8"
    code = _INT8_CODE
    wire_dtype = torch.uint8
    error_feedback = True

    def __init__(self, chunk: int = 256) -> None:
        if chunk < 1:
            raise ValueError(f"gossip.chunk_size must be >= 1, got {chunk}")
        self.chunk = int(chunk)

    def describe(self) -> str:
        return f"int8/chunk={self.chunk}"

    def chunks(self, numel: int) -> int:
        return math.ceil(numel / self.chunk)

    def wire_numel(self, numel: int) -> int:
        return 4 * self.chunks(numel) + numel

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        n, nch = x.numel(), self.chunks(x.numel())
        padded = (
            x if n == nch * self.chunk else torch.nn.functional.pad(x, (0, nch * self.chunk - n))
        )
        rows = padded.view(nch, self.chunk)
        scale = torch.linalg.vector_norm(rows, float("inf"), dim=1) / _INT8_MAX  # max |x|
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        # |x / scale| <= 127 (+ rounding, which rounds back to 127): no clamp needed.
        codes = torch.div(rows, safe[:, None]).round_()
        wire = torch.empty(self.wire_numel(n), dtype=torch.uint8, device=x.device)
        wire[: 4 * nch].view(torch.float32).copy_(scale)
        wire[4 * nch :].view(torch.int8).copy_(codes.view(-1)[:n])
        return wire

    def decode(self, wire: torch.Tensor, numel: int) -> torch.Tensor:
        nch = self.chunks(numel)
        scale = wire[: 4 * nch].view(torch.float32)
        codes = wire[4 * nch :].view(torch.int8)
        if numel == nch * self.chunk:
            return codes.view(nch, self.chunk).float().mul_(scale[:, None]).view(-1)
        padded = torch.zeros(nch * self.chunk, dtype=torch.float32, device=wire.device)
        padded[:numel] = codes
        return padded.view(nch, self.chunk).mul_(scale[:, None]).view(-1)[:numel].clone()


class TopKCodec(Codec):
    """The ``k = ceil(fraction * numel)`` entries of largest magnitude, as sorted int32
    indices then fp32 values (8 bytes per kept entry); the rest decode to zero."""

    name = "topk"
    code = _TOPK_CODE
    wire_dtype = torch.uint8
    error_feedback = True

    def __init__(self, fraction: float = 0.01) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"gossip.topk_fraction must be in (0, 1], got {fraction}")
        self.fraction = float(fraction)

    def describe(self) -> str:
        return f"topk/fraction={self.fraction!r}"

    def k(self, numel: int) -> int:
        return max(1, math.ceil(self.fraction * numel))

    def wire_numel(self, numel: int) -> int:
        return 8 * self.k(numel)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        k = self.k(x.numel())
        # Sorted indices: deterministic wire bytes whatever order topk returns them in.
        idx = torch.topk(x.abs(), k, sorted=False).indices.sort().values
        wire = torch.empty(8 * k, dtype=torch.uint8, device=x.device)
        wire[: 4 * k].view(torch.int32).copy_(idx)
        wire[4 * k :].view(torch.float32).copy_(x[idx])
        return wire

    def decode(self, wire: torch.Tensor, numel: int) -> torch.Tensor:
        k = self.k(numel)
        out = torch.zeros(numel, dtype=torch.float32, device=wire.device)
        idx = wire[: 4 * k].view(torch.int32).long()
        out[idx] = wire[4 * k :].view(torch.float32)
        return out


def make_codec(
    compression: str = "none",
    wire_dtype: torch.dtype = torch.float32,
    *,
    chunk_size: int = 256,
    topk_fraction: float = 0.01,
) -> Codec:
    """The codec of ``gossip.compression``; ``none`` sends ``wire_dtype`` (today's wire)."""
    name = str(compression).strip().lower()
    if name == "none":
        return CastCodec(wire_dtype)
    if name == "float32":
        return CastCodec(torch.float32)
    if name == "bf16":
        return CastCodec(torch.bfloat16)
    if name == "int8":
        return Int8Codec(chunk_size)
    if name == "topk":
        return TopKCodec(topk_fraction)
    raise ValueError(f"gossip.compression={compression!r} is not one of {list(FORMATS)}")


@dataclass
class ChocoState:
    """One node's error-feedback state for one block: its public copy and consensus term.

    Both hold only for the gossip members they were built with: ``c_i`` sums over the
    neighbours of one mixing matrix, updated step by step. Once a site is lost or healed,
    W changes and every member restarts the state (`restart`), as `ChocoGossip` does.
    """

    x_hat: torch.Tensor  # x_hat_i: what every neighbour believes this node's block is
    consensus: torch.Tensor  # c_i = sum_j w_ij (x_hat_j - x_hat_i)
    steps: int = 0
    members: tuple[int, ...] = ()  # the run ranks whose mixing matrix built this state

    @classmethod
    def start(cls, block: torch.Tensor, members: tuple[int, ...] = ()) -> ChocoState:
        """First phase of a block: every client holds the same block, so x_hat_j = x_i."""
        return cls(block.detach().clone(), torch.zeros_like(block), members=tuple(members))

    @classmethod
    def restart(cls, block: torch.Tensor, members: tuple[int, ...] = ()) -> ChocoState:
        """After a membership change the clients' blocks differ and no node knows its
        neighbours' x_hat_j: every member takes x_hat = 0 (so c = 0), which they all agree
        on without an exchange. The next step sends the whole block through the codec;
        error feedback then shrinks the error again."""
        zeros = torch.zeros_like(block, dtype=torch.float32)
        return cls(zeros, torch.zeros_like(zeros), members=tuple(members))

    def tensors(self) -> dict[str, torch.Tensor]:
        members = torch.tensor(list(self.members), dtype=torch.int64)
        return {"x_hat": self.x_hat, "consensus": self.consensus, "members": members}

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], device: torch.device | str = "cpu"
    ) -> ChocoState:
        """The state as committed (e.g. read back from a node's state store) on ``device``."""
        x_hat, consensus = (
            tensors[k].to(device, torch.float32, copy=True) for k in ("x_hat", "consensus")
        )
        members = tuple(int(r) for r in tensors["members"].tolist()) if "members" in tensors else ()
        return cls(x_hat, consensus, members=members)


class ChocoMixer:
    """CHOCO-Gossip's exchange for one node and one block, split around the network.

    ``encode(x_half)`` gives the wire message; after the exchange, ``decode`` reads everyone's
    ``q`` and ``combine`` updates the state with them and returns the new block. The
    in-process engine and the multi-process node call exactly these methods, so they agree
    bit for bit.
    """

    def __init__(
        self,
        codec: Codec,
        rank: int,
        weights: Mapping[int, float],
        state: ChocoState,
        gamma: float = 1.0,
    ) -> None:
        if not codec.error_feedback:
            raise ValueError(f"{codec.name} does not use error feedback")
        self.codec, self.rank, self.state, self.gamma = codec, rank, state, float(gamma)
        self.weights = dict(weights)  # neighbours and self

    def encode(self, x_half: torch.Tensor) -> torch.Tensor:
        return self.codec.encode(x_half - self.state.x_hat)

    def decode(
        self, own_wire: torch.Tensor, received: Mapping[int, torch.Tensor], numel: int
    ) -> dict[int, torch.Tensor]:
        """Everyone's ``q_j`` (this node's from its own wire, so all views agree bitwise)."""
        qs = {j: self.codec.decode(w, numel) for j, w in received.items()}
        qs[self.rank] = self.codec.decode(own_wire, numel)
        return qs

    def combine(self, x_half: torch.Tensor, qs: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Update the public copy and consensus term with ``qs``; return the new block.

        ``c += sum_j (w_ij - [j == i]) q_j`` in ascending rank order, in place (one pass
        per neighbour: this runs on every step over the whole block)."""
        st = self.state
        for j in sorted(qs):
            st.consensus.add_(qs[j], alpha=self.weights[j] - (1.0 if j == self.rank else 0.0))
        st.x_hat.add_(qs[self.rank])
        st.steps += 1
        return torch.add(x_half, st.consensus, alpha=self.gamma)
