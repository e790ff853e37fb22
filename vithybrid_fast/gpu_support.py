"""Which GPUs our Triton kernels serve, and one sentence saying why when they do not.

The kernels are built, compile-checked (tests/test_gpu_targets.py) and parity-checked for Ampere
(sm_80, A100) and Hopper (sm_90, H100/H200). Older GPUs such as the T4 (sm_75) and V100 (sm_70)
lack what the kernels rely on: bfloat16 tensor-core dots and `cp.async` pipelining (sm_80+), and
none of our configs has been compiled or checked for them. So there:

- `kernels="auto"` takes torch SDPA, and says so in one sentence (a `KernelFallbackWarning`);
- `kernels="triton"` raises a `RuntimeError` whose message is the same sentence.

This module imports neither triton nor the kernels: patching.py and kernels/_runtime.py call it, and
tests fake the device by monkeypatching `torch.cuda.is_available` / `torch.cuda.get_device_capability`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator

import torch

MIN_CAPABILITY = (8, 0)
CHECKED_ARCHS = ("sm_80", "sm_90")


class KernelFallbackWarning(UserWarning):
    """kernels="auto" chose a plain-PyTorch path on a CUDA GPU, and says why."""


COMMAND_DEVICE_TYPES = ("cpu", "cuda")  # where the commands run and are tested


def parse_device(name: str | torch.device) -> torch.device:
    """A device name the commands run on (cpu, cuda, cuda:N), or a ValueError that says which ones are.
    torch's own error lists every device type it knows (xpu, hpu, meta …), some of which then fail with a
    traceback deep inside the model."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type not in COMMAND_DEVICE_TYPES:
        raise ValueError(f"--device {name}: the commands run on cpu or cuda (cuda:N), not {device.type}")
    return device


def device_argument(text: str) -> str:
    """An argparse `type` for `--device`: a wrong name is a usage error (exit 2), checked before any work."""
    import argparse

    try:
        parse_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix(f"--device {text}: ")) from None
    return text


def command_device(name: str | torch.device | None) -> torch.device:
    """A command's `--device`: the one named, else cuda when torch sees a GPU, else cpu.

    The commands (classify, demo, eval, finetune, doctor) run where the work is fast by default; the
    library's `vf.load` keeps cpu as its default, as transformers' from_pretrained does.
    """
    device = parse_device(name if name is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible to torch (torch.cuda.is_available() is False)")
    # under torchrun each rank takes cuda:LOCAL_RANK whatever the index (distributed.setup checks that one)
    single_process = int(os.environ.get("WORLD_SIZE", "1")) <= 1
    if device.type == "cuda" and device.index is not None and single_process:
        count = torch.cuda.device_count()
        if device.index < count:
            return device
        gpus = "cuda:0" if count == 1 else f"cuda:0 … cuda:{count - 1}"
        raise ValueError(f"--device {device}: torch sees {count} CUDA GPU{'s' if count > 1 else ''} ({gpus})")
    return device


def interpret_kernels_without_a_gpu(device_name: str | None) -> bool:
    """For a command that checks the kernels (`demo`, `doctor --check`): on a machine without a CUDA GPU,
    where the user has not set TRITON_INTERPRET and triton is not imported yet, set TRITON_INTERPRET=1 so
    the kernels run in the Triton interpreter instead of being skipped. Returns whether it set it."""
    if "triton" in sys.modules or os.environ.get("TRITON_INTERPRET") is not None:
        return False
    if torch.cuda.is_available() or not (device_name or "cpu").startswith("cpu"):
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    return True


# Defined here, not in kernels/_runtime.py (which re-exports them): importing vithybrid_fast.kernels
# imports triton, which must not happen before a caller had the chance to set TRITON_INTERPRET.
def interpreter_enabled() -> bool:
    """True when Triton kernels run under the CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def cuda_capability(device: torch.device | str | None = None) -> tuple[int, int] | None:
    """(major, minor) of `device` (None: the current CUDA device); None without a CUDA GPU."""
    if device is not None and torch.device(device).type != "cuda":
        return None
    if not torch.cuda.is_available():
        return None
    index = None if device is None else torch.device(device).index
    major, minor = torch.cuda.get_device_capability(index)
    return int(major), int(minor)


def gpu_too_old_reason(device: torch.device | str | None = None) -> str | None:
    """One sentence when `device` is a CUDA GPU older than sm_80, else None (also for CPUs)."""
    capability = cuda_capability(device)
    if capability is None or capability >= MIN_CAPABILITY:
        return None
    major, minor = capability
    index = None if device is None else torch.device(device).index
    try:
        name = torch.cuda.get_device_name(index)
    except Exception:
        name = "this GPU"
    return (
        f"{name} has compute capability {major}.{minor} (sm_{major}{minor}), and our Triton kernels "
        f"need sm_80 or newer (Ampere, Hopper: bfloat16 tensor cores, cp.async); they are compiled and "
        f"checked for {' and '.join(CHECKED_ARCHS)} only"
    )


def native_triton_unsupported_reason(device: torch.device | str | None = None) -> str | None:
    """Why the kernels cannot run natively (compiled for a GPU) on `device`, or None if they can.

    Ignores the interpreter: this is what a user's process without `TRITON_INTERPRET` would see.
    """
    if device is not None and torch.device(device).type != "cuda":
        return f"device {torch.device(device)} is not a CUDA GPU"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch (torch.cuda.is_available() is False)"
    if not triton_importable():
        return "triton is not installed (pip install triton)"
    return gpu_too_old_reason(device)


def triton_unsupported_reason(device: torch.device | str | None = None) -> str | None:
    """Why our Triton kernels cannot run on `device` in this process, or None if they can.

    Under the interpreter (`TRITON_INTERPRET=1`) they run anywhere, slowly: that is for tests.
    """
    if interpreter_enabled() and triton_importable():
        return None
    return native_triton_unsupported_reason(device)


def auto_choice(device: torch.device | str | None, triton_runs: bool) -> str:
    """What `kernels="auto"` picks: "triton" where the kernels run compiled on a CUDA device, else "sdpa".

    On a CUDA GPU older than sm_80, or with TRITON_INTERPRET set, it also warns, in one sentence, why it
    took SDPA.
    """
    on_cuda = device is None or torch.device(device).type == "cuda"
    if triton_runs and on_cuda and interpreter_enabled():
        # a test setting left in the environment: the kernels would run in the CPU interpreter, on a GPU
        warnings.warn(
            'kernels="auto" uses torch SDPA: TRITON_INTERPRET is set, so the Triton kernels would run in the '
            "CPU interpreter (unset it for the compiled kernels).",
            KernelFallbackWarning,
            stacklevel=3,
        )
        return "sdpa"
    if triton_runs and on_cuda:
        return "triton"
    reason = gpu_too_old_reason(device) if on_cuda else None
    if reason is not None:
        warnings.warn(f'kernels="auto" uses torch SDPA: {reason}.', KernelFallbackWarning, stacklevel=3)
    return "sdpa"


def triton_error_message(device: torch.device | str | None = None) -> str:
    """The clear error for kernels="triton" where the kernels cannot run."""
    where = f"on {torch.device(device)}" if device is not None else "here"
    reason = triton_unsupported_reason(device) or "it needs a CUDA GPU with triton installed"
    return (
        f"kernels='triton' cannot run {where}: {reason}. On a CPU, TRITON_INTERPRET=1 set before triton is "
        "imported runs the kernels in the (slow) interpreter, for testing. Use kernels='sdpa' or 'eager' "
        "(plain PyTorch), or 'auto' to pick triton only where it can run."
    )


# --kernels help of the commands that load a model (classify, eval, finetune)
KERNELS_HELP = (
    "auto: on a CUDA GPU that runs Triton, each fused op runs its kernel or the torch ops, whichever measures "
    "faster; else sdpa (default: %(default)s)"
)


@contextlib.contextmanager
def true_fp32() -> Iterator[None]:
    """TF32 off for matmuls and cuDNN convolutions inside the block, restored after.

    cuDNN convolutions default to TF32 on Ampere and newer (10-bit mantissa): a 1-ulp difference
    upstream (our GroupNorm vs torch's) then flips TF32 roundings in every later conv, and float32
    comparisons see errors near 1e-3 that are the convolutions', not the kernels'."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
