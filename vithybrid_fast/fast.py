"""Kernel-backed modules, one class per swappable reference module (see patching.py).

Each is built from the reference module it replaces and keeps that module's parameters (the same
`nn.Parameter` objects, under the same attribute names), so `state_dict()` is unchanged and a
patched model trains and saves like the original. Calls the kernels cannot serve take the
reference path for that call: `output_attentions=True` (a flash kernel never forms the
probabilities), `head_mask`, attention dropout in training, an activation the kernel lacks.

Under torch.autocast the encoder's fused GEMMs run as torch's ops, which autocast casts (`_autocasting`);
flash attention and the backbone kernels still run.

Each module's `measured` flag (set by `patch(model, "auto")` on a GPU) makes every fused op pick, by
timing, between its kernel and the torch ops it replaces (dispatch.py); off, the kernels always run.
A ViT layer whose three GEMM ops all picked torch then runs cuBLAS with `kernels.add_layer_norm` offered,
again by timing, as the glue between them (`FastViTLayer.cublas_with_glue_kernels`).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import nn

from vithybrid_fast import dispatch, kernels
from vithybrid_fast.kernels.add_layer_norm import MAX_WIDTH as GLUE_MAX_WIDTH
from vithybrid_fast.kernels.attention import SUPPORTED_HEAD_DIMS
from vithybrid_fast.kernels.fused_linear import fused_linear, layer_norm_stats

from .backbone import implicit_same_padding
from .modeling import eager_attention
from .weight_cache import DerivedWeightCache


class _ShapeOf(NamedTuple):
    """What a dispatch key reads of a tensor, for asking about a decision without making the tensor."""

    shape: torch.Size
    dtype: torch.dtype


def _is_exact_gelu(module: nn.Module) -> bool:
    """nn.GELU() or transformers' GELUActivation — both erf GELU; tanh variants are not."""
    if isinstance(module, nn.GELU):
        return module.approximate == "none"
    return type(module).__name__ == "GELUActivation" and getattr(module, "act", None) is nn.functional.gelu


def _plain_linear(*modules: nn.Module) -> bool:
    """Each module computes exactly F.linear(x, .weight, .bias): an nn.Linear (parametrized ones too) whose
    forward is nn.Linear's. A LoRA wrapper, a quantized or otherwise subclassed linear, or one with hooks
    must be called, not read for its .weight: the fused paths would silently drop what it adds."""
    return all(isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward for m in modules) and _unhooked(
        *modules
    )


def _unhooked(*modules: nn.Module) -> bool:
    """No forward hook on any of `modules`: a fused path that skips calling them may skip them."""
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _is_relu(module: nn.Module) -> bool:
    return isinstance(module, nn.ReLU)


def _autocasting(x: torch.Tensor) -> bool:
    """Under torch.autocast the fused GEMMs step aside for torch's ops, which autocast casts.

    Autocast casts the inputs of torch's ops, not of our custom ops: without this, the fused LayerNorm+GEMM
    kernels received the float32 residual stream and float32 weights and ran their GEMMs in IEEE float32
    (no tensor cores, under `finetune`'s bf16 autocast; read from the code, never timed), or refused a
    bf16 input beside float32 weights. torch's LayerNorm (float32) → cuBLAS GEMM (bf16/fp16) → float32
    residual add is autocast's own recipe; the flash-attention kernel still runs, on the bf16/fp16 q, k, v
    the projection gives. (A fused kernel taking autocast's mixed dtypes is future work; on the H200 the
    fused GEMMs lost to cuBLAS anyway.)"""
    return torch.is_autocast_enabled(x.device.type)


# ---------------------------------------------------------------------------------------------
# ViT encoder
# ---------------------------------------------------------------------------------------------
class FastSelfAttention(nn.Module):
    """Self-attention with one fused QKV projection and the Triton flash-attention kernel.

    The QKV weight is the concatenation of query/key/value weights, made every call (held only while
    the model is frozen: weight_cache.freeze); the kernel reads q, k, v as strided views of the
    (B, N, 3, H, d) projection output, with no copy.
    """

    def __init__(self, reference: nn.Module) -> None:
        super().__init__()
        self.query, self.key, self.value = reference.query, reference.key, reference.value
        self.dropout = reference.dropout
        self.num_attention_heads = reference.num_attention_heads
        self.attention_head_size = reference.attention_head_size
        self.all_head_size = reference.all_head_size
        self._qkv = DerivedWeightCache()
        self.measured = False  # dispatch.run: time kernel vs torch per shape (kernels="auto" on a GPU)
        # a head size the kernel was not built for still gets the fused QKV GEMM, with SDPA after it
        self.use_flash_kernel = self.attention_head_size in SUPPORTED_HEAD_DIMS
        if not self.use_flash_kernel:
            warnings.warn(
                f"flash_attention supports head sizes {SUPPORTED_HEAD_DIMS}, not {self.attention_head_size}: "
                "this model's attention runs torch SDPA after the fused QKV projection",
                stacklevel=2,
            )

    def fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        def compute() -> tuple[torch.Tensor, torch.Tensor | None]:
            weight = torch.cat([self.query.weight, self.key.weight, self.value.weight], dim=0)
            biases = [self.query.bias, self.key.bias, self.value.bias]
            bias = None if any(b is None for b in biases) else torch.cat(biases, dim=0)
            return weight, bias

        params = (self.query.weight, self.key.weight, self.value.weight,
                  self.query.bias, self.key.bias, self.value.bias)  # fmt: skip
        return self._qkv.get(compute, *params)

    def can_fuse(self, head_mask: torch.Tensor | None, output_attentions: bool) -> bool:
        dropout_active = self.training and self.dropout.p > 0
        plain = _plain_linear(self.query, self.key, self.value)
        return plain and not output_attentions and head_mask is None and not dropout_active

    def attend_packed(self, qkv: torch.Tensor) -> torch.Tensor:
        """(B, N, 3·H·d) projection output → (B, N, H·d) attention context."""
        batch, tokens, _ = qkv.shape
        qkv = qkv.view(batch, tokens, 3, self.num_attention_heads, self.attention_head_size)

        def sdpa() -> torch.Tensor:
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, N, d) strided views
            return nn.functional.scaled_dot_product_attention(q, k, v)

        if self.use_flash_kernel:
            # the packed entry point: in training its gradient is one tensor, not three autograd fills
            # and adds; decided per packed shape (which fixes q, k, v's)
            context = dispatch.run("flash_attention", self.measured, lambda: kernels.flash_attention_packed(qkv),
                                   sdpa, (qkv,))  # fmt: skip
        else:
            context = sdpa()
        return context.transpose(1, 2).reshape(batch, tokens, self.all_head_size)

    def reference_forward(
        self, hidden_states: torch.Tensor, head_mask: torch.Tensor | None, output_attentions: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(*x.shape[:2], self.num_attention_heads, self.attention_head_size).transpose(1, 2)

        q, k, v = heads(self.query(hidden_states)), heads(self.key(hidden_states)), heads(self.value(hidden_states))
        context, probs = eager_attention(q, k, v, self.dropout, head_mask)
        context = context.transpose(1, 2).reshape(*hidden_states.shape[:2], self.all_head_size)
        return context, (probs if output_attentions else None)

    def forward(
        self, hidden_states: torch.Tensor, head_mask: torch.Tensor | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.can_fuse(head_mask, output_attentions):
            return self.reference_forward(hidden_states, head_mask, output_attentions)
        weight, bias = self.fused_qkv()
        return self.attend_packed(nn.functional.linear(hidden_states, weight, bias)), None


class FastViTLayer(nn.Module):
    """A ViT layer in seven launches (eager takes about thirteen):

        row stats → LN-before fused into the QKV GEMM → flash attention → out-proj GEMM (+bias
        +residual) → row stats → LN-after fused into fc1 (+bias +GELU) → fc2 (+bias +residual)

    The attention half is fused only when the layer's self-attention is a FastSelfAttention (the
    "attention" family is on Triton too); otherwise it runs the module it holds.
    """

    def __init__(self, reference: nn.Module) -> None:
        super().__init__()
        self.attention = reference.attention
        self.intermediate = reference.intermediate
        self.output = reference.output
        self.layernorm_before = reference.layernorm_before
        self.layernorm_after = reference.layernorm_after
        self.measured = False
        self._glue_verdicts: dict[tuple, bool] = {}  # see _torch_gemms_chosen
        # under autocast (training): LayerNorms and the attention's residual add as add_layer_norm_train
        # (see autocast_layer); off, torch's ops as autocast casts them (bench_train's A/B switch)
        self.autocast_glue_kernels = True

    def _attention_fusable(self, head_mask: torch.Tensor | None, output_attentions: bool) -> bool:
        """The attention half may run fused (here, in autocast_layer or cublas_with_glue_kernels): its
        self-attention is ours and can fuse, and every module those paths skip (LayerNorm-before, the
        attention wrappers, the out-projection, read for its weights) is plain and unhooked."""
        self_attention = self.attention.attention
        return (
            isinstance(self_attention, FastSelfAttention)
            and self_attention.can_fuse(head_mask, output_attentions)
            and _plain_linear(self.attention.output.dense)
            and _unhooked(self.attention, self_attention, self.attention.output, self.layernorm_before)
        )

    def attention_block(
        self, x: torch.Tensor, head_mask: torch.Tensor | None, output_attentions: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self_attention = self.attention.attention
        if self._attention_fusable(head_mask, output_attentions):
            ln = self.layernorm_before
            weight, bias = self_attention.fused_qkv()

            def ln_qkv_kernel() -> torch.Tensor:
                mean, rstd = layer_norm_stats(x, ln.eps)
                return fused_linear(x, weight, bias, ln=(mean, rstd, ln.weight, ln.bias))

            def ln_qkv_torch() -> torch.Tensor:
                normed = nn.functional.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps)
                return nn.functional.linear(normed, weight, bias)

            autocasting = _autocasting(x)
            if autocasting:
                qkv = ln_qkv_torch()
            else:
                qkv = dispatch.run("layer_norm_linear", self.measured, ln_qkv_kernel, ln_qkv_torch, (x, weight))
            context = self_attention.attend_packed(qkv)
            dense = self.attention.output.dense
            if self.training and self.attention.output.dropout.p > 0:
                return self.attention.output.dropout(nn.functional.linear(context, dense.weight, dense.bias)) + x, None
            if autocasting:
                return nn.functional.linear(context, dense.weight, dense.bias) + x, None
            out = dispatch.run(
                "linear_residual",
                self.measured,
                lambda: fused_linear(context, dense.weight, dense.bias, residual=x),
                lambda: nn.functional.linear(context, dense.weight, dense.bias) + x,
                (context, dense.weight),
            )
            return out, None
        # transformers' eager attention returns a 1-tuple unless asked for probabilities; ours a pair
        outputs = self.attention(self.layernorm_before(x), head_mask, output_attentions)
        return outputs[0] + x, (outputs[1] if len(outputs) > 1 else None)

    def mlp_block(self, h: torch.Tensor) -> torch.Tensor:
        dropout_active = self.training and self.output.dropout.p > 0
        plain = _plain_linear(self.intermediate.dense, self.output.dense) and _unhooked(
            self.intermediate, self.output, self.layernorm_after, self.intermediate.intermediate_act_fn
        )
        if dropout_active or not plain or not _is_exact_gelu(self.intermediate.intermediate_act_fn) or _autocasting(h):
            return self.output(self.intermediate(self.layernorm_after(h)), h)
        ln, fc1, fc2 = self.layernorm_after, self.intermediate.dense, self.output.dense
        return dispatch.run(
            "layer_norm_mlp",
            self.measured,
            lambda: kernels.layer_norm_mlp(h, ln.weight, ln.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias, ln.eps),
            lambda: self.output(self.intermediate(self.layernorm_after(h)), h),  # the reference modules
            (h, fc1.weight),
        )

    def forward(
        self, hidden_states: torch.Tensor, head_mask: torch.Tensor | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._autocast_glue_serves(hidden_states, head_mask, output_attentions):
            return self.autocast_layer(hidden_states), None
        if self._torch_gemms_chosen(hidden_states, head_mask, output_attentions):
            return self.cublas_with_glue_kernels(hidden_states), None
        h, probs = self.attention_block(hidden_states, head_mask, output_attentions)
        out = self.mlp_block(h)
        if self._torch_gemms_chosen(hidden_states, head_mask, output_attentions):
            # decided in this very call: return what every later call will compute, so the first call's
            # output equals the second's (one extra layer forward, on the first call only)
            return self.cublas_with_glue_kernels(hidden_states), None
        return out, probs

    # -- under torch.autocast: the GEMMs are torch's, the glue between them ours ------------------------
    # Autocast casts the inputs of torch's ops only, so under it the fused GEMMs step aside (_autocasting)
    # and the layer was torch's float32 LayerNorms, mixed-dtype residual adds and casts, forward and
    # backward: LayerNorms 8.05, adds 4.59, copies and casts 5.89 ms of a 97 ms bf16 training step on the
    # H200 (batch 64, 2026-11-27). Here each LayerNorm, with the attention's residual add before
    # LayerNorm-after, is one add_layer_norm_train, which writes its output in autocast's dtype (the cast
    # the next GEMM made) and has its own backward; the MLP's residual add and the weights' casts stay.
    # Not under "auto" (its dispatch times forwards alone), nor where attention dropout is active.
    def _autocast_glue_serves(self, x: torch.Tensor, head_mask: torch.Tensor | None, output_attentions: bool) -> bool:
        if self.measured or not self.autocast_glue_kernels or not _autocasting(x):
            return False
        if not self._attention_fusable(head_mask, output_attentions):
            return False
        if self.training and self.attention.output.dropout.p > 0:
            return False
        # LayerNorm-after is skipped too; fc1 and fc2 are called as modules
        return _unhooked(self.layernorm_after) and x.shape[-1] <= GLUE_MAX_WIDTH

    def autocast_layer(self, x: torch.Tensor) -> torch.Tensor:
        """The layer as autocast's per-op torch path computes it, with add_layer_norm_train as the glue."""
        dtype = torch.get_autocast_dtype(x.device.type)
        ln_before, ln_after = self.layernorm_before, self.layernorm_after
        _, normed = kernels.add_layer_norm_train(x, None, ln_before.weight, ln_before.bias, ln_before.eps, dtype)
        self_attention = self.attention.attention
        weight, bias = self_attention.fused_qkv()
        context = self_attention.attend_packed(nn.functional.linear(normed, weight, bias))
        dense = self.attention.output.dense
        out = nn.functional.linear(context, dense.weight, dense.bias)
        h, normed = kernels.add_layer_norm_train(out, x, ln_after.weight, ln_after.bias, ln_after.eps, dtype)
        return self.output(self.intermediate(normed), h)  # fc1 + activation, fc2 (+ dropout) + h: the reference's

    # -- kernels="auto" where the measured dispatch chose torch's GEMMs -------------------------------
    # Our fused GEMMs lose to cuBLAS (H100/H200, every tile), so "auto" runs F.linear; then the glue
    # between the GEMMs — torch's LayerNorms and residual adds, 3.5 ms of a 33 ms bf16 batch-64 forward on
    # the H100 — is what torch.compile fuses and we did not. Once the three GEMM ops of this layer are
    # decided "torch", the layer runs them with kernels.add_layer_norm as the glue, each glue op again
    # measured against torch's add and LayerNorm. Inference only (no gradient recorded); same values
    # as the per-op torch path when the glue goes to torch too.
    def _torch_gemms_chosen(self, x: torch.Tensor, head_mask: torch.Tensor | None, output_attentions: bool) -> bool:
        if not self.measured or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return False
        # Asked twice per layer and call: the three decisions are looked up once per input shape (a decision,
        # once made, holds until dispatch.reset), so "auto" pays ~1 µs here, not ~15, per layer on the host.
        key = (x.shape, x.dtype, x.device, dispatch.epoch())
        chosen = self._glue_verdicts.get(key)
        if chosen is None:
            chosen = self._gemm_decisions_are_torch(x)
            if chosen is None:
                return False  # not all decided yet: ask again next time
            self._glue_verdicts[key] = chosen
        return chosen and self._glue_serves(x, head_mask, output_attentions)

    def _gemm_decisions_are_torch(self, x: torch.Tensor) -> bool | None:
        """All three GEMM ops of this layer decided "torch" (True), one "triton" (False), or undecided (None)."""
        query = self.attention.attention.query.weight  # a key is shapes and dtypes: the fused QKV weight's
        fused_qkv = _ShapeOf(torch.Size((3 * query.shape[0], query.shape[1])), query.dtype)
        ops = (
            ("layer_norm_linear", (x, fused_qkv)),  # attention_block's keys; the context and h are x-shaped
            ("linear_residual", (x, self.attention.output.dense.weight)),
            ("layer_norm_mlp", (x, self.intermediate.dense.weight)),
        )
        choices = [dispatch.decided(op, tensors) for op, tensors in ops]
        return None if None in choices else all(choice == "torch" for choice in choices)

    def _glue_serves(self, x: torch.Tensor, head_mask: torch.Tensor | None, output_attentions: bool) -> bool:
        """The call is one the fused path serves too: fused attention, no dropout, exact GELU, no autocast."""
        if _autocasting(x) or not self._attention_fusable(head_mask, output_attentions):
            return False
        if self.training and (self.attention.output.dropout.p > 0 or self.output.dropout.p > 0):
            return False
        if not _unhooked(self.layernorm_after):  # skipped too; fc1 and fc2 are called as modules
            return False
        return _is_exact_gelu(self.intermediate.intermediate_act_fn) and x.shape[-1] <= GLUE_MAX_WIDTH

    def cublas_with_glue_kernels(self, x: torch.Tensor) -> torch.Tensor:
        """The layer as the per-op torch path computes it, with measured LayerNorm / add+LayerNorm glue."""
        ln_before, ln_after = self.layernorm_before, self.layernorm_after
        width = (x.shape[-1],)
        normed = dispatch.run(
            "layer_norm",
            True,
            lambda: kernels.add_layer_norm(x, None, ln_before.weight, ln_before.bias, ln_before.eps)[1],
            lambda: nn.functional.layer_norm(x, width, ln_before.weight, ln_before.bias, ln_before.eps),
            (x, ln_before.weight),
        )
        self_attention = self.attention.attention
        weight, bias = self_attention.fused_qkv()
        context = self_attention.attend_packed(nn.functional.linear(normed, weight, bias))
        dense = self.attention.output.dense
        out = nn.functional.linear(context, dense.weight, dense.bias)

        def add_then_layer_norm() -> tuple[torch.Tensor, torch.Tensor]:
            h = out + x
            return h, nn.functional.layer_norm(h, width, ln_after.weight, ln_after.bias, ln_after.eps)

        h, normed = dispatch.run(
            "add_layer_norm",
            True,
            lambda: kernels.add_layer_norm(out, x, ln_after.weight, ln_after.bias, ln_after.eps),
            add_then_layer_norm,
            (out, ln_after.weight),
        )
        return self.output(self.intermediate(normed), h)  # fc1 + GELU, fc2 + h: the reference modules


# ---------------------------------------------------------------------------------------------
# BiT backbone
# ---------------------------------------------------------------------------------------------
def group_norm_act(measured: bool, x, num_groups, weight, bias, eps, act, residual) -> torch.Tensor:
    """The group_norm_act kernel, or (measured, where faster) torch's GroupNorm [+ residual] [+ ReLU]."""
    if not measured:  # the hot path of kernels="triton": no closures, no layout probe
        return kernels.group_norm_act(x, num_groups, weight, bias, eps, act, residual)

    def torch_path() -> torch.Tensor:
        out = nn.functional.group_norm(x, num_groups, weight, bias, eps)
        out = out if residual is None else out + residual
        return torch.relu(out) if act == "relu" else out

    return dispatch.run(
        "group_norm_act",
        True,
        lambda: kernels.group_norm_act(x, num_groups, weight, bias, eps, act, residual),
        torch_path,
        (x, residual),
        (num_groups, act, x.is_contiguous(memory_format=torch.channels_last)),
    )


class FastWeightStandardizedConv2d(nn.Module):
    """Weight-standardized conv whose standardized weight comes from the Triton kernel.

    The kernel standardizes the weight every call (under autograd when the weight needs a gradient);
    a frozen model (weight_cache.freeze) computes it once and then runs one convolution per call.
    """

    def __init__(self, reference: nn.Conv2d) -> None:
        super().__init__()
        self.weight, self.bias = reference.weight, reference.bias
        self.pad = reference.pad
        self.stride, self.padding, self.dilation = reference.stride, reference.padding, reference.dilation
        self.groups, self.eps = reference.groups, reference.eps
        self.out_channels = reference.out_channels
        self._standardized = DerivedWeightCache()
        self.measured = False

    def standardized_weight(self) -> torch.Tensor:
        def compute() -> torch.Tensor:
            return dispatch.run(
                "weight_standardize",
                self.measured,
                lambda: kernels.weight_standardize(self.weight, self.eps),
                lambda: kernels.weight_standardize.reference(self.weight, self.eps),
                (self.weight,),
            )

        return self._standardized.get(compute, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = self.pad(x)
        return nn.functional.conv2d(
            x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups
        )


class FastGroupNormActivation(nn.Module):
    """GroupNorm (+ ReLU) in the Triton group_norm_act kernel; other activations run after it."""

    def __init__(self, reference: nn.GroupNorm) -> None:
        super().__init__()
        self.weight, self.bias = reference.weight, reference.bias
        self.num_groups, self.num_channels, self.eps = reference.num_groups, reference.num_channels, reference.eps
        self.activation = reference.activation
        self.fused_act = "relu" if _is_relu(self.activation) else None
        self.measured = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        out = group_norm_act(self.measured, x, self.num_groups, self.weight, self.bias, self.eps, self.fused_act,
                             residual)  # fmt: skip
        if self.fused_act is None and not isinstance(self.activation, nn.Identity):
            out = self.activation(out)
        return out


class FastBottleneckLayer(nn.Module):
    """Post-activation bottleneck with norm3 + shortcut + ReLU in one group_norm_act pass."""

    def __init__(self, reference: nn.Module) -> None:
        super().__init__()
        for name in ("downsample", "conv1", "norm1", "conv2", "norm2", "conv3", "norm3", "drop_path", "activation"):
            setattr(self, name, getattr(reference, name))
        self.measured = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm2(self.conv2(self.norm1(self.conv1(x))))
        x = self.conv3(x)
        drop_path_active = self.training and getattr(self.drop_path, "drop_prob", 0.0) > 0
        norm3 = self.norm3
        if drop_path_active or not _is_relu(self.activation) or not _unhooked(norm3, self.activation):
            return self.activation(self.drop_path(norm3(x)) + shortcut)
        weight, bias = norm3.weight, norm3.bias
        return group_norm_act(self.measured, x, norm3.num_groups, weight, bias, norm3.eps, "relu", shortcut)


class FastBitEmbeddings(nn.Module):
    """transformers' BiT stem (conv → pad → GroupNorm + act → SAME max pool), pooling without the padded copy
    of the stem output when a ReLU feeds the pool (backbone.BitMaxPool2d; our own stem does so unpatched).
    Same values; the pool module stays transformers' (its settings are read, never changed)."""

    def __init__(self, reference: nn.Module) -> None:
        super().__init__()
        self.convolution, self.pad, self.norm = reference.convolution, reference.pad, reference.norm
        self.pooler, self.num_channels = reference.pooler, reference.num_channels
        pool = self.pooler
        self.pad_free_pool = (
            _ends_in_relu(self.norm)
            and not isinstance(pool.pad, nn.Identity)  # a dynamic SAME pad, as the hub model's
            and tuple(pool.padding) == (0, 0) and tuple(pool.dilation) == (1, 1) and not pool.ceil_mode
            and pool.kernel_size[0] == pool.kernel_size[1] and pool.stride[0] == pool.stride[1]
            and getattr(pool.pad, "value", 0) == 0
        )  # fmt: skip

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                "Make sure that the channel dimension of the pixel values match with the one set in the configuration."
            )  # transformers' words
        x = self.norm(self.pad(self.convolution(pixel_values)))
        pool = self.pooler
        if self.pad_free_pool and _unhooked(pool):  # a hooked pool is called (the hook sees its call)
            padding = implicit_same_padding(x, pool.kernel_size[0], pool.stride[0])
            if padding is not None:
                return nn.functional.max_pool2d(x, pool.kernel_size, pool.stride, padding, pool.dilation, True)
        return pool(x)


def _ends_in_relu(norm: nn.Module) -> bool:
    """Whether the stem's norm module ends in a ReLU (a swapped FastGroupNormActivation or a BiT one)."""
    if isinstance(norm, FastGroupNormActivation):
        return norm.fused_act == "relu"
    return isinstance(getattr(norm, "activation", None), nn.ReLU)
