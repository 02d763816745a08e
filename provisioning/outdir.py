"""The bundle output folder: staged beside DIR, synced once, published by rename."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fleetpki.atomic_file import fsync_dir
from provisioning.errors import OutputDirError

STAGING_SUFFIX = ".partial"


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


@dataclass
class StagedOutput:
    """Bundles are written to a hidden sibling of DIR and only moved into DIR at the end.

    The sibling lives in DIR's parent, so publishing is a rename on one file system: a reader
    of DIR never sees a half-written batch, and a failed batch is removed in one place.
    """

    out_dir: Path
    staging: Path
    force: bool

    @classmethod
    def prepare(cls, out_dir: Path, *, force: bool) -> StagedOutput:
        out_dir = Path(out_dir).absolute()
        check_out_dir(out_dir, force)
        parent = out_dir.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            # mkdtemp creates the folder 0700 with a unique name: two runs never collide.
            staging = Path(
                tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=STAGING_SUFFIX, dir=parent)
            )
        except OSError as exc:
            raise OutputDirError(
                out_dir, f"cannot create files in {parent}: {exc.strerror or exc}"
            ) from exc
        return cls(out_dir, staging, force)

    def sync(self) -> None:
        sync_filesystem(self.staging)

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def publish(self) -> None:
        """Move the staged bundles into DIR; raises OSError (the staging folder stays)."""
        out = self.out_dir
        if not out.exists() or (out.is_dir() and _is_empty_dir(out)):
            # POSIX rename(2) atomically replaces an empty folder.
            os.rename(self.staging, out)
        else:
            # --force into a folder that already holds files: move entry by entry, replacing
            # same-named leftovers (an older bundle of a device id this batch now owns).
            for entry in sorted(os.listdir(self.staging)):
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
