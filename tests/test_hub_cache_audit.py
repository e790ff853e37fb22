"""Loading a hub model from the Hugging Face cache every way users do, with the network forbidden.

The caches are laid out as huggingface_hub writes them: blobs/<sha256>, snapshots/<commit>/<file> as
relative links into blobs, refs/<branch or tag> holding the commit, .no_exist/<commit>/<file> markers.
Each case checks what loads (and from which snapshot), what the error says (what was looked for, where,
what to do), and that the offline paths never touch the network.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
import threading
import time
import types
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants  # imported before any env var is set: huggingface_hub froze its own view
import pytest
import requests
import torch
from safetensors.torch import load_file, save_file

import vithybrid_fast as vf
from tests.hf_reference import tiny_config
from tests.hub_calls import record_hub_downloads
from vithybrid_fast import hub

REPO_ID = "google/vit-hybrid-base-bit-384"
OLD, NEW = "1" * 40, "2" * 40
HUB_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME")
PROXY_ENV = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


# -- checkpoints and caches ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """One tiny model saved as safetensors, .bin and shards, plus a copy with other weights ("other")."""
    torch.manual_seed(0)
    model = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(tiny_config()))
    root = tmp_path_factory.mktemp("sources")
    model.save_pretrained(root / "safetensors")
    model.save_pretrained(root / "bin", safe_serialization=False)
    model.save_pretrained(root / "sharded", max_shard_size="200KB")
    vf.ViTHybridImageProcessor.for_base_384().save_pretrained(root / "safetensors")
    other = {k: v + 1.0 for k, v in load_file(root / "safetensors" / "model.safetensors").items()}
    (root / "other").mkdir()
    save_file(other, root / "other" / "model.safetensors", metadata={"format": "pt"})
    return {name: root / name for name in ("safetensors", "bin", "sharded", "other")}


def repo_dir(cache: Path) -> Path:
    return cache / f"models--{REPO_ID.replace('/', '--')}"


def add_snapshot(cache: Path, commit: str, files: dict[str, Path], refs: tuple[str, ...] = ("main",)) -> Path:
    """Store `files` (name → source file) as blobs linked from snapshots/<commit>; point `refs` at it."""
    repo = repo_dir(cache)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def files_of(directory: Path, *names: str) -> dict[str, Path]:
    return {name: directory / name for name in names or sorted(p.name for p in directory.iterdir())}


def complete_cache(cache: Path, sources: dict[str, Path]) -> Path:
    names = ("config.json", "model.safetensors", "preprocessor_config.json")
    return add_snapshot(cache, OLD, files_of(sources["safetensors"], *names))


def same_weights(model: torch.nn.Module, source: Path) -> bool:
    expected = load_file(source)
    return all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


# -- the network, forbidden and recorded -----------------------------------------------------------
@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt is recorded and fails; the hub probe is forgotten; no env var leaks in."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError(101, "Network is unreachable (forbidden by the test)")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(requests.Session, "request", refuse)
    monkeypatch.setattr(hub, "_REACHABILITY", {})
    for var in HUB_ENV + PROXY_ENV:
        monkeypatch.delenv(var, raising=False)
    return attempts


@pytest.fixture
def downloads(monkeypatch):
    return record_hub_downloads(monkeypatch)


# -- revisions -------------------------------------------------------------------------------------
@pytest.mark.parametrize("revision", [None, "main", "v1.0", OLD])  # default, branch, tag, full commit
def test_every_revision_form_loads_from_the_cache_without_the_network(tmp_path, sources, no_network, revision):
    complete_cache(tmp_path, sources)
    (repo_dir(tmp_path) / "refs" / "v1.0").write_text(OLD)  # a tag is a ref file like a branch
    kwargs = {"revision": revision, "cache_dir": tmp_path, "local_files_only": True, "token": "hf_unused"}
    model = vf.load(REPO_ID, kernels="eager", **kwargs)
    assert same_weights(model, sources["safetensors"] / "model.safetensors")
    assert vf.ViTHybridConfig.from_pretrained(REPO_ID, **kwargs).hidden_size == 48
    assert vf.ViTHybridImageProcessor.from_pretrained(REPO_ID, **kwargs).crop_size is not None
    assert vf.ViTHybridForImageClassification.from_pretrained(REPO_ID, kernels="eager", **kwargs) is not None
    assert no_network == []


def test_a_short_commit_hash_is_refused_naming_the_full_one(tmp_path, sources, no_network):
    # the hub itself takes only full hashes; the error must say so and name the cached commit meant
    complete_cache(tmp_path, sources)
    with pytest.raises(vf.CheckpointNotFoundError) as info:
        vf.load(REPO_ID, cache_dir=tmp_path, local_files_only=True, revision=OLD[:7])
    message = str(info.value)
    assert f"at revision {OLD[:7]}" in message and "40 hex digits" in message and OLD in message


def test_an_uncached_tag_says_which_revisions_the_cache_has(tmp_path, sources, no_network):
    complete_cache(tmp_path, sources)
    with pytest.raises(vf.CheckpointNotFoundError) as info:
        vf.ViTHybridConfig.from_pretrained(REPO_ID, cache_dir=tmp_path, local_files_only=True, revision="v2.0")
    message = str(info.value)
    assert "at revision v2.0" in message and "the cache has no revision v2.0" in message
    assert f"main → {OLD[:12]}" in message and "local_files_only=False" in message


# -- where the cache is and whether we are offline: read at call time ------------------------------
@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_cache_location_set_after_import_is_used(tmp_path, sources, no_network, monkeypatch, variable):
    assert "huggingface_hub.constants" in sys.modules  # so the variable comes too late for it
    cache = tmp_path / "hub" if variable == "HF_HOME" else tmp_path
    complete_cache(cache, sources)
    monkeypatch.setenv(variable, str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = vf.load(REPO_ID, kernels="eager")
    assert same_weights(model, sources["safetensors"] / "model.safetensors")


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_variables_set_after_import_touch_no_network(tmp_path, sources, no_network, monkeypatch, variable):
    complete_cache(tmp_path, sources)
    monkeypatch.setenv(variable, "1")  # huggingface_hub honours both, but read them only at its import
    vf.load(REPO_ID, kernels="eager", cache_dir=tmp_path)
    vf.load_processor(REPO_ID, cache_dir=tmp_path)
    assert no_network == []
    with pytest.raises(vf.CheckpointNotFoundError, match=f"{variable} is set.*unset {variable}"):
        vf.load("someone/not-cached", cache_dir=tmp_path)
    assert no_network == []


# -- cache states ----------------------------------------------------------------------------------
def test_config_cached_without_weights_names_every_weight_file_and_the_snapshot(tmp_path, sources, no_network):
    add_snapshot(tmp_path, OLD, files_of(sources["safetensors"], "config.json"))
    with pytest.raises(vf.CheckpointNotFoundError) as info:
        vf.load(REPO_ID, cache_dir=tmp_path, local_files_only=True)
    message = str(info.value)
    expected = "weight file model.safetensors (or model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin"
    assert message.startswith(f"{expected}.index.json) of {REPO_ID} at revision {OLD} is not in the local")
    assert f"snapshot {OLD} lacks it" in message and str(tmp_path) in message
    assert no_network == []


def test_no_exist_marker_for_safetensors_loads_the_cached_bin(tmp_path, sources, no_network):
    add_snapshot(tmp_path, OLD, files_of(sources["bin"], "config.json", "pytorch_model.bin"))
    for name in ("model.safetensors", "model.safetensors.index.json"):
        marker = repo_dir(tmp_path) / ".no_exist" / OLD / name
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    model = vf.load(REPO_ID, kernels="eager", cache_dir=tmp_path, local_files_only=True)
    assert same_weights(model, sources["safetensors"] / "model.safetensors")


def test_a_shard_missing_from_the_cache_is_named(tmp_path, sources, no_network):
    files = files_of(sources["sharded"])
    shards = sorted(name for name in files if name.startswith("model-"))
    add_snapshot(tmp_path, OLD, {k: v for k, v in files.items() if k != shards[-1]})
    with pytest.raises(vf.CheckpointNotFoundError) as info:
        vf.load(REPO_ID, cache_dir=tmp_path, local_files_only=True)
    assert str(info.value).startswith(f"{shards[-1]} of {REPO_ID}") and f"snapshot {OLD} lacks it" in str(info.value)


def test_an_interrupted_download_is_mentioned(tmp_path, sources, no_network):
    add_snapshot(tmp_path, OLD, files_of(sources["safetensors"], "config.json"))
    (repo_dir(tmp_path) / "blobs" / f"{'ab' * 32}.incomplete").write_bytes(b"\0" * 64)
    with pytest.raises(vf.CheckpointNotFoundError, match=r"1 interrupted download\(s\)"):
        vf.load(REPO_ID, cache_dir=tmp_path, local_files_only=True)


def test_a_broken_link_is_named_as_such(tmp_path, sources, no_network):
    snapshot = complete_cache(tmp_path, sources)
    (snapshot / "model.safetensors").resolve().unlink()  # the blob is gone, the link stays
    with pytest.raises(vf.CheckpointNotFoundError) as info:
        vf.load(REPO_ID, cache_dir=tmp_path, local_files_only=True)
    assert "broken link" in str(info.value) and str(snapshot / "model.safetensors") in str(info.value)


def test_a_broken_link_beside_a_cached_bin_loads_the_bin_and_warns(tmp_path, sources, no_network, caplog):
    snapshot = complete_cache(tmp_path, sources)
    add_snapshot(tmp_path, OLD, files_of(sources["bin"], "pytorch_model.bin"))
    (snapshot / "model.safetensors").resolve().unlink()
    with caplog.at_level(logging.WARNING, logger="vithybrid_fast.hub"):
        model = vf.load(REPO_ID, kernels="eager", cache_dir=tmp_path, local_files_only=True)
    assert same_weights(model, sources["safetensors"] / "model.safetensors")  # the same commit's weights
    assert "broken link" in caplog.text


# -- two snapshots: never mixed --------------------------------------------------------------------
@pytest.mark.parametrize("offline_by", ["local_files_only", "HF_HUB_OFFLINE"])
def test_refs_main_moving_mid_load_never_mixes_snapshots(tmp_path, sources, no_network, monkeypatch, offline_by):
    # refs/main → OLD when the load starts; another process then downloads NEW (other weights, same
    # architecture) and moves refs/main, as `hf download` does. The weights must stay OLD's.
    complete_cache(tmp_path, sources)
    add_snapshot(tmp_path, NEW, {**files_of(sources["safetensors"], "config.json"), **files_of(sources["other"])},
                 refs=())  # fmt: skip
    real = huggingface_hub.hf_hub_download

    def download_then_move_main(**kwargs):
        path = real(**kwargs)
        (repo_dir(tmp_path) / "refs" / "main").write_text(NEW)
        return path

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download_then_move_main)
    if offline_by == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = vf.load(REPO_ID, kernels="eager", cache_dir=tmp_path, local_files_only=offline_by == "local_files_only")
    assert same_weights(model, sources["safetensors"] / "model.safetensors")
    assert not same_weights(model, sources["other"] / "model.safetensors")


def test_classify_reads_the_processor_of_the_models_commit(tmp_path, sources, no_network, monkeypatch, capsys):
    # refs/main moves to NEW (other normalization) after the model is read and before `classify` reads
    # preprocessor_config.json: the processor must still be OLD's, the one the weights were trained with.
    from PIL import Image

    from vithybrid_fast import processing
    from vithybrid_fast.cli import main

    for commit, mean in ((OLD, [0.5, 0.5, 0.5]), (NEW, [0.1, 0.2, 0.3])):
        folder = tmp_path / f"processor-{commit[0]}"
        vf.ViTHybridImageProcessor.for_base_384(size={"shortest_edge": 72}, crop_size={"height": 72, "width": 72},
                                                image_mean=mean).save_pretrained(folder)  # fmt: skip
        files = {**files_of(sources["safetensors"], "config.json", "model.safetensors"),
                 **files_of(folder, "preprocessor_config.json")}  # fmt: skip
        add_snapshot(tmp_path / "cache", commit, files, refs=("main",) if commit == OLD else ())
    real_load_model, processors = vf.loading.load_model, []

    def load_model_then_move_main(*args, **kwargs):
        model = real_load_model(*args, **kwargs)
        (repo_dir(tmp_path / "cache") / "refs" / "main").write_text(NEW)
        return model

    def recording(load):
        return lambda *args, **kwargs: processors.append(load(*args, **kwargs)) or processors[-1]

    monkeypatch.setattr(vf.loading, "load_model", load_model_then_move_main)
    monkeypatch.setattr(processing, "load_processor", recording(processing.load_processor))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    image = tmp_path / "red.png"
    Image.new("RGB", (80, 90), (200, 30, 60)).save(image)
    assert main(["classify", str(image), "--model", REPO_ID, "--kernels", "eager", "--device", "cpu"]) == 0
    assert "class_" in capsys.readouterr().out
    assert [p.image_mean for p in processors] == [[0.5, 0.5, 0.5]]  # before: NEW's [0.1, 0.2, 0.3]


def test_weights_and_shards_are_asked_for_at_the_configs_commit(tmp_path, sources, no_network, downloads):
    add_snapshot(tmp_path, OLD, files_of(sources["sharded"]))
    vf.load(REPO_ID, kernels="eager", cache_dir=tmp_path, local_files_only=True)
    assert downloads[0]["filename"] == "config.json" and downloads[0]["revision"] is None
    assert len(downloads) > 3 and all(call["revision"] == OLD for call in downloads[1:])


# -- an unreachable hub: one quick check, no retries -----------------------------------------------
def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_dead_proxy_counts_as_an_unreachable_hub(tmp_path, monkeypatch, downloads):
    for var in HUB_ENV + PROXY_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "_REACHABILITY", {})
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{_closed_port()}")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(vf.CheckpointNotFoundError, match=r"the hub is unreachable \(proxy 127\.0\.0\.1:"):
        vf.load("someone/not-cached", cache_dir=tmp_path)
    assert time.monotonic() - start < 5  # not huggingface_hub's ~24 s of retries per file
    assert downloads and all(call["local_files_only"] for call in downloads)


def test_the_reachability_probe_is_bounded_when_the_lookup_hangs(monkeypatch):
    for var in PROXY_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "_REACHABILITY", {})
    monkeypatch.setattr(hub, "PROBE_TIMEOUT_S", 0.2)
    released = threading.Event()

    def hanging_lookup(*args, **kwargs):  # a dead DNS resolver: getaddrinfo ignores socket timeouts
        released.wait(10)
        raise OSError("lookup gave up")

    monkeypatch.setattr(socket, "create_connection", hanging_lookup)
    start = time.monotonic()
    try:
        reason = hub.hub_unreachable_reason()
    finally:
        released.set()
    assert time.monotonic() - start < 2 and "no answer within 0.2 s" in reason


# huggingface_hub 0.x speaks HTTP through requests (1.x through httpx): the fakes below patch requests
requests_hub = pytest.mark.skipif(not huggingface_hub.__version__.startswith("0."), reason="huggingface_hub 0.x only")


@pytest.fixture
def hub_failing_after_the_probe(monkeypatch):
    """The probe connects, then every HTTP request fails (a hub outage); retries cost no time here."""
    requests_made: list[str] = []

    def fail(self, method, url, *args, **kwargs):
        requests_made.append(f"{method} {url}")
        raise requests.exceptions.ConnectionError("connection reset by the hub (test)")

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: types.SimpleNamespace(close=lambda: None))
    monkeypatch.setattr(requests.Session, "request", fail)
    monkeypatch.setattr(huggingface_hub.utils._http, "time", types.SimpleNamespace(sleep=lambda s: None))
    monkeypatch.setattr(hub, "_REACHABILITY", {})
    for var in HUB_ENV + PROXY_ENV:
        monkeypatch.delenv(var, raising=False)
    return requests_made


@requests_hub
def test_a_hub_outage_after_the_probe_says_unreachable_not_missing(tmp_path, hub_failing_after_the_probe):
    with pytest.raises(vf.CheckpointNotFoundError) as info:
        vf.load("someone/not-cached", cache_dir=tmp_path)
    message = str(info.value)
    assert "the hub is unreachable (ConnectionError" in message and "not found in the hub" not in message


@requests_hub
def test_a_hub_outage_after_the_probe_stops_asking_the_hub(tmp_path, sources, hub_failing_after_the_probe):
    # config.json and the .bin are cached, model.safetensors is not: once the hub has failed for one file
    # (after its retries), the rest of the load goes to the cache at once
    add_snapshot(tmp_path, OLD, files_of(sources["bin"], "config.json", "pytorch_model.bin"))
    model = vf.load(REPO_ID, kernels="eager", cache_dir=tmp_path)
    assert same_weights(model, sources["safetensors"] / "model.safetensors")
    asked_for = {request.rsplit("/", 1)[-1] for request in hub_failing_after_the_probe}
    assert asked_for <= {"config.json", "model.safetensors"}, asked_for


def _hub_answering(status: int, error_code: str, message: str = ""):
    """A fake requests.Session.request: every call gets the hub's error response."""

    def answer(self, method, url, *args, **kwargs):
        response = requests.models.Response()
        response.status_code, response.url, response._content = status, url, b""
        response.request = requests.Request(method, url).prepare()
        response.headers.update({"X-Error-Code": error_code, "X-Error-Message": message})
        return response

    return answer


@requests_hub
@pytest.mark.parametrize(("status", "error_code", "revision", "advice"), [
    (403, "GatedRepo", None, "Accept its conditions at https://huggingface.co/someone/gated, then pass token="),
    (404, "RevisionNotFound", "abc1234", "A commit must be given in full (40 hex digits)"),
])  # fmt: skip
def test_hub_refusals_say_what_to_do(tmp_path, monkeypatch, status, error_code, revision, advice):
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: types.SimpleNamespace(close=lambda: None))
    monkeypatch.setattr(requests.Session, "request", _hub_answering(status, error_code, "refused (test)"))
    monkeypatch.setattr(hub, "_REACHABILITY", {})
    for var in HUB_ENV + PROXY_ENV:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(vf.CheckpointNotFoundError) as info:
        vf.load("someone/gated", cache_dir=tmp_path, revision=revision)
    assert advice in str(info.value)
