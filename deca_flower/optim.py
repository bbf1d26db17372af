"""BMA-Adam: the per-client optimizer of DECA for one active block.

One DECA inner step on client i is split in two halves around the gossip
exchange, so the optimizer never needs to know how mixing happens:

    loss.backward()
    opt.local_step()          # eqs (4)-(6): opt.block now holds x_half
    <caller overwrites opt.block in place with sum_j w_ij x_half_j>   # eq (7)
    opt.consensus_update()    # eqs (8)-(10), then opt.block -> model params

All optimizer state (master copy, moments, reference vector) lives in flat
fp32 buffers covering the active block only; `reset()` (or `switch_block`)
drops it, so optimizer memory scales with the block, not the model.

A step allocates nothing once the block's buffers exist: the gradient is gathered
into the previous step's denominator, and the reference vector, dead between
the two half-steps' uses, doubles as scratch. Block-sized allocations are not
free on the CPU (every one is fresh mmapped memory, page-faulted in), and they
raise the peak on any device.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

DISCREPANCY_REFS = ("pre", "half")
DISCREPANCY_SCALES = ("lr", "l2", "precond")
BIAS_CORRECTIONS = ("literal", "exact")
# What step_stats() reports per block, and the phase records carry per client.
STEP_DIAGNOSTICS = ("local_step", "effective_step", "update_grad_cosine")
# Chosen by measurement on SmolLM2-135M / rotten-tomatoes: see docs/algorithm-notes.md.
DEFAULT_DISCREPANCY_SCALE = "precond"


class BMAAdamError(RuntimeError):
    """Misuse of BMAAdam or invalid values handed to it."""


class BMAAdam:
    """Block-wise Adam with block-wise moment approximation (BMA).

    Args:
        params: the active block's parameters (any floating dtype).
        lr: step size.
        betas: (a1, a2), Adam's moment decay rates.
        eps: added to sqrt(v_hat).
        bma: (mu1, mu2) weights of the local intermediate moments in eqs (9)-(10);
            ``None`` skips (9)-(10) entirely ("w/o BMA"); ``(0, 0)`` is "trivial BMA".
        discrepancy_ref: "pre" uses x_pre - x_mixed (QGM), "half" uses x_half - x_mixed.
        discrepancy_scale: how d is normalised, see ``_discrepancy``.
        bias_correction: "literal" divides by 1 - beta^(r+1) (eq 5); "exact" divides m~, v~
            by the tracked weight of the gradient signal in each buffer (see
            ``_bias_corrections``); the two agree without BMA.
        track_stats: also accumulate per-step diagnostics (``step_stats``); costs one
            transient block-sized buffer per step.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        bma: tuple[float, float] | None = (0.3, 0.333),
        discrepancy_ref: str = "pre",
        discrepancy_scale: str = DEFAULT_DISCREPANCY_SCALE,
        bias_correction: str = "literal",
        track_stats: bool = False,
    ) -> None:
        _check_hyperparameters(lr, betas, eps, bma, discrepancy_ref, discrepancy_scale)
        if bias_correction not in BIAS_CORRECTIONS:
            raise BMAAdamError(
                f"algorithm.bias_correction must be one of {BIAS_CORRECTIONS}, "
                f"got {bias_correction!r}"
            )
        self.bias_correction = bias_correction
        self.track_stats = bool(track_stats)
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.bma = None if bma is None else (float(bma[0]), float(bma[1]))
        self.discrepancy_ref = discrepancy_ref
        self.discrepancy_scale = discrepancy_scale
        self._set_params(params)

    # ------------------------------------------------------------------ public state

    @property
    def params(self) -> list[nn.Parameter]:
        return self._params

    @property
    def block(self) -> torch.Tensor:
        """The fp32 master copy of the active block, flat, in parameter order.

        Created from the parameters on first access of a block. After
        ``local_step`` it holds x_half; that is what gets sent to neighbours.
        """
        if self._block is None:
            self._block = _flatten([p.detach() for p in self._params])
        return self._block

    @property
    def numel(self) -> int:
        return sum(self._numels)

    @property
    def step_in_block(self) -> int:
        """Inner step counter r; restarts at 0 for every block (bias correction)."""
        return self._step

    @property
    def awaiting_consensus(self) -> bool:
        return self._awaiting_consensus

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The live state buffers (for memory accounting and tests)."""
        names = ("block", "exp_avg", "exp_avg_sq", "reference", "denom")
        values = (self._block, self._exp_avg, self._exp_avg_sq, self._reference, self._denom)
        return {n: t for n, t in zip(names, values) if t is not None}

    # ------------------------------------------------------------------ the two half-steps

    @torch.no_grad()
    def local_step(self) -> None:
        """Eqs (4)-(6): update the moments with the fresh gradient, take the Adam step."""
        if self._awaiting_consensus:
            raise BMAAdamError(
                "local_step() called twice: call consensus_update() after mixing opt.block "
                "before the next local_step()"
            )
        self._check_param_shapes()
        # The previous step's denominator is dead by now: gather the gradient into it.
        grad = self._gather_grad(out=self._denom)
        block = self.block
        self._check_block_shape(block)
        if self._exp_avg is None:
            self._exp_avg = torch.zeros_like(block)
            self._exp_avg_sq = torch.zeros_like(block)
        beta1, beta2 = self.betas
        # m~ and v~ are kept in the moment buffers until consensus_update needs them.
        self._exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        self._exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1, bias2 = self._bias_corrections()
        if self.track_stats:
            self._record_local_stats(grad, bias1, bias2)
        # The gradient buffer is no longer needed: reuse it for sqrt(v_hat) + eps.
        denom = grad.copy_(self._exp_avg_sq).div_(bias2).sqrt_().add_(self.eps)
        self._denom = denom
        if self.discrepancy_ref == "pre":
            self._reference = _copy_into(self._reference, block)
        block.addcdiv_(self._exp_avg, denom, value=-self.lr / bias1)
        if self.discrepancy_ref == "half":
            self._reference = _copy_into(self._reference, block)
        self._awaiting_consensus = True

    @torch.no_grad()
    def consensus_update(self) -> None:
        """Eqs (8)-(10) on the mixed block, then write it into the model parameters.

        If the mixed block is not finite, nothing is changed: the optimizer goes
        back to its state right after ``local_step`` (opt.block = x_half) and
        raises, so the caller may mix again without the offending neighbour.
        """
        if not self._awaiting_consensus:
            raise BMAAdamError(
                "consensus_update() called before local_step(): run loss.backward() and "
                "opt.local_step() first"
            )
        mixed = self.block
        self._check_block_shape(mixed)
        if not _all_finite(mixed):
            self._restore_half_step()
            raise BMAAdamError(
                "the mixed block contains NaN or Inf values; it was rejected and opt.block "
                "was restored to x_half (check the neighbours' blocks and algorithm.lr)"
            )
        # From here on the reference is only needed as x_ref - x_mixed (eq 8 and the
        # stats), so the difference is formed in its buffer.
        effective_stats = self.track_stats and self.discrepancy_ref == "pre"
        needs_difference = self.bma is not None or effective_stats
        difference = self._reference.sub_(mixed) if needs_difference else None
        if effective_stats:
            # reference = x_pre: the whole update of this step, gossip included.
            moved = float(torch.linalg.vector_norm(difference)) / math.sqrt(self.numel)
            self._stats["effective_step"] += moved / self.lr
            self._stats["effective_steps"] += 1
        if self.bma is not None:
            self._apply_bma(difference)
        self._update_signal_weights()
        self._write_params(mixed)
        self._step += 1
        self._awaiting_consensus = False

    # ------------------------------------------------------------------ block switching

    def reset(self) -> None:
        """Drop moments, step counter, master copy and reference vector (block switch)."""
        self._block = None
        self._exp_avg = None
        self._exp_avg_sq = None
        self._reference = None
        self._denom = None
        self._step = 0
        self._awaiting_consensus = False
        self._signal = (0.0, 0.0)  # S1, S2 of the exact bias correction
        self._stats = dict.fromkeys(
            ("steps", "local_step", "cosine", "effective_step", "effective_steps"), 0.0
        )

    def step_stats(self) -> dict[str, float | None]:
        """Means over this block's steps so far (``track_stats=True``), all divided by lr.

        - local_step: RMS of Adam's own step x_half - x_pre, over lr;
        - effective_step: RMS of the whole step x_mixed - x_pre (gossip included), over lr
          (None with discrepancy_ref="half", which does not keep x_pre);
        - update_grad_cosine: cosine between the descent direction x_pre - x_half and the
          fresh gradient (1 = plain gradient descent direction).
        """
        s = self._stats
        if not s["steps"]:
            return {"steps": 0, "local_step": None, "effective_step": None,
                    "update_grad_cosine": None}  # fmt: skip
        effective = s["effective_step"] / s["effective_steps"] if s["effective_steps"] else None
        return {
            "steps": int(s["steps"]),
            "local_step": s["local_step"] / s["steps"],
            "effective_step": effective,
            "update_grad_cosine": s["cosine"] / s["steps"],
        }

    def switch_block(self, params: Iterable[nn.Parameter]) -> None:
        """Start optimising a new block: all state of the previous block is freed."""
        self._set_params(params)

    def zero_grad(self) -> None:
        for p in self._params:
            p.grad = None

    # ------------------------------------------------------------------ internals

    def _set_params(self, params: Iterable[nn.Parameter]) -> None:
        self._params = list(params)
        if not self._params:
            raise BMAAdamError("BMAAdam got an empty parameter list: the active block is empty")
        for p in self._params:
            if not p.is_floating_point():
                raise BMAAdamError(f"parameter of dtype {p.dtype} cannot be trained")
        self._shapes = [tuple(p.shape) for p in self._params]
        self._numels = [p.numel() for p in self._params]
        self.reset()

    def _bias_corrections(self) -> tuple[float, float]:
        """The divisors of m~ and v~ for this step (eq 5, or the exact signal weights).

        "exact": S~ = beta * S + (1 - beta) is the total weight the buffer gives to
        gradient-scale terms (fresh gradients and, after eqs (9)-(10), discrepancies),
        starting from S = 0 at the block start. Without BMA S = S~ and S~ = 1 - beta^(r+1).
        """
        if self.bias_correction == "exact":
            (beta1, beta2), (s1, s2) = self.betas, self._signal
            return beta1 * s1 + (1 - beta1), beta2 * s2 + (1 - beta2)
        r = self._step + 1
        return 1 - self.betas[0] ** r, 1 - self.betas[1] ** r

    def _update_signal_weights(self) -> None:
        """After eqs (9)-(10): S = mu * S~ + (1 - mu); without BMA S = S~."""
        tilde = self._bias_corrections()
        if self.bma is None:
            self._signal = tilde
        else:
            self._signal = tuple(mu * t + (1 - mu) for mu, t in zip(self.bma, tilde))

    def _record_local_stats(self, grad: torch.Tensor, bias1: float, bias2: float) -> None:
        """RMS(x_half - x_pre) / lr and cos(x_pre - x_half, g), before grad is reused."""
        # The last step's reference is dead until local_step copies x_pre into it.
        if self._reference is None:
            self._reference = torch.empty_like(grad)
        direction = torch.div(self._exp_avg_sq, bias2, out=self._reference).sqrt_().add_(self.eps)
        direction.reciprocal_().mul_(self._exp_avg)  # m~ / (sqrt(v_hat) + eps)
        norm_u = float(torch.linalg.vector_norm(direction))
        norm_g = float(torch.linalg.vector_norm(grad))
        dot = float(torch.dot(direction, grad))
        self._stats["steps"] += 1
        self._stats["local_step"] += norm_u / bias1 / math.sqrt(self.numel)
        self._stats["cosine"] += dot / (norm_u * norm_g) if norm_u * norm_g > 0 else 0.0

    def _gather_grad(self, out: torch.Tensor | None) -> torch.Tensor:
        missing = [i for i, p in enumerate(self._params) if p.grad is None]
        if missing:
            raise BMAAdamError(
                f"local_step() called without gradients for {len(missing)} of "
                f"{len(self._params)} block parameters (first: index {missing[0]}, shape "
                f"{self._shapes[missing[0]]}): call loss.backward() first and check that the "
                "active block is used in the forward pass"
            )
        return _flatten([p.grad for p in self._params], out=out)

    def _check_param_shapes(self) -> None:
        shapes = [tuple(p.shape) for p in self._params]
        if shapes != self._shapes:
            raise BMAAdamError(
                "block parameter shapes changed since the optimizer was built; "
                "call switch_block(params) after changing the model"
            )

    def _check_block_shape(self, block: torch.Tensor) -> None:
        expected = (self.numel,)
        if tuple(block.shape) != expected or block.dtype != torch.float32:
            raise BMAAdamError(
                f"opt.block must stay a flat float32 tensor of shape {expected}; got "
                f"{block.dtype} of shape {tuple(block.shape)} (overwrite it in place with "
                "opt.block.copy_(mixed))"
            )

    def _restore_half_step(self) -> None:
        block = self._block
        if self.discrepancy_ref == "half":
            block.copy_(self._reference)
            return
        # Recompute x_half from x_pre with exactly the ops of local_step: bit-identical.
        bias1, _ = self._bias_corrections()
        block.copy_(self._reference).addcdiv_(self._exp_avg, self._denom, value=-self.lr / bias1)

    def _apply_bma(self, difference: torch.Tensor) -> None:
        mu1, mu2 = self.bma
        discrepancy = self._discrepancy(difference)
        self._exp_avg.mul_(mu1).add_(discrepancy, alpha=1 - mu1)
        self._exp_avg_sq.mul_(mu2).addcmul_(discrepancy, discrepancy, value=1 - mu2)

    def _discrepancy(self, difference: torch.Tensor) -> torch.Tensor:
        """Eq (8): local minus aggregated, normalised to the scale of a gradient-like signal.

        ``difference`` is x_ref - x_mixed, scaled here in place.

        - "lr": d / lr (QGM-SGD); O(1) per coordinate, i.e. on the scale of m_hat/sqrt(v_hat).
        - "l2": d / ||d||_2 over the whole block (QGM's Adam variant).
        - "precond": d / lr * (sqrt(v_hat) + eps); undoes Adam's preconditioning so
          d is on the gradient's scale and BMA stays invariant to the loss scale.
        """
        d = difference
        if self.discrepancy_scale == "lr":
            return d.div_(self.lr)
        if self.discrepancy_scale == "l2":
            norm = torch.linalg.vector_norm(d)
            return d.div_(norm) if norm > 0 else d
        return d.div_(self.lr).mul_(self._denom)

    def _write_params(self, block: torch.Tensor) -> None:
        views = [v.view(s) for v, s in zip(block.split(self._numels), self._shapes)]
        torch._foreach_copy_([p.data for p in self._params], views)


# ---------------------------------------------------------------------- helpers


def _flatten(tensors: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    flat = [t.reshape(-1).to(torch.float32) for t in tensors]
    return torch.cat(flat) if out is None else torch.cat(flat, out=out)


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf, in one pass and without a block-sized mask (min/max propagate NaN)."""
    low, high = torch.aminmax(tensor)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def _copy_into(buffer: torch.Tensor | None, source: torch.Tensor) -> torch.Tensor:
    if buffer is None:
        return source.clone()
    return buffer.copy_(source)


def _check_hyperparameters(
    lr: float,
    betas: tuple[float, float],
    eps: float,
    bma: tuple[float, float] | None,
    discrepancy_ref: str,
    discrepancy_scale: str,
) -> None:
    if not (math.isfinite(lr) and lr > 0):
        raise BMAAdamError(f"algorithm.lr must be a positive number, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise BMAAdamError(f"algorithm.betas must be two numbers in [0, 1), got {betas}")
    if not eps > 0:
        raise BMAAdamError(f"algorithm.eps must be positive, got {eps}")
    if bma is not None and (len(bma) != 2 or not all(0.0 <= mu <= 1.0 for mu in bma)):
        raise BMAAdamError(f"algorithm.mu1/mu2 must be in [0, 1], got {bma}")
    if discrepancy_ref not in DISCREPANCY_REFS:
        raise BMAAdamError(
            f"algorithm.discrepancy_ref must be one of {DISCREPANCY_REFS}, got {discrepancy_ref!r}"
        )
    if discrepancy_scale not in DISCREPANCY_SCALES:
        raise BMAAdamError(
            f"algorithm.discrepancy_scale must be one of {DISCREPANCY_SCALES}, "
            f"got {discrepancy_scale!r}"
        )
