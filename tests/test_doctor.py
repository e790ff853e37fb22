"""`vithybrid-fast doctor` and the rule for GPUs below sm_80 (vithybrid_fast/gpu_support.py).

Old GPUs are faked by monkeypatching torch.cuda (is_available, get_device_capability, get_device_name,
get_device_properties) with TRITON_INTERPRET unset, so the rule is exercised as a T4 / A100 host sees it.
The --check / --drift runs use the tiny config under the Triton interpreter (float32: seconds).
The kernels (and triton) are imported at the top, while conftest's TRITON_INTERPRET=1 holds: fake_gpu
unsets it, and a kernel module first imported then would be built for a GPU this machine lacks.
"""

from __future__ import annotations

import math
import types
import warnings

import pytest
import torch
from tolerance import ATOL as TEST_ATOL
from vithybrid_fast.kernels._runtime import triton_can_run

from vithybrid_fast import diagnostics, gpu_support
from vithybrid_fast.cli import main
from vithybrid_fast.patching import resolve_kernels, validate_kernels

# written out, not read from doctor.KERNEL_NAMES: a kernel dropped there must fail here
EVERY_KERNEL = ("flash_attention", "weight_standardize", "group_norm_act", "layer_norm_mlp", "fused_linear",
                "add_layer_norm")  # fmt: skip

CUDA = torch.device("cuda")


def fake_gpu(monkeypatch, name: str, capability: tuple[int, int]) -> None:
    """Make this process look like a host with one `name` GPU and no Triton interpreter."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    props = types.SimpleNamespace(name=name, major=capability[0], minor=capability[1],
                                  total_memory=16 * 2**30, multi_processor_count=40)  # fmt: skip
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)


# -- GPUs below sm_80 -------------------------------------------------------------------------------
@pytest.mark.parametrize("name,capability", [("Tesla T4", (7, 5)), ("Tesla V100-SXM2-16GB", (7, 0))])
def test_auto_takes_sdpa_below_sm80_and_says_why(monkeypatch, name, capability):
    fake_gpu(monkeypatch, name, capability)
    with pytest.warns(gpu_support.KernelFallbackWarning) as caught:
        choice = resolve_kernels("auto", CUDA)
    assert choice == {"attention": "sdpa", "mlp": "torch", "backbone": "torch"}
    (warning,) = caught
    text = str(warning.message)
    sm = f"sm_{capability[0]}{capability[1]}"
    assert text.startswith('kernels="auto" uses torch SDPA:') and name in text and sm in text and "sm_80" in text
    assert text.count(". ") == 0 and text.endswith(".")  # one sentence


def test_auto_on_a_gpu_with_the_interpreter_set_takes_sdpa_and_says_why(monkeypatch):
    """TRITON_INTERPRET left set from a test run made "auto" run every kernel in the CPU interpreter."""
    from vithybrid_fast.doctor import kernel_lines

    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0))
    assert resolve_kernels("auto", CUDA) == dict.fromkeys(("attention", "mlp", "backbone"), "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.warns(gpu_support.KernelFallbackWarning, match="TRITON_INTERPRET is set, so the Triton kernels"):
        assert resolve_kernels("auto", CUDA) == {"attention": "sdpa", "mlp": "torch", "backbone": "torch"}
    lines, _ = kernel_lines(CUDA)
    assert lines[-1] == 'kernels="auto" here: sdpa (TRITON_INTERPRET is set)'


def test_triton_below_sm80_raises_a_clear_error(monkeypatch):
    fake_gpu(monkeypatch, "Tesla T4", (7, 5))
    assert not triton_can_run(CUDA) and not triton_can_run(None)
    with pytest.raises(RuntimeError, match=r"kernels='triton' cannot run on cuda: Tesla T4 .* 7\.5 \(sm_75\)"):
        validate_kernels("triton", CUDA)
    with pytest.raises(RuntimeError, match="sm_80 or newer"):
        validate_kernels({"attention": "triton"}, CUDA)


@pytest.mark.parametrize("name,capability", [("NVIDIA A100-SXM4-80GB", (8, 0)), ("NVIDIA H100 80GB HBM3", (9, 0))])
def test_ampere_and_hopper_get_triton(monkeypatch, name, capability):
    fake_gpu(monkeypatch, name, capability)
    assert triton_can_run(CUDA)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        assert resolve_kernels("auto", CUDA) == dict.fromkeys(("attention", "mlp", "backbone"), "triton")
        assert validate_kernels("triton", CUDA)["attention"] == "triton"
    assert gpu_support.gpu_too_old_reason(CUDA) is None


def test_cpu_without_interpreter_falls_back_silently(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_kernels("auto", torch.device("cpu"))["attention"] == "sdpa"
    with pytest.raises(RuntimeError, match="cannot run on cpu: device cpu is not a CUDA GPU"):
        validate_kernels("triton", torch.device("cpu"))
    assert gpu_support.gpu_too_old_reason(torch.device("cpu")) is None


# -- the doctor's report ----------------------------------------------------------------------------
def test_doctor_reports_versions_and_interpreted_kernels(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out.splitlines()
    heads = [line.split()[0] for line in out]
    for field in ("python", "torch", "triton", "driver", "gpu", "device"):
        assert field in heads, out
    torch_line = out[heads.index("torch")]
    assert torch.__version__ in torch_line and "CUDA runtime" in torch_line and "cuDNN" in torch_line
    if not torch.cuda.is_available():  # conftest turned the interpreter on
        for kernel in EVERY_KERNEL:
            assert any(line.split()[:2] == [kernel, "yes,"] and "interpreted" in line for line in out), out
    assert out[-1].startswith("verdict: Triton kernels can run on ")


def test_doctor_on_a_fake_t4_names_the_reason(monkeypatch, capsys):
    fake_gpu(monkeypatch, "Tesla T4", (7, 5))
    assert main(["doctor", "--check"]) == 0  # nothing it could check: not a failure
    out = capsys.readouterr().out
    assert "gpu 0    Tesla T4, compute capability 7.5 (sm_75), 16.0 GiB, 40 SMs" in out
    assert "flash_attention      no: Tesla T4 has compute capability 7.5 (sm_75)" in out
    assert 'kernels="auto" here: sdpa (Tesla T4 has compute capability 7.5' in out
    last = out.splitlines()[-1]
    assert last.startswith("verdict: Triton kernels cannot run here (Tesla T4") and "uses torch SDPA" in last


def test_check_row_arithmetic():
    ref = torch.tensor([1.0, -2.0], dtype=torch.float64)
    row = diagnostics.compare("k", "c", ref.float() + 2**-17, ref.float() + 2**-19, ref)  # exact in float32
    assert row.ratio == 4.0 and row.dtype == "float32"
    assert math.isclose(row.bound, 2 * 2**-19 + 1e-5 * 2.0) and row.ok  # 2 × torch err + atol·max|ref|
    bad = diagnostics.compare("k", "c", ref.float() + 1e-3, ref.float(), ref)
    assert bad.ratio == math.inf and not bad.ok
    assert diagnostics.ATOL == TEST_ATOL  # one tolerance idiom for tests and doctor


TINY = ["--dtypes", "float32", "--config", "tiny", "--batch", "1"]  # interpreted on a CPU, compiled on a GPU


def test_check_passes_on_the_tiny_config(capsys):
    assert main(["doctor", "--check", *TINY]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()]
    checked = {r[0] for r in rows if r and r[-1] == "yes"}
    assert set(EVERY_KERNEL) <= checked
    model_rows = [r for r in rows if r[:2] == ["model", "forward"]]
    assert len(model_rows) == 1 and model_rows[0][-1] == "yes"
    assert not [r for r in rows if r and r[-1] == "NO"]
    assert out.splitlines()[-1].startswith("verdict: OK: all ") and "checks within the tolerance" in out


def test_a_wrong_kernel_fails_the_check_and_tops_the_drift(monkeypatch, capsys):
    import vithybrid_fast.kernels as kernels

    real = kernels.layer_norm_mlp

    def off_by_one_percent(*args, **kwargs):
        return real(*args, **kwargs) * 1.01

    off_by_one_percent.reference = real.reference
    monkeypatch.setattr(kernels, "layer_norm_mlp", off_by_one_percent)
    assert main(["doctor", "--check", "--drift", *TINY]) == 1
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines]
    checks = {r[0]: r for r in rows if len(r) > 3 and r[-1] in ("yes", "NO")}  # the table's rows
    assert checks["layer_norm_mlp"][-1] == "NO" and float(checks["layer_norm_mlp"][-2]) > 1  # error over the bound
    assert checks["weight_standardize"][-1] == "yes"  # the other kernels still pass
    families = {r[0]: r for r in rows if len(r) > 2 and r[1:3] == ["(all", "layers)"]}
    assert set(families) == {"attention", "mlp", "backbone"}
    shares = {name: float(r[4].rstrip("%")) for name, r in families.items()}
    assert math.isclose(sum(shares.values()), 100.0, abs_tol=0.5) and max(shares, key=shares.get) == "mlp"
    assert any(line.startswith("largest single-layer drift: mlp encoder.layer.") for line in lines), lines
    assert lines[-1].startswith("verdict: FAIL: ") and "layer_norm_mlp float32" in lines[-1]


def test_checks_use_the_models_own_shapes():
    """On a GPU the checks run at the hub model's shapes: recorded by a meta-device forward (no memory)."""
    from vithybrid_fast.bench.e2e import base_config

    shapes = diagnostics.model_shapes(base_config(), batch=2)
    assert shapes.tokens == (2, 577, 768) and shapes.heads == 12 and shapes.intermediate == 3072
    assert shapes.conv_weights[0] == (64, 3, 7, 7) and max(shapes.conv_weights, key=math.prod) == (256, 256, 3, 3)
    assert len(shapes.group_norms) == 1 + 3 * 3 + 4 * 3 + 9 * 3 + 3  # stem, 3 per block, 3 downsample norms
    assert max(shapes.group_norms, key=lambda g: math.prod(g[0]))[0] == (2, 64, 192, 192)
    assert shapes.group_norms[-1] == ((2, 1024, 24, 24), 32, 1e-5)
    assert shapes.layer_norm_eps == 1e-12


def test_a_head_size_the_kernel_lacks_is_said_not_checked():
    from vithybrid_fast.bench.e2e import tiny_config  # head size 16: the model runs SDPA there

    notes: list[str] = []
    shapes = diagnostics.model_shapes(tiny_config(), batch=1)
    checks = diagnostics.kernel_checks(shapes, torch.device("cpu"), log=notes.append)
    assert {kernel for kernel, _, _ in checks} == {"weight_standardize", "group_norm_act", "layer_norm_mlp",
                                                   "fused_linear", "add_layer_norm"}  # fmt: skip
    assert len(notes) == 1 and notes[0].startswith("flash_attention: not checked: head size 16")


# -- kernels="triton" on a float32 model on a GPU: measured slower there, so said at patch time --------
@pytest.mark.parametrize(
    "kernels, dtype, device, families",
    [
        ("triton", torch.float32, CUDA, "attention and mlp"),
        ({"mlp": "triton"}, torch.float32, CUDA, "mlp"),
        ({"attention": "triton", "backbone": "triton"}, torch.float32, CUDA, "attention"),
        ("auto", torch.float32, CUDA, None),  # measured per op: never slower than torch
        ({"backbone": "triton"}, torch.float32, CUDA, None),  # no GEMM: no TF32 speed given up
        ("triton", torch.bfloat16, CUDA, None),
        ("triton", torch.float32, torch.device("cpu"), None),  # the interpreter: no speed is promised
        ("sdpa", torch.float32, CUDA, None),
    ],
)
def test_float32_triton_warning_only_for_unmeasured_float32_gemms_on_a_gpu(kernels, dtype, device, families):
    from vithybrid_fast.patching import float32_triton_warning

    choice = {"attention": "triton", "mlp": "triton", "backbone": "triton"} if kernels in ("triton", "auto") else (
        resolve_kernels(kernels, torch.device("cpu")) if isinstance(kernels, str) else kernels)  # fmt: skip
    text = float32_triton_warning(kernels, choice, device, dtype)
    if families is None:
        assert text is None
    else:
        assert text is not None and f"the Triton {families} kernels" in text and "kernels='auto'" in text
        assert "3.7x slower" in text and "nvidia-h100-2026-11-26-fp32.md" in text


def test_patch_warns_for_float32_triton_on_a_gpu(monkeypatch):
    """patch() itself warns (once per call), for a model whose weights sit on a GPU in float32."""
    import vithybrid_fast as vf
    from tests.hf_reference import tiny_config
    from vithybrid_fast import patching

    model = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(
        tiny_config(hidden_size=64, num_attention_heads=2, intermediate_size=80)))  # fmt: skip
    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0))
    monkeypatch.setattr(patching, "_model_device", lambda m: CUDA)  # the weights stay on the CPU: no run
    with pytest.warns(patching.SlowFloat32Warning, match="the Triton attention and mlp kernels") as seen:
        vf.patch(model, "triton")
    assert len([w for w in seen if w.category is patching.SlowFloat32Warning]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vf.patch(model, "auto")  # measured per op: no warning
        vf.patch(model.to(torch.bfloat16), "triton")


def test_autocast_training_patches_a_float32_model_without_the_warning(monkeypatch):
    """finetune and the training benchmark keep float32 weights and step under autocast: the fused GEMMs step
    aside there, so the float32 warning would mislead them (it did, in the H200 training benchmark)."""
    import vithybrid_fast as vf
    from tests.hf_reference import tiny_config
    from vithybrid_fast import patching
    from vithybrid_fast.fast import FastSelfAttention

    model = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(
        tiny_config(hidden_size=64, num_attention_heads=2, intermediate_size=80)))  # fmt: skip
    fake_gpu(monkeypatch, "NVIDIA H200", (9, 0))
    monkeypatch.setattr(patching, "_model_device", lambda m: CUDA)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dtype in (torch.bfloat16, torch.float16):
            assert patching.patch_for_autocast(model, "triton", dtype) is model
    assert any(isinstance(m, FastSelfAttention) for m in model.modules())  # it did patch
    with pytest.warns(patching.SlowFloat32Warning, match="Under torch.autocast this does not apply"):
        patching.patch_for_autocast(model, "triton", torch.float32)  # no autocast: the warning stands


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "/nonexistent"], "error: --model: options of --check / --drift, given without them\n"),
        (
            ["--config", "base", "--batch", "2"],
            "error: --config, --batch: options of --check / --drift, given without them\n",
        ),
        (["--check", "--drift-dtype", "float16"], "error: --drift-dtype: an option of --drift, given without it\n"),
    ],
)
def test_options_of_the_checks_without_them_are_usage_errors(argv, message, capsys):
    """The second audit: `doctor --model /nonexistent` exited 0 with the usual verdict (ignored)."""
    from vithybrid_fast.cli import main

    assert main(["doctor", *argv]) == 2
    assert capsys.readouterr().err == message
