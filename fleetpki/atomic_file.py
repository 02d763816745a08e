"""Atomic, power-cut-safe file writes: temp file in the same folder, fsync, rename, fsync dir."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644


# The temp file is a fresh name opened O_CREAT | O_EXCL | O_NOFOLLOW: a file or symlink planted
# at that name (a fixed name could be guessed) makes the open fail instead of writing through
# it. The target itself is replaced by rename(2), which never follows a symlink at the target:
# the link is replaced, what it pointed to is untouched.
_TEMP_FLAGS = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
)
_TEMP_ATTEMPTS = 10


def _open_temp(path: Path) -> tuple[int, Path]:
    for _ in range(_TEMP_ATTEMPTS):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            return os.open(tmp, _TEMP_FLAGS, SECRET_MODE), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name}")


@contextlib.contextmanager
def atomic_writer(path: Path, mode: int = SECRET_MODE) -> Iterator[BinaryIO]:
    """Write `path` through a binary file object; on a clean exit it replaces `path` at once
    (fsync, rename, fsync of the folder), on an exception nothing changes and no temp file
    is left. The temp file is 0600 from the start, so a secret is never readable by others,
    even for the instant before chmod."""
    path = Path(path)
    fd, tmp = _open_temp(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes, mode: int = SECRET_MODE) -> None:
    """Replace `path` with `data` so that a reader (or a reboot) sees the old or the new file."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"write_atomic needs bytes, got {type(data).__name__}")
    with atomic_writer(path, mode) as fh:
        fh.write(data)


def fsync_dir(folder: Path) -> None:
    """Make a rename durable: POSIX needs the directory entry itself flushed."""
    try:
        dfd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def make_private_dir(path: Path) -> None:
    """Create a 0700 folder (and parents); tighten it if it already exists."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


# renameat2(2) flags and the "current directory" fd (linux/fs.h, fcntl.h).
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two paths in one step: renameat2(RENAME_EXCHANGE) (Linux 3.15+), so a crash at
    any moment leaves each path with its old content or the other's, never neither. Two
    folders swapped this way change all their files at once. False where the C library or
    the file system cannot (the caller falls back to plain renames); OSError otherwise."""
    name = ctypes.util.find_library("c")
    renameat2 = getattr(ctypes.CDLL(name, use_errno=True), "renameat2", None) if name else None
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes.append(ctypes.c_uint)
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))
