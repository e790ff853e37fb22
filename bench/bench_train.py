"""Training throughput: one optimizer step (forward, backward, AdamW) of the whole classifier.

Providers, measured in the same run on the same GPU, weights, pixels and labels:
  ours-triton       our model patched with every Triton kernel (forward and backward)
  ref-sdpa          the plain-PyTorch reference with torch SDPA attention
  compile-default   torch.compile(reference, mode="default")
and, when named in --providers, the same with gradient checkpointing (`model.gradient_checkpointing_enable()`,
`finetune --gradient-checkpointing`): ours-triton-ckpt, ref-sdpa-ckpt (time and peak memory it trades), or
with the weights and pixels in torch.channels_last: ours-triton-channels-last, ref-sdpa-channels-last (an
H100's bf16 step at batch 64 spent 8.15 of 124 ms of kernels in cuDNN's NCHW<->NHWC transposes, which
torch.compile's NHWC backbone does not pay; our GroupNorm kernels keep either layout), or
ours-triton-compile: ours under torch.compile (mode "default"), as `finetune --compile` trains, or
ours-triton-torch-glue: ours with torch's ops as the encoder's autocast glue (LayerNorms, the attention's
residual add) instead of kernels/add_layer_norm_train.py: that kernel's A/B, or ours-triton-cudagraphs:
ours with the forward + backward replayed from CUDA graphs (`torch.cuda.make_graphed_callables`; clipping and
AdamW eager; bf16 or fp32), the step without the host's launch time.

Each step runs the forward under bf16 or fp16 autocast (float32 master weights, as `vithybrid-fast
finetune` does on a GPU; fp16 with its dynamic loss scaling), the backward, gradient clipping and an
AdamW step. Reported per (provider, dtype,
batch): median / p10 / p90 ms per step, images/s, peak allocated GPU memory over warm-up and timed steps,
first-step ms (compile/autotune) and the speed and memory ratios against ref-sdpa. Target (issue 12):
ours-triton ≥ 1.3× ref-sdpa images/s at equal or lower peak memory.

    python -m vithybrid_fast.bench.bench_train --batches 32,64                 # base config, CUDA GPU
    python -m vithybrid_fast.bench.bench_train --device cpu --config tiny --batches 2 --reps 2   # smoke
"""

from __future__ import annotations

import argparse
import copy
import gc
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .arguments import dtype_names, positive_int, positive_ints
from .common import (
    Interrupted,
    RecordLog,
    environment,
    exit_without_cuda,
    first_call_ms,
    print_and_save,
    raise_interrupted,
    time_fn,
)

PROVIDERS = ("ref-sdpa", "ours-triton", "compile-default")  # the baseline first: each record's ratio is known
# when it is written, so a run stopped at its time budget keeps every finished record whole
CHECKPOINTED = ("ours-triton-ckpt", "ref-sdpa-ckpt")  # asked for by name only: a default run stays as long
CHANNELS_LAST = ("ours-triton-channels-last", "ref-sdpa-channels-last")  # by name only, likewise
# `finetune --compile`: our kernels as custom ops inside torch.compile's graph, which fuses the glue
# (autocast's casts, residual adds, LayerNorms: most of the H100 step's gap to compile-default)
COMPILED = ("ours-triton-compile",)
TORCH_GLUE = ("ours-triton-torch-glue",)  # the autocast glue kernel's A/B (fast.FastViTLayer.autocast_glue_kernels)
# ours "triton" with the forward + backward captured as CUDA graphs (torch.cuda.make_graphed_callables; the
# clipping and AdamW step stay eager): what the host-bound eager step (session 19, H200: 94.7 ms of kernels
# in steps of 120-188 ms) reaches without the host's launch time. bf16/fp32 only (no GradScaler in a graph).
GRAPHED = ("ours-triton-cudagraphs",)
BY_NAME_ONLY = (*CHECKPOINTED, *CHANNELS_LAST, *COMPILED, *TORCH_GLUE, *GRAPHED)
CPU_PROVIDERS = ("ref-sdpa",)


def build(
    provider: str, config, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A float32 training model for `provider` holding `state`, to be stepped under autocast(`dtype`)."""
    from vithybrid_fast.modeling import ViTHybridForImageClassification
    from vithybrid_fast.patching import patch_for_autocast

    with torch.device("meta"):
        model = ViTHybridForImageClassification(copy.deepcopy(config))
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True, assign=True)
    model.train()
    if provider in CHANNELS_LAST:  # the convolutions' weights; `pixels_for` gives the input the same layout
        model.to(memory_format=torch.channels_last)
        provider = provider.removesuffix("-channels-last")
    if provider in CHECKPOINTED:
        model.gradient_checkpointing_enable()
        provider = provider.removesuffix("-ckpt")
    if provider in ("ours-triton", "ours-triton-compile", *TORCH_GLUE, *GRAPHED):
        patched = patch_for_autocast(model, "triton", dtype)
        if provider in TORCH_GLUE:
            from vithybrid_fast.fast import FastViTLayer

            for layer in patched.modules():
                if isinstance(layer, FastViTLayer):
                    layer.autocast_glue_kernels = False
        if provider != "ours-triton-compile":
            return patched
        torch._dynamo.reset()  # this provider's compile time is its own
        return torch.compile(patched, mode="default")  # as finetune --compile
    model.set_attn_implementation("sdpa")
    if provider == "compile-default":
        torch._dynamo.reset()  # this provider's compile time is its own
        return torch.compile(model, mode="default")
    return model


def pixels_for(provider: str, pixels: torch.Tensor) -> torch.Tensor:
    """The input `provider` is timed on: NHWC for the channels-last providers (else cuDNN converts it back)."""
    return pixels.contiguous(memory_format=torch.channels_last) if provider in CHANNELS_LAST else pixels


def make_step(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> Callable[[], None]:
    """One optimizer step as `finetune` takes it: float16 scales the loss (GradScaler) and unscales the
    gradients before clipping, so its cost (the scaling, the overflow check) is in the time too."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    autocast = dtype != torch.float32
    # 2**8, not GradScaler's 2**16: a skipped step (overflow: no AdamW update) costs less than a real one,
    # so the scaler starts where the timed steps are real ones; `skipped` counts any that were not
    scaler = torch.amp.GradScaler(pixels.device.type, init_scale=2.0**8, enabled=dtype == torch.float16)

    def step() -> None:
        with torch.autocast(pixels.device.type, dtype=dtype, enabled=autocast):
            loss = model(pixels, labels=labels).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scale = scaler.get_scale() if scaler.is_enabled() else None  # a host sync, float16 only
        scaler.step(optimizer)
        scaler.update()
        if scale is not None and scaler.get_scale() < scale:
            step.skipped += 1
        optimizer.zero_grad(set_to_none=True)

    step.scaler, step.skipped = scaler, 0
    return step


class _Loss(nn.Module):
    """The model's loss as a module of tensors in, a tensor out: what make_graphed_callables can capture."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels, labels=labels).loss


def make_graphed_step(
    model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype
) -> Callable[[], None]:
    """`make_step`'s step with its forward + backward replayed from CUDA graphs (captured here, after
    make_graphed_callables' own warm-up iterations, which also compile and autotune the kernels)."""
    if dtype == torch.float16:  # first: a CPU can check it too
        raise ValueError(f"{GRAPHED[0]}: bfloat16 or float32 only (GradScaler's scaling is not captured)")
    if pixels.device.type != "cuda":
        raise RuntimeError(f"{GRAPHED[0]}: CUDA graphs need a CUDA device, got {pixels.device}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    autocast = dtype != torch.float32
    # autocast's weight-cast cache must be off around a capture and its replays (make_graphed_callables' rule)
    with torch.autocast("cuda", dtype=dtype, enabled=autocast, cache_enabled=False):
        graphed = torch.cuda.make_graphed_callables(_Loss(model), (pixels, labels))

    def step() -> None:
        with torch.autocast("cuda", dtype=dtype, enabled=autocast, cache_enabled=False):
            loss = graphed(pixels, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.scaler, step.skipped = None, 0
    return step


def step_for(provider: str, model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype):
    """The timed step of `provider`: graphed for the CUDA-graph provider, else `make_step`'s."""
    return (make_graphed_step if provider in GRAPHED else make_step)(model, pixels_for(provider, pixels), labels, dtype)


def run(
    device: str = "cuda",
    batches: tuple[int, ...] = (32, 64),
    dtypes: tuple[str, ...] = ("bfloat16",),
    providers: tuple[str, ...] | None = None,
    config_name: str = "base",
    reps: int = 10,
    on_record: Callable[[dict], None] | None = None,
) -> list[dict]:
    from .e2e import CONFIGS, random_state_dict

    dev = torch.device(device)
    config = CONFIGS[config_name]()
    state = random_state_dict(config, dev)
    env = environment(dev)
    records: list[dict] = []
    providers = providers or (PROVIDERS if dev.type == "cuda" else CPU_PROVIDERS)
    providers = tuple(sorted(providers, key=lambda name: name != "ref-sdpa"))  # the baseline first, else in order
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for batch in batches:
            generator = torch.Generator().manual_seed(batch)
            pixels = torch.randn(batch, 3, *config.image_size_hw, generator=generator).to(dev)
            labels = torch.randint(0, config.num_labels, (batch,), generator=generator).to(dev)
            for provider in providers:
                record = {"kind": "train", "provider": provider, "batch": batch, "dtype": dtype_name,
                          "config": config_name, **env}  # fmt: skip
                try:
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats(dev)
                    model = build(provider, config, state, dev, dtype)
                    started = time.perf_counter()
                    # the graphed provider's warm-up, compile, autotune and capture happen here: first-step time
                    step = step_for(provider, model, pixels, labels, dtype)
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    setup_ms = (time.perf_counter() - started) * 1e3
                    record["first_step_ms"] = setup_ms + first_call_ms(step, dev)
                    record.update(time_fn(step, dev, warmup=2, reps=reps))
                    record["images_per_s"] = batch / (record["ms_median"] * 1e-3)
                    if dtype == torch.float16:  # steps an fp16 overflow skipped, warm-up and timed together
                        record["fp16_skipped_steps"] = step.skipped
                    if dev.type == "cuda":
                        record["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
                except Exception as err:  # an OOM or a compile failure is a result too
                    record["error"] = f"{type(err).__name__}: {str(err)[:300]}"
                model = step = None  # freed before the next provider builds its model, by the cycle collector:
                # make_step's `step` refers to itself (step.skipped) and make_graphed_callables' forward to its
                # module, so refcounts free nothing, and the next provider's peak memory counted this one's
                # weights and AdamW state (+1.106 GiB per provider not yet collected, H200 run 4)
                gc.collect()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                baseline = next((r for r in records if r["provider"] == "ref-sdpa" and r["batch"] == batch
                                 and r["dtype"] == dtype_name), record if provider == "ref-sdpa" else None)  # fmt: skip
                _compare(record, baseline)
                records.append(record)
                print(_progress(record), flush=True)  # a step can take minutes to compile: say what is done
                if on_record is not None:
                    on_record(record)  # written now: a run stopped later keeps it
    return records


def _compare(record: dict, baseline: dict | None) -> None:
    if baseline and "images_per_s" in record and "images_per_s" in baseline:
        record["speedup_vs_ref_sdpa"] = record["images_per_s"] / baseline["images_per_s"]
        if "peak_memory_gib" in record and "peak_memory_gib" in baseline:
            record["memory_vs_ref_sdpa"] = record["peak_memory_gib"] / baseline["peak_memory_gib"]


def _progress(record: dict) -> str:
    where = f"{record['provider']:<26} {record['dtype']:<9} b={record['batch']:<4}"
    if "error" in record:
        return f"  {where} error: {record['error'][:100]}"
    return f"  {where} {record['ms_median']:9.2f} ms/step {record['images_per_s']:8.1f} img/s  first step " + (
        f"{record['first_step_ms']:.0f} ms"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vithybrid_fast.bench.bench_train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=positive_ints, default=[32, 64], help="comma-separated (default: 32,64)")
    parser.add_argument("--dtypes", type=dtype_names, default=["bfloat16"], help="autocast dtypes (default: bfloat16)")
    known = (*PROVIDERS, *BY_NAME_ONLY)
    parser.add_argument("--providers", default=None, help=f"comma-separated from {','.join(known)}")
    parser.add_argument("--config", default="base", choices=("base", "tiny"))
    parser.add_argument("--reps", type=positive_int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="write the records as JSON here")
    args = parser.parse_args(argv)
    providers = tuple(args.providers.split(",")) if args.providers else None
    unknown = sorted(set(providers or ()) - set(known))
    if unknown:
        parser.error(f"--providers: unknown {unknown}; choose from {', '.join(known)}")
    if torch.device(args.device).type == "cuda":  # --device cpu is the documented smoke run
        exit_without_cuda(parser.prog, args.device)
    records: list[dict] = []
    status = 0
    previous = signal.signal(signal.SIGTERM, raise_interrupted)
    with RecordLog(args.out.with_suffix(".jsonl") if args.out else None) as log:

        def keep(record: dict) -> None:
            records.append(record)
            log.write(record)

        try:
            run(args.device, tuple(args.batches), tuple(args.dtypes), providers, args.config, args.reps, on_record=keep)
        except (KeyboardInterrupt, Interrupted) as err:  # a time budget's SIGINT/SIGTERM: report what is done
            print(f"interrupted ({type(err).__name__}): reporting the {len(records)} records measured so far",
                  file=sys.stderr)  # fmt: skip
            status = 130
        finally:
            signal.signal(signal.SIGTERM, previous)
    env = records[0] if records else {}
    header = (
        f"training step, {env.get('gpu')}, torch {env.get('torch')}, triton {env.get('triton')}, {env.get('commit')}"
    )
    print_and_save(records, header, table(records), args.out)
    if status:
        raise SystemExit(status)


def _or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(records: list[dict]) -> str:
    head = ("provider", "dtype", "batch", "ms/step", "img/s", "peak GiB", "×sdpa", "mem×")
    lines = ["{:<26} {:<9} {:>5} {:>9} {:>8} {:>9} {:>6} {:>6}".format(*head)]
    for r in records:
        if "error" in r:
            lines.append(f"{r['provider']:<26} {r['dtype']:<9} {r['batch']:>5}  error: {r['error'][:60]}")
            continue
        # a ratio not measured (no ref-sdpa in the run, no GPU memory on a CPU) shows as "-", not as nan
        mem, speed, mem_ratio = (r.get(k) for k in ("peak_memory_gib", "speedup_vs_ref_sdpa", "memory_vs_ref_sdpa"))
        lines.append(
            f"{r['provider']:<26} {r['dtype']:<9} {r['batch']:>5} {r['ms_median']:>9.1f} {r['images_per_s']:>8.1f} "
            f"{_or_dash(mem):>9} {_or_dash(speed):>6} {_or_dash(mem_ratio):>6}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
