"""Export: ONNX files verified in ONNX Runtime against PyTorch, and torch.export programs.

Tiny config (72², 5×5 tokens) for every mode; the base config (384², random weights) once in fp32.
The dynamic-size file is run at sizes other than the one it was traced at, odd ones included, and
compared with the PyTorch model's own interpolate_pos_encoding path (F.interpolate on the real grid).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import warnings

import pytest
import torch

import vithybrid_fast as vf
from tests.hf_reference import randomize_, tiny_config
from vithybrid_fast import export as vf_export
from vithybrid_fast.export import OnnxVerificationError, export_onnx, export_program
from vithybrid_fast.export_dynamic_size import bicubic_matrix

onnx = pytest.importorskip("onnx", reason="the [export] extra is not installed")
ort = pytest.importorskip("onnxruntime", reason="the [export] extra is not installed")


@pytest.fixture(scope="module")
def tiny_model() -> vf.ViTHybridForImageClassification:
    torch.manual_seed(0)
    model = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(tiny_config())).eval()
    randomize_(model)
    return model


def _ort_logits(path, pixels: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"pixel_values": pixels.numpy()})[0])


def _uniform(*shape: int, seed: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_fp32_dynamic_batch_names_metadata_and_report(tiny_model, tmp_path):
    path = tmp_path / "tiny.onnx"
    report = export_onnx(tiny_model, path)
    assert report.max_abs_diff <= 1e-4 and report.bound == 1e-4 + 1e-5 * report.largest_logit
    assert 0 < report.largest_logit < 100
    assert report.inputs == 5  # photo + random batches of 1 and 3
    assert report.summary() == f"onnx: max|Δlogit| {report.max_abs_diff:.2e} over 5 inputs"

    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["pixel_values"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value"), "batch must be symbolic"
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["id2label"]) == {str(i): f"class_{i}" for i in range(7)}
    assert json.loads(meta["label2id"])["class_3"] == 3
    assert meta["image_size"] == "72x72" and meta["dtype"] == "float32"
    assert not any(node.domain.startswith("vithybrid") for node in proto.graph.node)

    pixels = _uniform(4, 3, 72, 72, seed=1)  # a batch size the verification did not use
    with torch.no_grad():
        expected = tiny_model(pixels).logits
    diff = (_ort_logits(path, pixels) - expected).abs().max().item()
    assert diff <= 1e-4, diff


def test_dynamic_size_matches_pytorch_at_other_sizes(tiny_model, tmp_path):
    path = tmp_path / "dynamic.onnx"
    report = export_onnx(tiny_model, path, image_size="dynamic")
    assert report.inputs == 7 and report.max_abs_diff <= 1e-4, report.checks
    assert any("101×58" in what for what, _ in report.checks), report.checks
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]  # not the exporter's "s100"
    # 88×72 → 6×5 tokens; 105×56 → 7×4 (odd height: asymmetric SAME padding); 40×40 → 3×3
    for seed, (height, width) in enumerate([(88, 72), (105, 56), (40, 40)]):
        pixels = _uniform(2, 3, height, width, seed=seed)
        with torch.no_grad():
            expected = tiny_model(pixels, interpolate_pos_encoding=True).logits
        diff = (_ort_logits(path, pixels) - expected).abs().max().item()
        assert diff <= 1e-4, f"{height}×{width}: max |Δlogit| {diff:.2e}"


def test_patched_model_exports_its_reference_path(tiny_model, tmp_path, device):
    # on the device the kernels run on: natively a GPU (Triton does not run CPU tensors there)
    patched = vf.patch(copy.deepcopy(tiny_model).to(device), {"backbone": "triton", "mlp": "triton"})
    path = tmp_path / "patched.onnx"
    report = export_onnx(patched, path, batch=2, image_size=(80, 64), hidden_states=True)
    assert report.max_abs_diff <= 1e-4, report.checks
    assert vf.patching.patched_modules(patched), "the caller's model must stay patched"
    proto = onnx.load(str(path))
    assert not any(node.domain.startswith("vithybrid") for node in proto.graph.node)
    assert [o.name for o in proto.graph.output] == ["logits", "hidden_states"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pixels = _uniform(2, 3, 80, 64, seed=5)
    logits, states = session.run(None, {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        out = tiny_model(pixels, interpolate_pos_encoding=True, output_hidden_states=True)
    assert states.shape == (3, 2, 1 + 5 * 4, 48)  # layers+1, batch, CLS + 5×4 tokens (80×64 px), hidden
    assert (torch.from_numpy(states) - torch.stack(out.hidden_states)).abs().max().item() <= 1e-4
    assert (torch.from_numpy(logits) - out.logits).abs().max().item() <= 1e-4


def test_float16_within_its_stated_bound(tiny_model, tmp_path):
    report = export_onnx(tiny_model, tmp_path / "half.onnx", batch=1, dtype=torch.float16)
    # the bound: 2 × PyTorch fp16's own error + 2e-3 · max(1, max|logit|); it must be a real bound
    assert 1e-4 < report.bound < 0.1, report.bound
    assert report.max_abs_diff <= report.bound, report.checks
    proto = onnx.load(str(tmp_path / "half.onnx"))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_float16_logits_that_overflow_are_refused_and_large_float32_logits_pass(tiny_model, tmp_path):
    """An audit's float16 export whose logits overflow float16 (inf in ONNX Runtime and in PyTorch float16)
    passed: the bound was inf too, and inf <= inf. A float32 head with logits in the thousands was refused
    by a fixed 1e-4 for ordinary float32 rounding (~1e-6 relative)."""
    big = copy.deepcopy(tiny_model)
    with torch.no_grad():
        big.classifier.weight.mul_(1e5)
    path = tmp_path / "big16.onnx"
    path.write_bytes(b"an earlier export")
    with pytest.raises(OnnxVerificationError, match=r"float16 holds at most 65,504\); .* was not written"):
        export_onnx(big, path, batch=1, dtype=torch.float16)
    assert path.read_bytes() == b"an earlier export"
    large = copy.deepcopy(tiny_model)
    with torch.no_grad():
        large.classifier.weight.mul_(1000)
    report = export_onnx(large, tmp_path / "large32.onnx", batch=1)
    assert report.largest_logit > 200 and report.max_abs_diff <= report.bound < 1e-4 + 1e-5 * 1e4


def test_verification_failure_removes_the_file(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(vf_export, "FP32_BOUND", 1e-12)  # no real export meets this
    monkeypatch.setattr(vf_export, "FP32_RTOL", 0.0)
    path = tmp_path / "strict.onnx"
    with pytest.raises(OnnxVerificationError, match="differ from PyTorch's"):
        export_onnx(tiny_model, path, batch=1)
    assert not path.exists()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"image_size": (8, 8)}, ValueError, "at least 17"),
        ({"image_size": "big"}, ValueError, "image_size must be"),
        ({"image_size": (72.0, 72)}, ValueError, "image_size must be"),
        ({"dtype": torch.bfloat16}, ValueError, "float32 or float16"),
        ({"dtype": "int8"}, ValueError, "float32 or float16"),
        ({"batch": 0}, ValueError, "batch must be"),
        ({"opset": 11}, ValueError, "opset"),
    ],
)
def test_bad_arguments_fail_before_exporting(tiny_model, tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        export_onnx(tiny_model, tmp_path / "x.onnx", **kwargs)
    assert not (tmp_path / "x.onnx").exists()


def test_opset_range_is_what_onnxscript_converts_to(tiny_model, tmp_path):
    """Opset 26 only logged a failed conversion and wrote an opset-18 file ONNX Runtime rejects."""
    from onnxscript.version_converter import _version_converter as converter

    low, high = converter.SUPPORTED_MIN_ONNX_OPSET, converter.SUPPORTED_MAX_ONNX_OPSET
    assert vf_export._opset_range() == (low, high)
    assert high == vf_export.FALLBACK_MAX_OPSET, "update the documented fallback to the installed onnxscript"
    for opset in (low - 1, high + 1):
        with pytest.raises(ValueError, match=f"opset must be an int from {low} to {high}"):
            export_onnx(tiny_model, tmp_path / "x.onnx", opset=opset)
    assert not os.listdir(tmp_path)


def test_opset_the_exporter_did_not_write_fails_and_keeps_the_earlier_file(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(vf_export, "_opset_range", lambda: (18, 99))  # let 26 reach the exporter
    path = tmp_path / "model.onnx"
    path.write_bytes(b"an earlier export")
    with pytest.raises(OnnxVerificationError, match="the exporter wrote opset 18, not 26"):
        export_onnx(tiny_model, path, batch=1, opset=26)
    assert path.read_bytes() == b"an earlier export"
    assert os.listdir(tmp_path) == ["model.onnx"], "the staging directory must go"


def test_onnxruntime_errors_are_verification_errors(tiny_model, tmp_path, monkeypatch):
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidGraph

    def reject(*args, **kwargs):
        raise InvalidGraph("[ONNXRuntimeError] : 10 : INVALID_GRAPH : This is an invalid model.")

    monkeypatch.setattr(ort, "InferenceSession", reject)
    with pytest.raises(OnnxVerificationError, match=r"ONNX Runtime cannot load the exported file: .*INVALID") as err:
        export_onnx(tiny_model, tmp_path / "new" / "dir" / "model.onnx", batch=1)
    assert isinstance(err.value.__cause__, InvalidGraph)
    assert not os.listdir(tmp_path), "directories made for the output must go on failure"


def test_export_is_atomic_with_external_data(tiny_model, tmp_path, monkeypatch):
    from torch.onnx._internal.exporter import _onnx_program

    monkeypatch.setattr(_onnx_program, "_LARGE_MODEL_THRESHOLD", 0)  # weights go to model.onnx.data (the >1.5 GB path)
    path = tmp_path / "model.onnx"
    path.write_bytes(b"an earlier export")
    monkeypatch.setattr(vf_export, "FP32_BOUND", 1e-12)
    monkeypatch.setattr(vf_export, "FP32_RTOL", 0.0)
    with pytest.raises(OnnxVerificationError, match="was not written"):
        export_onnx(tiny_model, path, batch=1)
    assert path.read_bytes() == b"an earlier export" and os.listdir(tmp_path) == ["model.onnx"]

    monkeypatch.setattr(vf_export, "FP32_BOUND", 1e-4)
    monkeypatch.setattr(vf_export, "FP32_RTOL", 1e-5)
    report = export_onnx(tiny_model, path, batch=1)
    assert report.path == path and report.max_abs_diff <= 1e-4, report.checks
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.data"]
    pixels = _uniform(1, 3, 72, 72, seed=2)
    with torch.no_grad():
        expected = tiny_model(pixels).logits
    assert (_ort_logits(path, pixels) - expected).abs().max().item() <= 1e-4

    monkeypatch.setattr(_onnx_program, "_LARGE_MODEL_THRESHOLD", 1 << 40)
    export_onnx(tiny_model, path, batch=1)
    assert os.listdir(tmp_path) == ["model.onnx"], "the earlier export's weights must not stay beside the new one"
    assert (_ort_logits(path, pixels) - expected).abs().max().item() <= 1e-4


def test_one_channel_model_exports_and_skips_the_photo(tmp_path):
    torch.manual_seed(0)
    config = vf.ViTHybridConfig.from_dict(tiny_config(num_channels=1, backbone_config={"num_channels": 1}))
    model = vf.ViTHybridForImageClassification(config).eval()
    randomize_(model)
    path = tmp_path / "gray.onnx"
    report = export_onnx(model, path)
    assert [what for what, _ in report.checks] == ["random batch 1 (1 image)", "random batch 3 (3 images)"]
    assert report.inputs == 4 and report.max_abs_diff <= 1e-4, report.checks
    assert report.summary().endswith(" over 4 inputs (photo not checked: the model takes 1-channel input, not RGB)")
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[1].dim_value == 1
    pixels = _uniform(2, 1, 72, 72, seed=3)
    with torch.no_grad():
        expected = model(pixels).logits
    assert (_ort_logits(path, pixels) - expected).abs().max().item() <= 1e-4


def test_model_errors_surface_before_torch_wrapping(tiny_model, tmp_path):
    broken = copy.deepcopy(tiny_model)
    broken.config.num_channels = 2  # the embeddings accept 2 channels, the backbone (built for 3) refuses
    with pytest.raises(ValueError, match=r"^pixel_values has 2 channels; the backbone expects 3") as err:
        export_onnx(broken, tmp_path / "x.onnx")
    assert "submit a PR" not in str(err.value)
    assert isinstance(err.value.__cause__, torch.onnx.errors.OnnxExporterError)
    assert not os.listdir(tmp_path)


def test_unwritable_output_fails_before_exporting(tiny_model, tmp_path, monkeypatch):
    def no_export(*args, **kwargs):
        raise AssertionError("the export ran")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_dir").mkdir()
    with pytest.raises(ValueError, match="a_file is a file, not a folder"):
        export_onnx(tiny_model, tmp_path / "a_file" / "sub" / "x.onnx")
    with pytest.raises(ValueError, match=r"^output .*a_dir is a directory; give a file path$"):
        export_onnx(tiny_model, tmp_path / "a_dir")


def test_unsupported_dtype_message_fits_the_dtype(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="choose float32 or float16") as err:
        export_onnx(tiny_model, tmp_path / "x.onnx", dtype=torch.float64)
    assert "bfloat16" not in str(err.value)
    with pytest.raises(ValueError, match="no bfloat16 convolutions"):
        export_onnx(tiny_model, tmp_path / "x.onnx", dtype=torch.bfloat16)


def test_missing_onnxruntime_names_the_extra(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"pip install vithybrid-fast\[export\]"):
        export_onnx(tiny_model, tmp_path / "x.onnx")


def test_not_our_model_is_refused(tmp_path):
    with pytest.raises(TypeError, match="ViTHybridForImageClassification"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")


@pytest.mark.parametrize("out_size, in_size", [(7, 5), (3, 5), (5, 5), (1, 4), (30, 24)])
def test_bicubic_matrix_is_f_interpolate(out_size, in_size):
    values = torch.randn(2, in_size, in_size + 1, dtype=torch.float64)
    expected = torch.nn.functional.interpolate(
        values[None], size=(out_size, out_size + 2), mode="bicubic", align_corners=False
    )[0]
    rows, cols = (
        bicubic_matrix(out_size, in_size, torch.float64),
        bicubic_matrix(out_size + 2, in_size + 1, torch.float64),
    )
    torch.testing.assert_close(rows @ values @ cols.T, expected, rtol=0, atol=1e-12)
    if out_size == in_size:
        assert torch.equal(bicubic_matrix(out_size, in_size), torch.eye(in_size)), "identity at the trained grid"


def test_torch_export_reference_and_patched_dynamic_batch(tiny_model, device):
    reference = copy.deepcopy(tiny_model).to(device)
    config = vf.ViTHybridConfig.from_dict(tiny_config(hidden_size=64, num_attention_heads=2))
    torch.manual_seed(1)
    kernel_model = vf.ViTHybridForImageClassification(config).eval()
    randomize_(kernel_model)
    patched = vf.patch(copy.deepcopy(kernel_model).to(device), "triton")
    for model, expect_ops in ((reference, False), (patched, True)):
        program = export_program(model)
        ops = {str(n.target).split(".")[1] for n in program.graph.nodes if str(n.target).startswith("vithybrid.")}
        if expect_ops:
            assert {"flash_attention_packed", "fused_linear", "layer_norm_mlp", "weight_standardize"} <= ops, ops
        else:
            assert not ops, ops
        for batch in (1, 3):  # neither is the traced batch of 2
            pixels = _uniform(batch, 3, 72, 72, seed=batch).to(device)
            with torch.no_grad():
                got = program.module()(pixels)
                expected = model(pixels).logits
            assert got.shape == (batch, 7)
            assert (got - expected).abs().max().item() <= 1e-5


def test_a_saved_program_of_a_patched_model_loads_in_a_new_process(tmp_path, device):
    """torch.export.load after `import vithybrid_fast` failed: "failed to resolve
    torch.ops.vithybrid.weight_standardize" (the ops register with the kernel modules)."""
    torch.manual_seed(1)
    config = vf.ViTHybridConfig.from_dict(tiny_config(hidden_size=64, num_attention_heads=2))  # flash: head size 32
    model = vf.ViTHybridForImageClassification(config).eval()
    randomize_(model)
    patched = vf.patch(model.to(device), "triton")
    torch.export.save(export_program(patched), tmp_path / "patched.pt2")
    pixels = _uniform(3, 3, 72, 72, seed=5).to(device)
    torch.save({"pixels": pixels, "logits": patched(pixels).logits.detach()}, tmp_path / "io.pt")
    script = (
        "import sys, torch, vithybrid_fast as vf\n"
        "from vithybrid_fast.gpu_support import true_fp32\n"
        "program = vf.load_program(sys.argv[1])\n"
        "io = torch.load(sys.argv[2])\n"
        "with true_fp32():\n"  # as conftest runs this process: cuDNN's TF32 convs alone differ by ~1e-3
        "    print((program.module()(io['pixels']) - io['logits']).abs().max().item())\n"
    )
    # the environment, with conftest's TRITON_INTERPRET where there is no GPU, passes on
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "patched.pt2"), str(tmp_path / "io.pt")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) <= 1e-5


def test_export_program_keeps_the_callers_modes(tiny_model):
    model = copy.deepcopy(tiny_model).train()
    model.vit.embeddings.dropout.eval()  # a mixed state comes back as it was, not as train(True)
    export_program(model, dynamic_batch=False)
    modes = {name: module.training for name, module in model.named_modules()}
    assert modes.pop("vit.embeddings.dropout") is False
    assert all(modes.values()), [name for name, training in modes.items() if not training]


def test_cli_export_writes_a_verified_file(tiny_model, tmp_path, capsys):
    from vithybrid_fast.cli import main

    tiny_model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "cli.onnx"
    code = main(["export", "--model", str(tmp_path / "ckpt"), "--output", str(out), "--dynamic-batch"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and out.exists()
    assert lines[-1].startswith("onnx: max|Δlogit| ") and lines[-1].endswith(" over 5 inputs"), lines
    assert float(lines[-1].split()[2]) <= 1e-4


def test_cli_export_stderr_has_no_exporter_noise(tiny_model, tmp_path):
    """torch's exporter printed 4 'torchvision is not installed' lines and a LeafSpec FutureWarning."""
    tiny_model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "quiet.onnx"
    run = subprocess.run(
        [sys.executable, "-m", "vithybrid_fast", "export", "--model", str(tmp_path / "ckpt"), "--output", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1].endswith(" over 3 inputs"), run.stdout
    assert "torchvision is not installed" not in run.stderr and "LeafSpec" not in run.stderr, run.stderr


def test_quiet_exporter_drops_only_the_named_noise():
    logger = logging.getLogger(vf_export._REGISTRY_LOGGER)
    records: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    filters_before = list(warnings.filters)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with vf_export._quiet_exporter():
                logger.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
                logger.warning("Failed to register %s", "aten::example")
                warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use …", FutureWarning, stacklevel=1)
                warnings.warn("another deprecation", FutureWarning, stacklevel=1)
            logger.warning("torchvision is not installed. Skipping %s", "torchvision::roi_align")  # after: kept
    finally:
        logger.removeHandler(handler)
    assert records == [
        "Failed to register aten::example",
        "torchvision is not installed. Skipping torchvision::roi_align",
    ]
    assert [str(w.message) for w in caught] == ["another deprecation"]
    assert not logger.filters and warnings.filters == filters_before


def test_cli_export_usage_errors(capsys):
    from vithybrid_fast.cli import main

    for argv in (
        ["--dtype", "bfloat16"],
        ["--dynamic-size", "--image-size", "64", "64"],  # exclude each other
        ["--batch", "0"],
    ):
        with pytest.raises(SystemExit) as usage:
            main(["export", "--model", "m", "--output", "x.onnx", *argv])
        assert usage.value.code == 2, argv
    assert "not allowed with argument" in capsys.readouterr().err


def test_base_config_fp32(tmp_path):
    torch.manual_seed(0)
    model = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.base_384()).eval()
    report = export_onnx(model, tmp_path / "base.onnx", batch="dynamic")
    assert report.inputs == 5 and report.max_abs_diff <= 1e-4, report.checks
