"""Bad input gets a clear error (issue 10, items 7–10): checkpoints, hub names and paths, CLI inputs, batches."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import vithybrid_fast as vf
from tests.hf_reference import TINY_CASES, build_hf_model
from tests.hub_calls import record_hub_downloads
from tests.test_loading import REPO_ID, logits_of, make_offline_cache
from vithybrid_fast import hub
from vithybrid_fast.cli import main
from vithybrid_fast.images import expand_image_paths, open_image
from vithybrid_fast.processing import ViTHybridImageProcessor, sample_image_path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    build_hf_model(TINY_CASES["bottleneck-same"], "eager").save_pretrained(path)
    ViTHybridImageProcessor.for_base_384(
        size={"shortest_edge": 72}, crop_size={"height": 72, "width": 72}
    ).save_pretrained(path)
    return path


def copy_checkpoint(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


# -- checkpoints (item 7) --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_non_float_weight_is_a_checkpoint_error(tmp_path, checkpoint, dtype):
    path = copy_checkpoint(checkpoint, tmp_path / "ckpt")
    state = load_file(path / "model.safetensors")
    state["vit.layernorm.weight"] = torch.ones_like(state["vit.layernorm.weight"], dtype=dtype)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(vf.CheckpointError, match=rf"vit\.layernorm\.weight is a {dtype}"):
        vf.load(path, kernels="eager")


def _shard(tmp_path, checkpoint, first_shard_name: str):
    """A two-shard checkpoint whose index names `first_shard_name` for the layernorm keys."""
    path = copy_checkpoint(checkpoint, tmp_path / "ckpt")
    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    first = {k: v for k, v in state.items() if k.startswith("vit.layernorm")}
    rest = {k: v for k, v in state.items() if k not in first}
    save_file(rest, path / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    index = {
        "weight_map": {
            **dict.fromkeys(first, first_shard_name),
            **dict.fromkeys(rest, "model-00002-of-00002.safetensors"),
        }
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path, first


def test_shard_index_pointing_outside_the_checkpoint_is_refused(tmp_path, checkpoint):
    path, first = _shard(tmp_path, checkpoint, "../other/model.safetensors")
    (tmp_path / "other").mkdir()
    save_file(first, tmp_path / "other" / "model.safetensors", metadata={"format": "pt"})  # it exists: still refused
    with pytest.raises(vf.CheckpointError, match=r"'\.\./other/model\.safetensors' .* not a file name inside"):
        vf.load(path, kernels="eager")


def test_keys_listed_in_the_index_but_absent_from_their_shard(tmp_path, checkpoint):
    path, _ = _shard(tmp_path, checkpoint, "model-00001-of-00002.safetensors")
    save_file({}, path / "model-00001-of-00002.safetensors", metadata={"format": "pt"})  # the shard lost its keys
    with pytest.raises(vf.CheckpointError, match=r"index lists keys its shards do not hold: vit\.layernorm\.bias"):
        vf.load(path, kernels="eager")


def test_correct_two_shard_checkpoint_still_loads(tmp_path, checkpoint):
    path, first = _shard(tmp_path, checkpoint, "model-00001-of-00002.safetensors")
    save_file(first, path / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    sharded, whole = vf.load(path, kernels="eager"), vf.load(checkpoint, kernels="eager")
    assert sharded.state_dict().keys() == whole.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(sharded.state_dict().values(), whole.state_dict().values()))
    # The weights are served memory-mapped at each file's offsets, which differ in alignment between the
    # two layouts (here 0/12 against 4/8 mod 16), and the CPU's vectorized kernels round by alignment:
    # the same weights, logits 1 ulp apart on some CPUs (seen on session 12's machine).
    torch.testing.assert_close(logits_of(sharded), logits_of(whole), rtol=0, atol=1e-6)


# -- hub and paths (item 8) ------------------------------------------------------------------------


@pytest.fixture
def dead_network(monkeypatch):
    """No route to the hub; huggingface_hub must not even be asked to try the network."""

    def refuse(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(hub, "_REACHABILITY", {})
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    return record_hub_downloads(monkeypatch)


def test_unreachable_hub_says_so_and_suggests_offline(tmp_path, dead_network):
    with pytest.raises(vf.CheckpointNotFoundError) as info:
        vf.load("someone/not-cached", cache_dir=tmp_path)
    message = str(info.value)
    assert "hub is unreachable" in message and "Network is unreachable" in message
    assert "HF_HUB_OFFLINE=1" in message and "not found in the hub" not in message
    assert dead_network and all(call["local_files_only"] for call in dead_network)  # no retries against a dead network


def test_offline_and_uncached_says_where_it_looked_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(vf.CheckpointNotFoundError) as info:
        vf.load("someone/not-cached", cache_dir=tmp_path)
    message = str(info.value)
    assert message.startswith(f"config.json of someone/not-cached is not in the local Hugging Face cache ({tmp_path})")
    assert "HF_HUB_OFFLINE is set" in message and "unset HF_HUB_OFFLINE" in message
    assert "LocalEntryNotFoundError" not in message  # the exception's class name said nothing to a user


def test_unreachable_hub_still_serves_the_cache(tmp_path, checkpoint, dead_network):
    cache = tmp_path / "hf-cache"
    make_offline_cache(cache, checkpoint)
    model = vf.load(REPO_ID, kernels="eager", cache_dir=cache)
    assert model.config.hidden_size == 48
    assert all(call["local_files_only"] for call in dead_network)


def test_processor_preset_fallback_is_offline_when_the_hub_is_unreachable(tmp_path, dead_network):
    processor = vf.load_processor(REPO_ID, cache_dir=tmp_path)
    assert processor.to_dict() == ViTHybridImageProcessor.for_base_384().to_dict()
    assert all(call["local_files_only"] for call in dead_network)


@pytest.mark.parametrize("name", ["./ckpt", "ckpt/sub/dir"])
def test_local_looking_names_are_paths(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(vf.CheckpointNotFoundError, match="no such checkpoint directory"):
        vf.load(name)


def test_bare_name_that_is_neither_dir_nor_repo(tmp_path, monkeypatch, dead_network):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(vf.CheckpointNotFoundError, match="not a local directory either"):
        vf.load("does_not_exist_dir", cache_dir=tmp_path)


def test_path_to_a_file_names_the_directory(checkpoint):
    with pytest.raises(vf.CheckpointNotFoundError, match=r"is a file; pass the checkpoint directory .*perhaps"):
        vf.load(checkpoint / "model.safetensors")


# -- command line (item 9) -------------------------------------------------------------------------


@pytest.fixture
def image_tree(tmp_path):
    """a/x.png, a/b/y.jpg, a/notes.txt: two images found recursively, the text file ignored."""
    root = tmp_path / "imgs"
    (root / "b").mkdir(parents=True)
    Image.new("RGB", (80, 60), (200, 10, 10)).save(root / "x.png")
    Image.new("RGB", (60, 80), (10, 200, 10)).save(root / "b" / "y.jpg")
    (root / "notes.txt").write_text("not an image")
    return root


def test_expand_directories_and_globs(image_tree):
    assert expand_image_paths([image_tree]) == [image_tree / "b" / "y.jpg", image_tree / "x.png"]
    assert expand_image_paths([str(image_tree / "**" / "*.jpg")]) == [image_tree / "b" / "y.jpg"]
    with pytest.raises(FileNotFoundError, match="matches no image files"):
        expand_image_paths([str(image_tree / "*.gif")])
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        expand_image_paths([image_tree / "missing.png"])


def test_classify_directory_and_quoted_glob(checkpoint, image_tree, capsys):
    assert main(["classify", str(image_tree), str(image_tree / "*.png"), "--model", str(checkpoint),
                 "--kernels", "sdpa", "--top-k", "1", "--batch-size", "2"]) == 0  # fmt: skip
    printed = [line for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")]
    # x.png is both in the directory and matched by the glob: classified once, where first seen
    assert printed == [str(image_tree / "b" / "y.jpg"), str(image_tree / "x.png")]


def _png_broken_after_its_header(path):
    """A PNG whose second data chunk has a garbled type: Pillow opens it, then raises SyntaxError (no
    OSError) while decoding."""
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)  # incompressible: two IDAT chunks
    data = bytearray(path.read_bytes())
    second = data.index(b"IDAT", data.index(b"IDAT") + 4)
    data[second : second + 4] = b"\x19\x12dH"
    path.write_bytes(bytes(data))
    return path


def test_classify_any_decoding_error_is_one_line_or_skipped(checkpoint, image_tree, capsys, monkeypatch):
    """A broken PNG (SyntaxError) and an image over Pillow's pixel limit (DecompressionBombError) are no
    OSErrors: they ended classify with a traceback, --on-error skip or not."""
    broken = _png_broken_after_its_header(image_tree / "broken.png")
    bomb = image_tree / "bomb.png"
    Image.new("L", (400, 300)).save(bomb)
    # 120,000 pixels > 2 × the limit: an error, not a warning (the broken PNG's 40,000 stay below the limit)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)
    argv = ["classify", "--model", str(checkpoint), "--kernels", "sdpa", "--top-k", "1"]
    for path, error in ((broken, "SyntaxError: broken PNG file"), (bomb, "DecompressionBombError: Image size")):
        assert main([*argv, str(path)]) == 1
        assert capsys.readouterr().err.startswith(f"error: cannot read image {path}: {error}")
    assert main([*argv, str(image_tree), "--on-error", "skip"]) == 0
    out, err = capsys.readouterr()
    assert [line for line in out.splitlines() if not line.startswith(" ")] == [
        str(image_tree / "b" / "y.jpg"), str(image_tree / "x.png")
    ]  # fmt: skip
    assert f"warning: skipped unreadable image {bomb}: DecompressionBombError" in err
    assert f"warning: skipped unreadable image {broken}: SyntaxError" in err
    assert err.splitlines()[-1] == "skipped unreadable: 2 of 4 images"


def test_a_directory_yields_neither_hidden_files_nor_files_pillow_cannot_decode(image_tree):
    """A macOS `._x.jpg`, a `.ipynb_checkpoints/` copy, a PDF and an HDF5 file stopped classify (or were
    classified twice): Pillow registers .pdf (write-only) and .h5 (a stub without a decoder)."""
    (image_tree / "._x.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (image_tree / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(image_tree / ".ipynb_checkpoints" / "x-checkpoint.png")
    (image_tree / "scan.pdf").write_bytes(b"%PDF-1.4")
    (image_tree / "features.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    assert expand_image_paths([image_tree]) == [image_tree / "b" / "y.jpg", image_tree / "x.png"]
    assert expand_image_paths([image_tree / "._x.jpg"]) == [image_tree / "._x.jpg"]  # named: taken as given


def test_classify_preprocesses_each_image_as_it_is_read(checkpoint, image_tree, monkeypatch, capsys):
    """A batch decoded whole before any image was shrunk held 16 full-size photos (5.9 GB for 48 MP ones)."""
    from vithybrid_fast import images, processing

    events = []
    opened, preprocess = images.open_image, processing.ViTHybridImageProcessor.__call__
    monkeypatch.setattr(images, "open_image", lambda path: events.append("open") or opened(path))
    monkeypatch.setattr(
        processing.ViTHybridImageProcessor, "__call__",
        lambda self, batch, **kw: events.append(f"preprocess {len(batch)}") or preprocess(self, batch, **kw),
    )  # fmt: skip
    assert main(["classify", str(image_tree), "--model", str(checkpoint), "--kernels", "sdpa"]) == 0
    assert events == ["open", "preprocess 1", "open", "preprocess 1"]
    assert capsys.readouterr().out.count(str(image_tree)) == 2


def test_classify_headless_checkpoint_is_a_clear_error(tmp_path, capsys):
    model = build_hf_model(TINY_CASES["bottleneck-same"]).vit
    model.save_pretrained(tmp_path)
    assert main(["classify", str(sample_image_path()), "--model", str(tmp_path), "--kernels", "sdpa"]) == 1
    assert "without a classification head" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags", [["--dtype", "float64"], ["--dtype", "fp16"], ["--top-k", "0"], ["--batch-size", "0"]]
)
def test_usage_errors_exit_2(checkpoint, flags):
    with pytest.raises(SystemExit) as info:
        main(["classify", str(sample_image_path()), "--model", str(checkpoint), *flags])
    assert info.value.code == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["doctor", "--batch", "0"], "argument --batch: must be at least 1, got 0"),  # ran with the default
        (["doctor", "--batch", "-1"], "argument --batch: must be at least 1, got -1"),  # failed inside torch
        (["warmup", "--workers", "-3"], "argument --workers: must be at least 1, got -3"),  # was accepted
    ],
)
def test_counts_out_of_range_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_closed_pipe_is_not_a_traceback(checkpoint, image_tree):
    command = (
        f"{sys.executable} -m vithybrid_fast classify {image_tree} {image_tree} {image_tree} {image_tree} "
        f"--model {checkpoint} --kernels sdpa --top-k 5 | head -n 1"
    )
    out = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == str(image_tree / "b" / "y.jpg")
    assert "Traceback" not in out.stderr and "BrokenPipeError" not in out.stderr, out.stderr
    assert out.returncode == 0


def test_exif_orientation_is_applied(tmp_path):
    """A 40×20 photo stored with 'rotate 90°' (EXIF orientation 6) is 20×40 when opened."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    upright = open_image(tmp_path / "rotated.jpg")
    assert upright.size == (20, 40)
    top = np.asarray(upright)[2, 10]
    assert top[0] > 200 and top[1] < 60  # the red half is on top after the 90° turn


@pytest.mark.parametrize("mode, value", [("I;16", 40000), ("F", 0.5)])
def test_16_bit_and_float_images_warn(tmp_path, mode, value):
    path = tmp_path / "deep.tiff"
    Image.new(mode, (8, 8), value).save(path)
    with pytest.warns(UserWarning, match="destroyed image"):
        open_image(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
        open_image(tmp_path / "ok.png")  # an ordinary 8-bit image: no warning


# -- batches and devices (item 10) -----------------------------------------------------------------


def test_batch_of_zero_images_is_a_clear_error(checkpoint):
    model = vf.load(checkpoint, kernels="eager")
    with pytest.raises(ValueError, match="batch size 0"):
        model(torch.zeros(0, 3, 72, 72))


def test_patched_meta_model_says_meta(checkpoint):
    config = vf.ViTHybridConfig.from_pretrained(checkpoint)
    with torch.device("meta"):
        model = vf.ViTHybridForImageClassification(config).eval()
    vf.patch(model, {"backbone": "triton"})
    with pytest.raises(RuntimeError, match="meta tensors cannot run kernels") as info:
        model(torch.zeros(1, 3, 72, 72, device="meta"))
    assert "TRITON_INTERPRET" not in str(info.value)


def test_a_decompression_bomb_warning_names_its_file(tmp_path, monkeypatch, capsys):
    """Pillow's warning over the pixel limit names no file ("Image size (12000 pixels) exceeds limit…"),
    and classify printed the same line for two different images."""
    from vithybrid_fast.cli import _open_images

    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for path in paths:
        Image.new("RGB", (120, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 7000)  # 12,000 px: over the limit, under twice it
    kept, images = _open_images(paths)
    assert kept == paths and [image.size for image in images] == [(120, 100)] * 2
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[:2] for line in lines] == [["warning", str(p)] for p in paths], lines
    assert all("exceeds limit of 7000 pixels" in line for line in lines)
