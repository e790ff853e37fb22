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
scaling on V100 / T4), gradient accumulation, `--freeze-backbone` (train the head only), our Triton
kernels forward and backward on a GPU (`--kernels auto`; SDPA on a CPU). Training images are augmented
(`--augment`: random resized crop and horizontal flip by default, seeded per image and epoch, see
`augment.py`); validation images get the checkpoint's own preprocessing. `--label-smoothing` softens the
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
import json
import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .distributed import default_num_workers
from .train_setup import DTYPES, autocast_dtype, loss_scaler, parameter_groups, start_model, warmup_cosine
from .train_state import (
    LOG_NAME,
    RESUME_KEYS,
    ResumableSampler,
    StopRequest,
    check_output_dir,
    clear_run,
    load_resume_state,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    trim_log,
    workers_ignore_stop_signals,
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


class JsonlLog:
    """Append-only JSON-lines log, written by rank 0 only."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, **record: Any) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run a fine-tuning job (see the module docstring); returns a summary (rank 0's view)."""
    from . import distributed

    ctx = distributed.setup(cfg.device)
    try:
        return _finetune(cfg, ctx)
    finally:
        distributed.teardown()


@dataclass
class _Run:
    """Everything one fine-tuning job holds while it runs."""

    cfg: FinetuneConfig
    ctx: Any
    model: nn.Module  # the bare model (saved, validated)
    trained: nn.Module  # what the forward runs through: the model, or DDP around it
    processor: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: torch.utils.data.distributed.DistributedSampler
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    steps_per_epoch: int
    autocast_dtype: torch.dtype
    scaler: torch.amp.GradScaler  # float16 only; disabled (a pass-through) for bfloat16 / float32
    log: JsonlLog
    step: int = 0
    best: dict[str, Any] | None = None
    steps_into_epoch: int = 0  # a resumed epoch's finished optimizer steps (0: start the epoch afresh)
    epoch_loss_sum: float = 0.0  # and the sum of their losses, for the epoch's mean
    stop: StopRequest | None = None


def _checked_batch_split(cfg: FinetuneConfig, ctx: Any) -> int:
    per_rank, leftover = divmod(cfg.batch_size, ctx.world_size * cfg.grad_accum)
    if leftover or per_rank == 0:
        raise ValueError(
            f"--batch-size {cfg.batch_size} must be a multiple of ranks × --grad-accum "
            f"({ctx.world_size} × {cfg.grad_accum})"
        )
    return per_rank


def check_settings(cfg: FinetuneConfig) -> None:
    """Reject settings no run can use, before any data or weights are read."""
    from .augment import MODES

    if cfg.augment not in MODES:
        raise ValueError(f"--augment {cfg.augment!r}: choose one of {', '.join(MODES)}")
    if not 0.0 < cfg.min_crop_scale <= 1.0:
        raise ValueError(f"--min-crop-scale {cfg.min_crop_scale}: must lie in (0, 1] (a fraction of the image area)")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume continues the run in --output-dir and --overwrite replaces it: choose one")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ValueError(f"--label-smoothing {cfg.label_smoothing}: must lie in [0, 1)")


def _prepare(cfg: FinetuneConfig, ctx: Any) -> tuple[_Run, int]:
    """Data, model, optimizer and schedule (restored with --resume); returns the run and its first epoch."""
    from .augment import TrainAugment
    from .cli import _processor_for
    from .config import ViTHybridConfig
    from .data import ImagePipeline, collate, open_dataset
    from .evaluate import make_loader
    from .loading import load_model
    from .patching import patch, validate_kernels

    kernels = "triton" if cfg.kernels == "auto" and ctx.device.type == "cuda" else cfg.kernels
    kernels = "sdpa" if kernels == "auto" else kernels
    validate_kernels(kernels, ctx.device)  # before any data or weights are read
    check_settings(cfg)
    per_rank = _checked_batch_split(cfg, ctx)
    check_output_dir(cfg)
    resumed = load_resume_state(cfg)
    state, resume_dir = resumed if resumed is not None else (None, None)
    seed_everything(cfg.seed)

    processor = _processor_for(cfg.model, ViTHybridConfig.from_pretrained(cfg.model).image_size_hw)
    pipeline = ImagePipeline(processor)
    train_spec, val_spec = data_specs(cfg.data)
    train_data = open_dataset(train_spec, pipeline, split=cfg.train_split)
    val_data = open_dataset(val_spec, pipeline, classes=train_data.classes, split=cfg.val_split)
    train_data.augment = TrainAugment(pipeline, cfg.augment, cfg.min_crop_scale, cfg.seed)
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
            print(f"finetune: {cfg.model} already classifies these classes: its head is kept, not re-created")
    model.to(ctx.device).train()
    if cfg.freeze_backbone:
        model.vit.requires_grad_(False)
    patch(model, kernels)
    trained = model
    if ctx.enabled:
        trained = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None, broadcast_buffers=False
        )

    # every rank draws the same permutation (seed + epoch) and takes every world_size-th sample, so one
    # global batch holds the same images whatever the number of ranks
    sampler = ResumableSampler(torch.utils.data.distributed.DistributedSampler(
        train_data, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed
    ))  # fmt: skip
    train_loader = torch.utils.data.DataLoader(
        train_data, batch_size=per_rank, sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate,
        drop_last=True, pin_memory=ctx.device.type == "cuda", persistent_workers=False,  # see set_epoch
        # its own generator: starting an iterator (mid-epoch after --resume too) draws no global random
        # number, so dropout's stream is the same however the run was cut
        generator=torch.Generator().manual_seed(cfg.seed), worker_init_fn=workers_ignore_stop_signals,
    )  # fmt: skip
    steps_per_epoch = len(train_loader) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"{train_spec}: {len(train_data)} images fill no batch of {cfg.batch_size}; lower it")
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr)
    dtype = autocast_dtype(cfg.dtype, ctx.device)
    schedule = warmup_cosine(total_steps, max(1, round(cfg.warmup_ratio * total_steps)), cfg.min_lr_ratio)
    run = _Run(
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
        if run.scaler.is_enabled() and "scaler" in state:  # a float16 run's loss scale continues too
            run.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])  # last: building the model above drew from the generators
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if state is not None:
            trim_log(out / LOG_NAME, run.step)
        else:
            clear_run(out)  # --overwrite: nothing of the earlier run may pass for this one's
        print(
            f"finetune: {len(train_data)} train / {len(val_data)} val images, {len(train_data.classes)} classes, "
            f"{ctx.world_size} rank(s) on {ctx.device}, kernels {kernels}, "
            f"autocast {str(run.autocast_dtype).removeprefix('torch.')}, augment {train_data.augment.describe()}"
            + (f", label smoothing {cfg.label_smoothing:g}" if cfg.label_smoothing else "")
            + f", {steps_per_epoch} steps/epoch × {cfg.epochs} epochs"
            + (
                f", resuming after step {run.step} (epoch {first_epoch + 1}, step {run.steps_into_epoch})"
                if state is not None
                else ""
            )
        )
    return run, first_epoch


def _training_state(run: _Run, finished_epochs: int, steps_into_epoch: int, epoch_loss_sum: float) -> dict:
    """What --resume needs to go on from here; taken at an optimizer step's end (the RNG states too)."""
    return {
        "epoch": finished_epochs, "steps_into_epoch": steps_into_epoch, "epoch_loss_sum": epoch_loss_sum,
        "step": run.step, "best": run.best, "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "rng": rng_state(),
        "config": {k: getattr(run.cfg, k) for k in RESUME_KEYS},
    }  # fmt: skip


def _save_mid_epoch(run: _Run, epoch: int, steps: int, loss_sum: float) -> None:
    """Write OUT/last at an optimizer step inside `epoch` (rank 0); every rank waits for it."""
    from . import distributed

    if run.ctx.is_main:
        state = _training_state(run, epoch, steps, loss_sum)
        save_checkpoint(run.model, run.processor, Path(run.cfg.output_dir) / "last", state)
        run.log.write(type="checkpoint", epoch=epoch + 1, step=run.step, steps_into_epoch=steps)
    distributed.barrier(run.ctx)


def _stop_agreed(run: _Run) -> bool:
    """Whether any rank was asked to stop: all ranks answer alike, so they stop at the same step."""
    from . import distributed

    asked = run.stop is not None and run.stop.signal is not None
    if not run.ctx.enabled:
        return asked
    flag = torch.tensor([1.0 if asked else 0.0], device=run.ctx.device)
    return bool(distributed.all_reduce_sum(flag, run.ctx).item() > 0)


def _train_epoch(run: _Run, epoch: int) -> float | None:
    """The epoch's optimizer steps (from the first unfinished one); the mean loss of its steps over all
    ranks, or None when a stop signal ended it (OUT/last then holds its last whole step)."""
    from . import distributed
    from .data import split_errors
    from .evaluate import progress_bar

    cfg, ctx = run.cfg, run.ctx
    steps, loss_sum = run.steps_into_epoch, run.epoch_loss_sum
    run.steps_into_epoch, run.epoch_loss_sum = 0, 0.0
    run.sampler.set_epoch(epoch, skip=steps * cfg.grad_accum * run.train_loader.batch_size)
    run.train_loader.dataset.set_epoch(epoch)  # the augmentation's draws
    bar = progress_bar(ctx, f"epoch {epoch + 1}/{cfg.epochs}", total=run.steps_per_epoch * cfg.grad_accum,
                       initial=steps * cfg.grad_accum)  # fmt: skip
    batches = bar(run.train_loader) if bar is not None else run.train_loader
    mixed = run.autocast_dtype != torch.float32
    autocast = torch.autocast(ctx.device.type, dtype=run.autocast_dtype) if mixed else nullcontext()
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    warn = (lambda m: print(f"warning: {m}", file=sys.stderr)) if ctx.is_main else None
    batch_iter = iter(batches)
    try:
        # a step's micro-batches short of a whole accumulation at the epoch's end are not drawn
        while steps < run.steps_per_epoch:
            if _stop_agreed(run):  # between optimizer steps: weights, optimizer and RNGs are a whole step's
                _save_mid_epoch(run, epoch, steps, loss_sum)
                return None
            step_loss, images, started = torch.zeros(1, device=ctx.device), 0, time.perf_counter()
            for micro in range(1, cfg.grad_accum + 1):
                batch = next(batch_iter)
                split_errors(batch, cfg.on_error, warn)
                if batch["pixels"] is None:
                    raise RuntimeError("every image of a micro-batch was unreadable; remove them from the data")
                pixels = run.train_loader.dataset.pipeline.normalize(batch["pixels"].to(ctx.device, non_blocking=True))
                labels = batch["labels"].to(ctx.device, non_blocking=True)
                # DDP all-reduces gradients in backward; between the micro-batches of one step it must not
                with run.trained.no_sync() if ctx.enabled and micro < cfg.grad_accum else nullcontext():
                    with autocast:
                        logits = run.trained(pixels).logits
                        # the model's own loss (CrossEntropyLoss), with the targets' label smoothing
                        loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing) / cfg.grad_accum
                    run.scaler.scale(loss).backward()
                step_loss += loss.detach().float()
                images += len(labels)
            run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the scaled ones
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip))
            scale = run.scaler.get_scale() if run.scaler.is_enabled() else None
            run.scaler.step(run.optimizer)  # float16: skipped when a gradient overflowed
            run.scaler.update()
            skipped = scale is not None and run.scaler.get_scale() < scale
            if not skipped:  # an overflowing step changed no weight: the schedule waits for it, as in accelerate
                run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.step, steps = run.step + 1, steps + 1
            mean_loss = float(distributed.all_reduce_sum(step_loss, ctx).item()) / ctx.world_size
            seconds = time.perf_counter() - started
            rate = images * ctx.world_size / seconds if seconds else 0.0
            lr = run.scheduler.get_last_lr()[0]
            loss_sum += mean_loss
            fp16 = {"loss_scale": scale, "skipped": skipped} if scale is not None else {}
            run.log.write(type="step", epoch=epoch + 1, step=run.step, loss=mean_loss, lr=lr, images_per_s=rate,
                          grad_norm=grad_norm if math.isfinite(grad_norm) else None, **fp16)  # fmt: skip
            if bar is not None:
                batches.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
            every = cfg.save_every_steps
            if every and run.step % every == 0 and steps < run.steps_per_epoch:  # the epoch's end saves anyway
                _save_mid_epoch(run, epoch, steps, loss_sum)
    finally:
        if bar is not None:
            batches.close()
    return loss_sum / max(1, steps)


def _end_epoch(run: _Run, epoch: int, train_loss: float, started: float) -> dict[str, Any]:
    """Validate, log, and (rank 0) write OUT/last and, when validation top-1 improved, OUT/best."""
    from . import distributed
    from .evaluate import evaluate

    cfg, ctx, out = run.cfg, run.ctx, Path(run.cfg.output_dir)
    val = evaluate(run.model, run.val_loader, ctx, on_error=cfg.on_error, autocast_dtype=run.autocast_dtype)
    improved = val.top1_accuracy > run.best["top1"]
    if improved:
        run.best = {"top1": val.top1_accuracy, "epoch": epoch + 1}
    record = {
        "type": "epoch", "epoch": epoch + 1, "step": run.step, "train_loss": train_loss, "val_loss": val.mean_loss,
        "val_top1": val.top1_accuracy, "val_top5": val.top5_accuracy, "val_images": val.total,
        "seconds": time.perf_counter() - started,
    }  # fmt: skip
    run.log.write(**record)
    if ctx.is_main:
        if improved:
            save_checkpoint(run.model, run.processor, out / "best")
        save_checkpoint(run.model, run.processor, out / "last", _training_state(run, epoch + 1, 0, 0.0))
        print(
            f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}  val loss {val.mean_loss:.4f}  "
            f"val top-1 {val.top1_accuracy:.4f}  top-5 {val.top5_accuracy:.4f}" + ("  (best)" if improved else "")
        )
    distributed.barrier(ctx)  # nobody starts the next epoch (or exits) before the checkpoint is written
    return record


def _finetune(cfg: FinetuneConfig, ctx: Any) -> dict[str, Any]:
    run, first_epoch = _prepare(cfg, ctx)
    last = cfg.epochs if cfg.max_epochs_this_run is None else min(cfg.epochs, first_epoch + cfg.max_epochs_this_run)
    record: dict[str, Any] = {}
    out = Path(cfg.output_dir)
    with StopRequest(announce=ctx.is_main) as run.stop:
        for epoch in range(first_epoch, last):
            started = time.perf_counter()
            train_loss = _train_epoch(run, epoch)
            if train_loss is None:
                break
            record = _end_epoch(run, epoch, train_loss, started)
            if _stop_agreed(run):  # asked during validation: the epoch's checkpoint is the place to stop
                break
    stopped_by = run.stop.signal if run.stop.signal is not None else (signal.SIGTERM if _stop_agreed(run) else None)
    if ctx.is_main:
        if stopped_by is not None:
            print(
                f"stopped by {signal.Signals(stopped_by).name} after step {run.step}: {out / 'last'} holds it; "
                "run the same command with --resume to go on", file=sys.stderr,
            )  # fmt: skip
        else:
            print(
                f"val top-1: {record.get('val_top1', float('nan')):.4f}  best: {run.best['top1']:.4f} "
                f"(epoch {run.best['epoch']})  saved: {out / 'best'}, {out / 'last'}"
            )
    return {
        "last_epoch": record.get("epoch", first_epoch), "best": run.best, "last": record, "output_dir": str(out),
        "step": run.step, "stopped_by": stopped_by,
    }  # fmt: skip


def register(subparsers: Any) -> None:
    from .cli import HUB_ID, _positive_int
    from .evaluate import add_common_arguments

    parser = subparsers.add_parser(
        "finetune", help="fine-tune on an image folder (train/ and val/)", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("data", help="folder with train/ and val/ (folders or .csv/.jsonl lists), or hf:NAME")
    parser.add_argument("--model", default=HUB_ID, help="hub repo id or local checkpoint directory to start from")
    parser.add_argument("--output-dir", type=Path, required=True, help="best/, last/ and train_log.jsonl go here")
    parser.add_argument("--epochs", type=_positive_int, default=10)
    add_common_arguments(parser)
    parser.set_defaults(batch_size=32)
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW)")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-ratio", type=float, default=0.1, help="fraction of the steps spent warming up")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm")
    parser.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-steps per optimizer step")
    parser.add_argument("--freeze-backbone", action="store_true", help="train the classification head only")
    parser.add_argument("--augment", default="crop-flip", choices=["crop-flip", "flip", "none"],
                        help="training images: random resized crop + horizontal flip, flip only, or none "
                        "(the evaluation preprocessing)")  # fmt: skip
    parser.add_argument("--min-crop-scale", type=float, default=0.08,
                        help="crop-flip: smallest crop, as a fraction of the image area")  # fmt: skip
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="autocast dtype (auto: bfloat16 on sm_80+ GPUs, float16 with loss scaling on "
                        "sm_70/75, else float32)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an OUTPUT_DIR that holds a run (its checkpoints and log go)")  # fmt: skip
    parser.add_argument("--max-epochs-this-run", type=_positive_int, default=None,
                        help="stop after this many epochs (job time limits); continue with --resume")  # fmt: skip
    parser.add_argument("--save-every-steps", type=_positive_int, default=None,
                        help="also write OUT/last every N optimizer steps (--resume inside long epochs)")  # fmt: skip
    parser.add_argument("--train-split", default="train", help="hf: datasets only")
    parser.add_argument("--val-split", default="validation", help="hf: datasets only")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = set(FinetuneConfig.__dataclass_fields__)
    cfg = FinetuneConfig(**{k: v for k, v in vars(args).items() if k in names})
    summary = finetune(cfg)
    return 0 if summary["stopped_by"] is None else 128 + int(summary["stopped_by"])  # the shell's convention
