"""files.staged_output: the new file and its companions land together, or nothing changes."""

import os
import time

import pytest

from vithybrid_fast import files
from vithybrid_fast.files import staged_output


def _existing_export(folder):
    (folder / "model.onnx").write_text("old model")
    (folder / "model.onnx.data").write_text("old weights")


def _staged_export(folder):
    return staged_output(folder / "model.onnx", companions=("model.onnx.data",))


def _contents(folder):
    return {name: (folder / name).read_text() for name in sorted(os.listdir(folder))}


def test_new_file_and_companion_replace_the_old_ones(tmp_path):
    _existing_export(tmp_path)
    with _staged_export(tmp_path) as staged:
        staged.write_text("new model")
        staged.with_name("model.onnx.data").write_text("new weights")
    assert _contents(tmp_path) == {"model.onnx": "new model", "model.onnx.data": "new weights"}


def test_a_companion_the_new_file_lacks_is_removed(tmp_path):
    _existing_export(tmp_path)
    with _staged_export(tmp_path) as staged:
        staged.write_text("new model")
    assert _contents(tmp_path) == {"model.onnx": "new model"}


def test_a_file_not_named_a_companion_is_left_alone(tmp_path):
    _existing_export(tmp_path)
    with staged_output(tmp_path / "model.onnx") as staged:
        staged.write_text("new model")
    assert _contents(tmp_path) == {"model.onnx": "new model", "model.onnx.data": "old weights"}


@pytest.mark.parametrize("links", ["hard links", "no hard links"])
@pytest.mark.parametrize("failing", ["model.onnx", "model.onnx.data"])
def test_a_failed_move_puts_the_old_files_back(tmp_path, monkeypatch, failing, links):
    """The main file moves last: when its rename fails, the companion already moved must be undone too."""
    _existing_export(tmp_path)
    real_replace = os.replace

    def replace(src, dst):  # the new file's move fails; moving the old one back works
        if os.fspath(dst) == os.fspath(tmp_path / failing) and ".replaced" not in os.fspath(src):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    def no_link(*args, **kwargs):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(files.os, "replace", replace)
    if links == "no hard links":
        monkeypatch.setattr(files.os, "link", no_link)
    with pytest.raises(OSError, match="No space left"), _staged_export(tmp_path) as staged:
        staged.write_text("new model")
        staged.with_name("model.onnx.data").write_text("new weights")
    assert _contents(tmp_path) == {"model.onnx": "old model", "model.onnx.data": "old weights"}


def test_a_failed_move_removes_a_companion_that_was_new(tmp_path, monkeypatch):
    (tmp_path / "model.onnx").write_text("old model")
    real_replace = os.replace

    def replace(src, dst):
        if os.fspath(dst) == os.fspath(tmp_path / "model.onnx"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError), _staged_export(tmp_path) as staged:
        staged.write_text("new model")
        staged.with_name("model.onnx.data").write_text("new weights")
    assert _contents(tmp_path) == {"model.onnx": "old model"}


def test_a_failed_block_changes_nothing_and_removes_the_folders_it_made(tmp_path):
    _existing_export(tmp_path)
    with pytest.raises(RuntimeError), _staged_export(tmp_path) as staged:
        staged.write_text("half")
        raise RuntimeError("verification failed")
    assert _contents(tmp_path) == {"model.onnx": "old model", "model.onnx.data": "old weights"}
    with pytest.raises(RuntimeError), staged_output(tmp_path / "new" / "dir" / "model.onnx"):
        raise RuntimeError("verification failed")
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.data"]


@pytest.mark.skipif(files.fcntl is None, reason="flock: POSIX only (elsewhere abandoned folders stay)")
def test_a_killed_writers_staging_folder_goes_and_a_live_ones_stays(tmp_path):
    """A save killed by SIGKILL or the OOM killer leaves its staging folder (a whole checkpoint's size);
    the next save removes it, but never the folder of a save still running in another process."""
    import subprocess
    import sys

    abandoned = tmp_path / ".model.onnx.abandoned.partial"
    abandoned.mkdir()
    (abandoned / "model.onnx").write_text("half a model")
    live = tmp_path / ".model.onnx.live.partial"
    live.mkdir()
    young = tmp_path / ".model.onnx.young.partial"  # made an instant ago: its writer may not hold it yet
    young.mkdir()
    long_ago = time.time() - 2 * files.ABANDONED_AFTER_S
    for folder in (abandoned, live):
        os.utime(folder, (long_ago, long_ago))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()", str(live)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        with _staged_export(tmp_path) as staged:
            staged.write_text("new model")
    finally:
        holder.communicate("")
    assert sorted(os.listdir(tmp_path)) == [live.name, young.name, "model.onnx"]


def test_a_file_another_writer_removes_meanwhile_is_no_error(tmp_path, monkeypatch):
    """Two saves into one folder: the other may drop a file between our look and our link of it."""
    _existing_export(tmp_path)
    link = os.link

    def removed_first(source, *args, **kwargs):
        os.unlink(source)
        return link(source, *args, **kwargs)

    monkeypatch.setattr(files.os, "link", removed_first)
    with _staged_export(tmp_path) as staged:
        staged.write_text("new model")
    assert _contents(tmp_path) == {"model.onnx": "new model"}
