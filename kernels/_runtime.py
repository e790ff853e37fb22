"""Shared launcher helpers: where a Triton kernel may run, and dtype checks.

A kernel runs on a CUDA tensor, or on a CPU tensor when the Triton interpreter is on
(`TRITON_INTERPRET=1`, which must be set before `triton` is first imported). Launchers call
`check_launchable` first so a user gets one clear sentence instead of a Triton traceback.
"""

from __future__ import annotations

import functools

import torch

# defined where importing them does not import triton (vithybrid_fast.kernels' __init__ does)
from ..gpu_support import interpreter_enabled, triton_importable

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SM80_SHARED_BYTES = 166_912  # A100's per-block shared-memory maximum, the smaller of our two targets
_A100_LIMITS = (108, SM80_SHARED_BYTES)  # what a device that cannot be asked is taken to be


def triton_can_run(device: torch.device | str | None = None) -> bool:
    """Whether our Triton kernels can run on `device` (None: the default CUDA device or the interpreter)."""
    if not triton_importable():
        return False
    if interpreter_enabled():
        return True
    from ..gpu_support import native_triton_unsupported_reason  # also refuses GPUs below sm_80 (T4, V100)

    return native_triton_unsupported_reason(device) is None


def check_launchable(name: str, *tensors: torch.Tensor) -> None:
    """Raise a clear error if `tensors` cannot feed a Triton kernel called `name`."""
    first = tensors[0]
    for t in tensors:
        if t.device != first.device:
            raise ValueError(f"{name}: all tensors must be on one device, got {first.device} and {t.device}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} is not supported; use float32, float16 or bfloat16")
    if first.device.type == "cuda":
        return
    if first.device.type == "meta":
        raise RuntimeError(
            f"{name}: meta tensors cannot run kernels (they hold no data); load real weights first, "
            "e.g. vf.load(...) or model.to_empty(device=...) followed by load_state_dict"
        )
    if first.device.type == "cpu" and interpreter_enabled():
        return
    raise RuntimeError(
        f"{name}: Triton kernels need a CUDA tensor (got {first.device}); on a CPU set TRITON_INTERPRET=1 "
        "before importing triton to run them in the interpreter, or use kernels='sdpa' / 'eager'."
    )


def needs_registered_op(*tensors: torch.Tensor | None) -> bool:
    """Whether a kernel call must go through its registered torch custom op.

    The op is what torch.compile traces (one graph node) and what autograd records. A plain
    inference call needs neither, and launching directly skips the dispatcher's per-call cost
    (about 15 µs on a CPU, ~100 calls per forward), which shows at batch 1 without CUDA graphs.
    """
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def device_limits(device: torch.device) -> tuple[int, int]:
    """(SM count, per-block shared memory in bytes) of a CUDA device; an A100's where it cannot be asked.

    The autotuners' prunes and group_norm_act's plans ask on each new shape; the answer is cached per
    device index, so a process with GPUs of two kinds gets each one's own.
    """
    if device.type != "cuda":  # unit tests of the prunes feed CPU tensors
        return _A100_LIMITS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _limits_of_device(index)


@functools.lru_cache(maxsize=16)
def _limits_of_device(index: int) -> tuple[int, int]:
    try:
        import triton

        props = triton.runtime.driver.active.utils.get_device_properties(index)
        return props["multiprocessor_count"], props["max_shared_mem"]
    except Exception:
        return _A100_LIMITS
