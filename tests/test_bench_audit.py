"""The benchmarks' user-facing edges: bad arguments are one line (exit 2) before anything is measured,
results files are whole or absent, a failure still reports what was measured, and a report never
compares timings of different devices. Each case failed before its fix (bench audit)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


def _bench_main(argv: list[str]) -> int:
    from vithybrid_fast.bench.__main__ import main

    return main([*argv, "--warm-caches"])  # fresh caches would repoint this process's Triton cache


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dtypes", "float64"], "unknown dtype"),  # was a ValueError traceback from e2e.run
        (["--dtypes", "float64", "--no-e2e"], "unknown dtype"),  # was ignored: exit 0, nothing measured
        (["--batches", "0"], "at least 1"),  # was a record of a batch of 0
        (["--batches", "-1"], "at least 1"),  # was a RuntimeError traceback from torch.randn
        (["--batches", "x"], "integers"),  # was a ValueError traceback
        (["--reps", "0"], "at least 1"),  # was an error record per batch (median of no samples)
        (["--cpu-reps", "0"], "at least 1"),
        (["--device", "cpu", "--kernels"], "need a CUDA GPU"),  # was exit 0 with an empty report
    ],
)
def test_bad_arguments_are_one_usage_line(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        _bench_main([*argv, "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err.splitlines()[-1], err
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written


def test_unknown_provider_is_refused_before_measuring(capsys, tmp_path):
    # was a "skipped" record, a report and exit 0: a typo looked like a finished run
    assert _bench_main(["--device", "cpu", "--providers", "ref-sdpa,nope", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --providers: unknown ['nope']") and "ref-eager" in err
    assert not list(tmp_path.iterdir())


@NO_CUDA
def test_cuda_asked_without_a_gpu_is_one_line(capsys, tmp_path):
    assert _bench_main(["--device", "cuda", "--output-dir", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: --device cuda: torch sees no CUDA GPU")


def test_from_jsonl_of_a_missing_file_is_one_line(capsys, tmp_path):
    # was a FileNotFoundError traceback
    assert _bench_main(["--from-jsonl", str(tmp_path / "none.jsonl"), "--output-dir", str(tmp_path)]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: --from-jsonl:") and "none.jsonl" in line


def test_from_jsonl_of_no_records_is_an_error_naming_the_file(capsys, tmp_path):
    """`--from-jsonl g.jsonl` of a non-JSON file said "no records to report in bench-results", exit 0."""
    from vithybrid_fast.bench.common import read_records

    garbage = tmp_path / "g.jsonl"
    garbage.write_text("garbage\n")
    assert _bench_main(["--from-jsonl", str(garbage), "--output-dir", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == f"error: --from-jsonl: {garbage}:1: not a JSON record\n"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert _bench_main(["--from-jsonl", str(empty), "--output-dir", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == f"error: --from-jsonl: no records in {empty}\n"
    assert not (tmp_path / "out").exists()
    cut = tmp_path / "cut.jsonl"  # a kill mid-write leaves a last line begun with "{": skipped
    cut.write_text('{"kind": "peak", "value": 1.0}\n{"kind": "e2e", "ms_me')
    assert read_records([cut]) == [{"kind": "peak", "value": 1.0}]


@NO_CUDA
def test_a_run_that_can_measure_nothing_says_so_and_writes_no_report(capsys, tmp_path):
    """The second audit: on a CPU, `--providers ours-triton` (skipped: no GPU) rewrote the day's report with
    empty tables, `--kernel-benches attention` was ignored, both exiting 0; an --output-dir that is a file
    was a FileExistsError traceback."""
    out = tmp_path / "out"
    argv = ["--device", "cpu", "--batches", "1", "--output-dir", str(out)]
    assert _bench_main([*argv, "--providers", "ours-triton"]) == 1
    assert capsys.readouterr().err == "error: nothing was measured (ours-triton: no CUDA GPU); no report written\n"
    assert not list(out.glob("*.md")) and not list(out.glob("*.json"))
    assert _bench_main([*argv, "--no-e2e"]) == 1
    assert capsys.readouterr().err.endswith("error: nothing was measured; no report written\n")
    assert _bench_main([*argv, "--kernel-benches", "attention"]) == 2
    assert "error: --kernel-benches attention: the kernel microbenchmarks need a CUDA GPU" in capsys.readouterr().err
    a_file = tmp_path / "f"
    a_file.write_text("")
    for extra in (["--providers", "ref-eager"], ["--from-jsonl", str(a_file)]):
        assert _bench_main([*argv[:-1], str(a_file), *extra]) == 2
        assert capsys.readouterr().err == f"error: --output-dir {a_file}: a file, not a folder\n"


def test_a_failure_while_measuring_still_reports_what_was_measured(monkeypatch, capsys, tmp_path):
    from vithybrid_fast.bench import e2e

    record = {"kind": "e2e", "provider": "ref-eager", "dtype": "float32", "batch": 1, "ms_median": 2.0,
              "ms_p10": 2.0, "ms_p90": 2.0, "images_per_s": 500.0, "gpu": "cpu:test", "date": "2026-01-02"}  # fmt: skip

    def measure_one_then_fail(*args, on_record, **kwargs):
        on_record(dict(record))
        raise RuntimeError("the second provider broke")

    monkeypatch.setattr(e2e, "run", measure_one_then_fail)
    assert _bench_main(["--device", "cpu", "--output-dir", str(tmp_path)]) == 1  # was a traceback, no report
    err = capsys.readouterr().err
    assert "error: RuntimeError: the second provider broke; reporting the 1 records" in err
    assert "Traceback" not in err
    (report,) = tmp_path.glob("*.json")
    assert json.loads(report.read_text()) == [record]


def _e2e(gpu: str, ms: float, provider: str = "ours-triton", batch: int = 8) -> dict:
    return {"kind": "e2e", "provider": provider, "dtype": "bfloat16", "batch": batch, "ms_median": ms,
            "ms_p10": ms, "ms_p90": ms, "images_per_s": batch * 1e3 / ms, "gpu": gpu, "date": "2026-01-02",
            "torch": "2.11.0", "triton": "3.6.0", "commit": "abc1234"}  # fmt: skip


def test_results_files_are_whole_or_absent(monkeypatch, tmp_path):
    from vithybrid_fast.bench.report import write_results

    records = [_e2e("NVIDIA H200", 4.0)]
    stem = "nvidia-h200-2026-01-02"
    (tmp_path / f"{stem}.json").write_text("the previous run's report\n")
    real_write_text = Path.write_text

    def half_then_interrupted(self, text, *args, **kwargs):  # Ctrl-C in the middle of a write
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_results(records, tmp_path)
    monkeypatch.undo()
    # was: the old report cut in half in place; now the old file stands and no temporary is left
    assert [p.name for p in tmp_path.iterdir()] == [f"{stem}.json"]
    assert (tmp_path / f"{stem}.json").read_text() == "the previous run's report\n"
    paths = write_results(records, tmp_path)
    assert json.loads(paths["json"].read_text()) == records
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())


def test_mixed_devices_are_flagged_and_never_share_a_table(tmp_path):
    from vithybrid_fast.bench.report import markdown, write_results

    records = [_e2e("NVIDIA H200", 4.0), _e2e("NVIDIA A100-SXM4-80GB", 8.0)]
    text = markdown(records)
    # was: one table whose cell showed whichever device came last, with no word of the other
    assert "**mixed devices** (NVIDIA H200; NVIDIA A100-SXM4-80GB)" in text
    assert "## End to end, bfloat16, NVIDIA H200: images/s" in text
    assert "## End to end, bfloat16, NVIDIA A100-SXM4-80GB: images/s" in text
    assert "| ours-triton | 2000.0 |" in text and "| ours-triton | 1000.0 |" in text
    paths = write_results(records, tmp_path)
    assert paths["json"].name == "mixed-devices-2026-01-02.json"  # not named for one of the two devices


def test_a_kernel_is_judged_against_its_own_devices_peak():
    from vithybrid_fast.bench.report import kernel_fraction

    peak = {"kind": "peak", "metric": "matmul_tflops", "dtype": "bfloat16", "value": 700.0, "gpu": "NVIDIA H200"}
    kernel = {"kind": "kernel", "kernel": "attention", "dtype": "bfloat16", "tflops": 200.0, "ms_median": 1.0}
    # was 200/700 for an A100 record: the H200's roof made the A100 kernel look 2.2x worse than it is
    assert kernel_fraction({**kernel, "gpu": "NVIDIA A100"}, [peak]) is None
    assert kernel_fraction({**kernel, "gpu": "NVIDIA H200"}, [peak]) == (200.0 / 700.0, "compute")


@NO_CUDA
@pytest.mark.parametrize(
    "bench",
    ["bench_attention", "bench_layer_norm_mlp", "bench_backbone_kernels", "bench_add_layer_norm", "sweep_group_norm"],
)
def test_gpu_only_benchmark_without_a_gpu_exits_with_one_line_and_no_file(bench, capsys, tmp_path):
    import importlib

    module = importlib.import_module(f"vithybrid_fast.bench.{bench}")
    out = tmp_path / "records.json"
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--out", str(out)])
    assert exit_info.value.code == 2  # was exit 0 and an empty "[]" results file (+ an empty .jsonl)
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: python -m vithybrid_fast.bench.{bench}: needs a CUDA GPU")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "bench", ["bench_attention", "bench_layer_norm_mlp", "bench_backbone_kernels", "bench_add_layer_norm"]
)
def test_gpu_only_benchmark_rejects_an_unknown_dtype_before_starting(bench, capsys):
    import importlib

    module = importlib.import_module(f"vithybrid_fast.bench.{bench}")
    with pytest.raises(SystemExit) as exit_info:  # was an AttributeError (torch.float99) on the GPU
        module.main(["--dtypes", "float99"])
    assert exit_info.value.code == 2 and "invalid choice: 'float99'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("bench", "argv", "message"),
    [
        ("profile_e2e", ["--batches", "64,x"], "argument --batches: not a comma-separated list of integers"),
        ("profile_e2e", ["--iters", "0"], "argument --iters: must be at least 1"),
        ("profile_train", ["--batch", "0"], "argument --batch: must be at least 1"),
        ("bench_device_resize", ["--batch", "0"], "argument --batch: must be at least 1"),
        ("bench_device_resize", ["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
        ("profile_train", ["--providers", "ours-auto"], "unknown provider(s) ours-auto; known: ref-sdpa"),
        ("profile_train", ["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
        ("sweep_fused_linear", ["--dims", "577,768"], "argument --dims: expected 3 comma-separated values"),
        ("sweep_fused_linear", ["--batch", "0"], "argument --batch: must be at least 1"),
        ("sweep_group_norm", ["--batch", "0"], "argument --batch: must be at least 1"),
        ("sweep_group_norm", ["--dtype", "float64"], "argument --dtype: invalid choice"),
        ("bench_cpu", ["--batches", "1,0"], "argument --batches: each value must be at least 1"),
        ("bench_cpu", ["--warmup", "-1"], "argument --warmup: must be at least 0"),
        ("bench_input", ["--workers", "0,x"], "argument --workers: not a comma-separated list of integers"),
        ("bench_input", ["--workers", "-1"], "argument --workers: each value must be at least 0"),
    ],
)
def test_the_other_benchmarks_refuse_bad_numbers_as_usage_errors(bench, argv, message, capsys):
    """They split and int() their lists after parsing: a typo was a ValueError traceback."""
    import importlib

    module = importlib.import_module(f"vithybrid_fast.bench.{bench}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_train_bench_arguments_and_its_table(capsys):
    from vithybrid_fast.bench import bench_train

    for argv, message in ((["--dtypes", "float64"], "unknown dtype"), (["--batches", "0"], "at least 1"),
                          (["--providers", "nope"], "unknown ['nope']")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:  # were error records (batch 0, float64) or a KeyError
            bench_train.main([*argv, "--device", "cpu"])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    row = {"provider": "ref-sdpa", "dtype": "bfloat16", "batch": 2, "ms_median": 10.0, "images_per_s": 200.0}
    assert "nan" not in bench_train.table([row])  # a ratio not measured is "-", not "nan"
    assert bench_train.table([row]).splitlines()[1].split()[-3:] == ["-", "-", "-"]


@NO_CUDA
def test_train_bench_on_cuda_without_a_gpu_is_one_line(capsys):
    from vithybrid_fast.bench import bench_train

    with pytest.raises(SystemExit) as exit_info:  # was "AssertionError: Torch not compiled with CUDA enabled"
        bench_train.main(["--device", "cuda"])
    assert exit_info.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--batches", "0"], ["--batches", "1,0"], ["--dtypes", ","]])
def test_tune_rejects_batches_below_one_and_empty_lists(argv, capsys):
    from vithybrid_fast.cli import main

    with pytest.raises(SystemExit) as exit_info:  # batch 0 was found by the model, on the GPU, minutes in
        main(["tune", *argv])
    assert exit_info.value.code == 2 and "Traceback" not in capsys.readouterr().err


def _gpu_session(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out"), "PLAN_WORK": str(tmp_path / "work"),
           "DEVICE": "cpu", "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no-wheels"),
           "PYTHONPATH": str(REPO_ROOT)}  # fmt: skip
    return subprocess.run(["bash", "bench/gpu_session.sh", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_gpu_session_usage_names_plan_and_a_plan_item_needs_a_budget(tmp_path):
    usage = _gpu_session(tmp_path=tmp_path)
    assert usage.returncode == 2 and "plan STEP[=ARG]@SECONDS" in usage.stderr  # `plan` was not in the usage
    plan = _gpu_session("plan", "input", tmp_path=tmp_path)  # was: `timeout input …` failing unexplained
    assert "'input': give each step a budget, STEP[=ARG]@SECONDS" in plan.stderr


def test_gpu_session_tests_list_of_no_tests_runs_nothing(tmp_path):
    """An emptied bench/gpu-tests-not-run-natively.txt gave pytest no ids: it would run the whole suite."""
    (tmp_path / "empty.txt").write_text("\n\n")
    for listed in (tmp_path / "empty.txt", tmp_path / "missing.txt"):
        result = _gpu_session("step", "tests-list", str(listed), tmp_path=tmp_path)
        assert result.returncode == 2, result.stdout[-2000:]
        assert f"tests-list: '{listed}' lists no tests (or is missing): nothing to run" in result.stderr
        assert not (tmp_path / "out" / "tests-list.log").exists()  # pytest never started


def _contributing_commands(prefix: str) -> list[str]:
    text = (REPO_ROOT / "CONTRIBUTING.md").read_text()
    return [m.group(1).strip() for m in re.finditer(rf"^{re.escape(prefix)}(.*?)(?:\s+#.*)?$", text, re.MULTILINE)]


def test_contributing_bench_commands_parse():
    """Every `python -m vithybrid_fast.bench …` line CONTRIBUTING.md shows is accepted by today's parser."""
    from vithybrid_fast.bench.__main__ import parse_args

    commands = _contributing_commands("python -m vithybrid_fast.bench ")
    assert commands
    for command in commands:
        parse_args(command.split())


def test_contributing_gpu_session_steps_exist():
    steps = re.search(r'^STEPS="(.*)"$', (REPO_ROOT / "bench" / "gpu_session.sh").read_text(), re.MULTILINE)
    known = set(steps.group(1).split())
    named = [c.split()[0] for c in _contributing_commands("bash bench/gpu_session.sh step ")]
    text = (REPO_ROOT / "CONTRIBUTING.md").read_text()
    named += [item.split("=")[0].split("@")[0] for plan in re.findall(r"gpu_session\.sh plan ([^\n`]*)", text)
              for item in plan.split()]  # fmt: skip
    assert named and set(named) <= known, set(named) - known


def _next_session_plans() -> list[list[list[int]]]:
    """Step budgets (s) of each `gpu_session.sh plan` call, per plan CONTRIBUTING.md gives the next GPU session
    (one fenced block per GPU kind: the session runs one of them)."""
    text = (REPO_ROOT / "CONTRIBUTING.md").read_text()
    section = text[text.index("**What the next GPU session should run.**") : text.index("Or piece by piece:")]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    plans = [re.findall(r"gpu_session\.sh plan ([^\n`]*)", block) for block in blocks]
    return [[[int(item.rsplit("@", 1)[1]) for item in call.split()] for call in calls] for calls in plans]


def test_the_next_gpu_sessions_plan_fits_its_device_time():
    """Device time is 15 min a session, start and idle included, and 10 min a call (the device tool's limits).
    A plan written for the earlier 30 min asked for 850 s of steps: it would have been cut off mid-profile."""
    call_limit_s, session_s, start_s, idle_between_calls_s, setup_and_pack_s = 600, 900, 90, 30, 20
    grace_s = int(re.search(r"timeout -s INT -k (\d+)", (REPO_ROOT / "bench" / "gpu_session.sh").read_text())[1])
    plans = _next_session_plans()
    assert len(plans) == 2 and all(plans)  # an H100 plan and an H200 plan
    for calls in plans:
        assert all(calls)
        for budgets in calls:  # worst case: every step overruns its budget until the kill
            assert sum(budgets) + grace_s * len(budgets) + setup_and_pack_s <= call_limit_s - 30, budgets
        expected = start_s + sum(sum(b) + setup_and_pack_s for b in calls) + idle_between_calls_s * (len(calls) - 1)
        assert expected <= session_s - 60, (calls, expected)


@pytest.mark.parametrize("provider", ["ref-sdpa-channels-last", "ours-auto-channels-last"])
def test_channels_last_providers_run_nhwc_and_compute_the_reference(provider):
    # the H100 profile's largest gap to torch.compile was cuDNN's NCHW<->NHWC transposes: these rows
    # measure the channels-last layout on the reference and on "auto"
    from vithybrid_fast.bench.e2e import build_provider, make_pixels, random_state_dict, tiny_config

    config = tiny_config()
    state = random_state_dict(config, torch.device("cpu"))
    model = build_provider(provider, config, state, torch.float32)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    pixels = make_pixels(config, 2)
    seen = []
    convs[0].register_forward_pre_hook(
        lambda _, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    reference = build_provider("ref-sdpa", config, state, torch.float32)
    with torch.inference_mode():
        got, want = model(pixels).logits, reference(pixels).logits
    assert seen == [True]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_graphed_channels_last_provider_wraps_the_graphed_auto_model(monkeypatch):
    # CUDA graphs need a GPU: a stand-in runner shows the composition (layout outside, graphs inside)
    from vithybrid_fast.bench.e2e import ChannelsLastInput, build_provider, random_state_dict, tiny_config

    import vithybrid_fast.cuda_graphs as cuda_graphs

    class GraphRunnerStandIn(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model(pixel_values)

    monkeypatch.setattr(cuda_graphs, "enable_cuda_graphs", GraphRunnerStandIn)
    config = tiny_config()
    state = random_state_dict(config, torch.device("cpu"))
    model = build_provider("ours-auto-cudagraphs-channels-last", config, state, torch.float32)
    assert isinstance(model, ChannelsLastInput) and isinstance(model.model, GraphRunnerStandIn)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
