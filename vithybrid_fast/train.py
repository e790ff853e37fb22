"""Fine-tuning: a ViT Hybrid checkpoint → a classifier of your image folder's classes.

    vithybrid-fast finetune ./flowers --model google/vit-hybrid-base-bit-384 --output-dir ./flowers-vit \
        --epochs 10 --batch-size 64 --lr 1e-4
    torchrun --nproc-per-node 8 -m vithybrid_fast finetune ./flowers --model ... --output-dir ./flowers-vit

DATA holds `train/` and `val/` (image folders, or train.csv / val.csv / .jsonl lists), or is `hf:NAME`
(splits --train-split / --val-split). The classification head is re-created for the training classes
(`id2label` = class names in sorted folder order) unless `--model` already classifies exactly these
classes (training a fine-tuned model further); everything else comes from `--model` (any checkpoint
`vf.load` reads; a headless ViTHybridModel checkpoint too).

Optimisation: AdamW (no weight decay on biases, norms and embeddings tokens), linear warm-up then cosine
decay per optimizer step, gradient clipping, bf16 autocast on sm_80+ GPUs (float16 with dynamic loss
scaling on V100 / T4), gradient accumulation, `--freeze-backbone` (train the head only),
`--gradient-checkpointing` (less memory), our Triton kernels forward and backward on a GPU (`--kernels auto`;
SDPA on a CPU and on GPUs older than sm_80), `--compile` (torch.compile of the training step). Training
images are augmented (`--augment`: random resized crop and horizontal flip by default, seeded per image
and epoch, see `augment.py`); validation images get the checkpoint's own preprocessing. `--label-smoothing` softens the
cross-entropy targets.
`--batch-size` is the *global* batch of one optimizer step: each of W ranks runs batch/(W·accum) images
per micro-step, so W, accum and the batch are independent choices that give the same optimisation.

Every epoch: validation (exact counts over ranks), `OUT/last` and, when validation top-1 improves,
`OUT/best`, each a `save_pretrained` directory (config.json, model.safetensors and the processor's
preprocessor_config.json: transformers 4.47.1 and `vf.load` read it). `OUT/last/training_state.pt`
holds the optimizer, scheduler, loss-scale, step, RNG states and the position in the epoch; it is also
written every `--save-every-steps` steps and when a stop signal (SIGTERM, Ctrl-C) ends the run at its
next optimizer step (exit status 128 + the signal). `--resume` continues from there, mid-epoch too, and
ends with the weights an uninterrupted run gets (on a CPU, same seed; tests/test_finetune.py,
tests/test_preemption.py; see `train_state.py`). `OUT/train_log.jsonl` gets one JSON line per optimizer
step, per epoch and per mid-epoch checkpoint.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .distributed import default_num_workers
from .train_loop import Run, end_epoch, stop_agreed, train_epoch
from .train_setup import DTYPES, autocast_dtype, loss_scaler, parameter_groups, start_model, warmup_cosine
from .train_state import (
    LOG_NAME,
    JsonlLog,
    ResumableSampler,
    StopRequest,
    StopSafeLoader,
    check_output_dir,
    check_same_data,
    clear_run,
    load_resume_state,
    say,
    seed_everything,
    set_rng_state,
    trim_log,
)


@dataclass
class FinetuneConfig:
    data: str
    model: str
    output_dir: Path
    epochs: int = 10
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    freeze_backbone: bool = False
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~1 more forward
    compile: bool = False  # torch.compile the training forward and backward: speed only, not a resume setting
    augment: str = "crop-flip"  # crop-flip | flip | none (see augment.py)
    min_crop_scale: float = 0.08  # smallest crop area of crop-flip, as a fraction of the image
    label_smoothing: float = 0.0
    kernels: str = "auto"
    dtype: str = "auto"
    device: str | None = None
    num_workers: int = field(default_factory=default_num_workers)  # 4, or the usable CPUs if fewer
    seed: int = 0
    resume: bool = False
    overwrite: bool = False  # start afresh in an output directory that holds a run
    on_error: str = "fail"
    train_split: str = "train"
    val_split: str = "validation"
    image_column: str = "image"  # hf: datasets' columns (CIFAR's is "img")
    label_column: str = "label"
    max_epochs_this_run: int | None = None  # stop early (e.g. a job time limit); continue with resume=True
    save_every_steps: int | None = None  # also write OUT/last every N optimizer steps (long epochs)


def data_specs(data: str) -> tuple[str, str]:
    """(train, val) dataset specs inside DATA: folders train/ val/ (or valid/, validation/), or list files."""
    if data.startswith("hf:"):
        return data, data
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory (expected {root}/train/ and {root}/val/)")
    found = {}
    for split, names in (("train", ("train",)), ("val", ("val", "valid", "validation"))):
        candidates = [root / f"{n}{suffix}" for n in names for suffix in ("", ".csv", ".jsonl")]
        match = next((c for c in candidates if c.exists()), None)
        if match is None:
            raise FileNotFoundError(f"{root}: no {split}/ folder (or {split}.csv / {split}.jsonl list) in it")
        found[split] = str(match)
    return found["train"], found["val"]


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run a fine-tuning job (see the module docstring); returns a summary (rank 0's view)."""
    from . import distributed

    ctx = distributed.setup(cfg.device)
    try:
        return _finetune(cfg, ctx)
    finally:
        distributed.teardown()


def _checked_batch_split(cfg: FinetuneConfig, ctx: Any) -> int:
    per_rank, leftover = divmod(cfg.batch_size, ctx.world_size * cfg.grad_accum)
    if leftover or per_rank == 0:
        raise ValueError(
            f"--batch-size {cfg.batch_size} must be a multiple of ranks × --grad-accum "
            f"({ctx.world_size} × {cfg.grad_accum})"
        )
    return per_rank


# the smallest value of each integer setting and the range of each float one: the CLI's argparse types,
# and check_settings for the Python API
INT_MINIMUMS = {
    "epochs": 1, "batch_size": 1, "grad_accum": 1, "num_workers": 0, "max_epochs_this_run": 1,
    "save_every_steps": 1, "seed": 0,
}  # fmt: skip
FLOAT_RANGES = {
    "lr": dict(low=0.0, low_open=True), "weight_decay": dict(low=0.0), "warmup_ratio": dict(low=0.0, high=1.0),
    "grad_clip": dict(low=0.0), "min_crop_scale": dict(low=0.0, high=1.0, low_open=True),
    "label_smoothing": dict(low=0.0, high=1.0, high_open=True), "min_lr_ratio": dict(low=0.0, high=1.0),
}  # fmt: skip


def check_settings(cfg: FinetuneConfig) -> None:
    """Reject settings no run can use, before any data or weights are read."""
    import argparse

    from .augment import MODES
    from .cli import float_in

    if cfg.augment not in MODES:
        raise ValueError(f"--augment {cfg.augment!r}: choose one of {', '.join(MODES)}")
    if cfg.augment != "crop-flip" and cfg.min_crop_scale != FinetuneConfig.min_crop_scale:
        # a warning, not an error: a sweep varying --augment passes the same other flags to every run
        warnings.warn(f"--min-crop-scale is unused: --augment {cfg.augment} draws no crops", stacklevel=2)
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume continues the run in --output-dir and --overwrite replaces it: choose one")
    for name, span in FLOAT_RANGES.items():
        try:
            float_in(**span)(repr(float(getattr(cfg, name))))
        except argparse.ArgumentTypeError as err:
            raise ValueError(f"--{name.replace('_', '-')} {err}") from None
    for name, least in INT_MINIMUMS.items():
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or value < least):
            raise ValueError(f"--{name.replace('_', '-')} {value!r}: must be an integer of at least {least}")


def training_kernels(kernels: str, device: torch.device) -> str:
    """`--kernels` resolved: "auto" is vf.load's choice without its measured dispatch (training runs every
    kernel): "triton" where the kernels run compiled (a CUDA GPU of sm_80 or newer, triton installed), else
    "sdpa", with a warning saying why on an older GPU (a T4 or V100, where --dtype auto trains in float16)."""
    from .gpu_support import auto_choice
    from .patching import triton_can_run

    return auto_choice(device, triton_can_run(device)) if kernels == "auto" else kernels


def _prepare(cfg: FinetuneConfig, ctx: Any) -> tuple[Run, int]:
    """Data, model, optimizer and schedule (restored with --resume); returns the run and its first epoch."""
    from .augment import TrainAugment
    from .cli import _processor_for
    from .config import ViTHybridConfig
    from .data import ImagePipeline, check_source, collate, open_dataset
    from .evaluate import make_loader
    from .loading import find_weight_files, load_model
    from .patching import patch_for_autocast, validate_kernels

    kernels = training_kernels(cfg.kernels, ctx.device)
    validate_kernels(kernels, ctx.device)  # before any data or weights are read
    check_settings(cfg)
    per_rank = _checked_batch_split(cfg, ctx)
    check_output_dir(cfg)
    dtype = autocast_dtype(cfg.dtype, ctx.device)
    resumed = load_resume_state(cfg, str(dtype).removeprefix("torch."))
    state, resume_dir = resumed if resumed is not None else (None, None)
    seed_everything(cfg.seed)

    # DATA's cheap checks (it exists; hf: has a name and `datasets`) before the model's weights are found:
    # a typo in DATA must not cost their download first, nor hide behind the hub's error offline
    train_spec, val_spec = data_specs(cfg.data)
    for spec in dict.fromkeys((train_spec, val_spec)):
        check_source(spec)
    if state is None:  # offline and uncached: said before the data is scanned, not after a preset's notes
        find_weight_files(cfg.model)
    # resuming: the saved run's own preprocessing (saved beside its weights), not --model's
    source = resume_dir if state is not None else cfg.model
    processor = _processor_for(str(source), ViTHybridConfig.from_pretrained(source))
    pipeline = ImagePipeline(processor)
    columns = {"image_column": cfg.image_column, "label_column": cfg.label_column}
    train_data = open_dataset(train_spec, pipeline, split=cfg.train_split, **columns)
    val_data = open_dataset(val_spec, pipeline, classes=train_data.classes, split=cfg.val_split, **columns)
    if train_data.name == val_data.name:  # hf:DIR of one dataset, or hf:NAME:SPLIT naming one split for both
        raise ValueError(
            f"{cfg.data}: the training and the validation data are both {train_data.name}, so best/ would be "
            "chosen by accuracy on the training images: give a dataset with train and validation splits "
            "(hf:NAME, or a save_to_disk DatasetDict; --train-split / --val-split name them)"
        )
    train_data.augment = TrainAugment(pipeline, cfg.augment, cfg.min_crop_scale, cfg.seed)
    if len(train_data.classes) < 2:  # softmax over one class: loss 0, no gradient, top-1 1.0 for any weights
        raise ValueError(f"{train_spec}: one class only ({train_data.classes[0]!r}): a classifier needs two or more")
    empty = sorted(set(train_data.classes) - {train_data.classes[s.label] for s in train_data.samples})
    if empty:  # a class without a training image would still get a head row and an index
        raise ValueError(f"{train_spec}: no images of the classes {empty}: add images, or remove their folders")
    absent = sorted(set(train_data.classes) - {train_data.classes[s.label] for s in val_data.samples})
    if absent and ctx.is_main:  # allowed (small validation sets), but its accuracy then says nothing of them
        print(f"warning: {val_spec} has no images of the classes {absent}", file=sys.stderr)

    out = Path(cfg.output_dir)
    if state is not None:
        model = load_model(resume_dir, dtype=torch.float32, device="cpu")
        if [model.config.id2label[i] for i in range(model.config.num_labels)] != train_data.classes:
            raise ValueError(f"--resume: {resume_dir} was trained on other classes than {train_data.classes}")
    else:
        model, kept_head = start_model(cfg.model, train_data.classes, cfg.seed)
        if kept_head and ctx.is_main:
            say(
                f"finetune: {cfg.model} already classifies these classes: its head is kept (in the data's class "
                "order), not re-created"
            )
    model.to(ctx.device).train()
    if cfg.freeze_backbone:
        model.vit.requires_grad_(False)
    if cfg.gradient_checkpointing:  # changes memory and time only: not a --resume setting
        model.gradient_checkpointing_enable()
    patch_for_autocast(model, kernels, dtype)  # float32 weights, autocast steps: no float32-kernel warning
    trained = model
    if ctx.enabled:
        # the model has no buffers (GroupNorm, LayerNorm): nothing to broadcast, so torch's default stays
        trained = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None
        )
    if cfg.compile:
        # the DDP wrapper compiled, not the model inside it: Dynamo then splits the graph at DDP's gradient
        # buckets (its DDPOptimizer), so the all-reduces still overlap the backward. `model` stays the
        # uncompiled module that is saved and validated (its state_dict has no "_orig_mod." prefix).
        trained = torch.compile(trained)

    # every rank draws the same permutation (seed + epoch) and takes every world_size-th sample, so one
    # global batch holds the same images whatever the number of ranks
    sampler = ResumableSampler(torch.utils.data.distributed.DistributedSampler(
        train_data, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed
    ))  # fmt: skip
    train_loader = StopSafeLoader(
        train_data, batch_size=per_rank, sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate,
        drop_last=True, pin_memory=ctx.device.type == "cuda", persistent_workers=False,  # see set_epoch
        # its own generator: starting an iterator (mid-epoch after --resume too) draws no global random
        # number, so dropout's stream is the same however the run was cut
        generator=torch.Generator().manual_seed(cfg.seed),
    )  # fmt: skip
    steps_per_epoch = len(train_loader) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"{train_spec}: {len(train_data)} images fill no batch of {cfg.batch_size}; lower it")
    if state is not None:
        check_same_data(state, len(train_data), steps_per_epoch, resume_dir)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr)
    schedule = warmup_cosine(total_steps, max(1, round(cfg.warmup_ratio * total_steps)), cfg.min_lr_ratio)
    run = Run(
        cfg, ctx, model, trained, processor, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
        sampler, train_loader, make_loader(val_data, max(1, cfg.batch_size // ctx.world_size), cfg.num_workers, ctx),
        steps_per_epoch, dtype, loss_scaler(dtype, ctx.device), JsonlLog(out / LOG_NAME, ctx.is_main),
        best={"top1": -1.0, "epoch": None},
    )  # fmt: skip
    first_epoch = 0
    if state is not None:
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        run.step, first_epoch, run.best = state["step"], state["epoch"], state["best"]
        run.steps_into_epoch, run.epoch_loss_sum = state.get("steps_into_epoch", 0), state.get("epoch_loss_sum", 0.0)
        run.saved_at = (first_epoch, run.steps_into_epoch)
        if run.scaler.is_enabled() and "scaler" in state:  # a float16 run's loss scale continues too
            run.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])  # last: building the model above drew from the generators
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if state is not None:
            trim_log(out / LOG_NAME, run.step)
        else:
            clear_run(out)  # --overwrite: nothing of the earlier run may pass for this one's
        say(
            f"finetune: {len(train_data)} train / {len(val_data)} val image files, {len(train_data.classes)} classes, "
            f"{ctx.world_size} rank(s) on {ctx.device}, kernels {kernels}, "
            f"autocast {str(run.autocast_dtype).removeprefix('torch.')}, augment {train_data.augment.describe()}"
            + (f", label smoothing {cfg.label_smoothing:g}" if cfg.label_smoothing else "")
            + f", {steps_per_epoch} steps/epoch × {cfg.epochs} epochs"
            + (
                f", resuming after step {run.step} (epoch {first_epoch + 1}, step {run.steps_into_epoch})"
                if state is not None and first_epoch < cfg.epochs
                else ""
            )
        )
    return run, first_epoch


def _finetune(cfg: FinetuneConfig, ctx: Any) -> dict[str, Any]:
    run, first_epoch = _prepare(cfg, ctx)
    out = Path(cfg.output_dir)
    summary = {"last_epoch": first_epoch, "best": run.best, "last": {}, "output_dir": str(out), "step": run.step,
               "stopped_by": None}  # fmt: skip
    if first_epoch >= cfg.epochs:
        if ctx.is_main:
            say(f"nothing to do: {out / 'last'} has finished all {cfg.epochs} epochs (best: epoch "
                f"{run.best['epoch']}, val top-1 {run.best['top1']:.4f})")  # fmt: skip
        return summary
    last = cfg.epochs if cfg.max_epochs_this_run is None else min(cfg.epochs, first_epoch + cfg.max_epochs_this_run)
    record: dict[str, Any] = {}
    stopped = False
    with StopRequest(announce=ctx.is_main, where=out / "last") as run.stop:
        for epoch in range(first_epoch, last):
            started = time.perf_counter()
            loss_sum = train_epoch(run, epoch)
            epoch_record = None if loss_sum is None else end_epoch(run, epoch, loss_sum, started)
            if epoch_record is None:  # stopped inside the epoch or its validation: OUT/last holds where
                stopped = True
                break
            record = epoch_record
            if epoch + 1 < last and stop_agreed(run):  # stopped after the epoch's checkpoint
                stopped = True
                break
    # the signal this rank got; under torchrun another rank may have got it alone (SIGTERM is what it sends)
    stopped_by = (run.stop.signal or signal.SIGTERM) if stopped else None
    if ctx.is_main:
        if stopped_by is not None:
            print(
                f"stopped by {signal.Signals(stopped_by).name} after step {run.step}: {out / 'last'} holds it; "
                "run the same command with --resume to go on", file=sys.stderr,
            )  # fmt: skip
        else:
            done = record.get("epoch", first_epoch)
            say(
                f"val top-1: {record.get('val_top1', float('nan')):.4f}  best: {run.best['top1']:.4f} "
                f"(epoch {run.best['epoch']})  saved: {out / 'best'}, {out / 'last'}"
                + (f"  ({done} of {cfg.epochs} epochs: --resume goes on)" if done < cfg.epochs else "")
                + (f"  skipped unreadable: {len(run.reported)}" if run.reported else "")
            )
    summary.update(last_epoch=record.get("epoch", first_epoch), best=run.best, last=record, step=run.step,
                   stopped_by=stopped_by)  # fmt: skip
    return summary


def register(subparsers: Any) -> None:
    from .cli import HUB_ID, float_in, int_at_least
    from .evaluate import add_common_arguments

    parser = subparsers.add_parser(
        "finetune", help="fine-tune on an image folder (train/ and val/)", description=__doc__.split("\n\n")[0]
    )
    add = parser.add_argument
    add("data", help="folder with train/ and val/ (folders or .csv/.jsonl lists), or hf:NAME")
    add("--model", default=HUB_ID, help="hub repo id or checkpoint directory to start from (default: %(default)s)")
    add("--output-dir", type=Path, required=True, help="best/, last/ and train_log.jsonl go here")
    add("--epochs", type=int_at_least(INT_MINIMUMS["epochs"]), default=10, help="(default: %(default)s)")
    add_common_arguments(parser)
    parser.set_defaults(batch_size=32)
    add("--lr", type=float_in(**FLOAT_RANGES["lr"]), default=1e-4,
        help="peak learning rate, AdamW (default: %(default)s)")  # fmt: skip
    add("--weight-decay", type=float_in(**FLOAT_RANGES["weight_decay"]), default=0.05,
        help="AdamW's, on matrices (default: %(default)s)")  # fmt: skip
    add("--warmup-ratio", type=float_in(**FLOAT_RANGES["warmup_ratio"]), default=0.1,
        help="fraction of the steps spent warming up (default: %(default)s)")  # fmt: skip
    add("--grad-clip", type=float_in(**FLOAT_RANGES["grad_clip"]), default=1.0,
        help="max global gradient norm; 0: no clipping (default: %(default)s)")  # fmt: skip
    add(
        "--grad-accum",
        type=int_at_least(INT_MINIMUMS["grad_accum"]),
        default=1,
        help="micro-steps per optimizer step (default: %(default)s)",
    )
    add("--freeze-backbone", action="store_true", help="train the classification head only")
    add("--gradient-checkpointing", action="store_true",
        help="keep only each layer's input and recompute the rest in the backward pass: less memory "
        "(fewer --grad-accum steps for a batch) for about one more forward pass of time")  # fmt: skip
    add("--compile", action="store_true",
        help="torch.compile the model's training step (mode 'default'; our kernels stay single ops in its graph, "
        "torch.compile fuses the rest; validation runs the uncompiled model): the first steps compile, a minute or "
        "more on a GPU; a speed setting, not one --resume compares")  # fmt: skip
    add("--augment", default="crop-flip", choices=["crop-flip", "flip", "none"],
        help="training images: random resized crop + horizontal flip, flip only, or none (the evaluation "
        "preprocessing) (default: %(default)s)")  # fmt: skip
    add("--min-crop-scale", type=float_in(**FLOAT_RANGES["min_crop_scale"]), default=0.08,
        help="crop-flip: smallest crop, as a fraction of the image area (default: %(default)s)")  # fmt: skip
    add("--label-smoothing", type=float_in(**FLOAT_RANGES["label_smoothing"]), default=0.0,
        help="cross-entropy label smoothing (default: %(default)s)")  # fmt: skip
    add("--dtype", default="auto", choices=["auto", *DTYPES],
        help="autocast dtype (auto: bfloat16 on sm_80+ GPUs, float16 with loss scaling on sm_70/75, "
        "else float32) (default: %(default)s)")  # fmt: skip
    add("--seed", type=int_at_least(INT_MINIMUMS["seed"]), default=0, help="(default: %(default)s)")
    add("--resume", action="store_true", help="continue from OUTPUT_DIR/last")
    add("--overwrite", action="store_true",
        help="start afresh in an OUTPUT_DIR holding a run (that run goes once this one saves)")  # fmt: skip
    add("--max-epochs-this-run", type=int_at_least(INT_MINIMUMS["max_epochs_this_run"]), default=None,
        help="stop after this many epochs (job time limits); continue with --resume")  # fmt: skip
    add("--save-every-steps", type=int_at_least(INT_MINIMUMS["save_every_steps"]), default=None,
        help="also write OUT/last every N optimizer steps (--resume inside long epochs)")  # fmt: skip
    add("--train-split", default="train", help="hf: datasets only (default: %(default)s)")
    add("--val-split", default="validation", help="hf: datasets only (default: %(default)s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = set(FinetuneConfig.__dataclass_fields__)
    cfg = FinetuneConfig(**{k: v for k, v in vars(args).items() if k in names})
    summary = finetune(cfg)
    return 0 if summary["stopped_by"] is None else 128 + int(summary["stopped_by"])  # the shell's convention
