"""Host time per kernel call (forward + backward), Triton's launch stubbed out: what the Python side costs.

Why: the H200's bf16 training step (session 19, bench/results/nvidia-h200-2026-11-27-run4-notes.md) ran
94.7 ms of kernels in steps of 120–188 ms: the GPU waited for the host. The host's part per call (argument
checks, allocation, the autograd node, torch's custom-op dispatcher, Triton's launcher) can be measured on
any CPU: this script replaces the kernel launches with no-ops and times the calls themselves on small CPU
tensors, through the public functions in eager mode (the eager twins of kernels/_eager.py) and the same
calls routed through the custom ops (what torch.compile traces), with torch's own ops beside them for
scale (those include their small CPU compute). Not a GPU figure: a GPU machine's host is faster or slower,
and a real launch adds Triton's argument binding (stubbed out here with the kernel).

    python -m vithybrid_fast.bench.bench_host_overhead [--calls 2000] [--rounds 5] [--out host.jsonl]

Run it in its own process: it patches Triton's launcher for the whole process, and needs the interpreter off.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .arguments import positive_int


def _stub_launches() -> None:
    """Every Triton launch a no-op; kernels' CUDA-device checks off (the tensors here are on the CPU)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    JITFunction.run = lambda self, *args, **kwargs: None
    Autotuner.run = lambda self, *args, **kwargs: None
    import vithybrid_fast.kernels  # noqa: F401 - loads every kernel module

    for name, module in list(sys.modules.items()):
        if name.startswith("vithybrid_fast.kernels") and hasattr(module, "check_launchable"):
            module.check_launchable = lambda *args, **kwargs: None


def _cases() -> dict[str, dict[str, Callable[[], object]]]:
    """kernel → provider → one forward + backward call."""
    import torch
    import torch.nn.functional as F
    from vithybrid_fast.kernels import add_layer_norm_train, flash_attention, group_norm_act, weight_standardize

    leaf = lambda *shape: torch.randn(*shape).requires_grad_()  # noqa: E731
    x, w, b = leaf(2, 64, 8, 8), leaf(64), leaf(64)
    cw = leaf(64, 64, 3, 3)
    q, k, v = leaf(1, 2, 16, 32), leaf(1, 2, 16, 32), leaf(1, 2, 16, 32)
    hx, hr, lw, lb = leaf(8, 768), leaf(8, 768), leaf(768), leaf(768)

    def fwd_bwd(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            out = fn()
            out.backward(torch.ones_like(out))

        return step

    return {
        "group_norm_act": {
            "ours": fwd_bwd(lambda: group_norm_act(x, 32, w, b, 1e-5, "relu")),
            "torch (with compute)": fwd_bwd(lambda: F.relu(F.group_norm(x, 32, w, b, 1e-5))),
        },
        "weight_standardize": {"ours": fwd_bwd(lambda: weight_standardize(cw))},
        "flash_attention": {
            "ours": fwd_bwd(lambda: flash_attention(q, k, v)),
            "torch (with compute)": fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v)),
        },
        "add_layer_norm_train": {
            "ours": fwd_bwd(lambda: add_layer_norm_train(hx, hr, lw, lb, 1e-6, torch.float32)[1]),
            "torch (with compute)": fwd_bwd(lambda: F.layer_norm(hx + hr, (768,), lw, lb, 1e-6)),
        },
    }


def _through_custom_ops(on: bool) -> None:
    """Route the kernels' public functions through their custom ops (as under torch.compile) or their twins."""
    from vithybrid_fast.kernels import _eager

    _eager.TWINS = not on


def _time_us(step: Callable[[], None], calls: int, rounds: int) -> list[float]:
    for _ in range(max(calls // 20, 5)):  # warm-up (also after a route switch)
        step()
    per_round = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        per_round.append((time.perf_counter() - start) / calls * 1e6)
    return per_round


def run(calls: int = 2000, rounds: int = 5, on_record: Callable[[dict], None] | None = None) -> list[dict]:
    """One record per (kernel, provider): the median of `rounds` rounds of `calls` calls, in µs per call."""
    import torch

    _stub_launches()
    torch.set_num_threads(1)  # the host's dispatch is single-threaded; keep torch's small compute so too
    records = []
    for kernel, providers in _cases().items():
        for provider, step in providers.items():
            routes = ((" (eager twin)", False), (" (custom op)", True)) if provider == "ours" else (("", False),)
            per_route: dict[str, list[float]] = {suffix: [] for suffix, _ in routes}
            for _ in range(rounds):  # the routes alternate round by round: this machine's speed drifts
                for suffix, custom_ops in routes:
                    _through_custom_ops(custom_ops)
                    per_route[suffix] += _time_us(step, calls, 1)
                    _through_custom_ops(False)
            for suffix, rounds_us in per_route.items():
                record = {
                    "kind": "host_overhead", "kernel": kernel, "provider": provider + suffix,
                    "us_per_call": statistics.median(rounds_us), "us_rounds": rounds_us, "calls": calls,
                    "torch": torch.__version__, "python": platform.python_version(),
                    "cpu": platform.processor() or platform.machine(),
                }  # fmt: skip
                if len(routes) == 2:  # the twin's time over the op's, round by round (paired)
                    twin, op = per_route[" (eager twin)"], per_route[" (custom op)"]
                    record["twin_over_op_median"] = statistics.median(a / b for a, b in zip(twin, op, strict=True))
                records.append(record)
                if on_record is not None:
                    on_record(record)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=positive_int, default=2000, help="calls per round (default: 2000)")
    parser.add_argument("--rounds", type=positive_int, default=5, help="rounds; the median is reported (default: 5)")
    parser.add_argument("--out", type=Path, default=None, help="append the records here as JSON lines")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("needs TRITON_INTERPRET unset or 0: the interpreter's launch cannot be stubbed out")

    def show(record: dict) -> None:
        line = (
            f"{record['kernel']:<22} {record['provider']:<22} {record['us_per_call']:>8.1f} µs per forward + backward"
        )
        if record["provider"].endswith("(custom op)"):
            line += f"   twin / op, paired by round: {record['twin_over_op_median']:.2f}"
        print(line)
        if args.out is not None:
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")

    run(args.calls, args.rounds, on_record=show)
    return 0


if __name__ == "__main__":
    sys.exit(main())
