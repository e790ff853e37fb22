"""group_norm_act's opt-in channels-last forward, compiled offline for sm_80 and sm_90 (no GPU).

tests/test_gpu_targets.py compiles every launch a default (NCHW) run makes, forward and backward. The
channels-last forward (`group_norm_act.offline_launches`, phase "channels_last": per-channel statistics,
the per-group merge, the autotuned apply with each config its prune keeps at the base model's shapes,
and the single pass) is not part of that run, so it is checked here, in float32, where registers are
scarcest: it must compile, fit shared memory (A100 166,912 B, H100 232,448 B), use ≤ 255 registers
and spill nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

COMPILE = """
import importlib, json, sys, torch
from vithybrid_fast.kernels import _offline
gn = importlib.import_module("vithybrid_fast.kernels.group_norm_act")
jobs = []
for arch in (80, 90):
    launches = [ln for ln in gn.offline_launches(torch.float32, [1, 8, 64], arch) if ln.phase == "channels_last"]
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
    assert kernels == {"_gn_stats", "_gn_finalize", "_gn_apply", "_gn_fwd_single_pass"}, kernels
    assert {r["arch"] for r in results} == {80, 90}
    limit = {80: 166_912, 90: 232_448}
    for r in results:
        label = f"sm_{r['arch']} {r['name']} [{r['config']}]"
        assert not r["error"], f"{label}: {r['error']}"
        assert 0 <= r["shared"] <= limit[r["arch"]], f"{label}: {r['shared']} B shared memory"
        assert 0 < r["registers"] <= 255, f"{label}: {r['registers']} registers"
        assert r["spills"] == 0, f"{label}: {r['spill_stores']} B spill stores, {r['spill_loads']} B loads"
