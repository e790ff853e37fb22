"""Measured dispatch: under `kernels="auto"` on a GPU, each fused op runs its Triton kernel or the plain
torch ops it replaces, whichever this GPU runs faster at this shape and dtype.

Why: on first contact with a GPU (an H200, bf16; bench/results/) the fused GEMMs ran at about 300 TFLOP/s
against cuBLAS's 700, so the fused LayerNorm+MLP lost to cuBLAS + torch's LayerNorm and GELU, and cuDNN's
attention beat the flash kernel, while group_norm_act halved torch's GroupNorm + ReLU time. A fused model
must never be slower than the reference on any op, so "auto" lets each op prove it.

How: the first call of an op at a new (shapes, dtype, GPU) times both paths on that call's own inputs (a
warm-up each, which includes the kernel's compile and autotune, then interleaved CUDA-event timings) and
remembers the faster for the process; every later call runs that one. Both paths are pure functions of the
inputs, so timing them on real data changes nothing. No timing happens while a CUDA graph is captured (the kernel path
runs unless the op was decided before: warm the model up first, as the CUDA-graph runner does), and a
torch.compile graph always holds the kernel path. `kernels="triton"` never measures: it always runs the kernels.

Ops that will run replayed from a CUDA graph are timed as graphs (`timing_for_graphs`, which the CUDA-graph
runner holds over its warm-up): eager timing at small batches measures the host's launch time, which a
graph does not pay, and chose torch's ops where the kernels were faster replayed (the second H200 run:
"auto" + graphs 2.30 ms at batch 1, "triton" + graphs 1.83 ms). Those decisions are kept apart from eager ones.

A kernel that raises while being measured (a compile error on a Triton version or GPU no test has run)
loses to torch's ops, with a RuntimeWarning, instead of failing the model that "auto" promised to speed up.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")
logger = logging.getLogger(__name__)

WARMUP, REPS = 2, 5
CALLS_PER_GRAPH = 5  # graph timing: calls captured in one graph, so a replay is long enough to time
_DECISIONS: dict[tuple, str] = {}


class _GraphTiming(threading.local):
    """Per thread: a CUDA-graph runner warming up in one thread must not make another thread's eager
    calls time (and key) their ops as graph replays."""

    on = False


_GRAPH_TIMING = _GraphTiming()
_RESETS = [0]  # bumped by reset(): what was derived from earlier decisions is stale


@contextlib.contextmanager
def timing_for_graphs() -> Iterator[None]:
    """Ops decided inside will be replayed from a CUDA graph: time each path as a graph replay (device
    time, no host launch cost), and keep these decisions apart from eager ones."""
    previous = _GRAPH_TIMING.on
    _GRAPH_TIMING.on = True
    try:
        yield
    finally:
        _GRAPH_TIMING.on = previous


def decisions() -> dict[tuple, str]:
    """What was chosen so far: {(op, ((shape, dtype name) | None, ...), extra, device name, timing):
    "triton" | "torch"}, timing "eager" or "graph" (see `timing_for_graphs`)."""
    return {_readable(key): choice for key, choice in _DECISIONS.items()}


def _readable(key: tuple) -> tuple:
    op, shapes, extra, device, graphed = key
    named = tuple(None if s is None else (tuple(s[0]), str(s[1]).removeprefix("torch.")) for s in shapes)
    return (op, named, extra, str(device), "graph" if graphed else "eager")


def reset() -> None:
    """Forget every decision (the next call of each op measures again)."""
    _DECISIONS.clear()
    _RESETS[0] += 1


def epoch() -> tuple[bool, int]:
    """(graph timing on, resets so far): a decision found once stays until either changes."""
    return _GRAPH_TIMING.on, _RESETS[0]


def _key(op: str, tensors: Sequence[torch.Tensor | None], extra: tuple, device: torch.device) -> tuple:
    # Built on every call of a measured op, so from hashable objects as they are (torch.Size, dtype,
    # device): formatting them as strings took half of dispatch's per-call host time. decisions() names them.
    return (op, tuple(None if t is None else (t.shape, t.dtype) for t in tensors), extra, device, _GRAPH_TIMING.on)


def decided(op: str, tensors: Sequence[torch.Tensor | None], extra: tuple = ()) -> str | None:
    """What `run` chose for `op` at these inputs' shapes and dtypes ("triton" | "torch"), or None if undecided."""
    device = next(t for t in tensors if t is not None).device
    return _DECISIONS.get(_key(op, tensors, extra, device))


def _can_measure(device: torch.device) -> bool:
    if device.type == "cuda":
        return not torch.cuda.is_current_stream_capturing()
    return True


def measure(
    kernel: Callable[[], object], reference: Callable[[], object], device: torch.device, graphed: bool = False
) -> dict[str, float]:
    """Median ms of each path: warm-up first (compile, autotune), then interleaved timed runs.

    On a GPU the runs are queued with one synchronization at the end, so a sample is the GPU's time for
    the call where the GPU is the bottleneck and includes the host's launch time where the host is — what
    the op costs inside a model running eagerly. (Synchronizing after each call would add launch overhead
    to every sample and favour the op with the lighter Python path even where the GPU is the bottleneck.)
    `graphed` (a GPU): each path is captured into a CUDA graph and its replays are timed instead: what the
    op costs inside a replayed model."""
    paths = {"triton": kernel, "torch": reference}
    with torch.no_grad():
        for _ in range(WARMUP):
            for fn in paths.values():
                fn()
        if device.type == "cuda" and graphed:
            try:
                return _graph_times(paths, device)
            except RuntimeError as err:  # a path that cannot be captured: eager timing still decides
                logger.warning("graph timing failed (%s); timing eagerly", err)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            events = {name: [] for name in paths}
            for _ in range(REPS):
                for name, fn in paths.items():
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    events[name].append((start, end))
            torch.cuda.synchronize(device)
            times = {name: [s.elapsed_time(e) for s, e in pairs] for name, pairs in events.items()}
        else:
            times = {name: [] for name in paths}
            for _ in range(REPS):
                for name, fn in paths.items():
                    begin = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - begin) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def _graph_times(paths: dict[str, Callable[[], object]], device: torch.device) -> dict[str, float]:
    """Median ms per call of each path, replayed from a CUDA graph of CALLS_PER_GRAPH calls."""
    torch.cuda.synchronize(device)
    graphs = {}
    stream = torch.cuda.Stream(device)
    for name, fn in paths.items():
        graph = torch.cuda.CUDAGraph()  # its own memory pool, freed with the graph
        # capture_begin/end rather than torch.cuda.graph(), which runs gc.collect() and empty_cache()
        # before every capture: seconds over a model's ~100 measured ops
        with torch.cuda.stream(stream):
            fn()  # once on the capture stream first: per-stream lazy set-up (cuBLAS workspace) stays outside
            graph.capture_begin(capture_error_mode="thread_local")  # as the CUDA-graph runner's captures
            try:
                for _ in range(CALLS_PER_GRAPH):
                    fn()
            finally:
                graph.capture_end()
        graphs[name] = graph
    torch.cuda.current_stream(device).wait_stream(stream)
    events: dict[str, list] = {name: [] for name in paths}
    for _ in range(REPS):
        for name, graph in graphs.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize(device)
    return {
        name: statistics.median(s.elapsed_time(e) for s, e in pairs) / CALLS_PER_GRAPH for name, pairs in events.items()
    }


def run(
    op: str,
    measured: bool,
    kernel: Callable[[], T],
    reference: Callable[[], T],
    tensors: Sequence[torch.Tensor | None],
    extra: tuple = (),
) -> T:
    """`kernel()` unless `measured`; then whichever of `kernel()` / `reference()` is faster for these
    inputs (`tensors` and `extra` make the key: the shapes, dtypes and flags the speed depends on)."""
    if not measured or torch.compiler.is_compiling():  # a compiled graph holds the kernel path (no timing)
        return kernel()
    device = next(t for t in tensors if t is not None).device
    key = _key(op, tensors, extra, device)
    choice = _DECISIONS.get(key)
    if choice is None:
        if not _can_measure(device):
            return kernel()
        try:
            ms = measure(kernel, reference, device, graphed=_GRAPH_TIMING.on)
        except Exception as err:
            reference_result = reference()  # the torch ops failing too is the caller's error: raise it
            _DECISIONS[key] = "torch"
            warnings.warn(
                f"{op} at {_readable(key)[1]}: the Triton kernel failed while being measured "
                f"({type(err).__name__}: {str(err)[:200]}); torch's ops run instead",
                RuntimeWarning,
                stacklevel=2,
            )
            return reference_result
        choice = "triton" if ms["triton"] <= ms["torch"] else "torch"
        _DECISIONS[key] = choice
        logger.info("%s %s (%s timing): triton %.4f ms, torch %.4f ms -> %s", op, _readable(key)[1],
                    _readable(key)[4], ms["triton"], ms["torch"], choice)  # fmt: skip
    return kernel() if choice == "triton" else reference()


def set_measured(model: torch.nn.Module, measured: bool) -> None:
    """Turn measured dispatch on or off in every kernel-backed module of `model`."""
    for module in model.modules():
        if hasattr(module, "measured"):
            module.measured = measured
