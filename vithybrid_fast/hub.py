"""Find checkpoint files in a local directory or on the Hugging Face hub (through huggingface_hub).

Only the files asked for are downloaded. `HF_HUB_OFFLINE` is read at call time (huggingface_hub
reads it once at import), so a test or a user who sets it late still gets offline behaviour; the
standard cache is used, so a cached checkpoint resolves with no network.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class CheckpointNotFoundError(FileNotFoundError):
    """The named checkpoint (or one of its files) is neither local nor reachable on the hub."""


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def _not_found_errors() -> tuple[type[BaseException], ...]:
    """Exception classes meaning 'this file is not there' in huggingface_hub 0.x and 1.x."""
    import huggingface_hub.errors as errors

    names = ("EntryNotFoundError", "LocalEntryNotFoundError", "RemoteEntryNotFoundError")
    return tuple(getattr(errors, name) for name in names if hasattr(errors, name))


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
    if not isinstance(name_or_path, str) or name_or_path.startswith((".", "/", "~")) or local.exists():
        # a path, not a repo id: report it as such instead of asking the hub about "./foo"
        raise CheckpointNotFoundError(f"{name_or_path}: no such checkpoint directory")

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    kwargs: dict[str, Any] = {
        "repo_id": str(name_or_path),
        "filename": filename,
        "revision": revision,
        "cache_dir": str(cache_dir) if cache_dir is not None else None,
        "local_files_only": local_files_only or hub_offline(),
        "token": token,
    }
    try:
        return Path(hf_hub_download(**kwargs))
    except _not_found_errors() as err:
        if required:
            where = "the local cache (offline)" if kwargs["local_files_only"] else "the hub"
            raise CheckpointNotFoundError(
                f"{filename} of {name_or_path!s} not found in {where}: {type(err).__name__}"
            ) from err
        return None
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise CheckpointNotFoundError(f"{name_or_path!s}: {err}") from err
    except HfHubHTTPError as err:
        raise CheckpointNotFoundError(f"{name_or_path!s}: could not fetch {filename}: {err}") from err
    except OSError as err:  # e.g. no network and nothing cached
        raise CheckpointNotFoundError(
            f"{name_or_path!s}: could not fetch {filename} ({err}); pass a local directory, or set "
            "HF_HUB_OFFLINE=1 to use the cache"
        ) from err
