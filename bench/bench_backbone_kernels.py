"""GPU microbenchmarks of the BiT backbone kernels against plain torch, at the model's real shapes.

- `weight_standardize` vs HF's batch_norm trick on every distinct conv weight of BiT-R50x1 (depths
  [3, 4, 9], width 1, as in `google/vit-hybrid-base-bit-384`), plus all 52 backbone convs in one loop.
- `group_norm_act` vs `relu(group_norm(x) [+ res])` at every distinct (activation shape, act, residual)
  of that backbone at 384² input, in NCHW and channels_last.

Both are memory-bound, so each record reports GB/s of the minimum traffic (weights: read w + write out;
GroupNorm: read x [+ res] + write out) and its percent of `measured_hbm_gbps` (a device-to-device copy on
the same GPU), twice: from queued eager calls (`ms_median`, what an eager loop sees, the host's launch
included where it is the slower part: batch 1) and from a replayed CUDA graph (`ms_device`, the kernels
alone, as under `cuda_graphs=True`). Small cases live in L2 and run past HBM bandwidth.

    python -m vithybrid_fast.bench.bench_backbone_kernels --out bench/results/backbone_kernels.json
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .common import (
    RecordLog,
    device_ms,
    environment,
    exit_without_cuda,
    first_call_ms,
    gpu_bench_parser,
    measured_hbm_gbps,
    print_and_save,
    skip_without_cuda,
    time_fn,
)

# (out, in, kh, kw) of every distinct conv weight -> how many convs of the backbone have it (52 in all).
CONV_WEIGHTS = {
    (64, 3, 7, 7): 1,  # stem
    (256, 64, 1, 1): 4,  # stage 1 downsample + conv3 of blocks 0-2
    (64, 64, 1, 1): 1,  # stage 1 block 0 conv1
    (64, 64, 3, 3): 3,  # stage 1 conv2
    (64, 256, 1, 1): 2,  # stage 1 blocks 1-2 conv1
    (512, 256, 1, 1): 1,  # stage 2 downsample
    (128, 256, 1, 1): 1,  # stage 2 block 0 conv1
    (128, 128, 3, 3): 4,  # stage 2 conv2
    (512, 128, 1, 1): 4,  # stage 2 conv3
    (128, 512, 1, 1): 3,  # stage 2 blocks 1-3 conv1
    (1024, 512, 1, 1): 1,  # stage 3 downsample
    (256, 512, 1, 1): 1,  # stage 3 block 0 conv1
    (256, 256, 3, 3): 9,  # stage 3 conv2
    (1024, 256, 1, 1): 9,  # stage 3 conv3
    (256, 1024, 1, 1): 8,  # stage 3 blocks 1-8 conv1
}

# (C, H, W) per image, act, residual. Stem: 7x7/2 SAME conv -> 192², then GroupNorm+ReLU (layer_type
# "bottleneck" has a norm after the stem conv), then maxpool -> 96². Strides sit on conv2.
GROUP_NORM_CASES = [
    ((64, 192, 192), "relu", False),  # stem norm
    ((64, 96, 96), "relu", False),  # stage 1 norm1/norm2
    ((256, 96, 96), None, False),  # stage 1 downsample norm
    ((256, 96, 96), "relu", True),  # stage 1 norm3 + shortcut + relu
    ((128, 96, 96), "relu", False),  # stage 2 block 0 norm1 (before the strided conv2)
    ((128, 48, 48), "relu", False),  # stage 2 norm1/norm2
    ((512, 48, 48), None, False),  # stage 2 downsample norm
    ((512, 48, 48), "relu", True),  # stage 2 norm3 + shortcut + relu
    ((256, 48, 48), "relu", False),  # stage 3 block 0 norm1
    ((256, 24, 24), "relu", False),  # stage 3 norm1/norm2
    ((1024, 24, 24), None, False),  # stage 3 downsample norm
    ((1024, 24, 24), "relu", True),  # stage 3 norm3 + shortcut + relu
]
NUM_GROUPS = 32


def hf_weight_standardize(w: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    flat = w.reshape(1, w.shape[0], -1)
    return F.batch_norm(flat, None, None, training=True, momentum=0.0, eps=eps).reshape_as(w)


def torch_group_norm_act(x, weight, bias, act, residual, num_groups: int = NUM_GROUPS):
    y = F.group_norm(x, num_groups, weight, bias, 1e-5)
    if residual is not None:
        y = y + residual
    return F.relu(y) if act == "relu" else y


def _measure(fn: Callable[[], object], device: str, nbytes: int, hbm_gbps: float) -> dict:
    first = first_call_ms(fn, device)  # includes Triton compile + autotune for ours
    t = time_fn(fn, device, warmup=10, reps=50)
    gbps = nbytes / (t["ms_median"] * 1e-3) / 1e9
    # Also the kernels' own time (a replayed CUDA graph): queued eager calls time the host wherever its
    # launch is slower than the kernel — every GroupNorm at batch 1 on the H100 machine (0.09–0.25 ms a
    # call, whatever the size), which made those GB/s the host's, not the kernel's.
    ms_device = device_ms(fn, device)
    gbps_device = nbytes / (ms_device * 1e-3) / 1e9
    eager = {**t, "first_call_ms": first, "bytes": nbytes, "gbps": gbps, "pct_of_hbm": 100 * gbps / hbm_gbps}
    return {
        **eager,
        "ms_device": ms_device,
        "gbps_device": gbps_device,
        "pct_of_hbm_device": 100 * gbps_device / hbm_gbps,
    }


def bench_weight_standardize(device: str, dtype: torch.dtype, hbm_gbps: float, keep: Callable[[dict], None]) -> None:
    """Hands `keep` one record per provider and weight shape, as each is measured."""
    from vithybrid_fast.kernels.weight_standardize import weight_standardize

    providers = {"triton": weight_standardize, "torch": hf_weight_standardize}
    gen = torch.Generator(device=device).manual_seed(0)
    weights = {s: torch.randn(s, device=device, generator=gen).to(dtype) * 0.05 for s in CONV_WEIGHTS}
    with torch.no_grad():
        for shape, w in weights.items():
            recs = {p: _measure(lambda fn=fn, w=w: fn(w), device, 2 * w.numel() * w.element_size(), hbm_gbps)
                    for p, fn in providers.items()}  # fmt: skip
            diff = (weight_standardize(w).float() - hf_weight_standardize(w).float()).abs().max().item()
            for provider, rec in recs.items():
                keep({"provider": provider, "kernel": "weight_standardize", "shape": list(shape),
                      "batch": None, "layout": None, "max_abs_diff_vs_torch": diff, **rec})  # fmt: skip
        # Every conv of one forward pass (training recomputes them each step), as one sequence of launches.
        every_conv = [w for shape, w in weights.items() for _ in range(CONV_WEIGHTS[shape])]
        nbytes = sum(2 * w.numel() * w.element_size() for w in every_conv)
        for provider, fn in providers.items():
            rec = _measure(lambda fn=fn: [fn(w) for w in every_conv], device, nbytes, hbm_gbps)
            shape = f"all {len(every_conv)} backbone convs"
            keep({"provider": provider, "kernel": "weight_standardize", "shape": shape,
                  "batch": None, "layout": None, **rec})  # fmt: skip


def _group_norm_case(batch, chw, act, has_res, layout, dtype, device, hbm_gbps) -> list[dict]:
    from vithybrid_fast.kernels.group_norm_act import group_norm_act

    c, h, w = chw
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(batch, c, h, w, device=device, dtype=dtype).contiguous(memory_format=fmt)
    res = torch.randn_like(x) if has_res else None
    weight = torch.rand(c, device=device, dtype=dtype) + 0.5
    bias = torch.randn(c, device=device, dtype=dtype) * 0.1
    providers = {
        "triton": lambda: group_norm_act(x, NUM_GROUPS, weight, bias, act=act, residual=res),
        "torch": lambda: torch_group_norm_act(x, weight, bias, act, res),
    }
    nbytes = x.numel() * x.element_size() * (3 if has_res else 2)
    with torch.no_grad():
        recs = {p: _measure(fn, device, nbytes, hbm_gbps) for p, fn in providers.items()}
        diff = (providers["triton"]().float() - providers["torch"]().float()).abs().max().item()
    variant = "group_norm" + ("+res" if has_res else "") + ("+relu" if act else "")
    return [
        {"provider": p, "kernel": "group_norm_act", "variant": variant, "shape": [batch, c, h, w],
         "batch": batch, "layout": layout, "max_abs_diff_vs_torch": diff, **rec}
        for p, rec in recs.items()
    ]  # fmt: skip


def bench_group_norm_act(
    device: str,
    dtype: torch.dtype,
    batches: tuple[int, ...],
    layouts: tuple[str, ...],
    hbm_gbps: float,
    keep: Callable[[dict], None],
) -> None:
    """Hands `keep` the records of each (batch, case, layout) as soon as that case is measured."""
    for batch in batches:
        for chw, act, has_res in GROUP_NORM_CASES:
            for layout in layouts:
                for rec in _group_norm_case(batch, chw, act, has_res, layout, dtype, device, hbm_gbps):
                    keep(rec)


def run(
    device: str = "cuda",
    batches: tuple[int, ...] = (1, 8, 64),
    dtypes: tuple[str, ...] = ("float16", "bfloat16"),
    layouts: tuple[str, ...] = ("nchw", "channels_last"),
    on_record: Callable[[dict], None] | None = None,
) -> list[dict]:
    """All records (one per provider × case × dtype); [] with a printed reason where there is no CUDA GPU.

    `on_record` receives each record as soon as it is measured."""
    if skip_without_cuda("bench_backbone_kernels", device):
        return []
    hbm_gbps = measured_hbm_gbps(device)
    env = environment(device)
    records: list[dict] = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)

        def keep(record: dict, dtype_name: str = dtype_name) -> None:
            full = {**record, "dtype": dtype_name, "hbm_gbps": hbm_gbps, **env}
            records.append(full)
            if on_record is not None:
                on_record(full)

        bench_weight_standardize(device, dtype, hbm_gbps, keep)
        bench_group_norm_act(device, dtype, batches, layouts, hbm_gbps, keep)
    return records


def format_table(records: list[dict]) -> str:
    head = f"{'kernel':<20}{'variant':<20}{'shape':<28}{'layout':<14}{'dtype':<10}{'provider':<8}"
    head += f"{'ms':>9}{'GB/s':>9}{'%HBM':>7}{'dev ms':>9}{'dev %HBM':>9}"
    lines = [head, "-" * len(head)]
    for r in records:
        shape = "x".join(map(str, r["shape"])) if isinstance(r["shape"], list) else r["shape"]
        lines.append(
            f"{r['kernel']:<20}{r.get('variant', ''):<20}{shape:<28}{r['layout'] or '':<14}{r['dtype']:<10}"
            f"{r['provider']:<8}{r['ms_median']:>9.4f}{r['gbps']:>9.1f}{r['pct_of_hbm']:>7.1f}"
            f"{r['ms_device']:>9.4f}{r['pct_of_hbm_device']:>9.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = gpu_bench_parser("bench_backbone_kernels", __doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", default=["nchw", "channels_last"])
    args = parser.parse_args(argv)
    exit_without_cuda(parser.prog, args.device)
    with RecordLog(args.out and args.out.with_suffix(".jsonl")) as log:
        records = run(args.device, tuple(args.batches), tuple(args.dtypes), tuple(args.layouts), on_record=log.write)
    if not records:
        return
    env = {k: records[0][k] for k in ("gpu", "torch", "triton", "commit", "date")}
    header = f"{env} | measured HBM copy bandwidth {records[0]['hbm_gbps']:.0f} GB/s"
    print_and_save(records, header, format_table(records), args.out)


if __name__ == "__main__":
    main()
