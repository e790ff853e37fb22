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
logits (`clone_outputs=False` returns the static tensor itself, which the next replay overwrites).

Limits, by design:
- Inference only: replay runs under no_grad and the logits carry no autograd history.
- Calls it cannot serve fall through to the wrapped model unchanged: training mode, CPU (non-CUDA)
  inputs, inputs that require grad, and any option other than plain `pixel_values`
  (labels, head_mask, output_attentions/hidden_states, interpolate_pos_encoding, return_dict=False).
- Weights are read from their addresses at capture time. Before each replay the runner checks every
  parameter's storage pointer and version counter (~0.1 ms for the base model) and recaptures when
  one changed (`load_state_dict`, `.to()`, an optimizer step); `runner.to(...)`/`.half()` reset it.
  Replacing parameter *objects* (`load_state_dict(assign=True)`, `patch()`) needs `reset()`.
  `check_weights=False` skips the per-call check for the last bit of batch-1 latency.
- One caller at a time: replays share the static buffers, so do not call one runner from two
  threads or streams concurrently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

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

GraphKey = tuple[tuple[int, ...], torch.dtype, torch.device]


@dataclass
class _CapturedForward:
    graph: torch.cuda.CUDAGraph
    static_input: torch.Tensor
    static_logits: torch.Tensor
    output_type: type


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
        self._weights: list[torch.Tensor] = []
        self._weights_key: list[tuple[int, int]] | None = None
        # One memory pool for every captured shape: replays run one after another on one stream and
        # each graph's static logits stay referenced, so a later capture can only reuse blocks that
        # hold another graph's dead intermediates — the pool stays the size of the largest forward.
        self._pool: Any = None

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
        self._weights = []
        self._weights_key = None

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> CUDAGraphRunner:
        # .to() / .half() / .cuda() move the weights: every captured graph points at the old memory
        self.reset()
        return super()._apply(fn, *args, **kwargs)

    def _current_weights_key(self) -> list[tuple[int, int]]:
        # the tensor list is cached because walking the module tree costs ~2 ms for the base model;
        # reading 356 pointers and version counters costs ~0.1 ms and turns a stale-weights replay
        # (freed or outdated memory) into a recapture.
        # (inference tensors have no version counter; they cannot be updated in place anyway)
        if not self._weights:
            self._weights = [*self.model.parameters(), *self.model.buffers()]
        return [(t.data_ptr(), 0 if t.is_inference() else t._version) for t in self._weights]

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
        with torch.cuda.stream(side):
            for _ in range(self.warmup_runs):
                out = self.model(static_input)
        torch.cuda.current_stream(device).wait_stream(side)
        del out
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.model(static_input)
        logits = getattr(out, "logits", None)
        if not isinstance(logits, torch.Tensor):
            raise TypeError(
                f"CUDAGraphRunner needs a model whose output has a .logits tensor; {type(self.model).__name__} "
                f"returned {type(out).__name__}"
            )
        return _CapturedForward(graph, static_input, logits, type(out))

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any) -> Any:
        if not self.can_serve(pixel_values, kwargs):
            return self.model(pixel_values, **kwargs)
        # inference_mode(False): the static buffers must be normal tensors, or a later call made
        # outside inference mode could not copy into a buffer allocated inside it
        with torch.inference_mode(False), torch.no_grad(), torch.cuda.device(pixel_values.device):
            if self.check_weights or self._weights_key is None:
                weights_key = self._current_weights_key()
                if weights_key != self._weights_key:
                    self.reset()
                    self._weights_key = self._current_weights_key()
            key: GraphKey = (tuple(pixel_values.shape), pixel_values.dtype, pixel_values.device)
            captured = self._graphs.get(key)
            if captured is None:
                captured = self._capture(pixel_values)
                self._graphs[key] = captured
            else:
                captured.static_input.copy_(pixel_values)
            captured.graph.replay()
            logits = captured.static_logits.clone() if self.clone_outputs else captured.static_logits
        return captured.output_type(logits=logits)


def enable_cuda_graphs(model: nn.Module, clone_outputs: bool = True, check_weights: bool = True) -> CUDAGraphRunner:
    """Wrap an eval-mode model on a CUDA device so its forward replays CUDA graphs (see module docs)."""
    return CUDAGraphRunner(model, clone_outputs=clone_outputs, check_weights=check_weights)
