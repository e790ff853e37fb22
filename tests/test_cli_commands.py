"""The command line around the commands: `bench` without its extra, and `warmup`'s last line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from vithybrid_fast.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_bench_without_matplotlib_is_one_line_naming_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "vithybrid_fast.bench.report", raising=False)
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "VITHYBRID_CACHE_DIR"):  # bench repoints these
        monkeypatch.setenv(name, os.environ.get(name, str(tmp_path / name)))
    assert main(["bench", "--device", "cpu", "--output-dir", str(tmp_path / "out")]) == 1
    assert (
        capsys.readouterr().err == 'error: vithybrid-fast bench needs matplotlib: pip install "vithybrid-fast[bench]"\n'
    )


def _warmup(cache: Path) -> list[str]:
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(cache)}
    cmd = [sys.executable, "-m", "vithybrid_fast", "warmup", "--arch", "sm_90", "--dtype", "bfloat16",
           "--batches", "1", "--workers", "1"]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout.strip().splitlines()


def test_warmup_counts_only_what_it_compiled(tmp_path):
    first = _warmup(tmp_path / "triton-cache")
    match = re.fullmatch(r"compiles: (\d+), seconds: ([\d.]+) \(0 already cached\)", first[-1])
    assert match, first[-1]
    kernels = int(match.group(1))
    assert kernels > 0 and float(match.group(2)) > 0
    assert first[-3].endswith("with 1 worker"), first[-3]
    # the same run again: everything is cached, nothing compiles
    second = _warmup(tmp_path / "triton-cache")
    assert second[-1] == f"compiles: 0, seconds: 0.0 ({kernels} already cached)"
    assert second[-2].startswith("cpu-seconds: 0.0 ")
    assert f": {kernels} kernels ({kernels} already cached), " in second[-3]
    assert int(second[-1].split(",")[0].split(":")[1]) == 0  # how tests/test_gpu_targets.py reads N
