"""Publish a folder whole: write it under a temporary name beside its target, flush it to disk,
then rename it into place in one step, so a reader finds the old folder or the new one, complete,
never a mix of the two.

    with staged(target) as tmp:      # .<name>.tmp-<host>-<pid>-<random>, beside target
        ...write the files into tmp...
    # published on a clean exit; removed, target untouched, on an exception

``replace=True`` swaps the new folder with the old one in one step (Linux's ``renameat2`` with
``RENAME_EXCHANGE``), then removes the old one. On a file system without the exchange (some
network file systems) the old folder is renamed aside first, so for a moment the target is
missing; an interruption there is undone by the next ``staged`` of the same target, which
renames the old folder back. ``replace=False`` publishes only where nothing is yet: a folder
already there (another writer published the same thing first) is kept and the new one dropped.

A process killed mid-way leaves its temporary folder; the next ``staged`` of the same target
removes those whose writer is gone (this machine's, by process id: another machine's writer
cannot be checked from here, so its folders are left).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_HOST = socket.gethostname().replace("/", "_")


def _temporary(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def _writer_gone(path: Path, prefix: str) -> bool:
    """True for a temporary folder of this machine whose process has ended."""
    writer = path.name.removeprefix(prefix).rpartition("-")[0]  # less the random part
    host, _, pid = writer.rpartition("-")
    if host != _HOST or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _leftovers(target: Path, kind: str) -> list[Path]:
    prefix = f".{target.name}.{kind}-"
    if not target.parent.is_dir():
        return []
    found = [p for p in target.parent.iterdir() if p.name.startswith(prefix)]
    return sorted((p for p in found if _writer_gone(p, prefix)), key=lambda p: p.stat().st_mtime)


def recover(target: Path) -> None:
    """Undo what interrupted writers of ``target`` left: the old folder back in place where a
    swap without the exchange stopped half-way, then their temporary folders removed."""
    aside = _leftovers(target, "old")
    if aside and not target.exists():
        os.rename(aside.pop(), target)  # the newest: the folder that stood at target last
        _fsync_dir(target.parent)
    for path in aside + _leftovers(target, "tmp"):
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staged(target: Path, replace: bool = True) -> Iterator[Path]:
    """A fresh temporary folder beside ``target``, published as ``target`` on a clean exit."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = _temporary(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        publish(tmp, target, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap it holds the old folder


def publish(tmp: Path, target: Path, replace: bool = True) -> None:
    """Rename the complete folder ``tmp`` to ``target`` (see the module doc); ``tmp`` is left
    holding the old folder after a swap, or the unused new one, for the caller to remove."""
    fsync_tree(tmp)  # the data on disk before the name that publishes it
    if not target.exists() or not replace:
        try:
            os.rename(tmp, target)
        except OSError as err:
            if replace or err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    elif not _exchange(tmp, target):
        aside = _temporary(target, "old")
        os.rename(target, aside)
        os.rename(tmp, target)
        os.rename(aside, tmp)
    _fsync_dir(target.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system or the file system cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    rename = getattr(libc, "renameat2", None)
    if rename is None:
        return False
    rename.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if rename(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Every file under ``folder`` and every folder's entries on disk."""
    for root, _, names in os.walk(folder):
        for name in names:
            fd = os.open(Path(root) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def write_text(path: Path, text: str) -> None:
    """``text`` into the file ``path`` whole: a temporary file beside it, then a rename, so a
    reader (or a process that starts after a kill) finds the old text or the new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


__all__ = ["fsync_tree", "publish", "recover", "staged", "write_text"]
