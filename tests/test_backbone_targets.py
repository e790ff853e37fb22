"""The backbone kernels (group_norm_act, weight_standardize) against their offline launch lists, no GPU.

1. `offline_launches` describe exactly what the real launchers launch (compile keys compared), so
   `vithybrid-fast warmup` and tests/test_gpu_targets.py compile what the model runs.
2. group_norm_act's opt-in channels-last layout (phase "channels_last": per-channel statistics, the
   per-group merge, the autotuned apply with each config its prune keeps at the base model's shapes, the
   single pass, and the backward's reduction and autotuned apply) is not part of a default NCHW run, so
   it is compiled here for sm_80 and sm_90 in float32, where registers are scarcest: it must compile,
   fit shared memory (A100 166,912 B, H100 232,448 B), use ≤ 255 registers and spill nothing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.triton36 import TRITON36, require_triton36

COMPILE = """
import importlib, json, sys, torch
from vithybrid_fast.kernels import _offline
gn_offline = importlib.import_module("vithybrid_fast.kernels._group_norm_act_offline")
jobs = []
for arch in (80, 90):
    found = gn_offline.offline_launches(torch.float32, [1, 8, 64], arch)
    launches = [ln for ln in found if ln.phase == "channels_last"]
    jobs += [(ln, cfg, arch) for ln, cfg in _offline.compile_jobs(launches, arch)]
results = _offline.compile_all(jobs, workers=2)
json.dump([dict(r.__dict__, spills=r.spills) for r in results], sys.stdout)
"""


def test_channels_last_forward_compiles_within_limits(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(done.stdout)
    kernels = {r["kernel"] for r in results}
    assert kernels == {
        "_gn_stats",
        "_gn_finalize",
        "_gn_apply",
        "_gn_fwd_single_pass",
        "_gn_bwd_reduce",
        "_gn_bwd_apply",
    }
    assert {r["arch"] for r in results} == {80, 90}
    limit = {80: 166_912, 90: 232_448}
    for r in results:
        label = f"sm_{r['arch']} {r['name']} [{r['config']}]"
        assert not r["error"], f"{label}: {r['error']}"
        assert 0 <= r["shared"] <= limit[r["arch"]], f"{label}: {r['shared']} B shared memory"
        assert 0 < r["registers"] <= 255, f"{label}: {r['registers']} registers"
        assert r["spills"] == 0, f"{label}: {r['spill_stores']} B spill stores, {r['spill_loads']} B loads"


# The real launchers (group_norm_act forward and backward at the traced backbone shapes, weight
# standardization of every conv weight), with Triton's launch stubbed to record its arguments and every
# autotune candidate "benchmarked" without running: each recorded launch's compile key must be one that
# `offline_launches` describes, so warm-up and the compile checks see exactly what the model launches.
RECORD_LAUNCHES = """
import importlib, json
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction
from vithybrid_fast.kernels import _offline
from vithybrid_fast.kernels._backbone_calls import conv_weight_shapes, group_norm_calls

gn = importlib.import_module("vithybrid_fast.kernels.group_norm_act")
bwd = importlib.import_module("vithybrid_fast.kernels._group_norm_act_backward")
gn_offline = importlib.import_module("vithybrid_fast.kernels._group_norm_act_offline")
ws = importlib.import_module("vithybrid_fast.kernels.weight_standardize")
recorded = []
JITFunction.run = lambda self, *a, grid, warmup, **kw: recorded.append((self, {**dict(zip(self.arg_names, a)), **kw}))
Autotuner._bench = lambda self, *args, config, **kw: [1.0, 1.0, 1.0]
out = {"missing": [], "checked": 0, "kernels": []}
for arch, sm_count in ((80, 108), (90, 132)):
    gn._sm_count = lambda device, sm_count=sm_count: sm_count  # what the launchers ask the GPU
    target = GPUTarget("cuda", arch, 32)
    for dtype in (torch.bfloat16, torch.float32):
        recorded.clear()
        for batch in (1, 8, 64):
            for call in group_norm_calls():
                x = torch.empty(batch, call.channels, *call.spatial, dtype=dtype)  # never touched: no memory
                w = torch.empty(call.channels, dtype=dtype)
                res = torch.empty_like(x) if call.residual else None
                y, mean, rstd = gn.launch_forward(x, call.num_groups, w, w, 1e-5, "relu" if call.relu else None, res)
                bwd.launch_backward(
                    y, y if call.relu else None, x, w, mean, rstd, call.relu, call.residual,
                    gn._sm_count_or_one(x.device), gn._small_blocks(),  # as the backward op passes them
                )
        for shape in conv_weight_shapes():
            w = torch.empty(shape, dtype=dtype)
            _, mean, rstd = ws.launch_forward(w, 1e-8)
            ws.launch_backward(w, w, mean, rstd)
        launches = gn_offline.offline_launches(dtype, [1, 8, 64], arch) + ws.offline_launches(dtype, [1, 8, 64], arch)
        described = {
            _offline.source_key(*_offline._bind(launch.kernel, launch.args, cfg, target)[1:])
            for launch in launches
            if launch.phase != "channels_last"
            for cfg in launch.configs
        }
        for fn, call in recorded:
            out["checked"] += 1
            out["kernels"].append(fn.__name__)
            if _offline.source_key(*_offline.bind_call(fn, call, target)[1:]) not in described:
                out["missing"].append(f"sm_{arch} {fn.__name__} {dtype}")
out["kernels"] = sorted(set(out["kernels"]))
out["fp_fusion"] = sorted({str(call.get("enable_fp_fusion")) for _, call in recorded})
print(json.dumps(out))
"""


def test_offline_launches_are_what_the_launchers_launch(tmp_path):
    # Triton's default FMA contraction off (triton 3.10's default): every launch still states it on, and
    # the offline binding agrees, so warm-up compiles what a run launches whatever the default.
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache"),
           "TRITON_DEFAULT_FP_FUSION": "0"}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", RECORD_LAUNCHES], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["kernels"] == [
        "_gn_apply_grouped", "_gn_bwd_apply_grouped", "_gn_bwd_reduce", "_gn_fwd_group_loop", "_gn_fwd_single_pass",
        "_gn_group_stats", "_weight_standardize_bwd", "_weight_standardize_fwd",
    ]  # fmt: skip
    assert result["checked"] > 1000 and sorted(set(result["missing"])) == [], result["missing"][:20]
    assert result["fp_fusion"] == ["True"]


STATS_PTX = """
import sys, torch
from vithybrid_fast.kernels import _group_norm_act_offline as gn
from vithybrid_fast.kernels._offline import compile_launch
name, layout = sys.argv[1], sys.argv[2]
found = (gn.channels_last_launches if layout == "channels_last" else gn.backbone_launches)(torch.bfloat16, [8, 64], 90)
launch = next(ln for ln in found if ln.name.endswith(name) and ln.args.get("S", 9216) == 9216)
result, asm = compile_launch(launch, launch.configs[0], 90, keep_asm=True)
assert not result.error, result.error
sys.stdout.write(asm["ptx"])
"""
# Every GroupNorm statistics loop (launch names), bf16: channels-last per-channel statistics (stage 1,
# S = 9216), the NCHW group loop (batch 64's path for 28 of 52 norms), the NCHW split statistics (batch 8).
STATISTICS_LOOPS = [
    ("channels-last stats", "channels_last"),
    ("_gn_fwd_group_loop", "nchw"),
    ("_gn_group_stats", "nchw"),
]


def loop_bodies(ptx: str) -> list[str]:
    """The PTX from each label to the last branch back to it: the loops' bodies."""
    lines = ptx.splitlines()
    starts = {line.split(":")[0]: i for i, line in enumerate(lines) if re.match(r"\$L__BB\d+_\d+:", line)}
    ends: dict[str, int] = {}
    for i, line in enumerate(lines):
        branch = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if branch and starts.get(branch.group(1), i) < i:  # a branch back: the end of a loop
            ends[branch.group(1)] = i
    return ["\n".join(lines[starts[label] : end + 1]) for label, end in ends.items()]


@pytest.mark.parametrize("triton_copy", ["installed", "3.6"])
@pytest.mark.parametrize(("kernel", "layout"), STATISTICS_LOOPS)
def test_group_norm_statistics_loops_have_no_barrier_and_two_tiles_in_flight(tmp_path, triton_copy, kernel, layout):
    """No GroupNorm statistics loop may reduce across warps per tile (the H200 profile's 12.1 ms in
    channels-last `_gn_stats` came from 28 barriers per 4 KB tile), and, unrolled by two, each loads two
    tiles per trip where its remainder loop loads one; sm_90 PTX from the venv's Triton and 3.6's."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    if triton_copy == "3.6":
        require_triton36()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TRITON36), env.get("PYTHONPATH")]))
    command = [sys.executable, "-c", STATS_PTX, kernel, layout]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    bodies = loop_bodies(done.stdout)
    assert bodies, f"no loop found in {kernel}'s PTX"
    assert all("bar.sync" not in body for body in bodies)
    loads = [body.count("ld.global") for body in bodies]
    assert any(2 * one in loads for one in loads if one), loads  # the unrolled loop and its remainder


LOOP_PTX = """
import dataclasses, json, sys, torch
from vithybrid_fast.kernels import _group_norm_act_offline as gn
from vithybrid_fast.kernels._offline import compile_launch
found = gn.backbone_launches(torch.bfloat16, [64], 90)
launch = next(ln for ln in found if ln.name.endswith("_gn_fwd_group_loop") and ln.phase == "forward")
result, asm = compile_launch(launch, launch.configs[0], 90, keep_asm=True)
assert not result.error, result.error
plain = dataclasses.replace(launch, args=dict(launch.args, FIRST_EVICT="", LAST_EVICT=""))
without, _ = compile_launch(plain, plain.configs[0], 90)
assert not without.error, without.error
out = {"ptx": asm["ptx"], "registers": result.registers, "without_hints": without.registers}
json.dump(dict(out, warps=launch.configs[0].num_warps), sys.stdout)
"""


def programs_per_sm(registers: int, warps: int) -> int:
    """Resident programs per SM by the register file alone (64 K registers, allocated per warp by 8s)."""
    return 65536 // (-(-registers // 8) * 8 * 32 * warps)


@pytest.mark.parametrize("triton_copy", ["installed", "3.6"])
def test_group_loop_keeps_its_group_in_l2_between_its_sweeps(tmp_path, triton_copy):
    """`_gn_fwd_group_loop` (batch 64's path for 28 of 52 norms) reads its group twice: the statistics
    sweep's loads are marked evict_last and the output sweep's loads and stores evict_first (x's last use),
    and the hints cost no occupancy: as many programs per SM as without them (sm_90, bf16)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    if triton_copy == "3.6":
        require_triton36()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TRITON36), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", LOOP_PTX], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout)
    bodies = loop_bodies(out["ptx"])
    stats = [b for b in bodies if "st.global" not in b and "ld.global" in b]
    applies = [b for b in bodies if "st.global" in b]
    assert stats and applies, f"expected statistics and output loops, got {len(bodies)} loops"

    def vector_loads(body: str) -> list[str]:
        return re.findall(r"ld\.global\S*\.v\d\.\S+", body)

    for body in stats:
        assert vector_loads(body) and all("evict_last" in ld for ld in vector_loads(body)), vector_loads(body)
    for body in applies:
        assert vector_loads(body) and all("evict_first" in ld for ld in vector_loads(body)), vector_loads(body)
        stores = re.findall(r"st\.global\S*\.v\d\.\S+", body)
        assert stores and all("evict_first" in st for st in stores), stores
    hinted, plain = (programs_per_sm(out[k], out["warps"]) for k in ("registers", "without_hints"))
    assert hinted == plain >= 2, (out["registers"], out["without_hints"], out["warps"])
