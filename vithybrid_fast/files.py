"""Output files: written whole or not at all, and their paths checked before the long work that fills them."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: abandoned staging folders stay (see _remove_abandoned)
    fcntl = None


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)`, then rename onto `path` (its folders made first): a reader never sees half a file, and
    a failed write leaves an earlier file at `path` as it was.

    The file gets the mode any new file gets here (0o666 less the umask, as config.json does), not
    the 0o600 safetensors' `save_file` gives its output. The mode comes from creating the temporary
    file ourselves with 0o666 and reading what the kernel made of it: the umask is only readable by
    setting it (`os.umask`), which is process-wide and would race with other threads creating files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.unlink(missing_ok=True)  # a leftover keeps its old mode through O_CREAT
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_writable_file(path: Path, what: str) -> None:
    """Raise ValueError (naming `what`, e.g. "--output") unless a file can be written at `path` later:
    not a directory, below no existing file, in a folder this process may write (or may create)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory; give a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{what} {path}: the file is not writable")
    _check_creatable(path.parent, path, what)


def check_writable_dir(path: Path, what: str) -> None:
    """Raise ValueError (naming `what`, e.g. "--output-dir") unless files can be written in the folder
    `path` later: a folder this process may write, or one it may create."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path}: a file, not a folder")
    _check_creatable(path, path, what)


def _check_creatable(folder: Path, path: Path, what: str) -> None:
    while not folder.exists() and folder != folder.parent:  # the nearest folder that exists
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{what} {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: the folder {folder} is not writable")
    # os.access answers yes to root everywhere, and knows nothing of read-only or pseudo filesystems
    # (an audit's `eval --output /proc/x.jsonl` ran the whole evaluation, then failed to write): try it.
    try:
        fd, probe = tempfile.mkstemp(prefix=".vithybrid-write-check-", dir=folder)
    except OSError as err:
        raise ValueError(f"{what} {path}: cannot create a file in {folder} ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def staged_output(path: Path, companions: tuple[str, ...] = ()) -> Iterator[Path]:
    """Where to write (and check) `path`: the same name in a fresh directory beside it; everything written
    there is moved into place only if the block succeeds, `path` itself last.

    The staged file keeps the final name because a file may name its companions: the ONNX exporter
    writes a large model (over 1.5 GB of weights) with them in `<name>.data` and records that name inside the file.
    `companions` names the files an earlier `path` may have had beside it; those the new one does not
    write are removed once it is in place, so a small export does not leave a stale `.data` behind.
    On failure, the block's or a move's, `path` and its companions are as they were, and directories
    made for them are removed when empty.
    """
    with staged_files(
        path.parent, last=path.name, stale=lambda written: [n for n in companions if n not in written]
    ) as staging:
        yield staging / path.name


@contextlib.contextmanager
def staged_files(
    folder: Path, last: str, stale: Callable[[list[str]], list[str]] = lambda written: []
) -> Iterator[Path]:
    """A fresh directory inside `folder` (made if need be) to write a set of files into; if the block
    succeeds they are all moved into `folder` at once (`last` last) and the files `stale(written)` names
    there are removed, else `folder` is left as it was and directories made for it are removed when empty.

    So a set that is read together (a checkpoint's shards, index and config.json) is never half new and
    half old after a failed write: a full disk while writing the second shard changes nothing.
    """
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    staging, claim = None, None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(folder, last)
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{last}.", suffix=".partial", dir=folder))
        except PermissionError as err:  # said of the folder asked for, not of a hidden name inside it
            raise PermissionError(err.errno, f"cannot write in {folder}: {err.strerror}") from None
        claim = _claim(staging)
        yield staging
        written = sorted(os.listdir(staging), key=lambda name: name == last)
        _move_into_place(staging, folder, written, stale(written))
        shutil.rmtree(staging, ignore_errors=True)  # while still claimed: no one else removes it meanwhile
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for directory in made:
            with contextlib.suppress(OSError):  # not empty: someone else wrote there meanwhile
                directory.rmdir()
        raise
    finally:
        if claim is not None:
            os.close(claim)


def _claim(staging: Path) -> int | None:
    """An exclusive lock on the staging folder for as long as this process lives (the kernel drops it with
    the process, however it ends): a folder nobody holds was left by a killed writer."""
    if fcntl is None:
        return None
    fd = os.open(staging, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


ABANDONED_AFTER_S = 60  # a staging folder younger than this is never taken for a killed writer's


def _remove_abandoned(folder: Path, last: str) -> None:
    """Remove the staging folders of killed writers (SIGKILL, out of memory, power loss): each can hold a
    whole checkpoint. One a live writer holds (see `_claim`) is left alone; without flock, none is removed."""
    if fcntl is None:
        return
    for staging in folder.glob(f".{glob.escape(last)}.*.partial"):
        try:
            if time.time() - staging.stat().st_mtime < ABANDONED_AFTER_S:
                continue  # maybe made an instant ago, before its writer could claim it
            fd = os.open(staging, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held: a save in progress
        else:
            shutil.rmtree(staging, ignore_errors=True)
        finally:
            os.close(fd)


def _move_into_place(staging: Path, folder: Path, written: list[str], stale: list[str]) -> None:
    """Move `written` from `staging` into `folder` (in that order) and drop the files named `stale` there,
    or leave `folder` as it was: the files replaced are kept in `staging/.replaced` until all moved.

    A hard link keeps each replaced file where it is while the new one replaces it atomically, so a
    reader never finds `path` missing; where links are refused (some network or FAT file systems) the
    old file is moved aside instead.
    """
    kept = staging / ".replaced"
    kept.mkdir()
    replaced, moved = [], []
    try:
        for name in [*written, *stale]:
            try:
                _keep(folder / name, kept / name)
            except FileNotFoundError:
                continue  # absent, or removed meanwhile by another writer of this folder: nothing to keep
            replaced.append(name)
        for name in written:
            os.replace(staging / name, folder / name)
            moved.append(name)
        for name in stale:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / name)
    except BaseException:
        for name in moved:
            if name not in replaced:
                with contextlib.suppress(OSError):
                    os.unlink(folder / name)
        for name in replaced:
            with contextlib.suppress(OSError):
                os.replace(kept / name, folder / name)
        raise


def _keep(path: Path, copy: Path) -> None:
    """A hard link `copy` of `path`, which stays in place; where links are refused, `path` moved to `copy`."""
    try:
        os.link(path, copy, follow_symlinks=False)
    except FileNotFoundError:
        raise  # no such file: not a refused link
    except OSError:
        os.replace(path, copy)
