"""`python -m vithybrid_fast.bench --device cpu` end to end (tiny config), and report.write_results on records."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ("provider", "batch", "dtype", "ms_median", "images_per_s", "gpu", "torch", "triton", "commit")
GPU_PROVIDERS = (
    "compile-default",
    "compile-max-autotune",
    "ours-triton",
    "ours-triton-cudagraphs",
    "ours-triton-compile",
)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench")
    # one thread: the tiny model gains nothing from two, and OpenMP threads spinning against other
    # processes on a busy CI machine can stretch a 10 s run into minutes
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--device", "cpu", "--out", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def _records(out: Path) -> list[dict]:
    (path,) = out.glob("*.json")
    return json.loads(path.read_text())


def test_cpu_run_writes_consistent_records(cpu_run):
    out, _ = cpu_run
    records = _records(out)
    e2e = [r for r in records if r["kind"] == "e2e"]
    assert e2e, "no end-to-end records"
    for rec in records:
        missing = [k for k in REQUIRED if k not in rec]
        assert not missing, f"record {rec.get('provider')} lacks {missing}"
    timed = [r for r in e2e if not r.get("skipped") and not r.get("error")]
    assert {r["provider"] for r in timed} >= {"ref-eager", "ref-sdpa"}
    assert {r["batch"] for r in timed} == {1, 2}
    for rec in timed:
        assert rec["ms_median"] > 0, rec
        assert math.isclose(rec["images_per_s"], rec["batch"] * 1000 / rec["ms_median"], rel_tol=1e-6), rec
        assert rec["dtype"] == "float32" and rec["device"] == "cpu"
        assert rec["ms_p10"] <= rec["ms_median"] <= rec["ms_p90"]
        assert rec["first_call_ms"] > 0
        # every provider computes the same function as the float32 eager reference
        assert rec["max_abs_diff_vs_ref_eager_fp32"] < 1e-4, rec


def test_cpu_run_reports_gpu_providers_as_skipped(cpu_run):
    import torch

    out, stdout = cpu_run
    records = _records(out)
    # on a GPU machine `--device cpu` still skips them, for a different reason
    expected = "no CUDA GPU" if not torch.cuda.is_available() else "GPU provider, benchmark device is cpu"
    for provider in GPU_PROVIDERS:
        recs = [r for r in records if r.get("provider") == provider]
        assert recs, f"{provider} has no record"
        for rec in recs:
            assert rec.get("skipped") == expected, rec
            assert rec["ms_median"] is None and rec["images_per_s"] is None
        assert any(provider in line and expected in line for line in stdout.splitlines()), stdout


def test_cpu_run_writes_markdown_and_plot(cpu_run):
    out, stdout = cpu_run
    (markdown,) = out.glob("*.md")
    text = markdown.read_text()
    assert "torch" in text and "ref-eager" in text and "Skipped providers" in text
    (png,) = out.glob("*-throughput.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| ref-eager |" in stdout  # the table is printed too


def _synthetic() -> list[dict]:
    env = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "commit": "abc1234",
           "date": "2026-01-02", "transformers": "4.47.1", "config": "base", "image_size": 384}  # fmt: skip
    records = []
    for dtype in ("float16", "bfloat16"):
        for provider, speed in (("ref-sdpa", 1.0), ("ours-triton", 1.5)):
            for batch in (1, 8):
                ms = batch * 2.0 / speed
                records.append({"kind": "e2e", "provider": provider, "dtype": dtype, "batch": batch,
                                "ms_median": ms, "ms_p10": ms * 0.9, "ms_p90": ms * 1.1,
                                "images_per_s": batch * 1e3 / ms, "first_call_ms": 100.0, **env})  # fmt: skip
        records.append({"kind": "e2e", "provider": "ours-triton", "dtype": dtype, "batch": 64, "ms_median": None,
                        "images_per_s": None, "error": "OutOfMemoryError: CUDA out of memory", **env})  # fmt: skip
    records.append({"kind": "peak", "metric": "matmul_tflops", "dtype": "bfloat16", "value": 700.0, "provider": None,
                    "batch": None, "ms_median": None, "images_per_s": None, **env})  # fmt: skip
    records.append({"kind": "kernel", "kernel": "attention", "provider": "triton", "dtype": "bfloat16",
                    "batch": 8, "ms_median": 0.1, "images_per_s": None, "tflops": 350.0,
                    "measured_peak_tflops": 700.0, **env})  # fmt: skip
    records.append({"kind": "kernel", "kernel": "group_norm_act", "provider": "triton", "dtype": "float16",
                    "batch": 8, "variant": "relu", "layout": "nchw", "ms_median": 0.05, "images_per_s": None,
                    "gbps": 2400.0, "hbm_gbps": 3000.0, **env})  # fmt: skip
    return records


def test_write_results_on_synthetic_records(tmp_path):
    from vithybrid_fast.bench.report import kernel_fraction, write_results

    records = _synthetic()
    paths = write_results(records, tmp_path)
    stem = "nvidia-h100-80gb-hbm3-2026-01-02"
    assert paths["json"] == tmp_path / f"{stem}.json"
    assert json.loads(paths["json"].read_text()) == records
    text = paths["markdown"].read_text()
    assert "NVIDIA H100 80GB HBM3" in text and "torch 2.11.0" in text and "commit abc1234" in text
    assert "## End to end, float16: images/s" in text and "## End to end, bfloat16: images/s" in text
    assert "| ours-triton | 750.0 | 750.0 | error |" in text  # images/s = batch·1000/ms; the OOM shows as error
    assert "| ref-sdpa | 500.0 | 500.0 | — |" in text  # never run at batch 64
    assert "50.0 (compute)" in text and "80.0 (memory)" in text  # % of measured peak
    for kind in ("throughput", "roofline"):
        assert paths[kind].name == f"{stem}-{kind}.png"
        assert paths[kind].read_bytes()[:4] == b"\x89PNG"
    assert kernel_fraction(records[-1], records) == (0.8, "memory")


def test_write_results_without_kernels_has_no_roofline(tmp_path):
    from vithybrid_fast.bench.report import write_results

    paths = write_results([r for r in _synthetic() if r["kind"] == "e2e"], tmp_path)
    assert "roofline" not in paths
    assert paths["throughput"].exists()
