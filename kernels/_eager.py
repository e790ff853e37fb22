"""Eager twins of the kernels' custom ops: the same launch and the same autograd rule, without the dispatcher.

Why: a custom op is what torch.compile traces (one opaque node) and what `opcheck` checks, but each eager call
through it passes torch's dispatcher twice (Autograd, then the backend key) and `torch._library`'s Python
wrappers, and its backward calls the backward op through the dispatcher again. The H200 training step (bf16
autocast, batch 64, session 19) was host-bound: 94.7 ms of kernels in steps of 120–188 ms, spread over ~140
kernel calls with a backward each. On this project's CPU machine (2-core AMD EPYC VM, torch 2.13), with
Triton's launch stubbed out, the twins took 0.63–0.65× the custom ops' host time per forward + backward of
GroupNorm, weight standardization, attention and add_layer_norm_train (bench/bench_host_overhead.py,
routes alternated round by round; bench/results/cpu-x86-64-2026-11-27-host-overhead.md).

A twin is a `torch.autograd.Function` whose forward is the op's Python implementation and whose setup_context
and backward are the op's own registered ones (one rule, two callers): `call` picks the op under torch.compile
(and export) and the twin otherwise. In the twin's backward, `run` calls a backward op's implementation
directly. `materialize_grads=False` (for rules that take None for an unused output's gradient) also saves the
zero tensors autograd would otherwise allocate and fill for the statistics outputs nobody uses.

What differs from the custom op in eager mode: a selective-activation-checkpointing policy keyed on
`torch.ops.vithybrid.*` does not see a twin's call (under torch.compile it sees the op, as before).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_IMPLS: dict[Any, Callable] = {}  # custom op → its Python implementation
TWINS = True  # False: eager calls take the custom ops too (bench/bench_host_overhead.py's A/B)


def custom_op(name: str) -> Callable[[Callable], Any]:
    """`torch.library.custom_op(name, mutates_args=())`, remembering the implementation for `run` and `twin`."""

    def wrap(fn: Callable) -> Any:
        op = torch.library.custom_op(name, mutates_args=())(fn)
        _IMPLS[op] = fn
        return op

    return wrap


def twin(op: Any, setup_context: Callable, backward: Callable, materialize_grads: bool = True) -> Callable:
    """`apply` of an autograd.Function computing what `op` computes, with `op`'s autograd rule."""
    impl = _IMPLS[op]

    # forward(ctx, ...) with the setup inside it, not a separate setup_context: with one, Function.apply
    # binds the arguments through inspect.signature on every call (28 µs of 343 in a GroupNorm call's
    # profile). Outputs saved here, as in any forward(ctx, ...), are saved as outputs.
    def forward(ctx: Any, *args: Any) -> Any:
        output = impl(*args)
        ctx.eager = True  # read by `run` in the backward
        ctx.set_materialize_grads(materialize_grads)
        setup_context(ctx, args, output)
        return output

    def backward_or_nothing(ctx: Any, *grads: Any) -> Any:
        # Unmaterialized, a node can be reached with no gradient at all (a downstream Function returning
        # None for it): the custom op's rule would get zeros and return zeros; no gradient is the same.
        if all(g is None for g in grads):
            return (None,) * len(ctx.needs_input_grad)
        return backward(ctx, *grads)

    name = f"{op._name}_eager" if hasattr(op, "_name") else "eager_twin"
    members = {"forward": staticmethod(forward), "backward": staticmethod(backward_or_nothing)}
    return type(name, (torch.autograd.Function,), members).apply


def run(ctx: Any, op: Any, *args: Any) -> Any:
    """`op(*args)` from an autograd rule: its implementation directly when the rule runs for a twin."""
    # Two exceptions keep the op: a twin's backward traced by a compiler (compiled autograd, say), which
    # cannot trace a launch; and a backward with create_graph=True (grad mode on inside it), whose outputs
    # must carry the op's node, so that differentiating them again raises (no formula registered) instead
    # of silently dropping this node's second-order part.
    direct = getattr(ctx, "eager", False) and not torch.compiler.is_compiling() and not torch.is_grad_enabled()
    return _IMPLS[op](*args) if direct else op(*args)


def call(op: Any, eager: Callable, *args: Any) -> Any:
    """The custom op while torch.compile or export traces, the twin in eager mode (unless TWINS is off)."""
    return eager(*args) if TWINS and not torch.compiler.is_compiling() else op(*args)
