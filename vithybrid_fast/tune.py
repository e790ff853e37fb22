"""`vithybrid-fast tune`: autotune every Triton kernel on this GPU and write its config table.

    vithybrid-fast tune --dtypes bfloat16,float16,float32 --batches 1,8,64

Runs the base checkpoint's architecture (random weights) with Triton kernels at each batch size and dtype,
forward and backward, with the shipped tables and the per-user cache ignored (VITHYBRID_TUNING=autotune),
so every kernel benchmarks its candidates. The winners go to `kernels/configs/<kernel>.json` under this
GPU's name (or to --out): commit them, and every later run on this GPU model launches the tuned config
without autotuning. Last line: `tables: N entries for <gpu> in <dir>`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DTYPE_NAMES = ("float32", "float16", "bfloat16")


def _csv(kind):
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except (ValueError, AttributeError):
            raise argparse.ArgumentTypeError(f"not a comma-separated list: {text!r}") from None
        if not values:  # an empty list would tune nothing and still end "tables: 0 entries"
            raise argparse.ArgumentTypeError(f"an empty list: {text!r}")
        if kind is int and min(values) < 1:  # caught here, not by the model minutes into a GPU session
            raise argparse.ArgumentTypeError(f"each batch must be at least 1, got {text!r}")
        return values

    return parse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tune",
        help="autotune the kernels on this GPU and write its config tables",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dtypes",
        type=_csv(str),
        default=["bfloat16", "float16", "float32"],
        help="(default: bfloat16,float16,float32)",
    )
    parser.add_argument("--batches", type=_csv(int), default=[1, 8, 64], help="(default: 1,8,64)")
    parser.add_argument("--out", type=Path, default=None, help="table directory (default: the package's)")
    parser.add_argument("--no-backward", action="store_true", help="tune inference kernels only")
    parser.set_defaults(func=run)


def write_tables(gpu: str, table_dir: Path | None = None) -> dict[str, int]:
    """Write every tuned kernel's benchmarked winners ({key: config id}) under `gpu`; entries per kernel."""
    from .kernels import _tuning

    written = {}
    for name, kernel in sorted(_tuning.REGISTRY.items()):
        if kernel.tuned:
            _tuning.write_table(name, gpu, dict(kernel.tuned), table_dir)
            written[name] = len(kernel.tuned)
    return written


def exercise(dtype_names: list[str], batches: list[int], backward: bool, config=None, device: str = "cuda") -> None:
    """Every kernel at the model's shapes: one forward (and backward) of the model per batch and dtype
    (the base checkpoint's architecture unless `config` is given; random weights)."""
    import torch

    from .config import ViTHybridConfig
    from .modeling import ViTHybridForImageClassification
    from .patching import patch

    config = config or ViTHybridConfig.base_384()
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    for name in dtype_names:
        dtype = getattr(torch, name)
        torch.manual_seed(0)
        model = ViTHybridForImageClassification(config).to(device=device, dtype=dtype)
        patch(model, kernels="triton")
        for batch in batches:
            pixels = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
            if backward:
                model.train()
                model(pixels).logits.float().sum().backward()
                model.zero_grad(set_to_none=True)
            model.eval()
            with torch.no_grad():
                model(pixels)
            if device == "cuda":
                torch.cuda.synchronize()
            print(f"tuned {name} batch {batch}", flush=True)
        del model


def run(args: argparse.Namespace) -> int:
    unknown = [d for d in args.dtypes if d not in DTYPE_NAMES]
    if unknown:
        print(f"error: unknown dtype {unknown[0]!r}; use {', '.join(DTYPE_NAMES)}", file=sys.stderr)
        return 2
    os.environ["VITHYBRID_TUNING"] = "autotune"  # read at each choice: tables and cache are ignored
    import torch

    if not torch.cuda.is_available():
        print("error: tune needs a CUDA GPU (it measures the kernels on it)", file=sys.stderr)
        return 1
    from .files import check_writable_dir
    from .kernels import _tuning

    try:  # before minutes of tuning, not after: an installed package's folder is often read-only
        check_writable_dir(args.out or _tuning.TABLE_DIR, "the tables' folder")
    except ValueError as err:
        print(f"error: {err}; pass --out DIR", file=sys.stderr)
        return 1
    gpu = _tuning.gpu_name() or "unknown"
    _tuning.reset_all()
    exercise(args.dtypes, args.batches, backward=not args.no_backward)
    written = write_tables(gpu, args.out)
    for name, count in written.items():
        print(f"{name}: {count} entries")
    where = args.out or _tuning.TABLE_DIR
    print(f"tables: {sum(written.values())} entries for {gpu} in {where}")
    return 0
