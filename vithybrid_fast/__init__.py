"""vithybrid_fast: ViT Hybrid (google/vit-hybrid-base-bit-384) in plain PyTorch, with Triton kernels.

import vithybrid_fast as vf
model = vf.load("google/vit-hybrid-base-bit-384", kernels="auto")
processor = vf.load_processor("google/vit-hybrid-base-bit-384")
logits = model(processor(images, return_tensors="pt")["pixel_values"]).logits
"""

from .config import BitConfig, ViTHybridConfig
from .hub import CheckpointNotFoundError
from .loading import CheckpointError, load
from .modeling import ViTHybridForImageClassification, ViTHybridModel
from .patching import patch, unpatch
from .processing import ViTHybridImageProcessor, load_processor

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
    "load",
    "load_processor",
    "patch",
    "unpatch",
]
