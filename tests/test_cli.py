"""The `vithybrid-fast` command as a user runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.hf_reference import TINY_CASES, build_hf_model
from vithybrid_fast.cli import main
from vithybrid_fast.gpu_support import native_triton_unsupported_reason
from vithybrid_fast.processing import ViTHybridImageProcessor, sample_image_path

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    build_hf_model(TINY_CASES["bottleneck-same"]).save_pretrained(path)
    ViTHybridImageProcessor.for_base_384(
        size={"shortest_edge": 72}, crop_size={"height": 72, "width": 72}
    ).save_pretrained(path)
    return path


def test_classify_prints_top_k_with_probabilities(checkpoint, tmp_path, capsys):
    image, copy = str(sample_image_path()), tmp_path / "copy.jpg"
    shutil.copyfile(image, copy)  # two files: the same path twice is classified once
    assert main(["classify", image, str(copy), "--model", str(checkpoint), "--kernels", "sdpa", "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == image and lines[4] == str(copy) and len(lines) == 8
    probs = [float(line.split()[0]) for line in lines[1:4]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert all(line.split()[1].startswith("class_") for line in lines[1:4])


def test_classify_unreadable_image(checkpoint, tmp_path, capsys):
    bad = tmp_path / "not-an-image.jpg"
    bad.write_text("hello")
    assert main(["classify", str(bad), "--model", str(checkpoint), "--kernels", "sdpa"]) == 1
    assert "cannot read image" in capsys.readouterr().err


def test_a_config_warning_is_one_prefixed_line(checkpoint, tmp_path, capsys):
    """The loader's log records (here a label2id that does not match id2label) print as `warning: …` like the
    other warnings; Python printed their bare text. Nothing is left attached after the command."""
    import json
    import logging

    edited = tmp_path / "ckpt"
    shutil.copytree(checkpoint, edited)
    config = json.loads((edited / "config.json").read_text())
    config["label2id"] = {"not-a-label": 0}
    (edited / "config.json").write_text(json.dumps(config))
    handlers = list(logging.getLogger("vithybrid_fast").handlers)
    assert main(["classify", str(sample_image_path()), "--model", str(edited), "--kernels", "sdpa"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert "warning: label2id does not match id2label: rebuilt from id2label" in err, err
    assert logging.getLogger("vithybrid_fast").handlers == handlers


def test_classify_missing_checkpoint_is_an_error_not_a_traceback(tmp_path, capsys):
    assert main(["classify", str(sample_image_path()), "--model", str(tmp_path / "nowhere")]) == 1
    assert "no such checkpoint directory" in capsys.readouterr().err


def test_demo_runs_offline_and_says_weights_are_random(tmp_path):
    # TRITON_INTERPRET=0: the user's "no interpreter" stands (unset, a GPU-less demo checks the kernels in the
    # interpreter: tests/test_cli_demo.py), so without a GPU that runs Triton the demo says why it skips it
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))  # an empty cache: the random-weights path
    out = subprocess.run(
        [sys.executable, "-m", "vithybrid_fast.cli", "demo"], env=env, cwd=ROOT, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "RANDOM weights" in out.stdout
    # triton joins where it runs natively (a CUDA GPU of sm_80 or newer), else the demo says why not
    reason = native_triton_unsupported_reason("cuda" if torch.cuda.is_available() else "cpu")
    paths = {"eager", "sdpa"} | ({"triton"} if reason is None else set())
    starts = tuple(f"{path} " for path in paths)
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.startswith(starts)}
    assert set(rows) == paths
    assert float(rows["eager"][2]) == 0.0 and float(rows["sdpa"][2]) < 1e-3  # sdpa agrees with eager
    if reason is None:
        assert float(rows["triton"][2]) < 1e-3 and "triton: skipped" not in out.stdout
    else:
        assert f"triton: skipped ({reason};" in out.stdout


# -- classify: paths, unreadable files, warnings ---------------------------------------------------


def _printed_paths(out: str) -> list[str]:
    return [line for line in out.splitlines() if not line.startswith(" ")]


@pytest.fixture
def photos(tmp_path):
    """photos/a.jpg, photos/b/c.JPEG: two 8-bit images (the extension's case differs)."""
    root = tmp_path / "photos"
    (root / "b").mkdir(parents=True)
    Image.new("RGB", (80, 60), (200, 10, 10)).save(root / "a.jpg")
    Image.new("RGB", (60, 80), (10, 200, 10)).save(root / "b" / "c.JPEG")
    return root


def test_classify_each_file_once_when_inputs_overlap(checkpoint, photos, capsys):
    """A directory, a glob over it and another spelling of one of its files: each file once, first seen first."""
    other_spelling = photos / "b" / ".." / "a.jpg"
    argv = ["classify", str(other_spelling), str(photos), str(photos / "**" / "*.JPEG"), "--model", str(checkpoint),
            "--kernels", "sdpa", "--top-k", "1"]  # fmt: skip
    assert main(argv) == 0
    assert _printed_paths(capsys.readouterr().out) == [str(other_spelling), str(photos / "b" / "c.JPEG")]


def test_classify_on_error_skip_goes_on_and_counts(checkpoint, photos, capsys):
    bad = photos / "broken.jpg"
    bad.write_text("not a JPEG")
    good = [str(photos / "a.jpg"), str(photos / "b" / "c.JPEG")]
    argv = ["classify", good[0], str(bad), good[1], "--model", str(checkpoint), "--kernels", "sdpa", "--top-k", "2",
            "--batch-size", "2"]  # fmt: skip
    assert main([*argv, "--on-error", "skip"]) == 0
    out, err = capsys.readouterr()
    assert _printed_paths(out) == good and len(out.splitlines()) == 6
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith(f"warning: skipped unreadable image {bad}: ")
    assert lines[1] == "skipped unreadable: 1 of 3 images"
    # the default stops at the file, names it and says how to go on
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read image {bad}: ") and "--on-error skip" in err


def test_max_image_pixels_sets_pillows_limit_for_the_command_only(checkpoint, photos, capsys):
    """An 80×60 photo (4,800 px) is over twice a 2,000 px limit: Pillow refuses it as a decompression bomb."""
    default = Image.MAX_IMAGE_PIXELS
    argv = ["classify", str(photos / "a.jpg"), "--model", str(checkpoint), "--kernels", "sdpa", "--top-k", "1"]
    assert main([*argv, "--max-image-pixels", "2,000"]) == 1
    assert "DecompressionBombError" in capsys.readouterr().err and default == Image.MAX_IMAGE_PIXELS
    assert main([*argv, "--max-image-pixels", "none"]) == 0
    assert _printed_paths(capsys.readouterr().out) == [str(photos / "a.jpg")] and default == Image.MAX_IMAGE_PIXELS
    for bad in ("0", "lots"):
        with pytest.raises(SystemExit) as stop:
            main([*argv, "--max-image-pixels", bad])
        assert stop.value.code == 2
    assert "argument --max-image-pixels: 'lots' is neither a number of pixels nor 'none'" in capsys.readouterr().err


def test_classify_on_error_skip_with_nothing_readable_fails(checkpoint, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_text("not a PNG")
    assert main(["classify", str(bad), "--model", str(checkpoint), "--kernels", "sdpa", "--on-error", "skip"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines()[1:] == ["skipped unreadable: 1 of 1 images", "error: none of the 1 images could be read"]


def test_classify_16_bit_warning_is_one_line(checkpoint, tmp_path):
    path = tmp_path / "deep.tiff"
    Image.new("I;16", (80, 80), 40000).save(path)
    done = subprocess.run(
        [sys.executable, "-m", "vithybrid_fast", "classify", str(path), "--model", str(checkpoint), "--kernels", "sdpa",
         "--top-k", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == str(path)
    assert done.stderr.splitlines() == [
        f"warning: {path}: a I;16 (16-bit or float) image; converting it to 8-bit RGB clips its values to 0–255 and "
        "drops fractions (a 16-bit image turns mostly white, a 0–1 float image black), so the model sees a "
        "destroyed image. Convert it to 8-bit yourself first (e.g. scale to 0–255)."
    ]


def test_classify_runs_on_the_gpu_when_there_is_one(checkpoint, monkeypatch, capsys):
    """Like demo, eval and finetune, classify defaults to cuda when torch sees a GPU (it took the CPU)."""
    import vithybrid_fast.loading as loading

    asked = {}

    def load_spy(*args, **kwargs):
        asked["device"] = kwargs["device"]
        raise RuntimeError("stop here: the device is what this test checks")

    monkeypatch.setattr(loading, "load", load_spy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main(["classify", str(sample_image_path()), "--model", str(checkpoint)]) == 1
    assert asked["device"] == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["classify", str(sample_image_path()), "--model", str(checkpoint)]) == 1
    assert asked["device"] == torch.device("cpu")
    assert main(["classify", str(sample_image_path()), "--model", str(checkpoint), "--device", "cuda:1"]) == 1
    assert "--device cuda:1: no CUDA GPU is visible to torch" in capsys.readouterr().err


def test_ctrl_c_ends_any_command_with_one_line_and_130(monkeypatch, capsys):
    import vithybrid_fast.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_classify", interrupted)
    assert main(["classify", str(sample_image_path())]) == 130
    assert capsys.readouterr().err == "\ninterrupted\n"


CTRL_C_WHILE_TORCH_LOADS = """
import sys

class CtrlC:  # Ctrl-C while the package imports torch: raised as its first heavy module loads
    def find_spec(self, name, path=None, target=None):
        if name == "vithybrid_fast.config":
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, CtrlC())
sys.argv[0] = sys.argv[1]
import vithybrid_fast
"""


@pytest.mark.parametrize(("argv0", "code"), [("/usr/local/bin/vithybrid-fast", 130), ("python-or-pytest", -2)])
def test_ctrl_c_while_the_package_loads_is_one_line_for_the_command_only(argv0, code):
    """The audit's Ctrl-C 0.2 s into `vithybrid-fast classify …` printed a traceback (torch still loading,
    before main's handler); any other importer must still get the KeyboardInterrupt itself."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", CTRL_C_WHILE_TORCH_LOADS, argv0], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == code
    if code == 130:
        assert done.stderr == "\ninterrupted\n"
    else:  # an uncaught KeyboardInterrupt: Python's traceback and its death by SIGINT (-2)
        assert "Traceback" in done.stderr and done.stderr.rstrip().endswith("KeyboardInterrupt")


def test_ctrl_c_while_the_package_loads_under_python_m(tmp_path):
    """`python -m vithybrid_fast …` is the command too (torchrun runs it so): one line and 130, no traceback."""
    finder = CTRL_C_WHILE_TORCH_LOADS.split("sys.argv[0] = sys.argv[1]")[0]  # the finder alone, installed at start-up
    (tmp_path / "sitecustomize.py").write_text(finder)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parents[1])])}
    done = subprocess.run([sys.executable, "-m", "vithybrid_fast", "classify", "x.jpg"], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert (done.returncode, done.stderr) == (130, "\ninterrupted\n")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["classify", "x.jpg", "--device", "xpu"],
            "argument --device: the commands run on cpu or cuda (cuda:N), not xpu",
        ),
        (["eval", "d", "--device", "hpu"], "argument --device: the commands run on cpu or cuda (cuda:N), not hpu"),
        (
            ["finetune", "d", "--device", "meta"],
            "argument --device: the commands run on cpu or cuda (cuda:N), not meta",
        ),
        (["demo", "--device", "gpu"], "argument --device: not a device name; use cpu, cuda or cuda:N"),
        (["doctor", "--device", "cuda:x"], "argument --device: not a device name; use cpu, cuda or cuda:N"),
        (["doctor", "--dtypes", "float64"], "argument --dtypes: unknown dtype ['float64']"),
        (["doctor", "--drift-dtype", "float64"], "argument --drift-dtype: invalid choice: 'float64'"),
        (["export", "--output", "m.onnx", "--opset", "x"], "argument --opset: 'x' is not an integer"),
        (["export", "--output", "m.onnx", "--image-size", "10", "72"], "argument --image-size: must be at least 17"),
        (["export", "--output", "m.onnx", "--dynamic-batch", "--batch", "4"], "not allowed with argument"),
    ],
)
def test_a_wrong_flag_value_is_a_usage_error(argv, message, capsys):
    """Exit 2 and one line naming the flag, before any work. `--device xpu` ended in a traceback from torch,
    `--device gpu` in torch's list of every device type, `export --opset 17` and `doctor --dtypes float64`
    exited 1, and `--batch` beside `--dynamic-batch` was ignored."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1], err


def test_an_opset_outside_the_exporters_range_is_a_usage_error(capsys):
    from vithybrid_fast.export import _opset_range

    low, high = _opset_range()
    for opset in (low - 1, high + 1):
        with pytest.raises(SystemExit) as exit_:
            main(["export", "--output", "m.onnx", "--opset", str(opset)])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(
            f"argument --opset: opset must be an int from {low} to {high} (the opsets torch's dynamo exporter "
            f"can write with the installed onnxscript), got {opset}"
        ), err


def test_a_gpu_index_past_the_visible_ones_is_refused_before_any_work(monkeypatch):
    """`--device cuda:3` on a one-GPU machine failed later with CUDA's "invalid device ordinal"."""
    from vithybrid_fast.gpu_support import command_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert command_device("cuda:0") == torch.device("cuda", 0) and command_device("cuda") == torch.device("cuda")
    assert command_device("cpu:0") == torch.device("cpu", 0)
    with pytest.raises(ValueError, match=r"^--device cuda:3: torch sees 1 CUDA GPU \(cuda:0\)$"):
        command_device("cuda:3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"^--device cuda:2: torch sees 2 CUDA GPUs \(cuda:0 … cuda:1\)$"):
        command_device("cuda:2")
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun: each rank takes cuda:LOCAL_RANK instead
    assert command_device("cuda:2") == torch.device("cuda", 2)
