"""What a killed replace leaves behind is put right by the next one (issue 37): the previous output hidden in
``.OUT.old-*`` is restored, and temporaries of processes that are gone are removed; a live process's are kept.

The crash states are made by hand, as a SIGKILL at each point of ``atomic_dir`` leaves them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunelab.atomic import atomic_dir, check_replaceable, host_tag, pid_alive, recover_output, temp_prefix


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _folder(path: Path, **files: str) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_temp_names_carry_the_owner_pid(tmp_path):
    assert temp_prefix("out", "tmp") == f".out.tmp-{os.getpid()}-{host_tag()}-"
    with atomic_dir(tmp_path / "out") as tmp:
        assert tmp.name.startswith(f".out.tmp-{os.getpid()}-")


def test_pid_alive_sees_exited_and_reused_pids(dead_pid):
    assert pid_alive(os.getpid(), since=time.time())
    assert not pid_alive(dead_pid, since=time.time())
    # Our pid on a folder last changed long before this process started: the folder's owner was another
    # process that had the same pid, and is gone.
    assert not pid_alive(os.getpid(), since=0.0)


def test_a_kill_between_the_two_renames_is_undone_by_the_next_replace(tmp_path, dead_pid):
    """Killed after ``OUT`` was moved aside and before the new one was renamed in: ``OUT`` is missing, the
    previous good output sits in ``.OUT.old-*`` and the complete-looking new one in ``.OUT.tmp-*``."""
    _folder(tmp_path / f".out.old-{dead_pid}-{host_tag()}-xy", report="previous")
    _folder(tmp_path / f".out.tmp-{dead_pid}-{host_tag()}-zz", report="unverified")
    recover_output(tmp_path / "out")
    assert (tmp_path / "out" / "report").read_text() == "previous"
    assert _hidden(tmp_path) == []


def test_the_previous_output_comes_back_even_when_the_next_run_fails(tmp_path, dead_pid):
    _folder(tmp_path / f".out.old-{dead_pid}-{host_tag()}-xy", report="previous")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "report").write_text("half")
        raise RuntimeError("the next run fails too")
    assert (tmp_path / "out" / "report").read_text() == "previous"
    assert _hidden(tmp_path) == []


def test_backups_named_before_pids_were_recorded_are_restored(tmp_path):
    """``.OUT.old-XXXXXXXX`` of an earlier tunelab (no pid in the name): no process can own it any more."""
    _folder(tmp_path / ".out.old-k2j3h4g5", report="previous")
    check_replaceable(tmp_path / "out", tmp_path / "source", "report", "merge", "the source")
    assert (tmp_path / "out" / "report").read_text() == "previous"


def test_stale_backups_beside_a_published_output_are_removed(tmp_path, dead_pid):
    """Killed after the new output was renamed in, before the old one was deleted."""
    _folder(tmp_path / "out", report="new")
    _folder(tmp_path / f".out.old-{dead_pid}-{host_tag()}-xy", report="previous")
    recover_output(tmp_path / "out")
    assert (tmp_path / "out" / "report").read_text() == "new" and _hidden(tmp_path) == []


def test_temporaries_of_a_live_process_are_kept(tmp_path, dead_pid):
    live = _folder(tmp_path / (temp_prefix("out", "tmp") + "abcdefgh"), report="being written")
    elsewhere = "00000000" if host_tag() != "00000000" else "11111111"
    other_host = _folder(tmp_path / f".out.tmp-{dead_pid}-{elsewhere}-aa", report="another machine's")
    dead = _folder(tmp_path / f".out.tmp-{dead_pid}-{host_tag()}-bb", report="dead")
    legacy = _folder(tmp_path / ".out.tmp-9a8b7c6d", report="before pids were recorded")
    recover_output(tmp_path / "out")
    assert live.is_dir() and other_host.is_dir()
    assert not dead.exists() and not legacy.exists()
    assert not (tmp_path / "out").exists()  # a temporary is never published by recovery


def test_only_this_outputs_leftovers_are_touched(tmp_path, dead_pid):
    """``run`` and ``run-2`` (or ``run[1]``) share a prefix; recovering one leaves the other's alone."""
    other = _folder(tmp_path / f".out-2.tmp-{dead_pid}-{host_tag()}-xy", report="other")
    glob_like = _folder(tmp_path / f".o[u]t.old-{dead_pid}-{host_tag()}-xy", report="other")
    recover_output(tmp_path / "out")
    assert other.is_dir() and glob_like.is_dir() and not (tmp_path / "out").exists()


def test_a_killed_export_is_cleaned_and_the_previous_export_restored(tiny_llama, tmp_path, dead_pid):
    """`tunelab export` killed mid-replace: the next export starts from the previous output (restored) and
    removes the dead process's unverified temporary, then publishes its own."""
    from tunelab.export import export_model

    first = export_model(tiny_llama, "hf", out=tmp_path / "exported")
    os.replace(tmp_path / "exported", tmp_path / f".exported.old-{dead_pid}-{host_tag()}-xy")
    _folder(tmp_path / f".exported.tmp-{dead_pid}-{host_tag()}-zz", **{"model.safetensors": "truncated"})
    second = export_model(tiny_llama, "hf", out=tmp_path / "exported")
    assert second["output"] == first["output"] and (tmp_path / "exported" / "model.safetensors").is_file()
    assert _hidden(tmp_path) == []
