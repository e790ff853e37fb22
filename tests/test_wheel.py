"""The built wheel, installed outside the source tree, works as a user gets it (issue 10, items 1–2).

The wheel is built from this checkout, installed with `pip install --no-deps --target` into a temporary
site directory, and every check runs in a subprocess whose working directory is elsewhere, so nothing
can come from the source tree. Hugging Face's own `kernels` distribution (installed by `make` into
.venv/hf-kernels; transformers >= 4.51 imports it) must import beside ours.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HF_KERNELS = ROOT / ".venv" / "hf-kernels"


def _checkout_copy(dest: Path) -> Path:
    """The files git would commit (tracked, plus untracked ones it does not ignore), copied to `dest`.

    Built in place, setuptools reuses the checkout's build/ folder, which still holds files deleted since
    (a removed bench/test_bench_pytest.py was once shipped that way); a fresh clone has none.
    """
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True,
        timeout=60, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():  # a deleted but still tracked file is listed too
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def _package_sources() -> set[str]:
    """The .py files the three packages hold in this checkout, named as inside vithybrid_fast/ of the wheel."""
    found = {p.relative_to(ROOT / "vithybrid_fast").as_posix() for p in (ROOT / "vithybrid_fast").glob("*.py")}
    for folder in ("kernels", "bench"):
        found |= {f"{folder}/{p.name}" for p in (ROOT / folder).glob("*.py")}
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    source = _checkout_copy(tmp_path_factory.mktemp("source"))
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w",
         str(dist)],
        capture_output=True, text=True, timeout=300, cwd=dist,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    (path,) = dist.glob("vithybrid_fast-*.whl")
    return path


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return target


def run_installed(site: Path, code: str, cwd: Path, extra_path: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=os.pathsep.join(str(p) for p in (site, *extra_path)), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_wheel_ships_data_and_namespaced_packages(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "vithybrid_fast/assets/imagenet1k_labels.json" in names
    assert "vithybrid_fast/assets/grace_hopper.jpg" in names
    assert "vithybrid_fast/kernels/configs/fused_linear.json" in names  # tuned-config tables
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)  # the Apache-2.0 text pyproject declares
    assert {"vithybrid_fast/kernels/attention.py", "vithybrid_fast/bench/__main__.py"} <= names
    top_level = {name.split("/")[0] for name in names if "/" in name and ".dist-info" not in name}
    assert top_level == {"vithybrid_fast"}, top_level  # no top-level kernels/ or bench/
    packaged_py = {n for n in names if n.endswith(".py")}
    tracked_py = {f"vithybrid_fast/{n}" for n in _package_sources()}
    assert packaged_py == tracked_py, packaged_py ^ tracked_py  # nothing stale, nothing missing


def test_installed_copy_builds_the_base_config_and_classifies(site, tmp_path):
    code = f"""
import sys, torch, vithybrid_fast as vf, vithybrid_fast.kernels as k
assert vf.__file__.startswith({str(site)!r}), vf.__file__
assert k.__file__.startswith({str(site)!r}), k.__file__
cfg = vf.ViTHybridConfig.base_384()
assert cfg.num_labels == 1000 and cfg.id2label[281] == "tabby, tabby cat", cfg.id2label[281]
from vithybrid_fast.processing import sample_image_path
assert sample_image_path().is_file()
tiny = vf.ViTHybridConfig.from_dict({{"image_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
    "num_attention_heads": 2, "intermediate_size": 40, "backbone_featmap_shape": [1, 64, 4, 4],
    "backbone_config": {{"embedding_size": 8, "hidden_sizes": [16, 32, 64], "depths": [1, 1, 1], "num_groups": 4,
    "layer_type": "bottleneck", "global_padding": "SAME", "out_features": ["stage3"]}}}})
vf.ViTHybridForImageClassification(tiny).save_pretrained("ckpt")
vf.ViTHybridImageProcessor.for_base_384(size={{"shortest_edge": 64}},
    crop_size={{"height": 64, "width": 64}}).save_pretrained("ckpt")
from vithybrid_fast.cli import main
sys.exit(main(["classify", str(sample_image_path()), "--model", "ckpt", "--kernels", "sdpa", "--top-k", "2"]))
"""
    out = run_installed(site, code, tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].endswith("grace_hopper.jpg") and len(lines) == 3
    assert all(0 <= float(line.split()[0]) <= 1 for line in lines[1:])


def test_installed_copy_has_the_checkouts_source_digest(site, tmp_path):
    # Benchmark records carry this digest so a result names its code even where git metadata is stale.
    from vithybrid_fast.bench.common import source_digest

    out = run_installed(site, "from vithybrid_fast.bench.common import source_digest; print(source_digest())", tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == source_digest()


def test_installed_console_script_runs_the_demo(site, tmp_path):
    script = site / "bin" / "vithybrid-fast"
    assert script.is_file()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run(
        [sys.executable, str(script), "demo"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    assert "RANDOM weights" in out.stdout
    assert str(site) in out.stdout  # the bundled image came from the installed copy


def test_hugging_face_kernels_package_imports_beside_ours(site, tmp_path):
    if not (HF_KERNELS / "kernels" / "__init__.py").is_file():
        pytest.skip(f"Hugging Face's kernels package is not installed in {HF_KERNELS} (make installs it)")
    code = f"""
import importlib.metadata as md, kernels, vithybrid_fast.kernels as ours
assert kernels.__file__.startswith({str(HF_KERNELS)!r}), kernels.__file__
assert hasattr(kernels, "get_kernel"), dir(kernels)  # Hugging Face's API, not ours
assert callable(ours.flash_attention) and ours.__file__.startswith({str(site)!r})
dist = md.distribution("vithybrid-fast")
assert not any(str(f).startswith(("kernels/", "bench/")) for f in dist.files)
print("ok", md.version("kernels"))
"""
    out = run_installed(site, code, tmp_path, extra_path=(HF_KERNELS,))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok ")


def test_installed_copy_passes_model_and_saving_tests(site, tmp_path):
    """A slice of this suite, run against the installed package instead of the checkout."""
    tests = tmp_path / "tests"
    tests.mkdir()
    for name in ("conftest.py", "hf_reference.py", "tolerance.py", "test_model.py", "test_saving.py"):
        (tests / name).write_bytes((ROOT / "tests" / name).read_bytes())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=os.pathsep.join([str(site), str(tmp_path)]))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tests)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and " failed" not in out.stdout
