"""The fine-tuning loop: one epoch's optimizer steps, its validation and checkpoint, and the stops and
saves inside it (see `train.py` for the run as a whole, `train_state.py` for what is saved)."""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .train_state import RESUME_KEYS, JsonlLog, StopRequest, lost_to_stop, rng_state, save_checkpoint, say


@dataclass
class Run:
    """Everything one fine-tuning job holds while it runs."""

    cfg: Any  # FinetuneConfig
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
    saved_at: tuple[int, int] | None = None  # (finished epochs, steps into the next) of OUT/last's state
    reported: set[str] = field(default_factory=set)  # unreadable files already reported (once per run)
    unreported: list[str] = field(default_factory=list)  # a rank > 0's, until rank 0 gathers them


def _training_state(run: Run, finished_epochs: int, steps_into_epoch: int, epoch_loss_sum: float) -> dict:
    """What --resume needs to go on from here; taken at an optimizer step's end (the RNG states too)."""
    return {
        "epoch": finished_epochs, "steps_into_epoch": steps_into_epoch, "epoch_loss_sum": epoch_loss_sum,
        "step": run.step, "best": run.best, "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "rng": rng_state(),
        # what --dtype meant here ("auto" → "float32" on a CPU): --resume compares meanings (load_resume_state)
        "config": {k: getattr(run.cfg, k) for k in RESUME_KEYS}
        | {"autocast_dtype": str(run.autocast_dtype).removeprefix("torch.")},
        "train_files": len(run.train_loader.dataset), "steps_per_epoch": run.steps_per_epoch,
    }  # fmt: skip


def _save_mid_epoch(run: Run, epoch: int, steps: int, loss_sum: float) -> None:
    """Write OUT/last at an optimizer step inside `epoch` (rank 0; not again when it holds this step);
    every rank waits for it."""
    from . import distributed

    report_gathered(run)
    if run.saved_at == (epoch, steps):
        return
    if run.ctx.is_main:
        state = _training_state(run, epoch, steps, loss_sum)
        save_checkpoint(run.model, run.processor, Path(run.cfg.output_dir) / "last", state)
        run.log.write(type="checkpoint", epoch=epoch + 1, step=run.step, steps_into_epoch=steps)
    run.saved_at = (epoch, steps)
    distributed.barrier(run.ctx)


def stop_asked(run: Run) -> bool:
    """Whether this rank got a stop signal (the ranks agree on it at the next step: see agreement)."""
    return run.stop is not None and run.stop.signal is not None


def agreement(run: Run, images: int = 0) -> tuple[bool, float]:
    """(whether any rank was asked to stop, `images` summed over ranks): all ranks answer alike, so they
    stop at the same step. One all-reduce (and one host sync) under DDP, none in a single process."""
    from . import distributed

    asked = stop_asked(run)
    if not run.ctx.enabled:
        return asked, float(images)
    both = torch.tensor([float(asked), float(images)], device=run.ctx.device)
    flag, total = distributed.all_reduce_sum(both, run.ctx).tolist()
    return flag > 0, total


def stop_agreed(run: Run) -> bool:
    return agreement(run)[0]


def _report_once(run: Run, message: str) -> None:
    """Each unreadable file once per run, not once per epoch: rank 0 prints it, another rank keeps it
    for `report_gathered` (a collective per step just for these would cost every step a sync)."""
    if not run.ctx.is_main:
        run.unreported.append(message)
    elif message not in run.reported:
        run.reported.add(message)
        print(f"warning: {message}", file=sys.stderr)


def report_gathered(run: Run) -> None:
    """Rank 0 reports the other ranks' unreadable files (under torchrun 7 of 8 went unnamed). Called by
    every rank at the same points: a save inside an epoch, and an epoch's end."""
    from . import distributed

    if not run.ctx.enabled:
        return
    gathered = distributed.gather_objects(run.unreported, run.ctx)
    run.unreported = []
    if run.ctx.is_main:
        for message in (m for messages in gathered[1:] for m in messages):
            _report_once(run, message)


def _placeholder_loss(run: Run, autocast: Any) -> torch.Tensor:
    """A zero loss through the whole model, for a micro-batch whose every file was unreadable (skipped):
    under DDP every rank must run a forward and backward per micro-step, or the gradient all-reduce
    waits forever. Its gradients are zeros."""
    augment = run.train_loader.dataset.augment
    pixels = torch.zeros(1, run.model.config.num_channels, augment.height, augment.width, device=run.ctx.device)
    with autocast:
        return run.trained(pixels).logits.float().sum() * 0.0


PROGRESS_SECONDS = 60.0  # a plain progress line at most this often when no progress bar is shown


def raise_diverged(run: Run, grad_norm: float, rank_loss: float, lr: float) -> None:
    """bfloat16 and float32 have no loss scaler to skip a step: one with NaN or infinite gradients would
    make every weight NaN, and each later epoch would validate them (NaN logits rank label 0 first) and save
    them as `last/` and `best/`. The gradients are all-reduced, so every rank stops here together."""
    raise RuntimeError(
        f"the gradients are {grad_norm} at step {run.step + 1} (loss {rank_loss:.4g} on this rank, lr {lr:.3g}): "
        "the run diverged; that step was not applied, and nothing was saved after it. Lower "
        "--lr, keep --grad-clip on, or train in float32"
    )


def train_epoch(run: Run, epoch: int) -> float | None:
    """The epoch's optimizer steps (from the first unfinished one); the sum of their losses (each the
    mean over all ranks), or None when a stop signal ended it (OUT/last then holds its last whole step)."""
    from . import distributed
    from .data import split_errors
    from .evaluate import progress_bar

    cfg, ctx = run.cfg, run.ctx
    steps, loss_sum = run.steps_into_epoch, run.epoch_loss_sum
    run.steps_into_epoch, run.epoch_loss_sum = 0, 0.0
    run.sampler.set_epoch(epoch, skip=steps * cfg.grad_accum * run.train_loader.batch_size)
    run.train_loader.dataset.set_epoch(epoch)  # the augmentation's draws
    # a bar advanced by hand, once per optimizer step: wrapped around the loader, it lagged behind the
    # micro-batches drawn ahead and never reached its end (the loop stops before the loader is exhausted)
    bar = progress_bar(ctx, f"epoch {epoch + 1}/{cfg.epochs}", total=run.steps_per_epoch, initial=steps)
    bar = bar(None) if bar is not None else None
    said = time.perf_counter()  # without a bar (stderr no terminal: nohup, Slurm, a pipe), a line now and then
    mixed = run.autocast_dtype != torch.float32
    autocast = torch.autocast(ctx.device.type, dtype=run.autocast_dtype) if mixed else nullcontext()
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    report = lambda message: _report_once(run, message)  # noqa: E731
    batch_iter = iter(run.train_loader)
    try:
        # a step's micro-batches short of a whole accumulation at the epoch's end are not drawn
        while steps < run.steps_per_epoch:
            step_loss, started = torch.zeros(1, device=ctx.device), time.perf_counter()
            try:
                micro_batches = [next(batch_iter) for _ in range(cfg.grad_accum)]  # uint8, on the host
            except RuntimeError as error:
                if not lost_to_stop(error, stop_asked(run)):
                    raise
                micro_batches = []  # a worker the stop signal killed as it started: the agreement stops
            for batch in micro_batches:
                split_errors(batch, cfg.on_error, report)
            images = sum(len(batch["labels"]) for batch in micro_batches)
            stop, read = agreement(run, images)  # one collective per step for both
            if stop:  # between optimizer steps: weights, optimizer and RNGs are a whole step's (the batches
                _save_mid_epoch(run, epoch, steps, loss_sum)  # just drawn are drawn again on resume)
                return None
            # the step's loss is the mean over the images read on all ranks (unreadable ones skipped): each
            # rank backpropagates its sum over that count × ranks, as DDP averages the ranks' gradients
            per_rank_mean = max(read, 1.0) / ctx.world_size
            for micro, batch in enumerate(micro_batches, 1):
                # DDP all-reduces gradients in backward; between the micro-batches of one step it must not
                with run.trained.no_sync() if ctx.enabled and micro < cfg.grad_accum else nullcontext():
                    if batch["pixels"] is None:  # every file of it unreadable, and --on-error skip
                        loss = _placeholder_loss(run, autocast)
                    else:
                        pixels = batch["pixels"].to(ctx.device, non_blocking=True)
                        pixels = run.train_loader.dataset.pipeline.normalize(pixels)
                        labels = batch["labels"].to(ctx.device, non_blocking=True)
                        with autocast:
                            logits = run.trained(pixels).logits
                            # the model's own loss (CrossEntropyLoss), with the targets' label smoothing
                            loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing, reduction="sum")
                        loss = loss / per_rank_mean
                    run.scaler.scale(loss).backward()
                step_loss += loss.detach().float()
            run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the scaled ones
            # --grad-clip 0: no clipping (the norm is still measured and logged)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip or math.inf))
            scale = run.scaler.get_scale() if run.scaler.is_enabled() else None
            lr = run.scheduler.get_last_lr()[0]  # the rate this step uses
            if not math.isfinite(grad_norm) and scale is None:
                raise_diverged(run, grad_norm, float(step_loss), lr)
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
            loss_sum += mean_loss
            fp16 = {"loss_scale": scale, "skipped": skipped} if scale is not None else {}
            run.log.write(type="step", epoch=epoch + 1, step=run.step, loss=mean_loss, lr=lr, images_per_s=rate,
                          grad_norm=grad_norm if math.isfinite(grad_norm) else None, **fp16)  # fmt: skip
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
            elif ctx.is_main and time.perf_counter() - said >= PROGRESS_SECONDS:
                say(f"epoch {epoch + 1}/{cfg.epochs} step {steps}/{run.steps_per_epoch}: loss {mean_loss:.4f}  "
                    f"lr {lr:.2e}  {rate:.1f} images/s")  # fmt: skip
                said = time.perf_counter()
            every = cfg.save_every_steps
            if every and run.step % every == 0 and steps < run.steps_per_epoch:  # the epoch's end saves anyway
                _save_mid_epoch(run, epoch, steps, loss_sum)
    finally:
        if bar is not None:
            bar.close()
    return loss_sum


def end_epoch(run: Run, epoch: int, loss_sum: float, started: float) -> dict[str, Any] | None:
    """Validate, log, and (rank 0) write OUT/last and, when validation top-1 improved, OUT/best.

    A stop signal during validation abandons it: OUT/last then holds the epoch's trained but unvalidated
    state (a resumed run validates it first), and None is returned."""
    from . import distributed
    from .evaluate import evaluate

    cfg, ctx, out = run.cfg, run.ctx, Path(run.cfg.output_dir)
    report = lambda message: _report_once(run, message)  # noqa: E731
    val = evaluate(run.model, run.val_loader, ctx, on_error=cfg.on_error, autocast_dtype=run.autocast_dtype,
                   should_stop=lambda: stop_asked(run), report=report)  # fmt: skip
    if stop_agreed(run):  # every rank leaves evaluate (and its all-reduce) before this collective
        _save_mid_epoch(run, epoch, run.steps_per_epoch, loss_sum)
        return None
    report_gathered(run)
    train_loss = loss_sum / run.steps_per_epoch
    improved = val.total > 0 and val.top1_accuracy > run.best["top1"]
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
        say(
            f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}  val loss {val.mean_loss:.4f}  "
            f"val top-1 {val.top1_accuracy:.4f}  top-5 {val.top5_accuracy:.4f}" + ("  (best)" if improved else "")
        )
    run.saved_at = (epoch + 1, 0)
    distributed.barrier(ctx)  # nobody starts the next epoch (or exits) before the checkpoint is written
    if val.total == 0:  # a top-1 of 0 would pass for a result, and best/ would be chosen by it
        raise RuntimeError(
            f"no validation image could be read ({val.skipped} skipped as unreadable): fix the validation set, "
            f"then --resume ({out / 'last'} holds epoch {epoch + 1})"
        )
    return record
