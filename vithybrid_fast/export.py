"""Export for deployment: an ONNX file verified in ONNX Runtime, and a `torch.export` program.

    vf.export_onnx(model, "model.onnx")                               # dynamic batch, fixed 384×384
    vf.export_onnx(model, "model.onnx", image_size="dynamic", dtype=torch.float16)
    program = vf.export_program(model)                                # torch.export, dynamic batch

ONNX exports the *reference* computation: a patched model is deep-copied and unpatched (Triton
custom ops never reach the graph), with explicit-softmax attention. Input `pixel_values`
(B, config.num_channels, H, W); output `logits` (B, num_labels), plus `hidden_states`
(layers+1, B, tokens, hidden) when asked. The label map (`id2label`, `label2id`), the image size and
the package version go into the model's metadata_props.

Exporter: `torch.onnx.export(..., dynamo=True)` — it traces through `torch.export`, so shapes stay
symbolic. The TorchScript exporter (dynamo=False) traces Python shape arithmetic (SAME padding,
the position grid) into constants: a "dynamic size" file from it would be silently wrong at other
sizes. The dynamo exporter works on the torch versions we run (2.11 on the GPU machine, 2.13 in CI).

Dynamic image size: two export-only twins, installed on the exported copy only, keep the symbolic
shapes small enough for torch.export (with the original code it spends minutes in sympy):
- SAME padding written with integer floor division, so each stage's size is ceil(x/s), not a
  nested max/ceil expression — the same padding for every size;
- the position table resized by two bicubic interpolation matrices built from the real token
  grid (transformers' interpolate_pos_encoding divides by the wrong stride; ours reads the grid
  from the feature map). Same bicubic (a = −0.75, half-pixel, clamped) as F.interpolate, and
  exactly the identity at the trained grid. Verification checks a second size against PyTorch.

Verification (on by default): the file runs in ONNX Runtime on the CPU on the bundled photo (RGB
models only) and on random inputs at two batch sizes (and a second image size when dynamic) against
the PyTorch reference; float32 fails above 1e-4 max |Δlogit|. float16 follows the project's
tolerance idiom (DESIGN.md): ONNX Runtime's fp16 error against the fp32 reference may be at most
twice PyTorch's own fp16 error on the same inputs plus 2e-3 × max(1, max|logit|) — fp16 keeps 11
significant bits (relative rounding 4.9e-4), and ~30 layers of rounding in a different operation
order differ by a few units of that.

The file is written and verified in a staging directory beside `path` and only then moved into
place, so a failed export leaves whatever was at `path` as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .export_dynamic_size import install_dynamic_size_twins
from .files import check_writable_file, staged_output

FP32_BOUND = 1e-4
# ... plus this much of max|logit|: float32 rounding grows with the logits' size, and a fixed 1e-4 refused a
# correct export of a head with logits in the thousands (2.4e-3 off at 2,257: about 1e-6 relative)
FP32_RTOL = 1e-5
FP16_ATOL = 2e-3  # tests/tolerance.py's float16 atol
SUPPORTED_DTYPES = {"float32": torch.float32, "float16": torch.float16}
INSTALL_HINT = "pip install vithybrid-fast[export]"
# The newest opset onnxscript 0.7.2's version converter writes, for an onnxscript without the constant
# (see _opset_range); tests/test_export.py checks it against the installed one.
FALLBACK_MAX_OPSET = 25
_PACKAGE_DIR = Path(__file__).resolve().parent


# What torch's dynamo ONNX exporter prints on every export that is not about the model: its op registry
# warns once per torchvision op when torchvision is absent (no model here has one), and torch.export
# deep-copies pytree's deprecated LeafSpec (torch 2.13). Dropped around the exporter call only.
_REGISTRY_LOGGER = "torch.onnx._internal.exporter._registration"
_REGISTRY_NOISE = "torchvision is not installed. Skipping "
_LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


class _DropRegistryNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_REGISTRY_NOISE)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's torchvision-absent log lines and LeafSpec FutureWarning dropped; all else kept."""
    logger = logging.getLogger(_REGISTRY_LOGGER)
    drop = _DropRegistryNoise()
    logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_LEAFSPEC_WARNING, category=FutureWarning)
            yield
    finally:
        logger.removeFilter(drop)


class OnnxVerificationError(RuntimeError):
    """The exported file fails verification (wrong opset, ONNX Runtime cannot run it, or its logits miss
    PyTorch's by more than the bound); nothing is written to the output path."""


@dataclass
class OnnxExportReport:
    path: Path
    max_abs_diff: float  # max |Δlogit| between ONNX Runtime and the PyTorch reference
    bound: float
    inputs: int  # images compared
    opset: int
    checks: list[tuple[str, float]]  # (what was run, its max |Δlogit|)
    skipped: list[str] = field(default_factory=list)  # checks not run, and why
    largest_logit: float = math.nan  # max |logit| of the float32 reference over the inputs

    def summary(self) -> str:
        skipped = f" ({'; '.join(self.skipped)})" if self.skipped else ""
        return f"onnx: max|Δlogit| {self.max_abs_diff:.2e} over {self.inputs} inputs{skipped}"


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"ONNX export needs {module} ({err}); install it with: {INSTALL_HINT}") from None


def _check_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    by_value = {v: v for v in SUPPORTED_DTYPES.values()}
    resolved = SUPPORTED_DTYPES.get(dtype) if isinstance(dtype, str) else by_value.get(dtype)
    if resolved is None:
        bf16 = dtype in (torch.bfloat16, "bfloat16")
        why = " (ONNX Runtime's CPU provider, which verifies the file, has no bfloat16 convolutions)" if bf16 else ""
        raise ValueError(f"dtype {dtype!r} is not supported for ONNX export: choose float32 or float16{why}")
    return resolved


def _opset_range() -> tuple[int, int]:
    """The opsets torch's dynamo exporter really writes: (18, onnxscript's converter maximum).

    torchlib emits opset 18 and torch converts to the requested opset with onnxscript's version
    converter. Above the converter's maximum torch falls back to ONNX's C converter, which fails on
    these graphs (no Gelu adapter), only logs it and keeps an opset-18 stamp over newer nodes: a file
    ONNX Runtime rejects. The maximum is a module constant of onnxscript's, not public API, hence
    the fallback.
    """
    try:
        from onnxscript.version_converter import _version_converter as converter

        return converter.SUPPORTED_MIN_ONNX_OPSET, converter.SUPPORTED_MAX_ONNX_OPSET
    except (ImportError, AttributeError):
        return 18, FALLBACK_MAX_OPSET


def _check_opset(opset: int | None) -> None:
    low, high = _opset_range()
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high):
        raise ValueError(
            f"opset must be an int from {low} to {high} (the opsets torch's dynamo exporter can write with "
            f"the installed onnxscript), got {opset!r}"
        )


def _check_batch(batch: int | str) -> int | None:
    if batch == "dynamic":
        return None
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be 'dynamic' or a positive int, got {batch!r}")
    return batch


def _check_image_size(image_size: Any, trained: tuple[int, int]) -> tuple[tuple[int, int], bool]:
    """(example size, dynamic?) from None | (H, W) | "dynamic"."""
    if image_size is None:
        return trained, False
    if image_size == "dynamic":
        return trained, True
    ok = isinstance(image_size, (tuple, list)) and len(image_size) == 2
    if not ok or any(isinstance(s, bool) or not isinstance(s, int) or s < 17 for s in image_size):
        raise ValueError(
            f"image_size must be None (the model's {trained[0]}×{trained[1]}), 'dynamic' or (height, width) "
            f"with both at least 17 pixels, got {image_size!r}"
        )
    return (int(image_size[0]), int(image_size[1])), False


# ---------------------------------------------------------------------------------------------
# The reference copy and the export-only twins
# ---------------------------------------------------------------------------------------------
def reference_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A CPU, eval-mode, unpatched deep copy with explicit-softmax attention; `model` is untouched."""
    from .patching import unpatch

    clone = copy.deepcopy(model)
    unpatch(clone)
    clone.set_attn_implementation("eager")
    return clone.eval().to(device="cpu", dtype=dtype)


class LogitsModule(nn.Module):
    """pixel_values → logits (and stacked hidden states): the signature the exporters see."""

    def __init__(self, model: nn.Module, interpolate_pos_encoding: bool, hidden_states: bool = False) -> None:
        super().__init__()
        self.model = model
        self.interpolate_pos_encoding = interpolate_pos_encoding
        self.hidden_states = hidden_states

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.model(
            pixel_values,
            output_hidden_states=self.hidden_states,
            interpolate_pos_encoding=self.interpolate_pos_encoding,
            return_dict=True,
        )
        if self.hidden_states:
            return out.logits, torch.stack(out.hidden_states)  # (layers+1, B, tokens, hidden)
        return out.logits


def _check_model(model: nn.Module) -> None:
    from .modeling import ViTHybridForImageClassification

    if not isinstance(model, ViTHybridForImageClassification):
        raise TypeError(
            f"export needs a vithybrid_fast ViTHybridForImageClassification, got {type(model).__name__} "
            "(load one with vf.load(...))"
        )


def _batch_dim(name: str = "batch") -> Any:
    return torch.export.Dim(name, min=1, max=4096)


# ---------------------------------------------------------------------------------------------
# torch.export
# ---------------------------------------------------------------------------------------------
def export_program(
    model: nn.Module, example: torch.Tensor | None = None, *, dynamic_batch: bool = True
) -> torch.export.ExportedProgram:
    """`torch.export` of `model` as it is (pixel_values → logits), with a dynamic batch dimension.

    A reference model gives a graph of aten ops (for AOTInductor, TensorRT, ExecuTorch); a patched
    model keeps its kernels as `vithybrid::` custom-op nodes (their fake implementations give the
    shapes), so the program runs them wherever vithybrid_fast is imported. `example` defaults to a
    batch of 2 at the model's image size on its device and dtype.
    """
    _check_model(model)
    if example is None:
        height, width = model.config.image_size_hw
        example = torch.rand(2, model.config.num_channels, height, width, generator=torch.Generator().manual_seed(0))
        example = (example * 2 - 1).to(device=model.device, dtype=model.dtype)
    if dynamic_batch and example.shape[0] < 2:
        example = example.expand(2, *example.shape[1:]).contiguous()  # batch 1 would specialize the dimension
    dynamic_shapes = {"pixel_values": {0: _batch_dim()}} if dynamic_batch else None
    # eval() for the trace, then each module's own flag back: the caller's model is not ours to switch
    modes = {module: module.training for module in model.modules()}
    try:
        with torch.no_grad():
            wrapper = LogitsModule(model.eval(), False).eval()
            return torch.export.export(wrapper, (example,), dynamic_shapes=dynamic_shapes)
    finally:
        for module, training in modes.items():
            module.training = training


def load_program(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """`torch.export.load(path)` with this package's `vithybrid::` custom ops registered first.

    A patched model's program names them, and `import vithybrid_fast` alone does not register them:
    they live in the kernel modules, which import triton — and triton reads TRITON_INTERPRET when a
    kernel is defined, so importing them eagerly with the package would fix that choice at import
    time. Where triton is missing (macOS) a reference model's program still loads.
    """
    with contextlib.suppress(ImportError):
        from . import kernels  # noqa: F401  (registers the custom ops)
    return torch.export.load(str(path))


# ---------------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------------
def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    batch: int | str = "dynamic",
    image_size: tuple[int, int] | str | None = None,
    opset: int | None = None,
    dtype: torch.dtype | str | None = None,
    hidden_states: bool = False,
    verify: bool = True,
) -> OnnxExportReport:
    """Write `model`'s reference computation to `path` as ONNX and verify it in ONNX Runtime (CPU).

    batch: "dynamic" or a fixed size. image_size: None (the model's config size), (H, W) (fixed;
    the position table is interpolated to the real token grid) or "dynamic" (any H, W ≥ 17).
    dtype: float32 (default) or float16. opset: 18 to onnxscript's converter maximum (25 for
    onnxscript 0.7), default torch's (20). Raises OnnxVerificationError, leaving `path` as it was,
    when the file fails verification (see the module docstring).
    """
    _check_model(model)
    for module in ("onnx", "onnxscript", "onnxruntime"):
        _require(module)
    fixed_batch = _check_batch(batch)
    dtype = _check_dtype(dtype)
    trained = model.config.image_size_hw
    size, dynamic_size = _check_image_size(image_size, trained)
    _check_opset(opset)
    path = Path(path)
    check_writable_file(path, "output")

    interpolate = dynamic_size or size != trained
    exported = reference_copy(model, dtype)
    if dynamic_size:
        install_dynamic_size_twins(exported)
    channels = model.config.num_channels
    example = torch.rand(fixed_batch or 2, channels, *size, generator=torch.Generator().manual_seed(0)).to(dtype)
    dims: dict[int, Any] = {} if fixed_batch else {0: _batch_dim()}
    if dynamic_size:
        # strings: dynamic axes the exporter names so in the file (Dim.DYNAMIC left its symbols, "s100", "s4")
        dims.update({2: "height", 3: "width"})
    outputs = ["logits", "hidden_states"] if hidden_states else ["logits"]
    try:
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                LogitsModule(exported, interpolate, hidden_states).eval(), (example,), dynamo=True, verbose=False,
                opset_version=opset, input_names=["pixel_values"], output_names=outputs,
                dynamic_shapes={"pixel_values": dims} if dims else None,
            )  # fmt: skip
    except torch.onnx.errors.OnnxExporterError as err:
        _raise_own_error(err)
        raise
    program.model.metadata_props.update(_metadata(model, size, dynamic_size, fixed_batch, dtype))
    # the exporter puts the weights of a model over 1.5 GB in `<name>.data`, named inside the file
    with staged_output(path, companions=(path.name + ".data",)) as staged:
        program.save(str(staged))
        del program, exported
        used_opset = _opset_of(staged)
        if opset is not None and used_opset != opset:  # the exporter only logs a failed conversion
            raise OnnxVerificationError(f"the exporter wrote opset {used_opset}, not {opset}; {path} was not written")
        if not verify:
            return OnnxExportReport(path, math.nan, math.nan, 0, used_opset, [])
        report = verify_onnx(
            staged, model, batch=fixed_batch, image_size=size, dynamic_size=dynamic_size, dtype=dtype, opset=used_opset
        )
        # NaN fails, and so does inf: logits that overflow float16 (over 65,504) made both the difference and
        # PyTorch float16's own error infinite, and inf <= inf passed a file that returns inf logits
        if not (math.isfinite(report.max_abs_diff) and report.max_abs_diff <= report.bound):
            details = "; ".join(f"{what}: {diff:.2e}" for what, diff in report.checks)
            overflow = (
                f" (the float32 logits reach {report.largest_logit:,.0f}; float16 holds at most 65,504)"
                if not math.isfinite(report.max_abs_diff) and report.largest_logit > 65504
                else ""
            )
            raise OnnxVerificationError(
                f"ONNX Runtime's logits differ from PyTorch's by {report.max_abs_diff:.2e} > bound "
                f"{report.bound:.2e} ({details}){overflow}; {path} was not written"
            )
    report.path = path
    return report


def _raise_own_error(err: BaseException) -> None:
    """Re-raise a ValueError/TypeError that vithybrid_fast raised inside torch's export, message first.

    torch wraps whatever the traced model raises in TorchExportError, whose text asks for a PyTorch
    PR; when the cause is one of our own argument/config errors, that message is the one to read.
    """
    cause, seen = err.__cause__ or err.__context__, set()
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, (ValueError, TypeError)) and _raised_by_us(cause):
            kind = ValueError if isinstance(cause, ValueError) else TypeError
            raise kind(f"{cause} (raised by the model while torch.export traced it for ONNX)") from err
        cause = cause.__cause__ or cause.__context__


def _raised_by_us(err: BaseException) -> bool:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)


def _metadata(model: nn.Module, size: tuple[int, int], dynamic_size: bool, batch: int | None, dtype) -> dict:
    from . import __version__

    config = model.config
    return {
        "id2label": json.dumps({str(k): v for k, v in sorted(config.id2label.items())}),
        "label2id": json.dumps(config.label2id, sort_keys=True),
        "image_size": "dynamic" if dynamic_size else f"{size[0]}x{size[1]}",
        "trained_image_size": "{}x{}".format(*config.image_size_hw),
        "batch": "dynamic" if batch is None else str(batch),
        "dtype": str(dtype).removeprefix("torch."),
        "producer": f"vithybrid_fast {__version__} (torch {torch.__version__})",
        "config": json.dumps(config.to_dict(), sort_keys=True),
    }


def _opset_of(path: Path) -> int:
    onnx = _require("onnx")
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def verification_inputs(
    size: tuple[int, int], batch: int | None, dynamic_size: bool, stride: int, channels: int = 3
) -> list[tuple[str, torch.Tensor]]:
    """The bundled photo (RGB models only), random pixels at two batch sizes, and a second size when
    dynamic (float32)."""
    from .images import open_image
    from .processing import ViTHybridImageProcessor, sample_image_path

    height, width = size
    gen = torch.Generator().manual_seed(13)

    def uniform(n: int, h: int, w: int) -> torch.Tensor:  # the processor's output range [-1, 1]
        return torch.rand(n, channels, h, w, generator=gen) * 2 - 1

    batches = (1, 3) if batch is None else (batch, batch)
    inputs = []
    if channels == 3:  # the processor makes RGB pixels; another channel count has no photo to offer
        processor = ViTHybridImageProcessor.for_base_384(
            size={"shortest_edge": min(height, width)}, crop_size={"height": height, "width": width}
        )
        photo = processor([open_image(sample_image_path())], return_tensors="pt")["pixel_values"]
        inputs.append(("photo", photo.expand(batches[0], -1, -1, -1).contiguous()))
    for i, n in enumerate(batches):
        repeat = ", second draw" if i and batches[0] == batches[1] else ""
        inputs.append((f"random batch {n}{repeat}", uniform(n, height, width)))
    if dynamic_size:  # another grid, and an odd height (asymmetric SAME padding)
        second = (height + 2 * stride + 1, max(17, width - stride))
        inputs.append((f"random {second[0]}×{second[1]}", uniform(batches[0] + 1 if batch is None else batch, *second)))
    return inputs


def verify_onnx(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    batch: int | None = None,
    image_size: tuple[int, int] | None = None,
    dynamic_size: bool = False,
    dtype: torch.dtype = torch.float32,
    opset: int = 0,
) -> OnnxExportReport:
    """Run `path` in ONNX Runtime (CPU) and PyTorch's reference; max |Δlogit| and the bound it must meet."""
    ort = _require("onnxruntime")
    trained = model.config.image_size_hw
    size = image_size or trained
    reference = reference_copy(model, torch.float32)
    same_dtype = reference_copy(model, dtype) if dtype != torch.float32 else None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's errors (InvalidGraph, Fail, …) derive from Exception only
        raise OnnxVerificationError(f"ONNX Runtime cannot load the exported file: {err}") from err
    channels = model.config.num_channels
    skipped = [] if channels == 3 else [f"photo not checked: the model takes {channels}-channel input, not RGB"]
    checks, worst, worst_torch, largest, images = [], 0.0, 0.0, 0.0, 0
    for what, pixels in verification_inputs(size, batch, dynamic_size, _backbone_stride(model), channels):
        interpolate = dynamic_size or tuple(pixels.shape[-2:]) != trained
        with torch.no_grad():
            expected = reference(pixels, interpolate_pos_encoding=interpolate).logits.double()
            if same_dtype is not None:
                torch_logits = same_dtype(pixels.to(dtype), interpolate_pos_encoding=interpolate).logits.double()
                worst_torch = max(worst_torch, (torch_logits - expected).abs().max().item())
        feed = {"pixel_values": pixels.to(dtype).numpy()}
        try:
            got = torch.from_numpy(session.run(["logits"], feed)[0]).double()
        except Exception as err:  # as above
            raise OnnxVerificationError(f"ONNX Runtime cannot run the exported file on {what}: {err}") from err
        diff = (got - expected).abs().max().item()
        checks.append((f"{what} ({pixels.shape[0]} image{'s' if pixels.shape[0] > 1 else ''})", diff))
        worst = max(worst, diff) if not math.isnan(diff) else math.nan
        largest = max(largest, expected.abs().max().item())
        images += pixels.shape[0]
    if dtype == torch.float32:
        bound = FP32_BOUND + FP32_RTOL * largest
    else:
        bound = 2 * worst_torch + FP16_ATOL * max(1.0, largest)
    return OnnxExportReport(Path(path), worst, bound, images, opset, checks, skipped, largest)


def _backbone_stride(model: nn.Module) -> int:
    """Pixels per token along one axis: image size over the position grid (16 for the hub model)."""
    config = model.config
    return max(1, config.image_size_hw[0] // config.position_grid[0])


# ---------------------------------------------------------------------------------------------
# `vithybrid-fast export`
# ---------------------------------------------------------------------------------------------
def _opset_argument(text: str) -> int:
    """argparse type of `--opset`: outside the range the exporter writes is a usage error (exit 2)."""
    try:
        opset = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    try:
        _check_opset(opset)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return opset


def register(subparsers: Any) -> None:
    from .cli import _positive_int, int_at_least

    parser = subparsers.add_parser(
        "export",
        help="export the model to ONNX, verified in ONNX Runtime",
        description="Export the reference computation to ONNX (logits; label map in the metadata) and verify "
        f"it in ONNX Runtime on the CPU. Needs: {INSTALL_HINT}",
    )
    parser.add_argument(
        "--model", default="google/vit-hybrid-base-bit-384", help="hub repo id or checkpoint dir (default: %(default)s)"
    )
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--dynamic-batch", action="store_true", help="any batch size (default: --batch)")
    batch.add_argument("--batch", type=_positive_int, default=1, help="fixed batch size (default: %(default)s)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--dynamic-size", action="store_true", help="any image height and width (≥ 17 pixels)")
    size.add_argument(
        "--image-size", type=int_at_least(17, "the stem's smallest input"), nargs=2, metavar=("H", "W"),
        help="fixed size, not the model's (each ≥ 17 pixels)",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", default="float32", choices=sorted(SUPPORTED_DTYPES),
        help="dtype of the exported weights and computation (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--opset", type=_opset_argument, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--hidden-states", action="store_true", help="also output the stacked hidden states")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .loading import load
    from .modeling import ViTHybridForImageClassification

    model = load(args.model, kernels="eager", device="cpu", model_class=ViTHybridForImageClassification)
    image_size = "dynamic" if args.dynamic_size else (tuple(args.image_size) if args.image_size else None)
    try:
        report = export_onnx(
            model, args.output, batch="dynamic" if args.dynamic_batch else args.batch, image_size=image_size,
            opset=args.opset, dtype=args.dtype, hidden_states=args.hidden_states,
        )  # fmt: skip
    except ImportError as err:  # a missing [export] extra: one sentence, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {report.path} (opset {report.opset}, {args.dtype})")
    for what, diff in report.checks:
        print(f"  {what}: max|Δlogit| {diff:.2e}")
    print(f"bound: {report.bound:.2e}")
    print(report.summary())
    return 0
