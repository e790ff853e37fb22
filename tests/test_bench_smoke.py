"""`python -m vithybrid_fast.bench --device cpu` end to end (tiny config): where results go, that every record
is on disk as soon as it is measured (a killed run keeps them), and report.write_results on records."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ("provider", "batch", "dtype", "ms_median", "images_per_s", "gpu", "torch", "triton", "commit", "source")
GPU_PROVIDERS = (
    "compile-default",
    "compile-max-autotune",
    "ours-triton",
    "ours-triton-cudagraphs",
    "ours-triton-compile",
)


def _env() -> dict[str, str]:
    # the source tree on the path, as on the GPU machine (no install); one thread: the tiny model gains
    # nothing from two, and OpenMP threads spinning against other processes on a busy CI machine can
    # stretch a 10 s run into minutes
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> tuple[Path, str]:
    """A CPU run from a fresh working directory with no --output-dir: results land in ./bench-results."""
    cwd = tmp_path_factory.mktemp("bench-cwd")
    committed = sorted(p.name for p in (REPO_ROOT / "bench" / "results").iterdir())
    proc = subprocess.run(
        [sys.executable, "-m", "vithybrid_fast.bench", "--device", "cpu"],
        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # nothing written beside the package's own files (installed, that would be site-packages)
    assert sorted(p.name for p in (REPO_ROOT / "bench" / "results").iterdir()) == committed
    assert sorted(p.name for p in cwd.iterdir()) == ["bench-results"]
    return cwd / "bench-results", proc.stdout


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
                    "gbps": 2400.0, "hbm_gbps": 3000.0, "ms_device": 0.04, "pct_of_hbm_device": 100.0,
                    **env})  # fmt: skip
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
    assert "| 80.0 (memory) | 0.0400 (100.0 % HBM) |" in text  # the replayed graph's time, where measured
    assert "| 50.0 (compute) | — |" in text  # attention's record has none
    for kind in ("throughput", "roofline"):
        assert paths[kind].name == f"{stem}-{kind}.png"
        assert paths[kind].read_bytes()[:4] == b"\x89PNG"
    assert kernel_fraction(records[-1], records) == (0.8, "memory")


def test_write_results_without_kernels_has_no_roofline(tmp_path):
    from vithybrid_fast.bench.report import write_results

    paths = write_results([r for r in _synthetic() if r["kind"] == "e2e"], tmp_path)
    assert "roofline" not in paths
    assert paths["throughput"].exists()


# -- results survive a killed run ---------------------------------------------------------------------
def test_cpu_run_appends_every_record_to_jsonl(cpu_run):
    from vithybrid_fast.bench.common import read_records

    out, stdout = cpu_run
    (jsonl,) = out.glob("*.jsonl")
    assert f"records: {Path('bench-results') / jsonl.name}" in stdout
    assert read_records([jsonl]) == _records(out)  # the line-per-record log holds what the report holds


def _start_slow_run(out: Path) -> subprocess.Popen:
    """A CPU run long enough (many batches, 40 reps each) to be stopped after its first record."""
    return subprocess.Popen(
        [sys.executable, "-m", "vithybrid_fast.bench", "--device", "cpu", "--batches", "1,2,3,4,5,6,7,8",
         "--reps", "40", "--output-dir", str(out)],
        cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for_first_record(proc: subprocess.Popen, out: Path, timeout_s: float = 180) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        files = list(out.glob("*.jsonl"))
        if files and files[0].read_text().count("\n") >= 1:
            return files[0]
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no record on disk in time")


def test_killed_run_keeps_its_records(tmp_path):
    from vithybrid_fast.bench.common import read_records

    proc = _start_slow_run(tmp_path)
    jsonl = _wait_for_first_record(proc, tmp_path)
    proc.kill()  # SIGKILL: no handler runs, as when a device call hits its time limit
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    records = read_records([jsonl])
    assert 1 <= len(records) < 8 * 4  # stopped early: not every (provider, batch) was measured
    first = records[0]
    assert not [k for k in REQUIRED if k not in first], first
    assert first["kind"] == "e2e" and first["provider"] == "ref-eager" and first["batch"] == 1
    assert first["ms_median"] > 0 and first["max_abs_diff_vs_ref_eager_fp32"] < 1e-4
    assert not list(tmp_path.glob("*.md")) and not list(tmp_path.glob("*.json"))  # the report never came


def test_terminated_run_reports_what_it_measured(tmp_path):
    proc = _start_slow_run(tmp_path)
    _wait_for_first_record(proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr and "records measured so far" in stderr
    records = _records(tmp_path)
    assert records and records[0]["provider"] == "ref-eager"
    (markdown,) = tmp_path.glob("*.md")
    assert "| ref-eager |" in markdown.read_text()


def test_from_jsonl_rebuilds_the_report(tmp_path, capsys):
    from vithybrid_fast.bench.__main__ import main

    records = _synthetic()
    part1, part2 = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    part1.write_text("".join(json.dumps(r) + "\n" for r in records[:3]))
    # a run killed mid-write leaves a cut-off last line: skipped, not an error
    part2.write_text("".join(json.dumps(r) + "\n" for r in records[3:]) + '{"kind": "e2e", "prov')
    assert main(["--from-jsonl", str(part1), str(part2), "--output-dir", str(tmp_path / "report")]) == 0
    assert _records(tmp_path / "report") == records
    assert "| ours-triton | 750.0 | 750.0 | error |" in capsys.readouterr().out
    part1.write_text('{"broken\n{}\n')  # a corrupt line before the last: one line naming it, exit 1
    assert main(["--from-jsonl", str(part1), "--output-dir", str(tmp_path / "report")]) == 1
    assert re.search(r"^error: --from-jsonl: .*a\.jsonl:1: not a JSON record$", capsys.readouterr().err, re.M)


def test_records_name_their_source_and_the_digest_follows_the_files(cpu_run, tmp_path, monkeypatch, capsys):
    from vithybrid_fast.bench import common
    from vithybrid_fast.bench.__main__ import main as bench_main

    out, _ = cpu_run
    digest = common.source_digest()
    assert len(digest) == 12 and int(digest, 16) >= 0
    assert {r["source"] for r in _records(out)} == {digest}
    assert bench_main(["--source-digest"]) == 0
    assert capsys.readouterr().out.strip() == digest
    # A copy of the bench package with one byte changed has another digest; the copy as it is, the same.
    copy = tmp_path / "bench"
    shutil.copytree(Path(common.__file__).parent, copy, ignore=shutil.ignore_patterns("results", "__pycache__"))
    monkeypatch.setattr(common, "__file__", str(copy / "common.py"))
    assert common.source_digest() == digest
    (copy / "e2e.py").write_text((copy / "e2e.py").read_text() + "\n")
    assert common.source_digest() != digest


def test_output_dir_defaults_under_the_current_directory():
    from vithybrid_fast.bench.__main__ import parse_args

    assert parse_args([]).output_dir == Path("bench-results")  # relative: resolved against the cwd
    assert parse_args(["--output-dir", "x"]).output_dir == Path("x")
    assert parse_args(["--out", "y"]).output_dir == Path("y")  # the old spelling still works


def test_help_names_the_command_it_was_called_as(capsys):
    from vithybrid_fast.bench.__main__ import main as bench_main

    from vithybrid_fast.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: vithybrid-fast bench ") and "--output-dir" in out
    with pytest.raises(SystemExit):
        bench_main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m vithybrid_fast.bench ")


# -- bench/gpu_session.sh ---------------------------------------------------------------------------
def test_gpu_session_step_dry_run_on_a_cpu(tmp_path):
    """The steps' mechanics on a CPU: one step writes its log, records and report to $OUT, and names them."""
    out = tmp_path / "out"
    env = {**_env(), "OUT": str(out), "DEVICE": "cpu", "PYTHON": sys.executable, "BATCHES": "1",
           "WHEELS": str(tmp_path / "no-wheels"), "STEP_BUDGET_S": "240"}  # fmt: skip
    proc = subprocess.run(
        ["bash", "bench/gpu_session.sh", "step", "e2e", "float32"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert proc.stdout.splitlines()[-1] == f"step e2e float32: exit 0; files in {out}: {' '.join(names)} "
    assert {"env.txt", "e2e-float32.log", "e2e-float32"} <= set(names) and len(names) <= 8  # ≤ 8 files come back
    (jsonl,) = (out / "e2e-float32").glob("*.jsonl")  # each bench step in its own folder: reports share names
    assert _records(out / "e2e-float32") == [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert "| ref-eager |" in (out / "e2e-float32.log").read_text()
    # The same step again (a later call on a still-warm machine, same GPU and day): a folder of its own,
    # not a replacement of the first report (the H100 run of 2026-11-27 had its first e2e report replaced
    # that way; only its .jsonl kept the records).
    first_report = {p.name: p.read_bytes() for p in (out / "e2e-float32").iterdir()}
    again = subprocess.run(
        ["bash", "bench/gpu_session.sh", "step", "e2e", "float32"],
        cwd=REPO_ROOT, env={**env, "E2E_PROVIDERS": "ref-sdpa"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in (out / "e2e-float32").iterdir()} == first_report
    assert [r["provider"] for r in _records(out / "e2e-float32-2")] == ["ref-sdpa"]
    from vithybrid_fast.bench.common import source_digest

    env_lines = (out / "env.txt").read_text().splitlines()
    assert f"source {source_digest()}" in env_lines  # names the code that ran
    if not shutil.which("nvidia-smi"):  # said plainly, not as "nvidia-smi: command not found"
        assert "no nvidia-smi on this machine (DEVICE=cpu)" in env_lines
    unknown = subprocess.run(["bash", "bench/gpu_session.sh", "step", "nope"], cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert unknown.returncode == 2 and "steps: doctor tests-kernels" in unknown.stderr


def test_gpu_session_plan_packs_every_step_into_one_tarball(tmp_path):
    """`plan` runs several steps in one device call and, after each, packs all results into one file."""
    import tarfile

    listed = tmp_path / "tests.txt"
    listed.write_text(  # a node id with spaces (a cut-off GPU run's remaining ids hold such)
        "tests/test_config.py::test_base_384_preset_is_the_hub_architecture\n"
        "tests/test_config.py::test_contradictory_or_invalid_fields_raise[overrides0-not a multiple of "
        "num_attention_heads]\n"
    )
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**_env(), "OUT": str(out), "PLAN_WORK": str(work), "DEVICE": "cpu", "PYTHON": sys.executable,
           "WHEELS": str(tmp_path / "no-wheels")}  # fmt: skip
    proc = subprocess.run(
        ["bash", "bench/gpu_session.sh", "plan", f"tests-list={listed}@120", "nope@5"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu-session.tgz", "plan.log"]
    with tarfile.open(out / "gpu-session.tgz") as tar:
        names = {name.removeprefix("./") for name in tar.getnames()}
    assert {"env.txt", "plan.log", "tests-list.log", "tests-list.xml"} <= names
    assert "2 passed" in (work / "tests-list.log").read_text()
    assert "unknown step 'nope'" in proc.stderr


def test_fused_linear_tile_sweep_checks_then_ranks():
    """The GEMM tile sweep (a GPU step) on tiny dims in the interpreter: every tile agrees with the torch
    path within the tests' bound before it is timed, and the ranking names a tile per GEMM."""
    import torch
    from vithybrid_fast.bench import sweep_fused_linear as sweep

    rows = sweep.sweep(1, torch.bfloat16, "cpu", dims=(17, 64, 96), log=lambda _line: None)
    names = ("qkv +LN", "out-proj +res", "fc1 +LN +GELU", "fc2 +res")
    assert [r["gemm"] for r in rows] == [n for n in names for _ in range(1 + len(sweep.INTERPRETER_TILES))]
    tiles = [r for r in rows if r["provider"] != "cublas+ops"]
    assert tiles and all("error" not in r and r["ms"] > 0 and r["err"] < 0.1 for r in tiles), tiles
    table = sweep.ranking(rows).splitlines()
    assert len(table) == 2 + 4 and all("triton 32x32x32" in line for line in table[2:])


def test_backbone_records_carry_the_device_time_beside_the_eager_one(monkeypatch):
    # The GB/s of a record come from its own time: eager (host included) and the replayed graph's.
    from vithybrid_fast.bench import bench_backbone_kernels as bench

    monkeypatch.setattr(bench, "device_ms", lambda fn, device: 0.5)
    rec = bench._measure(lambda: None, "cpu", nbytes=4_000_000, hbm_gbps=16.0)
    assert rec["ms_device"] == 0.5 and rec["gbps_device"] == 8.0 and rec["pct_of_hbm_device"] == 50.0
    assert rec["gbps"] == 4_000_000 / (rec["ms_median"] * 1e-3) / 1e9
    line = bench.format_table([{**rec, "kernel": "group_norm_act", "shape": [1, 2, 3, 4], "layout": "nchw",
                                "dtype": "bfloat16", "provider": "triton"}]).splitlines()[-1]  # fmt: skip
    assert line.split()[-2:] == ["0.5000", "50.0"]


def test_group_norm_sweep_checks_each_candidate_then_ranks(monkeypatch):
    """The group-loop sweep (a GPU step) on tiny shapes in the interpreter: each candidate runs its own
    plan and is timed only if it agrees with float64 within the bound; a wrong one is an error row."""
    from collections import Counter

    import torch
    from vithybrid_fast.bench import sweep_group_norm as sweep

    cases = Counter({(8, 6, 10, True, True): 2, (4, 5, 7, False, False): 1})  # (C, H, W, residual, relu): calls
    launched = []
    real_plan = sweep.gn.forward_plan
    monkeypatch.setattr(sweep.gn, "forward_plan", lambda *a: launched.append(real_plan(*a)) or launched[-1])
    rows = sweep.sweep(2, torch.bfloat16, "cpu", cases=cases, log=lambda _line: None, num_groups=2)
    providers = ["torch"] + [c.label for c in sweep.INTERPRETER_CANDIDATES]
    assert [r["provider"] for r in rows] == providers * 2
    assert all("error" not in r and r["ms"] > 0 and r["err"] <= 0.1 for r in rows), rows
    assert [r["bytes"] for r in rows[:: len(providers)]] == [2 * 8 * 60 * 2 * 3, 2 * 4 * 35 * 2 * 2]
    paths = [p.path for p in launched]
    assert {"loop", "split"} <= set(paths)  # the candidates' paths, not the plan's own choice
    warps = {ln.num_warps for p in launched for ln in p.launches if ln.kernel == "_gn_fwd_group_loop"}
    assert warps == {4, 2}
    table = sweep.ranking(rows)
    lines = table.splitlines()
    total = [line for line in lines if line.startswith("torch ")]
    ms = {r["shape"]: r["ms"] for r in rows if r["provider"] == "torch"}
    assert len(total) == 1 and abs(float(total[0].split()[-1]) - (2 * ms["2x8x6x10+res"] + ms["2x4x5x7"])) < 2e-3

    # A candidate whose output is off is reported, never timed.
    monkeypatch.setattr(sweep, "_ours", lambda t, act, cand, groups: lambda: t["x"] * 1.5)
    one = Counter({(4, 5, 7, False, False): 1})
    bad = sweep.sweep(2, torch.bfloat16, "cpu", cases=one, log=lambda _line: None, num_groups=2)
    assert all("over the bound" in r["error"] and "ms" not in r for r in bad[1:]), bad


@pytest.mark.parametrize(
    "bench", ["bench_attention", "bench_layer_norm_mlp", "bench_backbone_kernels", "bench_add_layer_norm"]
)
def test_gpu_only_kernel_benchmarks_skip_on_a_cpu_and_say_why(bench, capsys):
    import importlib

    module = importlib.import_module(f"vithybrid_fast.bench.{bench}")
    assert module.run("cpu", batches=(1,), dtypes=("float16",)) == []
    assert capsys.readouterr().out.startswith(f"{bench}: skipped, needs a CUDA GPU (device='cpu'")


def test_glue_benchmark_mechanics_on_a_cpu(monkeypatch):
    # the GPU numbers need a GPU; the records' arithmetic and the three providers' agreement do not
    from vithybrid_fast.bench import bench_add_layer_norm as bench

    monkeypatch.setattr(bench, "skip_without_cuda", lambda name, device: False)
    monkeypatch.setattr(bench, "measured_hbm_gbps", lambda device: 1000.0)
    monkeypatch.setattr(bench, "TOKENS", 3)  # 3·batch rows of 768: the interpreter stays quick
    monkeypatch.setattr(bench.torch, "compile", lambda fn, **kwargs: fn)  # Inductor's CPU build: minutes
    records = bench.run("cpu", batches=(1, 2), dtypes=("float32",))
    assert len(records) == 3 * 2 * 3  # variant (inference: 2, training: 1) × batch × provider
    per_element = {"add+layer_norm": 4 * 4, "layer_norm": 2 * 4, "train add+layer_norm": 4 * 4 + 5 * 4}
    for r in records:
        rows = r["batch"] * 3
        assert r["bytes"] == rows * 768 * per_element[r["variant"]]
        assert math.isclose(r["gbps"], r["bytes"] / (r["ms_median"] * 1e-3) / 1e9)
        assert math.isclose(r["pct_of_hbm"], r["gbps"] / 10) and r["max_abs_diff_vs_torch"] < 1e-5
        assert r["ms_device"] > 0 and math.isclose(r["gbps_device"], r["bytes"] / (r["ms_device"] * 1e-3) / 1e9)
        assert math.isclose(r["pct_of_hbm_device"], r["gbps_device"] / 10)
    assert "add+layer_norm" in bench.format_table(records) and "train add+layer_norm" in bench.format_table(records)


def test_profilers_on_a_cpu_list_the_ops_of_a_forward_and_of_a_training_step(tmp_path, capsys):
    """profile_train exists because torch.compile trained 1.43x faster than ours on an H200 with no profile
    to say why. On a CPU both profilers read op (CPU) time: they read device time there, and printed an
    empty table."""
    from vithybrid_fast.bench import profile_e2e, profile_train

    forward_log, train_log = tmp_path / "forward.jsonl", tmp_path / "train.jsonl"
    assert (
        profile_e2e.main(["--providers", "ref-sdpa", "--batches", "1", "--iters", "1", "--out", str(forward_log)]) == 0
    )
    argv = ["--device", "cpu", "--config", "tiny", "--batch", "2", "--providers", "ref-sdpa", "--iters", "2"]
    assert profile_train.main([*argv, "--out", str(train_log)]) == 0
    printed = capsys.readouterr().out
    assert "ref-sdpa bfloat16 autocast b=2 training step: kernels" in printed and "ms per step" in printed
    (forward,) = [json.loads(line) for line in forward_log.read_text().splitlines()]
    (step,) = [json.loads(line) for line in train_log.read_text().splitlines()]
    assert (step["kind"], step["provider"], step["batch"], step["dtype"]) == (
        "train_profile",
        "ref-sdpa",
        2,
        "bfloat16",
    )
    for record in (forward, step):
        assert record["kernels"] and all(row["ms"] >= 0 and row["calls"] >= 1 for row in record["kernels"])
        assert 0 < sum(row["ms"] for row in record["kernels"]) < record["wall_ms"] * 2  # self times, each once
    names = {row["name"] for row in step["kernels"]}
    assert "aten::convolution_backward" in names  # the backward is in the profile, not only the forward
    assert any("AdamW" in name for name in names)  # and the optimizer step
    assert "aten::convolution_backward" not in {row["name"] for row in forward["kernels"]}
    # the host's side: enqueueing a step takes part of the step (all of it on a CPU, where nothing is queued)
    assert 0 < step["host_ms"] <= step["step_ms"]
    assert "host:" in printed and "to enqueue a step of" in printed
    functions = step["host_functions"]
    assert len(functions) == 25 and all(f["calls"] >= 1 and 0 <= f["self_ms"] <= f["total_ms"] for f in functions)
    assert [f["self_ms"] for f in functions] == sorted((f["self_ms"] for f in functions), reverse=True)
    assert any("run_backward" in f["function"] for f in functions)  # autograd's engine, where the backward runs
    assert step["sync_warnings"] is None  # CUDA's sync debug mode: not on a CPU


def test_profile_train_counts_the_synchronizing_calls_cuda_warns_of(monkeypatch):
    """On CUDA, torch.cuda.set_sync_debug_mode("warn") warns at each synchronizing call; the profile counts
    them per message, and leaves the mode off afterwards, also when the step raises."""
    import warnings

    from vithybrid_fast.bench import profile_train

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def step() -> None:
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=2)
        warnings.warn("something else", UserWarning, stacklevel=2)

    assert profile_train.synchronizing_calls(step, torch.device("cuda")) == [
        {"message": "called a synchronizing CUDA operation", "count": 3}
    ]
    assert modes == ["warn", 0]
    assert profile_train.synchronizing_calls(lambda: None, torch.device("cuda")) == []

    def failing() -> None:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        profile_train.synchronizing_calls(failing, torch.device("cuda"))
    assert modes[-1] == 0
    assert profile_train.synchronizing_calls(step, torch.device("cpu")) is None


def test_gpu_session_profile_train_step_dry_run_on_a_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**_env(), "OUT": str(out), "DEVICE": "cpu", "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no-wheels")}
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "step", "profile-train", "ref-sdpa"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "--config tiny --batch 2" in (out / "profile-train.log").read_text()  # not the base model on a CPU
    (record,) = [json.loads(line) for line in (out / "profile-train.jsonl").read_text().splitlines()]
    assert (record["provider"], record["config"], record["batch"]) == ("ref-sdpa", "tiny", 2) and record["kernels"]


def test_gpu_session_resize_step_dry_run_on_a_cpu(tmp_path):
    """The resize step's mechanics: both batches (one size, eight sizes) measured, bytes checked equal."""
    out = tmp_path / "out"
    env = {**_env(), "OUT": str(out), "DEVICE": "cpu", "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no-wheels")}
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "step", "resize"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    records = [json.loads(line) for line in (out / "resize.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["batch"], r["mixed"]) for r in records] == [
        ("device_resize", 4, False),
        ("device_resize", 4, True),
    ]
    assert all(r["device_images_per_s"] > 0 and r["pillow_one_process_images_per_s"] > 0 for r in records)
    assert (out / "resize.log").read_text().count("; bytes equal") == 2


@pytest.mark.filterwarnings("ignore:flash_attention supports head sizes")  # the tiny config's 16
@pytest.mark.parametrize("provider", ["ref-sdpa-channels-last", "ours-triton-channels-last"])
def test_channels_last_training_providers_step_in_nhwc_and_match_the_reference(provider, monkeypatch):
    """An H100's bf16 training step (batch 64) spent 8.15 of 124 ms of kernels in cuDNN's NCHW<->NHWC
    transposes, which torch.compile's NHWC backbone does not pay. These providers time the step with the
    weights and pixels in channels-last: every convolution must see NHWC, and the step must be the NCHW
    reference's (float32, no autocast: the layout alone may change only rounding)."""
    from vithybrid_fast.bench.bench_train import build, pixels_for
    from vithybrid_fast.bench.e2e import random_state_dict, tiny_config

    config, cpu = tiny_config(), torch.device("cpu")
    state = random_state_dict(config, cpu)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, *config.image_size_hw, generator=generator)
    labels = torch.randint(0, config.num_labels, (2,), generator=generator)

    conv2d, seen = torch.nn.functional.conv2d, []

    def spy(x, weight, *args, **kwargs):  # the reference's and our weight-standardized convs both call it
        seen.append(x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
        return conv2d(x, weight, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", spy)

    def loss_and_grads(name: str, layouts: list[bool]):
        model = build(name, config, state, cpu)
        seen.clear()
        loss = model(pixels_for(name, pixels), labels=labels).loss
        layouts.extend(seen)
        loss.backward()
        return model, loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    seen_nhwc, seen_ref = [], []
    model, loss, grads = loss_and_grads(provider, seen_nhwc)
    _, ref_loss, ref_grads = loss_and_grads("ref-sdpa", seen_ref)
    assert len(seen_nhwc) == len(seen_ref) >= 5 and all(seen_nhwc) and not any(seen_ref)
    kernels = [p for p in model.parameters() if p.dim() == 4]  # the weights too, not only the pixels
    assert len(kernels) >= 5 and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    assert abs(loss - ref_loss) <= 1e-4
    assert grads.keys() == ref_grads.keys()
    for name, ref_grad in ref_grads.items():
        tolerance = 1e-3 * ref_grad.abs().max().item() + 1e-5  # as tests/test_training_mode.py
        assert (grads[name] - ref_grad).abs().max().item() <= tolerance, name


@pytest.mark.filterwarnings("ignore:flash_attention supports head sizes")  # the tiny config's 16
def test_compiled_training_provider_is_ours_patched_under_torch_compile(monkeypatch):
    """ours-triton-compile times what `finetune --compile` trains: the Triton-patched model inside
    torch.compile (here on aot_eager, no C++ build), whose step computes the reference's loss and grads."""
    from vithybrid_fast.bench.bench_train import BY_NAME_ONLY, build
    from vithybrid_fast.bench.e2e import random_state_dict, tiny_config

    from vithybrid_fast.patching import patched_modules

    assert "ours-triton-compile" in BY_NAME_ONLY  # asked for by name: a default run stays as long
    real_compile, modes = torch.compile, []

    def on_aot_eager(module, mode=None, **kwargs):
        modes.append(mode)
        return real_compile(module, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", on_aot_eager)
    config, cpu = tiny_config(), torch.device("cpu")
    state = random_state_dict(config, cpu)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, *config.image_size_hw, generator=generator)
    labels = torch.randint(0, config.num_labels, (2,), generator=generator)
    results = {}
    for name in ("ours-triton-compile", "ref-sdpa"):
        torch._dynamo.reset()
        model = build(name, config, state, cpu)
        loss = model(pixels, labels=labels).loss
        loss.backward()
        results[name] = model, loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch._dynamo.reset()
    compiled, loss, grads = results["ours-triton-compile"]
    _, ref_loss, ref_grads = results["ref-sdpa"]
    assert modes == ["default"] and isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    assert patched_modules(compiled._orig_mod)  # the Triton modules are what was compiled
    assert abs(loss - ref_loss) <= 1e-4
    assert {n.removeprefix("_orig_mod.") for n in grads} == set(ref_grads)
    for name, grad in grads.items():
        ref_grad = ref_grads[name.removeprefix("_orig_mod.")]
        assert (grad - ref_grad).abs().max().item() <= 1e-3 * ref_grad.abs().max().item() + 1e-5, name


@pytest.mark.filterwarnings("ignore:flash_attention supports head sizes")  # the tiny config's 16
def test_torch_glue_provider_is_ours_with_the_autocast_glue_kernel_off():
    # the A/B of kernels/add_layer_norm_train.py: the same patched model, the glue switched per layer
    from vithybrid_fast.bench.bench_train import BY_NAME_ONLY, build
    from vithybrid_fast.bench.e2e import random_state_dict, tiny_config

    from vithybrid_fast.fast import FastViTLayer

    assert "ours-triton-torch-glue" in BY_NAME_ONLY
    config, cpu = tiny_config(), torch.device("cpu")
    state = random_state_dict(config, cpu)
    glue = {}
    for name in ("ours-triton", "ours-triton-torch-glue"):
        layers = [m for m in build(name, config, state, cpu).modules() if isinstance(m, FastViTLayer)]
        assert len(layers) == config.num_hidden_layers
        glue[name] = {layer.autocast_glue_kernels for layer in layers}
    assert glue == {"ours-triton": {True}, "ours-triton-torch-glue": {False}}


def test_glue_benchmark_records_a_failed_capture_and_goes_on(monkeypatch):
    # a call CUDA graphs cannot capture (a torch.compile provider, say) keeps its wall-time record
    from vithybrid_fast.bench import bench_add_layer_norm as bench

    def refuse(fn, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(bench, "device_ms", refuse)
    got = bench._on_device(lambda: None, "cpu", 1000, 1.0)
    assert got == {"ms_device": None, "device_error": "RuntimeError: operation not permitted when stream is capturing"}
    table = bench.format_table([{"dtype": "bfloat16", "variant": "layer_norm", "batch": 1, "provider": "ours",
                                 "ms_median": 0.1, "gbps": 1.0, "pct_of_hbm": 0.1, "max_abs_diff_vs_torch": 0.0,
                                 **got}])  # fmt: skip
    assert table.splitlines()[-1].split()[7:9] == ["—", "—"]


def test_host_overhead_benchmark_times_both_routes_in_its_own_process(tmp_path):
    # it stubs Triton's launcher for its whole process, so it runs in one of its own, interpreter off
    out = tmp_path / "host.jsonl"
    cmd = [sys.executable, "-m", "vithybrid_fast.bench.bench_host_overhead", "--calls", "3", "--rounds", "2",
           "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, env={**os.environ, "TRITON_INTERPRET": "0"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    routes = {(r["kernel"], r["provider"]) for r in records}
    for kernel in ("group_norm_act", "weight_standardize", "flash_attention", "add_layer_norm_train"):
        assert {(kernel, "ours (eager twin)"), (kernel, "ours (custom op)")} <= routes
    assert all(r["us_per_call"] > 0 and len(r["us_rounds"]) == 2 and r["calls"] == 3 for r in records)
    for r in records:  # the paired ratio: the median of the two rounds' twin/op ratios
        if r["provider"].startswith("ours"):
            (twin,) = [t for t in records if (t["kernel"], t["provider"]) == (r["kernel"], "ours (eager twin)")]
            (op,) = [t for t in records if (t["kernel"], t["provider"]) == (r["kernel"], "ours (custom op)")]
            ratios = [a / b for a, b in zip(twin["us_rounds"], op["us_rounds"], strict=True)]
            assert math.isclose(r["twin_over_op_median"], sum(ratios) / 2)
    # the routing really changed the path: the twin's and the op's autograd nodes differ (a first version
    # of the switch patched _eager itself and timed the twin twice)
    probe = (
        "import os; os.environ['TRITON_INTERPRET'] = '0'\n"
        "from vithybrid_fast.bench import bench_host_overhead as B\n"
        "B._stub_launches()\n"
        "import torch\n"
        "from vithybrid_fast.kernels import group_norm_act\n"
        "x = torch.randn(1, 4, 2, 2, requires_grad=True)\n"
        "names = []\n"
        "for on in (False, True):\n"
        "    B._through_custom_ops(on)\n"
        "    names.append(type(group_norm_act(x, 2, None, None).grad_fn).__name__)\n"
        "print(*names)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "TRITON_INTERPRET": "0"},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    twin_node, op_node = done.stdout.strip().splitlines()[-1].split()
    assert "_eager" in twin_node and "_eager" not in op_node, (twin_node, op_node)


def test_host_census_counts_a_training_step_of_the_real_architecture(tmp_path):
    """Its own process (it stubs Triton's launcher), the interpreter off: the GPU's launch plans."""
    out = tmp_path / "census.jsonl"
    cmd = [sys.executable, "-m", "vithybrid_fast.bench.host_census", "--providers", "ours-triton", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env={**_env(), "TRITON_INTERPRET": "0"}, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (record["kind"], record["provider"], record["syncing_ops"]) == ("host_census", "ours-triton", {})
    assert record["torch_ops"] == sum(record["ops"].values()) and record["triton_launches"] == sum(
        record["launches"].values()
    )
    # the base model's 52 standardized convs and 12 encoder layers, each launched forward and backward
    assert record["launches"]["_weight_standardize_fwd"] == record["launches"]["_weight_standardize_bwd"] == 52
    assert record["launches"]["_attn_fwd"] == record["launches"]["_attn_bwd_dq"] == 12
    assert "ours-triton:" in proc.stdout and "syncing ops: none" in proc.stdout
    refused = subprocess.run([sys.executable, "-m", "vithybrid_fast.bench.host_census"], cwd=REPO_ROOT,
                             env={**_env(), "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                             timeout=120)  # fmt: skip
    assert refused.returncode == 2 and "needs TRITON_INTERPRET unset or 0" in refused.stderr


def test_host_overhead_benchmark_refuses_the_interpreter():
    cmd = [sys.executable, "-m", "vithybrid_fast.bench.bench_host_overhead", "--calls", "1"]
    done = subprocess.run(cmd, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "needs TRITON_INTERPRET unset or 0" in done.stderr


@pytest.mark.filterwarnings("ignore:flash_attention supports head sizes")  # the tiny config's 16
def test_graphed_training_provider_is_ours_triton_and_says_it_needs_a_gpu():
    # its model is ours "triton" (the glue kernel on); only its step differs, and that needs CUDA graphs
    from vithybrid_fast.bench import bench_train
    from vithybrid_fast.bench.e2e import random_state_dict, tiny_config

    from vithybrid_fast.fast import FastViTLayer
    from vithybrid_fast.patching import patched_modules

    assert "ours-triton-cudagraphs" in bench_train.BY_NAME_ONLY
    config, cpu = tiny_config(), torch.device("cpu")
    model = bench_train.build("ours-triton-cudagraphs", config, random_state_dict(config, cpu), cpu)
    assert patched_modules(model)
    assert {m.autocast_glue_kernels for m in model.modules() if isinstance(m, FastViTLayer)} == {True}
    pixels, labels = torch.randn(2, 3, *config.image_size_hw), torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        bench_train.step_for("ours-triton-cudagraphs", model, pixels, labels, torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 or float32 only"):
        bench_train.step_for("ours-triton-cudagraphs", model, pixels, labels, torch.float16)
    assert bench_train.step_for("ours-triton", model, pixels, labels, torch.bfloat16).scaler is not None
    # a run records the refusal as the provider's result, and goes on
    (record,) = bench_train.run("cpu", batches=(2,), dtypes=("bfloat16",), providers=("ours-triton-cudagraphs",),
                                config_name="tiny", reps=1)  # fmt: skip
    assert record["error"].startswith("RuntimeError: ours-triton-cudagraphs: CUDA graphs need a CUDA device")


def test_bench_train_frees_each_provider_before_building_the_next(monkeypatch):
    """The training step refers to itself (step.skipped), so `model = step = None` freed nothing until
    Python's cycle collector ran: the next provider's peak memory counted the last one's weights and AdamW
    state (the H200's run 4: the same provider peaked at 21.53, 22.64 or 23.74 GiB by its place in the run)."""
    import gc
    import weakref

    from vithybrid_fast.bench import bench_train

    built: list[weakref.ref] = []
    real_build = bench_train.build

    def build(*args, **kwargs):
        assert all(ref() is None for ref in built), "an earlier provider's model is still alive"
        model = real_build(*args, **kwargs)
        built.append(weakref.ref(model))
        return model

    monkeypatch.setattr(bench_train, "build", build)
    collecting = gc.isenabled()
    gc.disable()  # only what run() frees itself counts, not a collection that happened to run
    try:
        records = bench_train.run("cpu", batches=(1, 2), dtypes=("float32",), providers=("ref-sdpa",),
                                  config_name="tiny", reps=1)  # fmt: skip
    finally:
        if collecting:
            gc.enable()
    assert len(records) == 2 and not any("error" in r for r in records), records
    assert len(built) == 2 and all(ref() is None for ref in built)
    assert all(r["first_step_ms"] > 0 for r in records)


# -- from session 20's mutation audit ---------------------------------------------------------------------
HOST_OVERHEAD_ROUTES_PROBE = r"""
import os
os.environ["TRITON_INTERPRET"] = "0"
import json
import torch
from vithybrid_fast.bench import bench_host_overhead as B

seen, timed = [], []
real_backward = torch.Tensor.backward
def spy(self, *a, **k):
    seen.append(type(self.grad_fn).__name__)
    return real_backward(self, *a, **k)
torch.Tensor.backward = spy
real_time = B._time_us
def time_us(step, calls, rounds):
    seen.clear()
    out = real_time(step, calls, rounds)
    timed.append(sorted(set(seen)))
    return out
B._time_us = time_us
B.run(calls=1, rounds=2)
print(json.dumps(timed))
"""


def test_host_overhead_times_each_route_through_its_own_node():
    # every timed batch of calls ran one node kind; per kernel, 2 rounds through the twin and 2 through the
    # custom op (kills a `routes` table whose custom-op route does not switch TWINS off: it timed the twin twice)
    done = subprocess.run([sys.executable, "-c", HOST_OVERHEAD_ROUTES_PROBE], env={**_env(), "TRITON_INTERPRET": "0"},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    timed = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(len(nodes) == 1 for nodes in timed), timed
    names = [nodes[0] for nodes in timed]
    for kernel in ("group_norm_act", "weight_standardize", "flash_attention", "add_layer_norm_train"):
        assert names.count(f"{kernel}_eagerBackward") == 2, names
        assert names.count(f"GeneratedBackwardFor_vithybrid_{kernel}_defaultBackward") == 2, names


def test_time_us_reports_microseconds_per_call(monkeypatch):
    # a fake clock that advances 3 µs per step: each round is 3.0 µs per call, whatever `calls` is
    # (kills dropping the division by calls)
    from vithybrid_fast.bench import bench_host_overhead as B

    clock = [0.0]
    monkeypatch.setattr(B.time, "perf_counter", lambda: clock[0])

    def step():
        clock[0] += 3e-6

    rounds = B._time_us(step, calls=40, rounds=3)
    assert rounds == pytest.approx([3.0, 3.0, 3.0])


@pytest.mark.filterwarnings("ignore:flash_attention supports head sizes")
def test_step_for_feeds_channels_last_providers_nhwc_pixels():
    # step_for's pixels_for: the channels-last providers are timed on NHWC input (kills passing `pixels`)
    from vithybrid_fast.bench import bench_train
    from vithybrid_fast.bench.e2e import random_state_dict, tiny_config

    config, cpu = tiny_config(), torch.device("cpu")
    provider = next(p for p in bench_train.CHANNELS_LAST if p.startswith("ref"))
    model = bench_train.build(provider, config, random_state_dict(config, cpu), cpu)
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(
        (args[0] if args else kwargs["pixel_values"]).is_contiguous(memory_format=torch.channels_last)),
        with_kwargs=True)  # fmt: skip
    pixels, labels = torch.randn(2, 3, *config.image_size_hw), torch.tensor([0, 1])
    bench_train.step_for(provider, model, pixels, labels, torch.float32)()
    assert seen == [True]


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:flash_attention supports head sizes")
def test_graphed_step_trains_as_the_eager_step_does():
    # Never run yet (written in session 20 without a GPU). make_graphed_step's body needs CUDA: the same
    # three bf16 steps from the same weights, replayed from graphs vs make_step, end at the same weights
    # (kills: autocast flag inverted, no zero_grad between steps, the autocast cache left on at capture);
    # float16 is refused with its own message (kills refusing bf16 instead).
    from vithybrid_fast.bench import bench_train
    from vithybrid_fast.bench.e2e import random_state_dict, tiny_config

    config, cuda = tiny_config(), torch.device("cuda")
    state = random_state_dict(config, cuda)
    pixels = torch.randn(2, 3, *config.image_size_hw, device=cuda)
    labels = torch.tensor([0, 1], device=cuda)
    weights = []
    for provider in ("ours-triton", "ours-triton-cudagraphs"):
        model = bench_train.build(provider, config, state, cuda)
        step = bench_train.step_for(provider, model, pixels, labels, torch.bfloat16)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for name, want in weights[0].items():
        torch.testing.assert_close(weights[1][name], want, rtol=1e-3, atol=1e-5, msg=name)
    model = bench_train.build("ours-triton-cudagraphs", config, state, cuda)
    with pytest.raises(ValueError, match="bfloat16 or float32 only"):
        bench_train.step_for("ours-triton-cudagraphs", model, pixels, labels, torch.float16)
