"""`vithybrid-fast finetune` on a synthetic 3-class image folder (tiny config, CPU)."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vithybrid_fast as vf
from tests.image_folders import CLASSES, write_finetune_inputs
from vithybrid_fast import train_setup
from vithybrid_fast.cli import main
from vithybrid_fast.data import ImagePipeline, collate, open_dataset
from vithybrid_fast.patching import patched_modules
from vithybrid_fast.train import FinetuneConfig, finetune
from vithybrid_fast.train_setup import autocast_dtype, classifier_for_classes, warmup_cosine

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent


def config(root, out, **overrides) -> FinetuneConfig:
    settings = dict(
        data=str(root / "data"), model=str(root / "start"), output_dir=out, epochs=3, batch_size=8, lr=1e-3,
        num_workers=0, kernels="sdpa", seed=0, device="cpu",  # CPU: deterministic, so resume is bit-exact
    )  # fmt: skip
    settings.update(overrides)
    return FinetuneConfig(**settings)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    write_finetune_inputs(root)
    summary = finetune(config(root, root / "out"))
    return root, summary


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_finetuning_reaches_90_percent_and_logs_every_step(trained):
    root, summary = trained
    epochs = [r for r in read_log(root / "out" / "train_log.jsonl") if r["type"] == "epoch"]
    steps = [r for r in read_log(root / "out" / "train_log.jsonl") if r["type"] == "step"]
    assert summary["best"]["top1"] >= 0.9 and epochs[-1]["val_top1"] >= 0.9, epochs
    assert [r["epoch"] for r in epochs] == [1, 2, 3] and all(r["val_images"] == 12 for r in epochs)
    assert [r["step"] for r in steps] == list(range(1, 10))  # 24 images / batch 8 = 3 steps per epoch
    assert steps[-1]["loss"] < steps[0]["loss"]
    lrs = [r["lr"] for r in steps]
    assert lrs[0] == pytest.approx(1e-3) and lrs == sorted(lrs, reverse=True)  # 1 warm-up step, then cosine
    schedule = warmup_cosine(total_steps=9, warmup_steps=1)
    assert lrs == pytest.approx([1e-3 * schedule(step) for step in range(9)])  # the rate each step used
    assert all(r["images_per_s"] > 0 and r["grad_norm"] > 0 for r in steps)
    for name in ("best", "last"):
        saved = json.loads((root / "out" / name / "config.json").read_text())
        assert saved["id2label"] == {str(i): c for i, c in enumerate(CLASSES)}
        processor = json.loads((root / "out" / name / "preprocessor_config.json").read_text())
        assert processor == json.loads((root / "start" / "preprocessor_config.json").read_text())


def val_pixels(root):
    processor = vf.load_processor(root / "start")
    data = open_dataset(root / "data" / "val", ImagePipeline(processor))
    batch = collate([data[i] for i in range(len(data))])
    return data.pipeline.normalize(batch["pixels"]), batch["labels"]


def test_best_checkpoint_loads_in_transformers_with_the_same_logits(trained):
    root, _ = trained
    pixels, labels = val_pixels(root)
    with torch.no_grad():
        ours = vf.load(root / "out" / "best", kernels="eager")(pixels).logits
        theirs = transformers.ViTHybridForImageClassification.from_pretrained(root / "out" / "best").eval()
        hf_logits = theirs(pixels).logits
    assert torch.allclose(ours, hf_logits, atol=1e-5), (ours - hf_logits).abs().max()
    assert theirs.config.id2label == dict(enumerate(CLASSES))
    assert (hf_logits.argmax(-1) == labels).float().mean() >= 0.9


def test_eval_on_the_best_checkpoint_reports_its_validation_accuracy(trained, capsys):
    root, summary = trained
    best_epoch = [r for r in read_log(root / "out" / "train_log.jsonl") if r["epoch"] == summary["best"]["epoch"]]
    argv = [
        "eval",
        str(root / "data" / "val"),
        "--model",
        str(root / "out" / "best"),
        "--kernels",
        "sdpa",
        "--device",
        "cpu",
    ]
    assert main([*argv, "--num-workers", "0"]) == 0
    expected = best_epoch[-1]
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"top-1: {expected['val_top1']:.4f}  top-5: {expected['val_top5']:.4f}  images: 12"


def test_resumed_run_ends_with_the_same_weights(trained, capsys):
    root, _ = trained
    out = root / "interrupted"
    first = finetune(config(root, out, max_epochs_this_run=1))
    assert first["last_epoch"] == 1 and not (out / "last" / "training_state.pt").is_dir()
    assert "(1 of 3 epochs: --resume goes on)" in capsys.readouterr().out
    # the resumed run reads its preprocessing and weights from OUT/last: --model may be gone by now
    finetune(config(root, out, resume=True, model=str(root / "moved-away")))
    uninterrupted = load_file(root / "out" / "last" / "model.safetensors")
    resumed = load_file(out / "last" / "model.safetensors")
    assert uninterrupted.keys() == resumed.keys()
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], resumed[key]), key
    assert [r["loss"] for r in read_log(out / "train_log.jsonl") if r["type"] == "step"] == [
        r["loss"] for r in read_log(root / "out" / "train_log.jsonl") if r["type"] == "step"
    ]


def first_step_loss(root, label_smoothing: float, data=None, skip_unreadable=False) -> torch.Tensor:
    """The first optimizer step's loss, computed by hand: the new head, the sampler's first images (8, or
    the readable ones of the first 5) with the evaluation preprocessing, the model's CrossEntropyLoss or a
    smoothed one."""
    processor = vf.load_processor(root / "start")
    data = open_dataset((data or root / "data") / "train", ImagePipeline(processor))
    sampler = torch.utils.data.distributed.DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0)
    items = [data[i] for i in list(sampler)[: 5 if skip_unreadable else 8]]
    batch = collate([item for item in items if "pixels" in item])
    model = classifier_for_classes(str(root / "start"), list(CLASSES), seed=0).train()
    pixels = data.pipeline.normalize(batch["pixels"])
    with torch.no_grad():
        if label_smoothing == 0.0:
            return model(pixels, labels=batch["labels"]).loss
        logits = model(pixels).logits
        return torch.nn.functional.cross_entropy(logits, batch["labels"], label_smoothing=label_smoothing)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_training_loss_is_the_models_cross_entropy_with_label_smoothing(trained, label_smoothing):
    root, _ = trained
    out = root / f"smoothing-{label_smoothing}"
    finetune(config(root, out, epochs=1, augment="none", label_smoothing=label_smoothing))
    logged = next(r["loss"] for r in read_log(out / "train_log.jsonl") if r["type"] == "step")
    expected = first_step_loss(root, label_smoothing).item()
    assert logged == pytest.approx(expected, rel=1e-5, abs=1e-6)
    if label_smoothing:  # smoothing raises the loss of a confident model; here it must change it at all
        assert abs(expected - first_step_loss(root, 0.0).item()) > 1e-3


def test_training_images_are_augmented_by_default(trained):
    root, _ = trained
    augmented = next(r["loss"] for r in read_log(root / "out" / "train_log.jsonl") if r["type"] == "step")
    assert FinetuneConfig(data="d", model="m", output_dir=root).augment == "crop-flip"
    assert abs(augmented - first_step_loss(root, 0.0).item()) > 1e-4  # other pixels than the eval ones


def test_resuming_a_state_saved_before_augmentation_existed(trained):
    """Older training states name no augmentation: they ran without, so --augment none continues them."""
    root, _ = trained
    out = root / "older"
    finetune(config(root, out, epochs=2, max_epochs_this_run=1, augment="none"))
    state_path = out / "last" / "training_state.pt"
    state = torch.load(state_path, weights_only=True)
    for key in ("augment", "min_crop_scale", "label_smoothing"):
        del state["config"][key]
    torch.save(state, state_path)
    with pytest.raises(ValueError, match="other settings than the saved run: --augment: none → crop-flip"):
        finetune(config(root, out, epochs=2, resume=True))
    # the crop scale is no setting of a run without crops: another value does not block the resume
    with pytest.warns(UserWarning, match="^--min-crop-scale is unused: --augment none draws no crops$"):
        assert finetune(config(root, out, epochs=2, resume=True, augment="none", min_crop_scale=0.5))["last_epoch"] == 2


def test_auto_dtype_is_bf16_on_ampere_and_later_float16_on_volta_and_turing(monkeypatch):
    capability = {}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["now"])
    for now, expected in (((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((7, 5), torch.float16),
                          ((7, 0), torch.float16), ((6, 1), torch.float32)):  # fmt: skip
        capability["now"] = now
        assert autocast_dtype("auto", torch.device("cuda")) == expected, now
    assert autocast_dtype("auto", torch.device("cpu")) == torch.float32
    assert autocast_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="choose one of auto, float32, bfloat16, float16"):
        autocast_dtype("half", torch.device("cpu"))


def test_float16_trains_with_loss_scaling_and_resumes_its_scale(trained):
    root, _ = trained
    settings = dict(epochs=2, dtype="float16", augment="none")
    finetune(config(root, root / "fp16", **settings))
    steps = [r for r in read_log(root / "fp16" / "train_log.jsonl") if r["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all(r["loss_scale"] >= 1.0 and r["skipped"] in (True, False) for r in steps)
    applied = [r for r in steps if not r["skipped"]]
    assert len(applied) >= 4 and all(r["grad_norm"] > 0 for r in applied)  # the scaled gradients were unscaled
    state = torch.load(root / "fp16" / "last" / "training_state.pt", weights_only=True)
    assert state["scaler"]["scale"] == steps[-1]["loss_scale"] / (2 if steps[-1]["skipped"] else 1)
    start, trained_weights = (load_file(root / n / "model.safetensors") for n in ("start", "fp16/last"))
    assert not torch.equal(start["vit.embeddings.cls_token"], trained_weights["vit.embeddings.cls_token"])
    interrupted = root / "fp16-interrupted"
    finetune(config(root, interrupted, max_epochs_this_run=1, **settings))
    finetune(config(root, interrupted, resume=True, **settings))
    resumed = load_file(interrupted / "last" / "model.safetensors")
    assert all(torch.equal(resumed[k], v) for k, v in trained_weights.items())  # scale and weights continued


def test_float16_steps_that_overflow_change_nothing(trained, monkeypatch):
    """A loss scale of 2^100 overflows every float16 gradient: each step is skipped and halves the scale;
    no weight moves, the schedule does not advance, and the log stays valid JSON (no Infinity)."""
    root, _ = trained
    monkeypatch.setattr(train_setup, "FP16_INIT_SCALE", 2.0**100)
    out = root / "fp16-overflow"
    finetune(config(root, out, epochs=1, dtype="float16", augment="none"))
    text = (out / "train_log.jsonl").read_text()
    assert "Infinity" not in text and "NaN" not in text
    steps = [r for r in read_log(out / "train_log.jsonl") if r["type"] == "step"]
    assert [r["skipped"] for r in steps] == [True] * 3 and [r["grad_norm"] for r in steps] == [None] * 3
    assert [r["loss_scale"] for r in steps] == [2.0**100, 2.0**99, 2.0**98]
    assert len({r["lr"] for r in steps}) == 1  # still the first warm-up value
    start = load_file(root / "start" / "model.safetensors")
    saved = load_file(out / "last" / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in start.items() if k.startswith("vit."))


def test_a_validation_folder_may_lack_a_training_class(trained, capsys):
    root, _ = trained
    data = root / "data-val-without-green"
    shutil.copytree(root / "data", data)
    shutil.rmtree(data / "val" / "green_checker")
    out = root / "without-green"
    finetune(config(root, out, data=str(data), epochs=1))
    assert f"warning: {data / 'val'} has no images of the classes ['green_checker']" in capsys.readouterr().err
    epoch = next(r for r in read_log(out / "train_log.jsonl") if r["type"] == "epoch")
    assert epoch["val_images"] == 8
    saved = json.loads((out / "last" / "config.json").read_text())
    assert saved["id2label"] == {str(i): c for i, c in enumerate(CLASSES)}  # the training classes, all three
    # the logged accuracy used the training indices (blue 0, red 2), recomputed here from the folder names
    model = vf.load(out / "last", kernels="eager")
    processor = vf.load_processor(out / "last")
    files = sorted(p for p in (data / "val").rglob("*") if p.suffix in (".png", ".jpg"))
    labels = torch.tensor([CLASSES.index(p.relative_to(data / "val").parts[0]) for p in files])
    with torch.no_grad():
        pixels = processor([vf.images.open_image(p) for p in files], return_tensors="pt")["pixel_values"]
        predicted = model(pixels).logits.argmax(-1)
    assert sorted(set(labels.tolist())) == [0, 2]
    assert epoch["val_top1"] == pytest.approx((predicted == labels).float().mean().item(), abs=1e-6)


def test_a_checkpoint_of_the_same_classes_keeps_its_head(trained, capsys):
    """Training a fine-tuned model further: its head already classifies these classes; re-creating it
    would discard that training. The same classes in another order (a checkpoint from another tool) keep
    it too, its rows put in the data's order; another class list gets a new head."""
    root, _ = trained
    best = load_file(root / "out" / "best" / "model.safetensors")
    kept = classifier_for_classes(str(root / "out" / "best"), list(CLASSES), seed=0)
    assert torch.equal(kept.classifier.weight.detach(), best["classifier.weight"])
    reordered = classifier_for_classes(str(root / "out" / "best"), list(reversed(CLASSES)), seed=0)
    assert torch.equal(reordered.classifier.weight.detach(), best["classifier.weight"].flip(0))
    assert torch.equal(reordered.classifier.bias.detach(), best["classifier.bias"].flip(0))
    assert reordered.config.id2label == dict(enumerate(reversed(CLASSES)))
    assert reordered.config.label2id == {name: i for i, name in enumerate(reversed(CLASSES))}
    other = classifier_for_classes(str(root / "out" / "best"), [*CLASSES[:2], "purple_dots"], seed=0)
    assert other.classifier.weight.shape == best["classifier.weight"].shape
    assert not torch.equal(other.classifier.weight.detach(), best["classifier.weight"])
    out = root / "further"
    finetune(config(root, out, model=str(root / "out" / "best"), epochs=1, lr=1e-5))
    assert "its head is kept (in the data's class order), not re-created" in capsys.readouterr().out
    epoch = next(r for r in read_log(out / "train_log.jsonl") if r["type"] == "epoch")
    assert epoch["val_top1"] >= 0.9  # a kept trained head scores from the first epoch at a tiny lr


def test_a_fresh_run_does_not_overwrite_an_earlier_one_unless_told(trained, capsys):
    root, _ = trained
    argv = ["finetune", str(root / "data"), "--model", str(root / "start"), "--kernels", "sdpa", "--num-workers", "0",
            "--device", "cpu", "--epochs", "1", "--batch-size", "8"]  # fmt: skip
    out = root / "rerun"
    shutil.copytree(root / "out", out)
    before = (out / "last" / "model.safetensors").read_bytes(), (out / "train_log.jsonl").read_text()
    assert main([*argv, "--output-dir", str(out)]) == 1
    assert (
        f"--output-dir {out} holds a run (last, best): pass --resume to continue it, --overwrite "
        "to start over there, or choose another directory" in capsys.readouterr().err
    )
    assert ((out / "last" / "model.safetensors").read_bytes(), (out / "train_log.jsonl").read_text()) == before
    assert main([*argv, "--output-dir", str(out), "--resume", "--overwrite"]) == 1
    assert "choose one" in capsys.readouterr().err
    (root / "a-file").write_text("")
    assert main([*argv, "--output-dir", str(root / "a-file")]) == 1
    assert f"--output-dir {root / 'a-file'}: a file, not a folder" in capsys.readouterr().err
    # a path below a file fails before the data and the model are read, naming the flag
    assert main([*argv, "--output-dir", str(root / "a-file" / "run")]) == 1
    assert f"--output-dir {root / 'a-file' / 'run'}: {root / 'a-file'} is a file" in capsys.readouterr().err
    assert main([*argv, "--output-dir", str(out), "--overwrite"]) == 0
    records = read_log(out / "train_log.jsonl")  # only the new run's: 1 epoch of 3 steps
    assert [(r["type"], r["step"]) for r in records] == [("step", 1), ("step", 2), ("step", 3), ("epoch", 3)]
    assert torch.load(out / "last" / "training_state.pt", weights_only=True)["config"]["epochs"] == 1


def test_resuming_a_finished_run_says_so_and_changes_nothing(trained, capsys):
    root, _ = trained
    before = (root / "out" / "last" / "model.safetensors").read_bytes()
    summary = finetune(config(root, root / "out", resume=True))
    assert summary["stopped_by"] is None and summary["step"] == 9
    assert f"nothing to do: {root / 'out' / 'last'} has finished all 3 epochs" in capsys.readouterr().out
    assert (root / "out" / "last" / "model.safetensors").read_bytes() == before


def test_unreadable_files_with_on_error_skip(trained, capsys):
    """A garbage file among the first step's images: that step's loss is the mean over the 4 images read
    (a micro-batch of 1 image, emptied, still runs a zero forward and backward so every rank keeps in
    step); the file is reported once, not every epoch."""
    root, _ = trained
    data = root / "data-with-garbage"
    shutil.copytree(root / "data", data)
    train = open_dataset(data / "train", ImagePipeline(vf.load_processor(root / "start")))
    order = list(torch.utils.data.distributed.DistributedSampler(train, num_replicas=1, rank=0, seed=0))
    garbage = Path(train.samples[order[2]].source)
    garbage.write_bytes(b"not an image")  # the third image of the first step
    expected = first_step_loss(root, 0.0, data=data, skip_unreadable=True)
    out = root / "garbage"
    settings = dict(data=str(data), epochs=2, batch_size=5, grad_accum=5, on_error="skip", augment="none")
    summary = finetune(config(root, out, **settings))
    assert summary["stopped_by"] is None and summary["step"] == 8  # 24 files / 5 = 4 steps × 2 epochs
    out_text, err = capsys.readouterr()
    assert err.count("skipped unreadable image") == 1 and garbage.name in err
    assert out_text.splitlines()[-1].endswith("  skipped unreadable: 1")  # the last line says it, as eval's does
    steps = [r for r in read_log(out / "train_log.jsonl") if r["type"] == "step"]
    assert steps[0]["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert all(math.isfinite(r["loss"]) for r in steps)


def test_a_validation_set_without_one_readable_image_is_an_error_after_saving(trained):
    root, _ = trained
    data = root / "data-unreadable-val"
    shutil.copytree(root / "data", data)
    for path in (data / "val").rglob("*.*"):
        path.write_bytes(b"garbage")
    out = root / "unreadable-val"
    with pytest.raises(RuntimeError, match=r"no validation image could be read \(12 skipped"):
        finetune(config(root, out, data=str(data), on_error="skip"))
    assert torch.load(out / "last" / "training_state.pt", weights_only=True)["epoch"] == 1  # epoch 1 kept
    assert not (out / "best").exists()  # no best chosen by a top-1 over no image


def test_resume_refuses_another_training_set_or_changed_clip(trained):
    root, _ = trained
    data = root / "data-shrinking"
    shutil.copytree(root / "data", data)
    out = root / "shrinking"
    finetune(config(root, out, data=str(data), max_epochs_this_run=1))
    with pytest.raises(ValueError, match=r"--grad-clip: 1.0 → 0.5"):
        finetune(config(root, out, data=str(data), resume=True, grad_clip=0.5))
    for path in sorted((data / "train" / "red_horizontal").glob("*.png"))[:3]:
        path.unlink()
    with pytest.raises(
        ValueError, match=r"trained on 24 image files \(3 steps an epoch\), this training set has 21 \(2\)"
    ):
        finetune(config(root, out, data=str(data), resume=True))


def test_a_log_without_a_checkpoint_is_no_run_to_protect(trained):
    """A run that failed before its first checkpoint left only its log: a new run may start there."""
    root, _ = trained
    out = root / "failed-early"
    out.mkdir()
    (out / "train_log.jsonl").write_text('{"type": "step", "step": 1, "loss": 9.0}\n')
    finetune(config(root, out, epochs=1))
    assert [r["step"] for r in read_log(out / "train_log.jsonl") if r["type"] == "step"] == [1, 2, 3]
    assert 9.0 not in [r.get("loss") for r in read_log(out / "train_log.jsonl")]


def test_a_closed_stdout_does_not_end_training(trained, tmp_path):
    """`finetune ... | head -1`: the reader goes away after the first line; training goes on to the end."""
    root, _ = trained
    out = tmp_path / "piped"
    argv = [sys.executable, "-m", "vithybrid_fast", "finetune", str(root / "data"), "--model", str(root / "start"),
            "--output-dir", str(out), "--epochs", "2", "--batch-size", "8", "--kernels", "sdpa", "--num-workers", "0",
            "--device", "cpu"]  # fmt: skip
    job = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert job.stdout.readline().startswith("finetune: ")
    job.stdout.close()  # as head does after its line
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr
    assert torch.load(out / "last" / "training_state.pt", weights_only=True)["epoch"] == 2


def test_training_classes_without_images_are_an_error_and_hidden_folders_no_classes(trained):
    root, _ = trained
    data = root / "data-with-extra-folders"
    shutil.copytree(root / "data", data)
    (data / "train" / ".ipynb_checkpoints").mkdir()  # hidden: not a class
    (data / "train" / "zzz_empty" / "notes").mkdir(parents=True)
    (data / "train" / "zzz_empty" / "notes" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"no images of the classes \['zzz_empty'\]: add images, or remove"):
        finetune(config(root, root / "extra", data=str(data)))
    assert not (root / "extra").exists()


def test_freeze_backbone_and_gradient_accumulation(trained):
    root, _ = trained
    runs = {}
    for accum in (1, 2):
        out = root / f"frozen-{accum}"
        finetune(config(root, out, epochs=1, freeze_backbone=True, grad_accum=accum))
        runs[accum] = load_file(out / "last" / "model.safetensors")
    start = load_file(root / "start" / "model.safetensors")
    for key, tensor in runs[1].items():
        if key.startswith("vit."):
            assert torch.equal(tensor, start[key]), key  # frozen: untouched
    # the head trained: it moved from the one finetune starts from (the same seed builds the same head)
    initial = classifier_for_classes(str(root / "start"), list(CLASSES), seed=0).state_dict()
    for key in ("classifier.weight", "classifier.bias"):
        assert runs[1][key].shape == initial[key].shape
        assert (runs[1][key] - initial[key]).abs().max() > 1e-4, key
    for key in runs[1]:  # two micro-batches of 4 = one batch of 8
        assert torch.allclose(runs[1][key], runs[2][key], atol=1e-6), key


def test_gradient_checkpointing_trains_the_same_steps(trained, monkeypatch):
    """--gradient-checkpointing recomputes activations in the backward pass: the same losses step by step."""
    import torch.utils.checkpoint

    root, _ = trained
    real, calls = torch.utils.checkpoint.checkpoint, []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = root / "checkpointed"
    argv = ["finetune", str(root / "data"), "--model", str(root / "start"), "--output-dir", str(out), "--epochs", "3",
            "--batch-size", "8", "--lr", "1e-3", "--num-workers", "0", "--kernels", "sdpa", "--device", "cpu",
            "--max-epochs-this-run", "1", "--gradient-checkpointing"]  # fmt: skip
    assert main(argv) == 0
    steps = [r for r in read_log(out / "train_log.jsonl") if r["type"] == "step"]
    uncheckpointed = [r for r in read_log(root / "out" / "train_log.jsonl") if r["type"] == "step"]
    assert len(calls) >= len(steps) * 6  # the tiny model's 2 encoder + 4 bottleneck layers, every step
    assert [r["loss"] for r in steps] == [r["loss"] for r in uncheckpointed[: len(steps)]]


def test_bad_settings_are_errors_with_reasons(trained, capsys):
    root, _ = trained
    argv = ["finetune", str(root / "data"), "--model", str(root / "start"), "--kernels", "sdpa", "--num-workers", "0",
            "--device", "cpu"]  # fmt: skip
    assert main([*argv, "--output-dir", str(root / "x"), "--batch-size", "6", "--grad-accum", "4"]) == 1
    assert "--batch-size 6 must be a multiple of ranks × --grad-accum (1 × 4)" in capsys.readouterr().err
    assert main([*argv, "--output-dir", str(root / "x"), "--resume"]) == 1
    assert "no saved step to continue from" in capsys.readouterr().err
    assert (
        main(
            [*argv, "--output-dir", str(root / "out"), "--resume", "--lr", "0.5", "--batch-size", "8", "--epochs", "3"]
        )
        == 1
    )
    assert "other settings than the saved run: --lr: 0.001 → 0.5" in capsys.readouterr().err
    # dtypes are compared by what they mean here: auto is float32 on a CPU (the saved run said auto)
    resume = [*argv, "--output-dir", str(root / "out"), "--resume", "--batch-size", "8", "--epochs", "3"]
    assert main([*resume, "--lr", "0.5", "--dtype", "float32"]) == 1
    assert "other settings than the saved run: --lr: 0.001 → 0.5. Resume" in capsys.readouterr().err
    assert main([*resume, "--lr", "0.001", "--dtype", "bfloat16"]) == 1
    assert "other settings than the saved run: --dtype: float32 → bfloat16. Resume" in capsys.readouterr().err
    # out-of-range numbers are usage errors (exit 2), as argparse's own checks are, saying the range
    for flag, value, span in (
        ("--min-crop-scale", "0", "(0, 1]"), ("--min-crop-scale", "2", "(0, 1]"), ("--label-smoothing", "1", "[0, 1)"),
        ("--lr", "0", "(0, ∞)"), ("--lr", "inf", "(0, ∞)"), ("--weight-decay", "-1", "[0, ∞)"),
        ("--warmup-ratio", "5", "[0, 1]"), ("--warmup-ratio", "nan", "[0, 1]"), ("--grad-clip", "-1", "[0, ∞)"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as usage:
            main([*argv, "--output-dir", str(root / "x"), flag, value])
        assert usage.value.code == 2, flag
        assert f"argument {flag}: must lie in {span}, got {value}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main([*argv, "--output-dir", str(root / "x"), "--seed", "-1"])
    assert usage.value.code == 2
    assert not (root / "x").exists()  # refused before anything was written
    # the Python API checks the same ranges, and the counts argparse checks
    wrong = (("grad_clip", -1.0), ("lr", float("nan")), ("label_smoothing", 1.0), ("seed", -1), ("grad_accum", 0),
             ("epochs", 0), ("max_epochs_this_run", 0), ("batch_size", 2.5))  # fmt: skip
    for field, value in wrong:
        with pytest.raises(ValueError, match=f"--{field.replace('_', '-')}"):
            finetune(config(root, root / "x", **{field: value}))
    assert not (root / "x").exists()
    with pytest.raises(SystemExit) as usage:
        main([*argv, "--output-dir", str(root / "x"), "--augment", "mixup"])
    assert usage.value.code == 2
    with pytest.raises(SystemExit) as usage:
        main([*argv, "--output-dir", str(root / "x"), "--dtype", "float64"])
    assert usage.value.code == 2


def test_config_default_num_workers_is_the_usable_cpus_up_to_4(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert FinetuneConfig(data="d", model="m", output_dir=tmp_path).num_workers == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert FinetuneConfig(data="d", model="m", output_dir=tmp_path).num_workers == 4


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_saved_checkpoints_are_as_readable_as_their_config(trained):
    """model.safetensors was 0600 beside a 0644 config.json: unreadable in a shared model directory."""
    root, _ = trained
    for name in ("best", "last"):
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (root / "out" / name).iterdir()}
        assert set(modes.values()) == {modes["config.json"]}, {k: oct(v) for k, v in modes.items()}


def test_warmup_cosine_schedule():
    factor = warmup_cosine(total_steps=10, warmup_steps=2, min_ratio=0.1)
    assert [factor(s) for s in (0, 1)] == [0.5, 1.0]
    assert factor(2) == pytest.approx(1.0) and factor(10) == pytest.approx(0.1)
    assert factor(6) == pytest.approx(0.1 + 0.9 * 0.5)


def test_one_training_step_with_triton_kernels_matches_the_reference(trained, device):
    """Loss and every gradient of one step, Triton kernels (interpreter) vs the plain-PyTorch reference.

    (Not the AdamW update: Adam's first step is ±lr wherever a gradient is nonzero, so rounding noise in
    a gradient that is zero in exact arithmetic becomes a full-size step — equal gradients are the test.)"""
    root, _ = trained
    pixels, labels = val_pixels(root)
    pixels, labels = pixels[[0, 5]].to(device), labels[[0, 5]].to(device)  # 2 images: the interpreter is slow
    reference = classifier_for_classes(str(root / "start"), list(CLASSES), seed=0).to(device).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = vf.patch(copy.deepcopy(reference), "triton")
    # head size 32: the Triton attention runs. (Match the head-size fallback itself: on a CUDA GPU this fp32
    # model also gets a SlowFloat32Warning, whose advice names SDPA too; that one is expected.)
    assert not [w for w in caught if "flash_attention supports head sizes" in str(w.message)]
    swapped = {cls for _, cls in patched_modules(fast)}
    assert swapped == {"FastSelfAttention", "FastViTLayer", "FastWeightStandardizedConv2d",
                       "FastGroupNormActivation", "FastBottleneckLayer"}  # fmt: skip
    results = {}
    for name, model in (("reference", reference), ("triton", fast)):
        loss = model(pixels, labels=labels).loss
        loss.backward()
        results[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (ref_loss, ref_grads), (loss, grads) = results["reference"], results["triton"]
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6), (loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) > 50
    largest = max(g.abs().max().item() for g in ref_grads.values())
    for key, ref in ref_grads.items():
        # the key bias gets no gradient in exact arithmetic (softmax ignores a constant per query): its
        # float "gradient" is rounding noise, so every tensor also gets an atol scaled to the largest gradient
        bound = 1e-3 * ref.abs().max().item() + 1e-5 * largest
        assert (grads[key] - ref).abs().max().item() <= bound, key


def test_training_benchmark_runs_on_the_cpu_smoke_config():
    """bench/bench_train.py's mechanics (the GPU numbers need a GPU): a record per provider, no error."""
    from vithybrid_fast.bench.bench_train import run, table

    records = run(device="cpu", batches=(2,), dtypes=("float32",), config_name="tiny", reps=1)
    assert [r["provider"] for r in records] == ["ref-sdpa"] and "error" not in records[0], records
    assert records[0]["images_per_s"] > 0 and records[0]["speedup_vs_ref_sdpa"] == 1.0
    assert "ref-sdpa" in table(records)


def test_training_benchmark_measures_gradient_checkpointing_when_asked():
    from vithybrid_fast.bench.bench_train import build, run
    from vithybrid_fast.bench.e2e import CONFIGS, random_state_dict

    records = run(device="cpu", batches=(2,), dtypes=("float32",), providers=("ref-sdpa", "ref-sdpa-ckpt"),
                  config_name="tiny", reps=1)  # fmt: skip
    assert [r["provider"] for r in records] == ["ref-sdpa", "ref-sdpa-ckpt"] and all("error" not in r for r in records)
    config, cpu = CONFIGS["tiny"](), torch.device("cpu")
    assert build("ref-sdpa-ckpt", config, random_state_dict(config, cpu), cpu).is_gradient_checkpointing
    assert not build("ref-sdpa", config, random_state_dict(config, cpu), cpu).is_gradient_checkpointing


def test_training_benchmark_float16_step_scales_the_loss_as_finetune_does():
    """bench_train's float16 step pays for what `finetune`'s does: a GradScaler, unscaled before clipping."""
    from vithybrid_fast.bench.bench_train import build, make_step
    from vithybrid_fast.bench.e2e import CONFIGS, random_state_dict

    config = CONFIGS["tiny"]()
    model = build("ref-sdpa", config, random_state_dict(config, torch.device("cpu")), torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pixels = torch.randn(2, 3, *config.image_size_hw, generator=torch.Generator().manual_seed(0))
    step = make_step(model, pixels, torch.tensor([0, 1]), torch.float16)
    step()
    assert step.scaler.is_enabled() and step.scaler.get_scale() == 2.0**8 and step.skipped == 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # the step was taken
    assert not make_step(model, pixels, torch.tensor([0, 1]), torch.bfloat16).scaler.is_enabled()
    from vithybrid_fast.bench.bench_train import run

    (record,) = run(device="cpu", batches=(2,), dtypes=("float16",), config_name="tiny", reps=1)
    assert "error" not in record and record["fp16_skipped_steps"] == 0 and record["images_per_s"] > 0, record


def test_the_hub_model_offline_and_uncached_fails_first_and_plainly(trained, tmp_path):
    """It printed two notes promising built-in presets, scanned the data, then failed on the weights."""
    root, _ = trained
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))  # an empty cache
    argv = [sys.executable, "-m", "vithybrid_fast", "finetune", str(root / "data"), "--output-dir",
            str(tmp_path / "run"), "--device", "cpu", "--kernels", "sdpa"]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and "is not in the local Hugging Face cache" in done.stderr
    assert "preset" not in done.stderr and done.stdout == ""


def test_training_benchmark_writes_each_record_as_measured_and_reports_when_stopped(tmp_path, monkeypatch, capsys):
    """An H100 call stopped the train step at its budget with nothing written: records waited for every
    provider of a batch (ours-triton first, compiling for minutes) before any was written."""
    from vithybrid_fast.bench import bench_train

    real_build = bench_train.build

    def build(provider, *args):
        if provider == "ref-sdpa-ckpt":
            raise KeyboardInterrupt  # the budget's SIGINT, while the second provider compiles
        return real_build(provider, *args)

    monkeypatch.setattr(bench_train, "build", build)
    out = tmp_path / "train.json"
    argv = ["--device", "cpu", "--config", "tiny", "--batches", "2", "--reps", "1", "--dtypes", "float32",
            "--providers", "ref-sdpa-ckpt,ref-sdpa", "--out", str(out)]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        bench_train.main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 130 and "reporting the 1 records measured so far" in captured.err
    (record,) = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert record["provider"] == "ref-sdpa" and record["speedup_vs_ref_sdpa"] == 1.0  # the baseline ran first
    assert "  ref-sdpa " in captured.out and " img/s " in captured.out  # a progress line as it was measured


def test_compile_trains_the_compiled_step_and_saves_the_bare_model(trained, tmp_path, monkeypatch):
    """--compile: the training step runs through torch.compile (here on aot_eager: Dynamo and AOTAutograd
    trace forward and backward, without Inductor's C++ build), validation and checkpoints use the bare
    model (no "_orig_mod." keys), and the run trains as the uncompiled one does."""
    root, _ = trained
    compiled = []
    real_compile = torch.compile

    def on_aot_eager(module, **kwargs):
        compiled.append((module, kwargs))
        return real_compile(module, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", on_aot_eager)
    torch._dynamo.reset()
    try:
        summary = finetune(config(root, tmp_path / "out", epochs=1, compile=True))
    finally:
        torch._dynamo.reset()
    ((module, kwargs),) = compiled
    assert isinstance(module, vf.ViTHybridForImageClassification) and kwargs == {}
    plain = finetune(config(root, tmp_path / "plain", epochs=1))
    assert summary["best"]["top1"] == plain["best"]["top1"]
    ours, theirs = (load_file(p / "last" / "model.safetensors") for p in (tmp_path / "out", tmp_path / "plain"))
    assert sorted(ours) == sorted(theirs) and not [k for k in ours if "_orig_mod" in k]
    worst = max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours)
    assert worst < 1e-4, worst  # the same three optimizer steps, traced: float rounding only
    steps = [r["loss"] for r in read_log(tmp_path / "out" / "train_log.jsonl") if r["type"] == "step"]
    plain_steps = [r["loss"] for r in read_log(tmp_path / "plain" / "train_log.jsonl") if r["type"] == "step"]
    assert steps == pytest.approx(plain_steps, rel=1e-4)


def test_kernels_auto_trains_with_sdpa_on_a_gpu_older_than_sm80(monkeypatch):
    """finetune's default `--kernels auto` took "triton" on any CUDA device, so on a T4 or V100 (where
    `--dtype auto` trains in float16 on purpose) it stopped with kernels='triton' cannot run; vf.load's
    "auto" falls back to SDPA there, saying why."""
    from vithybrid_fast import gpu_support
    from vithybrid_fast.gpu_support import KernelFallbackWarning
    from vithybrid_fast.train import training_kernels

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(gpu_support, "triton_importable", lambda: True)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.warns(KernelFallbackWarning, match=r"Tesla T4 has compute capability 7.5 \(sm_75\)"):
        assert training_kernels("auto", cuda) == "sdpa"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert training_kernels("auto", cuda) == "triton"
    assert training_kernels("auto", torch.device("cpu")) == "sdpa"
    assert training_kernels("eager", cuda) == "eager"  # an explicit choice is kept (validate_kernels judges it)


# -- what a user's run must never lose or pass off as a result (session 20's audit) -------------------------
def _argv(root, out, *extra):
    return ["finetune", str(root / "data"), "--model", str(root / "start"), "--kernels", "sdpa", "--num-workers",
            "0", "--device", "cpu", "--epochs", "1", "--batch-size", "8", "--output-dir", str(out), *extra]  # fmt: skip


def test_overwrite_refuses_to_delete_the_model_it_starts_from(trained, capsys):
    root, _ = trained
    out = root / "further-in-place"
    shutil.copytree(root / "out", out)
    before = (out / "best" / "model.safetensors").read_bytes()
    argv = _argv(root, out, "--overwrite")
    argv[argv.index("--model") + 1] = str(out / "best")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"--overwrite would delete {out / 'best'}, which --model {out / 'best'} starts from" in err
    assert (out / "best" / "model.safetensors").read_bytes() == before and (out / "last").is_dir()


def test_overwrite_keeps_the_earlier_run_until_the_new_one_has_saved(trained, capsys):
    """--overwrite removed the earlier run at start-up: a new run failing at its first step (an unreadable
    image, out of memory) left the output directory empty. The earlier run now waits in
    OUT/.overwritten-run until the new run's first checkpoint."""
    root, _ = trained
    out = root / "overwritten"
    shutil.copytree(root / "out", out)
    best, log = (out / "best" / "model.safetensors").read_bytes(), (out / "train_log.jsonl").read_text()
    broken = root / "broken-data"
    shutil.copytree(root / "data", broken)
    victim = next((broken / "train").rglob("*.png"))
    victim.write_bytes(victim.read_bytes()[:60])  # truncated: decoding fails in the first step
    argv = _argv(root, out, "--overwrite")
    argv[1] = str(broken)
    assert main(argv) == 1
    assert "cannot read image" in capsys.readouterr().err
    aside = out / ".overwritten-run"
    assert (aside / "best" / "model.safetensors").read_bytes() == best
    assert (aside / "train_log.jsonl").read_text() == log
    assert (aside / "last").is_dir() and not (out / "best").exists() and not (out / "last").exists()
    # without --overwrite a new run refuses to take the directory (the set-aside run is a run)
    assert main(_argv(root, out)) == 1
    assert "holds a run (.overwritten-run)" in capsys.readouterr().err
    # a second failing attempt keeps the set-aside run as it is; a run that saves removes it
    assert main(argv) == 1 and (aside / "best" / "model.safetensors").read_bytes() == best
    assert main(_argv(root, out, "--overwrite")) == 0
    assert not aside.exists() and (out / "best").is_dir()
    assert [r["step"] for r in read_log(out / "train_log.jsonl") if r["type"] == "step"] == [1, 2, 3]


def test_a_single_class_is_refused(tmp_path, capsys):
    root = write_finetune_inputs(tmp_path)
    for split in ("train", "val"):
        for folder in sorted((root / "data" / split).iterdir())[1:]:
            shutil.rmtree(folder)
    assert main(_argv(root, root / "one-class")) == 1
    assert "one class only ('" in (err := capsys.readouterr().err) and "a classifier needs two or more" in err
    assert not (root / "one-class" / "best").exists()


def test_a_diverging_run_stops_before_nan_weights_are_applied_or_saved(tmp_path, capsys):
    """bfloat16/float32 runs went on with NaN weights, validated them (NaN logits rank label 0 first, a
    believable top-1) and saved them as best/, exiting 0."""
    root = write_finetune_inputs(tmp_path)
    out = root / "diverged"
    assert main(_argv(root, out, "--lr", "1e6", "--grad-clip", "0", "--epochs", "2", "--warmup-ratio", "0")) == 1
    err = capsys.readouterr().err
    assert "the run diverged; that step was not applied, and nothing was saved after it" in err, err[-2000:]
    for directory in (out / "best", out / "last"):
        if directory.exists():
            weights = load_file(directory / "model.safetensors")
            assert all(torch.isfinite(t).all() for t in weights.values()), directory
    assert "NaN" not in (out / "train_log.jsonl").read_text()  # strict JSON: no bare NaN tokens


def test_without_a_terminal_progress_lines_come_now_and_then(tmp_path, capsys, monkeypatch):
    """Under nohup, Slurm or a pipe there is no progress bar, and stdout got one line per epoch: an ImageNet
    epoch said nothing for an hour. A plain line comes at most once a minute (here: every step)."""
    from vithybrid_fast import train_loop

    monkeypatch.setattr(train_loop, "PROGRESS_SECONDS", 0.0)
    root = write_finetune_inputs(tmp_path)
    assert main(_argv(root, root / "out")) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 1/1 step")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/1 step 1/3", "epoch 1/1 step 2/3", "epoch 1/1 step 3/3"]
    assert all("loss " in line and "images/s" in line for line in lines)
