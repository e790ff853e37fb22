"""Launch plans of `group_norm_act`: which kernels one call launches, with which grid, tiles and loop counts.

Pure functions of the shape, the layout and the GPU's SM count (no device is touched), so tests and the
offline compile check can ask what an A100 (108 SMs) or an H100 (132 SMs) would launch at any batch.

Forward paths, for x (N, C, S) with G groups of CG = C/G channels, one group spanning L = CG·S elements:
- "single" (1 launch): the whole padded (CG, S) group tile fits in registers (≤ SINGLE_PASS_MAX_TILE) and
  the N·G programs fill the GPU (≥ MIN_PROGRAMS_PER_SM per SM): x read once.
- "loop" (1 launch, NCHW): one program per (n, g) sweeps its group twice (statistics, then the output).
  In NCHW a group is one contiguous span, so the sweeps are flat 1-D blocks of any CG and S. Taken when
  the N·G programs fill the GPU but the group does not fit in registers.
- "split" (2 launches, NCHW): too few (n, g) programs to fill the GPU (small batch), so each group's
  span is cut into P chunks: `_gn_group_stats` writes (mean, M2) per (n, g, chunk), and
  `_gn_apply_grouped` merges a group's P partials (Chan) in each program before writing its block.
- "split_channels" (3 launches, channels-last): a channels-last group is not contiguous, and tiles
  narrower than 128 channels read it uncoalesced; per-channel statistics (`_gn_stats`), a per-group
  merge (`_gn_finalize`), and an autotuned (channel × spatial) apply (`_gn_apply`).
The backward always uses the per-channel reduction plan (`reduce_plan`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field


def cdiv(a: int, b: int) -> int:
    # Plain ints: triton.cdiv / next_power_of_2 are constexpr functions costing microseconds a call.
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# Single-pass forward: largest padded group tile (C/G × S, each a power of two) held in registers, and
# the least N·G programs per SM that keep HBM busy with one program per group (fewer: split the groups).
SINGLE_PASS_MAX_TILE = 16384
MIN_PROGRAMS_PER_SM = 2
PATHS = ("single", "loop", "split", "split_channels")


@dataclass(frozen=True)
class Blocks:
    """Flat block sizes (elements) of the NCHW kernels; the GPU set and a tiny set for the interpreter."""

    stats: int  # `_gn_group_stats`: elements per loop step
    apply: int  # `_gn_apply_grouped`: elements per program
    loop: int  # `_gn_fwd_group_loop`: elements per loop step
    max_chunks: int  # most partials per group, the apply's BLOCK_P (a power of two)
    reduce_tile: int  # elements per (channel × spatial) tile of the per-channel reductions
    loop_warps: int = 4  # `_gn_fwd_group_loop`'s num_warps
    # `_gn_fwd_group_loop`'s L2 hints: its statistics sweep loads x evict_last, its output sweep (x's last
    # use) evict_first, so the second sweep finds the group in L2. Off: Triton's default policy.
    loop_l2_hints: bool = True


# The group loop's tile: bench/sweep_group_norm.py's ranking on an H200 (bf16, batch 64, 2026-11-27,
# bench/results/nvidia-h200-2026-11-27-run3-notes.md): 2048 elements × 4 warps with the L2 hints, 3.85 ms per
# forward over the loop's 28 calls against 4.35 for the 4096 × 8 warps it replaces (device time).
GPU_BLOCKS = Blocks(stats=2048, apply=2048, loop=2048, max_chunks=64, reduce_tile=2048)
# Small enough that the tests' tiny shapes cover multi-block loops, partial tails and several chunks.
INTERPRETER_BLOCKS = Blocks(stats=64, apply=128, loop=64, max_chunks=4, reduce_tile=128)


@dataclass(frozen=True)
class Launch:
    """One kernel launch: grid (None: the autotuner's tile decides), plan-chosen constexprs and sizes."""

    kernel: str
    grid: tuple[int, ...] | None
    constexprs: dict[str, int | str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # runtime loop counts and strides
    num_warps: int | None = 4  # None: autotuned


@dataclass(frozen=True)
class ForwardPlan:
    path: str
    launches: tuple[Launch, ...]


def span(s: int) -> int:
    """NCHW tile width along S: the widest power of two in 64..512 padding S within 10% of the least."""
    if s < 64:
        return next_pow2(s)
    padded = {b: cdiv(s, b) * b for b in (64, 128, 256, 512)}
    return max(b for b, p in padded.items() if p <= 1.1 * min(padded.values()))


def single_pass_tile(cg: int, s: int) -> tuple[int, int]:
    return next_pow2(cg), next_pow2(s)


def single_pass_warps(block_cg: int, block_s: int) -> int:
    tile = block_cg * block_s
    return 16 if tile >= 8192 else (8 if tile >= 2048 else 4)


def choose_path(
    n: int, num_groups: int, cg: int, s: int, channels_last: bool, sm_count: int, force: str | None = None
) -> str:
    """Which forward path a call takes (see the module docstring); `force` is the tests' override."""
    if force is not None:
        if force not in ("single", "loop", "split"):
            raise ValueError(f"group_norm_act: _FORCE_PATH must be 'single', 'loop', 'split' or None, got {force!r}")
        return force if force == "single" or not channels_last else "split_channels"
    block_cg, block_s = single_pass_tile(cg, s)
    fills_gpu = n * num_groups >= MIN_PROGRAMS_PER_SM * sm_count
    if fills_gpu and block_cg * block_s <= SINGLE_PASS_MAX_TILE:
        return "single"
    if channels_last:
        return "split_channels"
    return "loop" if fills_gpu else "split"


def split_chunks(n: int, num_groups: int, length: int, sm_count: int, blocks: Blocks) -> tuple[int, int]:
    """(ITERS, P) of `_gn_group_stats`: P chunks of ITERS blocks per group, ~4 programs per SM in all."""
    group_blocks = cdiv(length, blocks.stats)
    chunks = min(max(cdiv(4 * sm_count, n * num_groups), 1), group_blocks, blocks.max_chunks)
    iters = cdiv(group_blocks, chunks)
    return iters, cdiv(group_blocks, iters)


@functools.lru_cache(maxsize=1024)
def reduce_plan(n: int, c: int, s: int, channels_last: bool, sm_count: int, interpreter: bool = False):
    """(BLOCK_C, BLOCK_S, ITERS, P) of the per-channel reductions: ~2K-element tiles, ≥ 4 programs per SM."""
    if interpreter:
        # Tiny tiles and few chunks: the tests then exercise masking and the Chan merge loop.
        block_c, block_s, target = min(next_pow2(c), 8), min(next_pow2(s), 16), 4
    else:
        tile = GPU_BLOCKS.reduce_tile
        if channels_last:
            block_c = min(next_pow2(c), 128)
            block_s = min(max(tile // block_c, 1), next_pow2(s))
        else:
            # The backward's NCHW reduction: 64-wide rows (a 128-byte line in 16-bit) fit every model S
            # without padding, so one (32 × 64) tile, one compile, serves every shape.
            block_s = min(64, next_pow2(s))
            block_c = min(max(tile // block_s, 1), next_pow2(c))
        target = 4 * sm_count
    s_blocks = cdiv(s, block_s)
    chunks = min(max(cdiv(target, n * cdiv(c, block_c)), 1), s_blocks)
    iters = cdiv(s_blocks, chunks)
    return block_c, block_s, iters, cdiv(s_blocks, iters)


# Cached: a model repeats a few dozen shapes, and the plan is ~10 µs of Python per call (launches
# themselves are the rest of the host time). Plans are never mutated by their users.
@functools.lru_cache(maxsize=1024)
def forward_plan(
    n: int,
    c: int,
    s: int,
    num_groups: int,
    channels_last: bool,
    sm_count: int,
    interpreter: bool = False,
    force: str | None = None,
    blocks: Blocks | None = None,
) -> ForwardPlan:
    """Every launch of one forward call (flags such as HAS_RES and RELU are the caller's, not the plan's)."""
    blocks = blocks or (INTERPRETER_BLOCKS if interpreter else GPU_BLOCKS)
    cg = c // num_groups
    rows, length = n * num_groups, cg * s
    path = choose_path(n, num_groups, cg, s, channels_last, sm_count, force)
    if path == "single":
        block_cg, block_s = single_pass_tile(cg, s)
        launch = Launch(
            "_gn_fwd_single_pass", (rows,), {"BLOCK_CG": block_cg, "BLOCK_S": block_s},
            num_warps=single_pass_warps(block_cg, block_s),
        )  # fmt: skip
        return ForwardPlan(path, (launch,))
    if path == "loop":
        hints = ("evict_last", "evict_first") if blocks.loop_l2_hints else ("", "")  # "": Triton's default
        launch = Launch(
            "_gn_fwd_group_loop", (rows,), {"BLOCK": blocks.loop, "FIRST_EVICT": hints[0], "LAST_EVICT": hints[1]},
            {"ITERS": cdiv(length, blocks.loop)},
            blocks.loop_warps,
        )  # fmt: skip
        return ForwardPlan(path, (launch,))
    if path == "split":
        iters, chunks = split_chunks(n, num_groups, length, sm_count, blocks)
        sizes = {"ITERS": iters, "P": chunks}
        stats = Launch("_gn_group_stats", (rows * chunks,), {"BLOCK": blocks.stats}, sizes)
        tiles = cdiv(length, blocks.apply)
        apply = Launch(
            "_gn_apply_grouped", (rows * tiles,), {"BLOCK": blocks.apply, "BLOCK_P": blocks.max_chunks},
            {"P": chunks, "CHUNK": iters * blocks.stats, "TILES": tiles},
        )  # fmt: skip
        return ForwardPlan(path, (stats, apply))
    block_c, block_s, iters, chunks = reduce_plan(n, c, s, channels_last, sm_count, interpreter)
    stats = Launch(
        "_gn_stats", (chunks, n, cdiv(c, block_c)), {"BLOCK_C": block_c, "BLOCK_S": block_s},
        {"ITERS": iters, "P": chunks},
    )  # fmt: skip
    # One fixed merge width (E_ITERS steps cover any CG·P): one compile for every shape and batch.
    block_e = 16 if interpreter else 1024
    finalize = Launch(
        "_gn_finalize", (rows,), {"BLOCK_E": block_e},
        {"E_ITERS": cdiv(cg * chunks, block_e), "CHUNK_S": iters * block_s},
    )  # fmt: skip
    return ForwardPlan(path, (stats, finalize, Launch("_gn_apply", None, num_warps=None)))
