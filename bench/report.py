"""Benchmark results as data, a table and plots: `write_results(records, out_dir)`.

Files, named for the hardware and date (`<gpu-slug>-<date>`):
    .json            every record as measured (e2e, kernel, peak, cpu-compare, load-memory)
    .md              header (hardware, versions, commit, measured peaks) + one table per dtype
    -throughput.png  end-to-end images/s against batch, one line per provider, one panel per dtype
    -roofline.png    each kernel measurement as a fraction of the device's measured peak: TFLOP/s
                     over the measured matmul peak (compute-bound kernels), GB/s over the measured
                     HBM copy bandwidth (memory-bound ones); written only when kernel records exist

Kernel records come from separate microbenchmarks whose fields differ a little; `kernel_fraction`
reads any of them (tflops + a measured peak, gbps + a measured bandwidth).

Records of several devices (`--from-jsonl` over runs on different machines) are never compared: each
table and plot panel holds one device's timings, the header says the devices are mixed, and a kernel is
judged only against the peak measured on its own device. Files are written whole or not at all.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on benchmark machines or CI
import matplotlib.pyplot as plt

from vithybrid_fast.files import write_atomic

from .common import write_text_atomically

Record = dict[str, Any]
DTYPE_ORDER = ("float32", "float16", "bfloat16")


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' → 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def measured(record: Record) -> bool:
    return not record.get("error") and not record.get("skipped") and record.get("ms_median") is not None


def _values(records: Iterable[Record], key: str) -> str:
    seen = [str(r[key]) for r in records if r.get(key) is not None]
    return ", ".join(dict.fromkeys(seen)) or "unknown"


def _sorted_dtypes(records: Iterable[Record]) -> list[str]:
    found = {r["dtype"] for r in records if r.get("dtype")}
    return [d for d in DTYPE_ORDER if d in found] + sorted(found - set(DTYPE_ORDER))


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10 ** (-digits) or value == 0 else f"{value:.1e}"
    return str(value)


def devices(records: Iterable[Record]) -> list[str]:
    """The devices (the records' "gpu" field) these records were measured on, in order of appearance."""
    return list(dict.fromkeys(str(r["gpu"]) for r in records if r.get("gpu") is not None))


def _by_device(records: list[Record]) -> list[tuple[str, list[Record]]]:
    """(device, its records) per device; records naming none form one group of their own."""
    groups = [(device, [r for r in records if str(r.get("gpu")) == device]) for device in devices(records)]
    unnamed = [r for r in records if r.get("gpu") is None]
    return groups + ([("unknown device", unnamed)] if unnamed else [])


# -- kernels --------------------------------------------------------------------------------------
def _peak(records: list[Record], metric: str, dtype: str | None, gpu: Any = None) -> float | None:
    """A peak measured on `gpu`: another device's roof would turn a kernel's time into a false fraction."""
    for r in records:
        same_device = r.get("gpu") == gpu
        if r.get("kind") == "peak" and r.get("metric") == metric and r.get("dtype") in (dtype, None) and same_device:
            return r.get("value")
    return None


def kernel_fraction(record: Record, records: list[Record]) -> tuple[float, str] | None:
    """(achieved fraction of measured peak, "compute" | "memory") for a kernel record, if it has one."""
    if record.get("tflops"):
        peak = (record.get("measured_peak_tflops") or record.get("peak_matmul_tflops")
                or _peak(records, "matmul_tflops", record.get("dtype"), record.get("gpu")))  # fmt: skip
        if peak:
            return record["tflops"] / peak, "compute"
    if record.get("gbps"):
        peak = record.get("hbm_gbps") or _peak(records, "hbm_gbps", None, record.get("gpu"))
        if peak:
            return record["gbps"] / peak, "memory"
    return None


def _case_label(record: Record) -> str:
    parts = [f"B={record['batch']}" if record.get("batch") is not None else None]
    parts += [str(record[k]) for k in ("variant", "layout") if record.get(k)]
    shape = record.get("shape")
    if isinstance(shape, str):  # a named set ("all 52 backbone convs"), not a tensor shape
        parts.append(shape)
    elif shape:  # always: rows of one batch and variant differ only in their shape
        parts.append("×".join(str(s) for s in shape))
    return " ".join(p for p in parts if p)


# -- markdown -------------------------------------------------------------------------------------
def markdown(records: list[Record]) -> str:
    e2e = [r for r in records if r.get("kind") == "e2e"]
    kernel_recs = [r for r in records if r.get("kind") == "kernel"]
    peaks = [r for r in records if r.get("kind") == "peak"]
    cpu = [r for r in records if r.get("kind") == "cpu-compare"]
    load = [r for r in records if r.get("kind") == "load-memory"]
    lines = [f"# ViT Hybrid benchmark — {_values(records, 'gpu')}, {_values(records, 'date')}", ""]
    threads = _values(records, "cpu_threads")
    lines.append(
        f"- hardware: {_values(records, 'gpu')}" + (f" (CPU threads: {threads})" if threads != "unknown" else "")
    )
    lines.append(
        f"- versions: torch {_values(records, 'torch')}, triton {_values(records, 'triton')}, "
        f"CUDA {_values(records, 'cuda')}, cuDNN {_values(records, 'cudnn')}, "
        f"transformers {_values(records, 'transformers')}, commit {_values(records, 'commit')} "
        f"(source {_values(records, 'source')})"
    )
    if e2e:
        gflop = next((r["gflop_per_image"] for r in e2e if r.get("gflop_per_image")), None)
        model_line = (
            f"- end-to-end model: config `{_values(e2e, 'config')}`, {_values(e2e, 'image_size')}² input, "
            f"{_fmt(gflop, 3)} GFLOP/image (counted by torch FlopCounterMode)"
        )
        if any("tf32_matmul" in r for r in e2e):
            model_line += f"; TF32 matmul/cuDNN: {_values(e2e, 'tf32_matmul')}/{_values(e2e, 'tf32_cudnn')}"
        lines.append(model_line)
        lines.append(
            "- timing: ms per batch, median of the timed runs after warm-up (CUDA events on a GPU); "
            "p10–p90 in the detail tables; first call (compile/autotune/capture) timed separately"
        )
    mixed = len(devices(records)) > 1
    for p in peaks:
        unit = "TFLOP/s" if p["metric"].endswith("tflops") else "GB/s"
        where = f" on {p.get('gpu')}" if mixed else ""
        lines.append(f"- measured peak {p['metric']} {p.get('dtype') or ''}{where}: {p['value']:.1f} {unit}")
    if mixed:
        lines.append(
            f"- **mixed devices** ({'; '.join(devices(records))}): timings are never compared across devices; "
            "each table below holds one device's records, named in its title"
        )
    for device, on_device in _by_device(e2e):
        for dtype in _sorted_dtypes(on_device):
            title = f"{dtype}, {device}" if mixed else dtype
            lines += ["", *e2e_tables([r for r in on_device if r["dtype"] == dtype], title)]
    skipped = {(r["provider"], r["skipped"]) for r in e2e if r.get("skipped")}
    if skipped:
        lines += ["", "## Skipped providers", ""]
        lines += [f"- {provider}: {reason}" for provider, reason in sorted(skipped)]
    for device, on_device in _by_device(kernel_recs):
        lines += ["", *kernel_table(on_device, records, device if mixed else None)]
    if cpu:
        lines += ["", *cpu_table(cpu)]
    for r in load:
        lines += ["", "## Load memory (CPU, base checkpoint, float32)", ""]
        if r.get("error"):
            lines.append(f"error: {r['error']}")
            continue
        lines.append(
            f"peak RSS − baseline: {r['peak_minus_baseline_mb']:.0f} MB at `load()` = {r['ratio']:.2f}× the "
            f"{r['model_mb']:.0f} MB of weights; {r['peak_after_touch_minus_baseline_mb']:.0f} MB = "
            f"{r['ratio_after_touch']:.2f}× after reading every weight once (target ≤ {r['target_ratio']}×: "
            f"{'met' if r['meets_target'] else 'NOT met'})"
        )
    return "\n".join(lines) + "\n"


def e2e_tables(records: list[Record], dtype: str) -> list[str]:
    batches = sorted({r["batch"] for r in records})
    providers = list(dict.fromkeys(r["provider"] for r in records if not r.get("skipped")))
    out = [f"## End to end, {dtype}: images/s", ""]
    out.append("| provider | " + " | ".join(f"B={b}" for b in batches) + " |")
    out.append("|---|" + "---|" * len(batches))
    cell = {(r["provider"], r["batch"]): r for r in records}
    for provider in providers:
        row = []
        for b in batches:
            r = cell.get((provider, b))
            row.append(_fmt(r["images_per_s"], 1) if r and measured(r) else ("error" if r else "—"))
        out.append(f"| {provider} | " + " | ".join(row) + " |")
    out += ["", f"### Detail, {dtype}", ""]
    out.append(
        "| provider | batch | ms median | p10–p90 | images/s | peak MB | first call ms "
        "| max abs diff vs ref-eager fp32 |"
    )
    out.append("|---|---|---|---|---|---|---|---|")
    for r in sorted((r for r in records if not r.get("skipped")), key=lambda r: (r["batch"], r["provider"])):
        if not measured(r):
            out.append(f"| {r['provider']} | {r['batch']} | error: {str(r.get('error'))[:120]} | | | | | |")
            continue
        out.append(
            f"| {r['provider']} | {r['batch']} | {r['ms_median']:.3f} | {r['ms_p10']:.3f}–{r['ms_p90']:.3f} "
            f"| {r['images_per_s']:.1f} | {_fmt(r.get('peak_mem_mb'), 0)} | {_fmt(r.get('first_call_ms'), 0)} "
            f"| {_fmt(r.get('max_abs_diff_vs_ref_eager_fp32'), 6)} |"
        )
    return out


def kernel_table(kernel_recs: list[Record], records: list[Record], device: str | None = None) -> list[str]:
    out = [f"## Kernels, {device}" if device else "## Kernels", ""]
    # "ms on device": a replayed CUDA graph's time per call (the kernels alone), where a bench measured it.
    out.append("| kernel | provider | case | dtype | ms median | TFLOP/s | GB/s | % of measured peak | ms on device |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for r in kernel_recs:
        if r.get("error") or r.get("skipped"):
            why = r.get("error") or f"skipped: {r.get('skipped')}"
            out.append(f"| {r.get('kernel', r.get('module'))} | {r.get('provider', '')} | {_case_label(r)} "
                       f"| {r.get('dtype', '')} | {str(why)[:120]} | | | | |")  # fmt: skip
            continue
        fraction = kernel_fraction(r, records)
        pct = f"{100 * fraction[0]:.1f} ({fraction[1]})" if fraction else "—"
        out.append(
            f"| {r.get('kernel')} | {r.get('provider')} | {_case_label(r)} | {r.get('dtype')} "
            f"| {_fmt(r.get('ms_median'), 4)} | {_fmt(r.get('tflops'), 1)} | {_fmt(r.get('gbps'), 0)} | {pct} "
            f"| {_device_cell(r)} |"
        )
    return out


def _device_cell(record: Record) -> str:
    """ms on device, and its % of HBM where the bench computed one (memory-bound kernels)."""
    if record.get("ms_device") is None:
        return "—"
    pct = record.get("pct_of_hbm_device")
    return f"{record['ms_device']:.4f}" + (f" ({pct:.1f} % HBM)" if pct is not None else "")


def cpu_table(cpu: list[Record]) -> list[str]:
    out = [f"## CPU: ours vs transformers ({_values(cpu, 'gpu')}, {_values(cpu, 'cpu_threads')} threads, "
           "base config, float32, interleaved reps)", ""]  # fmt: skip
    out += ["| provider | batch | ms median | p10–p90 | ms min | images/s | ours/HF ms (median; min) "
            "| ours/HF paired per round (median; rounds ours faster) |"]  # fmt: skip
    out.append("|---|---|---|---|---|---|---|---|")
    for r in cpu:
        ratio = paired = ""
        if r.get("ms_ratio_ours_over_hf"):
            ratio = f"{r['ms_ratio_ours_over_hf']:.3f}; {_fmt(r.get('ms_min_ratio_ours_over_hf'), 3)} vs {r['hf_peer']}"
        if r.get("paired_ratio_median_ours_over_hf"):
            paired = f"{r['paired_ratio_median_ours_over_hf']:.3f}; {r['rounds_ours_faster']}/{r['reps']}"
        out.append(
            f"| {r['provider']} | {r['batch']} | {r['ms_median']:.0f} | {r['ms_p10']:.0f}–{r['ms_p90']:.0f} "
            f"| {_fmt(r.get('ms_min'), 0)} | {r['images_per_s']:.3f} | {ratio} | {paired} |"
        )
    return out


# -- plots ----------------------------------------------------------------------------------------
def plot_throughput(records: list[Record], path: Path) -> Path:
    e2e = [r for r in records if r.get("kind") == "e2e" and measured(r)]
    mixed = len(devices(e2e)) > 1
    panels = [(device, dtype) for device, on_device in _by_device(e2e) for dtype in _sorted_dtypes(on_device)]
    panels = panels or [("unknown device", "(none)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (device, dtype) in zip(axes[0], panels):
        rows = [r for r in dict(_by_device(e2e)).get(device, e2e) if r["dtype"] == dtype]
        for provider in dict.fromkeys(r["provider"] for r in rows):
            points = sorted((r["batch"], r["images_per_s"]) for r in rows if r["provider"] == provider)
            ax.plot(*zip(*points), marker="o", label=provider)
        ax.set_xscale("log", base=2)
        batches = sorted({r["batch"] for r in rows})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.set_xlabel("batch")
        ax.set_ylabel("images/s")
        ax.set_title(f"{dtype}, {device}" if mixed else dtype, fontsize=9)
        ax.grid(True, alpha=0.3)
        if rows:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no end-to-end measurements", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(
        f"ViT Hybrid end to end ({_values(e2e, 'config')}, {_values(e2e, 'image_size')}²) on {_values(e2e, 'gpu')}\n"
        f"torch {_values(e2e, 'torch')}, triton {_values(e2e, 'triton')}, commit {_values(e2e, 'commit')}",
        fontsize=9,
    )
    fig.tight_layout()
    _save(fig, path)
    return path


def _save(fig: Any, path: Path) -> None:
    # the temporary name ends in .tmp: savefig is told the format the final name asks for
    write_atomic(path, lambda temporary: fig.savefig(temporary, dpi=120, format=path.suffix.lstrip(".")))
    plt.close(fig)


def _series(record: Record, mixed: bool) -> str:
    """A plot series: the provider, and its device when the records come from several."""
    provider = str(record.get("provider"))
    return f"{provider} @ {record.get('gpu')}" if mixed else provider


def plot_roofline(records: list[Record], path: Path) -> Path | None:
    points = [(r, kernel_fraction(r, records)) for r in records if r.get("kind") == "kernel" and measured(r)]
    points = [(r, f) for r, f in points if f is not None]
    if not points:
        return None
    kernels = list(dict.fromkeys(str(r.get("kernel")) for r, _ in points))
    mixed = len(devices(r for r, _ in points)) > 1
    fig, axes = plt.subplots(len(kernels), 1, figsize=(11, 3.2 * len(kernels)), squeeze=False)
    markers = {"float32": "s", "float16": "o", "bfloat16": "^"}
    for ax, kernel in zip(axes[:, 0], kernels):
        rows = [(r, f) for r, f in points if str(r.get("kernel")) == kernel]
        cases = list(dict.fromkeys(_case_label(r) for r, _ in rows))
        providers = list(dict.fromkeys(_series(r, mixed) for r, _ in rows))
        for i, provider in enumerate(providers):
            for dtype in dict.fromkeys(r.get("dtype") for r, _ in rows):
                sel = [(cases.index(_case_label(r)), f[0]) for r, f in rows
                       if _series(r, mixed) == provider and r.get("dtype") == dtype]  # fmt: skip
                if sel:
                    ax.scatter(*zip(*sel), marker=markers.get(dtype, "x"), color=f"C{i}", label=f"{provider} {dtype}")
        bound = {f[1] for _, f in rows}
        roof = " / ".join(("matmul TFLOP/s" if b == "compute" else "HBM GB/s") for b in sorted(bound))
        ax.set_title(f"{kernel}: fraction of measured peak {roof}", fontsize=9)
        ax.set_xticks(range(len(cases)), cases, rotation=30, ha="right", fontsize=7)
        ax.set_ylim(0, max(1.0, max(f[0] for _, f in rows) * 1.1))
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, ncol=3)
    recs = [r for r, _ in points]
    fig.suptitle(
        f"Kernels vs measured peaks on {_values(recs, 'gpu')} — torch {_values(recs, 'torch')}, "
        f"triton {_values(recs, 'triton')}, commit {_values(recs, 'commit')}",
        fontsize=9,
    )
    fig.tight_layout()
    _save(fig, path)
    return path


def write_results(records: list[Record], out_dir: str | Path) -> dict[str, Path]:
    """Write <gpu-slug>-<date>.json / .md / -throughput.png (/ -roofline.png); returns {kind: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    first = next((r for r in records if r.get("kind") == "e2e"), records[0] if records else {})
    device = "mixed-devices" if len(devices(records)) > 1 else slug(str(first.get("gpu", "unknown")))
    stem = f"{device}-{first.get('date') or datetime.date.today().isoformat()}"
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md"}
    write_text_atomically(paths["json"], json.dumps(records, indent=1, default=str) + "\n")
    write_text_atomically(paths["markdown"], markdown(records))
    paths["throughput"] = plot_throughput(records, out_dir / f"{stem}-throughput.png")
    roofline = plot_roofline(records, out_dir / f"{stem}-roofline.png")
    if roofline is not None:
        paths["roofline"] = roofline
    return paths
