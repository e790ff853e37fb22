"""flash_attention_packed: the encoder's attention over a packed (B, N, 3, H, D) QKV projection.

Why it exists: given q, k, v as three views of one packed tensor, autograd turns their three gradients
into one by filling a zero tensor of the packed size per view and adding them. An H100's bf16 training
step at batch 64 spent 6.0 ms in 40 such bf16 adds and 2.0 ms in fills (bench/results/
nvidia-h100-2026-11-27-notes.md); a CPU profile of the same step counts 2 of the adds per encoder layer.
The packed op's backward writes dq, dk, dv straight into the three slices of one gradient tensor.
"""

from __future__ import annotations

import pytest
import torch
from tolerance import assert_close_to_reference
from torch.utils._python_dispatch import TorchDispatchMode
from vithybrid_fast.kernels.attention import flash_attention, flash_attention_packed, reference_packed

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
pytestmark = [  # padded key rows of the dK/dV tiles, computed and discarded by design (test_kernel_attention)
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]


def _packed(shape, dtype, device, seed=0):
    """A leaf (B, N, 3, H, D) view of a (B, N, 3·H·D) projection output, as the encoder makes it."""
    B, N, H, D = shape
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn((B, N, 3 * H * D), generator=g).to(device=device, dtype=dtype)
    return flat.view(B, N, 3, H, D).requires_grad_()


def _eager(qkv):
    """Plain torch in qkv.dtype over the three views: what the model runs without our kernel."""
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v


@pytest.mark.parametrize("shape", [(2, 50, 3, 32), (1, 1, 2, 64), (1, 65, 1, 128)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_output_and_gradient_match_plain_torch_against_float64(shape, dtype, device):
    qkv = _packed(shape, dtype, device)
    out = flash_attention_packed(qkv)
    assert out.shape == (shape[0], shape[2], shape[1], shape[3]) and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous()  # token-major, as flash_attention's
    torch_out = _eager(qkv)
    ref_qkv = qkv.detach().double().requires_grad_()
    ref_out = reference_packed(ref_qkv)
    assert_close_to_reference(out, torch_out, ref_out, dtype, what="output")

    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    (dqkv,) = torch.autograd.grad(out, qkv, grad)
    (torch_dqkv,) = torch.autograd.grad(torch_out, qkv, grad)
    (ref_dqkv,) = torch.autograd.grad(ref_out, ref_qkv, grad.double())
    assert dqkv.shape == qkv.shape and dqkv.dtype == dtype
    assert_close_to_reference(dqkv, torch_dqkv, ref_dqkv, dtype, what="dqkv")  # every slice written


def test_same_result_as_flash_attention_on_the_views(device):
    qkv = _packed((2, 37, 2, 32), torch.float32, device, seed=3)
    views = [qkv[:, :, i].transpose(1, 2) for i in range(3)]
    out, out_views = flash_attention_packed(qkv), flash_attention(*views)
    torch.testing.assert_close(out, out_views, rtol=0, atol=0)  # the same kernels on the same memory
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    (packed_grad,) = torch.autograd.grad(out, qkv, grad.to(device))
    (views_grad,) = torch.autograd.grad(out_views, qkv, grad.to(device))
    torch.testing.assert_close(packed_grad, views_grad, rtol=0, atol=0)


class _OpLog(TorchDispatchMode):
    """Records (op name, output shape) for every aten op dispatched inside."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if isinstance(result, torch.Tensor):
            self.ops.append((func.overloadpacket.__name__, tuple(result.shape)))
        return result


def _backward_ops(attend, qkv: torch.Tensor) -> list[str]:
    """The aten ops that produce a tensor of qkv's size while the backward runs."""
    out = attend(qkv)
    grad = torch.ones_like(out)
    with _OpLog() as log:
        out.backward(grad)
    return [name for name, shape in log.ops if shape == tuple(qkv.shape)]


def test_the_gradient_is_one_tensor_with_no_fills_or_adds(device):
    shape = (2, 17, 3, 32)

    def attend_views(qkv):
        return flash_attention(*(qkv[:, :, i].transpose(1, 2) for i in range(3)))

    # The views' path, as the model ran before: autograd builds the packed gradient from three pieces.
    views_ops = _backward_ops(attend_views, _packed(shape, torch.float32, device))
    assert sum(name in ("add", "add_") for name in views_ops) >= 2, views_ops
    packed_ops = _backward_ops(flash_attention_packed, _packed(shape, torch.float32, device))
    assert not any(name in ("add", "add_", "zeros", "zero_", "fill_", "new_zeros") for name in packed_ops), packed_ops


def test_torch_compile_traces_one_node_and_its_backward(device):
    B, N, H, D = 2, 50, 2, 32
    g = torch.Generator().manual_seed(0)
    x = torch.randn((B, N, H * D), generator=g).to(device)
    weight = (torch.randn((3 * H * D, H * D), generator=g) * (H * D) ** -0.5).to(device)

    def block(x, weight):
        qkv = (x @ weight.T).view(B, N, 3, H, D)
        return flash_attention_packed(qkv).transpose(1, 2).reshape(B, N, H * D)

    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    expected = block(x, weight)
    torch.testing.assert_close(torch.compile(block, fullgraph=True, backend=recording_backend)(x, weight), expected)
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert sum("vithybrid.flash_attention_packed" in t for t in targets) == 1, targets

    weight_eager, weight_compiled = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    block(x, weight_eager).square().sum().backward()
    torch.compile(block, fullgraph=True, backend="aot_eager")(x, weight_compiled).square().sum().backward()
    torch.testing.assert_close(weight_compiled.grad, weight_eager.grad, rtol=1e-5, atol=1e-6)
    weight_exact = weight.double().requires_grad_()
    qkv = (x.double() @ weight_exact.T).view(B, N, 3, H, D)
    reference_packed(qkv).transpose(1, 2).reshape(B, N, H * D).square().sum().backward()
    torch.testing.assert_close(weight_eager.grad.double(), weight_exact.grad, rtol=1e-4, atol=1e-4)


def test_opcheck(device):
    qkv = torch.randn(1, 37, 3, 2, 32, device=device, requires_grad=True)
    result = torch.library.opcheck(torch.ops.vithybrid.flash_attention_packed.default, (qkv, 32**-0.5))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((2, 8, 3, 2), "qkv must be a 5-D (B, N, 3, H, D) tensor, got (2, 8, 3, 2)"),
        ((2, 8, 2, 2, 32), "qkv must be a 5-D (B, N, 3, H, D) tensor, got (2, 8, 2, 2, 32)"),
        ((2, 8, 3, 2, 48), "head dim D=48 is not supported"),
    ],
)
def test_rejects_what_it_cannot_run(shape, message, device):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        flash_attention_packed(torch.randn(shape, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS[1:])
def test_vit_base_batch_on_gpu(dtype, device):
    # the encoder's shape at batch 8: the autotuned GPU configs, dq/dk/dv written into one packed tensor
    qkv = _packed((8, 577, 12, 64), dtype, device, seed=5)
    out = flash_attention_packed(qkv)
    ref_qkv = qkv.detach().double().requires_grad_()
    ref_out = reference_packed(ref_qkv)
    assert_close_to_reference(out, _eager(qkv), ref_out, dtype, what="output")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(device=device, dtype=dtype)
    (dqkv,) = torch.autograd.grad(out, qkv, grad)
    (torch_dqkv,) = torch.autograd.grad(_eager(qkv), qkv, grad)
    (ref_dqkv,) = torch.autograd.grad(ref_out, ref_qkv, grad.double())
    assert_close_to_reference(dqkv, torch_dqkv, ref_dqkv, dtype, what="dqkv")


def test_the_patched_encoder_trains_through_the_packed_op(device):
    """The fast attention module calls the packed op, so a training step's backward builds no packed
    gradient from pieces (the model-level half of the test above)."""
    import vithybrid_fast as vf
    from tests.hf_reference import tiny_config

    config = vf.ViTHybridConfig.from_dict(tiny_config(hidden_size=64, num_attention_heads=2))  # head size 32
    torch.manual_seed(0)
    # patched where it runs: patch() checks that Triton can run on the model's device (a CPU model on a GPU
    # machine has none, where the interpreter is off)
    model = vf.patch(vf.ViTHybridForImageClassification(config).to(device), {"attention": "triton"}).train()
    pixels = torch.randn(2, 3, config.image_size, config.image_size, device=device)
    loss = model(pixels, labels=torch.tensor([1, 4], device=device)).loss
    with _OpLog() as log:
        loss.backward()
    packed = [shape for name, shape in log.ops if len(shape) == 5 and shape[2] == 3 and shape[3] == 2]
    assert packed, "no packed (B, N, 3, H, D) gradient was made: the op under test did not run"
    adds = [(name, shape) for name, shape in log.ops if name in ("add", "add_") and shape in packed]
    assert not adds, adds
