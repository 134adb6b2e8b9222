"""Write files and directories so a crash never leaves a half-written one in place of a good one.

A rename is atomic, but not durable by itself: after a power loss the new name may point at data that
never reached the disk, or the rename itself may be lost. So every file is fsynced before the rename
that publishes it, and the directory holding the new name is fsynced after it (the POSIX recipe; the
standard library has no helper for it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Flush the entries of directory ``path`` (names created, renamed or removed in it) to disk.

    A no-op where directories cannot be opened (Windows), which has no such step to make renames durable.
    """
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """Flush every file under ``root`` to disk, then every directory, deepest first, ``root`` last."""
    root = Path(root)
    for folder, dirs, files in os.walk(root, topdown=False):
        for name in files:
            # O_RDONLY is enough: fsync flushes the file's dirty pages whichever descriptor asks.
            fd = os.open(Path(folder) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, flush it to disk, then rename over ``path``.

    The directory is flushed after the rename, so once this returns the new content survives a power loss.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read by others
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def check_replaceable(out: Path, source: Path, report_file: str, what: str, source_name: str) -> None:
    """Refuse an output folder that is ``source`` (or holds it), or that exists and is not an earlier ``what``
    (no ``report_file`` in it): only a folder this command wrote is replaced."""
    from tunelab.errors import TunelabError

    out_r, src_r = out.resolve(), source.resolve()
    if out_r == src_r or out_r in src_r.parents:
        raise TunelabError(f"{what} output {out} would replace {source_name}; choose another folder")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / report_file).is_file())):
        raise TunelabError(f"{what} output {out} exists and is not an earlier {what} (no {report_file}); choose a new "
                           "folder or remove it")


def remove_leftovers(parent: Path, prefix: str) -> None:
    """Remove entries of ``parent`` whose name starts with ``prefix`` (temporaries of a killed run)."""
    for entry in parent.iterdir():  # not glob: a name like "run[1]" must match only itself
        if not entry.name.startswith(prefix):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success it replaces ``target`` in one rename.

    Before the rename every file and directory in it is flushed to disk, after it the parent directory,
    so a power loss leaves either the old ``target`` or the complete new one. An existing ``target`` is
    moved aside to a uniquely named ``.{name}.old-*`` first and removed once the new one is in place,
    together with any such backups a killed run left behind. On an exception the temporary directory is
    removed and ``target`` is left as it was.
    """
    target = Path(target)
    parent = target.parent
    new_parent = not parent.exists()
    parent.mkdir(parents=True, exist_ok=True)
    if new_parent:
        fsync_dir(parent.parent)  # the new parent's own name must survive too
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.tmp-"))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        fsync_tree(tmp)
        _publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remove_leftovers(parent, f".{target.name}.old-")


def _publish(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target`` (moving an existing ``target`` aside first) and flush the parent."""
    if not target.exists():
        os.replace(tmp, target)
        fsync_dir(target.parent)
        return
    # A fresh unique (empty) directory to rename onto: POSIX rename replaces an empty directory, and no
    # leftover of an earlier run (same pid after a reboot) can be in the way.
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)  # put the good one back rather than leave no target at all
        raise
    fsync_dir(target.parent)
