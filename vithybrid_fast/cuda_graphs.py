"""CUDA-graph replay of a whole inference forward: `model(pixel_values).logits` as one graph launch.

At batch 1 the ViT Hybrid forward is hundreds of small kernel launches (BiT convolutions, GroupNorms,
12 encoder layers), so the CPU cost of launching them rivals the GPU time. Capturing the forward once
per input signature (batch, channels, height, width, dtype, device) and replaying it removes that cost.

    runner = enable_cuda_graphs(model)          # model: eval mode, on a CUDA device
    logits = runner(pixel_values).logits        # first call per shape: warm-up + capture; then replay

How it works (the recipe of the torch.cuda.graphs docs): the first call for a signature copies the
input into a static buffer, runs the model a few times on a side stream (so lazy work — Triton
autotuning, cuDNN algorithm choice, cached standardized/fused weights — happens outside the capture),
then captures one forward. Later calls copy into the buffer, replay, and return a clone of the static
outputs (`clone_outputs=False` returns the static tensors themselves, which the next replay overwrites):
the logits of a classifier, `last_hidden_state` and `pooler_output` of a `ViTHybridModel`, a tuple
where the config sets `return_dict=False`.

Limits, by design:
- Inference only: replay runs under no_grad and the logits carry no autograd history.
- Calls it cannot serve fall through to the wrapped model unchanged: training mode, CPU (non-CUDA)
  inputs, inputs that require grad, and any option other than plain `pixel_values`
  (labels, head_mask, output_attentions/hidden_states, interpolate_pos_encoding, return_dict=False).
- Weights are read from their addresses at capture time. Before each replay the runner checks
  (`WeightWatch`, ~0.25 ms for the base model on a CPU core) that every module and every parameter
  and buffer slot still holds the same object at the same address, dtype, shape and strides, and
  recaptures when one differs (`load_state_dict(assign=True)`, `.data = t`, `.to()`, `to_empty`,
  `patch`/`unpatch`); `runner.to(...)`/`.half()` reset it too. Changes of values in place need no
  recapture on a model that is not frozen: its graph derives the standardized and fused weights from
  the parameters' memory at every replay, like the eager forward (weight_cache), so `copy_`,
  `load_state_dict`, optimizer steps and `.data` edits are all read by the next replay. A frozen model
  (`vithybrid_fast.freeze`) holds its derived weights, so its graph does too: there the runner also
  checks version counters and recaptures after any in-place change that bumps one, and after the
  derived weights are recomputed or dropped (`unfreeze`); `.data` edits are invisible to a frozen
  model, eager or replayed — unfreeze after making one. `check_weights=False` skips the per-call check
  for the last bit of batch-1 latency, on your promise that no weight moves.
- Under torch.autocast a graph is captured per autocast dtype (the signature includes it), with
  autocast's weight-cast cache off during warm-up and capture: a cached cast lives only as long as the
  caller's autocast block, and a graph reading it would replay on freed memory afterwards (the
  torch.cuda.make_graphed_callables rule).
- One caller at a time: replays share the static buffers, so do not call one runner from two
  threads or streams concurrently.
- The runner is the model for `state_dict()` / `load_state_dict()` (the same keys as the wrapped
  model, no `model.` prefix; `named_parameters()` keeps it, as DDP's `module.` and torch.compile's
  `_orig_mod.` do), and copies (`copy.deepcopy`, pickle, `torch.save` of the whole runner) hold no
  graphs: they capture their own on first use.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import dispatch
from .weight_cache import derived_weight_caches, generation

# Warm-up runs before capture: the first runs autotune Triton kernels and pick cuDNN algorithms,
# which must not happen inside a capture (they synchronize and allocate); three is the docs' choice.
WARMUP_RUNS = 3

# Keyword arguments the graph serves when they hold these "off" values; anything else falls through.
_NEUTRAL_KWARGS: dict[str, tuple[Any, ...]] = {
    "head_mask": (None,),
    "labels": (None,),
    "output_attentions": (None, False),
    "output_hidden_states": (None, False),
    "interpolate_pos_encoding": (None, False),
    "return_dict": (None, True),
}

# (input shape, input dtype, device, autocast dtype or None)
GraphKey = tuple[tuple[int, ...], torch.dtype, torch.device, torch.dtype | None]
# what a captured forward returns: a ModelOutput's tensor fields by name, or a tuple's tensors
StaticOutputs = dict[str, torch.Tensor] | tuple[torch.Tensor, ...]
_WRAPPED = "model."  # the runner's key prefix for the wrapped model's state


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype torch.autocast casts to on `device_type` right now, or None outside autocast."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


@contextlib.contextmanager
def uncached_autocast(device_type: str) -> Iterator[None]:
    """The caller's autocast, with its weight-cast cache off (a no-op outside autocast).

    Autocast caches the low-precision copy of each weight until the outermost autocast block exits.
    Captured with the cache on, a graph would read copies made during warm-up, at addresses freed when
    the caller's block ends; with it off, the casts are part of the graph and redone at every replay."""
    dtype = autocast_dtype(device_type)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type, dtype=dtype, cache_enabled=False):
        yield


class WeightWatch:
    """What captured graphs depend on beyond their inputs, re-read cheaply before each replay.

    Taken after a capture: the module tree (each child slot and the module in it), every parameter and
    buffer slot with its tensor's address, dtype, shape and strides — and, when the model holds frozen
    derived weights, the tensors' version counters and the derived-weight generation (their values
    are baked into the graph rather than recomputed by it).
    """

    def __init__(self, model: nn.Module) -> None:
        modules = list(model.modules())
        self.module_slots = [(m._modules, name, child) for m in modules for name, child in m._modules.items()]
        self.tensor_slots = [
            (slots, key) for m in modules for slots in (m._parameters, m._buffers) for key, t in slots.items()
            if t is not None
        ]  # fmt: skip
        self.frozen = any(cache.frozen for cache in derived_weight_caches(model))
        self.generation = generation()
        self.signature = self._signature()

    def _signature(self) -> list[tuple]:
        tensors = [slots.get(key) for slots, key in self.tensor_slots]
        if any(t is None for t in tensors):
            return [None]  # a parameter or buffer was removed
        if self.frozen:
            # inference tensors have no version counter (and cannot be edited in place outside inference mode)
            return [(t.data_ptr(), t.dtype, t.shape, t.stride(), 0 if t.is_inference() else t._version)
                    for t in tensors]  # fmt: skip
        return [(t.data_ptr(), t.dtype, t.shape, t.stride()) for t in tensors]

    def still_valid(self) -> bool:
        if self.frozen and generation() != self.generation:
            return False
        if not all(slots.get(name) is child for slots, name, child in self.module_slots):
            return False
        return self._signature() == self.signature


@dataclass
class _CapturedForward:
    graph: torch.cuda.CUDAGraph
    static_input: torch.Tensor
    static_outputs: StaticOutputs
    output_type: type


def static_outputs(model: nn.Module, out: Any) -> StaticOutputs:
    """The tensors of a captured forward's output, which every replay rewrites in place."""
    if type(out) is tuple and all(isinstance(t, torch.Tensor) for t in out):
        return out
    items = dict(out.items()) if callable(getattr(out, "items", None)) else None
    if not items or not all(isinstance(t, torch.Tensor) for t in items.values()):
        raise TypeError(
            f"CUDAGraphRunner needs a model that returns a tuple of tensors or a ModelOutput of tensors; "
            f"{type(model).__name__} returned {type(out).__name__}"
        )
    return items


def rebuild_output(output_type: type, static: StaticOutputs, clone: bool) -> Any:
    """An output of the model's own type holding the static tensors (or clones of them)."""

    def take(t: torch.Tensor) -> torch.Tensor:
        return t.clone() if clone else t

    if isinstance(static, tuple):
        return tuple(take(t) for t in static)
    return output_type(**{name: take(t) for name, t in static.items()})


def _state_dict_without_prefix(runner: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: the wrapped model's keys as the model itself names them."""
    wrapped = prefix + _WRAPPED
    for key in [k for k in state_dict if k.startswith(wrapped)]:  # the last keys: renaming keeps their order
        state_dict[prefix + key[len(wrapped) :]] = state_dict.pop(key)
    metadata = getattr(state_dict, "_metadata", None)
    for key in [k for k in metadata or () if k == wrapped[:-1] or k.startswith(wrapped)]:
        metadata[(prefix + key[len(wrapped) :]) if key != wrapped[:-1] else prefix[:-1]] = metadata.pop(key)


def _load_state_dict_with_prefix(runner: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
    """load_state_dict pre-hook: the model's own keys (as state_dict gives them) reach the wrapped model."""
    wrapped = prefix + _WRAPPED
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(wrapped)]:
        state_dict[wrapped + key[len(prefix) :]] = state_dict.pop(key)
    runner.__dict__["_loading_prefix"] = prefix  # for the post-hook, which is not told it


def _name_keys_without_prefix(runner: nn.Module, incompatible: Any) -> None:
    """load_state_dict post-hook: missing and unexpected keys named as the caller's state dict names them."""
    prefix = runner.__dict__.pop("_loading_prefix", "")
    wrapped = prefix + _WRAPPED
    for keys in (incompatible.missing_keys, incompatible.unexpected_keys):
        keys[:] = [prefix + k[len(wrapped) :] if k.startswith(wrapped) else k for k in keys]


class CUDAGraphRunner(nn.Module):
    """Wraps an eval-mode classifier; serves `forward(pixel_values)` by CUDA-graph replay.

    Attributes the runner does not have (`config`, `dtype`, `device`, …) are read from the wrapped
    model, so the runner can stand in for it.
    """

    def __init__(
        self,
        model: nn.Module,
        clone_outputs: bool = True,
        check_weights: bool = True,
        warmup_runs: int = WARMUP_RUNS,
    ) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError(
                "CUDA graphs need a CUDA GPU, and torch.cuda.is_available() is False here. "
                "Run the model without enable_cuda_graphs() on this machine."
            )
        if warmup_runs < 1:
            raise ValueError(
                f"warmup_runs must be at least 1 (lazy setup must not run inside a capture), got {warmup_runs}"
            )
        super().__init__()
        self.model = model
        self.clone_outputs = clone_outputs
        self.check_weights = check_weights
        self.warmup_runs = warmup_runs
        self._graphs: dict[GraphKey, _CapturedForward] = {}
        self._watch: WeightWatch | None = None
        # One memory pool for every captured shape: replays run one after another on one stream and
        # each graph's static logits stay referenced, so a later capture can only reuse blocks that
        # hold another graph's dead intermediates — the pool stays the size of the largest forward.
        self._pool: Any = None
        # the public names of the first two arrived after torch 2.4 (our floor); the private ones take the
        # same hooks there
        post_hook = getattr(self, "register_state_dict_post_hook", self._register_state_dict_hook)
        post_hook(_state_dict_without_prefix)
        pre_hook = getattr(self, "register_load_state_dict_pre_hook", None)
        if pre_hook is None:
            pre_hook = functools.partial(self._register_load_state_dict_pre_hook, with_module=True)
        pre_hook(_load_state_dict_with_prefix)
        self.register_load_state_dict_post_hook(_name_keys_without_prefix)

    def __getstate__(self) -> dict[str, Any]:
        # captured graphs, their pool and the watch of their weights belong to this runner's memory
        # (and CUDAGraph objects cannot be copied or pickled): a copy captures its own
        return {**super().__getstate__(), "_graphs": {}, "_pool": None, "_watch": None}

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None:
                raise
            return getattr(model, name)

    # -- bookkeeping ------------------------------------------------------------------------------
    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def reset(self) -> None:
        """Drop every captured graph and its memory (the next call per shape recaptures)."""
        self._graphs.clear()
        self._pool = None
        self._watch = None

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> CUDAGraphRunner:
        # .to() / .half() / .cuda() move the weights: every captured graph points at the old memory
        self.reset()
        return super()._apply(fn, *args, **kwargs)

    def can_serve(self, pixel_values: Any, kwargs: dict[str, Any]) -> bool:
        """Whether this call can be replayed from a graph (else it goes to the wrapped model)."""
        if self.model.training or not isinstance(pixel_values, torch.Tensor):
            return False
        if pixel_values.device.type != "cuda" or not pixel_values.is_floating_point():
            return False
        if pixel_values.requires_grad and torch.is_grad_enabled():
            return False
        for name, value in kwargs.items():
            if name not in _NEUTRAL_KWARGS or not any(value is v for v in _NEUTRAL_KWARGS[name]):
                return False
        config = getattr(self.model, "config", None)
        # a config that turns extra outputs on by default changes what model(x) returns
        return not any(bool(getattr(config, flag, False)) for flag in ("output_attentions", "output_hidden_states"))

    # -- capture and replay -----------------------------------------------------------------------
    def _capture(self, pixel_values: torch.Tensor) -> _CapturedForward:
        device = pixel_values.device
        static_input = torch.empty_like(pixel_values, memory_format=torch.contiguous_format)
        static_input.copy_(pixel_values)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        # kernels="auto" decides its ops in the first warm-up run: timed as graph replays, as they will run
        with torch.cuda.stream(side), dispatch.timing_for_graphs(), uncached_autocast(device.type):
            for _ in range(self.warmup_runs):
                out = self.model(static_input)
        torch.cuda.current_stream(device).wait_stream(side)
        static_outputs(self.model, out)  # a model whose output cannot be replayed fails before any capture
        del out
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # On a stream of the input's device: torch.cuda.graph's default capture stream is made once per process,
        # on the device current at the first capture, and a capture on another GPU's stream records nothing
        # (the forward would run eagerly; every replay would return the capture run's outputs). Thread-local
        # capture errors: another thread's CUDA calls (a DataLoader's pin-memory thread allocating pinned
        # buffers) neither break this capture nor are broken by it, torch's documented mode for that.
        capture = torch.cuda.graph(graph, pool=self._pool, stream=side, capture_error_mode="thread_local")
        # under the graph-timed choices, and without autocast's cast cache (see uncached_autocast)
        with capture, dispatch.timing_for_graphs(), uncached_autocast(device.type):
            out = self.model(static_input)
        return _CapturedForward(graph, static_input, static_outputs(self.model, out), type(out))

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any) -> Any:
        if not self.can_serve(pixel_values, kwargs):
            return self.model(pixel_values, **kwargs)
        # inference_mode(False): the static buffers must be normal tensors, or a later call made
        # outside inference mode could not copy into a buffer allocated inside it
        with torch.inference_mode(False), torch.no_grad(), torch.cuda.device(pixel_values.device):
            if self.check_weights and self._watch is not None and not self._watch.still_valid():
                self.reset()
            device = pixel_values.device
            key: GraphKey = (tuple(pixel_values.shape), pixel_values.dtype, device, autocast_dtype(device.type))
            captured = self._graphs.get(key)
            if captured is None:
                captured = self._capture(pixel_values)
                self._graphs[key] = captured
                # taken after the capture: its warm-up runs may have (re)computed frozen derived weights
                self._watch = WeightWatch(self.model)
            else:
                captured.static_input.copy_(pixel_values)
            captured.graph.replay()
            return rebuild_output(captured.output_type, captured.static_outputs, self.clone_outputs)


def enable_cuda_graphs(model: nn.Module, clone_outputs: bool = True, check_weights: bool = True) -> CUDAGraphRunner:
    """Wrap an eval-mode model on a CUDA device so its forward replays CUDA graphs (see module docs)."""
    return CUDAGraphRunner(model, clone_outputs=clone_outputs, check_weights=check_weights)
