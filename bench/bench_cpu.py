"""CPU comparison: our eager/SDPA paths vs transformers 4.47.1's, on the base config, plus load memory.

    python -m vithybrid_fast.bench.bench_cpu [--batches 1,8] [--reps 5] [--no-load-memory]

Speed: the four models share one set of random float32 weights (the same tensors, assigned), so they
compute the same function. Repetitions are interleaved — every rep runs each provider once, in an
order rotated by one each rep — so drift on a shared or thermally throttling CPU (and any cost of
going first after another model evicted the caches) lands on all providers alike. Reported per
provider: median / p10 / p90 ms, images/s, and ours/theirs for the same attention path.

Load memory: a random base checkpoint (model.safetensors + config.json) is written once, then a fresh
child process imports torch and vithybrid_fast, resets its peak-RSS mark, calls
`vithybrid_fast.load(dir, kernels="sdpa")` and reports (peak RSS − RSS before) / bytes of the weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .arguments import int_at_least, positive_int, positive_ints
from .common import REPO_ROOT, _percentile, environment
from .e2e import base_config, build_hf, build_reference, make_pixels, transformers_status

# (ours, the transformers peer it is compared with)
PAIRS = (("ours-sdpa", "hf-sdpa"), ("ours-eager", "hf-eager"))
LOAD_MEMORY_TARGET = 1.3


def _models(state: dict[str, torch.Tensor]) -> dict[str, torch.nn.Module]:
    config = base_config()
    models: dict[str, torch.nn.Module] = {
        "ours-sdpa": build_reference(config, state, torch.float32, "sdpa"),
        "ours-eager": build_reference(config, state, torch.float32, "eager"),
    }
    if transformers_status()[1] is None:
        models["hf-sdpa"] = build_hf(config, state, torch.float32, "sdpa")
        models["hf-eager"] = build_hf(config, state, torch.float32, "eager")
    return models


def _random_base_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 base weights at initializer scale (std 0.02; norms 1/0), without the ~10 s
    truncated-normal init of 99M parameters on a small CPU."""
    from vithybrid_fast import ViTHybridForImageClassification

    with torch.device("meta"):
        shapes = ViTHybridForImageClassification(base_config()).state_dict()
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, meta in shapes.items():
        if key.endswith(".bias"):
            state[key] = torch.zeros(meta.shape)
        elif meta.ndim == 1:  # LayerNorm / GroupNorm scales
            state[key] = torch.ones(meta.shape)
        else:
            state[key] = torch.randn(meta.shape, generator=generator) * 0.02
    return state


def run_cpu(
    batches: tuple[int, ...] = (1, 8),
    reps: int = 5,
    warmup: int = 1,
    log: Any = print,
    on_record: Callable[[dict], None] | None = None,
) -> list[dict[str, Any]]:
    """Interleaved CPU timing of ours vs transformers (see module docstring); one record per provider/batch.

    `on_record` receives a batch's records as soon as that batch is measured."""
    env = environment("cpu")
    env.update(transformers=transformers_status()[0], device="cpu", config="base", cpu_threads=torch.get_num_threads())
    models = _models(_random_base_state())
    names = list(models)
    records: list[dict[str, Any]] = []
    for batch in batches:
        pixels = make_pixels(base_config(), batch)
        times: dict[str, list[float]] = {name: [] for name in names}
        logits: dict[str, torch.Tensor] = {}
        with torch.inference_mode():
            for _ in range(warmup):
                for name in names:
                    logits[name] = models[name](pixels).logits
            for rep in range(reps):
                order = names[rep % len(names) :] + names[: rep % len(names)]
                for name in order:
                    t0 = time.perf_counter()
                    models[name](pixels)
                    times[name].append((time.perf_counter() - t0) * 1e3)
                log(f"  batch {batch} rep {rep + 1}/{reps}: " + ", ".join(f"{n} {times[n][-1]:.0f} ms" for n in names))
        by_name: dict[str, dict[str, Any]] = {}
        for name in names:
            ordered = sorted(times[name])
            ms = statistics.median(ordered)
            rec = {"kind": "cpu-compare", "provider": name, "dtype": "float32", "batch": batch, "ms_median": ms}
            rec.update(images_per_s=batch * 1e3 / ms, **env)
            rec.update(ms_p10=_percentile(ordered, 0.1), ms_p90=_percentile(ordered, 0.9), reps=reps, warmup=warmup)
            # the minimum is the least disturbed run: on a shared CPU it is the steadier comparison
            rec["ms_min"] = ordered[0]
            rec["times_ms"] = [round(t, 3) for t in times[name]]
            by_name[name] = rec
            records.append(rec)
        for ours, theirs in PAIRS:
            if ours in by_name and theirs in by_name and logits:
                rec = by_name[ours]
                rec["hf_peer"] = theirs
                rec["ms_ratio_ours_over_hf"] = rec["ms_median"] / by_name[theirs]["ms_median"]
                rec["ms_min_ratio_ours_over_hf"] = rec["ms_min"] / by_name[theirs]["ms_min"]
                # ratio within each interleaved round, then the median: the two runs of a round are
                # adjacent in time, so load from other processes cancels better than across medians
                paired = [a / b for a, b in zip(times[ours], times[theirs])]
                rec["paired_ratio_median_ours_over_hf"] = statistics.median(paired)
                rec["rounds_ours_faster"] = sum(r < 1.0 for r in paired)
                rec["max_abs_diff_vs_hf"] = (logits[ours] - logits[theirs]).abs().max().item()
        for rec in by_name.values():
            if on_record is not None:
                on_record(rec)
    return records


# The child: everything it measures is in this process only, so imports and the parent's memory do
# not count. Writing 5 to /proc/self/clear_refs resets VmHWM (Linux ≥ 4.0) so the peak is the load's.
_CHILD = r"""
import json, sys
import torch
import vithybrid_fast

def status():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields

try:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    hwm_reset = True
except OSError:
    hwm_reset = False
before = status()
model = vithybrid_fast.load(sys.argv[1], kernels="sdpa")
after = status()
# safetensors tensors are memory-mapped and paged in on first read: touch every weight once so the
# resident cost of actually using the model is measured too, not just the cost of load() itself
with torch.no_grad():
    checksum = sum(float(t.float().sum()) for t in (*model.parameters(), *model.buffers()))
touched = status()
model_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
print(json.dumps({"before": before, "after": after, "touched": touched, "model_bytes": model_bytes,
                  "hwm_reset": hwm_reset}))
"""


def measure_load_memory(checkpoint_dir: str | Path | None = None) -> dict[str, Any]:
    """Peak resident memory of `load()` on a random base checkpoint, as a multiple of the weights' size."""
    record: dict[str, Any] = {"kind": "load-memory", "provider": "vithybrid_fast.load", "dtype": "float32"}
    record.update(batch=None, ms_median=None, images_per_s=None, target_ratio=LOAD_MEMORY_TARGET)
    record.update(environment("cpu"), device="cpu", config="base")
    with tempfile.TemporaryDirectory(prefix="vithybrid-ckpt-") as tmp:
        directory = Path(checkpoint_dir or tmp)
        try:
            if not (directory / "model.safetensors").exists():
                from safetensors.torch import save_file

                save_file(_random_base_state(), str(directory / "model.safetensors"))
                base_config().save_pretrained(directory)
            child = subprocess.run(
                [sys.executable, "-c", _CHILD, str(directory)],
                capture_output=True, text=True, timeout=900, cwd=REPO_ROOT,
            )  # fmt: skip
            if child.returncode != 0:
                raise RuntimeError(f"child exited {child.returncode}: {child.stderr.strip()[-800:]}")
            data = json.loads(child.stdout.strip().splitlines()[-1])
        except Exception as err:
            record["error"] = f"{type(err).__name__}: {err}"
            return record
    before, after, model_bytes = data["before"], data["after"], data["model_bytes"]
    baseline = before["VmRSS"] if data["hwm_reset"] else max(before["VmRSS"], before["VmHWM"])
    touched = data["touched"]
    peak_extra, touched_extra = after["VmHWM"] - baseline, touched["VmHWM"] - baseline
    record.update(
        model_mb=model_bytes / 2**20,
        baseline_rss_mb=baseline / 2**20,
        # right after load(): memory-mapped weights not read yet are not resident
        peak_rss_mb=after["VmHWM"] / 2**20,
        peak_minus_baseline_mb=peak_extra / 2**20,
        ratio=peak_extra / model_bytes,
        rss_anon_after_mb=after.get("RssAnon", 0) / 2**20,
        rss_file_after_mb=after.get("RssFile", 0) / 2**20,
        # after reading every weight once: the resident cost of a usable model
        peak_after_touch_minus_baseline_mb=touched_extra / 2**20,
        ratio_after_touch=touched_extra / model_bytes,
        rss_anon_after_touch_mb=touched.get("RssAnon", 0) / 2**20,
        rss_file_after_touch_mb=touched.get("RssFile", 0) / 2**20,
        hwm_reset=data["hwm_reset"],
    )
    # judged on the larger of the two: a lazy mmap must not pass just because nothing was read yet
    record["meets_target"] = max(record["ratio"], record["ratio_after_touch"]) <= LOAD_MEMORY_TARGET
    return record


def summary(records: list[dict[str, Any]]) -> str:
    lines = ["| provider | batch | ms median (p10–p90) | ms min | images/s | ours/HF ms (median; min) |"]
    lines.append("|---|---|---|---|---|---|")
    for r in records:
        if r["kind"] != "cpu-compare":
            continue
        ratio = ""
        if "ms_ratio_ours_over_hf" in r:
            ratio = f"{r['ms_ratio_ours_over_hf']:.3f}; {r['ms_min_ratio_ours_over_hf']:.3f} vs {r['hf_peer']}"
            paired, faster = r["paired_ratio_median_ours_over_hf"], r["rounds_ours_faster"]
            ratio += f" (paired {paired:.3f}, ours faster in {faster}/{r['reps']} rounds)"
        lines.append(
            f"| {r['provider']} | {r['batch']} | {r['ms_median']:.0f} ({r['ms_p10']:.0f}–{r['ms_p90']:.0f}) "
            f"| {r['ms_min']:.0f} | {r['images_per_s']:.3f} | {ratio} |"
        )
    for r in records:
        if r["kind"] == "load-memory":
            if "error" in r:
                lines.append(f"\nload memory: error: {r['error']}")
            else:
                lines.append(
                    f"\nload memory ({r['model_mb']:.0f} MB of weights, target ≤ {r['target_ratio']}×): "
                    f"peak − baseline {r['peak_minus_baseline_mb']:.0f} MB = {r['ratio']:.2f}× at load(), "
                    f"{r['peak_after_touch_minus_baseline_mb']:.0f} MB = {r['ratio_after_touch']:.2f}× "
                    "after reading every weight once"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=positive_ints, default=[1, 8], help="(default: 1,8)")
    parser.add_argument("--reps", type=positive_int, default=5)
    parser.add_argument("--warmup", type=int_at_least(0), default=1)
    parser.add_argument("--load-memory", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", type=Path, help="also write the records here")
    args = parser.parse_args(argv)
    batches = tuple(args.batches)
    records = run_cpu(batches, reps=args.reps, warmup=args.warmup)
    if args.load_memory:
        records.append(measure_load_memory())
    if args.json:
        args.json.write_text(json.dumps(records, indent=1, default=str))
    print(summary(records))


if __name__ == "__main__":
    main()
