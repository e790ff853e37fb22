"""Both commands under `torchrun --nproc-per-node 2` (gloo, CPU) against one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.image_folders import write_finetune_inputs
from vithybrid_fast.cli import main
from vithybrid_fast.distributed import DistContext, ShardSampler

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_finetune_inputs(tmp_path_factory.mktemp("ddp"), val_per_class=5)


def torchrun(*args: str, expect_failure: bool = False) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m vithybrid_fast ARGS` (a free port of its own)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "vithybrid_fast", *args]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert (done.returncode != 0) == expect_failure, done.stderr[-3000:]
    return done


def test_an_error_every_rank_hits_is_printed_once_and_named_in_torchruns_summary(tmp_path):
    missing = tmp_path / "no-checkpoint"
    done = torchrun("eval", str(tmp_path), "--model", str(missing), "--device", "cpu", expect_failure=True)
    message = f"error: {missing}: no such checkpoint directory"
    assert done.stderr.splitlines().count(message) == 1, done.stderr[-3000:]
    assert done.stderr.count(f"traceback : {message}") >= 1  # torchrun's summary, where it said "see the docs"


def test_report_error_under_torchrun(tmp_path, monkeypatch, capsys):
    from vithybrid_fast.cli import report_error

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    for rank, printed in (("1", ""), ("0", "error: bad\n")):
        monkeypatch.setenv("RANK", rank)
        report_error("error: bad")
        assert capsys.readouterr().err == printed
        assert json.loads(error_file.read_text())["message"] == "error: bad"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "no-such-dir" / "error.json"))
    report_error("error: said here")  # torchrun cannot be told: this rank says it itself
    assert capsys.readouterr().err == "error: said here\n"


def test_shard_sampler_covers_every_index_once_without_padding():
    shards = [list(ShardSampler(11, DistContext(rank, 3, rank, torch.device("cpu")))) for rank in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(11))
    assert [len(s) for s in shards] == [4, 4, 3]


def test_two_ranks_global_batch_8_give_the_weights_of_one_process_batch_8(root):
    common = ["finetune", str(root / "data"), "--model", str(root / "start"), "--epochs", "1", "--batch-size", "8",
              "--lr", "1e-3", "--kernels", "sdpa", "--num-workers", "0", "--device", "cpu"]  # fmt: skip
    # the ranks recompute activations in the backward pass (DDP's hooks fire in the recomputation too):
    # the same weights as one process that keeps them
    done = torchrun(*common, "--gradient-checkpointing", "--output-dir", str(root / "ddp"))
    assert "2 rank(s) on cpu" in done.stdout and done.stdout.count("val top-1: ") == 1  # rank 0 prints, once
    # one thread, as each rank has: on a 16-core machine a many-threaded conv backward sums in another
    # order, and Adam's first steps turn that rounding noise into weight differences over the tolerance
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*common, "--output-dir", str(root / "single")]) == 0
    finally:
        torch.set_num_threads(threads)
    ddp, single = (load_file(root / name / "last" / "model.safetensors") for name in ("ddp", "single"))
    start = load_file(root / "start" / "model.safetensors")
    moved = 0
    for key, tensor in single.items():
        if key.endswith("attention.attention.key.bias"):
            # its exact gradient is 0 (softmax ignores a constant per query), so Adam steps it by ±lr on
            # rounding noise, which differs with the summation order: at most 2·lr per step apart
            assert (ddp[key] - tensor).abs().max() <= 2 * 1e-3 * 3 + 1e-6, key
            continue
        # atol 1e-4 = a tenth of one Adam step (lr 1e-3): Adam turns gradient rounding into step noise on
        # weights whose gradients are tiny, and a 16-core machine sums in another order than 2 cores
        assert torch.allclose(ddp[key], tensor, rtol=1e-4, atol=1e-4), (key, (ddp[key] - tensor).abs().max())
        moved += start[key].shape != tensor.shape or not torch.allclose(tensor, start[key], atol=1e-4)
    assert moved > len(single) // 2  # three steps changed most tensors: the comparison is not vacuous
    log = [json.loads(line) for line in (root / "ddp" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["type"] == "step"] == [1, 2, 3]  # written once, by rank 0
    assert [r["val_images"] for r in log if r["type"] == "epoch"] == [15]


def test_eval_over_two_ranks_gives_exactly_the_single_process_counts(root, capsys):
    checkpoint = root / "ddp" / "last" if (root / "ddp" / "last").is_dir() else root / "start"
    args = ["eval", str(root / "data" / "val"), "--model", str(checkpoint), "--kernels", "sdpa", "--batch-size", "4",
            "--num-workers", "0", "--label-map", str(root / "map.json"), "--device", "cpu"]  # fmt: skip
    labels = json.loads((checkpoint / "config.json").read_text())["id2label"]
    classes = sorted(p.name for p in (root / "data" / "val").iterdir())
    (root / "map.json").write_text(json.dumps({c: int(i) for i, c in zip(sorted(labels, key=int), classes)}))
    done = torchrun(*args, "--output", str(root / "ddp.jsonl"))
    assert main([*args, "--output", str(root / "single.jsonl")]) == 0
    single_out = capsys.readouterr().out.splitlines()
    ddp_out = done.stdout.splitlines()
    assert ddp_out[-1] == single_out[-1] and ddp_out[-1].endswith("images: 15")
    table = [line for line in single_out if line.split()[0] in classes]
    assert len(table) == 3 and table == [line for line in ddp_out if line.split()[0] in classes]
    ddp_preds, single_preds = (
        [json.loads(line) for line in (root / name).read_text().splitlines()] for name in ("ddp.jsonl", "single.jsonl")
    )
    assert [(p["path"], p["label"]) for p in ddp_preds] == [(p["path"], p["label"]) for p in single_preds]
    assert [p["top_k"][0] for p in ddp_preds] == [p["top_k"][0] for p in single_preds]


def test_unreadable_files_of_every_rank_are_named_once_by_rank_0(tmp_path):
    """Under torchrun only rank 0 reported: the files of the other ranks' shards went unnamed (7 of 8 on
    8 GPUs), in eval and in finetune's validation alike."""
    from vithybrid_fast.data import image_folder_samples

    inputs = write_finetune_inputs(tmp_path, val_per_class=5)
    val = inputs / "data" / "val"
    last_class = sorted(p.name for p in val.iterdir())[-1]
    broken = val / last_class / "zz-broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    sources = [s.source for s in image_folder_samples(val)[0]]
    assert sources.index(str(broken)) % 2 == 1  # the second rank's shard (ShardSampler: every other sample)
    common = ["--model", str(inputs / "start"), "--kernels", "sdpa", "--num-workers", "0", "--device", "cpu",
              "--on-error", "skip"]  # fmt: skip
    labels = json.loads((inputs / "start" / "config.json").read_text())["id2label"]
    classes = sorted(p.name for p in val.iterdir())
    (tmp_path / "map.json").write_text(json.dumps({c: int(i) for i, c in zip(sorted(labels, key=int), classes)}))
    done = torchrun("eval", str(val), "--batch-size", "4", "--label-map", str(tmp_path / "map.json"), *common)
    assert done.stderr.count(f"warning: skipped unreadable image {broken}: ") == 1, done.stderr[-2000:]
    assert "skipped unreadable: 1" in done.stdout and done.stdout.splitlines()[-1].endswith("images: 15")
    done = torchrun("finetune", str(inputs / "data"), "--output-dir", str(tmp_path / "run"), "--epochs", "1",
                    "--batch-size", "8", *common)  # fmt: skip
    assert done.stderr.count(f"warning: skipped unreadable image {broken}: ") == 1, done.stderr[-2000:]


def test_sigterm_under_torchrun_stops_every_rank_at_one_step_and_resume_finishes(root, tmp_path):
    """torchrun forwards a SIGTERM to its workers: the ranks agree on one step, rank 0 saves it once."""
    out = tmp_path / "stopped"
    args = ["finetune", str(root / "data"), "--model", str(root / "start"), "--output-dir", str(out),
            "--epochs", "4", "--batch-size", "8", "--lr", "1e-3", "--kernels", "sdpa", "--num-workers", "1",
            "--device", "cpu"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "vithybrid_fast", *args]  # fmt: skip
    job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)  # fmt: skip
    log = out / "train_log.jsonl"
    try:
        deadline = time.monotonic() + 120
        while not (log.is_file() and log.read_text().strip()):
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()
            time.sleep(0.05)
        os.killpg(job.pid, signal.SIGTERM)  # a scheduler's way: the agent, its workers and their loaders
        _, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert stderr.count("stopped by SIGTERM after step") == 1, stderr[-3000:]  # rank 0 speaks, once
    state = torch.load(out / "last" / "training_state.pt", weights_only=True)
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if '"type": "step"' in line]
    assert 1 <= state["step"] < 12 and steps == list(range(1, state["step"] + 1))  # no rank ran ahead
    torchrun(*args, "--resume")
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if '"type": "step"' in line]
    assert steps == list(range(1, 13))


# -- the process group on GPUs: NCCL has no backend for CPU tensors, which evaluate() sums ---------------------
def _one_rank_group(backend: str, store_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group(backend, store=dist.FileStore(str(store_path), 1), rank=0, world_size=1)


def test_a_group_without_a_cpu_backend_cannot_sum_evaluates_cpu_counts(tmp_path):
    """What `finetune`/`eval` under torchrun on 2+ GPUs hit with backend "nccl": gloo registered for the cuda
    device type only stands in for it (the same device map); the CPU counts then have no backend."""
    import torch.distributed as dist

    from vithybrid_fast.distributed import all_reduce_sum

    _one_rank_group("cuda:gloo", tmp_path / "store")
    try:
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            all_reduce_sum(torch.zeros(3, dtype=torch.int64), DistContext(0, 2, 0, torch.device("cuda", 0)))
    finally:
        dist.destroy_process_group()


def test_a_group_with_gloo_for_cpu_tensors_sums_them(tmp_path):
    import torch.distributed as dist

    from vithybrid_fast.distributed import all_reduce_sum

    _one_rank_group("cpu:gloo,cuda:gloo", tmp_path / "store")  # as setup's "cpu:gloo,cuda:nccl", NCCL aside
    try:
        counts = torch.tensor([3, 1, 2], dtype=torch.int64)
        assert all_reduce_sum(counts, DistContext(0, 2, 0, torch.device("cuda", 0))).tolist() == [3, 1, 2]
    finally:
        dist.destroy_process_group()


def test_setup_on_gpus_asks_for_nccl_and_gloo_for_cpu_tensors(monkeypatch):
    import torch.distributed as dist

    from vithybrid_fast import distributed

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    asked = {}
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: asked.update(kwargs))
    ctx = distributed.setup("cuda")
    assert ctx.device == torch.device("cuda", 1) and (ctx.rank, ctx.world_size) == (1, 2)
    assert asked["backend"] == "cpu:gloo,cuda:nccl" and asked["device_id"] == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    asked.clear()
    assert distributed.setup("cpu").device == torch.device("cpu") and asked["backend"] == "gloo"
