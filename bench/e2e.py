"""End-to-end benchmark: pixels → logits for every provider, in one process, on one device, same weights.

Providers (the peers DESIGN.md names, plus ours):

    ref-eager / ref-sdpa              our plain-PyTorch reference, explicit-softmax or SDPA attention
                                      (derived weights recomputed every call, as transformers does)
    ref-sdpa-frozen                   ref-sdpa after vf.freeze: standardized conv weights computed once
    compile-default / -max-autotune   torch.compile of the ref-sdpa model (max-autotune also applies
                                      Inductor's CUDA graphs)
    hf-eager / hf-sdpa                transformers' ViTHybridForImageClassification (4.47.1 pinned)
    ours-triton                       the reference patched with every Triton kernel, frozen (vf.freeze,
                                      what vf.load(..., frozen=True) gives for inference); every ours-*
                                      provider builds on it. Compare with ref-sdpa-frozen for the kernels
                                      alone, with ref-sdpa / hf-sdpa for what a user gains overall.
    ours-triton-cudagraphs            ours-triton replayed by vithybrid_fast.cuda_graphs.CUDAGraphRunner
    ours-triton-compile               torch.compile of the patched model
    ours-triton-channels-last         ours-triton with the backbone in channels_last end to end
    ours-auto-channels-last           ours-auto likewise (its dispatch measures each op in that layout)
    ours-auto-cudagraphs-channels-last  ours-auto-cudagraphs likewise
    ref-sdpa-channels-last            ref-sdpa likewise: what the layout alone does to the reference

Per (dtype, provider, batch): the first call is timed on its own (compile, autotune, graph capture),
then device-event timing of many calls gives the median and p10/p90 (bench/common.time_fn), and the
peak allocated GPU memory over those calls. Each provider's logits are compared with a float32
ref-eager forward of the same pixels (TF32 off, so the reference is true fp32). A failure — out of
memory, a compile error — becomes a record with "error"; larger batches of that provider and dtype
are then skipped after an OOM, never retried into the same wall.

Without a CUDA GPU only the plain-PyTorch providers run, on a tiny config, and every GPU provider
gets a "skipped" record with its reason.
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from vithybrid_fast import ViTHybridConfig, ViTHybridForImageClassification, freeze, patch
from vithybrid_fast.gpu_support import true_fp32

from .common import environment, first_call_ms, time_fn

PROVIDERS = (
    "ref-eager", "ref-sdpa", "ref-sdpa-frozen", "compile-default", "compile-max-autotune", "hf-eager", "hf-sdpa",
    "ours-triton", "ours-triton-cudagraphs", "ours-triton-compile", "ours-triton-channels-last",
    "ours-auto", "ours-auto-cudagraphs", "ours-auto-channels-last", "ours-auto-cudagraphs-channels-last",
    "ref-sdpa-channels-last",
)  # fmt: skip
CPU_PROVIDERS = ("ref-eager", "ref-sdpa", "ref-sdpa-frozen", "hf-eager", "hf-sdpa")
GPU_BATCHES = (1, 2, 4, 8, 32, 64, 128)
CPU_BATCHES = (1, 2)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

NOTES = {
    "compile-default": "torch.compile(ref-sdpa, dynamic=False); one compile per batch size",
    "compile-max-autotune": "torch.compile(ref-sdpa, mode='max-autotune', dynamic=False): Inductor CUDA graphs on",
    "ours-triton-cudagraphs": "first call = 3 warm-up runs + graph capture; logits cloned out of the graph",
    "ours-triton-compile": "torch.compile(patched model, dynamic=False)",
    "ours-triton-channels-last": "weights and input pixels in torch.channels_last; kernels keep the layout",
    "ours-auto": 'kernels="auto": each fused op runs its kernel or the torch ops, whichever measured faster; '
    "its first call includes that timing, and is a cold start only if no earlier provider compiled the kernels",
    "ours-auto-cudagraphs": 'kernels="auto" (measured per op during the warm-up runs), then CUDA graphs',
    # The H100 profile (bench/results/nvidia-h100-2026-11-26-notes.md): 2.8 ms of a 33 ms bf16 batch-64
    # forward were cuDNN's NCHW<->NHWC transposes, which torch.compile's channels-last backbone does not pay
    "ours-auto-channels-last": 'kernels="auto" with weights and input pixels in torch.channels_last',
    "ref-sdpa-channels-last": "ref-sdpa with weights and input pixels in torch.channels_last",
    # The H200's channels-last profile (bf16, batch 64, 2026-11-27) summed 27.67 ms of kernels, 2.5 ms under
    # that provider's eager forward: host gaps, which graph replay removes
    "ours-auto-cudagraphs-channels-last": "ours-auto-cudagraphs with weights and input pixels in torch.channels_last",
}

# Adaptive repetition counts on a GPU: enough runs for a stable median without spending minutes on
# batch 128 in float32 eager. --reps overrides.
TIMED_BUDGET_MS, WARMUP_BUDGET_MS = 3000.0, 500.0
MIN_REPS, MAX_REPS, MAX_WARMUP = 10, 100, 10


# -- configs and weights --------------------------------------------------------------------------
def base_config() -> ViTHybridConfig:
    """google/vit-hybrid-base-bit-384: 384² input, BiT R50-style backbone (3, 4, 9), ViT-Base."""
    return ViTHybridConfig.base_384()


def tiny_config() -> ViTHybridConfig:
    """A config with every module of the real one, small enough for CPU smoke runs.

    The backbone is narrow too (128 output channels, one block per stage): the full 1024-channel BiT
    would dominate a smoke run's time on a 2-core CPU at any image size.
    """
    backbone = {
        "depths": [1, 1, 1], "hidden_sizes": [32, 64, 128, 256], "embedding_size": 16, "num_groups": 8,
        "layer_type": "bottleneck", "global_padding": "SAME", "embedding_dynamic_padding": True,
        "out_features": ["stage3"],
    }  # fmt: skip
    return ViTHybridConfig(
        backbone_config=backbone, image_size=64, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
        intermediate_size=80, backbone_featmap_shape=[1, 128, 4, 4], num_labels=10,
    )  # fmt: skip


CONFIGS: dict[str, Callable[[], ViTHybridConfig]] = {"base": base_config, "tiny": tiny_config}


def random_state_dict(config: ViTHybridConfig, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """float32 weights with transformers' initialization, created on `device` (fast on a GPU) and kept
    on the CPU: each provider copies them to the device, so GPU memory holds one provider's weights."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = ViTHybridForImageClassification(copy.deepcopy(config))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def count_flops(config: ViTHybridConfig) -> float | None:
    """FLOPs of one image's forward (matmuls, convolutions, attention), counted on the meta device."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with torch.device("meta"):
            model = ViTHybridForImageClassification(copy.deepcopy(config)).eval()
            pixels = torch.empty(1, config.num_channels, *config.image_size_hw)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(pixels)
        return float(counter.get_total_flops())
    except Exception:
        return None


def _assign_weights(
    model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device | None
) -> nn.Module:
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after loading: {left[:5]}")
    return model.eval()


def build_reference(
    config: ViTHybridConfig,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype,
    attn: str,
    device: torch.device | None = None,
) -> ViTHybridForImageClassification:
    """Our reference model holding `state` in `dtype` on `device` (default: where `state` is)."""
    with torch.device("meta"):  # no random init: the weights come from `state`
        model = ViTHybridForImageClassification(copy.deepcopy(config))
    model.set_attn_implementation(attn)
    return _assign_weights(model, state, dtype, device)  # type: ignore[return-value]


def transformers_status() -> tuple[str | None, str | None]:
    """(version, None) when transformers' ViTHybrid is importable, else (version or None, reason)."""
    try:
        import transformers
        from transformers import ViTHybridForImageClassification as _  # noqa: F401
    except Exception as err:
        return None, f"transformers ViTHybrid not importable: {type(err).__name__}: {err}"
    return transformers.__version__, None


def build_hf(
    config: ViTHybridConfig,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype,
    attn: str,
    device: torch.device | None = None,
) -> nn.Module:
    """transformers' model built from our config.json fields, holding the same weights."""
    from transformers import ViTHybridConfig as HFConfig
    from transformers import ViTHybridForImageClassification as HFModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_config = HFConfig(**config.to_dict(), attn_implementation=attn)
    with torch.device("meta"):
        model = HFModel(hf_config)
    return _assign_weights(model, state, dtype, device)


# -- providers ------------------------------------------------------------------------------------
def skip_reason(provider: str, device: torch.device) -> str | None:
    """Why `provider` cannot run on `device` here, or None if it can."""
    if provider not in PROVIDERS:
        return f"unknown provider (choose from {', '.join(PROVIDERS)})"
    if device.type != "cuda" and provider not in CPU_PROVIDERS:
        return "no CUDA GPU" if not torch.cuda.is_available() else f"GPU provider, benchmark device is {device}"
    if provider.startswith("hf-"):
        return transformers_status()[1]
    if provider.startswith("ours-triton"):
        from vithybrid_fast.kernels._runtime import interpreter_enabled, triton_can_run

        if interpreter_enabled():
            return "TRITON_INTERPRET=1 is set: Triton kernels would run in the CPU interpreter"
        if not triton_can_run(device):
            return f"Triton kernels cannot run on {device}"
    return None


def _compile(model: nn.Module, mode: str | None) -> nn.Module:
    import torch._dynamo

    torch._dynamo.reset()  # drop other providers' graphs so this one's compile time is its own
    # one static-shape graph per batch size; the default limit of 8 would start falling back to eager
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    return torch.compile(model, mode=mode, dynamic=False)  # type: ignore[return-value]


def build_provider(
    provider: str,
    config: ViTHybridConfig,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> nn.Module:
    """The model `provider` names, holding `state` in `dtype` on `device` (default: where `state` is)."""
    if provider in ("ref-eager", "ref-sdpa"):
        return build_reference(config, state, dtype, provider.removeprefix("ref-"), device)
    if provider.endswith("-channels-last") and provider != "ours-triton-channels-last":
        model = build_provider(provider.removesuffix("-channels-last"), config, state, dtype, device)
        return ChannelsLastInput(model.to(memory_format=torch.channels_last))
    if provider == "ref-sdpa-frozen":
        return freeze(build_reference(config, state, dtype, "sdpa", device))
    if provider == "compile-default":
        return _compile(build_reference(config, state, dtype, "sdpa", device), None)
    if provider == "compile-max-autotune":
        return _compile(build_reference(config, state, dtype, "sdpa", device), "max-autotune")
    if provider in ("hf-eager", "hf-sdpa"):
        return build_hf(config, state, dtype, provider.removeprefix("hf-"), device)
    if provider.startswith("ours-auto"):
        chosen = freeze(patch(build_reference(config, state, dtype, "sdpa", device), "auto"))
        if provider == "ours-auto-cudagraphs":
            from vithybrid_fast.cuda_graphs import enable_cuda_graphs

            return enable_cuda_graphs(chosen)
        return chosen
    patched = freeze(patch(build_reference(config, state, dtype, "sdpa", device), "triton"))
    if provider == "ours-triton":
        return patched
    if provider == "ours-triton-cudagraphs":
        from vithybrid_fast.cuda_graphs import enable_cuda_graphs

        return enable_cuda_graphs(patched)
    if provider == "ours-triton-compile":
        return _compile(patched, None)
    if provider == "ours-triton-channels-last":
        return ChannelsLastInput(patched.to(memory_format=torch.channels_last))
    raise ValueError(f"unknown provider {provider!r}")


class ChannelsLastInput(nn.Module):
    """Feeds the wrapped model channels_last pixels, so every backbone activation stays NHWC."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any):
        return self.model(pixel_values.contiguous(memory_format=torch.channels_last), **kwargs)


# -- measurement ----------------------------------------------------------------------------------
def make_pixels(config: ViTHybridConfig, batch: int, seed: int = 1234) -> torch.Tensor:
    """The same float32 pixels for every provider (CPU; moved and cast per provider)."""
    generator = torch.Generator().manual_seed(seed + batch)
    return torch.randn(batch, config.num_channels, *config.image_size_hw, generator=generator)


def reference_logits(
    config: ViTHybridConfig,
    state: dict[str, torch.Tensor],
    pixels_by_batch: dict[int, torch.Tensor],
    device: torch.device,
) -> dict[int, torch.Tensor | None]:
    """float32 ref-eager logits (on the CPU) per batch; None where that forward failed (e.g. OOM)."""
    model = build_reference(config, state, torch.float32, "eager", device)
    out: dict[int, torch.Tensor | None] = {}
    with torch.inference_mode(), true_fp32():  # fp32 means fp32: no TF32 convs
        for batch, pixels in pixels_by_batch.items():
            try:
                out[batch] = model(pixels.to(device)).logits.float().cpu()
            except Exception:
                out[batch] = None
            _free_memory(device)
    del model
    _free_memory(device)
    return out


def _free_memory(device: torch.device) -> None:
    # compiled graphs (and Inductor's CUDA-graph pools) keep their model's weights alive until reset
    torch.compiler.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _rep_counts(estimate_ms: float, reps: int | None) -> tuple[int, int]:
    """(warm-up, timed) repetitions: fixed when asked, else sized by a one-call estimate."""
    if reps is not None:
        return max(1, min(MAX_WARMUP, reps // 5)), reps
    estimate_ms = max(estimate_ms, 1e-3)
    timed = int(min(MAX_REPS, max(MIN_REPS, TIMED_BUDGET_MS / estimate_ms)))
    warmup = int(min(MAX_WARMUP, max(2, WARMUP_BUDGET_MS / estimate_ms)))
    return warmup, timed


def measure(model: nn.Module, pixels: torch.Tensor, reps: int | None) -> dict[str, Any]:
    """First-call time, logits, then the timed runs and their peak memory, for one (model, input)."""
    device = pixels.device
    is_cuda = device.type == "cuda"

    def call() -> torch.Tensor:
        return model(pixels).logits

    with torch.inference_mode():
        if is_cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        result: dict[str, Any] = {"first_call_ms": first_call_ms(call, device)}
        if is_cuda:
            result["peak_mem_first_call_mb"] = torch.cuda.max_memory_allocated(device) / 2**20

        def keep_logits() -> None:
            # copied out at once: a later replay of a CUDA graph overwrites its output buffer
            result["logits"] = call().float().cpu()

        # this second call gives the logits for the agreement check and a wall time to size the reps
        estimate_ms = first_call_ms(keep_logits, device)
        warmup, timed = _rep_counts(estimate_ms, reps)
        if is_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        result.update(time_fn(call, device, warmup=warmup, reps=timed))
        result["warmup"] = warmup
        if is_cuda:
            result["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _error_text(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= 500 else text[:497] + "..."


class _Recorder:
    """Builds records that all carry the run's environment (gpu, versions, commit, config, …), and hands
    each, complete, to `on_record` at once (the bench appends it to a JSON-lines file)."""

    def __init__(self, env: dict[str, Any], flops: float | None, on_record: Callable[[dict], None] | None) -> None:
        self.env, self.flops, self.on_record = env, flops, on_record
        self.records: list[dict[str, Any]] = []

    def add(self, provider: str, dtype: str, batch: int, **fields: Any) -> dict[str, Any]:
        rec = {"kind": "e2e", "provider": provider, "dtype": dtype, "batch": batch, "ms_median": None}
        rec.update(images_per_s=None, **self.env)
        rec["gflop_per_image"] = None if self.flops is None else self.flops / 1e9
        if provider in NOTES:
            rec["notes"] = NOTES[provider]
        rec.update(fields)
        self.records.append(rec)
        if self.on_record is not None:
            self.on_record(rec)
        return rec


def _run_provider(
    out: _Recorder,
    provider: str,
    dtype_name: str,
    config: ViTHybridConfig,
    state: dict[str, torch.Tensor],
    pixels_by_batch: dict[int, torch.Tensor],
    reference: dict[int, torch.Tensor | None],
    device: torch.device,
    reps: int | None,
    log: Callable[[str], None],
) -> None:
    """Build one provider in one dtype, then measure it at every batch (smallest first)."""
    dtype, tag = DTYPES[dtype_name], f"  {provider:24s} {dtype_name:9s}"
    allocated_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    try:
        model = build_provider(provider, config, state, dtype, device)
    except Exception as err:
        log(f"{tag} build failed: {_error_text(err)}")
        for batch in pixels_by_batch:
            out.add(provider, dtype_name, batch, error=f"build: {_error_text(err)}")
        return
    extra: dict[str, Any] = {}
    if device.type == "cuda":
        extra["weights_mb"] = (torch.cuda.memory_allocated(device) - allocated_before) / 2**20
    oom_batch: int | None = None
    for batch, pixels_fp32 in pixels_by_batch.items():
        if oom_batch is not None:
            out.add(provider, dtype_name, batch, error=f"skipped: out of memory at batch {oom_batch}")
            continue
        pixels = pixels_fp32.to(device=device, dtype=dtype)
        try:
            result = measure(model, pixels, reps)
        except Exception as err:
            oom_batch = batch if _is_oom(err) else None
            log(f"{tag} b={batch:<4d} failed: {_error_text(err)}")
            out.add(provider, dtype_name, batch, error=_error_text(err), **extra)
            del pixels
            _free_memory(device)
            continue
        del pixels
        logits, ref, ms = result.pop("logits"), reference.get(batch), result["ms_median"]
        fields: dict[str, Any] = {"images_per_s": batch * 1e3 / ms, **result, **extra}
        fields["logits_finite"] = bool(torch.isfinite(logits).all())
        if ref is not None:
            fields["max_abs_diff_vs_ref_eager_fp32"] = (logits - ref).abs().max().item()
            fields["ref_logits_max_abs"] = ref.abs().max().item()
        if provider.startswith("ours-auto"):  # what the measured dispatch chose, per op: {"op choice": count}
            from vithybrid_fast import dispatch

            timing = "graph" if "-cudagraphs" in provider else "eager"  # graphs decide by replay timing
            chosen = [f"{key[0]} {choice}" for key, choice in dispatch.decisions().items()
                      if key[0] != "weight_standardize" and key[1][0][0][0] == batch and key[4] == timing]  # fmt: skip
            log(f"{tag} b={batch:<4d} dispatch: {', '.join(sorted(set(chosen)))}")
            fields["dispatch"] = {name: chosen.count(name) for name in sorted(set(chosen))}
        if out.flops is not None:
            fields["achieved_tflops"] = out.flops * batch / (ms * 1e-3) / 1e12
        rec = out.add(provider, dtype_name, batch, **fields)
        first = result["first_call_ms"]
        log(f"{tag} b={batch:<4d} {ms:9.3f} ms {rec['images_per_s']:9.1f} img/s  first call {first:.0f} ms")
        if provider == "ours-triton-cudagraphs":
            model.reset()  # drop this batch's graph: the next batch's peak memory is its own
    del model


def run(
    device: str | torch.device = "cuda",
    batches: Iterable[int] | None = None,
    dtypes: Iterable[str] | None = None,
    providers: Iterable[str] | None = None,
    config_name: str | None = None,
    reps: int | None = None,
    log: Callable[[str], None] = print,
    on_record: Callable[[dict], None] | None = None,
) -> list[dict[str, Any]]:
    """Benchmark every (dtype, provider, batch); returns one record per combination (see module doc).

    `on_record` receives each record as soon as it is complete, so a run killed midway keeps its work."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise RuntimeError("device cuda requested but torch.cuda.is_available() is False")
    config_name = config_name or ("base" if on_gpu else "tiny")
    batches = sorted(set(batches or (GPU_BATCHES if on_gpu else CPU_BATCHES)))  # small first: OOM skips the rest
    dtype_names = list(dtypes or (DTYPES if on_gpu else ("float32",)))
    unknown = [d for d in dtype_names if d not in DTYPES]
    if unknown:
        raise ValueError(f"unknown dtypes {unknown}; choose from {', '.join(DTYPES)}")
    if reps is None and not on_gpu:
        reps = 3  # a CPU run is a smoke test or a rough look; bench_cpu does the careful comparison
    config = CONFIGS[config_name]()
    env = environment(device)
    env.update(transformers=transformers_status()[0], device=device.type, config=config_name)
    env.update(image_size=config.image_size_hw[0], cpu_threads=torch.get_num_threads())
    if on_gpu:
        env.update(tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    out = _Recorder(env, count_flops(config), on_record)

    log(f"e2e: {env['gpu']}, config={config_name}, batches={batches}, dtypes={dtype_names}")
    state = random_state_dict(config, device)
    pixels_by_batch = {batch: make_pixels(config, batch) for batch in batches}
    reference = reference_logits(config, state, pixels_by_batch, device)
    for dtype_name in dtype_names:
        for provider in providers or PROVIDERS:
            reason = skip_reason(provider, device)
            if reason is not None:
                log(f"  {provider:24s} {dtype_name:9s} skipped: {reason}")
                for batch in batches:
                    out.add(provider, dtype_name, batch, skipped=reason)
                continue
            _run_provider(out, provider, dtype_name, config, state, pixels_by_batch, reference, device, reps, log)
            _free_memory(device)
    return out.records
