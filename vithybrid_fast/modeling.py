"""ViT Hybrid in plain PyTorch: the reference every kernel is checked against.

Module names match transformers 4.47.1 exactly, so `state_dict()` keys are the checkpoint's keys
(`vit.embeddings.patch_embeddings.backbone.bit...`, `vit.encoder.layer.N.attention.attention.query`, …).
Data flow (hub checkpoint, 384² input): pixels (B, 3, 384, 384) → BiT backbone (B, 1024, 24, 24) →
1×1 projection (B, 768, 24, 24) → tokens (B, 576, 768) → [CLS] + position table (B, 577, 768) →
12 pre-norm ViT layers → LayerNorm → classifier on the [CLS] token (B, 1000).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .activations import get_activation
from .backbone import BitBackbone
from .checkpointing import call_layer, set_gradient_checkpointing
from .config import ViTHybridConfig
from .outputs import BaseModelOutputWithPooling, ImageClassifierOutput


class ViTHybridPatchEmbeddings(nn.Module):
    """Backbone feature map → (B, N, hidden) tokens through a patch_size×patch_size projection."""

    def __init__(self, config: ViTHybridConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = BitBackbone(config.backbone_config)
        self.grid_size = config.position_grid
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_channels = config.num_channels
        patch = config.patch_size_hw
        self.projection = nn.Conv2d(config.backbone_featmap_shape[1], config.hidden_size, patch, stride=patch)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        features = self.backbone(pixel_values)[-1]
        projected = self.projection(features)  # (B, hidden, gh, gw)
        grid = (projected.shape[-2], projected.shape[-1])
        return projected.flatten(2).transpose(1, 2), grid  # (B, gh·gw, hidden)


class ViTHybridEmbeddings(nn.Module):
    """[CLS] token + patch tokens + position table (interpolated to the real grid when asked)."""

    def __init__(self, config: ViTHybridConfig, use_mask_token: bool = False) -> None:
        super().__init__()
        self.config = config
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if use_mask_token else None
        self.patch_embeddings = ViTHybridPatchEmbeddings(config)
        self.position_embeddings = nn.Parameter(
            torch.zeros(1, self.patch_embeddings.num_patches + 1, config.hidden_size)
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def check_input(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> None:
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must be (batch, channels, height, width), got shape {tuple(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            raise TypeError(
                f"pixel_values must be a floating-point tensor (normalized pixels), got {pixel_values.dtype}"
            )
        if pixel_values.shape[0] == 0:
            raise ValueError("pixel_values holds no images (batch size 0); pass at least one image")
        channels, height, width = pixel_values.shape[1:]
        if channels != self.config.num_channels:
            raise ValueError(f"pixel_values has {channels} channels; the model expects {self.config.num_channels}")
        if interpolate_pos_encoding:
            return
        grid = self.config.backbone_grid(height, width)
        patch = self.config.patch_size_hw
        if (grid[0] // patch[0], grid[1] // patch[1]) != self.patch_embeddings.grid_size:
            h, w = self.config.image_size_hw
            raise ValueError(
                f"input {height}×{width} gives a {grid[0]}×{grid[1]} feature grid but the position table is "
                f"{self.patch_embeddings.grid_size[0]}×{self.patch_embeddings.grid_size[1]}: resize inputs to "
                f"{h}×{w} (config.image_size) or pass interpolate_pos_encoding=True"
            )

    def interpolate_pos_encoding(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position table resized (bicubic) from the trained grid to `grid`, the backbone's real output grid.

        transformers derives the target from pixels // patch_size, which ignores the backbone's
        stride of 16 and never matches the token count; we take it from the feature map itself.
        """
        table = self.position_embeddings
        if grid == self.patch_embeddings.grid_size:
            return table
        gh, gw = self.patch_embeddings.grid_size
        dim = table.shape[-1]
        patch_table = table[:, 1:].reshape(1, gh, gw, dim).permute(0, 3, 1, 2).float()
        patch_table = nn.functional.interpolate(patch_table, size=grid, mode="bicubic", align_corners=False)
        patch_table = patch_table.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim).to(table.dtype)
        return torch.cat((table[:, :1], patch_table), dim=1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> torch.Tensor:
        self.check_input(pixel_values, interpolate_pos_encoding)
        tokens, grid = self.patch_embeddings(pixel_values)
        batch = tokens.shape[0]
        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise ValueError("bool_masked_pos needs a model built with use_mask_token=True")
            mask = bool_masked_pos.unsqueeze(-1).type_as(tokens)
            tokens = tokens * (1.0 - mask) + self.mask_token.expand(batch, tokens.shape[1], -1) * mask
        tokens = torch.cat((self.cls_token.expand(batch, -1, -1), tokens), dim=1)
        table = self.interpolate_pos_encoding(grid) if interpolate_pos_encoding else self.position_embeddings
        return self.dropout(tokens + table)


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: nn.Module, head_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit-softmax attention on (B, H, N, d): (context (B, H, N, d), probabilities (B, H, N, N)).

    The reference math, shared by the eager path and by fast modules serving output_attentions /
    head_mask calls. The scale goes on q (N·d values) rather than on the scores (N·N): one pass less.
    """
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
    probs = dropout(nn.functional.softmax(scores, dim=-1))
    if head_mask is not None:
        probs = probs * head_mask
    return torch.matmul(probs, v), probs


class ViTHybridSelfAttention(nn.Module):
    """Multi-head self-attention; `attn_implementation` picks explicit softmax ("eager") or SDPA."""

    def __init__(self, config: ViTHybridConfig) -> None:
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size, bias=config.qkv_bias)
        self.key = nn.Linear(config.hidden_size, self.all_head_size, bias=config.qkv_bias)
        self.value = nn.Linear(config.hidden_size, self.all_head_size, bias=config.qkv_bias)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.attn_implementation = config.attn_implementation

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return x.view(batch, tokens, self.num_attention_heads, self.attention_head_size).transpose(1, 2)  # (B, H, N, d)

    def forward(
        self, hidden_states: torch.Tensor, head_mask: torch.Tensor | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q = self.split_heads(self.query(hidden_states))
        k = self.split_heads(self.key(hidden_states))
        v = self.split_heads(self.value(hidden_states))
        probs = None
        # SDPA cannot return probabilities or apply a multiplicative head mask; those calls take the
        # eager path so their results are correct (transformers' SDPA path returns None / misuses the mask).
        if self.attn_implementation == "sdpa" and not output_attentions and head_mask is None:
            p = self.dropout.p if self.training else 0.0
            context = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:
            context, probs = eager_attention(q, k, v, self.dropout, head_mask)
        context = context.transpose(1, 2).reshape(hidden_states.shape[0], -1, self.all_head_size)  # (B, N, H·d)
        return context, (probs if output_attentions else None)


class ViTHybridSelfOutput(nn.Module):
    def __init__(self, config: ViTHybridConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(hidden_states))  # the residual is added by ViTHybridLayer


class ViTHybridAttention(nn.Module):
    def __init__(self, config: ViTHybridConfig) -> None:
        super().__init__()
        self.attention = ViTHybridSelfAttention(config)
        self.output = ViTHybridSelfOutput(config)

    def forward(
        self, hidden_states: torch.Tensor, head_mask: torch.Tensor | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        context, probs = self.attention(hidden_states, head_mask, output_attentions)
        return self.output(context, hidden_states), probs


class ViTHybridIntermediate(nn.Module):
    def __init__(self, config: ViTHybridConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = get_activation(config.hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class ViTHybridOutput(nn.Module):
    def __init__(self, config: ViTHybridConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(hidden_states)) + input_tensor


class ViTHybridLayer(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then h + mlp(LN(h))."""

    def __init__(self, config: ViTHybridConfig) -> None:
        super().__init__()
        self.attention = ViTHybridAttention(config)
        self.intermediate = ViTHybridIntermediate(config)
        self.output = ViTHybridOutput(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, hidden_states: torch.Tensor, head_mask: torch.Tensor | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attention_output, probs = self.attention(self.layernorm_before(hidden_states), head_mask, output_attentions)
        hidden_states = attention_output + hidden_states
        layer_output = self.output(self.intermediate(self.layernorm_after(hidden_states)), hidden_states)
        return layer_output, probs


class ViTHybridEncoder(nn.Module):
    def __init__(self, config: ViTHybridConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(ViTHybridLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False  # see vithybrid_fast.checkpointing
        self._gradient_checkpointing_func = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        all_states: list[torch.Tensor] = []
        all_probs: list[torch.Tensor] = []
        for i, layer in enumerate(self.layer):
            if output_hidden_states:
                all_states.append(hidden_states)
            mask = None if head_mask is None else head_mask[i]
            hidden_states, probs = call_layer(self, layer, hidden_states, mask, output_attentions)
            if output_attentions:
                all_probs.append(probs)
        if output_hidden_states:
            all_states.append(hidden_states)
        return (
            hidden_states,
            tuple(all_states) if output_hidden_states else None,
            tuple(all_probs) if output_attentions else None,
        )


class ViTHybridPooler(nn.Module):
    def __init__(self, config: ViTHybridConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


@torch.no_grad()
def init_parameter_(module: nn.Module, name: str, std: float) -> None:
    """transformers' initialization of the parameter `module.<name>`, in place: truncated normal (std
    initializer_range) for linear/conv weights and the [CLS] and position tables; ones for norm weights;
    zeros for biases and the mask token."""
    param = getattr(module, name)
    matrix = isinstance(module, (nn.Linear, nn.Conv2d)) and name == "weight"
    if matrix or name in ("position_embeddings", "cls_token"):
        nn.init.trunc_normal_(param, mean=0.0, std=std)
    elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)) and name == "weight":
        nn.init.ones_(param)
    elif name in ("bias", "mask_token"):
        nn.init.zeros_(param)
    else:
        raise ValueError(f"no initialization is defined for {type(module).__name__}.{name}")


class ViTHybridPreTrainedModel(nn.Module):
    """Shared behaviour: config, weight init, attention switch, dtype/device helpers."""

    config: ViTHybridConfig
    supports_gradient_checkpointing = True

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Training keeps only each encoder layer's and backbone layer's input and recomputes the
        rest in the backward pass: less memory (bigger batches) for about one more forward pass of time.
        `gradient_checkpointing_kwargs` go to `torch.utils.checkpoint.checkpoint` (`use_reentrant` defaults
        to False; see `vithybrid_fast.checkpointing` for how this differs from transformers)."""
        set_gradient_checkpointing(self, gradient_checkpointing_kwargs or {})

    def gradient_checkpointing_disable(self) -> None:
        set_gradient_checkpointing(self, None)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def init_weights(self, root: nn.Module | None = None) -> None:
        """transformers' initialization (truncated normal, std initializer_range) of `root` (default: all)."""
        for module in (self if root is None else root).modules():
            if isinstance(module, ViTHybridEmbeddings):
                names: tuple[str, ...] = ("position_embeddings", "cls_token")
            elif isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GroupNorm)):
                names = ("weight", "bias")
            else:
                continue
            for name in names:
                if getattr(module, name) is not None:
                    init_parameter_(module, name, self.config.initializer_range)

    def save_pretrained(
        self, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB", safe_serialization: bool = True
    ) -> Path:
        """Write config.json + weights in the Hugging Face layout (see `vithybrid_fast.saving`)."""
        from .saving import save_pretrained

        return save_pretrained(
            self, save_directory, max_shard_size=max_shard_size, safe_serialization=safe_serialization
        )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        config: ViTHybridConfig | None = None,
        torch_dtype: torch.dtype | str | None = None,
        attn_implementation: str | None = None,
        device_map: Any = None,
        **kwargs: Any,
    ) -> nn.Module:
        """`vithybrid_fast.load(name_or_path, **kwargs)`, as this class; transformers' arguments work too:
        torch_dtype, attn_implementation, config, device_map, config fields as keywords (num_labels=3,
        id2label=…) with ignore_mismatched_sizes=True for a new head (see `vithybrid_fast.hf_arguments`).

        `ViTHybridModel.from_pretrained` of a classification checkpoint gives its encoder (the head is
        dropped, as transformers does; it has no pooler, so `pooler_output` is None, where transformers adds
        an untrained one). A headless checkpoint gives a classifier only with ignore_mismatched_sizes=True.
        """
        import inspect

        from .hf_arguments import load_arguments
        from .loading import load

        output_loading_info = kwargs.pop("output_loading_info", False)
        add_pooling_layer = kwargs.pop("add_pooling_layer", True) if cls is ViTHybridModel else True
        hidden = {"name_or_path", "model_class", "config", "loading_info"}
        parameters = set(inspect.signature(load).parameters) - hidden
        arguments = load_arguments(kwargs, parameters, config, torch_dtype, attn_implementation, device_map)
        info = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        model = load(name_or_path, model_class=cls, loading_info=info, **arguments)
        encoder = getattr(model, "model", model)  # a CUDA-graph runner wraps the model (captures on first use)
        if not add_pooling_layer and encoder.pooler is not None:
            encoder.pooler = None  # transformers' ViTHybridModel(add_pooling_layer=False): its weights unused
            info["unexpected_keys"] += ["pooler.dense.weight", "pooler.dense.bias"]
        return (model, info) if output_loading_info else model

    def set_attn_implementation(self, implementation: str) -> None:
        if implementation not in ("eager", "sdpa"):
            raise ValueError(f"attention implementation {implementation!r}: choose 'eager' or 'sdpa'")
        self.config.attn_implementation = implementation
        for module in self.modules():
            if isinstance(module, ViTHybridSelfAttention):
                module.attn_implementation = implementation

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def expand_head_mask(self, head_mask: torch.Tensor | None) -> torch.Tensor | None:
        """(heads,) or (layers, heads) → (layers, 1, heads, 1, 1), multiplied into the probabilities; a
        5-D mask (layers, batch or 1, heads or 1, tokens or 1, tokens or 1) is taken as it is, as
        transformers takes it."""
        if head_mask is None:
            return None
        layers, heads = self.config.num_hidden_layers, self.config.num_attention_heads
        if head_mask.dim() == 5 and head_mask.shape[0] == layers:
            return head_mask.to(self.dtype)
        if head_mask.shape == (heads,):
            head_mask = head_mask.expand(layers, heads)
        if head_mask.shape != (layers, heads):
            raise ValueError(
                f"head_mask must be ({heads},), ({layers}, {heads}) or ({layers}, …) with 5 dimensions, got "
                f"{tuple(head_mask.shape)}"
            )
        return head_mask[:, None, :, None, None].to(self.dtype)


class ViTHybridModel(ViTHybridPreTrainedModel):
    def __init__(self, config: ViTHybridConfig, add_pooling_layer: bool = True, use_mask_token: bool = False):
        super().__init__()
        self.config = config
        self.embeddings = ViTHybridEmbeddings(config, use_mask_token=use_mask_token)
        self.encoder = ViTHybridEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = ViTHybridPooler(config) if add_pooling_layer else None
        self.init_weights()

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        cfg = self.config
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = cfg.return_dict if return_dict is None else return_dict
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        weight = self.embeddings.patch_embeddings.projection.weight
        if pixel_values.device != weight.device:
            raise ValueError(f"pixel_values is on {pixel_values.device} but the model is on {weight.device}")
        if pixel_values.is_floating_point() and pixel_values.dtype != weight.dtype:
            pixel_values = pixel_values.to(weight.dtype)
        embeddings = self.embeddings(pixel_values, bool_masked_pos, bool(interpolate_pos_encoding))
        sequence, states, attentions = self.encoder(
            embeddings, self.expand_head_mask(head_mask), output_attentions, output_hidden_states
        )
        sequence = self.layernorm(sequence)
        pooled = self.pooler(sequence) if self.pooler is not None else None
        out = BaseModelOutputWithPooling(sequence, pooled, states, attentions)
        return out if return_dict else out.to_tuple()


class ViTHybridForImageClassification(ViTHybridPreTrainedModel):
    def __init__(self, config: ViTHybridConfig) -> None:
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.vit = ViTHybridModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.init_weights(self.classifier)  # self.vit initialized itself

    def forward(
        self,
        pixel_values: torch.Tensor,
        head_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
    ) -> ImageClassifierOutput | tuple:
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.vit(
            pixel_values,
            head_mask=head_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=True,
        )
        logits = self.classifier(outputs.last_hidden_state[:, 0])
        loss = self.loss(logits, labels) if labels is not None else None
        out = ImageClassifierOutput(loss, logits, outputs.hidden_states, outputs.attentions)
        return out if return_dict else out.to_tuple()

    @staticmethod
    def _multi_label_shape_error(labels: torch.Tensor, logits: torch.Tensor, inferred: bool) -> str:
        message = f"multi-label targets must have the logits' shape {tuple(logits.shape)}, got {tuple(labels.shape)}"
        if inferred and labels.dim() == 1:  # most likely class indices of the wrong dtype
            message += (
                f": {labels.dtype} labels are read as multi-label targets (as transformers reads them: only "
                "int64 and int32 labels are class indices); give class indices as torch.long"
            )
        return message

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss by `config.problem_type`, inferred like transformers when unset (but not written back)."""
        labels = labels.to(logits.device)
        problem = self.config.problem_type
        if problem is None:
            if self.num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "regression":
            if self.num_labels == 1:
                return nn.functional.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
            return nn.functional.mse_loss(logits, labels.to(logits.dtype))
        if problem == "single_label_classification":
            if not labels.is_floating_point():  # int32 class indices: cross_entropy takes int64 only
                labels = labels.long()
            return nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        if labels.shape != logits.shape:
            raise ValueError(self._multi_label_shape_error(labels, logits, inferred=self.config.problem_type is None))
        return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
