"""Measured dispatch (kernels="auto" on a GPU): each fused op runs whichever of its kernel and the torch ops
it replaces measured faster, decided once per shape, and the model computes the same function either way.

On the CPU the kernels run in the interpreter; the choice is driven by stubbed timings where a test needs a
particular winner."""

from __future__ import annotations

import copy
import time

import pytest
import torch

import vithybrid_fast as vf
from tests.test_patching import build_tiny_model, pixels_for
from vithybrid_fast import dispatch

OPS = {"layer_norm_linear", "flash_attention", "linear_residual", "layer_norm_mlp", "group_norm_act",
       "weight_standardize"}  # fmt: skip
# measured by a layer whose three GEMM ops went to torch (FastViTLayer.cublas_with_glue_kernels): in the
# tiny model's second layer, which finds the first layer's decisions for the same shapes
GLUE_OPS = {"layer_norm", "add_layer_norm"}


@pytest.fixture(autouse=True)
def fresh_decisions():
    dispatch.reset()
    yield
    dispatch.reset()


class Counted:
    def __init__(self, value, delay_s=0.0):
        self.value, self.delay_s, self.calls = value, delay_s, 0

    def __call__(self):
        self.calls += 1
        time.sleep(self.delay_s)
        return self.value


def test_off_runs_the_kernel_and_never_measures():
    kernel, reference = Counted("k"), Counted("r")
    assert dispatch.run("op", False, kernel, reference, (torch.zeros(2),)) == "k"
    assert (kernel.calls, reference.calls) == (1, 0)
    assert dispatch.decisions() == {}


@pytest.mark.parametrize(("kernel_delay", "reference_delay", "winner"), [(0.004, 0.0, "r"), (0.0, 0.004, "k")])
def test_the_faster_path_wins_and_is_remembered_per_shape(kernel_delay, reference_delay, winner):
    kernel, reference = Counted("k", kernel_delay), Counted("r", reference_delay)
    x = torch.zeros(3, 4)
    assert dispatch.run("op", True, kernel, reference, (x,)) == winner
    measured_calls = dispatch.WARMUP + dispatch.REPS
    assert (kernel.calls, reference.calls) == (measured_calls + (winner == "k"), measured_calls + (winner == "r"))
    assert dispatch.run("op", True, kernel, reference, (x,)) == winner  # no second measurement
    assert kernel.calls + reference.calls == 2 * measured_calls + 2
    ((key, choice),) = dispatch.decisions().items()
    assert key[0] == "op" and key[1] == (((3, 4), "float32"),) and choice == {"k": "triton", "r": "torch"}[winner]
    dispatch.run("op", True, kernel, reference, (torch.zeros(5, 4),))  # another shape: measured again
    assert len(dispatch.decisions()) == 2


def test_no_measuring_where_it_cannot_time(monkeypatch):
    # during CUDA-graph capture or a torch.compile trace the kernel runs and nothing is decided
    monkeypatch.setattr(dispatch, "_can_measure", lambda device: False)
    kernel, reference = Counted("k"), Counted("r")
    assert dispatch.run("op", True, kernel, reference, (torch.zeros(2),)) == "k"
    assert (kernel.calls, reference.calls, dispatch.decisions()) == (1, 0, {})


def test_a_compiled_graph_takes_the_kernel_path_without_timing():
    def op(x):
        return dispatch.run("op", True, lambda: x * 2, lambda: x + x + 1, (x,))

    x = torch.randn(4)
    assert torch.equal(torch.compile(op, fullgraph=True, backend="eager")(x), x * 2)
    assert dispatch.decisions() == {}


@pytest.fixture(scope="module")
def tiny_model():
    return build_tiny_model()


@pytest.mark.parametrize("winner", ["triton", "torch"])
def test_model_computes_the_reference_whichever_path_each_op_takes(tiny_model, device, monkeypatch, winner):
    model = copy.deepcopy(tiny_model).to(device)
    pixels = pixels_for(model, device=device)
    with torch.no_grad():
        reference = model(pixels).logits
    vf.patch(model, "triton")
    assert not any(getattr(m, "measured", False) for m in model.modules())  # "triton" never measures
    dispatch.set_measured(model, True)
    loser = "torch" if winner == "triton" else "triton"
    monkeypatch.setattr(dispatch, "measure", lambda kernel, ref, device, graphed: {winner: 1.0, loser: 2.0})
    with torch.no_grad():
        out = model(pixels).logits
    assert {key[0] for key in dispatch.decisions()} == (OPS | GLUE_OPS if winner == "torch" else OPS)
    assert set(dispatch.decisions().values()) == {winner}
    assert (out - reference).abs().max().item() <= 1e-4


def test_a_dict_patch_leaves_the_other_families_measuring(tiny_model, device):
    model = vf.patch(copy.deepcopy(tiny_model).to(device), "triton")
    dispatch.set_measured(model, True)  # as "auto" does on a GPU
    vf.patch(model, {"attention": "eager"})
    flags = [m.measured for m in model.modules() if hasattr(m, "measured")]
    assert flags and all(flags)  # the MLP and backbone modules, untouched
    vf.patch(model, "triton")  # a preset speaks for every family
    assert not any(m.measured for m in model.modules() if hasattr(m, "measured"))


def on_the_gpu_with_reference_logits(tiny_model):
    """A CUDA copy of the tiny model, its pixels, and its unpatched logits."""
    model = copy.deepcopy(tiny_model).cuda()
    pixels = pixels_for(model, device="cuda")
    with torch.no_grad():
        return model, pixels, model(pixels).logits


@pytest.mark.gpu
def test_auto_on_a_gpu_measures_and_matches_the_reference(tiny_model):
    model, pixels, reference = on_the_gpu_with_reference_logits(tiny_model)
    vf.patch(model, "auto")
    assert all(m.measured for m in model.modules() if hasattr(m, "measured"))
    with torch.no_grad():
        first, second = model(pixels).logits, model(pixels).logits
    assert OPS <= {key[0] for key in dispatch.decisions()} <= OPS | GLUE_OPS
    assert (first - reference).abs().max().item() <= 1e-4 and torch.equal(first, second)


def test_ops_decided_for_cuda_graphs_are_timed_as_graphs_and_kept_apart(monkeypatch):
    """Eager timing at small batches measures the host's launch time, which a replayed graph does not pay:
    the CUDA-graph runner decides its ops under timing_for_graphs, and those decisions are separate."""
    asked = []

    def fake_measure(kernel, reference, device, graphed=False):
        asked.append(graphed)
        return {"triton": 1.0, "torch": 2.0} if graphed else {"triton": 2.0, "torch": 1.0}

    monkeypatch.setattr(dispatch, "measure", fake_measure)
    kernel, reference, x = Counted("k"), Counted("r"), torch.zeros(3, 4)
    assert dispatch.run("op", True, kernel, reference, (x,)) == "r"  # eager: the host-bound timing
    with dispatch.timing_for_graphs():
        assert dispatch.run("op", True, kernel, reference, (x,)) == "k"  # same op and shape, graph timing
        assert dispatch.run("op", True, kernel, reference, (x,)) == "k"  # remembered
    assert dispatch.run("op", True, kernel, reference, (x,)) == "r"  # the eager decision is untouched
    assert asked == [False, True]
    assert sorted((key[4], choice) for key, choice in dispatch.decisions().items()) == [
        ("eager", "torch"),
        ("graph", "triton"),
    ]


# The CUDA-graph runner's use of timing_for_graphs: tests/test_cuda_graphs.py (CUDA's calls stubbed).


@pytest.mark.gpu
def test_graph_timing_times_replays_on_a_gpu():
    x = torch.randn(64, 577, 768, device="cuda", dtype=torch.bfloat16)
    ms = dispatch.measure(lambda: x * 2, lambda: (x + x) * 1, torch.device("cuda"), graphed=True)
    assert set(ms) == {"triton", "torch"} and all(0 < v < 100 for v in ms.values()), ms


@pytest.mark.gpu
def test_auto_with_cuda_graphs_decides_by_replay_and_matches_the_reference(tiny_model):
    from vithybrid_fast.cuda_graphs import enable_cuda_graphs

    model, pixels, reference = on_the_gpu_with_reference_logits(tiny_model)

    runner = enable_cuda_graphs(vf.patch(model, "auto"))
    first, second = runner(pixels).logits, runner(pixels).logits
    timed = {key[4] for key in dispatch.decisions()}
    assert timed == {"graph"}, dispatch.decisions()
    assert (first - reference).abs().max().item() <= 1e-4 and torch.equal(first, second)


# -- the glue kernels of a layer whose GEMMs went to torch (FastViTLayer.cublas_with_glue_kernels) ---------
def _auto_model(tiny_model, device, monkeypatch, winner="torch"):
    """The tiny model patched as "auto" is, every op timed as `winner` faster, and its unpatched logits."""
    model = copy.deepcopy(tiny_model).to(device)
    pixels = pixels_for(model, device=device)
    with torch.no_grad():
        reference = model(pixels).logits
    dispatch.set_measured(vf.patch(model, "triton"), True)
    loser = "torch" if winner == "triton" else "triton"
    monkeypatch.setattr(dispatch, "measure", lambda kernel, ref, device, graphed: {winner: 1.0, loser: 2.0})
    return model, pixels, reference


def _count_glue_kernel_calls(monkeypatch) -> list[int]:
    from vithybrid_fast import kernels

    calls, real = [], kernels.add_layer_norm
    monkeypatch.setattr(kernels, "add_layer_norm", lambda *a: calls.append(1) or real(*a))
    return calls


def test_glue_at_torch_computes_the_per_op_torch_path_bit_for_bit(tiny_model, device, monkeypatch):
    from vithybrid_fast.fast import FastViTLayer

    model, pixels, reference = _auto_model(tiny_model, device, monkeypatch, winner="torch")
    with torch.no_grad():
        glued = model(pixels).logits
        glue = {key: choice for key, choice in dispatch.decisions().items() if key[0] in GLUE_OPS}
        monkeypatch.setattr(FastViTLayer, "_torch_gemms_chosen", lambda *args: False)
        per_op = model(pixels).logits
    assert {key[0] for key in glue} == GLUE_OPS and set(glue.values()) == {"torch"}
    assert torch.equal(glued, per_op) and (glued - reference).abs().max().item() <= 1e-4


def test_the_first_call_returns_what_later_calls_compute(tiny_model, device, monkeypatch):
    # GEMMs timed faster in torch, the glue in Triton: the first layer decides its GEMMs during the first
    # call and must then answer with the glue path, or the first call's logits differ from the second's
    model, pixels, reference = _auto_model(tiny_model, device, monkeypatch)

    def glue_wins(kernel, ref, device, graphed):
        glue = "cublas_with_glue_kernels" in kernel.__qualname__
        return {"triton": 1.0, "torch": 2.0} if glue else {"triton": 2.0, "torch": 1.0}

    monkeypatch.setattr(dispatch, "measure", glue_wins)
    with torch.no_grad():
        first, second = model(pixels).logits, model(pixels).logits
    glue = {key[0]: choice for key, choice in dispatch.decisions().items() if key[0] in GLUE_OPS}
    assert glue == {"layer_norm": "triton", "add_layer_norm": "triton"}
    assert torch.equal(first, second) and (first - reference).abs().max().item() <= 1e-4


def test_glue_kernels_chosen_compute_the_reference(tiny_model, device, monkeypatch):
    model, pixels, reference = _auto_model(tiny_model, device, monkeypatch, winner="torch")
    with torch.no_grad():
        model(pixels)  # decides every op torch (the GEMM ops and, in the second layer, the glue)
    for key in [k for k in dispatch._DECISIONS if k[0] in GLUE_OPS]:
        dispatch._DECISIONS[key] = "triton"  # as a GPU where the glue kernels measured faster
    calls = _count_glue_kernel_calls(monkeypatch)
    with torch.no_grad():
        first, second = model(pixels).logits, model(pixels).logits
    layers = model.config.num_hidden_layers
    assert len(calls) == 2 * 2 * layers  # LayerNorm-before and add+LayerNorm-after, per layer and call
    assert torch.equal(first, second) and (first - reference).abs().max().item() <= 1e-4


def test_no_glue_where_a_gradient_is_recorded_or_probabilities_are_asked(tiny_model, device, monkeypatch):
    model, pixels, reference = _auto_model(tiny_model, device, monkeypatch, winner="torch")
    with torch.no_grad():
        model(pixels)
    for key in [k for k in dispatch._DECISIONS if k[0] in GLUE_OPS]:
        dispatch._DECISIONS[key] = "triton"
    calls = _count_glue_kernel_calls(monkeypatch)
    logits = model(pixels).logits  # autograd on: the per-op path (the glue kernels have no backward)
    logits.sum().backward()
    with torch.no_grad():
        out = model(pixels, output_attentions=True)  # probabilities: the reference attention
    assert calls == [] and out.attentions is not None
    assert (logits.detach() - reference).abs().max().item() <= 1e-4


def test_triton_gemms_keep_the_fused_layer(tiny_model, device, monkeypatch):
    model, pixels, reference = _auto_model(tiny_model, device, monkeypatch, winner="triton")
    calls = _count_glue_kernel_calls(monkeypatch)
    with torch.no_grad():
        out = model(pixels).logits
    assert calls == [] and not any(key[0] in GLUE_OPS for key in dispatch.decisions())
    assert (out - reference).abs().max().item() <= 1e-4


def test_a_reset_forgets_which_layers_took_the_glue(tiny_model, device, monkeypatch):
    # FastViTLayer remembers, per input shape, that its GEMMs went to torch; dispatch.reset() must end that
    model, pixels, reference = _auto_model(tiny_model, device, monkeypatch, winner="torch")
    with torch.no_grad():
        model(pixels)
    dispatch.reset()
    monkeypatch.setattr(dispatch, "measure", lambda kernel, ref, device, graphed: {"triton": 1.0, "torch": 2.0})
    calls = _count_glue_kernel_calls(monkeypatch)
    with torch.no_grad():
        out = model(pixels).logits
    assert calls == [] and not any(key[0] in GLUE_OPS for key in dispatch.decisions())
    assert (out - reference).abs().max().item() <= 1e-4


def test_a_kernel_that_fails_while_measured_loses_with_a_warning():
    # "auto" puts never-run kernels in the default path: one that cannot compile on this GPU or Triton
    # must cost a warning, not the model
    def broken():
        raise RuntimeError("PTX too new for this driver")

    reference, x = Counted("r"), torch.zeros(3)
    with pytest.warns(RuntimeWarning, match=r"op at .*the Triton kernel failed.*PTX too new.*torch's ops run"):
        assert dispatch.run("op", True, broken, reference, (x,)) == "r"
    assert list(dispatch.decisions().values()) == ["torch"]
    assert dispatch.run("op", True, broken, reference, (x,)) == "r"  # decided: no second attempt, no warning
    assert reference.calls == 2


def test_torch_ops_failing_too_is_the_callers_error():
    def broken():
        raise RuntimeError("kernel")

    def bad_input():
        raise ValueError("shapes do not match")

    with pytest.raises(ValueError, match="shapes do not match"):
        dispatch.run("op", True, broken, bad_input, (torch.zeros(3),))
    assert dispatch.decisions() == {}  # nothing decided: the next call tries again


def test_graph_timing_is_per_thread():
    """A CUDA-graph runner warming up in one thread (timing_for_graphs) must leave another thread's eager
    decisions eager: the flag was one process-wide list."""
    import threading

    seen = []
    with dispatch.timing_for_graphs():
        other = threading.Thread(target=lambda: seen.append(dispatch.epoch()[0]))
        other.start()
        other.join()
        assert dispatch.epoch()[0] is True
    assert seen == [False] and dispatch.epoch()[0] is False
