"""The patched model under torch.autocast, as `finetune` runs it (bf16, or fp16 on older GPUs).

Autocast casts the inputs of torch's ops, not of custom ops. Before, the fused LayerNorm+GEMM kernels got
the float32 residual stream and float32 weights and ran IEEE-float32 GEMMs (no tensor cores; read from the
code, never timed), or refused a bf16 input beside float32 weights (a model whose attention falls back to SDPA). Now
the encoder's GEMMs run as torch's ops under autocast; flash attention and the backbone kernels still run.
"""

from __future__ import annotations

import copy

import pytest
import torch

import vithybrid_fast as vf
import vithybrid_fast.fast as fast
from tests.hf_reference import randomize_, tiny_config
from tests.tolerance import assert_close_to_reference
from vithybrid_fast import kernels

pytestmark = pytest.mark.filterwarnings("ignore:flash_attention supports head sizes")  # the head-16 case, on purpose

CONFIGS = {
    "flash attention (head size 32)": tiny_config(hidden_size=64, num_attention_heads=2),
    "SDPA after the fused QKV (head size 16)": tiny_config(),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
    torch.manual_seed(0)
    model = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(CONFIGS[request.param]))
    randomize_(model)
    return model.eval()


def count_calls(monkeypatch):
    calls = {"fused_linear": 0, "layer_norm_mlp": 0, "flash_attention": 0, "add_layer_norm_train": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(fast, "fused_linear", counted("fused_linear", fast.fused_linear))
    monkeypatch.setattr(kernels, "layer_norm_mlp", counted("layer_norm_mlp", kernels.layer_norm_mlp))
    # the encoder's attention calls the packed entry point (one gradient tensor for q, k, v)
    monkeypatch.setattr(kernels, "flash_attention_packed", counted("flash_attention", kernels.flash_attention_packed))
    glue = counted("add_layer_norm_train", kernels.add_layer_norm_train)
    monkeypatch.setattr(kernels, "add_layer_norm_train", glue)
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_and_backward_match_torch_under_the_same_autocast(model, device, dtype, monkeypatch):
    reference = copy.deepcopy(model).to(device).train()
    patched = vf.patch(copy.deepcopy(model).to(device).train(), "triton")
    pixels = torch.randn(2, 3, 72, 72, generator=torch.Generator().manual_seed(1)).to(device)
    labels = torch.tensor([0, 3], device=device)
    with torch.no_grad():
        exact = reference(pixels).logits  # float32, no autocast: the yardstick of both

    calls = count_calls(monkeypatch)
    outputs = {}
    for name, net in (("torch", reference), ("ours", patched)):
        with torch.autocast(torch.device(device).type, dtype=dtype):
            out = net(pixels, labels=labels)
        out.loss.backward()
        outputs[name] = out.logits.float().detach()
    assert calls["fused_linear"] == 0 and calls["layer_norm_mlp"] == 0, calls  # autocast: torch's GEMMs
    uses_flash = model.config.hidden_size // model.config.num_attention_heads == 32
    assert (calls["flash_attention"] > 0) == uses_flash, calls  # the attention kernel still runs
    assert calls["add_layer_norm_train"] == 2 * model.config.num_hidden_layers, calls  # the glue: 2 per layer
    assert_close_to_reference(outputs["ours"], outputs["torch"], exact, dtype, what="logits under autocast")
    for (name, p), (_, q) in zip(patched.named_parameters(), reference.named_parameters(), strict=True):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert q.grad is not None, name


def test_without_autocast_the_fused_kernels_run(model, device, monkeypatch):
    patched = vf.patch(copy.deepcopy(model).to(device), "triton")
    calls = count_calls(monkeypatch)
    with torch.no_grad():
        patched(torch.randn(1, 3, 72, 72).to(device))
    assert calls["fused_linear"] > 0 and calls["layer_norm_mlp"] > 0, calls


def test_autocast_gradients_with_the_glue_kernels_as_close_as_torchs(device, monkeypatch):
    """A training step's every gradient under bf16 autocast, ours (add_layer_norm_train as the glue) and
    torch's, against float32 without autocast; and ours with the glue switched off (bench_train's A/B) runs
    none. One config, one dtype: the kernel tests take fp16 and the other layouts, this is the wiring."""
    dtype = torch.bfloat16
    torch.manual_seed(0)
    model = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(CONFIGS["flash attention (head size 32)"]))
    randomize_(model)
    pixels = torch.randn(2, 3, 72, 72, generator=torch.Generator().manual_seed(2)).to(device)
    labels = torch.tensor([1, 2], device=device)

    def gradients(net, autocast):
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=autocast):
            net(pixels, labels=labels).loss.backward()
        return torch.cat([p.grad.flatten().double() for p in net.parameters()])

    exact = gradients(copy.deepcopy(model).to(device).train(), autocast=False)
    torchs = gradients(copy.deepcopy(model).to(device).train(), autocast=True)
    calls = count_calls(monkeypatch)
    ours = gradients(vf.patch(copy.deepcopy(model).to(device).train(), "triton"), autocast=True)
    assert calls["add_layer_norm_train"] == 2 * model.config.num_hidden_layers, calls
    assert_close_to_reference(ours, torchs, exact, dtype, what="gradients under autocast")

    patched = vf.patch(copy.deepcopy(model).to(device).train(), "triton")
    for layer in patched.modules():
        if isinstance(layer, fast.FastViTLayer):
            layer.autocast_glue_kernels = False
    calls["add_layer_norm_train"] = 0
    unglued = gradients(patched, autocast=True)
    assert calls["add_layer_norm_train"] == 0
    assert_close_to_reference(unglued, torchs, exact, dtype, what="gradients, glue off")
