"""save_pretrained(): a model → a checkpoint directory in the Hugging Face layout.

    config.json                      the config, with `architectures` and `torch_dtype` of what was saved
    model.safetensors                one file while the weights fit `max_shard_size`, else
    model-00001-of-0000N.safetensors + model.safetensors.index.json   (transformers' names and index)
    (pytorch_model*.bin and pytorch_model.bin.index.json with safe_serialization=False)

transformers 4.47.1's `from_pretrained` and our `load` read it. All files are written into a hidden
staging folder inside the directory first and moved into place together, config.json last, once every
one was written; weight files of an earlier save that the new one does not use are removed then. So a
failed save (a full disk at the second shard, an interrupt) leaves an earlier checkpoint there as it was,
never new shards beside old ones under the old index; the price is room for the whole new checkpoint
beside the old one while it is written. Every file, weights included, gets the
mode the umask gives a new file (0644 under umask 022), so other users can read a shared checkpoint
(safetensors alone writes 0600). The safetensors header carries
`{"format": "pt"}`, which transformers requires.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from .files import staged_files, write_atomic

_SIZE_UNITS = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip
# every weight-file name a save may have left: removed when a new save does not write it
_WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?$")


def parse_size(size: int | str) -> int:
    """Bytes in "5GB" (10⁹, as transformers counts), "500MiB" (2²⁰) or an int."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)\s*", str(size).upper())
        if match is None:
            raise ValueError(f"max_shard_size={size!r}: give bytes as an int or a string such as '5GB' or '500MiB'")
        value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy shards in key order; a tensor larger than max_bytes gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def _checked_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    for key, tensor in state.items():
        if tensor.device.type == "meta":
            raise ValueError(f"cannot save {key}: it is on the meta device (the model holds no weights)")
    config = model.config
    head = state.get("classifier.weight")
    if head is not None and head.shape[0] != len(config.id2label):
        raise ValueError(
            f"the classifier has {head.shape[0]} outputs but config.id2label names {len(config.id2label)} labels; "
            "set config.id2label/label2id to match before saving"
        )
    # one contiguous CPU copy per tensor: safetensors refuses views that share storage
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _write_weights(path: Path, shard: dict[str, torch.Tensor], safe: bool) -> None:
    if safe:
        from safetensors.torch import save_file

        write_atomic(path, lambda tmp: save_file(shard, str(tmp), metadata={"format": "pt"}))
    else:
        write_atomic(path, lambda tmp: torch.save(shard, tmp))


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    safe_serialization: bool = True,
) -> Path:
    """Write `model` (ours; patched or not) to `save_directory` in the HF layout; returns the directory."""
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file; save_pretrained needs a directory")
    max_bytes = parse_size(max_shard_size)
    state = _checked_state_dict(model)
    stem, ext = ("model", "safetensors") if safe_serialization else ("pytorch_model", "bin")
    shards = _shards(state, max_bytes)
    if len(shards) == 1:
        names = [f"{stem}.{ext}"]
    else:
        names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))]
    config = model.config
    config.architectures = [type(model).__name__]
    config.torch_dtype = str(next(iter(state.values())).dtype).removeprefix("torch.") if state else None

    def stale(written: list[str]) -> list[str]:  # an earlier save's weight files, and its crashed temporaries
        old = [p.name for p in directory.iterdir() if p.is_file() and p.name not in written]
        return [name for name in old if _WEIGHT_FILE.match(name) or name.removesuffix(".tmp") in written]

    with staged_files(directory, last="config.json", stale=stale) as staging:
        for name, shard in zip(names, shards):
            _write_weights(staging / name, shard, safe_serialization)
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                "weight_map": {key: name for name, shard in zip(names, shards) for key in shard},
            }
            text = json.dumps(index, indent=2) + "\n"
            write_atomic(staging / f"{stem}.{ext}.index.json", lambda tmp: tmp.write_text(text))
        write_atomic(staging / "config.json", lambda tmp: tmp.write_text(config.to_json_string()))
    return directory
