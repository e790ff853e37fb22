"""`vithybrid-fast eval`: label matching, counts against a direct computation, output files, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import vithybrid_fast as vf
from tests.hf_reference import randomize_
from tests.image_folders import CLASSES, TRAIN_CONFIG, write_image_folder
from vithybrid_fast.cli import build_parser, main
from vithybrid_fast.data import image_folder_samples
from vithybrid_fast.distributed import default_num_workers
from vithybrid_fast.evaluate import match_labels

# the model's labels: the folder classes among others, in another order
MODEL_LABELS = ["dog", "red_horizontal", "cat", "blue_vertical", "green_checker", "fish"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = write_image_folder(root / "data", per_class=5, seed=4)
    torch.manual_seed(3)
    config = dict(TRAIN_CONFIG, id2label={str(i): name for i, name in enumerate(MODEL_LABELS)})
    model = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(config)).eval()
    randomize_(model)
    model.save_pretrained(root / "ckpt")
    processor = vf.ViTHybridImageProcessor.for_base_384(size={"shortest_edge": 72}, crop_size=72)
    processor.save_pretrained(root / "ckpt")
    return root, data, model, processor


def expected_counts(data, model, processor):
    """Per-class [images, top-1 hits, top-5 hits] from the processor and the model, image by image."""
    from vithybrid_fast.images import open_image

    rows = {name: [0, 0, 0] for name in CLASSES}
    for name in CLASSES:
        target = MODEL_LABELS.index(name)
        for path in sorted(p for p in (data / name).rglob("*") if p.is_file()):
            pixels = processor(open_image(path), return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                ranked = model(pixels).logits[0].topk(5).indices.tolist()
            rows[name][0] += 1
            rows[name][1] += ranked[0] == target
            rows[name][2] += target in ranked
    return rows


def test_match_labels_exact_map_and_errors():
    id2label = dict(enumerate(MODEL_LABELS))
    assert match_labels(list(CLASSES), id2label) == [3, 4, 1]
    assert match_labels(["hund", "cat"], id2label, {"hund": "dog"}) == [0, 2]
    assert match_labels(["x"], id2label, {"x": 5}) == [5]  # an index works too
    with pytest.raises(
        ValueError, match=r"2 class\(es\) match no label of the model: 'Cat', 'hund' \(mapped to 'wolf'\)"
    ):
        match_labels(["Cat", "hund"], id2label, {"hund": "wolf"})


def test_a_label_the_model_names_twice_needs_a_label_map_index():
    """ImageNet-1k names "crane" twice (134 the bird, 517 the machine): by name the last index won, and
    every image of the other crane counted as wrong, without a word."""
    imagenet = vf.ViTHybridConfig.base_384().id2label
    assert [i for i, name in imagenet.items() if name == "crane"] == [134, 517]
    goldfish = imagenet[1]  # "goldfish, Carassius auratus"
    with pytest.raises(ValueError) as error:
        match_labels(["crane", goldfish], imagenet, source="./val")
    assert str(error.value) == (
        "the model has more than one label named 'crane' (indices 134, 517): pass --label-map map.json mapping "
        'each such folder name to the label index it means ({"folder name": index})'
    )
    assert match_labels(["crane", goldfish], imagenet, {"crane": 517}) == [517, 1]
    assert match_labels(["bird", goldfish], imagenet, {"bird": 134}) == [134, 1]


def test_a_label_map_index_outside_the_model_says_so():
    """It said "match no label … pass --label-map", to a user who had passed one."""
    with pytest.raises(ValueError) as error:
        match_labels(["x", "cat"], dict(enumerate(MODEL_LABELS)), {"x": 99})
    assert str(error.value) == "--label-map maps 'x' (mapped to 99) to no label index of the model: its indices are 0–5"


def test_eval_counts_table_output_and_last_line(setup, tmp_path, capsys):
    root, data, model, processor = setup
    preds = tmp_path / "preds.jsonl"
    argv = ["eval", str(data), "--model", str(root / "ckpt"), "--kernels", "sdpa", "--batch-size", "4",
            "--device", "cpu"]  # fmt: skip
    assert main([*argv, "--num-workers", "1", "--output", str(preds)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = expected_counts(data, model, processor)
    total = sum(r[0] for r in rows.values())
    top1, top5 = (sum(r[i] for r in rows.values()) / total for i in (1, 2))
    assert lines[-1] == f"top-1: {top1:.4f}  top-5: {top5:.4f}  images: {total}"
    assert 0 < top1 < 1  # random weights: some right, some wrong, so the counting is tested
    table = {line.split()[0]: line.split()[1:] for line in lines if line.split()[0] in CLASSES}
    for name, (n, t1, t5) in rows.items():
        assert table[name] == [str(n), f"{t1 / n:.4f}", f"{t5 / n:.4f}"]
    assert any(line.startswith("images/s: ") for line in lines)
    assert f"model: {root / 'ckpt'}  kernels: sdpa  dtype: float32  ranks: 1" in lines
    assert not any(line.startswith("top-5 is 1 by definition") for line in lines)  # 6 labels
    assert main([*argv[:5], "auto", *argv[6:], "--num-workers", "0"]) == 0  # what "auto" ran is said
    assert f"model: {root / 'ckpt'}  kernels: auto (sdpa here)  dtype: float32  ranks: 1" in capsys.readouterr().out

    records = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(records) == total
    assert [r["path"] for r in records] == [s.source for s in image_folder_samples(data)[0]]  # dataset order
    first = records[0]
    assert first["label"] == "blue_vertical" and len(first["top_k"]) == 5 == len(first["probs"])
    assert set(first["top_k"]) <= set(MODEL_LABELS) and first["probs"] == sorted(first["probs"], reverse=True)
    hits = sum(r["top_k"][0] == r["label"] for r in records)
    assert hits == round(top1 * total)


def test_resize_on_device_gives_the_same_predictions(setup, tmp_path, capsys, monkeypatch):
    """--resize-on device: the workers only decode and the batch (a list of sizes) is resized where the model
    runs, with Pillow's bytes: every prediction and probability is the one the CPU resize gives."""
    from vithybrid_fast import device_resize

    resized = []
    real = device_resize.resize_batch

    def counting(images, *args):
        resized.append(len(images))
        return real(images, *args)

    monkeypatch.setattr(device_resize, "resize_batch", counting)
    root, data, _, _ = setup
    argv = ["eval", str(data), "--model", str(root / "ckpt"), "--kernels", "sdpa", "--batch-size", "4",
            "--device", "cpu", "--num-workers", "1"]  # fmt: skip
    outputs = {}
    for resize_on in ("cpu", "device"):
        preds = tmp_path / f"{resize_on}.jsonl"
        assert main([*argv, "--resize-on", resize_on, "--output", str(preds)]) == 0
        outputs[resize_on] = (capsys.readouterr().out.splitlines()[-1], preds.read_text())
    assert outputs["device"] == outputs["cpu"]
    assert sum(resized) == 15  # the device run resized every image in the main process; the CPU run none
    assert outputs["cpu"][0].startswith("top-1: ") and outputs["cpu"][1].count("\n") == 15  # 3 classes × 5
    with pytest.raises(SystemExit) as usage:
        main([*argv, "--resize-on", "gpu"])
    assert usage.value.code == 2 and "invalid choice: 'gpu'" in capsys.readouterr().err


def test_a_model_of_five_labels_or_fewer_is_told_top_5_means_nothing(setup, tmp_path, capsys):
    _, data, _, processor = setup
    config = dict(TRAIN_CONFIG, id2label=dict(enumerate(CLASSES)))
    vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(config)).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    argv = ["eval", str(data), "--model", str(tmp_path), "--kernels", "sdpa", "--num-workers", "0", "--device", "cpu"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "top-5 is 1 by definition: the model has 3 labels" in lines
    assert lines[-1].startswith("top-1: ") and " top-5: 1.0000  images: 15" in lines[-1]


def test_eval_label_map_and_unmatched_class(setup, tmp_path, capsys):
    root, data, _, _ = setup
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for name in CLASSES:
        (renamed / name.upper()).symlink_to(data / name, target_is_directory=True)
    argv = ["eval", str(renamed), "--model", str(root / "ckpt"), "--kernels", "sdpa", "--num-workers", "0",
            "--device", "cpu"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "3 class(es) match no label of the model: 'BLUE_VERTICAL', 'GREEN_CHECKER', 'RED_HORIZONTAL'" in err
    label_map = tmp_path / "map.json"
    label_map.write_text(json.dumps({name.upper(): name for name in CLASSES}))
    assert main([*argv, "--label-map", str(label_map)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("images: 15")


def test_an_unreadable_label_map_names_the_flag(tmp_path):
    """It printed a bare "[Errno 2] No such file or directory: 'nomap.json'"."""
    from vithybrid_fast.evaluate import _read_label_map

    with pytest.raises(ValueError, match=r"^--label-map .*nomap.json: cannot read it \(No such file or directory\)$"):
        _read_label_map(tmp_path / "nomap.json")
    with pytest.raises(ValueError, match=r"^--label-map .*: cannot read it \(Is a directory\)$"):
        _read_label_map(tmp_path)
    (tmp_path / "latin1.json").write_bytes(b'{"caf\xe9": 1}')
    with pytest.raises(ValueError, match=r"^--label-map .*latin1.json: not valid JSON"):
        _read_label_map(tmp_path / "latin1.json")


@pytest.mark.parametrize(
    "source, rename, key",
    [
        (None, "the folders", "folder name"),
        ("./val", "the folders", "folder name"),
        ("val.csv", "the labels in val.csv", "label in the list"),
        ("lists/val.jsonl", "the labels in lists/val.jsonl", "label in the list"),
        ("hf:beans:validation", "the dataset's labels", "dataset label"),
    ],
)
def test_unmatched_label_advice_speaks_of_the_data_source(source, rename, key):
    with pytest.raises(ValueError) as error:
        match_labels(["lab"], dict(enumerate(MODEL_LABELS)), source=source)
    assert str(error.value) == (
        "1 class(es) match no label of the model: 'lab'. "
        f"Rename {rename} to the model's labels (e.g. 'dog', 'red_horizontal', 'cat') or pass --label-map map.json "
        f'({{"{key}": "model label" or label index}})'
    )


def test_eval_csv_list_with_another_header_is_an_error_about_the_csv(setup, tmp_path, capsys):
    """`file,lab` was read as an image row of class 'lab', then reported as a folder to rename."""
    root, data, _, _ = setup
    rows = "".join(f"{p},{p.relative_to(data).parts[0]}\n" for p in sorted(data.rglob("*.png")))
    argv = ["--model", str(root / "ckpt"), "--kernels", "sdpa", "--num-workers", "0", "--device", "cpu"]
    listed = tmp_path / "val.csv"
    listed.write_text("file,lab\n" + rows)
    assert main(["eval", str(listed), *argv]) == 1
    err = capsys.readouterr().err
    assert f"{listed}:1: the first row 'file,lab' is not the header 'path,label'" in err
    assert "header must be exactly path,label" in err and "folder" not in err
    listed.write_text("path,label\n" + rows.replace(",red_horizontal", ",Red"))
    assert main(["eval", str(listed), *argv]) == 1
    err = capsys.readouterr().err
    assert f"'Red'. Rename the labels in {listed} to the model's labels" in err and "folder" not in err
    listed.write_text("path,label\n" + rows)
    assert main(["eval", str(listed), *argv]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(f"images: {rows.count(chr(10))}")


def test_eval_unreadable_file_fails_or_is_skipped(setup, tmp_path, capsys):
    root, data, _, _ = setup
    folder = tmp_path / "data"
    for name in CLASSES:
        (folder / name).mkdir(parents=True)
        for path in sorted((data / name).glob("*.*"))[:2]:
            (folder / name / path.name).symlink_to(path)
    broken = folder / "green_checker" / "zz-broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    argv = ["eval", str(folder), "--model", str(root / "ckpt"), "--kernels", "sdpa", "--num-workers", "0",
            "--device", "cpu"]  # fmt: skip
    assert main(argv) == 1
    assert f"cannot read image {broken}" in capsys.readouterr().err
    assert main([*argv, "--on-error", "skip"]) == 0
    out, err = capsys.readouterr()
    assert f"skipped unreadable image {broken}" in err
    assert "skipped unreadable: 1" in out and out.splitlines()[-1].endswith("images: 6")
    # nothing readable at all: an error, not a top-1 of 0 over no image
    only_broken = tmp_path / "only-broken"
    (only_broken / "green_checker").mkdir(parents=True)
    shutil.copy(broken, only_broken / "green_checker" / broken.name)
    assert main([*argv[:1], str(only_broken), *argv[2:], "--on-error", "skip"]) == 1
    assert f"none of the 1 images of {only_broken} could be read" in capsys.readouterr().err


def test_a_bad_output_path_fails_before_the_evaluation(setup, tmp_path, capsys, monkeypatch):
    """A directory given as --output failed only after the whole run, and its results were not printed."""
    root, data, _, _ = setup
    argv = ["eval", str(data), "--model", str(root / "ckpt"), "--kernels", "sdpa", "--num-workers", "0",
            "--device", "cpu"]  # fmt: skip
    monkeypatch.setattr("vithybrid_fast.evaluate.evaluate", lambda *a, **k: pytest.fail("evaluated"))
    assert main([*argv, "--output", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"error: --output {tmp_path} is a directory; give a file path\n"
    (tmp_path / "afile").write_text("x")
    assert main([*argv, "--output", str(tmp_path / "afile" / "preds.jsonl")]) == 1
    assert f"{tmp_path / 'afile'} is a file, not a folder" in capsys.readouterr().err


def test_predictions_replace_an_earlier_file_whole(setup, tmp_path, capsys, monkeypatch):
    """Results print before the predictions are written; a failed write leaves the earlier file as it was."""
    root, data, _, _ = setup
    preds = tmp_path / "new" / "preds.jsonl"
    argv = ["eval", str(data), "--model", str(root / "ckpt"), "--kernels", "sdpa", "--num-workers", "0",
            "--device", "cpu", "--output", str(preds)]  # fmt: skip
    preds.parent.mkdir()
    preds.write_text("earlier\n")
    monkeypatch.setattr("json.dumps", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[0].split() == ["class", "images", "top-1", "top-5"] and "images/s:" in out
    assert err == "error: disk full\n"
    assert preds.read_text() == "earlier\n" and sorted(p.name for p in preds.parent.iterdir()) == ["preds.jsonl"]
    monkeypatch.undo()
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == f"predictions: {preds}" and out[-1].endswith("images: 15")
    assert len(preds.read_text().splitlines()) == 15


def test_a_16_bit_image_read_by_a_worker_warns_in_one_line(setup, tmp_path):
    """eval's workers printed open_image's warning as Python's two-line UserWarning, classify as one line.
    A process of its own: pytest records warnings, and a forked worker inherits its recorder."""
    from PIL import Image

    root, data, _, _ = setup
    folder = tmp_path / "data"
    shutil.copytree(data, folder)
    deep = folder / "green_checker" / "deep.tiff"
    Image.new("I;16", (80, 80), 40000).save(deep)
    argv = [sys.executable, "-m", "vithybrid_fast", "eval", str(folder), "--model", str(root / "ckpt"),
            "--kernels", "sdpa", "--num-workers", "1", "--device", "cpu"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"warning: {deep}: a I;16 (16-bit or float) image; converting it to 8-bit RGB clips" in done.stderr
    assert "UserWarning" not in done.stderr and "warnings.warn" not in done.stderr


def test_max_image_pixels_reaches_the_dataset_and_its_workers(setup, capsys):
    """The synthetic images are 72–110 px a side (over 5,000 px), over twice a 2,000 px limit. A worker
    started by forkserver or spawn imports Pillow afresh, with its default: the dataset carries the limit."""
    import pickle

    from PIL import Image

    from vithybrid_fast.data import ImagePipeline, open_dataset
    from vithybrid_fast.images import pixel_limit

    root, data, _, processor = setup
    default = Image.MAX_IMAGE_PIXELS
    argv = ["eval", str(data), "--model", str(root / "ckpt"), "--kernels", "sdpa", "--num-workers", "1",
            "--device", "cpu", "--max-image-pixels", "2000"]  # fmt: skip
    assert main(argv) == 1
    assert "DecompressionBombError" in capsys.readouterr().err and default == Image.MAX_IMAGE_PIXELS
    with pixel_limit(2000):
        dataset = open_dataset(str(data), ImagePipeline(processor))
    with pixel_limit(default):  # what a fresh worker has; the dataset's read sets its own
        assert "DecompressionBombError" in pickle.loads(pickle.dumps(dataset))[0]["error"]
        assert "pixels" in open_dataset(str(data), ImagePipeline(processor))[0]


def test_list_files_by_extension_in_any_case_and_a_missing_one_is_no_folder(setup, tmp_path, capsys):
    """LIST.CSV was read as a folder ("not a directory"), and so was a mistyped list name."""
    root, data, _, _ = setup
    rows = "".join(f"{p},{p.relative_to(data).parts[0]}\n" for p in sorted(data.rglob("*.png")))
    argv = ["--model", str(root / "ckpt"), "--kernels", "sdpa", "--num-workers", "0", "--device", "cpu"]
    (tmp_path / "VAL.CSV").write_text("path,label\n" + rows)
    assert main(["eval", str(tmp_path / "VAL.CSV"), *argv]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(f"images: {rows.count(chr(10))}")
    assert main(["eval", str(tmp_path / "vall.csv"), *argv]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'vall.csv'}: no such file\n"


@pytest.mark.parametrize("affinity, expected", [({0}, 1), ({0, 1}, 2), (set(range(64)), 4)])
def test_default_num_workers_is_the_usable_cpus_up_to_4(monkeypatch, capsys, affinity, expected):
    """4 workers on a 2-CPU machine made torch warn twice; the default (and --help) follows the CPUs."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: affinity, raising=False)
    parser = build_parser()
    assert parser.parse_args(["eval", "data"]).num_workers == expected
    assert parser.parse_args(["finetune", "data", "--output-dir", "out"]).num_workers == expected
    for command in ("eval", "finetune"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert f"(default here: {expected} = min(4, CPUs usable))" in " ".join(capsys.readouterr().out.split())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "suggested max number of worker" check, on the same CPUs
        torch.utils.data.DataLoader(range(4), num_workers=expected).check_worker_number_rationality()
    if expected < 4:
        with pytest.warns(UserWarning, match="suggested max number of worker in current system is"):
            torch.utils.data.DataLoader(range(4), num_workers=4).check_worker_number_rationality()


@pytest.mark.parametrize("cpu_count, expected", [(3, 3), (16, 4), (None, 1)])
def test_default_num_workers_without_an_affinity_mask(monkeypatch, cpu_count, expected):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    monkeypatch.setattr(os, "cpu_count", lambda: cpu_count)
    assert default_num_workers() == expected


@pytest.mark.parametrize("command", [["eval", "data"], ["finetune", "data", "--output-dir", "out"]])
def test_negative_num_workers_is_a_usage_error(command, capsys):
    with pytest.raises(SystemExit) as usage:
        main([*command, "--num-workers", "-1"])
    assert usage.value.code == 2
    assert "argument --num-workers: must be at least 0 (0: load in the main process), got -1" in capsys.readouterr().err
    assert build_parser().parse_args([*command, "--num-workers", "0"]).num_workers == 0


@pytest.mark.parametrize("command", ["eval", "finetune"])
def test_data_is_checked_before_the_model_is_looked_for(command, tmp_path, monkeypatch, capsys):
    """eval and finetune loaded (offline: failed to find) the model before saying DATA was mistyped; on a
    networked machine the typo cost the model's download first. classify already checked paths first."""
    import vithybrid_fast.loading as loading

    def no_model(*args, **kwargs):
        raise AssertionError("the model was looked for before the data was checked")

    monkeypatch.setattr(loading, "load", no_model)
    monkeypatch.setattr(loading, "find_weight_files", no_model)
    extra = ["--output-dir", str(tmp_path / "run")] if command == "finetune" else []
    assert main([command, str(tmp_path / "nodata"), "--model", "org/some-model", *extra]) == 1
    nodata = tmp_path / "nodata"
    expected = {
        "eval": f"error: {nodata}: not a directory (expected one subfolder per class)\n",
        "finetune": f"error: {nodata}: no such directory (expected {nodata}/train/ and {nodata}/val/)\n",
    }
    assert capsys.readouterr().err == expected[command]
    assert main([command, "hf:", "--model", "org/some-model", *extra]) == 1
    assert "'hf:': no dataset name after 'hf:'" in capsys.readouterr().err


def test_a_hub_dataset_offline_fails_at_once_and_in_one_line(tmp_path, monkeypatch):
    """`eval hf:beans` with the hub unreachable printed five retry tracebacks over 27 s, then the error."""
    pytest.importorskip("datasets")
    import time

    from vithybrid_fast import hub
    from vithybrid_fast.data import ImagePipeline, open_dataset

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: "huggingface.co:443: refused (test)")
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=r"hf:org/no-such-set: the hub is unreachable \(huggingface.co:443"):
        open_dataset("hf:org/no-such-set", ImagePipeline(vf.ViTHybridImageProcessor.for_base_384()))
    assert time.monotonic() - started < 10
    assert before == constants.HF_HUB_OFFLINE  # offline for that call only


def test_output_that_cannot_be_created_is_refused_before_the_run(setup, tmp_path, monkeypatch, capsys):
    """os.access says yes to root anywhere: `--output /proc/x.jsonl` ran the evaluation, then failed to
    write (naming its temporary file). The check now creates a file where the output will go."""
    import tempfile

    root, data, _, _ = setup
    real = tempfile.mkstemp

    def refused(*args, dir=None, **kwargs):
        if dir is not None and str(dir) == str(tmp_path / "ro"):
            raise PermissionError(30, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(tempfile, "mkstemp", refused)
    argv = ["eval", str(data), "--model", str(root / "ckpt"), "--kernels", "sdpa", "--num-workers", "0",
            "--device", "cpu", "--output", str(tmp_path / "ro" / "p.jsonl")]  # fmt: skip
    assert main(argv) == 1
    out, err = capsys.readouterr()
    folder = tmp_path / "ro"
    assert err == f"error: --output {folder / 'p.jsonl'}: cannot create a file in {folder} (Read-only file system)\n"
    assert "top-1" not in out  # refused before the run
    assert not list((tmp_path / "ro").iterdir())


def test_imagenet_synset_folders_match_an_imagenet_model_by_sorted_order(capsys):
    """ImageNet-1k's own layout (val/n01440764/...) matched no label of an ImageNet model: the README's first
    eval example failed with a 1000-name error. Its sorted synset ids are the label order."""
    imagenet = vf.ViTHybridConfig.base_384().id2label
    synsets = [f"n{index:08d}" for index in range(1000)]  # sorted as ImageNet's ids are, each its own index
    shuffled = synsets[500:] + synsets[:500]
    assert match_labels(shuffled, imagenet) == list(range(500, 1000)) + list(range(500))
    assert "matched to the model's labels by their sorted order" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"the 10 classes are ImageNet synset ids \(e.g. 'n00000000'\), but not all"):
        match_labels(synsets[:10], imagenet)  # a subset's order says nothing of its indices
    assert match_labels(synsets[:2], imagenet, {synsets[0]: 0, synsets[1]: 7}) == [0, 7]  # a map decides
    # a model of other labels: names as before, and the error names ten classes, not a thousand
    with pytest.raises(ValueError) as error:
        match_labels(synsets, dict(enumerate(MODEL_LABELS)))
    assert "1000 class(es) match no label of the model: 'n00000000', " in str(error.value)
    assert "'n00000009' and 990 more. Rename" in str(error.value) and "'n00000010'" not in str(error.value)


def test_eval_of_a_model_giving_nan_logits_is_an_error_not_an_accuracy(setup, tmp_path, capsys):
    """NaN logits rank label 0 first: a diverged model scored 1/num_classes (and 100 % on class 0)."""
    _, data, model, processor = setup
    broken = tmp_path / "nan-model"
    nan_model = vf.ViTHybridForImageClassification(model.config).eval()
    nan_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        nan_model.classifier.weight.fill_(float("nan"))
    nan_model.save_pretrained(broken)
    processor.save_pretrained(broken)
    argv = ["--model", str(broken), "--kernels", "sdpa", "--num-workers", "0", "--device", "cpu"]
    assert main(["eval", str(data), *argv]) == 1
    captured = capsys.readouterr()
    assert f"{broken} gives NaN or infinite logits (mean loss nan)" in captured.err and "top-1" not in captured.out


def test_label_map_keys_the_data_lacks_are_named(capsys):
    """A typo in a --label-map key was ignored silently; its class then failed to match by name."""
    id2label = dict(enumerate(MODEL_LABELS))
    assert match_labels(["hund", "cat"], id2label, {"hund": "dog", "Hund": "dog", "kat": "cat"}) == [0, 2]
    assert "--label-map names 2 class(es) the data does not have: 'Hund', 'kat'" in capsys.readouterr().err
    assert match_labels(["hund"], id2label, {"hund": "dog"}) == [0]
    assert "--label-map" not in capsys.readouterr().err


def test_a_fine_tuning_output_directory_as_model_points_at_its_checkpoints(setup, tmp_path, capsys):
    """`classify --model OUT` (the fine-tuning run's folder, not OUT/best) said only "has no config.json"."""
    root, data, _, _ = setup
    run = tmp_path / "run"
    shutil.copytree(root / "ckpt", run / "best")
    argv = ["--model", str(run), "--kernels", "sdpa", "--num-workers", "0", "--device", "cpu"]
    assert main(["eval", str(data), *argv]) == 1
    err = capsys.readouterr().err
    assert f"{run} has no config.json: it holds a fine-tuning run, whose checkpoints are {run / 'best'}" in err
