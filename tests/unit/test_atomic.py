"""Atomic and durable writes: what is flushed before and after each rename, and what a killed run leaves."""

import os

import pytest
from io_events import inode, position, publish_index, record_io

from tunelab.atomic import atomic_dir, write_text_atomic




def test_write_text_atomic_flushes_file_before_and_directory_after_the_rename(tmp_path, monkeypatch):
    events = record_io(monkeypatch)
    path = tmp_path / "out" / "report.json"
    write_text_atomic(path, "{}")
    published = publish_index(events, path)
    assert position(events, ("fsync", inode(path))) < published  # the inode survives the rename
    assert ("fsync", inode(path.parent)) in events[published + 1 :]
    assert path.read_text() == "{}"


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
def test_atomic_dir_flushes_every_file_and_directory_then_the_parent(tmp_path, monkeypatch, existing):
    target = tmp_path / "artifact"
    if existing:
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("old")
    events = record_io(monkeypatch)
    with atomic_dir(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "a.txt").write_text("new")
        (tmp / "sub" / "b.bin").write_bytes(b"\0" * 10)
    published = publish_index(events, target)
    for written in (target / "a.txt", target / "sub" / "b.bin", target / "sub", target):
        assert position(events, ("fsync", inode(written))) < published, written
    assert ("fsync", inode(tmp_path)) in events[published + 1 :]
    assert (target / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_atomic_dir_survives_a_backup_left_by_a_killed_run_with_the_same_pid(tmp_path):
    target = tmp_path / "artifact"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("first")
    leftover = tmp_path / f".artifact.old-{os.getpid()}"  # the old fixed backup name, not empty
    leftover.mkdir()
    (leftover / "a.txt").write_text("stale")
    (tmp_path / ".artifact.old-x1y2z3").mkdir()  # another killed run's backup
    (tmp_path / ".artifact2.old-1").mkdir()  # some other target's: not ours to remove
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("second")
    assert (target / "a.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".artifact2.old-1", "artifact"]


def test_atomic_dir_puts_the_old_target_back_when_the_final_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "artifact"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("good")
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp-" in os.fspath(src):
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk gone"):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_atomic_dir_names_with_glob_characters_clean_only_their_own_leftovers(tmp_path):
    target = tmp_path / "run[1]"
    (tmp_path / ".run1.old-abc").mkdir()  # would match the glob "run[1]" if it were not escaped
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("x")
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run1.old-abc", "run[1]"]
