"""A fine-tuning run's model, optimizer and precision: the start model and its head, AdamW's parameter
groups, the warm-up + cosine schedule, autocast dtypes and float16 loss scaling (used by `train.py`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

DTYPES = ("float32", "bfloat16", "float16")
FP16_INIT_SCALE = 2.0**16  # torch's default; halved on every overflowing step, doubled after 2000 clean ones


def autocast_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' → bfloat16 on GPUs with bf16 tensor cores (sm_80+), float16 on sm_70/sm_75 (V100, T4: bf16
    is emulated there, slower than float32), float32 (no autocast) elsewhere. float16 trains with a
    GradScaler (`loss_scaler`)."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        major = torch.cuda.get_device_capability(device)[0]
        return torch.bfloat16 if major >= 8 else torch.float16 if major >= 7 else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: choose one of auto, {', '.join(DTYPES)}")
    return getattr(torch, name)


def loss_scaler(dtype: torch.dtype, device: torch.device) -> torch.amp.GradScaler:
    """Dynamic loss scaling for float16 (whose gradients underflow unscaled); a pass-through otherwise."""
    return torch.amp.GradScaler(device.type, init_scale=FP16_INIT_SCALE, enabled=dtype == torch.float16)


def head_fits(model: nn.Module, classes: list[str]) -> bool:
    """Whether `model`'s head classifies exactly `classes`. In another order (a checkpoint from another
    tool sorts them its own way) its rows are put in `classes`' order first: that trained head was once
    thrown away for a new one, without a word."""
    from .config import inverse_labels
    from .modeling import ViTHybridForImageClassification

    if not isinstance(model, ViTHybridForImageClassification) or len(set(classes)) != len(classes):
        return False
    labels = [model.config.id2label.get(i) for i in range(model.config.num_labels)]
    if labels == list(classes):
        return True
    if sorted(labels, key=str) != sorted(classes, key=str):
        return False
    order = torch.tensor([labels.index(name) for name in classes])
    with torch.no_grad():
        model.classifier.weight.copy_(model.classifier.weight[order])
        model.classifier.bias.copy_(model.classifier.bias[order])
    model.config.id2label = dict(enumerate(classes))
    model.config.label2id = inverse_labels(model.config.id2label)
    return True


def classifier_for_classes(model_name: str, classes: list[str], seed: int, **hub_kwargs: Any) -> nn.Module:
    """`model_name`'s weights with a new, seeded classification head for `classes` (float32, CPU).

    A checkpoint that already classifies exactly these classes (a fine-tuned model trained further) keeps
    its head: a new one would throw that training away."""
    return start_model(model_name, classes, seed, **hub_kwargs)[0]


def start_model(model_name: str, classes: list[str], seed: int, **hub_kwargs: Any) -> tuple[nn.Module, bool]:
    """(`classifier_for_classes`'s model, whether the checkpoint's own head was kept)."""
    from .config import ViTHybridConfig
    from .loading import load_model
    from .modeling import ViTHybridForImageClassification

    base = load_model(model_name, dtype=torch.float32, device="cpu", **hub_kwargs)
    if head_fits(base, classes):
        return base, True
    encoder = base.vit if isinstance(base, ViTHybridForImageClassification) else base
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("pooler.") and "mask_token" not in k}
    data = base.config.to_dict()
    data.update(id2label=dict(enumerate(classes)), label2id={c: i for i, c in enumerate(classes)})
    data.pop("num_labels", None)
    data["problem_type"] = "single_label_classification"
    config = ViTHybridConfig.from_dict(data)
    with torch.device("meta"):
        model = ViTHybridForImageClassification(config)
    model.vit.load_state_dict(state, strict=True, assign=True)
    model.classifier = nn.Linear(config.hidden_size, len(classes))
    torch.manual_seed(seed)
    model.init_weights(model.classifier)
    return model, False


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and conv kernels; not biases, norm affines, the [CLS] token or the position table."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or name.endswith(("cls_token", "position_embeddings", "mask_token"))
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.0):
    """lr multiplier per optimizer step: linear 1/w … 1 over `warmup_steps`, then cosine down to `min_ratio`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
