"""files.py: every output is written whole or not at all, and nothing on disk is lost by a failed write."""
import os

import pytest

from singlora_diffusion.errors import NotWritable, UserError
from singlora_diffusion.files import atomic_path, check_writable, read_progress, write_json, write_progress


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "adapter.safetensors"
    target.write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise OSError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]


def test_a_finished_write_replaces_and_its_temporary_is_hidden(tmp_path):
    target = tmp_path / "x.json"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".")  # scanners skip hidden names
        assert str(os.getpid()) in tmp.name  # processes writing the same name never share a temporary
        tmp.write_text("new")
        assert target.read_text() == "old"  # readers see the old file until the rename
    assert target.read_text() == "new"


def test_folders_replace_a_folder_only_when_asked(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model_index.json").write_text("old")
    with pytest.raises(OSError):  # e.g. another process built the same cache folder first
        with atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "model_index.json").write_text("new")
    assert (out / "model_index.json").read_text() == "old" and len(list(tmp_path.iterdir())) == 1
    with atomic_path(out, replace_folder=True) as tmp:
        tmp.mkdir()
        (tmp / "model_index.json").write_text("new")
    assert (out / "model_index.json").read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_progress_reads_back_and_a_half_written_file_reads_as_nothing(tmp_path):
    assert read_progress(tmp_path) == {}
    write_progress(tmp_path, step=3, total=10, loss=0.25)
    assert read_progress(tmp_path) == {"step": 3, "total": 10, "loss": 0.25}
    (tmp_path / "progress.json").write_text('{"step": 4, "to')  # another writer's torn file
    assert read_progress(tmp_path) == {}
    write_json(tmp_path / "progress.json", {"step": 5})
    assert read_progress(tmp_path) == {"step": 5}


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_unwritable_folder_is_one_user_error_naming_the_flag(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(NotWritable, match="--out .*locked is not writable"):
            check_writable(locked, "--out")
    finally:
        locked.chmod(0o700)


def test_a_file_in_the_way_is_not_writable(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="--output_dir .*file/sub is not writable"):
        check_writable(tmp_path / "file" / "sub", "--output_dir")
