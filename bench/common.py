"""Timing and environment helpers shared by every benchmark.

Timing on a GPU uses CUDA events around each call after a warm-up, and reports the median and
the 10th/90th percentiles of many runs; on a CPU it uses perf_counter. Every record carries the
hardware and software it was measured with, so no number travels without its context.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vithybrid_fast.files import write_atomic

from .arguments import positive_int

REPO_ROOT = Path(__file__).resolve().parent.parent


def cuda_missing(device: torch.device | str) -> str | None:
    """Why a GPU-only benchmark cannot run on `device` (one line for the user), or None if it can."""
    if torch.device(device).type != "cuda":
        return f"needs a CUDA GPU (--device {device})"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False)"
    return None


def gpu_bench_parser(module: str, description: str) -> argparse.ArgumentParser:
    """The command line every GPU kernel microbenchmark shares, checked at parse time (exit 2 on a bad value)."""
    parser = argparse.ArgumentParser(prog=f"python -m vithybrid_fast.bench.{module}", description=description)
    parser.add_argument("--device", default="cuda", help="a CUDA device (default: cuda)")
    parser.add_argument("--batches", type=positive_int, nargs="+", default=[1, 8, 64], help="(default: 1 8 64)")
    parser.add_argument(
        "--dtypes", nargs="+", choices=("float16", "bfloat16", "float32"), default=["float16", "bfloat16"]
    )
    parser.add_argument("--out", type=Path, default=None, help="write the records as JSON here (+ .jsonl as measured)")
    return parser


class Interrupted(BaseException):
    """SIGTERM, turned into an exception so the report of the records so far still gets written.

    A BaseException, like KeyboardInterrupt: the benchmarks turn an `Exception` into an error record
    and carry on, which must not happen to a request to stop."""


def raise_interrupted(signum: int, frame: object) -> None:
    """A SIGTERM handler: `signal.signal(signal.SIGTERM, raise_interrupted)` (restore the previous after)."""
    raise Interrupted(signal.Signals(signum).name)


def run_gpu_bench_cli(
    module: str,
    description: str,
    run: Callable[..., list[dict]],
    format_table: Callable[[list[dict]], str],
    describe: Callable[[dict], str],
    argv: list[str] | None = None,
) -> None:
    """The `main` of a GPU kernel microbenchmark: the shared command line, one line and exit 2 without a GPU,
    `run(device, batches, dtypes, on_record=...)` with every record on disk as measured, then the table
    (headed by `describe(first record)`) printed and saved."""
    parser = gpu_bench_parser(module, description)
    args = parser.parse_args(argv)
    exit_without_cuda(parser.prog, args.device)
    with RecordLog(args.out and args.out.with_suffix(".jsonl")) as log:
        records = run(args.device, tuple(args.batches), tuple(args.dtypes), on_record=log.write)
    if records:
        print_and_save(records, describe(records[0]), format_table(records), args.out)


def exit_without_cuda(prog: str, device: str) -> None:
    """One line and exit 2 where a GPU-only benchmark was asked to run without a GPU: no empty results file."""
    why = cuda_missing(device)
    if why is not None:
        print(f"error: {prog}: {why}", file=sys.stderr)
        raise SystemExit(2)


def write_text_atomically(path: Path, text: str) -> Path:
    """`text` into `path`, whole or not at all (see files.write_atomic): a results file is never left half
    written, whatever stops the process (Ctrl-C, SIGTERM at a device call's budget, a full disk)."""
    write_atomic(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    return path


def git_commit() -> str:
    """The checkout's short commit, with "-dirty" when its files differ from that commit ("unknown" outside git).

    A copied tree can carry stale git metadata (the GPU machines' did): "-dirty" then says the commit alone
    does not name the code, and `source_digest` does."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=REPO_ROOT, capture_output=True,
            text=True, timeout=10,
        )  # fmt: skip
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


# The code a benchmark runs, as the wheel ships it (pyproject's packages and package-data): the package
# sources and the tuned-config tables; not bench/results or anything else a checkout holds beside them.
_SOURCE_GLOBS = {
    "vithybrid_fast": ("*.py", "data/*.json"),
    "vithybrid_fast.kernels": ("*.py", "configs/*.json"),
    "vithybrid_fast.bench": ("*.py", "gpu_session.sh"),
}


def source_digest() -> str:
    """12 hex digits of SHA-256 over the package's shipped source files (names within their package, bytes).

    The same for an editable checkout and the installed wheel of one tree, whatever the git metadata says:
    `python -m vithybrid_fast.bench --source-digest` in a checkout tells whether a record came from it.
    """
    import vithybrid_fast.kernels

    roots = {
        "vithybrid_fast": Path(vithybrid_fast.__file__).parent,
        "vithybrid_fast.kernels": Path(vithybrid_fast.kernels.__file__).parent,
        "vithybrid_fast.bench": Path(__file__).parent,
    }
    digest = hashlib.sha256()
    for package, root in sorted(roots.items()):
        files = sorted({path for pattern in _SOURCE_GLOBS[package] for path in root.glob(pattern) if path.is_file()})
        for path in files:
            digest.update(f"{package}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def skip_without_cuda(bench: str, device: torch.device | str) -> bool:
    """Whether a GPU-only benchmark must skip on `device`; if so, it says why (the interpreter is far too slow)."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return False
    print(f"{bench}: skipped, needs a CUDA GPU (device={str(device)!r}, cuda available: {torch.cuda.is_available()})")
    return True


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.processor() or platform.machine()}"


def environment(device: torch.device | str) -> dict:
    """Fields every record carries: gpu, torch, triton, cuda, cudnn, commit, source (digest), date."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "gpu": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "commit": git_commit(),
        "source": source_digest(),
        "date": datetime.date.today().isoformat(),
    }


def _percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def time_fn(fn: Callable[[], object], device: torch.device | str, warmup: int = 10, reps: int = 50) -> dict[str, float]:
    """Median / p10 / p90 milliseconds of `fn()` on `device` (CUDA events on a GPU).

    The calls are queued back to back, with one synchronization at the end (as triton.testing.do_bench):
    while the GPU is the bottleneck each sample is the GPU's time for one call, and where the host is
    (small batches, many launches) the sample includes the host's launch time, as a user's loop would.
    A synchronization after every call instead adds the host's launch overhead to every sample: the
    first H200 kernel tables (bench/results/nvidia-h200-2026-11-26) were timed that way."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {
        "ms_median": statistics.median(times),
        "ms_p10": _percentile(times, 0.1),
        "ms_p90": _percentile(times, 0.9),
        "reps": reps,
    }


def device_ms(fn: Callable[[], object], device: torch.device | str, rep_ms: int = 100) -> float:
    """Median milliseconds of one `fn()` on the GPU alone, the host's launch time left out.

    Calls recorded into a CUDA graph and replayed (triton.testing.do_bench_cudagraph): where a call's
    launch takes the host longer than the kernel runs (group_norm_act took 0.09–0.25 ms a call at batch 1
    on the H100 machine, whatever its size), `time_fn` measures the host, this the kernel. No L2 flush.
    On a CPU (smoke runs only): the wall time of one call after a warm-up call."""
    if torch.device(device).type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def first_call_ms(fn: Callable[[], object], device: torch.device | str) -> float:
    """Wall time of one call including compilation/autotuning (run this before `time_fn`)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def measured_peak_matmul_tflops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured (not datasheet) dense matmul throughput, the roof for compute-bound kernels."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device, warmup=5, reps=20)
    return 2 * n**3 / (t["ms_median"] * 1e-3) / 1e12


def measured_hbm_gbps(device: torch.device | str) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes), the roof for memory-bound kernels."""
    numel = 512 * 1024 * 1024 // 4
    src = torch.empty(numel, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=5, reps=20)
    return 2 * numel * 4 / (t["ms_median"] * 1e-3) / 1e9


class RecordLog:
    """Records as JSON lines, each appended and flushed the moment it is measured.

    A benchmark killed at any point (a device call's time limit, an OOM-killer, Ctrl-C) leaves every
    finished record on disk; `read_records` reads them back, and `python -m vithybrid_fast.bench
    --from-jsonl FILE` turns them into the usual report. `RecordLog(None)` keeps nothing (no file asked for).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close / __exit__)

    def write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record, default=str) + "\n")
            self._file.flush()  # in the OS's hands now: a killed process cannot lose it

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RecordLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_records(paths: list[Path]) -> list[dict]:
    """Every record in these JSON-lines files; a last line cut off by a kill mid-write is skipped."""
    records = []
    for path in paths:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                # only a record cut off mid-write (a last line begun with "{") is a kill's trace to skip
                if number != len(lines) or not line.lstrip().startswith("{"):
                    raise ValueError(f"{path}:{number}: not a JSON record") from None
    return records


def print_and_save(records: list[dict], header: str, table: str, out: Path | None) -> None:
    """The tail every microbenchmark's `__main__` shares: environment line, table, optional JSON."""
    if records:
        print(header)
        print(table)
    if out is not None and records:  # nothing measured: no file that looks like a result
        write_text_atomically(out, json.dumps(records, indent=2) + "\n")
        print(f"wrote {len(records)} records to {out}")
