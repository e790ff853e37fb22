"""`vithybrid-fast doctor`: what this machine has, which kernels run here (and why not), and — with
`--check` / `--drift` — whether they compute the right thing here.

    vithybrid-fast doctor                    versions, GPU, which kernels can run, what kernels="auto" picks
    vithybrid-fast doctor --check            + each kernel vs float64 at the model's shapes, then the patched
                                               model vs plain torch (tolerance idiom, error ratios)
    vithybrid-fast doctor --drift            + each family / layer swapped alone: its share of the logit drift

On a CPU the checks run the kernels under the Triton interpreter on a tiny config (seconds to a minute);
on a GPU the base config at batch 2 (the first run compiles and autotunes the kernels). The last line is
the verdict. Exit status: 0 when every check passed (or there was nothing to check), 1 when one failed.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from pathlib import Path

KERNEL_NAMES = (
    "flash_attention", "weight_standardize", "group_norm_act", "layer_norm_mlp", "fused_linear", "add_layer_norm",
)  # fmt: skip
DTYPE_NAMES = ("float32", "float16", "bfloat16")


def register(subparsers: argparse._SubParsersAction) -> None:
    from .bench.arguments import dtype_names
    from .cli import _positive_int
    from .gpu_support import device_argument

    parser = subparsers.add_parser(
        "doctor",
        help="versions, GPU, which kernels run here; --check / --drift verify them on this device",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--check", action="store_true", help="each kernel and the patched model vs float64")
    parser.add_argument("--drift", action="store_true", help="per-family and per-layer drift attribution")
    parser.add_argument(
        "--device", default=None, type=device_argument, help="cuda, cuda:1, cpu … (default: cuda when available)"
    )
    parser.add_argument(
        "--dtypes", default=None, type=dtype_names, help="comma-separated (default: float32,float16,bfloat16)"
    )
    parser.add_argument(
        "--drift-dtype",
        default=None,
        choices=DTYPE_NAMES,
        help="dtype of --drift (default: bfloat16 on a GPU, else float32)",
    )
    parser.add_argument(
        "--batch", type=_positive_int, default=None, help="batch of the checks (default: 2 on a GPU, 1 on a CPU)"
    )
    parser.add_argument(
        "--config", choices=("base", "tiny"), default=None, help="default: base on a GPU, tiny on a CPU"
    )
    parser.add_argument("--model", default=None, help="a checkpoint dir or cached hub id instead of random weights")
    parser.set_defaults(func=run)


# -- what is installed ----------------------------------------------------------------------------
def driver_version() -> str | None:
    """The NVIDIA driver's version (nvidia-smi, else /proc), or None where there is none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)  # fmt: skip
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    proc = Path("/proc/driver/nvidia/version")
    if proc.is_file():
        for word in proc.read_text().split():
            if word[:1].isdigit() and word.count(".") >= 1:
                return word
    return None


def environment_lines(device) -> list[str]:
    import torch

    from .gpu_support import cuda_capability

    try:
        import triton

        triton_version = triton.__version__
    except Exception as err:
        triton_version = f"not importable ({type(err).__name__})"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    lines = [
        f"python   {platform.python_version()} ({sys.executable})",
        f"torch    {torch.__version__}  CUDA runtime {torch.version.cuda or 'none (CPU build)'}  "
        f"cuDNN {cudnn or 'none'}",
        f"triton   {triton_version}",
        f"driver   {driver_version() or 'none found (no NVIDIA driver)'}",
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            major, minor = cuda_capability(torch.device("cuda", index)) or (props.major, props.minor)
            lines.append(
                f"gpu {index}    {props.name}, compute capability {major}.{minor} (sm_{major}{minor}), "
                f"{props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs"
            )
    else:
        lines.append(f"gpu      none visible to torch; CPU {platform.machine()}, {torch.get_num_threads()} threads")
    lines.append(f"device   {device}")
    return lines


def kernel_lines(device) -> tuple[list[str], str | None]:
    """One line per kernel: runs natively / in the interpreter / not, and why; plus the shared reason."""
    import torch

    from .gpu_support import auto_choice, interpreter_enabled, triton_unsupported_reason

    reason = triton_unsupported_reason(device)
    if reason is None:
        how = "yes, interpreted on the CPU (slow: for tests)" if device.type != "cuda" else "yes, compiled"
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            how += f" for sm_{major}{minor}"
        if device.type == "cuda" and interpreter_enabled():
            how = "yes, but TRITON_INTERPRET is set: interpreted, not compiled (unset it for real speed)"
    lines = [f"  {name:<20} {how if reason is None else 'no: ' + reason}" for name in KERNEL_NAMES]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        choice = auto_choice(device, reason is None)
    if choice == "triton":
        why = ""
    elif reason:
        why = f" ({reason})"
    else:
        why = " (TRITON_INTERPRET is set)" if device.type == "cuda" else " (not a CUDA device)"
    lines.append(f'kernels="auto" here: {choice}{why}')
    return lines, reason


# -- the command ----------------------------------------------------------------------------------
def _build_model(args, device):
    import torch

    from .bench.e2e import base_config
    from .diagnostics import tiny_config
    from .modeling import ViTHybridForImageClassification

    if args.model:
        from . import load

        model = load(args.model, kernels="eager", dtype=torch.float32, device=device, local_files_only=True)
        return model.eval(), f"checkpoint {args.model}"
    name = args.config or ("base" if device.type == "cuda" else "tiny")
    config = base_config() if name == "base" else tiny_config()
    torch.manual_seed(0)
    model = ViTHybridForImageClassification(config).to(device).eval()
    return model, f"{name} config, random weights (seed 0)"


def _dtypes(names: list[str] | str | None) -> list:
    """torch dtypes of names checked by argparse (`--dtypes`, `--drift-dtype`); None: all of them."""
    import torch

    names = [names] if isinstance(names, str) else names or list(DTYPE_NAMES)
    return [getattr(torch, d) for d in names]


def run(args: argparse.Namespace) -> int:
    from .gpu_support import command_device, interpret_kernels_without_a_gpu

    wants_kernels = args.check or args.drift
    # options of the checks, given without them, were silently ignored (a bad --model passed as "ok")
    unused = [flag for flag, value in (("--model", args.model), ("--config", args.config), ("--batch", args.batch),
              ("--dtypes", args.dtypes), ("--drift-dtype", args.drift_dtype)) if value is not None]  # fmt: skip
    if not wants_kernels and unused:
        print(f"error: {', '.join(unused)}: options of --check / --drift, given without them", file=sys.stderr)
        return 2
    if args.drift_dtype is not None and not args.drift:
        print("error: --drift-dtype: an option of --drift, given without it", file=sys.stderr)
        return 2
    if wants_kernels and interpret_kernels_without_a_gpu(args.device):
        print("note: no CUDA GPU; TRITON_INTERPRET=1 set so the kernels run in the Triton interpreter")
    import torch

    device = command_device(args.device)
    dtypes = _dtypes(args.dtypes)
    print("\n".join(environment_lines(device)))
    print("kernels that can run here:")
    lines, reason = kernel_lines(device)
    print("\n".join(lines))
    if not wants_kernels:
        return _verdict(reason, device, None)
    if reason is not None:
        print(f"--check / --drift skipped: {reason}")
        return _verdict(reason, device, None)

    from . import diagnostics

    model, what = _build_model(args, device)
    batch = args.batch or (2 if device.type == "cuda" else 1)
    rows: list[diagnostics.CheckRow] = []
    pixels = torch.randn(batch, model.config.num_channels, *model.config.image_size_hw,
                         generator=torch.Generator().manual_seed(1234)).to(device)  # fmt: skip
    ref = diagnostics.reference_logits(model, pixels)
    if args.check:
        shapes = diagnostics.model_shapes(model.config, batch)
        print(f"\nchecks: {what}, batch {batch}, on {device}. err: max |x − float64 reference|; "
              "pass: kernel err ≤ 2·torch err (same dtype) + atol")  # fmt: skip
        print(diagnostics.ROW_HEADER)
        rows += diagnostics.run_kernel_checks(diagnostics.kernel_checks(shapes, device), dtypes)
        for dtype in dtypes:
            rows.append(diagnostics.model_check(model, pixels, ref, dtype))
            print(diagnostics.format_row(rows[-1]))
    if args.drift:
        drift_dtype = _dtypes(args.drift_dtype or ("bfloat16" if device.type == "cuda" else "float32"))[0]
        print(f"\ndrift attribution: {what}, batch {batch}, {str(drift_dtype).removeprefix('torch.')}, on {device}")
        families, layers, all_drift, torch_err = diagnostics.drift_attribution(model, pixels, ref, drift_dtype)
        print(diagnostics.format_drift(families, layers, all_drift, torch_err))
        if layers:
            top = max(layers, key=lambda r: r.drift)
            name = diagnostics.short_name(top.unit)
            print(f"largest single-layer drift: {top.family} {name} ({100 * top.share:.0f}% of the layer drifts)")
    return _verdict(None, device, rows if args.check else None, drift=args.drift)


def _verdict(reason: str | None, device, rows, drift: bool = False) -> int:
    where = "the Triton interpreter on the CPU" if device.type != "cuda" else str(device)
    if reason is not None:
        print(f"verdict: Triton kernels cannot run here ({reason}); kernels='auto' uses torch SDPA")
        return 0
    if rows is None:
        done = "drift attributed above; " if drift else ""
        print(f"verdict: Triton kernels can run on {where}; {done}run `vithybrid-fast doctor --check` to verify them")
        return 0
    failed = [r for r in rows if not r.ok]
    if failed:
        names = ", ".join(dict.fromkeys(f"{r.what} {r.dtype}" for r in failed))
        print(f"verdict: FAIL: {len(failed)} of {len(rows)} checks outside the tolerance on {where}: {names}")
        return 1
    print(f"verdict: OK: all {len(rows)} checks within the tolerance on {where}")
    return 0
