"""The command line around the commands: top-level help and --version, subcommand help, `bench` without its
extra, and `warmup`'s last line."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vithybrid_fast import cli
from vithybrid_fast.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_names_every_command(capsys):
    out = _help(capsys)
    description = out.split("\n\n")[1]  # usage, then the description
    for command in ("classify", "demo", "eval", "finetune", "export", "bench", "doctor", "warmup", "tune"):
        assert re.search(rf"\b{command}\b", description), (command, description)


@pytest.mark.parametrize(
    "command, says",
    [("demo", "TRITON_INTERPRET=1"), ("warmup", "compiles: N, seconds: S"), ("tune", "tables: N entries")],
)
def test_subcommands_have_a_description(capsys, command, says):
    out = _help(capsys, command)
    assert says in " ".join(out.split())  # reflowed text: compare with whitespace collapsed


def test_classify_help_shows_defaults(capsys):
    out = " ".join(_help(capsys, "classify").split())
    for default in ("(default: auto)", "(default: float32)", "(default: 5)", "(default: 16)", "(default: fail)"):
        assert default in out, default


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    try:  # installed (CI, a wheel); the GPU machine runs the source tree uninstalled, on PYTHONPATH
        expected = importlib.metadata.version("vithybrid-fast")
    except importlib.metadata.PackageNotFoundError:
        declared = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
        expected = f"{declared} (source tree {ROOT}, not installed)"
    assert capsys.readouterr().out == f"vithybrid-fast {expected}\n"


def test_version_in_a_source_tree_that_is_not_installed(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    declared = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert cli.package_version() == f"{declared} (source tree {ROOT}, not installed)"


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


def test_warmup_whose_compiles_all_fail_says_so_on_its_last_line(tmp_path):
    """Failed compiles were counted as compiled: 'compiles: 17' after 17 error lines (session 20's audit)."""
    (tmp_path / "a-file").write_text("")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "a-file" / "cache")}
    cmd = [sys.executable, "-m", "vithybrid_fast", "warmup", "--arch", "sm_90", "--dtype", "bfloat16",
           "--batches", "1", "--workers", "1"]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    last = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        r"compiles: 0, seconds: 0\.0 \(0 already cached\), FAILED: \d+ \(see the error lines above\)", last
    ), last
