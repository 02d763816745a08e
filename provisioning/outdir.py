"""The bundle output folder: staged beside DIR, synced once, published by rename."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fleetpki.atomic_file import fsync_dir
from fleetpki.identity import is_valid_id
from provisioning.errors import OutputDirError

STAGING_SUFFIX = ".partial"
# A batch's staging folder: .<DIR name>.<batch id>.<random>.batch.partial beside DIR. The name
# says where it goes and which batch it holds, so a later run can finish or remove it.
BATCH_STAGING_SUFFIX = ".batch" + STAGING_SUFFIX
# Written last when bundles are moved into a folder that already holds files (--force): a
# manifest in DIR means every bundle it lists is there.
_LAST = "manifest.csv"


def _is_empty_dir(path: Path) -> bool:
    with os.scandir(path) as entries:
        return next(entries, None) is None


def check_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse, before anything is created, a DIR that is a file or a non-empty folder."""
    if out_dir.is_symlink():
        raise OutputDirError(out_dir, "is a symbolic link; give the real folder")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise OutputDirError(out_dir, "exists and is not a folder")
        if not force and not _is_empty_dir(out_dir):
            raise OutputDirError(out_dir, "exists and is not empty (use --force to add to it)")


def sync_filesystem(folder: Path) -> None:
    """Flush every dirty page of the file system holding `folder` to stable storage.

    One syncfs(2) (Linux) instead of an fsync per file: 300,000 fsyncs each force a journal
    commit; one syncfs commits everything written so far in one go. Elsewhere, sync(2).
    """
    libc_name = ctypes.util.find_library("c")
    syncfs = getattr(ctypes.CDLL(libc_name, use_errno=True), "syncfs", None) if libc_name else None
    if syncfs is None:
        os.sync()
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs({folder}) failed: {os.strerror(err)}")
    finally:
        os.close(fd)


def _lock(folder: Path, *, wait: bool) -> int | None:
    """An exclusive flock(2) on `folder`, held while its fd stays open (a kill -9 drops it);
    None if another live process holds it (and `wait` is False)."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass
class StagedOutput:
    """Bundles are written to a hidden sibling of DIR and only moved into DIR at the end.

    The sibling lives in DIR's parent, so publishing is a rename on one file system: a reader
    of DIR never sees a half-written batch, and a failed batch is removed in one place. The
    writing process holds a lock on the sibling: one left by a killed run is told from one
    still being written (`StagedOutput.leftovers`).
    """

    out_dir: Path
    staging: Path
    force: bool
    batch_id: str = ""
    _lock_fd: int | None = None

    @classmethod
    def prepare(cls, out_dir: Path, *, force: bool, batch_id: str) -> StagedOutput:
        out_dir = Path(out_dir).absolute()
        check_out_dir(out_dir, force)
        parent = out_dir.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            # mkdtemp creates the folder 0700 with a unique name: two runs never collide.
            staging = Path(
                tempfile.mkdtemp(
                    prefix=f".{out_dir.name}.{batch_id}.", suffix=BATCH_STAGING_SUFFIX, dir=parent
                )
            )
        except OSError as exc:
            raise OutputDirError(
                out_dir, f"cannot create files in {parent}: {exc.strerror or exc}"
            ) from exc
        return cls(out_dir, staging, force, batch_id, _lock(staging, wait=True))

    @classmethod
    def leftovers(cls, parent: Path) -> list[StagedOutput]:
        """The staging folders in `parent` that no live run holds: left by a run that was
        killed (kill -9, power cut) before it published or removed them. Each comes locked:
        call publish() or discard() (or release())."""
        found = []
        try:
            names = sorted(os.listdir(parent))
        except OSError:
            return []
        for name in names:
            if not (name.startswith(".") and name.endswith(BATCH_STAGING_SUFFIX)):
                continue
            parts = name[1 : -len(BATCH_STAGING_SUFFIX)].rsplit(".", 2)
            path = parent / name
            if len(parts) != 3 or not is_valid_id(parts[1]) or path.is_symlink():
                continue
            if not path.is_dir():
                continue
            fd = _lock(path, wait=False)
            if fd is not None:
                found.append(cls(parent / parts[0], path, True, parts[1], fd))
        return found

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def sync(self) -> None:
        sync_filesystem(self.staging)

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        self.release()

    def publish(self) -> None:
        """Move the staged bundles into DIR; raises OSError (the staging folder stays)."""
        out = self.out_dir
        if not out.exists() or (out.is_dir() and _is_empty_dir(out)):
            # POSIX rename(2) atomically replaces an empty folder.
            os.rename(self.staging, out)
        else:
            # --force into a folder that already holds files (or a killed run's move finished
            # now): entry by entry, replacing same-named leftovers (an older bundle of a device
            # id this batch now owns), the manifest last.
            entries = sorted(os.listdir(self.staging), key=lambda e: (e == _LAST, e))
            for entry in entries:
                target = out / entry
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
                os.rename(self.staging / entry, target)
            with contextlib.suppress(OSError):
                os.rmdir(self.staging)
            fsync_dir(out)
        fsync_dir(out.parent)
        self.release()
