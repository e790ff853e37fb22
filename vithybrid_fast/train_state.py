"""What a fine-tuning run keeps so it can stop and go on: checkpoints, training state, RNG, stop signals.

`OUT/last/` is a `save_pretrained` directory plus `training_state.pt`: optimizer, scheduler, loss scale,
step, best result, RNG states, the settings a resumed run must share, and the position in the epoch
(`steps_into_epoch`, 0 at an epoch's end). It is written at every epoch's end, every `--save-every-steps`
optimizer steps, and when the run is asked to stop (SIGTERM from a scheduler or torchrun, or Ctrl-C):
the run finishes nothing more, writes the state of its last whole optimizer step, and exits with
128 + the signal's number. `--resume` continues from there, mid-epoch too, and ends with the weights an
uninterrupted run gets (CPU, same seed: tests/test_finetune.py, tests/test_preemption.py).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

TRAINING_STATE = "training_state.pt"
SET_ASIDE = ".overwritten-run"  # the run --overwrite replaces, kept until the new run's first checkpoint
CHECKPOINT_NAMES = ("last", "last.old", "best", "best.old")
LOG_NAME = "train_log.jsonl"
# settings that must match for --resume to continue the same run
RESUME_KEYS = (
    "epochs", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_ratio", "seed", "freeze_backbone",
    "augment", "min_crop_scale", "label_smoothing", "grad_clip", "dtype",
)  # fmt: skip
# what a training state saved before a setting existed ran with
RESUME_DEFAULTS_OF_OLDER_STATES = {"augment": "none", "label_smoothing": 0.0}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_checkpoint(model: nn.Module, processor: Any, directory: Path, training_state: dict | None = None) -> None:
    """save_pretrained + preprocessor_config.json (+ training state), swapped in whole: never half-written.

    Killed between the two renames, the previous checkpoint survives as `<directory>.old`, which
    `find_resume_directory` falls back to."""
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    processor.save_pretrained(partial)
    if training_state is not None:
        torch.save(training_state, partial / TRAINING_STATE)
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    partial.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(directory.parent / SET_ASIDE, ignore_errors=True)  # a run --overwrite replaced: this one saved


class ResumableSampler(torch.utils.data.Sampler):
    """The rank's DistributedSampler order for an epoch, less its first `skip` indices: a resumed epoch
    starts at its first unfinished step, without decoding the images of the finished ones."""

    def __init__(self, inner: torch.utils.data.distributed.DistributedSampler) -> None:
        self.inner, self.skip = inner, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return itertools.islice(iter(self.inner), self.skip, None)

    def __len__(self) -> int:
        return len(self.inner) - self.skip


def find_resume_directory(output_dir: Path) -> Path:
    """OUT/last, or OUT/last.old when a kill fell between save_checkpoint's renames."""
    last = Path(output_dir) / "last"
    for candidate in (last, last.with_name("last.old")):
        if (candidate / TRAINING_STATE).is_file():
            return candidate
    raise FileNotFoundError(f"--resume: {last / TRAINING_STATE} does not exist (no saved step to continue from)")


def check_output_dir(cfg: Any) -> None:
    """Refuse to start afresh over a run: without --resume or --overwrite, its checkpoints would be
    replaced and its log mixed with the new run's."""
    from .files import check_writable_dir

    out = Path(cfg.output_dir)
    check_writable_dir(out, "--output-dir")  # before the data and the model are read
    if cfg.overwrite and not cfg.resume and Path(cfg.model).exists():
        # what --overwrite replaces goes at the new run's first checkpoint: a start model among it with it
        model = Path(cfg.model).resolve()
        for name in (*CHECKPOINT_NAMES, SET_ASIDE):
            held = (out / name).resolve()
            if model == held or held in model.parents:
                raise ValueError(
                    f"--overwrite would delete {out / name}, which --model {cfg.model} starts from: copy it out of "
                    "--output-dir first, or choose another --output-dir"
                )
    if cfg.resume or cfg.overwrite:
        return
    # a log alone (a run that failed before its first checkpoint) holds nothing to keep or resume
    held = [name for name in ("last", "last.old", "best", SET_ASIDE) if (out / name).exists()]
    if held:
        raise FileExistsError(
            f"--output-dir {out} holds a run ({', '.join(held)}): pass --resume to continue it, --overwrite to "
            "start over there, or choose another directory"
        )


def clear_run(out: Path) -> None:
    """Make way for a new run in `out` (only the names a run writes are touched).

    An earlier run's checkpoints and log move to OUT/.overwritten-run, which the new run's first checkpoint
    deletes: a run that fails before it has saved anything (out of memory at step 1, an unreadable image)
    leaves the earlier one there, to move back. A set-aside run already there stays when `out` holds no
    checkpoint: what is in `out` then is a failed run's (a log, partial checkpoints), removed."""
    aside = out / SET_ASIDE
    held = [name for name in CHECKPOINT_NAMES if (out / name).exists()]
    if held:  # a run that saved checkpoints supersedes any run set aside before it
        shutil.rmtree(aside, ignore_errors=True)
        aside.mkdir()
        for name in (*held, LOG_NAME):
            if (out / name).exists():
                (out / name).rename(aside / name)
    for name in ("last.partial", "best.partial"):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / LOG_NAME).unlink(missing_ok=True)


def resume_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed run must share. A state from before a setting existed: what it ran with
    where that is known (RESUME_DEFAULTS_OF_OLDER_STATES), else the setting is left out (not compared)."""
    known = {**RESUME_DEFAULTS_OF_OLDER_STATES, **settings}
    return {k: known[k] for k in RESUME_KEYS if k in known}


def changed_settings(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'--flag: saved → now' for each difference; the crop scale only when both runs draw crops."""
    crops = saved.get("augment") == now.get("augment") == "crop-flip"
    keys = [k for k in RESUME_KEYS if k in saved and k in now and (k != "min_crop_scale" or crops)]
    return [f"--{k.replace('_', '-')}: {saved[k]} → {now[k]}" for k in keys if saved[k] != now[k]]


def load_resume_state(cfg: Any, dtype_here: str | None = None) -> tuple[dict[str, Any], Path] | None:
    """(training state, its directory) for `cfg.resume`, refused when the run's settings changed.

    dtype_here: what cfg.dtype means on this device ("auto" → "float32" on a CPU). A state that says
    what its dtype meant is compared by meaning: `auto` → `float32` on a CPU is the same run, `auto` on
    an A100 (bfloat16) → `auto` on a V100 (float16) is not."""
    if not cfg.resume:
        return None
    directory = find_resume_directory(Path(cfg.output_dir))
    state = torch.load(directory / TRAINING_STATE, weights_only=True)
    saved, now = resume_settings(state["config"]), resume_settings(vars(cfg))
    if "autocast_dtype" in state["config"] and dtype_here is not None:
        saved["dtype"], now["dtype"] = state["config"]["autocast_dtype"], dtype_here
    changed = changed_settings(saved, now)
    if changed:
        raise ValueError(
            f"--resume with other settings than the saved run: {', '.join(changed)}. Resume with its "
            f"settings, or start a new run from its weights: --model {directory} --output-dir <another directory>"
        )
    return state, directory


def check_same_data(state: dict[str, Any], train_files: int, steps_per_epoch: int, directory: Path) -> None:
    """A resumed run must see the training set the saved one saw: its step count sets the schedule."""
    saved = state.get("train_files"), state.get("steps_per_epoch")
    if saved[0] is not None and saved != (train_files, steps_per_epoch):
        raise ValueError(
            f"--resume: {directory} was trained on {saved[0]} image files ({saved[1]} steps an epoch), this "
            f"training set has {train_files} ({steps_per_epoch}): the schedule and the epoch's position would "
            "not fit. Resume with the same data, or start a new run from its weights: "
            f"--model {directory} --output-dir <another directory>"
        )


def say(text: str) -> None:
    """print to stdout, and carry on if its reader went away (`finetune ... | head`): a closed pipe must not
    end a training run (cli.main would take the BrokenPipeError for a quiet, successful end)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class JsonlLog:
    """Append-only JSON-lines log, written by rank 0 only."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, **record: Any) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def trim_log(path: Path, step: int) -> None:
    """Drop the log records after `step`: a run killed after its last save had logged steps it redoes,
    and maybe a line it was writing when killed (not JSON: dropped too)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if (record := _record(line)) is not None and record.get("step", 0) <= step]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


class StopRequest:
    """SIGTERM / SIGINT → a flag the training loop reads at each optimizer step; a second Ctrl-C stops at once.

    Installed only in the main thread (signal handlers cannot be set elsewhere); restores the previous
    handlers on exit."""

    def __init__(self, announce: bool, where: Path | str = "OUT/last") -> None:
        self.signal: int | None = None
        self.announce, self.where = announce, where
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now, without saving
        self.signal = signum
        if self.announce:
            name = signal.Signals(signum).name
            print(f"\n{name}: stopping at the end of this optimizer step (at once if validating), saving to "
                  f"{self.where} (Ctrl-C again to stop without saving)", file=sys.stderr, flush=True)  # fmt: skip


def workers_ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: a scheduler's SIGTERM (sent to every process of the job) or a terminal's
    Ctrl-C (sent to the whole process group) must not kill the workers while the main process finishes
    its step and saves; they end when the main process shuts its loader down, or dies.

    A worker of a StopSafeLoader starts with both signals blocked: one sent while it started is pending
    here, and setting SIG_IGN discards it before the unblock."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def stop_signals_deferred() -> Iterator[None]:
    """Block SIGTERM and SIGINT in this thread for the block: processes forked meanwhile inherit the mask,
    and a signal sent to this process waits, then reaches its handler at the block's end."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no masks, and no fork either
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class StopSafeLoader(torch.utils.data.DataLoader):
    """A DataLoader whose workers survive a job-wide stop signal, also one sent while they start.

    Its workers ignore SIGTERM and SIGINT from their worker_init_fn on. Before that, torch's own SIGTERM
    handler in the worker re-raises any SIGTERM not sent by the main process, and the worker died: a
    torchrun job stopped just as an epoch or a validation began lost its loader ("DataLoader worker
    exited unexpectedly") instead of saving. So the workers are started with both signals blocked
    (stop_signals_deferred), and unblock them once they ignore them.

    That covers the fork start method (Linux's default to Python 3.13). A forkserver worker (3.14's
    default) inherits the server's mask, and a spawned one (macOS's default) starts a new interpreter:
    both start with no signal blocked and keep the window. There, lost_to_stop lets the run stop as
    asked when it finds such a worker dead."""

    def __init__(self, dataset: Any, **kwargs: Any) -> None:
        super().__init__(dataset, worker_init_fn=workers_ignore_stop_signals, **kwargs)

    def __iter__(self):
        with stop_signals_deferred():  # the workers start here (persistent_workers=False: every epoch)
            return super().__iter__()


def lost_to_stop(error: BaseException, stopping: bool) -> bool:
    """Whether `error` is a DataLoader worker found dead while the run is stopping: a worker the job-wide
    signal reached before it ignored it (a spawned one: see StopSafeLoader). The run then stops as asked,
    and saves; any other error, or this one without a stop, is raised."""
    return stopping and isinstance(error, RuntimeError) and str(error).startswith("DataLoader worker")
