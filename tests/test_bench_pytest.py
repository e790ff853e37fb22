"""pytest-benchmark timings of the end-to-end model; part of the suite (`make test`), and alone:
`pytest tests/test_bench_pytest.py --benchmark-only` (add `--benchmark-disable` to only check they run).

The tiny model runs on the CPU everywhere (ref-eager, ref-sdpa); on a CUDA GPU the base model runs
at batch 8 in bfloat16 (ref-sdpa and ours-triton). Each GPU round ends with a synchronize, so the
wall time pytest-benchmark reads is the device time of the forward, not its launch time.
The full suite with peers, dtypes and batches is `python -m vithybrid_fast.bench`.
"""

from __future__ import annotations

import pytest
import torch
from vithybrid_fast.bench import e2e

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    return e2e.random_state_dict(e2e.tiny_config(), torch.device("cpu"))


@pytest.mark.parametrize("provider", ["ref-eager", "ref-sdpa"])
@pytest.mark.parametrize("batch", [1, 2])
def test_tiny_cpu(benchmark, tiny_state, provider, batch):
    config = e2e.tiny_config()
    model = e2e.build_provider(provider, config, tiny_state, torch.float32)
    pixels = e2e.make_pixels(config, batch)
    benchmark.extra_info.update(provider=provider, batch=batch, dtype="float32", device="cpu", config="tiny")
    with torch.inference_mode():
        logits = benchmark(lambda: model(pixels).logits)
    assert logits.shape == (batch, config.num_labels) and torch.isfinite(logits).all()


@pytest.fixture(scope="module")
def base_state_cuda() -> dict[str, torch.Tensor]:
    if not CUDA:
        pytest.skip("needs a CUDA GPU (none on this machine)")
    return e2e.random_state_dict(e2e.base_config(), torch.device("cuda"))


@pytest.mark.parametrize("provider", ["ref-sdpa", "ours-triton"])
def test_base_cuda_batch8_bf16(benchmark, base_state_cuda, provider):
    reason = e2e.skip_reason(provider, torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    config = e2e.base_config()
    model = e2e.build_provider(provider, config, base_state_cuda, torch.bfloat16)
    pixels = e2e.make_pixels(config, 8).to("cuda", torch.bfloat16)
    benchmark.extra_info.update(provider=provider, batch=8, dtype="bfloat16", gpu=torch.cuda.get_device_name())

    def forward() -> torch.Tensor:
        logits = model(pixels).logits
        torch.cuda.synchronize()
        return logits

    with torch.inference_mode():
        for _ in range(3):  # autotuning and cuDNN algorithm choice stay out of the rounds
            forward()
        logits = benchmark.pedantic(forward, rounds=30, iterations=1, warmup_rounds=2)
    assert torch.isfinite(logits).all()
