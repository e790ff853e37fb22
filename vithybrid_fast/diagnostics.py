"""The numeric checks behind `vithybrid-fast doctor --check / --drift`.

Every check follows DESIGN.md's tolerance idiom: the kernel's error against an upcast reference
(float64) may be at most 2 × (plain torch's error in the same dtype) + atol(dtype)·max(1, |ref|).
A row reports both errors, their ratio (kernel / torch: ~1 means "as accurate as PyTorch") and the
error over the bound (≤ 1 passes).

Shapes are the model's own: a forward on the meta device records the inputs each swappable module
sees at the chosen batch (base config on a GPU: attention (B, 12, 577, 64), GroupNorm up to
(B, 64, 192, 192), …; a tiny config under the Triton interpreter on a CPU).

Drift attribution swaps one family, then one module ("layer"), at a time into an otherwise plain
model and measures how far the logits move from plain torch in the same dtype (RMS over all logits).
A layer's share is its drift over the sum of all single-layer drifts: it says which kernel, where,
moves the answer most — the one to distrust first if the patched model disagrees.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# Mirrors tests/tolerance.py (tests/test_doctor.py asserts they agree).
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FACTOR = 2.0


@dataclass
class CheckRow:
    """One kernel (or model) against float64, beside plain torch in the same dtype."""

    what: str
    case: str
    dtype: str
    kernel_err: float
    torch_err: float
    bound: float
    error: str | None = None  # the kernel raised: the row fails with this text

    @property
    def ok(self) -> bool:
        return self.error is None and math.isfinite(self.kernel_err) and self.kernel_err <= self.bound

    @property
    def ratio(self) -> float:
        """kernel error / torch error (∞ when torch is exact and the kernel is not)."""
        if self.torch_err > 0:
            return self.kernel_err / self.torch_err
        return 1.0 if self.kernel_err == 0 else math.inf


def compare(
    what: str, case: str, out: torch.Tensor, peer: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None
) -> CheckRow:
    """The tolerance idiom on kernel `out`, plain-torch `peer` (both computed in `dtype`, default out's) and
    the float64 `ref`."""
    dtype = dtype or out.dtype
    ref64 = ref.double()
    kernel_err = (out.double() - ref64).abs().max().item()
    torch_err = (peer.double() - ref64).abs().max().item()
    bound = FACTOR * torch_err + ATOL[dtype] * max(1.0, ref64.abs().max().item())
    return CheckRow(what, case, str(dtype).removeprefix("torch."), kernel_err, torch_err, bound)


ROW_HEADER = (
    f"{'check':<20} {'case':<30} {'dtype':<9} {'kernel err':>10} {'torch err':>10} {'k/torch':>8} {'err/bound':>9}  ok"
)


def format_row(r: CheckRow) -> str:
    head = f"{r.what:<20} {r.case:<30} {r.dtype:<9}"
    if r.error:
        return f"{head} FAILED: {r.error[:90]}"
    relative = r.kernel_err / r.bound if r.bound else math.inf
    ok = "yes" if r.ok else "NO"
    return f"{head} {r.kernel_err:>10.2e} {r.torch_err:>10.2e} {r.ratio:>8.2f} {relative:>9.2f}  {ok}"


def format_rows(rows: list[CheckRow]) -> str:
    return "\n".join([ROW_HEADER, "-" * len(ROW_HEADER), *map(format_row, rows)])


def tiny_config():
    """The benchmark's tiny config with head size 32 (the flash kernel's smallest): every kernel runs in it."""
    from .bench.e2e import tiny_config as bench_tiny_config
    from .config import ViTHybridConfig

    data = bench_tiny_config().to_dict()
    data.update(hidden_size=64, num_attention_heads=2, intermediate_size=96)
    return ViTHybridConfig.from_dict(data)


# -- the model's shapes ---------------------------------------------------------------------------
@dataclass
class ModelShapes:
    """What the swappable modules see in one forward at a given batch."""

    tokens: tuple[int, int, int] = (0, 0, 0)  # (B, N, hidden) entering self-attention
    heads: int = 1
    intermediate: int = 1
    layer_norm_eps: float = 1e-12
    conv_weights: list[tuple[int, ...]] = field(default_factory=list)  # forward order, distinct
    group_norms: list[tuple[tuple[int, ...], int, float]] = field(default_factory=list)  # (x shape, groups, eps)


def model_shapes(config, batch: int) -> ModelShapes:
    """Record the inputs of every swappable module in one forward on the meta device (no memory, no math)."""
    from .backbone import BitGroupNormActivation, WeightStandardizedConv2d
    from .modeling import ViTHybridForImageClassification, ViTHybridSelfAttention

    shapes = ModelShapes(heads=config.num_attention_heads, intermediate=config.intermediate_size,
                         layer_norm_eps=float(config.layer_norm_eps))  # fmt: skip
    with torch.device("meta"):
        model = ViTHybridForImageClassification(copy.deepcopy(config)).eval()
        pixels = torch.empty(batch, config.num_channels, *config.image_size_hw)

    def record(module: nn.Module, args: tuple) -> None:
        x = args[0]
        if isinstance(module, ViTHybridSelfAttention):
            shapes.tokens = tuple(x.shape)
        elif isinstance(module, WeightStandardizedConv2d):
            if tuple(module.weight.shape) not in shapes.conv_weights:
                shapes.conv_weights.append(tuple(module.weight.shape))
        elif isinstance(module, BitGroupNormActivation):
            shapes.group_norms.append((tuple(x.shape), module.num_groups, module.eps))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules()]
    with torch.no_grad():
        model(pixels)
    for hook in hooks:
        hook.remove()
    return shapes


# -- kernel checks --------------------------------------------------------------------------------
KernelCheck = Callable[[torch.dtype], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _randn(shape, device, generator, scale=1.0, shift=0.0) -> torch.Tensor:
    return (torch.randn(shape, generator=generator, dtype=torch.float32) * scale + shift).to(device)


def kernel_checks(
    shapes: ModelShapes, device: torch.device, seed: int = 0, log: Callable[[str], None] = print
) -> list[tuple[str, str, KernelCheck]]:
    """(kernel, case, check(dtype) -> (kernel out, torch out, float64 ref)) at the model's shapes."""
    from .kernels import add_layer_norm, attention, fused_linear, group_norm_act, layer_norm_mlp, weight_standardize

    g = torch.Generator().manual_seed(seed)
    b, n, hidden = shapes.tokens
    head_dim = hidden // shapes.heads
    checks: list[tuple[str, str, KernelCheck]] = []
    fmt = "×".join

    # a head size the kernel lacks is served by SDPA in the model (fast.FastSelfAttention): nothing to check
    if head_dim in attention.SUPPORTED_HEAD_DIMS:
        q, k, v = (_randn((b, shapes.heads, n, head_dim), device, g) for _ in range(3))

        def check_attention(dtype):
            qd, kd, vd = (t.to(dtype) for t in (q, k, v))
            peer = torch.softmax(qd @ kd.transpose(-2, -1) * head_dim**-0.5, dim=-1) @ vd
            ref = attention.reference(q.double(), k.double(), v.double())
            return attention.flash_attention(qd, kd, vd), peer, ref

        checks.append(("flash_attention", fmt(map(str, q.shape)), check_attention))
    else:
        served = attention.SUPPORTED_HEAD_DIMS
        log(f"flash_attention: not checked: head size {head_dim} is not one it serves {served}; the patched model "
            "runs torch SDPA after its fused QKV GEMM")  # fmt: skip

    # the largest conv weight and the stem's (fan-in 147, not a power of two)
    picked = {max(shapes.conv_weights, key=math.prod), shapes.conv_weights[0]}
    for shape in sorted(picked, key=math.prod, reverse=True):
        w = _randn(shape, device, g, scale=0.05, shift=0.01)

        def check_ws(dtype, w=w):
            wd = w.to(dtype)
            flat = wd.reshape(1, wd.shape[0], -1)  # HF's batch_norm trick, in the weight's dtype
            peer = F.batch_norm(flat, None, None, training=True, momentum=0.0, eps=1e-8).reshape_as(wd)
            return weight_standardize(wd, 1e-8), peer, weight_standardize.reference(w.double(), 1e-8)

        checks.append(("weight_standardize", fmt(map(str, shape)), check_ws))

    # the largest activation (+ReLU), and the deepest with a residual (a bottleneck's norm3 + shortcut)
    largest = max(shapes.group_norms, key=lambda case: math.prod(case[0]))
    for (x_shape, groups, eps), with_residual in ((largest, False), (shapes.group_norms[-1], True)):
        x = _randn(x_shape, device, g, scale=2.0, shift=0.5)
        gn_w, gn_b = _randn(x_shape[1], device, g, 0.2, 1.0), _randn(x_shape[1], device, g, 0.1)
        res = _randn(x_shape, device, g) if with_residual else None

        def check_gn(dtype, x=x, gn_w=gn_w, gn_b=gn_b, res=res, groups=groups, eps=eps):
            xd, wd, bd = x.to(dtype), gn_w.to(dtype), gn_b.to(dtype)
            rd = None if res is None else res.to(dtype)
            peer = F.group_norm(xd, groups, wd, bd, eps)
            peer = torch.relu(peer if rd is None else peer + rd)
            out = group_norm_act(xd, groups, wd, bd, eps, "relu", rd)
            as64 = [None if t is None else t.double() for t in (x, gn_w, gn_b, res)]
            return out, peer, group_norm_act.reference(as64[0], groups, as64[1], as64[2], eps, "relu", as64[3])

        case = fmt(map(str, x_shape)) + (" +res" if with_residual else "") + " relu"
        checks.append(("group_norm_act", case, check_gn))

    eps, inter = shapes.layer_norm_eps, shapes.intermediate
    x = _randn((b, n, hidden), device, g, shift=0.5)
    ln_w, ln_b = _randn(hidden, device, g, 0.2, 1.0), _randn(hidden, device, g, 0.1)
    fc1_w, fc1_b = _randn((inter, hidden), device, g, hidden**-0.5), _randn(inter, device, g, 0.1)
    fc2_w, fc2_b = _randn((hidden, inter), device, g, inter**-0.5), _randn(hidden, device, g, 0.1)
    mlp_params = (ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b)

    def check_mlp(dtype):
        xd, (lw, lb, w1, b1, w2, b2) = x.to(dtype), (t.to(dtype) for t in mlp_params)
        peer = xd + F.linear(F.gelu(F.linear(F.layer_norm(xd, (hidden,), lw, lb, eps), w1, b1)), w2, b2)
        ref = layer_norm_mlp.reference(x.double(), *(t.double() for t in mlp_params), eps)
        return layer_norm_mlp(xd, lw, lb, w1, b1, w2, b2, eps), peer, ref

    checks.append(("layer_norm_mlp", f"{b}×{n}×{hidden}, hidden {inter}", check_mlp))

    qkv_w, qkv_b = _randn((3 * hidden, hidden), device, g, hidden**-0.5), _randn(3 * hidden, device, g, 0.1)

    def check_qkv(dtype):
        xd, wd, bd, lw, lb = (t.to(dtype) for t in (x, qkv_w, qkv_b, ln_w, ln_b))
        mean, rstd = fused_linear.layer_norm_stats(xd, eps)
        out = fused_linear.fused_linear(xd, wd, bd, ln=(mean, rstd, lw, lb))
        peer = F.linear(F.layer_norm(xd, (hidden,), lw, lb, eps), wd, bd)
        x64 = x.double()
        mean64, rstd64 = fused_linear.reference_layer_norm_stats(x64, eps)
        ref = fused_linear.reference(x64, qkv_w.double(), qkv_b.double(),
                                     ln=(mean64, rstd64, ln_w.double(), ln_b.double()))  # fmt: skip
        return out, peer, ref

    checks.append(("fused_linear", f"qkv {b}×{n}×{hidden}→{3 * hidden} +LN", check_qkv))

    proj_w, proj_b = _randn((hidden, hidden), device, g, hidden**-0.5), _randn(hidden, device, g, 0.1)
    residual = _randn((b, n, hidden), device, g)

    def check_proj(dtype):
        xd, wd, bd, rd = (t.to(dtype) for t in (x, proj_w, proj_b, residual))
        out = fused_linear.fused_linear(xd, wd, bd, residual=rd)
        ref = fused_linear.reference(x.double(), proj_w.double(), proj_b.double(), residual=residual.double())
        return out, F.linear(xd, wd, bd) + rd, ref

    checks.append(("fused_linear", f"out-proj {b}×{n}×{hidden} +res", check_proj))

    def check_add_ln(dtype):  # "auto"'s glue after a cuBLAS out-projection: h = out + x, LayerNorm(h)
        xd, rd, lw, lb = (t.to(dtype) for t in (x, residual, ln_w, ln_b))
        _, out = add_layer_norm(xd, rd, lw, lb, eps)
        _, peer = add_layer_norm.reference(xd, rd, lw, lb, eps)
        _, ref = add_layer_norm.reference(x.double(), residual.double(), ln_w.double(), ln_b.double(), eps)
        return out, peer, ref

    checks.append(("add_layer_norm", f"{b}×{n}×{hidden} +res", check_add_ln))
    return checks


def run_kernel_checks(checks, dtypes: list[torch.dtype], log: Callable[[str], None] = print) -> list[CheckRow]:
    rows = []
    with torch.no_grad():
        for dtype in dtypes:
            for kernel, case, check in checks:
                try:
                    rows.append(compare(kernel, case, *check(dtype)))
                except Exception as err:  # a compile error or launch failure is a failed check, said plainly
                    text = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
                    rows.append(CheckRow(kernel, case, str(dtype).removeprefix("torch."), math.nan, math.nan,
                                         math.nan, error=text))  # fmt: skip
                log(format_row(rows[-1]))
    return rows


# -- whole-model checks and drift attribution -----------------------------------------------------
def _logits(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(pixels.to(next(model.parameters()).dtype)).logits.double()


def reference_logits(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """float64 eager-attention logits of a copy of `model` (the upcast reference)."""
    ref = copy.deepcopy(model).to(torch.float64)
    ref.set_attn_implementation("eager")
    return _logits(ref, pixels)


def model_check(model: nn.Module, pixels: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> CheckRow:
    """Patched (every Triton kernel) vs plain torch, both in `dtype`, against the float64 logits."""
    from .patching import patch, unpatch

    model = copy.deepcopy(model).to(dtype)
    model.set_attn_implementation("eager")
    peer = _logits(model, pixels)
    case = f"logits {tuple(ref.shape)}"
    try:
        ours = _logits(patch(model, "triton"), pixels)
    except Exception as err:
        text = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        return CheckRow("model forward", case, str(dtype).removeprefix("torch."), math.nan, math.nan, math.nan, text)
    finally:
        unpatch(model)
    return compare("model forward", case, ours, peer, ref, dtype)


def swap_units(model: nn.Module, family: str) -> list[str]:
    """Qualified names of the outermost modules `family` replaces (a layer, a stem conv, …)."""
    from .patching import _registry

    table = _registry(model)[family]
    targets = [name for name, module in model.named_modules() if type(module) in table]
    return [t for t in targets if not any(t.startswith(other + ".") for other in targets if other != t)]


def _swap(model: nn.Module, family: str, prefix: str | None) -> list[tuple[nn.Module, str, nn.Module]]:
    """Patch `family` only inside `prefix` (None: everywhere); returns what to put back."""
    from .patching import _registry, build_in_mode

    table = _registry(model)[family]
    record = []
    for qual, parent in reversed(list(model.named_modules())):  # descendants first, as patch() does
        for name, child in list(parent.named_children()):
            full = f"{qual}.{name}" if qual else name
            inside = prefix is None or full == prefix or full.startswith(prefix + ".")
            builder = table.get(type(child))
            if builder is not None and inside:
                setattr(parent, name, build_in_mode(builder, child))
                record.append((parent, name, child))
    return record


def _restore(record: list[tuple[nn.Module, str, nn.Module]]) -> None:
    for parent, name, original in reversed(record):
        setattr(parent, name, original)


@dataclass
class DriftRow:
    family: str
    unit: str  # "(all layers)" for a whole family
    drift: float  # RMS of (logits with this swap − plain-torch logits), same dtype
    err_vs_f64: float  # max |logits − float64 logits|
    share: float = 0.0


def drift_attribution(
    model: nn.Module, pixels: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, log: Callable[[str], None] = print
) -> tuple[list[DriftRow], list[DriftRow], float, float]:
    """(family rows, layer rows, RMS drift of the fully patched model, plain torch's max error vs float64)."""
    from .patching import FAMILIES, patch, unpatch

    model = copy.deepcopy(model).to(dtype)
    model.set_attn_implementation("eager")
    base = _logits(model, pixels)

    def measure(family: str, unit: str, prefix: str | None) -> DriftRow:
        record = _swap(model, family, prefix)
        try:
            logits = _logits(model, pixels)
        finally:
            _restore(record)
        row = DriftRow(family, unit, (logits - base).pow(2).mean().sqrt().item(), (logits - ref).abs().max().item())
        log(f"  swapped {family:<9} {short_name(unit):<36} RMS drift {row.drift:.3e}")
        return row

    families = [measure(family, "(all layers)", None) for family in FAMILIES]
    layers = [measure(family, unit, unit) for family in FAMILIES for unit in swap_units(model, family)]
    for rows in (families, layers):
        total = sum(r.drift for r in rows)
        for r in rows:
            r.share = r.drift / total if total > 0 else 0.0
    patch(model, "triton")
    try:
        all_drift = (_logits(model, pixels) - base).pow(2).mean().sqrt().item()
    finally:
        unpatch(model)
    return families, layers, all_drift, (base - ref).abs().max().item()


def short_name(unit: str) -> str:
    """vit.embeddings.patch_embeddings.backbone.bit.encoder.stages.2.layers.0 → bit.encoder.stages.2.layers.0"""
    return unit.replace("vit.embeddings.patch_embeddings.backbone.", "").replace("vit.encoder.", "encoder.")


def format_drift(families: list[DriftRow], layers: list[DriftRow], all_drift: float, torch_err: float) -> str:
    """Families first, then layers from the largest drift down; err/torch = max err vs float64 over torch's."""
    head = f"{'family':<10} {'swapped alone':<36} {'RMS drift':>10} {'share':>7} {'err vs f64':>11} {'err/torch':>9}"
    lines = [head, "-" * len(head)]
    for r in [*families, *sorted(layers, key=lambda r: -r.drift)]:
        ratio = r.err_vs_f64 / torch_err if torch_err > 0 else math.inf
        lines.append(f"{r.family:<10} {short_name(r.unit):<36} {r.drift:>10.3e} {100 * r.share:>6.1f}% "
                     f"{r.err_vs_f64:>11.3e} {ratio:>9.2f}")  # fmt: skip
    lines.append(f"all families swapped: RMS drift {all_drift:.3e}; plain torch's max error vs float64 {torch_err:.3e}")
    lines.append("shares: each swap's drift over the sum at its level (drifts need not add up exactly)")
    return "\n".join(lines)
