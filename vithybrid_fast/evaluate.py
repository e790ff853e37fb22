"""`vithybrid-fast eval DATA --model M`: top-1 / top-5 accuracy of a classifier on labelled images.

    vithybrid-fast eval ./val --model google/vit-hybrid-base-bit-384 --batch-size 64 --num-workers 8
    torchrun --nproc-per-node 8 -m vithybrid_fast eval ./val --model ./finetuned/best --output preds.jsonl

DATA: an image folder (one subfolder per class), a `path,label` .csv / .jsonl list, or `hf:NAME[:SPLIT]`.
Each class name must equal one of the model's labels (`config.id2label`), or be mapped to one by
`--label-map map.json` ({"folder name": "model label" or label index}); a class that matches nothing is
an error naming it. Under torchrun every rank evaluates its own shard (no padding) and the counts are
summed exactly; only rank 0 prints and writes. The last line is `top-1: 0.xxxx  top-5: 0.xxxx  images: N`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

TOP_K = 5


def _rename_advice(source: str | None) -> tuple[str, str]:
    """(what to rename, what --label-map's keys are) for the kind of data `source` names."""
    from .data import is_list_file

    if source is not None and source.startswith("hf:"):
        return "the dataset's labels", "dataset label"
    if source is not None and is_list_file(source):
        return f"the labels in {source}", "label in the list"
    return "the folders", "folder name"


def match_labels(
    classes: Sequence[str],
    id2label: dict[int, str],
    label_map: dict[str, str | int] | None = None,
    source: str | None = None,
) -> list[int]:
    """The model's label index for each dataset class (exact name, or through `label_map`).

    source: the data spec (a folder, a .csv/.jsonl list or hf:NAME); the error's advice speaks of it.
    ImageNet-1k's own layout (`val/n01440764/…`, 1000 synset-id folders) matches an ImageNet-1k model's
    labels by sorted order, which is its label order.
    """
    synsets = synset_order(classes, id2label) if not label_map else None
    if synsets is not None:
        return synsets
    indices_of: dict[str, list[int]] = {}
    for index, name in sorted(id2label.items()):
        indices_of.setdefault(name, []).append(index)
    label_map = label_map or {}
    strays = sorted(set(label_map) - set(classes))
    if strays:  # a typo in a key leaves its class unmapped, and the error then blames the class, not the map
        _warn(f"--label-map names {len(strays)} class(es) the data does not have: {', '.join(map(repr, strays[:10]))}")
    targets, unmatched, ambiguous, out_of_range = [], [], [], []
    for name in classes:
        target = label_map.get(name, name)
        if isinstance(target, int) and not isinstance(target, bool):
            if target in id2label:
                targets.append(target)
            else:
                out_of_range.append(f"{name!r} (mapped to {target})")
        elif isinstance(target, str) and len(indices_of.get(target, ())) > 1:
            # ImageNet-1k names "crane" twice (134, the bird; 517, the machine): which one a class means
            # cannot be read from the name, and picking either scored every image of the other as wrong
            ambiguous.append(f"{target!r} (indices {', '.join(map(str, indices_of[target]))})")
        elif isinstance(target, str) and target in indices_of:
            targets.append(indices_of[target][0])
        else:
            unmatched.append(repr(name) if target == name else f"{name!r} (mapped to {target!r})")
    if out_of_range:
        raise ValueError(
            f"--label-map maps {', '.join(out_of_range)} to no label index of the model: its indices are "
            f"0–{len(id2label) - 1}"
        )
    if ambiguous:
        _, key = _rename_advice(source)
        raise ValueError(
            f"the model has more than one label named {', '.join(ambiguous)}: pass --label-map map.json "
            f'mapping each such {key} to the label index it means ({{"{key}": index}})'
        )
    if unmatched:
        sample = ", ".join(repr(v) for v in list(id2label.values())[:3])
        rename, key = _rename_advice(source)
        named = ", ".join(unmatched[:10]) + (f" and {len(unmatched) - 10} more" if len(unmatched) > 10 else "")
        raise ValueError(
            f"{len(unmatched)} class(es) match no label of the model: {named}. "
            f"Rename {rename} to the model's labels (e.g. {sample}) or pass --label-map map.json "
            f'({{"{key}": "model label" or label index}})'
        )
    return targets


SYNSET_ID = re.compile(r"n\d{8}")


def synset_order(classes: Sequence[str], id2label: dict[int, str]) -> list[int] | None:
    """The label index of each class when the classes are ImageNet-1k synset ids and the model classifies
    ImageNet-1k (its labels are the 1000 of vithybrid_fast/assets): every ImageNet-1k classifier orders its
    labels as the sorted synset ids (0 = n01440764, "tench, Tinca tinca"). None for any other data."""
    from .config import imagenet_labels

    if not classes or not all(SYNSET_ID.fullmatch(name) for name in classes):
        return None
    if [id2label.get(i) for i in range(len(id2label))] != imagenet_labels():
        return None
    if len(set(classes)) != 1000:  # the order of a subset's ids says nothing of their indices
        raise ValueError(
            f"the {len(set(classes))} classes are ImageNet synset ids (e.g. {classes[0]!r}), but not all 1000 of "
            "ImageNet-1k, whose sorted order gives the label indices: pass --label-map map.json "
            '({"n01440764": 0, ...}) or evaluate on the whole validation set'
        )
    order = {name: index for index, name in enumerate(sorted(classes))}
    _warn("the classes are ImageNet-1k's 1000 synset ids: matched to the model's labels by their sorted order")
    return [order[name] for name in classes]


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


@dataclass
class EvalResult:
    """Counts summed over every rank; per-class rows are indexed by dataset class."""

    classes: list[str]
    total: int = 0
    top1: int = 0
    top5: int = 0
    loss_sum: float = 0.0
    skipped: int = 0
    seconds: float = 0.0
    class_total: list[int] = field(default_factory=list)
    class_top1: list[int] = field(default_factory=list)
    class_top5: list[int] = field(default_factory=list)
    predictions: list[dict[str, Any]] = field(default_factory=list)  # rank 0, when asked for
    stopped: bool = False  # `should_stop` ended this rank's pass early: the counts are partial

    @property
    def top1_accuracy(self) -> float:
        return self.top1 / self.total if self.total else 0.0

    @property
    def top5_accuracy(self) -> float:
        return self.top5 / self.total if self.total else 0.0

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.total if self.total else float("nan")

    def summary_line(self) -> str:
        return f"top-1: {self.top1_accuracy:.4f}  top-5: {self.top5_accuracy:.4f}  images: {self.total}"

    def table(self) -> str:
        width = max([len("class"), *(len(c) for c in self.classes)])
        lines = [f"{'class':<{width}}  {'images':>7}  {'top-1':>6}  {'top-5':>6}"]
        for name, n, t1, t5 in zip(self.classes, self.class_total, self.class_top1, self.class_top5):
            a1, a5 = (f"{t1 / n:.4f}", f"{t5 / n:.4f}") if n else ("-", "-")
            lines.append(f"{name:<{width}}  {n:>7}  {a1:>6}  {a5:>6}")
        return "\n".join(lines)


def evaluate(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    ctx: Any,
    targets: Sequence[int] | None = None,
    on_error: str = "fail",
    autocast_dtype: torch.dtype | None = None,
    with_predictions: bool = False,
    id2label: dict[int, str] | None = None,
    progress: Callable[[Any], Any] | None = None,
    should_stop: Callable[[], bool] | None = None,
    report: Callable[[str], None] | None = None,
) -> EvalResult:
    """Run `model` over `loader` (a ShardSampler shard per rank) and sum the counts over ranks.

    targets: the model's label index per dataset class (None: the same indices). The returned counts
    and loss are global; `predictions` (rank 0) holds one dict per image, in dataset order.
    should_stop: asked (locally, no collective: shards differ in length) before each batch; True ends
    this rank's pass (`stopped`). report: where unreadable files are reported (called on every rank);
    by default rank 0 prints its own at once and the other ranks' when the pass ends.
    """
    from .data import split_errors
    from .distributed import all_reduce_sum, gather_objects
    from .train_state import lost_to_stop

    dataset = loader.dataset
    classes = list(dataset.classes)
    target_of = torch.tensor(list(range(len(classes))) if targets is None else list(targets), dtype=torch.long)
    device = ctx.device
    # [total, top1, top5] per dataset class, then skipped; int64 so the sum over ranks is exact
    counts = torch.zeros(3 * len(classes) + 1, dtype=torch.int64)
    loss_sum = torch.zeros(1, dtype=torch.float64)
    predictions: list[dict[str, Any]] = []
    was_training = model.training
    model.eval()
    deferred: list[str] = []  # a rank > 0's unreadable files, for rank 0 to name after the pass
    own_report = report is None  # alike on every rank, so all or none join the gather below
    if own_report:
        report = _warn if ctx.is_main else deferred.append
    stopped = False
    start = time.perf_counter()
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype not in (None, torch.float32) else None
    )
    batches = progress(loader) if progress is not None else loader
    with torch.inference_mode():
        try:
            for batch in batches:
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                counts[-1] += len(split_errors(batch, on_error, report))
                if batch["pixels"] is None:
                    continue
                pixels = dataset.pipeline.normalize(dataset.pipeline.finish(batch["pixels"], device))
                labels = batch["labels"]
                with autocast or nullcontext():
                    logits = model(pixels.to(next(model.parameters()).dtype)).logits.float().cpu()
                model_labels = target_of[labels]
                loss_sum += torch.nn.functional.cross_entropy(logits, model_labels, reduction="sum").double()
                ranked = logits.topk(min(TOP_K, logits.shape[-1]), dim=-1).indices
                hit1 = ranked[:, 0] == model_labels
                hit5 = (ranked == model_labels[:, None]).any(dim=-1)
                for column, hits in enumerate((torch.ones_like(hit1), hit1, hit5)):
                    counts[: 3 * len(classes)].view(len(classes), 3)[:, column] += torch.bincount(
                        labels[hits], minlength=len(classes)
                    )
                if with_predictions:
                    probs = logits.softmax(dim=-1).gather(1, ranked)
                    names = id2label or {}
                    for i, label, idx_row, prob_row in zip(batch["indices"], labels, ranked, probs):
                        predictions.append(
                            {
                                "index": int(i),
                                "path": dataset.samples[int(i)].source,
                                "label": classes[int(label)],
                                "top_k": [names.get(int(j), str(int(j))) for j in idx_row],
                                "probs": [round(float(p), 6) for p in prob_row],
                            }
                        )
        except RuntimeError as error:
            if not lost_to_stop(error, should_stop is not None and should_stop()):
                raise
            stopped = True  # a worker the stop signal killed as it started: abandoned as asked
    all_reduce_sum(counts, ctx)
    all_reduce_sum(loss_sum, ctx)
    if own_report and ctx.enabled:
        for messages in gather_objects(deferred, ctx)[1:]:
            for message in messages if ctx.is_main else ():
                _warn(message)
    if with_predictions:
        gathered = gather_objects(predictions, ctx)
        predictions = sorted((p for rank_preds in gathered for p in rank_preds), key=lambda p: p["index"])
    model.train(was_training)
    per_class = counts[: 3 * len(classes)].view(len(classes), 3).tolist()
    return EvalResult(
        classes=classes,
        total=sum(row[0] for row in per_class),
        top1=sum(row[1] for row in per_class),
        top5=sum(row[2] for row in per_class),
        loss_sum=float(loss_sum.item()),
        skipped=int(counts[-1]),
        seconds=time.perf_counter() - start,
        class_total=[row[0] for row in per_class],
        class_top1=[row[1] for row in per_class],
        class_top5=[row[2] for row in per_class],
        predictions=predictions if ctx.is_main else [],
        stopped=stopped,
    )


def make_loader(dataset: Any, batch_size: int, num_workers: int, ctx: Any, sampler: Any = None):
    from .data import collate
    from .distributed import ShardSampler
    from .train_state import StopSafeLoader

    # its workers outlive a job-wide SIGTERM, so a run that is stopping can save
    return StopSafeLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler if sampler is not None else ShardSampler(len(dataset), ctx),
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=False,
        # no draw from the global generator when an iteration starts: validating inside a fine-tuning
        # run leaves its random stream (dropout) as it found it, so a resumed run continues it exactly
        generator=torch.Generator(),
    )


def progress_bar(ctx: Any, desc: str, **extra: Any) -> Callable[[Any], Any] | None:
    """tqdm over an iterable on rank 0 when stderr is a terminal; None (no bar) otherwise."""
    if not ctx.is_main or not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return lambda iterable: tqdm(iterable, desc=desc, dynamic_ncols=True, **extra)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags `eval` and `finetune` share."""
    from .cli import _positive_int, int_at_least
    from .distributed import MAX_DEFAULT_WORKERS, default_num_workers
    from .gpu_support import KERNELS_HELP, device_argument
    from .images import add_pixel_limit_argument

    parser.add_argument(
        "--batch-size", type=_positive_int, default=64, help="images per step, over all ranks (default: %(default)s)"
    )
    workers = default_num_workers()
    parser.add_argument(
        "--num-workers",
        type=int_at_least(0, "0: load in the main process"),
        default=workers,
        help=f"DataLoader worker processes per rank (default here: {workers} = min({MAX_DEFAULT_WORKERS}, "
        "CPUs usable))",
    )
    parser.add_argument(
        "--kernels", default="auto", choices=["auto", "eager", "sdpa", "triton"],
        help=KERNELS_HELP,
    )  # fmt: skip
    parser.add_argument(
        "--device",
        default=None,
        type=device_argument,
        help="cpu, cuda (default: cuda when available; torchrun: per rank)",
    )
    add_pixel_limit_argument(parser)
    parser.add_argument("--image-column", default="image", help="hf: datasets only (default: %(default)s)")
    parser.add_argument("--label-column", default="label", help="hf: datasets only (default: %(default)s)")
    parser.add_argument(
        "--on-error",
        default="fail",
        choices=["fail", "skip"],
        help="an unreadable image file: stop, or report it and skip it (default: %(default)s)",
    )


def register(subparsers: Any) -> None:
    from .cli import DTYPE_NAMES, HUB_ID

    parser = subparsers.add_parser(
        "eval", help="top-1/top-5 accuracy on labelled images", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "data",
        help="image folder (class subfolders), .csv/.jsonl list (relative paths in it are relative to the list "
        "file's folder), or hf:NAME[:SPLIT]",
    )
    parser.add_argument(
        "--model", default=HUB_ID, help="hub repo id or local checkpoint directory (default: %(default)s)"
    )
    add_common_arguments(parser)
    parser.add_argument(
        "--dtype", default="float32", choices=DTYPE_NAMES, help="dtype of the model's weights (default: %(default)s)"
    )
    parser.add_argument("--label-map", type=Path, help='JSON {"folder name or list label": "model label" or index}')
    parser.add_argument(
        "--output", type=Path, help="write one JSON line per image (path, label, top-5, probs); checked before the run"
    )
    parser.add_argument(
        "--resize-on", default="cpu", choices=["cpu", "device"],
        help="where images are resized and cropped: in the DataLoader workers (cpu), or on the model's device "
        "with Pillow's arithmetic, the same bytes, so that the workers only decode (device). Default: %(default)s",
    )  # fmt: skip
    parser.set_defaults(func=run)


def _read_label_map(path: Path | None) -> dict[str, str | int] | None:
    if path is None:
        return None
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--label-map {path}: not valid JSON ({err})") from None
    except OSError as err:  # missing, a folder, unreadable: the flag named, not a bare "[Errno 2] …"
        raise ValueError(f"--label-map {path}: cannot read it ({err.strerror or err})") from None
    if not isinstance(mapping, dict):
        raise ValueError(f"--label-map {path}: expected a JSON object {{folder: label}}")
    return mapping


def run(args: argparse.Namespace) -> int:
    from . import distributed
    from .cli import _processor_for
    from .data import ImagePipeline, check_source, open_dataset
    from .files import check_writable_file, write_atomic
    from .loading import load
    from .modeling import ViTHybridForImageClassification
    from .patching import patched_modules

    ctx = distributed.setup(args.device)
    try:
        label_map = _read_label_map(args.label_map)
        if ctx.is_main and args.output is not None:  # before the run: a bad path must not cost an evaluation
            check_writable_file(args.output, "--output")
        check_source(args.data)  # before the model: a typo in DATA must not cost a 400 MB load first
        model = load(
            args.model, kernels=args.kernels, dtype=args.dtype, device=ctx.device,
            model_class=ViTHybridForImageClassification,
        )  # fmt: skip
        pipeline = ImagePipeline(_processor_for(args.model, model.config), resize_on=args.resize_on)
        dataset = open_dataset(
            args.data, pipeline, split="validation", image_column=args.image_column, label_column=args.label_column
        )
        targets = match_labels(dataset.classes, model.config.id2label, label_map, source=str(args.data))
        per_rank = max(1, args.batch_size // ctx.world_size)
        loader = make_loader(dataset, per_rank, args.num_workers, ctx)
        result = evaluate(
            model, loader, ctx, targets, on_error=args.on_error, with_predictions=args.output is not None,
            id2label=model.config.id2label, progress=progress_bar(ctx, "eval", unit="batch"),
        )  # fmt: skip
        if result.total == 0:  # a top-1 of 0 over no image would pass for a result
            raise RuntimeError(f"none of the {result.skipped} images of {args.data} could be read")
        if not math.isfinite(result.mean_loss):  # NaN logits rank label 0 first: a believable top-1 for nothing
            half = args.dtype == "float16"
            overflow = " or float16 overflows in it (try --dtype bfloat16 or float32)" if half else ""
            raise RuntimeError(
                f"{args.model} gives NaN or infinite logits (mean loss {result.mean_loss}): its weights are broken "
                f"(a diverged fine-tuning run?){overflow}; no accuracy is reported"
            )
        if ctx.is_main:
            print(result.table())
            kernels = args.kernels
            if kernels == "auto":  # say what ran, as finetune does
                kernels += " (per op the faster of triton and torch)" if patched_modules(model) else " (sdpa here)"
            print(f"model: {args.model}  kernels: {kernels}  dtype: {args.dtype}  ranks: {ctx.world_size}")
            rate = result.total / result.seconds if result.seconds else 0.0
            print(f"images/s: {rate:.1f}  loss: {result.mean_loss:.4f}  skipped unreadable: {result.skipped}")
            if len(model.config.id2label) <= TOP_K:  # every label is among the top 5: no measure at all
                print(f"top-5 is 1 by definition: the model has {len(model.config.id2label)} labels")
            if args.output is not None:  # after the results are printed: a failed write cannot lose them
                lines = [json.dumps({k: v for k, v in p.items() if k != "index"}) + "\n" for p in result.predictions]
                try:
                    write_atomic(args.output, lambda tmp: tmp.write_text("".join(lines), encoding="utf-8"))
                except OSError as err:  # said of --output, not of the temporary file beside it
                    raise OSError(f"--output {args.output}: the predictions could not be written "
                                  f"({err.strerror or err})") from None  # fmt: skip
                print(f"predictions: {args.output}")
            print(result.summary_line())
        return 0
    finally:
        distributed.teardown()
