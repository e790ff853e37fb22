"""What one training step asks of the host, counted on any CPU: dispatched torch ops, Triton launches,
host-synchronizing ops and Python's garbage collections, for ours and the reference.

Why: on the H200 (session 19) ours' bf16 training step ran 94.7 ms of kernels in steps of 120-188 ms: the
GPU waited for the host. These are counts, not times: every dispatched op and every launch is host work on
a GPU machine too (a few µs for a torch op, ~10 µs for a Triton launch), so the census says how much work
a step hands the host; a synchronizing op would be a bug (tests/test_host_syncs.py checks for them).

The real architecture (base config) at 64×64 pixels (a 4×4 feature grid), batch 1, on the CPU, in
training mode under bf16 autocast as `finetune` trains: one forward + backward after a warm-up one, with
Triton's launches counted and skipped (the kernels' outputs stay uninitialized: only the ops matter), the
interpreter off so that the launchers plan as for a GPU (at these small shapes: the 384² model's plans
may split a kernel differently).
Autocast on a CPU casts by the CPU's op lists, which differ from CUDA's: the casts counted are the CPU's.
The optimizer is left out (torch's own, the same for every provider).

    python -m vithybrid_fast.bench.host_census [--out census.jsonl]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

PROVIDERS = ("ours-triton", "ref-sdpa")
# Ops whose result the host needs before it can go on (a device-to-host copy and a wait).
SYNCING = frozenset({
    "aten._local_scalar_dense",  # .item(), float(t), int(t), bool(t), `if t:`
    "aten.is_nonzero",
    "aten.equal",
    "aten.allclose",
    "aten.nonzero",  # data-dependent output shapes
    "aten.masked_select",
    "aten._unique2",
    "aten.unique_consecutive",
    "aten.unique_dim",
    "aten.repeat_interleave",
    "aten.bincount",
})  # fmt: skip
GC_STEPS = 10


def op_census():
    """A TorchDispatchMode recording every dispatched op by name in its `ops` Counter."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCensus(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: collections.Counter[str] = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    return OpCensus()


@contextlib.contextmanager
def counted_launches() -> Iterator[collections.Counter[str]]:
    """Inside, every Triton launch (compiled, interpreted or autotuned) is counted by kernel name, not run."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    counted: collections.Counter[str] = collections.Counter()

    def count(kernel, *args, **kwargs) -> None:
        while not hasattr(kernel, "__name__"):  # an autotuner's or heuristics' wrapped kernel
            kernel = kernel.fn
        counted.update([kernel.__name__])

    launchers = (InterpretedFunction, JITFunction, Autotuner)
    saved = [launcher.__dict__["run"] for launcher in launchers]
    for launcher in launchers:
        launcher.run = count
    try:
        yield counted
    finally:
        for launcher, run in zip(launchers, saved, strict=True):
            launcher.run = run


def _gc_per_step(step, steps: int) -> tuple[float, float]:
    """(collections, ms) per step of Python's garbage collector over `steps` steps."""
    collections_ms = [0, 0.0]
    started = [0.0]

    def watch(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            collections_ms[0] += 1
            collections_ms[1] += (time.perf_counter() - started[0]) * 1e3

    gc.callbacks.append(watch)
    try:
        for _ in range(steps):
            step()
    finally:
        gc.callbacks.remove(watch)
    return collections_ms[0] / steps, collections_ms[1] / steps


def census(provider: str) -> dict:
    """One record: what a forward + backward of `provider` dispatches and launches."""
    import torch

    from vithybrid_fast.config import ViTHybridConfig
    from vithybrid_fast.modeling import ViTHybridForImageClassification
    from vithybrid_fast.patching import patch_for_autocast

    torch.manual_seed(0)
    config = ViTHybridConfig.base_384(image_size=64, backbone_featmap_shape=[1, 1024, 4, 4])
    model = ViTHybridForImageClassification(config).train()
    if provider == "ours-triton":
        model = patch_for_autocast(model, "triton", torch.bfloat16)
    else:
        model.set_attn_implementation("sdpa")
    pixels, labels = torch.randn(1, 3, 64, 64), torch.tensor([1])

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(pixels, labels=labels).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    with counted_launches() as launches:
        step()  # warm-up: first-call work (caches, plans) stays out of the count
        launches.clear()
        with op_census() as ops:
            step()
        counted = dict(launches)
        gc_collections, gc_ms = _gc_per_step(step, GC_STEPS)
    return {
        "kind": "host_census", "provider": provider, "config": "base, 64x64 pixels", "batch": 1,
        "autocast": "bfloat16 (cpu)", "torch_ops": sum(ops.ops.values()), "triton_launches": sum(counted.values()),
        "ops": dict(ops.ops.most_common()), "launches": counted,
        "syncing_ops": {op: n for op, n in ops.ops.items() if op in SYNCING},
        "gc_collections_per_step": gc_collections, "gc_ms_per_step": gc_ms, "torch": torch.__version__,
    }  # fmt: skip


def _launch_on_a_cpu() -> None:
    """Let the patched model take its GPU path on CPU tensors, every launch a no-op (this process only)."""
    import vithybrid_fast.patching

    from .bench_host_overhead import _stub_launches

    _stub_launches()
    vithybrid_fast.patching.triton_can_run = lambda device=None: True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"(default: {','.join(PROVIDERS)})")
    parser.add_argument("--out", type=Path, default=None, help="append the records here as JSON lines")
    args = parser.parse_args(argv)
    providers = args.providers.split(",")
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        parser.error(f"unknown provider(s) {', '.join(unknown)}; known: {', '.join(PROVIDERS)}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("needs TRITON_INTERPRET unset or 0: the interpreter's plans (block sizes, passes) are not a GPU's")
    _launch_on_a_cpu()
    for provider in providers:
        record = census(provider)
        top = ", ".join(f"{op} {n}" for op, n in list(record["ops"].items())[:6])
        gc_line = f"{record['gc_collections_per_step']:.2f} collections, {record['gc_ms_per_step']:.3f} ms per step"
        print(f"{provider}: {record['torch_ops']} torch ops ({top}, ...), {record['triton_launches']} Triton "
              f"launches, syncing ops: {record['syncing_ops'] or 'none'}; garbage collector {gc_line}")  # fmt: skip
        if args.out is not None:
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
