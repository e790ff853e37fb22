"""`python -m vithybrid_fast.bench` (or `vithybrid-fast bench`): the one benchmark entry point.

    python -m vithybrid_fast.bench                                   # everything the device allows
    python -m vithybrid_fast.bench --device cuda --batches 1,8,64 --dtypes bfloat16 --providers ref-sdpa,ours-triton
    python -m vithybrid_fast.bench --device cuda --no-e2e --kernel-benches attention   # one kernel microbenchmark
    python -m vithybrid_fast.bench --device cpu                      # tiny config, CPU providers only (CI smoke, ~10 s)
    python -m vithybrid_fast.bench --device cpu --cpu-compare        # + base-config CPU comparison and load memory
    python -m vithybrid_fast.bench --from-jsonl run1.jsonl run2.jsonl  # the report of records already measured

Runs the end-to-end benchmark (bench/e2e.py), on a GPU the kernel microbenchmarks (bench/bench_*.py)
and the measured matmul/HBM peaks they are judged against, optionally the CPU comparison
(bench/bench_cpu.py), then writes JSON + Markdown + plots (bench/report.py) and prints the table.

Results go to --output-dir (default ./bench-results, under the current directory). Every record is
appended to `<gpu>-<date>-<time>.jsonl` there the moment it is measured, so a run killed midway (a
device call's time limit, out of memory) keeps all it measured; on SIGINT/SIGTERM the report is written
from the records so far. `--from-jsonl` rebuilds the report from such files (also several runs merged).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .arguments import DTYPE_NAMES, dtype_names, positive_int, positive_ints

KERNEL_BENCHMARKS = {
    "add_layer_norm": "vithybrid_fast.bench.bench_add_layer_norm",  # "auto"'s glue between cuBLAS GEMMs
    "attention": "vithybrid_fast.bench.bench_attention",
    "backbone": "vithybrid_fast.bench.bench_backbone_kernels",
    "layer_norm_mlp": "vithybrid_fast.bench.bench_layer_norm_mlp",
    "train": "vithybrid_fast.bench.bench_train",  # a whole training step: ours-triton vs ref-sdpa vs compile
}
DEFAULT_OUTPUT_DIR = Path("bench-results")


def _csv(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m vithybrid_fast.bench",
        description="ViT Hybrid benchmarks: end to end against every peer, and the kernel microbenchmarks",
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument(
        "--batches", type=positive_ints, help="comma-separated, e.g. 1,8,64 (default: 1,2,4,8,32,64,128; CPU 1,2)"
    )
    parser.add_argument(
        "--dtypes", type=dtype_names, help=f"comma-separated from {','.join(DTYPE_NAMES)} (default: all; CPU float32)"
    )
    parser.add_argument("--providers", help="comma-separated e2e providers (default: all; see bench/e2e.py)")
    parser.add_argument("--config", choices=("base", "tiny"), help="default: base on a GPU, tiny on a CPU")
    parser.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=True, help="end-to-end benchmark")
    parser.add_argument(
        "--kernels", action=argparse.BooleanOptionalAction, default=None, help="kernel microbenchmarks (GPU default)"
    )
    parser.add_argument(
        "--kernel-benches", help=f"comma-separated subset of {','.join(KERNEL_BENCHMARKS)} (default: all)"
    )
    parser.add_argument("--cpu-compare", action="store_true", help="base-config CPU comparison + load memory")
    parser.add_argument(
        "--cpu-reps", type=positive_int, default=5, help="interleaved reps per provider for --cpu-compare"
    )
    parser.add_argument(
        "--reps", type=positive_int, help="timed reps per measurement (default: adaptive on a GPU, 3 on CPU)"
    )
    parser.add_argument(
        "--output-dir",
        "--out",
        dest="output_dir",
        type=Path,
        default=DEFAULT_OUTPUT_DIR,
        help=f"results folder (default: ./{DEFAULT_OUTPUT_DIR}, under the current directory)",
    )
    parser.add_argument(
        "--from-jsonl", nargs="+", type=Path, metavar="FILE", help="measure nothing: report these records"
    )
    parser.add_argument(
        "--source-digest",
        action="store_true",
        help="measure nothing: print the digest of this copy's sources that every record carries as 'source'",
    )
    parser.add_argument(
        "--warm-caches",
        action="store_true",
        help="keep Inductor/Triton on-disk caches (default: fresh ones, so first-call times are cold starts)",
    )
    args = parser.parse_args(argv)
    if args.kernel_benches:
        unknown = sorted(set(_csv(args.kernel_benches) or []) - set(KERNEL_BENCHMARKS))
        if unknown:
            parser.error(f"--kernel-benches: unknown {unknown}; choose from {', '.join(KERNEL_BENCHMARKS)}")
    if args.kernels and args.device == "cpu":
        parser.error("--kernels: the kernel microbenchmarks need a CUDA GPU (--device cpu was given)")
    return args


def unknown_providers(text: str | None) -> list[str]:
    """The --providers names e2e does not know. Checked after the caches are set up: e2e imports triton."""
    from .e2e import PROVIDERS

    return [name for name in _csv(text) or [] if name not in PROVIDERS]


def fresh_compile_caches(root: str) -> None:
    """Point Inductor's, Triton's and our autotune winners' on-disk caches at empty folders: a warm cache
    left by an earlier run (a test step before the bench, say) would hide compile and autotune time in
    first_call_ms. Must run before triton is imported. The shipped tuned-config tables still apply: they
    are part of the package, as for a user."""
    caches = (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton"), ("VITHYBRID_CACHE_DIR", "ours"))
    for name, sub in caches:
        path = os.path.join(root, sub)
        os.makedirs(path, exist_ok=True)
        os.environ[name] = path


def kernel_records(
    device: str,
    batches: list[int] | None,
    dtypes: list[str] | None,
    names: list[str] | None = None,
    on_record: Callable[[dict], None] | None = None,
) -> list[dict[str, Any]]:
    """The kernel microbenchmarks' records, each handed to `on_record` as measured; a failure is a record."""
    from .common import environment

    records: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {"device": device}
    if batches:
        kwargs["batches"] = tuple(batches)
    if dtypes:
        kwargs["dtypes"] = tuple(dtypes)
    for name in names or KERNEL_BENCHMARKS:
        module_name = KERNEL_BENCHMARKS[name]

        def tag(rec: dict[str, Any], module_name: str = module_name) -> dict[str, Any]:
            rec.setdefault("kernel", module_name.removeprefix("vithybrid_fast.bench.bench_"))
            rec.update(kind="kernel", module=module_name)
            for key in ("provider", "batch", "dtype", "ms_median", "images_per_s"):
                rec.setdefault(key, None)
            records.append(rec)
            if on_record is not None:
                on_record(rec)
            return rec

        try:
            importlib.import_module(module_name).run(**kwargs, on_record=tag)
        except Exception as err:
            print(f"{module_name}: failed: {type(err).__name__}: {err}", file=sys.stderr)
            tag({"error": f"{type(err).__name__}: {err}", **environment(device)})
    return records


def peak_records(device: str, dtypes: list[str], on_record: Callable[[dict], None] | None = None) -> list[dict]:
    """Measured (not datasheet) matmul throughput per dtype and HBM copy bandwidth: the roofs."""
    import torch

    from .common import environment, measured_hbm_gbps, measured_peak_matmul_tflops

    env = environment(device)
    base = {"kind": "peak", "provider": None, "batch": None, "ms_median": None, "images_per_s": None, **env}
    measurements = [("matmul_tflops", d, lambda d=d: measured_peak_matmul_tflops(device, getattr(torch, d)))
                    for d in dtypes] + [("hbm_gbps", None, lambda: measured_hbm_gbps(device))]  # fmt: skip
    records = []
    for metric, dtype, measure in measurements:
        records.append({**base, "metric": metric, "dtype": dtype, "value": measure()})
        if on_record is not None:
            on_record(records[-1])
    return records


def _write_report(records: list[dict[str, Any]], output_dir: Path) -> None:
    from . import report

    if not records:
        print(f"no records to report in {output_dir}")
        return
    paths = report.write_results(records, output_dir)
    print()
    print(paths["markdown"].read_text())
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")


def _measure(args: argparse.Namespace, device: str, keep: Callable[[dict], None]) -> None:
    from . import e2e

    batches, dtypes = args.batches, args.dtypes  # parsed and checked by parse_args
    if args.e2e:
        e2e.run(device, batches, dtypes, _csv(args.providers), args.config, args.reps, on_record=keep)
    run_kernels = device == "cuda" if args.kernels is None else args.kernels
    if run_kernels:
        if device == "cuda":
            peak_records(device, dtypes or list(e2e.DTYPES), on_record=keep)
            kernel_records(device, batches, dtypes, _csv(args.kernel_benches), on_record=keep)
        else:
            print("kernel microbenchmarks skipped: they need a CUDA GPU")
    if args.cpu_compare:
        from . import bench_cpu

        print("CPU comparison (base config; minutes on a small CPU)")
        bench_cpu.run_cpu(reps=args.cpu_reps, on_record=keep)
        keep(bench_cpu.measure_load_memory())


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    if args.source_digest:
        from .common import source_digest

        print(source_digest())
        return 0
    if args.from_jsonl:
        return _report_from_jsonl(args.from_jsonl, args.output_dir) if _output_dir_usable(args.output_dir) else 2
    cache_root = None
    if not args.warm_caches:
        cache_root = tempfile.TemporaryDirectory(prefix="vithybrid-bench-caches-")
        fresh_compile_caches(cache_root.name)
    try:
        return _run(args)
    finally:
        if cache_root is not None:
            cache_root.cleanup()


def _report_from_jsonl(paths: list[Path], output_dir: Path) -> int:
    from .common import read_records

    try:
        records = read_records(paths)
    except (OSError, ValueError) as err:  # a missing file, a corrupt line: the user's input, one line
        print(f"error: --from-jsonl: {err}", file=sys.stderr)
        return 1
    if not records:  # said of the files read, not of the output folder, and not a success
        print(f"error: --from-jsonl: no records in {', '.join(map(str, paths))}", file=sys.stderr)
        return 1
    _write_report(records, output_dir)
    return 0


def _run(args: argparse.Namespace) -> int:
    import torch

    from .common import Interrupted, RecordLog, device_name, raise_interrupted
    from .report import slug

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: torch sees no CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    if (args.kernels or (args.kernels is None and args.kernel_benches)) and device != "cuda":
        asked = "--kernels" if args.kernels else f"--kernel-benches {args.kernel_benches}"
        print(f"error: {asked}: the kernel microbenchmarks need a CUDA GPU, and torch sees none", file=sys.stderr)
        return 2
    if not _output_dir_usable(args.output_dir):
        return 2
    unknown = unknown_providers(args.providers) if args.e2e else []
    if unknown:
        from .e2e import PROVIDERS

        print(f"error: --providers: unknown {unknown}; choose from {', '.join(PROVIDERS)}", file=sys.stderr)
        return 2
    if device == "cuda" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("warning: TRITON_INTERPRET is set, so Triton kernels would run in the CPU interpreter; "
              "ours-triton* providers are skipped — unset it for real GPU numbers", file=sys.stderr)  # fmt: skip
    started = datetime.datetime.now()
    jsonl = args.output_dir / f"{slug(device_name(device))}-{started:%Y-%m-%d-%H%M%S}.jsonl"
    print(f"records: {jsonl} (one JSON line each, appended as measured)")
    records: list[dict[str, Any]] = []
    status = 0
    previous = signal.signal(signal.SIGTERM, raise_interrupted)
    with RecordLog(jsonl) as log:

        def keep(record: dict[str, Any]) -> None:
            records.append(record)
            log.write(record)

        try:
            _measure(args, device, keep)
        except (KeyboardInterrupt, Interrupted) as err:
            print(f"interrupted ({type(err).__name__} {err}): reporting the {len(records)} records measured so far",
                  file=sys.stderr)  # fmt: skip
            status = 130
        except Exception as err:  # one line, and the records measured before it still get their report
            print(f"error: {type(err).__name__}: {err}; reporting the {len(records)} records measured so far",
                  file=sys.stderr)  # fmt: skip
            status = 1
        finally:
            signal.signal(signal.SIGTERM, previous)
    if all(r.get("skipped") for r in records):
        # nothing asked for could run (ours-triton or --no-e2e on a CPU): a report of empty tables would
        # replace the day's real one under the same name, and exit 0 would say it worked
        reasons = sorted({f"{r.get('provider')}: {r.get('skipped')}" for r in records})
        why = f" ({'; '.join(reasons)})" if reasons else ""
        print(f"error: nothing was measured{why}; no report written", file=sys.stderr)
        return status or 1
    _write_report(records, args.output_dir)
    return status


def _output_dir_usable(output_dir: Path) -> bool:
    """--output-dir checked before anything is measured: a file there was a FileExistsError traceback."""
    from vithybrid_fast.files import check_writable_dir

    try:
        check_writable_dir(Path(output_dir), "--output-dir")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
