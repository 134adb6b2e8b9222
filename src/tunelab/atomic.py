"""Write files and directories so a crash never leaves a half-written one in place of a good one.

A rename is atomic, but not durable by itself: after a power loss the new name may point at data that
never reached the disk, or the rename itself may be lost. So every file is fsynced before the rename
that publishes it, and the directory holding the new name is fsynced after it (the POSIX recipe; the
standard library has no helper for it).

A kill can still strand folders beside an output: ``.{name}.tmp-*`` (a new output, complete-looking but never
checked or published) and ``.{name}.old-*`` (the previous output, moved aside for the rename; with no
``{name}`` at all when the kill fell between the two renames). Their names carry the owning process
(``-{pid}-{host tag}-``), so :func:`recover_output`, which every replace runs first, can restore the
previous output and remove what no running process owns. No library tracks ownership of temporaries
across processes (``tempfile`` deletes only its own), hence this module.

A full disk (``ENOSPC``, ``EDQUOT``) is reported as an ``OSError`` naming the output being written
(:func:`disk_full` finds it behind a library's own exception), so a command can say where in one line.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

_DISK_FULL = tuple(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code is not None)
# How libraries that write from Rust or C++ (safetensors, tokenizers) word it: their errors are not OSErrors.
_DISK_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|StorageFull|QuotaExceeded|code: 28\b")
_OWNED = re.compile(r"(\d+)-([0-9a-f]{8})-[a-z0-9_]+")  # what follows ".{name}.{tmp|old}-" in names made here
_LEGACY = re.compile(r"[A-Za-z0-9_]+")  # a random part or a pid alone: names from before owners were recorded
_CLOCK_SLACK = 5.0  # seconds of disagreement allowed between file times and process start times


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
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _raise_disk_full(error, path, Path(tmp))
        raise
    fsync_dir(path.parent)


def check_replaceable(out: Path, source: Path, report_file: str, what: str, source_name: str) -> None:
    """Refuse an output folder that is ``source`` (or holds it), or that exists and is not an earlier ``what``
    (no ``report_file`` in it): only a folder this command wrote is replaced."""
    from tunelab.errors import TunelabError

    recover_output(out)  # a killed earlier replace: its previous output back, its temporaries gone
    out_r, src_r = out.resolve(), source.resolve()
    if out_r == src_r or out_r in src_r.parents:
        raise TunelabError(f"{what} output {out} would replace {source_name}; choose another folder")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / report_file).is_file())):
        raise TunelabError(f"{what} output {out} exists and is not an earlier {what} (no {report_file}); choose a new "
                           "folder or remove it")


def host_tag() -> str:
    """Eight hex digits naming this machine in temporary names (a shared filesystem sees several machines' pids)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_prefix(name: str, kind: str) -> str:
    """The start of the name of a ``kind`` (``tmp`` or ``old``) folder beside output ``name``, owned by this process."""
    return f".{name}.{kind}-{os.getpid()}-{host_tag()}-"


def make_temp_dir(parent: Path, name: str, kind: str) -> Path:
    """A new empty folder in ``parent`` named by :func:`temp_prefix` (plus a random part)."""
    return Path(tempfile.mkdtemp(dir=parent, prefix=temp_prefix(name, kind)))


def pid_alive(pid: int, since: float) -> bool:
    """Whether process ``pid`` of this machine runs and already ran at time ``since`` (a folder's last change).

    A process started after the folder last changed only inherited the pid of its owner, which is gone.
    Unsure answers (no permission to look) are True: a temporary in use must never be removed.
    """
    if pid <= 0:
        return False
    try:
        import psutil
    except ImportError:  # a dependency of accelerate, so normally there; without it, no check of pid reuse
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True
        return True
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return process.create_time() <= since + _CLOCK_SLACK
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


def _in_use(entry: Path, rest: str) -> bool | None:
    """For a leftover named ``.{name}.{kind}-{rest}``: whether a running process owns it; None if the name is not one
    of ours (an output whose own name happens to start alike)."""
    owned = _OWNED.fullmatch(rest)
    if owned is None:
        return False if _LEGACY.fullmatch(rest) else None
    if owned.group(2) != host_tag():
        return True  # another machine's process: its pid means nothing here
    try:
        stat = entry.lstat()
    except FileNotFoundError:
        return True  # gone already (its owner finished): nothing to do
    return pid_alive(int(owned.group(1)), max(stat.st_mtime, stat.st_ctime))


def recover_output(target: str | Path) -> None:
    """Put right what a killed replace of ``target`` left beside it: restore the previous output if ``target`` is
    missing and a backup (``.{name}.old-*``) of a process that is gone holds it, then remove the temporaries and
    backups no running process owns. Those of a live process (a replace running now) are left alone."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return
    stale: dict[str, list[Path]] = {"tmp": [], "old": []}
    for entry in parent.iterdir():  # not glob: a name like "run[1]" must match only itself
        for kind, found in stale.items():
            prefix = f".{target.name}.{kind}-"
            if entry.name.startswith(prefix) and _in_use(entry, entry.name[len(prefix):]) is False:
                found.append(entry)
    backups = [p for p in stale["old"] if p.is_dir() and not p.is_symlink()]
    if backups and not os.path.lexists(target):
        newest = max(backups, key=lambda p: p.lstat().st_ctime)  # a rename updates the moved folder's ctime
        os.replace(newest, target)
        fsync_dir(parent)
        stale["old"].remove(newest)
    for entry in stale["tmp"] + stale["old"]:
        _remove(entry)


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()


def disk_full(error: BaseException) -> OSError | None:
    """The disk-full error (``ENOSPC``, ``EDQUOT``) behind ``error``: itself, one it was raised from or while
    handling, or one a library reports in words; None if the disk was not full."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL:
            return current
        if not isinstance(current, OSError) and _DISK_FULL_TEXT.search(str(current)):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        current = current.__cause__ or current.__context__
    return None


def describe_disk_full(full: OSError) -> str:
    """``the disk is full writing PATH`` (or, with no path known, the system's words for it)."""
    return f"the disk is full writing {os.fsdecode(full.filename)}" if full.filename else f"the disk is full ({full.strerror})"


def _raise_disk_full(error: BaseException, target: Path, tmp: Path) -> None:
    """If ``error`` is a full disk, raise it again as an ``OSError`` naming what was being written under ``target``
    (a file inside the temporary ``tmp`` by its published name). A user-facing error stays as it is."""
    from tunelab.errors import TunelabError

    full = disk_full(error)
    if full is None or isinstance(error, TunelabError):
        return
    where = Path(os.fsdecode(full.filename)) if full.filename else target
    if where.is_relative_to(tmp):
        where = target / where.relative_to(tmp)
    if full is error and full.filename == str(where):
        return
    raise OSError(full.errno, full.strerror, str(where)) from error


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success it replaces ``target`` in one rename.

    Before the rename every file and directory in it is flushed to disk, after it the parent directory,
    so a power loss leaves either the old ``target`` or the complete new one. An existing ``target`` is
    moved aside to a uniquely named ``.{name}.old-*`` first and removed once the new one is in place.
    What a killed earlier replace left is put right first (:func:`recover_output`). On an exception the
    temporary directory is removed and ``target`` is left as it was; a full disk is raised as an ``OSError``
    naming the file (or ``target``).
    """
    target = Path(target)
    parent = target.parent
    new_parent = not parent.exists()
    parent.mkdir(parents=True, exist_ok=True)
    if new_parent:
        fsync_dir(parent.parent)  # the new parent's own name must survive too
    recover_output(target)
    tmp = make_temp_dir(parent, target.name, "tmp")
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        fsync_tree(tmp)
        old = _publish(tmp, target)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_disk_full(error, target, tmp)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _publish(tmp: Path, target: Path) -> Path | None:
    """Rename ``tmp`` to ``target`` (moving an existing ``target`` aside first) and flush the parent; returns the
    moved-aside previous ``target``, for the caller to remove."""
    if not target.exists():
        os.replace(tmp, target)
        fsync_dir(target.parent)
        return None
    # A fresh unique (empty) directory to rename onto: POSIX rename replaces an empty directory, and no
    # leftover of an earlier run (same pid after a reboot) can be in the way.
    old = make_temp_dir(target.parent, target.name, "old")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)  # put the good one back rather than leave no target at all
        raise
    fsync_dir(target.parent)
    return old
