"""Find checkpoint files in a local directory or on the Hugging Face hub (through huggingface_hub).

Only the files asked for are downloaded. huggingface_hub reads its environment once, at import; here
`HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE` and the cache location (`HF_HUB_CACHE`, `HF_HOME`) are read
at call time, so a test or a user who sets them late still gets what they asked for. A cached checkpoint
resolves with no network, and a miss says what was looked for, where, and what to do.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
FULL_COMMIT = re.compile(r"^[0-9a-f]{40}$")
SHORT_COMMIT = re.compile(r"^[0-9a-f]{7,39}$")

logger = logging.getLogger(__name__)


class CheckpointNotFoundError(FileNotFoundError):
    """The named checkpoint (or one of its files) is neither local nor reachable on the hub."""


def offline_variable() -> str | None:
    """The environment variable that makes the hub offline now, or None.

    As huggingface_hub does (`HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE`), the first one set decides, even
    when it is "0"."""
    for var in OFFLINE_VARIABLES:
        value = os.environ.get(var)
        if value:
            return var if value.strip().lower() in ("1", "true", "yes", "on") else None
    return None


def hub_offline() -> bool:
    return offline_variable() is not None


def _expand(path: str) -> str:
    return os.path.expandvars(os.path.expanduser(path))


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The hub cache to use: `cache_dir`, else the one the environment names now.

    Same precedence as huggingface_hub's constants (HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub,
    XDG_CACHE_HOME/huggingface/hub), but not frozen at its import: `HF_HOME` set after a first load (or
    after `import transformers`) must not send a 400 MB download to the old cache."""
    if cache_dir is not None:
        return Path(cache_dir)
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if hub:
        return Path(_expand(hub))
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(cache_home, "huggingface")
    return Path(_expand(home)) / "hub"


def _hub_error(name: str) -> type[BaseException] | None:
    import huggingface_hub.errors as errors

    return getattr(errors, name, None)


def _not_found_errors() -> tuple[type[BaseException], ...]:
    """Exception classes meaning 'this file is not there' in huggingface_hub 0.x and 1.x."""
    names = ("EntryNotFoundError", "LocalEntryNotFoundError", "RemoteEntryNotFoundError")
    return tuple(error for error in map(_hub_error, names) if error is not None)


def _is_cache_miss(err: BaseException) -> bool:
    """A LocalEntryNotFoundError: the hub was not asked or did not answer, and the cache has no copy."""
    local_miss = _hub_error("LocalEntryNotFoundError")
    return local_miss is not None and isinstance(err, local_miss)


# -- is the hub reachable? -------------------------------------------------------------------------
_REACHABILITY: dict[str, tuple[float, str | None]] = {}  # probed address → (checked at, why unreachable | None)
_REACHABILITY_TTL_S = 60.0
PROBE_TIMEOUT_S = 3.0


def _probe_address() -> tuple[str, int, str]:
    """(host, port, label) of the first hop to the hub: the HTTPS proxy when one is set, else the hub."""
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(endpoint.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass_environment(host):
        return host, port, f"{host}:{port}"
    # a live proxy proves little about the hub behind it, but a dead one proves the hub is out of reach
    parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    proxy_port = parts.port or {"https": 443, "socks5": 1080, "socks5h": 1080}.get(parts.scheme, 80)
    return parts.hostname or "", proxy_port, f"proxy {parts.hostname}:{proxy_port}"


def _connect_within(host: str, port: int, timeout_s: float) -> str | None:
    """Why a TCP connection to host:port fails within `timeout_s`, or None when it opens.

    The connect runs in a daemon thread because its DNS lookup ignores socket timeouts: a dead resolver
    would otherwise hold the caller for its own retries (10 s and more)."""
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(err.strerror or str(err))

    thread = threading.Thread(target=connect, name="vithybrid-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return outcome[0] if outcome else f"no answer within {timeout_s:g} s"


def hub_unreachable_reason() -> str | None:
    """Why the hub cannot be reached (one quick TCP connect, remembered for a minute), or None.

    huggingface_hub retries a dead network five times with back-off (~24 s per file) before it looks in
    the cache; asking once first lets a cached file resolve at once and an uncached one fail in seconds.
    """
    host, port, label = _probe_address()
    checked = _REACHABILITY.get(label)
    if checked is not None and time.monotonic() - checked[0] < _REACHABILITY_TTL_S:
        return checked[1]
    failure = _connect_within(host, port, PROBE_TIMEOUT_S)
    reason = None if failure is None else f"{label}: {failure}"
    _REACHABILITY[label] = (time.monotonic(), reason)
    return reason


def _remember_unreachable(err: BaseException) -> str:
    """The hub failed after the probe said yes (huggingface_hub has retried already): the next files of
    this load, and of the next minute, go to the cache at once instead of retrying ~24 s each."""
    cause = err.__cause__ or err.__context__ or err
    reason = f"{type(cause).__name__}: {str(cause).splitlines()[0][:200] if str(cause) else 'no answer'}"
    _REACHABILITY[_probe_address()[2]] = (time.monotonic(), reason)
    return reason


# -- what the cache holds (for messages) -----------------------------------------------------------
def _repo_cache(cache: Path, name: str) -> Path:
    return cache / f"models--{name.replace('/', '--')}"


def snapshot_commit(path: Path) -> str | None:
    """The commit of a file inside a hub cache snapshot (…/snapshots/<commit>/<file>), else None."""
    if path.parent.parent.name == "snapshots" and FULL_COMMIT.match(path.parent.name):
        return path.parent.name
    return None


def _cached_commit(repo: Path, revision: str) -> str | None:
    """The commit the cache resolves `revision` to (refs/<branch or tag> holds it), or None."""
    if FULL_COMMIT.match(revision):
        return revision if (repo / "snapshots" / revision).is_dir() else None
    ref = repo / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else None


def _known_revisions(repo: Path) -> str:
    refs = repo / "refs"
    named = sorted(
        f"{ref.relative_to(refs).as_posix()} → {ref.read_text().strip()[:12]}"
        for ref in (refs.rglob("*") if refs.is_dir() else [])
        if ref.is_file()
    )
    snapshots = sorted(p.name[:12] for p in (repo / "snapshots").glob("*") if p.is_dir())
    return f"refs {', '.join(named) or 'none'}; snapshots {', '.join(snapshots) or 'none'}"


def _short_hash_hint(repo: Path, revision: str) -> str:
    if not SHORT_COMMIT.match(revision):
        return ""
    full = sorted(p.name for p in (repo / "snapshots").glob(f"{revision}*") if FULL_COMMIT.match(p.name))
    meant = f" ({' or '.join(full)} in the cache?)" if full else ""
    return f". A commit must be given in full (40 hex digits): the hub takes no short hash{meant}"


def broken_link(cache: Path, name: str, revision: str | None, filename: str) -> Path | None:
    """The snapshot's entry for `filename` when it is a link to a blob that is gone, else None."""
    repo = _repo_cache(cache, name)
    commit = _cached_commit(repo, revision or "main") if repo.is_dir() else None
    link = None if commit is None else repo / "snapshots" / commit / filename
    return link if link is not None and _is_broken(link) else None


def _is_broken(link: Path) -> bool:
    return link.is_symlink() and not link.exists()


def _snapshot_detail(repo: Path, commit: str, filenames: tuple[str, ...]) -> str:
    snapshot = repo / "snapshots" / commit
    broken = [snapshot / f for f in filenames if _is_broken(snapshot / f)]
    if broken:
        links = ", ".join(f"{link} → {link.readlink()}" for link in broken)
        return f"; its cache entry is a broken link whose blob is gone ({links}): delete the link, then download again"
    partial = sorted((repo / "blobs").glob("*.incomplete"))
    if partial:
        return f"; snapshot {commit} lacks it, and {len(partial)} interrupted download(s) lie in {repo / 'blobs'}"
    return f"; snapshot {commit} lacks it"


def cache_detail(cache: Path, name: str, revision: str | None, filenames: tuple[str, ...]) -> str:
    """What the cache holds of `name` at `revision`, where the wanted files would be ("" if no repo)."""
    repo = _repo_cache(cache, name)
    if not repo.is_dir():
        return ""
    wanted = revision or "main"
    commit = _cached_commit(repo, wanted)
    if commit is None:
        return f"; the cache has no revision {wanted} of {name} (it has {_known_revisions(repo)})" + _short_hash_hint(
            repo, wanted
        )
    return _snapshot_detail(repo, commit, filenames)


# -- resolving a file ------------------------------------------------------------------------------
def _check_local_looking(name_or_path: str | os.PathLike, local: Path) -> None:
    """A name that can only be a path gets a path's error, not a hub lookup of "./foo"."""
    if local.is_file():
        raise CheckpointNotFoundError(
            f"{name_or_path} is a file; pass the checkpoint directory that holds config.json and the weights"
            + (f" (perhaps {local.parent})" if (local.parent / "config.json").is_file() else "")
        )
    text = str(name_or_path)
    if not isinstance(name_or_path, str) or text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text:
        raise CheckpointNotFoundError(f"{name_or_path}: no such checkpoint directory")


def _not_local_either(name: str) -> str:
    return "" if "/" in name else f"; it is not a local directory either (looked in {Path.cwd()})"


def _at(revision: str | None) -> str:
    return "" if revision is None else f" at revision {revision}"


def not_cached_message(
    what: str,
    name: str,
    filenames: tuple[str, ...],
    *,
    revision: str | None,
    cache: Path,
    local_files_only: bool,
    unreachable: str | None,
) -> str:
    """`what` (a file, or "any of …") of `name` is not cached and cannot be fetched: why, where, what to do."""
    detail = cache_detail(cache, name, revision, filenames)
    missing = f"{what} of {name}{_at(revision)}"
    if unreachable is not None:
        return (
            f"{missing}: the hub is unreachable ({unreachable}) and it is not in the local Hugging Face cache "
            f"({cache}){detail}{_not_local_either(name)}. Pass a local directory, or download it where there is a "
            "network; set HF_HUB_OFFLINE=1 to use only the cache without trying the network"
        )
    variable = offline_variable()
    why, undo = (
        ("local_files_only=True", "local_files_only=False")
        if local_files_only or variable is None
        else (f"{variable} is set", f"unset {variable}")
    )
    return (
        f"{missing} is not in the local Hugging Face cache ({cache}) and {why}, so nothing is downloaded"
        f"{detail}{_not_local_either(name)}. Download it once where there is a network ({undo}), or pass a "
        "local checkpoint directory"
    )


def _gated_hint(err: BaseException, name: str) -> str:
    gated = _hub_error("GatedRepoError")
    if gated is None or not isinstance(err, gated):
        return ""
    return f". Accept its conditions at https://huggingface.co/{name}, then pass token= or log in (`hf auth login`)"


def _warn_if_broken(cache: Path, name: str, revision: str | None, filename: str) -> None:
    """An optional file whose cache entry is broken is skipped (the next weight format of the same commit
    may be cached, as transformers takes it), but a damaged cache should not go unnoticed."""
    link = broken_link(cache, name, revision, filename)
    if link is not None:
        logger.warning("%s is a broken link (its blob %s is gone): skipped; delete it to repair", link, link.readlink())


def resolve_file(
    name_or_path: str | os.PathLike,
    filename: str,
    *,
    required: bool = False,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path | None:
    """Path of `filename` inside a local directory or a hub repo; None if absent and not `required`."""
    local = Path(name_or_path)
    if local.is_dir():
        path = local / filename
        if path.is_file():
            return path
        if required:
            # a fine-tuning run's output directory holds its checkpoints one level down
            inside = [f"{local / name}" for name in ("best", "last") if (local / name / filename).is_file()]
            hint = f": it holds a fine-tuning run, whose checkpoints are {' and '.join(inside)}" if inside else ""
            raise CheckpointNotFoundError(f"{local} has no {filename}{hint}")
        return None
    _check_local_looking(name_or_path, local)
    return _resolve_hub_file(
        str(name_or_path), filename, required=required, revision=revision, cache=hub_cache_dir(cache_dir),
        local_files_only=local_files_only, token=token,
    )  # fmt: skip


def _resolve_hub_file(
    name: str,
    filename: str,
    *,
    required: bool,
    revision: str | None,
    cache: Path,
    local_files_only: bool,
    token: str | bool | None,
) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    offline = local_files_only or hub_offline()
    unreachable = None if offline else hub_unreachable_reason()
    try:
        return Path(
            hf_hub_download(
                repo_id=name, filename=filename, revision=revision, cache_dir=str(cache),
                local_files_only=offline or unreachable is not None, token=token,
            )
        )  # fmt: skip
    except HFValidationError as err:
        raise CheckpointNotFoundError(f"{name}: not a local directory and not a valid hub repo id ({err})") from None
    except _not_found_errors() as err:
        if not offline and unreachable is None and _is_cache_miss(err):
            unreachable = _remember_unreachable(err)
        if not required:
            _warn_if_broken(cache, name, revision, filename)
            return None
        if offline or unreachable is not None:
            message = not_cached_message(
                filename, name, (filename,), revision=revision, cache=cache,
                local_files_only=local_files_only, unreachable=unreachable,
            )  # fmt: skip
            raise CheckpointNotFoundError(message) from err
        raise CheckpointNotFoundError(
            f"{filename} of {name}{_at(revision)} not found in the hub: the repo has no such file"
            f"{_not_local_either(name)}"
        ) from err
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        hint = _gated_hint(err, name) + _short_hash_hint(_repo_cache(cache, name), revision or "")
        raise CheckpointNotFoundError(f"{name}{_at(revision)}: {err}{hint}{_not_local_either(name)}") from err
    except HfHubHTTPError as err:
        raise CheckpointNotFoundError(f"{name}: could not fetch {filename}: {err}") from err
    except OSError as err:  # e.g. the network dropped mid-download and nothing is cached
        raise CheckpointNotFoundError(
            f"{name}: could not fetch {filename} ({err}); pass a local directory, or set "
            "HF_HUB_OFFLINE=1 to use the cache"
        ) from err
