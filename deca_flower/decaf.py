"""DeCAF's consensus step: mix the LoRA *products*, then re-factorize by truncated SVD.

Averaging A and B separately (Dec-LoRA) does not average the updates they encode:
mean(B) mean(A) != mean(B A). DeCAF (Saadati et al., Neural Networks 2026) instead
forms, for every LoRA module, the consensus product sum_j w_ij B_j A_j and takes
its best rank-r factorization (Eckart-Young) as the new (B_i, A_i).

The dense product is out x in; we never build it. With m contributing peers,
sum_j w_j B_j A_j = [w_1 B_1 ... w_m B_m] [A_1; ...; A_m] has rank <= m r, so
QR of the two tall factors plus an SVD of an (m r) x (m r) core gives the exact
truncated SVD at O((out + in) (m r)^2) cost. The factors are split evenly,
B = U sqrt(S), A = sqrt(S) V^T.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraPair:
    """Where one LoRA module's A (r x in) and B (out x r) sit in the flat block."""

    a_offset: int
    a_shape: tuple[int, int]
    b_offset: int
    b_shape: tuple[int, int]

    def a(self, flat: torch.Tensor) -> torch.Tensor:
        n = self.a_shape[0] * self.a_shape[1]
        return flat[self.a_offset : self.a_offset + n].view(self.a_shape)

    def b(self, flat: torch.Tensor) -> torch.Tensor:
        n = self.b_shape[0] * self.b_shape[1]
        return flat[self.b_offset : self.b_offset + n].view(self.b_shape)


def lora_layout(named_shapes: Sequence[tuple[str, torch.Size]]) -> list[LoraPair]:
    """Pair every `...lora_A...` with its `...lora_B...`, with offsets in the flat block.

    `named_shapes` is the block's parameters in flattening order (as BMAAdam flattens).
    """
    offsets: dict[str, tuple[int, tuple[int, int]]] = {}
    position = 0
    for name, shape in named_shapes:
        if ".lora_A." not in name and ".lora_B." not in name:
            raise ValueError(f"DeCAF mixes LoRA factors only, but the block holds {name}")
        offsets[name] = (position, (int(shape[0]), int(shape[1])))
        position += int(torch.Size(shape).numel())
    pairs = []
    for name, (a_offset, a_shape) in offsets.items():
        if ".lora_A." not in name:
            continue
        b_name = name.replace(".lora_A.", ".lora_B.")
        if b_name not in offsets:
            raise ValueError(f"LoRA parameter {name} has no matching {b_name}")
        b_offset, b_shape = offsets[b_name]
        pairs.append(LoraPair(a_offset, a_shape, b_offset, b_shape))
    if not pairs:
        raise ValueError("algorithm.method=decaf found no LoRA parameters in the block")
    return pairs


def truncated_product_factors(
    bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], weights: Sequence[float], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` (B, A) with B A ~= sum_j weights[j] * bs[j] @ as_[j] (fp32)."""
    left = torch.cat([w * b.float() for w, b in zip(weights, bs)], dim=1)  # out x m r
    right = torch.cat([a.float() for a in as_], dim=0)  # m r x in
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.T)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T)
    root = s[:rank].sqrt()
    b_new = (q_left @ u[:, :rank]) * root
    a_new = root[:, None] * (vh[:rank] @ q_right.T)
    return b_new, a_new


def decaf_mix(
    blocks: Mapping[int, torch.Tensor],
    weights: Mapping[int, float],
    layout: Sequence[LoraPair],
) -> torch.Tensor:
    """DeCAF's consensus for one client: its new flat block from its own and neighbours'."""
    if set(blocks) != set(weights):
        raise ValueError(
            f"mixing weights cover ranks {sorted(weights)} but blocks come from {sorted(blocks)}"
        )
    order = sorted(blocks)
    first = blocks[order[0]]
    out = torch.empty_like(first, dtype=torch.float32)
    w = [float(weights[j]) for j in order]
    for pair in layout:
        b_new, a_new = truncated_product_factors(
            [pair.b(blocks[j]) for j in order],
            [pair.a(blocks[j]) for j in order],
            w,
            rank=pair.a_shape[0],
        )
        pair.b(out).copy_(b_new)
        pair.a(out).copy_(a_new)
    return out
