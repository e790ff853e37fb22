"""The command line around the commands: `bench` without its extra."""

from __future__ import annotations

import os
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
