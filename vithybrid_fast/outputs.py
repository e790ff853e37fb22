"""Model outputs as transformers' ModelOutput behaves: a dict of the fields that are set (in field order),
with attribute access to every field, and tuple-style indexing over the set ones (`out[0]` is the logits,
or the loss when labels were given).

It is a dict because code written for ModelOutput asks: transformers' Trainer reads a non-dict output as a
tuple and, once its label smoother has taken the labels, found no logits at `outputs[1:]`; ported code
asking `if "loss" in outputs:` needs the mapping too."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


class _Output(dict):
    # The dataclass __init__ assigns every field as an attribute; __setattr__ mirrors the set ones into the
    # dict, and __setitem__ the other way, so `out.logits`, `out["logits"]` and `out[0]` always agree.
    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in self._field_names():
            if value is None:
                dict.pop(self, name, None)
            else:
                dict.__setitem__(self, name, value)

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self._field_names():
            raise KeyError(f"{type(self).__name__} has no field {key!r}")
        setattr(self, key, value)

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            return dict.__getitem__(self, key)
        return self.to_tuple()[key]

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self.values())

    def _field_names(self) -> Any:
        return type(self).__dataclass_fields__  # not dataclasses.fields(): torch.compile cannot trace that


@dataclass
class BaseModelOutputWithPooling(_Output):
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class ImageClassifierOutput(_Output):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
