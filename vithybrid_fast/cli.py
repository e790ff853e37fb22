"""`vithybrid-fast` command: classify, demo, eval, finetune, export, bench, doctor, warmup, tune.

vithybrid-fast classify cat.jpg dog.png --top-k 3 --kernels auto
vithybrid-fast demo
vithybrid-fast bench --device cpu
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import logging
import math
import os
import re
import signal
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .gpu_support import KERNELS_HELP, command_device, device_argument
from .images import add_pixel_limit_argument, pixel_limit

HUB_ID = "google/vit-hybrid-base-bit-384"
DESCRIPTION = (
    f"ViT Hybrid ({HUB_ID}) in PyTorch with Triton kernels: classify images, run the offline demo, "
    "evaluate accuracy (eval), fine-tune (finetune), export to ONNX (export), run the benchmark suite (bench), "
    "check what runs on this machine (doctor), precompile (warmup) or autotune (tune) the Triton kernels."
)
DISTRIBUTION = "vithybrid-fast"
# top-level modules of the `bench` extra (pyproject.toml [project.optional-dependencies] bench)
BENCH_EXTRA_MODULES = ("matplotlib",)

# Commands that live in their own module: each defines `register(subparsers)`, which adds its parser and
# `set_defaults(func=run)` where `run(args) -> int`. Heavy imports stay inside `run`.
COMMAND_MODULES: tuple[str, ...] = (
    "vithybrid_fast.doctor",
    "vithybrid_fast.evaluate",
    "vithybrid_fast.train",
    "vithybrid_fast.warmup",
    "vithybrid_fast.tune",
    "vithybrid_fast.export",
)


DTYPE_NAMES = ("float32", "float16", "bfloat16")


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _processor_for(model_name: str, config):
    """The checkpoint's preprocessor_config.json, or the hub model's settings at the model's size.

    `config` is the loaded model's: a hub processor is read from the commit its config.json came from,
    so a push (or another process's download) moving refs/main meanwhile cannot pair them across commits."""
    from .hub import CheckpointNotFoundError
    from .loading import pin_to_snapshot
    from .processing import ViTHybridImageProcessor, load_processor

    hub_kwargs = pin_to_snapshot(model_name, Path(config.config_file), {}) if config.config_file else {}
    try:
        return load_processor(model_name, **hub_kwargs)
    except CheckpointNotFoundError:
        height, width = config.image_size_hw
        print(
            f"note: {model_name} has no preprocessor_config.json; using the hub model's preprocessing", file=sys.stderr
        )
        return ViTHybridImageProcessor.for_base_384(
            size={"shortest_edge": min(height, width)}, crop_size={"height": height, "width": width}
        )


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _open_images(
    paths: list[Path], on_error: str | None = None, prepare: Callable[[Any], Any] | None = None
) -> tuple[list[Path], list]:
    """(the paths read, their images — or what `prepare` made of each). An unreadable file raises
    RuntimeError — its message hints at `--on-error skip` when `on_error` is "fail" (None: the command
    has no such option) — or, with "skip", is reported on stderr and left out. open_image's warnings
    (16-bit and float images) print as one `warning: …` line each on stderr, not as Python's two-line
    warning with source context.

    `prepare` runs on each image as it is read, so only one decoded image is held at a time: a batch of
    16 phone photos (48 MP) decoded before any was shrunk peaked at 5.9 GB."""
    from .images import open_image

    kept, images = [], []
    for path in paths:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                image = open_image(path)
                image = prepare(image) if prepare is not None else image
        # Pillow's errors are not all OSErrors: a broken PNG raises SyntaxError, an image over its pixel
        # limit (a decompression bomb) DecompressionBombError; whatever a file does, it is that file's fault
        except Exception as err:
            if on_error == "skip":
                _warn(f"skipped unreadable image {path}: {type(err).__name__}: {err}")
                continue
            hint = " (pass --on-error skip to leave such files out)" if on_error == "fail" else ""
            if isinstance(err, Image.DecompressionBombError):
                hint = " (--max-image-pixels N or none raises the limit for images you trust)" + hint
            raise RuntimeError(f"cannot read image {path}: {type(err).__name__}: {err}{hint}") from None
        for record in caught:
            # Pillow's decompression-bomb warning names no file ("Image size (N pixels) exceeds limit…");
            # ours (16-bit images) name theirs
            bomb = issubclass(record.category, Image.DecompressionBombWarning)
            _warn(f"{path}: {record.message}" if bomb else str(record.message))
        kept.append(path)
        images.append(image)
    return kept, images


def top_k(logits: torch.Tensor, id2label: dict[int, str], k: int) -> list[list[tuple[str, float]]]:
    probs = logits.float().softmax(dim=-1)
    values, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return [
        [(id2label.get(int(i), str(int(i))), float(p)) for p, i in zip(row_p, row_i)]
        for row_p, row_i in zip(values, indices)
    ]


def cmd_classify(args: argparse.Namespace) -> int:
    from .images import expand_image_paths
    from .loading import load
    from .modeling import ViTHybridForImageClassification

    paths = expand_image_paths(args.images)  # before the model: a typo should not cost a 400 MB load
    model = load(
        args.model, kernels=args.kernels, dtype=args.dtype, device=command_device(args.device),
        model_class=ViTHybridForImageClassification,
    )  # fmt: skip
    processor = _processor_for(args.model, model.config)
    classified = 0

    def prepare(image):  # each image preprocessed as it is read: a batch never holds full-size photos
        return processor([image], return_tensors="pt")["pixel_values"][0]

    for start in range(0, len(paths), args.batch_size):
        chunk, prepared = _open_images(paths[start : start + args.batch_size], args.on_error, prepare)
        if not prepared:
            continue
        pixels = torch.stack(prepared)
        with torch.inference_mode():
            logits = model(pixels.to(device=model.device, dtype=model.dtype)).logits
        for path, ranked in zip(chunk, top_k(logits, model.config.id2label, args.top_k)):
            print(path)
            for label, prob in ranked:
                print(f"  {prob:7.4f}  {label}")
        classified += len(chunk)
    if classified < len(paths):
        print(f"skipped unreadable: {len(paths) - classified} of {len(paths)} images", file=sys.stderr)
        if not classified:
            raise RuntimeError(f"none of the {len(paths)} images could be read")
    return 0


def _demo_model(device: torch.device, dtype: torch.dtype):
    """The cached hub checkpoint, or — said plainly — the same architecture with random weights."""
    from . import load
    from .config import ViTHybridConfig
    from .hub import CheckpointNotFoundError
    from .modeling import ViTHybridForImageClassification

    try:
        model = load(HUB_ID, kernels="eager", dtype=dtype, device=device, local_files_only=True)
        print(f"model: {HUB_ID} (hub checkpoint from the local cache)")
        return model, True
    except CheckpointNotFoundError:
        print(f"model: {HUB_ID} is NOT in the local Hugging Face cache (and the hub is not contacted).")
        print("       Using the same architecture with RANDOM weights: labels below are meaningless;")
        print("       timings and the agreement between kernel paths are still real.")
        torch.manual_seed(0)
        model = ViTHybridForImageClassification(ViTHybridConfig.base_384()).eval()
        return model.to(device=device, dtype=dtype), False


def _tiny_triton_check(image, dtype: torch.dtype, device: torch.device):
    """Every Triton kernel on the tiny config `doctor --check` uses (random weights, seed 0), judged as it
    judges: the patched model's logits against float64, beside plain torch's in the same dtype, one
    untimed forward each on `image` at that config's size. Under the Triton interpreter one base-model
    forward takes many minutes; the tiny one, seconds. Returns diagnostics' CheckRow."""
    from .diagnostics import model_check, reference_logits, tiny_config
    from .gpu_support import true_fp32
    from .modeling import ViTHybridForImageClassification
    from .processing import ViTHybridImageProcessor

    torch.manual_seed(0)
    model = ViTHybridForImageClassification(tiny_config()).eval().to(device)
    height, width = model.config.image_size_hw
    processor = ViTHybridImageProcessor.for_base_384(
        size={"shortest_edge": min(height, width)}, crop_size={"height": height, "width": width}
    )
    pixels = processor([image], return_tensors="pt")["pixel_values"].to(device)
    with true_fp32():
        return model_check(model, pixels, reference_logits(model, pixels), dtype)


def cmd_demo(args: argparse.Namespace) -> int:
    from .gpu_support import interpret_kernels_without_a_gpu, interpreter_enabled, true_fp32

    if interpret_kernels_without_a_gpu(args.device):  # before triton is imported: the tiny-config check runs
        print("note: no CUDA GPU; TRITON_INTERPRET=1 set so the Triton kernels are checked in the interpreter")
    from .patching import patch, triton_can_run, unpatch
    from .processing import ViTHybridImageProcessor, sample_image_path

    image_path = Path(args.image) if args.image else sample_image_path()
    if not image_path.exists():  # before the model: a typo should not cost a 400 MB build
        raise FileNotFoundError(f"{image_path}: no such file")
    _, images = _open_images([image_path])
    device = command_device(args.device)
    model, pretrained = _demo_model(device, _dtype(args.dtype))
    processor = ViTHybridImageProcessor.for_base_384()
    pixels = processor(images, return_tensors="pt")["pixel_values"].to(device, model.dtype)
    print(f"image: {image_path}  device: {device}  dtype: {args.dtype}  torch {torch.__version__}")

    paths = ["eager", "sdpa"]
    # Interpreted, one base-model forward takes over 20 minutes on a 2-core CPU: the triton path is
    # cross-checked on the tiny config instead, untimed, and its numbers are kept out of the timed table.
    interpreted = triton_can_run(device) and interpreter_enabled()
    if interpreted:
        print("triton: TRITON_INTERPRET=1 runs the kernels in the Triton interpreter, where one forward of this model")
        print("        takes many minutes: they are checked on a tiny config instead (random weights, one untimed")
        print("        forward, against float64 beside plain torch, as `vithybrid-fast doctor --check` does), after")
        print("        the table")
    elif triton_can_run(device):
        paths.append("triton")
    else:
        from .gpu_support import triton_unsupported_reason

        print(
            f"triton: skipped ({triton_unsupported_reason(device)}; TRITON_INTERPRET=1 cross-checks it on a tiny "
            "config in the Triton interpreter, on the CPU)"
        )
    results = {}
    if model.dtype == torch.float32 and device.type == "cuda":
        print("float32 comparison with TF32 off (cuDNN convs default to TF32, which would blur it)")
    for kernels in paths:
        patch(model, kernels)
        with torch.inference_mode(), true_fp32():
            model(pixels)  # warm-up: autotuning, cached weights, allocator
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            logits = model(pixels).logits.float()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        results[kernels] = (logits, (time.perf_counter() - start) * 1e3)
        unpatch(model)
    reference = results["eager"][0]
    print(f"{'path':<8} {'ms':>9} {'max |Δlogit| vs eager':>22}  top-1")
    for kernels, (logits, ms) in results.items():
        best = top_k(logits, model.config.id2label, 1)[0][0]
        diff = (logits - reference).abs().max().item()
        print(f"{kernels:<8} {ms:9.1f} {diff:22.2e}  {best[0]} ({best[1]:.3f})")
    print("top-5 (eager):" + ("" if pretrained else "  [random weights]"))
    for label, prob in top_k(reference, model.config.id2label, 5)[0]:
        print(f"  {prob:7.4f}  {label}")
    check = _tiny_triton_check(images[0], model.dtype, device) if interpreted else None
    if check is not None:  # last: it decides the exit status (DESIGN: the last line states the result)
        verdict = "ok" if check.ok else f"FAIL{': ' + check.error if check.error else ''}"
        print(
            f"tiny-config cross-check (triton, interpreted, untimed, {check.case}): max |Δlogit| vs float64 "
            f"{check.kernel_err:.2e}, plain torch {check.torch_err:.2e}, bound {check.bound:.2e}: {verdict}"
        )
    else:
        worst = max((logits - reference).abs().max().item() for logits, _ in results.values())
        print(f"every path against eager: max |Δlogit| {worst:.2e} ({', '.join(results)})")
    return 1 if check is not None and not check.ok else 0


def cmd_bench(argv: list[str]) -> int:
    from vithybrid_fast.bench.__main__ import main as bench_main

    try:
        return bench_main(argv, prog="vithybrid-fast bench") or 0
    except ModuleNotFoundError as err:
        if (err.name or "").partition(".")[0] not in BENCH_EXTRA_MODULES:
            raise
        print(f'error: vithybrid-fast bench needs {err.name}: pip install "{DISTRIBUTION}[bench]"', file=sys.stderr)
        return 1


def package_version() -> str:
    """The installed distribution's version; in a source tree that is not installed, pyproject.toml's."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file():
        match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"), re.MULTILINE)
        if match:
            return f"{match.group(1)} (source tree {pyproject.parent}, not installed)"
    return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vithybrid-fast", description=DESCRIPTION, epilog="`vithybrid-fast COMMAND --help`: that command's options"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    classify = sub.add_parser(
        "classify",
        help="print the top-k labels of images",
        description="Print the top-k labels of images. Images are turned upright by their EXIF orientation "
        "(as transformers' load_image does); 16-bit and float images get a warning.",
    )
    classify.add_argument(
        "images", nargs="+", help="image files, directories (searched recursively for images) or quoted globs"
    )
    classify.add_argument(
        "--model", default=HUB_ID, help="hub repo id or local checkpoint directory (default: %(default)s)"
    )
    classify.add_argument(
        "--kernels", default="auto", choices=["auto", "eager", "sdpa", "triton"],
        help=KERNELS_HELP,
    )  # fmt: skip
    classify.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="(default: %(default)s)")
    classify.add_argument(
        "--device", default=None, type=device_argument, help="cpu, cuda, cuda:1 … (default: cuda when available)"
    )
    classify.add_argument("--top-k", type=_positive_int, default=5, help="labels per image (default: %(default)s)")
    classify.add_argument(
        "--batch-size", type=_positive_int, default=16, help="images per forward (default: %(default)s)"
    )
    classify.add_argument(
        "--on-error", default="fail", choices=["fail", "skip"],
        help="an unreadable image file: stop, or report it on stderr and skip it (default: %(default)s)",
    )  # fmt: skip
    add_pixel_limit_argument(classify)
    classify.set_defaults(func=cmd_classify)

    demo = sub.add_parser(
        "demo",
        help="offline demo on a bundled photo: every attention path, timed",
        description="Offline demo: the bundled photo (or --image) through the base model with each attention "
        "path — eager, sdpa, and triton where it runs — each timed on one forward after a warm-up, its logits "
        "compared with eager's. Uses the hub checkpoint if it is in the local Hugging Face cache (the hub is "
        "not contacted), else the same architecture with random weights, said plainly. Under TRITON_INTERPRET=1 "
        "the Triton kernels run in the interpreter, where one base-model forward takes many minutes: they are "
        "cross-checked against eager on a tiny config instead (one untimed forward, as doctor --check does).",
    )
    demo.add_argument("--image", default=None, help="another image instead of the bundled one")
    demo.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="(default: %(default)s)")
    demo.add_argument(
        "--device", default=None, type=device_argument, help="cpu, cuda, cuda:1 … (default: cuda when available)"
    )
    demo.set_defaults(func=cmd_demo)

    sub.add_parser("bench", help="the benchmark suite (same flags as python -m vithybrid_fast.bench)", add_help=False)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(sub)
    return parser


def int_at_least(minimum: int, meaning: str = ""):
    """An argparse `type`: an integer ≥ `minimum`; `meaning` (e.g. "0: no workers") joins the error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            why = f" ({meaning})" if meaning else ""
            raise argparse.ArgumentTypeError(f"must be at least {minimum}{why}, got {value}")
        return value

    return parse


_positive_int = int_at_least(1)


def float_in(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False):
    """An argparse `type`: a finite float in [low, high] (an end excluded where `*_open`); nan never passes."""
    left, right = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
    span = f"{left}{low:g}, {'∞' if high == math.inf else f'{high:g}'}{right}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        below = value < low or (low_open and value == low)
        above = value > high or (high_open and value == high)
        if not math.isfinite(value) or below or above:
            raise argparse.ArgumentTypeError(f"must lie in {span}, got {text}")
        return value

    return parse


def _run(argv: list[str]) -> int:
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)  # usage errors exit 2 here
    try:
        with pixel_limit(getattr(args, "max_image_pixels", Image.MAX_IMAGE_PIXELS)):
            return args.func(args)
    except BrokenPipeError:
        raise  # an OSError, but not a failure: main() ends quietly with 0 (the reader went away)
    except (ValueError, TypeError, RuntimeError, OSError) as err:
        report_error(f"error: {err}")
        return 1


def report_error(message: str) -> None:
    """`message` on stderr; under torchrun, on rank 0's only, and in torchrun's failure summary.

    Most errors (a bad flag value, a missing checkpoint, unreadable data) hit every rank alike, and each
    printed the same line once per rank. torchrun names each worker a file for its error
    (TORCHELASTIC_ERROR_FILE) and shows its text for every failed rank in the summary it prints at the
    end, so the message of a rank that alone failed (say, its GPU is missing) is still there.
    """
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w", encoding="utf-8") as f:
                json.dump({"message": message, "timestamp": int(time.time())}, f)
        except OSError:
            error_file = None  # cannot tell torchrun: say it here, as every rank did before
    if not error_file or os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _one_line_warning(message, category, filename, lineno, line=None, _python=warnings.formatwarning) -> str:
    """Our warnings (a 16-bit image, a fallback) as one `warning: …` line, as `classify` prints them; other
    libraries' warnings keep Python's form, whose source line says where they come from. Set by `main`,
    so DataLoader workers forked by eval and finetune print theirs the same way."""
    if os.path.abspath(filename).startswith(_PACKAGE_DIR + os.sep):  # not a sibling vithybrid_fast_x/
        return f"warning: {message}\n"
    return _python(message, category, filename, lineno, line)


class _LevelPrefixed(logging.StreamHandler):
    """Our log records (a config field rebuilt, a head dropped) as `warning: …` lines, like our warnings; without
    a handler Python printed a warning's bare text, and dropped info records as it still does."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self.setLevel(logging.WARNING)

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 success, 1 the command failed (message on stderr), 2 usage error (argparse),
    130 interrupted (Ctrl-C; `finetune` first saves its last step, see train_state.py)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    python_format, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    log_lines = _LevelPrefixed(sys.stderr)
    package_logger = logging.getLogger("vithybrid_fast")
    package_logger.addHandler(log_lines)
    try:
        code = _run(argv)
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:
        # the reader went away (`| head`): stop quietly. Point stdout at /dev/null so the interpreter's
        # final flush does not raise a second BrokenPipeError at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        warnings.formatwarning = python_format  # main() called in a process that goes on (tests, notebooks)
        package_logger.removeHandler(log_lines)


if __name__ == "__main__":
    sys.exit(main())
