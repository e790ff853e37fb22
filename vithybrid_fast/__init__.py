"""vithybrid_fast: ViT Hybrid (google/vit-hybrid-base-bit-384) in plain PyTorch, with Triton kernels.

import vithybrid_fast as vf
model = vf.load("google/vit-hybrid-base-bit-384", kernels="auto")
processor = vf.load_processor("google/vit-hybrid-base-bit-384")
logits = model(processor(images, return_tensors="pt")["pixel_values"]).logits
"""

import os as _os

# In a source checkout (PYTHONPATH=repo, no install) kernels/ and bench/ sit beside this package; an
# installed copy has them inside it (pyproject's package-dir). Searching the repo root as part of this
# package makes `vithybrid_fast.kernels` / `vithybrid_fast.bench` resolve the same way in both.
_repo_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and _os.path.isfile(
    _os.path.join(_repo_root, "kernels", "_runtime.py")
):
    __path__.append(_repo_root)

try:
    from .config import BitConfig, ViTHybridConfig
    from .export import export_onnx, export_program, load_program
    from .hub import CheckpointNotFoundError
    from .loading import CheckpointError, load
    from .modeling import ViTHybridForImageClassification, ViTHybridModel
    from .patching import patch, unpatch
    from .processing import ViTHybridImageProcessor, load_processor
    from .weight_cache import freeze, unfreeze
except KeyboardInterrupt:
    # Ctrl-C in the first seconds of `vithybrid-fast …` lands here, while torch loads: before cli.main's
    # handler exists, so it was a traceback. The command's one line and status instead; anyone else
    # importing the package (a notebook, pytest) gets the KeyboardInterrupt as always.
    import sys as _sys

    # `python -m vithybrid_fast`: while -m imports the package, argv[0] is "-m"; orig_argv names the module
    _orig = list(getattr(_sys, "orig_argv", ()))
    _m = _orig.index("-m") if "-m" in _orig else len(_orig)
    _as_module = _orig[_m + 1 : _m + 2] == [__name__] or f"-m{__name__}" in _orig
    if _os.path.basename(_sys.argv[0]) in ("vithybrid-fast", "vithybrid-fast.exe") or _as_module:
        print("\ninterrupted", file=_sys.stderr)
        raise SystemExit(130) from None
    raise

__version__ = "0.1.0"

__all__ = [
    "BitConfig",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ViTHybridConfig",
    "ViTHybridForImageClassification",
    "ViTHybridImageProcessor",
    "ViTHybridModel",
    "__version__",
    "export_onnx",
    "export_program",
    "freeze",
    "load",
    "load_processor",
    "load_program",
    "patch",
    "unfreeze",
    "unpatch",
]
