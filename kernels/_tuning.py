"""Autotuned launches that tune once per GPU: shipped tables, a per-user disk cache, and forced configs.

    _gemm = tuned("fused_linear", _fused_linear_kernel, configs=GPU_CONFIGS, key=[...], prune=select_configs,
                  interpreter_config=SMALL_CONFIG)
    _gemm[grid](x, w, ..., BLOCK_FLAGS=...)          # launched like any Triton autotuner

Where a launch's config comes from, first match wins (all keyed by the autotune key: the key arguments'
values, then the dtype of every tensor argument, as Triton's autotuner keys them):
1. a config forced by a test (`force_config`, or `VITHYBRID_FORCE_CONFIG="name=config-id;..."`);
2. under the Triton interpreter, `interpreter_config` (one small tile: programs run one by one);
3. the shipped table `kernels/configs/<name>.json`, `{gpu name: {key: config id}}`, which
   `vithybrid-fast tune` writes on a GPU; an entry must name one of `configs`;
4. the per-user disk cache of an earlier process's autotuning on this GPU, one file per
   (GPU, triton version, kernel source hash) under `cache_dir()`;
5. `prune(configs, named_args, **kwargs)`: the candidates Triton benchmarks, once per key; the winner
   is written to the disk cache (step 4), so a second process neither tunes nor compiles a loser.
A single remaining config is launched without benchmarking (Triton's own rule). Disable steps 3-4 with
`VITHYBRID_TUNING=autotune` (what `vithybrid-fast tune` does).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import triton
from triton.runtime import driver

from ._runtime import interpreter_enabled

TABLE_DIR = Path(__file__).parent / "configs"
REGISTRY: dict[str, TunedKernel] = {}
_FORCED: dict[str, str] = {}
_GPU_NAME_OVERRIDE: list[str | None] = [None]


def config_id(config: triton.Config) -> str:
    """A stable, readable name for a config: `BLOCK_M=64,BLOCK_N=64,num_warps=4,num_stages=3`."""
    parts = [f"{k}={v}" for k, v in sorted(config.kwargs.items())]
    parts += [f"num_warps={config.num_warps}", f"num_stages={config.num_stages}"]
    if getattr(config, "maxnreg", None) is not None:
        parts.append(f"maxnreg={config.maxnreg}")
    return ",".join(parts)


def key_string(key: Sequence[Any]) -> str:
    """The table/cache spelling of an autotune key tuple (values, then tensor dtypes)."""
    return ",".join(str(v) for v in key)


def gpu_name() -> str | None:
    """The current CUDA device's name (tests may fake one with `VITHYBRID_GPU_NAME` or `fake_gpu`)."""
    name = _GPU_NAME_OVERRIDE[0] or os.environ.get("VITHYBRID_GPU_NAME")
    if name:
        return name
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name()


@contextlib.contextmanager
def fake_gpu(name: str) -> Iterator[None]:
    """Pretend the current GPU is `name` (tests on a CPU); resets every tuned kernel's memory."""
    previous = _GPU_NAME_OVERRIDE[0]
    _GPU_NAME_OVERRIDE[0] = name
    reset_all()
    try:
        yield
    finally:
        _GPU_NAME_OVERRIDE[0] = previous
        reset_all()


def _forced_from_env() -> dict[str, str]:
    spec = os.environ.get("VITHYBRID_FORCE_CONFIG", "")
    pairs = (item.split("=", 1) for item in spec.split(";") if "=" in item)
    return {name.strip(): cfg.strip() for name, cfg in pairs}


@contextlib.contextmanager
def force_config(name: str, config: triton.Config | str) -> Iterator[None]:
    """Launch kernel `name` with exactly `config` (one of its GPU configs), also under the interpreter."""
    wanted = config if isinstance(config, str) else config_id(config)
    kernel = REGISTRY.get(name)
    if kernel is None:
        raise KeyError(f"no tuned kernel named {name!r}; known: {sorted(REGISTRY)}")
    if wanted not in {config_id(c) for c in kernel.configs}:
        raise ValueError(f"{name}: {wanted} is not one of its configs")
    previous = _FORCED.get(name)
    _FORCED[name] = wanted
    kernel.reset()
    try:
        yield
    finally:
        if previous is None:
            _FORCED.pop(name, None)
        else:
            _FORCED[name] = previous
        kernel.reset()


def cache_dir() -> Path:
    """Per-user autotune cache root: $VITHYBRID_CACHE_DIR, else $XDG_CACHE_HOME/vithybrid_fast."""
    root = os.environ.get("VITHYBRID_CACHE_DIR")
    if root:
        return Path(root) / "autotune"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "vithybrid_fast" / "autotune"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "unknown"


def _tables_enabled() -> bool:
    return os.environ.get("VITHYBRID_TUNING", "tables").lower() != "autotune"


def load_table(name: str, table_dir: Path | None = None) -> dict[str, dict[str, str]]:
    path = (table_dir or TABLE_DIR) / f"{name}.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def write_table(name: str, gpu: str, entries: dict[str, str], table_dir: Path | None = None) -> Path:
    """Merge `entries` ({key string: config id}) into `<table_dir>/<name>.json` under `gpu`."""
    directory = table_dir or TABLE_DIR
    directory.mkdir(parents=True, exist_ok=True)
    table = load_table(name, directory)
    table.setdefault(gpu, {}).update(entries)
    path = directory / f"{name}.json"
    ordered = {g: dict(sorted(rows.items())) for g, rows in sorted(table.items())}
    # renamed into place: a Ctrl-C or full disk mid-write must not leave a truncated shipped table, which
    # every later run on any GPU would fail to parse
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(ordered, indent=1) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class TunedKernel:
    """A Triton autotuner whose choice comes from a table, a disk cache or one benchmark (module docstring)."""

    def __init__(
        self,
        name: str,
        fn: Any,
        configs: Sequence[triton.Config],
        key: Sequence[str],
        prune: Callable[..., list[triton.Config]] | None = None,
        interpreter_config: triton.Config | None = None,
        do_bench: Callable | None = None,
    ) -> None:
        self.name = name
        self.configs = list(configs)  # the GPU candidates: what the compile checks and tables may name
        self.key = list(key)
        self._prune = prune
        self._interpreter_config = interpreter_config or self.configs[-1]
        self._by_id = {config_id(c): c for c in self.configs}
        self._by_id.setdefault(config_id(self._interpreter_config), self._interpreter_config)
        self._pending: str | None = None
        self.tuned: dict[str, str] = {}  # key string -> config id benchmarked in this process
        candidates = list(self._by_id.values())
        self._do_bench = do_bench  # None: Triton's benchmarker for the active driver, found at first use
        self._single_choice = False  # the last _select returned one config: nothing to time
        kw: dict[str, Any] = {
            "prune_configs_by": {"early_config_prune": self._select},
            "do_bench": self._bench_unless_chosen,
        }
        # ≥ 2 candidates, so Triton always asks _select (it skips pruning for a single config).
        if len(candidates) == 1:
            candidates = candidates * 2
        self.autotuner = triton.autotune(configs=candidates, key=self.key, **kw)(fn)
        self.fn = fn
        REGISTRY[name] = self

    # -- where a config comes from -------------------------------------------------------------------
    def _key(self, named_args: dict, kwargs: dict) -> str:
        args = {**named_args, **kwargs}
        names = self.autotuner.arg_names
        values = [args[k] for k in self.key if k in args]
        values += [str(args[n].dtype) for n in names if n in args and hasattr(args[n], "dtype")]
        return key_string(values)

    def _source_hash(self) -> str:
        module = sys.modules.get(getattr(self.fn, "__module__", ""), None)
        source = inspect.getsource(module) if module is not None else self.name
        return hashlib.sha256(source.encode()).hexdigest()[:16]

    def disk_cache_path(self, gpu: str) -> Path:
        version = _slug(triton.__version__)
        return cache_dir() / _slug(gpu) / f"triton-{version}" / f"{self.name}-{self._source_hash()}.json"

    def choose(self, key: str, candidates: list[triton.Config]) -> tuple[list[triton.Config], str]:
        """The configs to launch or benchmark for `key`, and where they came from."""
        forced = _FORCED.get(self.name) or _forced_from_env().get(self.name)
        if forced is not None:
            return [self._by_id[forced]], "forced"
        if interpreter_enabled():
            return [self._interpreter_config], "interpreter"
        gpu = gpu_name()
        if gpu is not None and _tables_enabled():
            shipped = load_table(self.name).get(gpu, {}).get(key)
            if shipped in self._by_id:
                return [self._by_id[shipped]], "table"
            path = self.disk_cache_path(gpu)
            cached = json.loads(path.read_text()).get(key) if path.exists() else None
            if cached in self._by_id:
                return [self._by_id[cached]], "disk"
        return candidates, "autotune"

    def _select(self, configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        key = self._key(named_args, kwargs)
        gpu_configs = [c for c in configs if config_id(c) in {config_id(g) for g in self.configs}]
        candidates = self._prune(gpu_configs, named_args, **kwargs) if self._prune else gpu_configs
        chosen, source = self.choose(key, list(dict.fromkeys(candidates)) or gpu_configs[:1])
        self._pending = key if source == "autotune" and len(chosen) > 1 else None
        self._single_choice = len(chosen) == 1
        return chosen

    def _bench_unless_chosen(self, kernel_call: Callable[[], Any], quantiles: Any = None, **kwargs: Any) -> Any:
        """Time a candidate, except when `_select` left only one (a table, cache or forced hit).

        Triton 3.6 (the GPU image's) benchmarks even a single pruned config; 3.7+ skips it. Timing a
        table hit would cost every launch key a benchmark (~100 launches) at the first call, which is
        what the shipped tables exist to avoid. The kernel still compiles and runs at its real launch.
        """
        if self._single_choice:
            return [0.0, 0.0, 0.0] if quantiles else 0.0
        bench = self._do_bench or driver.active.get_benchmarker()
        return bench(kernel_call, quantiles=quantiles, **kwargs)

    def _record(self) -> None:
        key, self._pending = self._pending, None
        best = getattr(self.autotuner, "best_config", None)
        if key is None or best is None:
            return
        self.tuned[key] = config_id(best)
        gpu = gpu_name()
        if gpu is None or os.environ.get("VITHYBRID_AUTOTUNE_CACHE", "1") == "0":
            return
        path = self.disk_cache_path(gpu)
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = json.loads(path.read_text()) if path.exists() else {}
        entries[key] = config_id(best)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)  # atomic: a concurrent reader sees the old or the new file, never half of one

    # -- launching ------------------------------------------------------------------------------------
    def run(self, *args: Any, grid: Any, **kwargs: Any) -> Any:
        try:
            return self.autotuner.run(*args, grid=grid, warmup=False, **kwargs)
        finally:
            self._record()

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        return lambda *args, **kwargs: self.run(*args, grid=grid, **kwargs)

    def reset(self) -> None:
        """Forget this process's choices (the next launch per key asks `choose` again)."""
        self.autotuner.cache.clear()
        self._pending = None


def reset_all() -> None:
    for kernel in REGISTRY.values():
        kernel.reset()


# `tuned(name, fn, configs, key, ...)` wraps `fn` (a @triton.jit kernel, optionally under @triton.heuristics):
# the class itself, under the name the kernel modules read best
tuned = TunedKernel


def jit(
    fn: Callable | None = None,
    *,
    constexpr_under_interpreter: Sequence[str] = (),
    do_not_specialize: Sequence[str] = (),
    fp_fusion: bool | None = None,
) -> Any:
    """`triton.jit`, with some runtime sizes turned into constexprs only under the interpreter.

    On a GPU a size passed at run time costs no recompile when it changes; the Triton 3.6 interpreter,
    however, cannot loop to a runtime bound under NumPy >= 2.4, so there the same parameters are
    compile-time constants. The kernel body must treat them as plain values either way. Parameters
    in `do_not_specialize` (autotune keys, row counts) get no 1 / multiple-of-16 specialization.
    `fp_fusion=False`: no FMA contraction in this kernel (default FP_FUSION), for a kernel that subtracts
    a product from a sum of the same products rounded (contracted, the product is not rounded, and a
    difference that should be exactly zero is not).
    """

    def wrap(f: Callable) -> Any:
        if interpreter_enabled():
            for name in constexpr_under_interpreter:
                f.__annotations__[name] = "tl.constexpr"
            dns = [n for n in do_not_specialize if n not in constexpr_under_interpreter]
        else:
            dns = list(do_not_specialize)
        kernel = triton.jit(f, do_not_specialize=dns or None)
        if interpreter_enabled() and constexpr_under_interpreter:
            _keep_annotations_when_rewritten(kernel, f.__annotations__)
        return _pin_fp_fusion(kernel, fp_fusion)

    return wrap if fn is None else wrap(fn)


def _keep_annotations_when_rewritten(kernel: Any, annotations: dict) -> None:
    """Carry `annotations` onto the function the interpreter actually runs.

    Triton 3.6's interpreter re-executes the kernel's source text and takes its constexpr parameters
    from that copy's annotations, so the ones `jit` adds at run time were lost there: `N` stayed a
    tensor and `range(0, N, ...)` failed under NumPy >= 2.4. Interpreters that do not rewrite have no
    `rewrite` and need nothing.
    """
    rewrite = getattr(kernel, "rewrite", None)
    if rewrite is None:
        return

    def rewrite_keeping_annotations() -> Callable:
        rewritten = rewrite()
        rewritten.__annotations__.update(annotations)
        return rewritten

    kernel.rewrite = rewrite_keeping_annotations


# FMA contraction (a*b+c in one rounding), stated at every launch instead of left to Triton's default:
# triton 3.9 warns that the default turns off in 3.10, which would change every kernel's rounding and
# speed on an upgrade without a word. kernels/_offline.py binds the same option, so `warmup` compiles
# what a run launches.
FP_FUSION = True


def _pin_fp_fusion(kernel: Any, fusion: bool | None = None) -> Any:
    """`kernel` whose every launch (direct, or through an autotuner or heuristics) passes `fusion`, or
    FP_FUSION as it is at launch time where None (kept as `kernel.fp_fusion`: kernels/_offline.py compiles
    with the same)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("enable_fp_fusion", FP_FUSION if fusion is None else fusion)
        return type(kernel).run(kernel, *args, **kwargs)  # looked up per call: tests may patch the class

    kernel.run = run
    kernel.fp_fusion = fusion
    return kernel
