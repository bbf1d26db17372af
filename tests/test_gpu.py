"""The engine on a CUDA GPU: same numbers as on the CPU (fp32), bf16 tracking fp32, peak memory.

Skipped where no GPU is present (CI); run where one is lent:

    pytest -q tests/test_gpu.py tests/test_gossip.py -k "cuda or nccl or gpu"

The reference for the GPU run is an independent computation of the same thing: the CPU run
of the same config (fp32), or the fp32 GPU run (bf16).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deca_flower.engine import Engine
from deca_flower.reporting import read_metrics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _train(make_config, device: str, dtype: str = "float32", **overrides):
    """Train every block once; return per-step mean losses, block updates, phase records."""
    cfg = make_config(
        **{
            "model.device": device,
            "model.dtype": dtype,
            "train.layers_per_block": 2,
            "train.steps_per_block": 3,
            "eval.average_model": False,
            **overrides,
        }
    )
    engine = Engine(cfg)
    peer = engine.peers[0]
    blocks = range(peer.partition.num_blocks)
    before = [
        torch.cat([p.detach().float().cpu().flatten() for p in peer.partition.parameters(k)])
        for k in blocks
    ]
    engine.run()
    after = [
        torch.cat([p.detach().float().cpu().flatten() for p in peer.partition.parameters(k)])
        for k in blocks
    ]
    records = read_metrics(engine.run_dir.metrics_path)
    losses = np.array([np.mean(r["loss"]) for r in records if r["type"] == "step"])
    update = torch.cat([a - b for a, b in zip(after, before)])
    return losses, update, [r for r in records if r["type"] == "phase"], engine


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def test_fp32_on_gpu_matches_the_cpu_run(make_config) -> None:
    cpu_losses, cpu_update, _, _ = _train(make_config, "cpu")
    gpu_losses, gpu_update, phases, engine = _train(make_config, "cuda")
    assert engine.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in engine.peers[0].model.parameters())
    print(
        f"\nfp32 cpu vs cuda: loss max rel diff {np.max(np.abs(gpu_losses / cpu_losses - 1)):.2e}, "
        f"update cosine {_cosine(gpu_update, cpu_update):.6f}"
    )
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=1e-3)
    # Adam divides by sqrt(v): coordinates with near-zero gradients may differ in sign, so the
    # update is compared as a whole rather than per coordinate.
    assert _cosine(gpu_update, cpu_update) > 0.999
    assert torch.linalg.norm(gpu_update) > 0


def test_bf16_on_gpu_tracks_fp32_and_sends_half_the_bytes(make_config) -> None:
    fp32_losses, fp32_update, fp32_phases, _ = _train(make_config, "cuda")
    bf16_losses, bf16_update, bf16_phases, engine = _train(
        make_config, "cuda", "bfloat16", **{"algorithm.wire_dtype": "model"}
    )
    assert all(p.dtype == torch.bfloat16 for p in engine.peers[0].model.parameters())
    print(
        f"\nbf16 vs fp32 on cuda: loss max rel diff "
        f"{np.max(np.abs(bf16_losses / fp32_losses - 1)):.2e}, update cosine "
        f"{_cosine(bf16_update, fp32_update):.4f}"
    )
    assert np.all(np.isfinite(bf16_losses))
    np.testing.assert_allclose(bf16_losses, fp32_losses, rtol=0.03)
    assert _cosine(bf16_update, fp32_update) > 0.9
    for a, b in zip(bf16_phases, fp32_phases):
        assert a["bytes_sent"] == [x // 2 for x in b["bytes_sent"]]


def test_peak_gpu_memory_is_recorded_and_covers_the_models(make_config) -> None:
    _, _, phases, engine = _train(make_config, "cuda")
    # Every distinct tensor of every peer's model lives on the GPU at once (frozen parts are
    # shared, hence distinct by storage), so each phase's recorded peak must cover them.
    resident = {
        p.data_ptr(): p.numel() * p.element_size()
        for peer in engine.peers
        for p in peer.model.parameters()
    }
    peaks = [max(r["peak_memory_bytes"]) for r in phases]
    assert min(peaks) >= sum(resident.values())
    assert max(peaks) <= torch.cuda.get_device_properties(0).total_memory


def test_models_on_cuda_avoid_cudnn_attention(make_config) -> None:
    # cuDNN SDPA re-plans for every new padded length: 6x slower bf16 steps (measured).
    engine = Engine(make_config(**{"model.device": "cuda", "model.dtype": "bfloat16"}))
    assert engine.device.type == "cuda"
    assert not torch.backends.cuda.cudnn_sdp_enabled()
