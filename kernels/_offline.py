"""Compile our Triton kernels for a GPU without one: resource checks in CI and `vithybrid-fast warmup`.

Each kernel module, or its `_<kernel>_offline.py` sibling, lists the launches the model makes, at its real
shapes, as `Launch` records:

    def offline_launches(dtype: torch.dtype, batches: Sequence[int]) -> list[Launch]: ...

A `Launch` holds the kernel (the @triton.jit function, a @triton.heuristics wrapper or a `TunedKernel`),
every argument the launcher passes (tensors as `TensorArg(dtype)`, ints with their real values, since
Triton specializes ints equal to 1 and multiples of 16), and the configs its autotuner can pick at that
shape after pruning. `compile_launch` binds those arguments with Triton's own launcher code, so the
signature, specialization and options — and therefore the cache key — are the ones a real launch on
that GPU computes: what `warmup` compiles is what a run finds in Triton's cache.

Kernel objects must be the native ones: import this module with TRITON_INTERPRET unset or 0 (the test
suite calls `python -m vithybrid_fast.kernels._offline` in a subprocess).

    python -m vithybrid_fast.kernels._offline --arch sm_90 --dtypes bfloat16 --batches 1,8,64 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import io
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import torch

ARCHS = {"sm_80": 80, "sm_90": 90}
# Per-block shared-memory opt-in maxima (cudaDevAttrMaxSharedMemoryPerBlockOptin): A100, H100.
SHARED_LIMIT = {80: 166_912, 90: 232_448}
# (SM count, per-block shared memory) of the GPU each arch's configs are pruned for: A100, H100 SXM.
GPUS = {80: (108, SHARED_LIMIT[80]), 90: (132, SHARED_LIMIT[90])}
MAX_REGISTERS = 255
PHASES = ("forward", "backward")
# Launches a run makes only when asked (channels_last backbone): listed, so coverage counts them, but
# compiled by their own test (tests/test_backbone_targets.py) to keep the CI compile set small.
OPT_IN_PHASES = ("channels_last",)
# The base checkpoint (google/vit-hybrid-base-bit-384): what offline_launches describe.
TOKENS, HIDDEN, HEADS, MLP = 577, 768, 12, 3072


@dataclasses.dataclass(frozen=True)
class TensorArg:
    """Stands for a tensor argument: its dtype, and whether its address is 16-byte aligned."""

    dtype: torch.dtype
    aligned: bool = True

    def data_ptr(self) -> int:  # what Triton's specialization reads
        return 1 << 20 if self.aligned else (1 << 20) + 2


@dataclasses.dataclass
class Launch:
    """One kernel launch the model makes (see the module docstring)."""

    name: str  # readable label, e.g. "fused_linear qkv"
    kernel: Any  # @triton.jit function, heuristics wrapper, or TunedKernel
    args: dict[str, Any]  # every non-config argument, by parameter name
    configs: list  # triton.Config candidates after pruning (one for a non-autotuned launch)
    phase: str = "forward"  # "forward" (inference launches it) or "backward" (training only)


@dataclasses.dataclass
class CompileResult:
    name: str
    kernel: str
    arch: int
    dtype: str
    config: str
    phase: str
    shared: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    tf32_mma: bool  # a tf32 mma/wgmma in the PTX
    fp32_fma: int  # float32 FMAs in the PTX (none in a kernel compiled with jit(fp_fusion=False)'s math)
    seconds: float  # wall time: grows with whatever else the machine runs
    cpu_seconds: float  # CPU time of the compile, ptxas included: about its wall time on an idle core
    cached: bool  # Triton's cache already held it (no compile happened)
    error: str = ""

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def config_label(config: Any) -> str:
    from ._tuning import config_id

    return config_id(config)


def _jit_function(kernel: Any, args: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Unwrap TunedKernel / Autotuner / Heuristics down to the JITFunction, applying heuristics."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    args = dict(args)
    while True:
        if hasattr(kernel, "autotuner"):
            kernel = kernel.autotuner
        elif isinstance(kernel, Autotuner):
            kernel = kernel.fn
        elif isinstance(kernel, Heuristics):
            for name, heur in kernel.values.items():
                args[name] = heur(args)
            kernel = kernel.fn
        else:
            return kernel, args


def _bind(kernel: Any, args: dict[str, Any], config: Any, target: Any):
    """Triton's own launch-time binding (JITFunction.run), for `target` instead of the current device."""
    from ._tuning import FP_FUSION

    merged = {**args, **config.kwargs}
    fn, merged = _jit_function(kernel, merged)
    fusion = getattr(fn, "fp_fusion", None)  # a kernel's own choice (jit(fp_fusion=...)), as it launches
    fusion = FP_FUSION if fusion is None else fusion
    return bind_call(fn, {**merged, **config.all_kwargs(), "enable_fp_fusion": fusion}, target)


def bind_call(fn: Any, call: dict[str, Any], target: Any):
    """(fn, ASTSource, options) of `fn.run(**call)` on `target`: every argument and option by name."""
    import triton
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kw = dict(call)
    kw["debug"] = getattr(fn, "debug", None) or knobs.runtime.debug
    kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # triton ≥ 3.7
        kw["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(**kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, specialization, options)
    source = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
    return fn, source, options


def source_key(source: Any, options: Any) -> tuple[str, str]:
    """What makes two launches one compiled kernel: the source's hash (function, signature,
    specialization, constexprs) and the compile options."""
    return source.hash(), repr(sorted(options.__dict__.items()))


_PTXAS_PATTERNS = {
    "registers": r"Used (\d+) registers",
    "stack": r"(\d+) bytes stack frame",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
}


def _ptxas_info(log: str) -> dict[str, int]:
    return {k: int(m.group(1)) if (m := re.search(p, log)) else -1 for k, p in _PTXAS_PATTERNS.items()}


def _ptxas_verbose(ptx: str, arch: int) -> str:
    """`ptxas -v` on PTX Triton produced (used when Triton's cache answered and printed no log)."""
    from triton.backends.nvidia.compiler import get_ptxas

    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", str(src), "-o", str(Path(tmp) / "k.o")]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return done.stderr + done.stdout


_TF32_MMA = re.compile(r"\b(?:mma|wgmma)[.\w]*\.tf32\b")
_FP32_FMA = re.compile(r"\bfma\.rn(?:\.ftz)?\.f32\b")


def _cpu_time() -> float:
    """This process's CPU seconds plus its waited-for children's (ptxas runs as a child process)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def compile_launch(launch: Launch, config: Any, arch: int, keep_asm: bool = False) -> tuple[CompileResult, dict]:
    """Compile one (launch, config) for sm_<arch>; returns the resource summary and (optionally) ptx/sass."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    fn, source, options = _bind(launch.kernel, launch.args, config, target)
    dtype = next((str(v.dtype).removeprefix("torch.") for v in launch.args.values() if isinstance(v, TensorArg)), "")
    common = dict(
        name=launch.name, kernel=fn.__name__, arch=arch, dtype=dtype, config=config_label(config), phase=launch.phase
    )
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    start, cpu_start = time.perf_counter(), _cpu_time()
    try:
        with redirect_stdout(log):
            compiled = triton.compile(source, target=target, options=options.__dict__)
    except Exception as err:  # a compile error is a result the checks report, not a crash
        failed = dict(shared=-1, registers=-1, spill_stores=-1, spill_loads=-1, stack=-1, tf32_mma=False, fp32_fma=0)
        message = f"{type(err).__name__}: {str(err)[:2000]}"
        timing = dict(seconds=time.perf_counter() - start, cpu_seconds=_cpu_time() - cpu_start)
        return CompileResult(**common, **failed, **timing, cached=False, error=message), {}
    seconds, cpu_seconds = time.perf_counter() - start, _cpu_time() - cpu_start
    text = log.getvalue()
    cached = "registers" not in text
    ptx = compiled.asm["ptx"]
    if isinstance(ptx, bytes):
        ptx = ptx.decode()
    info = _ptxas_info(text if not cached else _ptxas_verbose(ptx, arch))
    result = CompileResult(
        **common, shared=int(compiled.metadata.shared), tf32_mma=bool(_TF32_MMA.search(ptx)),
        fp32_fma=len(_FP32_FMA.findall(ptx)),
        seconds=seconds, cpu_seconds=cpu_seconds, cached=cached, **info,
    )  # fmt: skip
    asm = {}
    if keep_asm:
        from triton.tools.disasm import get_sass

        asm = {"ptx": ptx, "sass": get_sass(compiled.asm["cubin"])}
    return result, asm


def kernel_modules() -> list[str]:
    """Every module of this package defining `offline_launches` (a new kernel file is found by itself)."""
    package = importlib.import_module(__package__)
    found = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{__package__}.{info.name}")
        if hasattr(module, "offline_launches"):
            found.append(module.__name__)
    return sorted(found)


def collect_launches(
    dtypes: Sequence[torch.dtype], batches: Sequence[int], phases: Sequence[str] = PHASES, arch: int | None = None
) -> list[Launch]:
    """Every module's launches; `arch` narrows the pruned configs to that GPU (None: the union of both)."""
    launches = []
    for name in kernel_modules():
        module = importlib.import_module(name)
        takes_arch = "arch" in inspect.signature(module.offline_launches).parameters
        for dtype in dtypes:
            found = module.offline_launches(dtype, list(batches), arch=arch) if takes_arch else (
                module.offline_launches(dtype, list(batches)))  # fmt: skip
            launches += [ln for ln in found if ln.phase in phases]
    return launches


def compile_jobs(launches: Sequence[Launch], arch: int) -> list[tuple[Launch, Any]]:
    """(launch, config) pairs, one per distinct compiled kernel: launches sharing a compile count once."""
    import triton.backends.compiler as backends_compiler

    target = backends_compiler.GPUTarget("cuda", arch, 32)
    jobs, seen = [], set()
    for launch in launches:
        for config in launch.configs:
            key = source_key(*_bind(launch.kernel, launch.args, config, target)[1:])
            if key not in seen:
                seen.add(key)
                jobs.append((launch, config))
    return jobs


_WORKER_JOBS: list = []


def _run_job(index: int) -> dict:
    launch, config, arch = _WORKER_JOBS[index]
    result, _ = compile_launch(launch, config, arch)
    return dataclasses.asdict(result)


def compile_all(jobs: Sequence[tuple[Launch, Any, int]], workers: int | None = None) -> list[CompileResult]:
    """Compile every (launch, config, arch) job in `workers` processes (forked: jobs are not pickled)."""
    import multiprocessing

    _WORKER_JOBS[:] = list(jobs)
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    if workers == 1:
        rows = [_run_job(i) for i in range(len(jobs))]
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            rows = pool.map(_run_job, range(len(jobs)), chunksize=1)
    return [CompileResult(**row) for row in rows]


def entry_kernels() -> dict[str, Any]:
    """Every @triton.jit function of the package that no other one calls: the launchable kernels."""
    from triton.runtime.jit import JITFunction

    jitted = {}
    for name in kernel_modules() + [f"{__package__}.{m.name}" for m in pkgutil.iter_modules(
            importlib.import_module(__package__).__path__)]:  # fmt: skip
        module = importlib.import_module(name)
        for value in vars(module).values():
            if isinstance(value, JITFunction) and value.__module__ == module.__name__:
                jitted[f"{module.__name__}.{value.__name__}"] = value
    sources = {key: fn.src for key, fn in jitted.items()}
    return {
        key: fn
        for key, fn in jitted.items()
        if not any(re.search(rf"\b{fn.__name__}\(", src) for other, src in sources.items() if other != key)
    }


def uncovered_kernels(launches: Sequence[Launch]) -> list[str]:
    """Launchable kernels no `Launch` reaches: a kernel someone forgot to add to `offline_launches`."""
    reached = set()
    for launch in launches:
        kernel = launch.kernel
        while hasattr(kernel, "autotuner") or (hasattr(kernel, "fn") and not hasattr(kernel, "params")):
            kernel = kernel.autotuner if hasattr(kernel, "autotuner") else kernel.fn
        reached.add(id(kernel))
    return sorted(key for key, fn in entry_kernels().items() if id(fn) not in reached)


def tf32_probe() -> dict[str, bool]:
    """Does the TF32 detector see a float32 GEMM compiled with TF32 (and not one compiled IEEE)?"""
    launches = collect_launches([torch.float32], [1], ("forward",), arch=80)
    gemm = next(launch for launch in launches if launch.name == "fused_linear out-proj")  # 577×768×768
    found = {}
    for precision, ieee in (("ieee", True), ("tf32", False)):
        probe = dataclasses.replace(gemm, name=f"tf32 probe ({precision})", args={**gemm.args, "IEEE_FP32": ieee})
        found[precision] = compile_launch(probe, probe.configs[0], 80)[0].tf32_mma
    return found


def _parse_dtypes(text: str) -> list[torch.dtype]:
    return [getattr(torch, name) for name in text.split(",") if name]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_80,sm_90", help="comma-separated: sm_80, sm_90")
    parser.add_argument("--dtypes", default="float32,float16,bfloat16")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write every result here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: run with TRITON_INTERPRET=0 (offline compiles need the native kernels)", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batches.split(",")]
    import triton

    jobs, every_launch = [], []
    dtypes = _parse_dtypes(args.dtypes)
    for name in args.arch.split(","):
        arch = ARCHS[name]
        launches = collect_launches(dtypes, batches, args.phases.split(","), arch)
        every_launch += launches
        jobs += [(ln, cfg, arch) for ln, cfg in compile_jobs(launches, arch)]
    start = time.perf_counter()
    results = compile_all(jobs, args.workers)
    wall = time.perf_counter() - start
    if args.json:
        report = {
            "triton": triton.__version__,
            "modules": kernel_modules(),
            "uncovered": uncovered_kernels(
                every_launch + collect_launches(dtypes, batches, OPT_IN_PHASES, ARCHS[args.arch.split(",")[0]])
            ),
            "tf32_probe": tf32_probe() if torch.float32 in dtypes else {},
            "results": [dataclasses.asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(report, indent=1))
    for r in results:
        status = r.error.splitlines()[0] if r.error else ""
        print(f"sm_{r.arch} {r.name:28s} {r.dtype:15s} {r.config:60s} smem={r.shared:6d} regs={r.registers:3d} "
              f"spill={r.spills:5d} {r.seconds:5.1f}s {status}")  # fmt: skip
    print(f"compiles: {len(results)}, seconds: {wall:.1f}, compile-seconds: {sum(r.seconds for r in results):.1f}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    # Run the package's copy of this module: `python -m` makes this file `__main__`, whose TensorArg
    # would be another class than the one the kernel modules import.
    sys.exit(importlib.import_module(f"{__package__}._offline").main())
