"""One-time downloads: secrets the console hands over exactly once (a batch's bundles with
their enrollment tokens, a service's private key), as a tar file kept in a private folder of
the home until its operator fetches it, then deleted. Nothing is kept after a restart."""

from __future__ import annotations

import os
import secrets
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from fleetpki.atomic_file import make_private_dir

# A download not fetched within this time is deleted: the secrets in it should not linger.
DOWNLOAD_LIFETIME = timedelta(hours=1)
CHUNK = 256 * 1024


class DownloadGone(Exception):
    def __init__(self, download_id: str) -> None:
        super().__init__(
            f"download {download_id[:16]!r} does not exist: it was fetched already, has expired "
            "(after an hour), or the server restarted"
        )


@dataclass
class Download:
    download_id: str
    operator_name: str
    filename: str
    what: str  # one line for the page: "bundles of batch lot-... (25 devices)"
    path: Path
    created_at: datetime

    @property
    def size(self) -> int:
        return self.path.stat().st_size


@dataclass
class Downloads:
    """Pending one-time downloads, in `root` (a 0700 folder of the home)."""

    root: Path | None
    _pending: dict[str, Download] = field(default_factory=dict)

    def workspace(self) -> Path:
        """A new private (0700) folder to build a download in; the caller removes it."""
        if self.root is None:
            raise DownloadGone("-")  # no home: nothing can be provisioned here anyway
        make_private_dir(self.root)
        return Path(tempfile.mkdtemp(prefix="work-", dir=self.root))

    def add_tree(
        self, folder: Path, *, operator_name: str, filename: str, what: str, now: datetime
    ) -> Download:
        """Pack `folder` (its files keep their modes: tokens and keys 0600) into a tar of
        its own, owned by `operator_name`; `folder` is removed."""
        assert self.root is not None
        download_id = secrets.token_urlsafe(24)
        target = self.root / f"{download_id}.tar"
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with (
            os.fdopen(fd, "wb") as out,
            tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar,
        ):
            for path in sorted(folder.rglob("*")):
                info = tar.gettarinfo(str(path), arcname=str(path.relative_to(folder)))
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if path.is_file():
                    with path.open("rb") as data:
                        tar.addfile(info, data)
                else:
                    tar.addfile(info)
        shutil.rmtree(folder, ignore_errors=True)
        download = Download(download_id, operator_name, filename, what, target, now)
        self._pending[download_id] = download
        self.expire(now)
        return download

    def peek(self, download_id: str, operator_name: str, now: datetime) -> Download:
        """The pending download, if it is this operator's (another's is as good as absent)."""
        self.expire(now)
        download = self._pending.get(download_id)
        if download is None or download.operator_name != operator_name:
            raise DownloadGone(download_id)
        return download

    def take(self, download_id: str, operator_name: str, now: datetime) -> Download:
        """Claim the download: from now on nobody else can; the caller sends then `done`s it."""
        download = self.peek(download_id, operator_name, now)
        del self._pending[download_id]
        return download

    @staticmethod
    def done(download: Download) -> None:
        download.path.unlink(missing_ok=True)

    def expire(self, now: datetime) -> None:
        """Delete this process's downloads past their lifetime, and any file or folder left in
        the folder for longer than that (by a process that crashed: they hold secrets). Another
        server on the same home keeps its own, younger, ones."""
        for key in [k for k, d in self._pending.items() if now - d.created_at > DOWNLOAD_LIFETIME]:
            self.done(self._pending.pop(key))
        if self.root is None or not self.root.exists():
            return
        oldest = (now - DOWNLOAD_LIFETIME).timestamp()
        for leftover in self.root.iterdir():
            if leftover.lstat().st_mtime < oldest:
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)

    def discard_all(self) -> None:
        """At shutdown: nothing pending survives the process (its ids die with it)."""
        for download in self._pending.values():
            self.done(download)
        self._pending.clear()
