"""Per-GPU config tables, the per-user autotune cache and forced configs (kernels/_tuning.py), on a CPU.

A tiny Triton kernel with three configs stands in for ours; the GPU is faked by name, the autotuner's
timings by a `do_bench` that returns prepared numbers, and the interpreter step of the lookup is turned
off so the table/cache path runs (the kernel itself still runs: in the interpreter on a CPU, natively
on a GPU, on the test device).
"""

from __future__ import annotations

import json

import pytest
import torch
import triton
import triton.language as tl
from vithybrid_fast.kernels import _tuning
from vithybrid_fast.kernels._tuning import config_id, fake_gpu, force_config, tuned

GPU = "NVIDIA Fake 9000 80GB"


@triton.jit
def _scale_kernel(x_ptr, out_ptr, n, N_BUCKET, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2.0, mask=offs < n)


CONFIGS = [triton.Config({"BLOCK": b}, num_warps=4) for b in (16, 32, 64)]


class FakeBench:
    """do_bench stand-in: runs the call once (so the kernel really executes), returns queued timings."""

    def __init__(self, timings: list[float]) -> None:
        self.timings = list(timings)
        self.calls = 0

    def __call__(self, kernel_call, quantiles=None, **kwargs):
        kernel_call()
        self.calls += 1
        t = self.timings[(self.calls - 1) % len(self.timings)]
        return [t, t, t] if quantiles else t


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("VITHYBRID_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_tuning, "TABLE_DIR", tmp_path / "tables")
    monkeypatch.setattr(_tuning, "interpreter_enabled", lambda: False)  # take the GPU path of `choose`
    monkeypatch.delenv("VITHYBRID_TUNING", raising=False)
    bench = FakeBench([3.0, 1.0, 2.0])  # the second candidate (BLOCK=32) wins
    kernel = tuned("test_scale", _scale_kernel, CONFIGS, key=["N_BUCKET"], do_bench=bench)
    yield kernel, bench, tmp_path
    _tuning.REGISTRY.pop("test_scale", None)


def _launch(kernel, device, n=100):
    # on the test device: natively on a GPU, Triton does not run CPU tensors
    x = torch.arange(n, dtype=torch.float32, device=device)
    out = torch.empty_like(x)
    kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, out, n, triton.next_power_of_2(n))
    torch.testing.assert_close(out, x * 2)
    return kernel.autotuner.best_config


def test_unknown_gpu_autotunes_once_and_caches_the_winner_on_disk(env, device):
    kernel, bench, tmp = env
    with fake_gpu(GPU):
        assert config_id(_launch(kernel, device)) == config_id(CONFIGS[1])
        assert bench.calls == 3
        _launch(kernel, device)  # same key in this process: Triton's in-memory cache, no benchmark
        assert bench.calls == 3
        key = "128,torch.float32,torch.float32"  # N_BUCKET, then each tensor argument's dtype
        assert kernel.tuned == {key: config_id(CONFIGS[1])}
        path = kernel.disk_cache_path(GPU)
        assert path.is_relative_to(tmp / "cache") and f"triton-{triton.__version__}" in str(path)
        assert "NVIDIA_Fake_9000_80GB" in str(path) and kernel._source_hash() in path.name
        assert json.loads(path.read_text()) == {key: config_id(CONFIGS[1])}

        # A second process (simulated: this process's choices forgotten) neither benchmarks nor picks another.
        kernel.reset()
        kernel.tuned.clear()
        assert config_id(_launch(kernel, device)) == config_id(CONFIGS[1])
        assert bench.calls == 3 and kernel.tuned == {}


def test_another_gpu_or_kernel_source_does_not_reuse_the_cache(env, monkeypatch, device):
    kernel, bench, _ = env
    with fake_gpu(GPU):
        _launch(kernel, device)
    with fake_gpu("NVIDIA Other GPU"):
        _launch(kernel, device)
        assert bench.calls == 6  # tuned again for the other GPU
    monkeypatch.setattr(kernel, "_source_hash", lambda: "edited-source")
    with fake_gpu(GPU):
        _launch(kernel, device)
        assert bench.calls == 9  # the kernel changed: its old winner may be wrong now


def test_shipped_table_wins_without_benchmarking(env, device):
    kernel, bench, _ = env
    _tuning.write_table("test_scale", GPU, {"128,torch.float32,torch.float32": config_id(CONFIGS[2])})
    with fake_gpu(GPU):
        assert config_id(_launch(kernel, device)) == config_id(CONFIGS[2])
        assert bench.calls == 0 and not kernel.disk_cache_path(GPU).exists()
        # Another size bucket has no entry: that one autotunes.
        _launch(kernel, device, n=1000)
        assert bench.calls == 3


def test_a_table_hit_is_not_timed_where_triton_times_a_lone_config(env, device):
    # Triton 3.6 (the GPU image's) benchmarks even a single pruned config, 3.7+ does not: the bench
    # function the autotuner holds must answer for a table hit without running the kernel ~100 times.
    kernel, bench, _ = env
    _tuning.write_table("test_scale", GPU, {"128,torch.float32,torch.float32": config_id(CONFIGS[2])})
    with fake_gpu(GPU):
        _launch(kernel, device)
        runs = []
        assert kernel.autotuner.do_bench(lambda: runs.append(1), quantiles=(0.5, 0.2, 0.8)) == [0.0] * 3
        assert runs == [] and bench.calls == 0
        _launch(kernel, device, n=1000)  # no entry: three candidates, each timed by the given benchmarker
        assert bench.calls == 3
        assert kernel.autotuner.do_bench(lambda: runs.append(1), quantiles=(0.5, 0.2, 0.8)) == [3.0] * 3
        assert runs == [1]


def test_table_entry_naming_an_unknown_config_is_ignored(env, device):
    kernel, bench, _ = env
    _tuning.write_table("test_scale", GPU, {"128,torch.float32,torch.float32": "BLOCK=8,num_warps=1,num_stages=1"})
    with fake_gpu(GPU):
        assert config_id(_launch(kernel, device)) == config_id(CONFIGS[1])
        assert bench.calls == 3


def test_tuning_mode_ignores_tables_and_cache(env, monkeypatch, device):
    kernel, bench, _ = env
    _tuning.write_table("test_scale", GPU, {"128,torch.float32,torch.float32": config_id(CONFIGS[2])})
    monkeypatch.setenv("VITHYBRID_TUNING", "autotune")
    with fake_gpu(GPU):
        assert config_id(_launch(kernel, device)) == config_id(CONFIGS[1])
        assert bench.calls == 3


def test_forced_config_beats_table_and_interpreter(env, monkeypatch, device):
    kernel, bench, _ = env
    _tuning.write_table("test_scale", GPU, {"128,torch.float32,torch.float32": config_id(CONFIGS[2])})
    with fake_gpu(GPU), force_config("test_scale", CONFIGS[0]):
        assert _launch(kernel, device) is CONFIGS[0]
    monkeypatch.setenv("VITHYBRID_FORCE_CONFIG", f"test_scale={config_id(CONFIGS[0])}")
    kernel.reset()
    assert _launch(kernel, device) is CONFIGS[0]
    assert bench.calls == 0


def test_tune_command_writes_a_table_the_next_run_reads(env, device):
    from vithybrid_fast.tune import write_tables

    kernel, _, tmp = env
    with fake_gpu(GPU):
        _launch(kernel, device)
        written = write_tables(GPU, tmp / "tables")
        assert written["test_scale"] == 1
        table = json.loads((tmp / "tables" / "test_scale.json").read_text())
        assert table == {GPU: {"128,torch.float32,torch.float32": config_id(CONFIGS[1])}}
        # Write twice: entries merge, other GPUs' rows stay.
        _tuning.write_table("test_scale", "NVIDIA Other GPU", {"1024,torch.float32,torch.float32": "x"})
        write_tables(GPU, tmp / "tables")
        assert set(json.loads((tmp / "tables" / "test_scale.json").read_text())) == {GPU, "NVIDIA Other GPU"}


def test_tune_without_a_gpu_fails_clearly(capsys):
    import argparse

    from vithybrid_fast import tune

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: tune would run for minutes")
    code = tune.run(argparse.Namespace(dtypes=["bfloat16"], batches=[1], out=None, no_backward=True))
    assert code == 1 and "needs a CUDA GPU" in capsys.readouterr().err


def test_tune_exercises_every_kernel_family(monkeypatch, device):
    # The model run `tune` times the kernels with, here on the tiny config on the test device (under the
    # interpreter on a CPU): a forward and a backward reach attention (forward and both backward kernels)
    # and the GEMMs.
    from hf_reference import tiny_config

    from vithybrid_fast import ViTHybridConfig
    from vithybrid_fast.tune import exercise

    launched = set()
    for name, kernel in _tuning.REGISTRY.items():
        original = kernel.run

        def spy(*args, _name=name, _original=original, **kwargs):
            launched.add(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", spy)
    config = ViTHybridConfig.from_dict(tiny_config(hidden_size=96))  # head dim 32: flash attention serves it
    exercise(["float32"], [1], backward=True, config=config, device=device)  # natively: the GPU
    assert {"fused_linear", "attention_fwd", "attention_dkdv", "attention_dq"} <= launched


def test_importing_the_package_registers_every_tuned_kernel():
    # A fresh process that imports only the package knows every tuned kernel with a table: before, the
    # group_norm_act backward's was registered only once a backward had run, so force_config on it failed
    # when a test ran alone (KeyError: no tuned kernel named 'group_norm_act_bwd_apply').
    import subprocess
    import sys

    code = "import vithybrid_fast.kernels, vithybrid_fast.kernels._tuning as t; print(' '.join(sorted(t.REGISTRY)))"
    # the environment, with conftest's TRITON_INTERPRET where there is no GPU, passes on (natively on a GPU)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == sorted(p.stem for p in _tuning.TABLE_DIR.glob("*.json"))


def test_shipped_tables_name_real_kernels_and_configs():
    # Every table in the package is valid: a known tuned kernel, and config ids it can launch.
    import importlib
    import pkgutil

    import vithybrid_fast.kernels as package

    for module in pkgutil.iter_modules(package.__path__):  # importing a module registers its tuned kernels
        importlib.import_module(f"{package.__name__}.{module.name}")

    tables = sorted(_tuning.TABLE_DIR.glob("*.json"))
    assert {p.stem for p in tables} >= {"fused_linear", "attention_fwd", "attention_dkdv", "attention_dq"}
    for path in tables:
        kernel = _tuning.REGISTRY[path.stem]
        known = {config_id(c) for c in kernel.configs}
        for gpu, rows in json.loads(path.read_text()).items():
            assert gpu and all(cfg in known for cfg in rows.values()), f"{path.name}: {gpu}"


def test_every_launch_states_fp_fusion(monkeypatch, device):
    """FMA contraction is passed at each launch, direct or through an autotuner and heuristics, rather than
    left to Triton's default (which triton 3.10 turns off: every kernel's rounding would change)."""
    from vithybrid_fast.kernels import add_layer_norm, add_layer_norm_train, attention, weight_standardize
    from vithybrid_fast.kernels.fused_linear import fused_linear, layer_norm_stats

    kernel_class = type(attention._attn_bwd_delta)  # InterpretedFunction here, JITFunction on a GPU
    real_run = kernel_class.run
    seen: list[tuple[str, object]] = []

    def spy(self, *args, **kwargs):
        seen.append((getattr(self, "__name__", None) or self.fn.__name__, kwargs.get("enable_fp_fusion")))
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(kernel_class, "run", spy)
    q, k, v = (torch.randn(1, 2, 20, 32, device=device, requires_grad=True) for _ in range(3))
    attention.flash_attention(q, k, v).sum().backward()  # autotuned forward, direct delta, two backward
    x = torch.randn(5, 32, device=device)
    mean, rstd = layer_norm_stats(x, 1e-5)
    fused_linear(x, torch.randn(16, 32, device=device), ln=(mean, rstd, torch.ones(32, device=device),
                 torch.zeros(32, device=device)), activation="gelu")  # fmt: skip
    weight_standardize(torch.randn(8, 4, 3, 3, device=device))
    add_layer_norm(x, x, torch.ones(32, device=device), torch.zeros(32, device=device), 1e-5)
    w = torch.ones(32, device=device, requires_grad=True)
    add_layer_norm_train(x.requires_grad_(), x, w, torch.zeros(32, device=device), 1e-5, torch.float32)[
        1
    ].sum().backward()
    names = {name for name, _ in seen}
    assert {"_attn_fwd", "_attn_bwd_delta", "_attn_bwd_dkdv", "_attn_bwd_dq", "_layer_norm_stats_kernel",
            "_fused_linear_kernel", "_weight_standardize_fwd", "_add_layer_norm_kernel",
            "_add_layer_norm_bwd_kernel"} <= names, names  # fmt: skip
    # every kernel the default (contracted) but the one that chose otherwise (jit(fp_fusion=False))
    assert {flag for name, flag in seen if name != "_add_layer_norm_bwd_kernel"} == {_tuning.FP_FUSION} == {True}
    assert {flag for name, flag in seen if name == "_add_layer_norm_bwd_kernel"} == {False}


def test_a_table_write_that_fails_leaves_the_table_as_it_was(tmp_path, monkeypatch):
    """The shipped tables were written in place: a Ctrl-C or a full disk mid-write left a truncated JSON that
    every later run would fail to parse (session 20's audit). Now renamed into place."""
    from pathlib import Path

    from vithybrid_fast.kernels import _tuning

    path = _tuning.write_table("demo_kernel", "GPU A", {"k1": "c1"}, tmp_path)
    before = path.read_text()

    def fail(self, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "replace", fail)
    with pytest.raises(OSError, match="No space left"):
        _tuning.write_table("demo_kernel", "GPU B", {"k2": "c2"}, tmp_path)
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
