"""Find checkpoint files in a local directory or on the Hugging Face hub (through huggingface_hub).

Only the files asked for are downloaded. `HF_HUB_OFFLINE` is read at call time (huggingface_hub
reads it once at import), so a test or a user who sets it late still gets offline behaviour; the
standard cache is used, so a cached checkpoint resolves with no network.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class CheckpointNotFoundError(FileNotFoundError):
    """The named checkpoint (or one of its files) is neither local nor reachable on the hub."""


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def _not_found_errors() -> tuple[type[BaseException], ...]:
    """Exception classes meaning 'this file is not there' in huggingface_hub 0.x and 1.x."""
    import huggingface_hub.errors as errors

    names = ("EntryNotFoundError", "LocalEntryNotFoundError", "RemoteEntryNotFoundError")
    return tuple(getattr(errors, name) for name in names if hasattr(errors, name))


_REACHABILITY: dict[str, tuple[float, str | None]] = {}  # endpoint → (checked at, why unreachable | None)
_REACHABILITY_TTL_S = 60.0


def hub_unreachable_reason() -> str | None:
    """Why the hub cannot be reached (one quick TCP connect, remembered for a minute), or None.

    huggingface_hub retries a dead network five times with back-off (~24 s per file) before it looks in
    the cache; asking once first lets a cached file resolve at once and an uncached one fail in a second.
    Behind a proxy a direct connect proves nothing, so the probe is skipped there.
    """
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    checked = _REACHABILITY.get(endpoint)
    if checked is not None and time.monotonic() - checked[0] < _REACHABILITY_TTL_S:
        return checked[1]
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    reason = None
    try:
        socket.create_connection((url.hostname or "", port), timeout=3).close()
    except OSError as err:
        reason = f"{url.hostname}:{port}: {err.strerror or err}"
    _REACHABILITY[endpoint] = (time.monotonic(), reason)
    return reason


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
            raise CheckpointNotFoundError(f"{local} has no {filename}")
        return None
    _check_local_looking(name_or_path, local)

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    name = str(name_or_path)
    offline = local_files_only or hub_offline()
    unreachable = None if offline else hub_unreachable_reason()
    kwargs: dict[str, Any] = {
        "repo_id": name,
        "filename": filename,
        "revision": revision,
        "cache_dir": str(cache_dir) if cache_dir is not None else None,
        "local_files_only": offline or unreachable is not None,
        "token": token,
    }
    try:
        return Path(hf_hub_download(**kwargs))
    except HFValidationError as err:
        raise CheckpointNotFoundError(f"{name}: not a local directory and not a valid hub repo id ({err})") from None
    except _not_found_errors() as err:
        if not required:
            return None
        if unreachable is not None:
            raise CheckpointNotFoundError(
                f"{filename} of {name}: the hub is unreachable ({unreachable}) and the file is not in the local "
                f"cache{_not_local_either(name)}. Pass a local directory, or download it where there is a network; "
                "set HF_HUB_OFFLINE=1 to use only the cache without trying the network"
            ) from err
        if offline:
            why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE is set"
            raise CheckpointNotFoundError(
                f"{filename} of {name} is not in the local Hugging Face cache ({_cache_dir_of(cache_dir)}) and "
                f"{why}, so nothing is downloaded{_not_local_either(name)}. Download it once where there is a "
                "network (unset HF_HUB_OFFLINE), or pass a local checkpoint directory"
            ) from err
        raise CheckpointNotFoundError(
            f"{filename} of {name} not found in the hub: {type(err).__name__}{_not_local_either(name)}"
        ) from err
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise CheckpointNotFoundError(f"{name}: {err}{_not_local_either(name)}") from err
    except HfHubHTTPError as err:
        raise CheckpointNotFoundError(f"{name}: could not fetch {filename}: {err}") from err
    except OSError as err:  # e.g. the network dropped mid-download and nothing is cached
        raise CheckpointNotFoundError(
            f"{name}: could not fetch {filename} ({err}); pass a local directory, or set "
            "HF_HUB_OFFLINE=1 to use the cache"
        ) from err


def _cache_dir_of(cache_dir: str | os.PathLike | None) -> str:
    """Where hf_hub_download looked: the given folder, else huggingface_hub's (HF_HUB_CACHE / HF_HOME)."""
    if cache_dir is not None:
        return str(cache_dir)
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)
