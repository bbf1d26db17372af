"""BMAAdam against an independent float64 reference of eqs (3)-(10), plus invariants 1-4, 8-10."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from deca_flower.optim import BMAAdam, BMAAdamError

SHAPES = [(3, 4), (5,), (2, 2, 2)]
LR = 0.05


def make_block(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def quadratic_targets(num_clients: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    size = sum(int(np.prod(s)) for s in SHAPES)
    return [rng.normal(size=size) * (1 + i) for i in range(num_clients)]


def scales(num_clients: int) -> list[float]:
    # Different loss scales per client, small like LLM gradients, to exercise eps and scaling.
    return [1e-3 * (i + 1) for i in range(num_clients)]


def torch_loss(params: list[nn.Parameter], target: np.ndarray, scale: float) -> torch.Tensor:
    flat = torch.cat([p.reshape(-1).float() for p in params])
    return scale * 0.5 * ((flat - torch.from_numpy(target).float()) ** 2).sum()


def ring_w(n: int) -> np.ndarray:
    w = np.zeros((n, n))
    for i in range(n):
        for j in ((i - 1) % n, (i + 1) % n):
            w[i, j] = 1 / 3
        w[i, i] = 1 - w[i].sum()
    return w


# ---------------------------------------------------------------------- reference


def reference_step(
    x, m, v, r, targets, loss_scales, w, lr, betas, eps, bma, ref, scale, signal=None
):
    """One inner step of eqs (3)-(10) for all clients, in float64 numpy.

    Written out from the spec, independent of the implementation. ``signal`` = None is
    eq (5)'s literal bias correction; a pair (S1, S2) is the "exact" one (issue 13):
    divide by S~ = beta * S + (1 - beta), then S = mu * S~ + (1 - mu) (S = S~ w/o BMA).
    Returns x, m, v and the next signal pair (None for literal).
    """
    n = len(targets)
    a1, a2 = betas
    if signal is None:
        c1, c2 = 1 - a1 ** (r + 1), 1 - a2 ** (r + 1)
    else:
        c1, c2 = a1 * signal[0] + (1 - a1), a2 * signal[1] + (1 - a2)
    x_pre, x_half, m_t, v_t, denoms = [], [], [], [], []
    for i in range(n):
        g = loss_scales[i] * (x[i] - targets[i])  # (3): grad of the quadratic
        mt = a1 * m[i] + (1 - a1) * g  # (4)
        vt = a2 * v[i] + (1 - a2) * g * g
        m_hat = mt / c1  # (5)
        v_hat = vt / c2
        denom = np.sqrt(v_hat) + eps
        x_pre.append(x[i].copy())
        x_half.append(x[i] - lr * m_hat / denom)  # (6)
        m_t.append(mt)
        v_t.append(vt)
        denoms.append(denom)
    x_new = [sum(w[i, j] * x_half[j] for j in range(n)) for i in range(n)]  # (7)
    m_new, v_new = [], []
    for i in range(n):
        if bma is None:
            m_new.append(m_t[i])
            v_new.append(v_t[i])
            continue
        base = x_pre[i] if ref == "pre" else x_half[i]
        d = base - x_new[i]  # (8)
        if scale == "lr":
            d = d / lr
        elif scale == "l2":
            norm = np.linalg.norm(d)
            d = d / norm if norm > 0 else d
        else:
            d = d / lr * denoms[i]
        mu1, mu2 = bma
        m_new.append(mu1 * m_t[i] + (1 - mu1) * d)  # (9)
        v_new.append(mu2 * v_t[i] + (1 - mu2) * d * d)  # (10)
    if signal is None:
        next_signal = None
    elif bma is None:
        next_signal = (c1, c2)
    else:
        next_signal = (bma[0] * c1 + (1 - bma[0]), bma[1] * c2 + (1 - bma[1]))
    return x_new, m_new, v_new, next_signal


def reference_run(x0, targets, loss_scales, w, steps, exact=False, **kwargs):
    n = len(targets)
    x = [x0.astype(np.float64).copy() for _ in range(n)]
    m = [np.zeros_like(x[0]) for _ in range(n)]
    v = [np.zeros_like(x[0]) for _ in range(n)]
    signal = (0.0, 0.0) if exact else None
    history = []
    for r in range(steps):
        x, m, v, signal = reference_step(
            x, m, v, r, targets, loss_scales, w, signal=signal, **kwargs
        )
        history.append([xi.copy() for xi in x])
    return history


def implementation_run(x0_params, targets, loss_scales, w, steps, **opt_kwargs):
    n = len(targets)
    clients = [[nn.Parameter(p.detach().clone()) for p in x0_params] for _ in range(n)]
    opts = [BMAAdam(c, lr=LR, **opt_kwargs) for c in clients]
    w_t = torch.tensor(w, dtype=torch.float32)
    history = []
    for _ in range(steps):
        for i in range(n):
            torch_loss(clients[i], targets[i], loss_scales[i]).backward()
            opts[i].local_step()
            opts[i].zero_grad()
        mixed = w_t @ torch.stack([o.block for o in opts])
        for i in range(n):
            opts[i].block.copy_(mixed[i])
            opts[i].consensus_update()
        history.append([o.block.double().numpy().copy() for o in opts])
    return history, opts, clients


VARIANTS = [
    dict(bma=(0.3, 0.333), discrepancy_ref="pre", discrepancy_scale="lr"),
    dict(bma=(0.3, 0.333), discrepancy_ref="pre", discrepancy_scale="l2"),
    dict(bma=(0.3, 0.333), discrepancy_ref="pre", discrepancy_scale="precond"),
    dict(bma=(0.3, 0.333), discrepancy_ref="half", discrepancy_scale="precond"),
    dict(bma=(0.5, 0.9), discrepancy_ref="half", discrepancy_scale="lr"),
    dict(bma=(0.0, 0.0), discrepancy_ref="pre", discrepancy_scale="precond"),
    dict(bma=None, discrepancy_ref="pre", discrepancy_scale="precond"),
]


def _ids(v):
    return f"{v['bma']}-{v['discrepancy_ref']}-{v['discrepancy_scale']}"


def _state64(opt):
    state = opt.state_tensors()
    zeros = np.zeros(opt.numel)
    m = state["exp_avg"].double().numpy().copy() if "exp_avg" in state else zeros
    v = state["exp_avg_sq"].double().numpy().copy() if "exp_avg_sq" in state else zeros
    return opt.block.double().numpy().copy(), m, v


def _reference_kwargs(variant):
    return dict(
        lr=LR,
        betas=(0.9, 0.999),
        eps=1e-8,
        bma=variant["bma"],
        ref=variant["discrepancy_ref"],
        scale=variant["discrepancy_scale"],
    )


@pytest.mark.parametrize("correction", ["literal", "exact"])
@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_each_step_matches_float64_reference(variant, correction):
    """From the implementation's own state, one reference step lands on its next state."""
    n, steps = 4, 8
    targets, loss_scales, w = quadratic_targets(n), scales(n), ring_w(n)
    clients = [[nn.Parameter(p.detach().clone()) for p in make_block()] for _ in range(n)]
    opts = [BMAAdam(c, lr=LR, bias_correction=correction, **variant) for c in clients]
    w32 = torch.tensor(w, dtype=torch.float32)
    signal = (0.0, 0.0) if correction == "exact" else None
    for r in range(steps):
        before = [_state64(o) for o in opts]
        x_ref, m_ref, v_ref, signal = reference_step(
            [b[0] for b in before],
            [b[1] for b in before],
            [b[2] for b in before],
            r,
            targets,
            loss_scales,
            w,
            signal=signal,
            **_reference_kwargs(variant),
        )
        for i in range(n):
            torch_loss(clients[i], targets[i], loss_scales[i]).backward()
            opts[i].local_step()
            opts[i].zero_grad()
        mixed = w32 @ torch.stack([o.block for o in opts])
        for i in range(n):
            opts[i].block.copy_(mixed[i])
            opts[i].consensus_update()
        for i in range(n):
            x_got, m_got, v_got = _state64(opts[i])
            np.testing.assert_allclose(x_got, x_ref[i], rtol=1e-6, atol=1e-6)
            # x_pre - x_mixed cancels in fp32: compare moments relative to their scale
            np.testing.assert_allclose(
                m_got, m_ref[i], rtol=1e-4, atol=1e-4 * np.abs(m_ref[i]).max()
            )
            np.testing.assert_allclose(
                v_got, v_ref[i], rtol=1e-4, atol=1e-4 * np.abs(v_ref[i]).max()
            )
            flat = torch.cat([p.detach().reshape(-1) for p in clients[i]])
            assert torch.equal(flat, opts[i].block)  # the mixed block was written to the model


# (0.5, 0.9)-half-lr feeds an O(1) discrepancy back into a tiny-gradient Adam step, which
# amplifies fp32 rounding over several steps; the per-step test above covers it exactly.
WELL_CONDITIONED = [v for v in VARIANTS if v["bma"] != (0.5, 0.9)]


@pytest.mark.parametrize("correction", ["literal", "exact"])
@pytest.mark.parametrize("variant", WELL_CONDITIONED, ids=_ids)
def test_trajectory_tracks_float64_reference(variant, correction):
    n, steps = 4, 8
    x0 = make_block()
    x0_np = torch.cat([p.detach().reshape(-1) for p in x0]).double().numpy()
    targets, loss_scales, w = quadratic_targets(n), scales(n), ring_w(n)
    expected = reference_run(
        x0_np, targets, loss_scales, w, steps, exact=correction == "exact",
        **_reference_kwargs(variant),
    )  # fmt: skip
    got, _, _ = implementation_run(
        x0, targets, loss_scales, w, steps, bias_correction=correction, **variant
    )
    for r in range(steps):
        for i in range(n):
            # fp32 rounding drifts a little where m_hat/sqrt(v_hat) is ill-conditioned
            np.testing.assert_allclose(got[r][i], expected[r][i], rtol=1e-4, atol=2e-3 * LR)


def test_mu_one_is_exactly_without_bma():  # invariant 1
    n, steps = 3, 6
    x0, targets, loss_scales, w = make_block(), quadratic_targets(n), scales(n), ring_w(n)
    with_ones, _, _ = implementation_run(x0, targets, loss_scales, w, steps, bma=(1.0, 1.0))
    without, _, _ = implementation_run(x0, targets, loss_scales, w, steps, bma=None)
    for a, b in zip(with_ones, without):
        for xa, xb in zip(a, b):
            assert np.array_equal(xa, xb)


def test_single_client_without_bma_is_badam():  # invariant 2
    """W = [[1]], w/o BMA: per-block torch Adam, state reset and bias correction per block."""
    gen = torch.Generator().manual_seed(0)
    blocks = [[nn.Parameter(torch.randn(4, 3, generator=gen))] for _ in range(3)]
    twin = [[nn.Parameter(p.detach().clone()) for p in b] for b in blocks]
    target = torch.randn(3, 4, 3, generator=gen)

    def loss_of(bs):
        return sum(((b[0] - target[k]) ** 2).sum() * 1e-2 for k, b in enumerate(bs))

    opt = BMAAdam(blocks[0], lr=LR, bma=None)
    for _round in range(2):
        for k in range(3):
            opt.switch_block(blocks[k])
            adam = torch.optim.Adam(twin[k], lr=LR, betas=(0.9, 0.999), eps=1e-8)
            for _ in range(4):
                loss_of(blocks).backward()
                opt.local_step()
                opt.consensus_update()  # W = [[1]]: the mixed block is x_half itself
                for b in blocks + twin:  # inactive blocks must not accumulate stale grads
                    b[0].grad = None
                loss_of(twin).backward()
                adam.step()
                for p, q in zip(blocks[k], twin[k]):
                    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_complete_graph_average_keeps_clients_identical():  # invariant 3
    n, steps = 4, 5
    w = np.full((n, n), 1 / n)
    history, _, _ = implementation_run(
        make_block(), quadratic_targets(n), scales(n), w, steps, bma=(0.3, 0.333)
    )
    for step in history:
        for x in step[1:]:
            np.testing.assert_allclose(x, step[0], rtol=0, atol=1e-6)


def test_identical_data_keeps_clients_identical():  # invariant 4
    n, steps = 4, 6
    target = quadratic_targets(1)[0]
    history, _, _ = implementation_run(
        make_block(), [target] * n, [1e-3] * n, ring_w(n), steps, bma=(0.3, 0.333)
    )
    for step in history:
        for x in step[1:]:
            assert np.array_equal(x, step[0])


def test_first_update_is_lr_times_sign_of_grad():  # invariant 9
    params = make_block()
    before = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    opt = BMAAdam(params, lr=LR)
    torch_loss(params, quadratic_targets(1)[0], 1e-3).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in params])
    opt.local_step()
    step = opt.block - before
    torch.testing.assert_close(step, -LR * torch.sign(grad), rtol=1e-4, atol=1e-6)
    assert bool((opt.state_tensors()["exp_avg_sq"] >= 0).all())


def test_trivial_bma_moments_equal_discrepancy():  # invariant 10
    params = make_block()
    opt = BMAAdam(params, lr=LR, bma=(0.0, 0.0), discrepancy_ref="pre", discrepancy_scale="lr")
    x_pre = opt.block.clone()
    torch_loss(params, quadratic_targets(1)[0], 1e-3).backward()
    opt.local_step()
    mixed = opt.block * 0.5 + 0.25
    opt.block.copy_(mixed)
    opt.consensus_update()
    d = (x_pre - mixed) / LR
    state = opt.state_tensors()
    torch.testing.assert_close(state["exp_avg"], d)
    torch.testing.assert_close(state["exp_avg_sq"], d * d)


def test_state_lives_only_for_the_active_block():  # invariant 8
    block_a, block_b = make_block(0), [nn.Parameter(torch.randn(7))]
    opt = BMAAdam(block_a, lr=LR)
    assert opt.state_tensors() == {} or set(opt.state_tensors()) <= {"block"}
    torch_loss(block_a, quadratic_targets(1)[0], 1e-3).backward()
    opt.local_step()
    state = opt.state_tensors()
    assert set(state) == {"block", "exp_avg", "exp_avg_sq", "reference", "denom"}
    assert all(t.numel() == opt.numel for t in state.values())
    opt.consensus_update()
    assert opt.step_in_block == 1
    opt.switch_block(block_b)
    assert opt.state_tensors() == {}
    assert opt.step_in_block == 0
    assert opt.numel == 7
    block_b[0].sum().backward()
    opt.local_step()
    assert opt.state_tensors()["exp_avg"].numel() == 7


def test_low_precision_params_keep_fp32_master():
    params = make_block(dtype=torch.bfloat16)
    opt = BMAAdam(params, lr=1e-4)
    torch_loss(params, quadratic_targets(1)[0], 1e-3).backward()
    opt.local_step()
    opt.consensus_update()
    assert opt.block.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in params)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    assert torch.equal(flat, opt.block.to(torch.bfloat16))
    # tiny updates accumulate in the master copy even when bf16 cannot represent them
    assert not torch.equal(opt.block.to(torch.bfloat16).float(), opt.block)


# ---------------------------------------------------------------------- errors


def test_local_step_without_grad_is_an_error():
    opt = BMAAdam(make_block(), lr=LR)
    with pytest.raises(BMAAdamError, match="without gradients"):
        opt.local_step()


def test_consensus_before_local_step_is_an_error():
    opt = BMAAdam(make_block(), lr=LR)
    with pytest.raises(BMAAdamError, match="before local_step"):
        opt.consensus_update()


def test_non_finite_mixed_block_is_rejected_and_state_kept():
    for ref in ("pre", "half"):
        params = make_block()
        before = [p.detach().clone() for p in params]
        opt = BMAAdam(params, lr=LR, discrepancy_ref=ref)
        torch_loss(params, quadratic_targets(1)[0], 1e-3).backward()
        opt.local_step()
        x_half = opt.block.clone()
        moments = {k: v.clone() for k, v in opt.state_tensors().items()}
        opt.block[3] = float("nan")
        with pytest.raises(BMAAdamError, match="NaN or Inf"):
            opt.consensus_update()
        assert torch.equal(opt.block, x_half)
        for p, b in zip(params, before):
            assert torch.equal(p, b)
        for k, v in opt.state_tensors().items():
            assert torch.equal(v, moments[k]), k
        # mixing again with good values goes through
        opt.consensus_update()
        assert opt.step_in_block == 1


def test_shape_changes_are_errors():
    params = make_block()
    opt = BMAAdam(params, lr=LR)
    torch_loss(params, quadratic_targets(1)[0], 1e-3).backward()
    opt.local_step()
    opt.block.resize_(5)
    with pytest.raises(BMAAdamError, match="flat float32"):
        opt.consensus_update()
    params2 = make_block()
    opt2 = BMAAdam(params2, lr=LR)
    params2[0].data = torch.zeros(2, 2)
    params2[0].grad = torch.zeros(2, 2)
    with pytest.raises(BMAAdamError, match="shapes changed"):
        opt2.local_step()


def test_bad_hyperparameters_name_the_setting():
    with pytest.raises(BMAAdamError, match="discrepancy_scale"):
        BMAAdam(make_block(), lr=LR, discrepancy_scale="nope")
    with pytest.raises(BMAAdamError, match="algorithm.lr"):
        BMAAdam(make_block(), lr=-1.0)
    with pytest.raises(BMAAdamError, match="mu1/mu2"):
        BMAAdam(make_block(), lr=LR, bma=(1.5, 0.3))
    with pytest.raises(BMAAdamError, match="algorithm.bias_correction"):
        BMAAdam(make_block(), lr=LR, bias_correction="nope")
    with pytest.raises(BMAAdamError, match="local_step\\(\\) called twice"):
        params = make_block()
        opt = BMAAdam(params, lr=LR)
        torch_loss(params, quadratic_targets(1)[0], 1e-3).backward()
        opt.local_step()
        opt.local_step()


@pytest.mark.parametrize("ref", ["pre", "half"])
def test_exact_equals_literal_without_bma(ref):
    n, steps = 4, 12
    x0 = make_block()
    targets, loss_scales, w = quadratic_targets(n), scales(n), ring_w(n)
    runs = {
        c: implementation_run(
            x0, targets, loss_scales, w, steps, bma=None, discrepancy_ref=ref, bias_correction=c
        )[0]  # fmt: skip
        for c in ("literal", "exact")
    }
    for r in range(steps):
        for i in range(n):
            # S~ by recursion vs 1 - beta^(r+1) by power differ only in the last bits
            np.testing.assert_allclose(runs["exact"][r][i], runs["literal"][r][i], rtol=1e-6,
                                       atol=1e-7)  # fmt: skip


def test_exact_differs_from_literal_with_bma_and_restarts_per_block():
    """With BMA the exact divisor is larger than eq (5)'s, so steps are larger; a block
    switch resets S to 0, so the first step of every block is Adam's lr * sign(g)."""
    targets, loss_scales, w = quadratic_targets(2), scales(2), ring_w(3)[:2, :2]
    w = w / w.sum(1, keepdims=True)
    x0 = make_block()
    lit, _, _ = implementation_run(x0, targets, loss_scales, w, 6, bias_correction="literal")
    ex, opts, clients = implementation_run(x0, targets, loss_scales, w, 6,
                                           bias_correction="exact")  # fmt: skip
    step_lit = np.abs(lit[-1][0] - lit[-2][0]).mean()
    step_ex = np.abs(ex[-1][0] - ex[-2][0]).mean()
    assert step_ex > 1.5 * step_lit
    opt, params = opts[0], clients[0]
    opt.switch_block(params)
    x_before = opt.block.clone()
    loss = torch_loss(params, targets[0], loss_scales[0])
    loss.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in params]).clone()
    opt.local_step()
    # (up to eps: some coordinates have gradients near 1e-6)
    torch.testing.assert_close(x_before - opt.block, LR * torch.sign(grad), rtol=0, atol=LR * 1e-3)


def test_step_stats_match_a_direct_computation():
    params = make_block()
    opt = BMAAdam(params, lr=LR, bma=(0.3, 0.333), track_stats=True)
    target = quadratic_targets(1)[0]
    local, effective, cosines = [], [], []
    for _ in range(3):
        torch_loss(params, target, 1e-2).backward()
        g = torch.cat([p.grad.reshape(-1) for p in params]).double()
        x_pre = opt.block.double().clone()
        opt.local_step()
        opt.zero_grad()
        x_half = opt.block.double().clone()
        opt.block.mul_(0.9)  # a stand-in for mixing
        x_new = opt.block.double().clone()
        opt.consensus_update()
        step = x_pre - x_half
        local.append(float(step.pow(2).mean().sqrt()) / LR)
        effective.append(float((x_new - x_pre).pow(2).mean().sqrt()) / LR)
        cosines.append(float(torch.dot(step, g) / (step.norm() * g.norm())))
    stats = opt.step_stats()
    assert stats["steps"] == 3
    assert stats["local_step"] == pytest.approx(np.mean(local), rel=1e-4)
    assert stats["effective_step"] == pytest.approx(np.mean(effective), rel=1e-4)
    assert stats["update_grad_cosine"] == pytest.approx(np.mean(cosines), rel=1e-4)
    assert local[0] == pytest.approx(1.0, rel=1e-3)  # the first step is lr * sign(g)


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_a_step_allocates_no_block_sized_buffer_once_the_state_exists(variant):
    """Both half-steps reuse the block's buffers (a fresh block-sized CPU allocation is
    page-faulted in every step): after the first step, torch's profiler sees no
    allocation of even a quarter of the block, with the diagnostics on."""
    from torch.profiler import ProfilerActivity, profile

    params = [nn.Parameter(torch.randn(40_000)) for _ in range(3)]
    opt = BMAAdam(params, lr=LR, track_stats=True, **variant)

    def step() -> None:
        opt.local_step()
        opt.block.mul_(0.9)  # stands in for the neighbours' mix
        opt.consensus_update()

    for p in params:
        p.grad = torch.randn_like(p)
    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    quarter = opt.numel  # bytes: a quarter of the fp32 block
    big = [(e.name, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage >= quarter]
    assert big == []
    # and the profiler sees allocations at all: a block-sized one is reported
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.zeros(opt.numel)
    assert max(e.cpu_memory_usage for e in prof.events()) >= opt.numel * 4
