"""Batch creations the console runs in the background, with their progress for the page."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import datetime

MAX_JOBS = 100


@dataclass
class BatchJob:
    """One batch being created: provisioning's progress reports (phase, done, total), then
    the batch id and the one-time download of its bundles, or the error that stopped it."""

    job_id: str
    operator_name: str
    count: int
    started_at: datetime
    phase: str = "starting"
    done: int = 0
    total: int = 0
    batch_id: str | None = None
    download_id: str | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.download_id is not None or self.error is not None

    @property
    def percent(self) -> int:
        return 100 if self.finished else int(100 * self.done / self.total) if self.total else 0

    def progress(self, phase: str, done: int, total: int) -> None:
        """provisioning.batch.Progress; called from the worker thread (plain assignments)."""
        self.phase, self.done, self.total = phase, done, total


@dataclass
class BatchJobs:
    _jobs: dict[str, BatchJob] = field(default_factory=dict)

    def start(self, operator_name: str, count: int, now: datetime) -> BatchJob:
        while len(self._jobs) >= MAX_JOBS:
            del self._jobs[next(iter(self._jobs))]
        job = BatchJob(secrets.token_urlsafe(12), operator_name, count, now)
        self._jobs[job.job_id] = job
        return job

    def get(self, job_id: str, operator_name: str) -> BatchJob | None:
        """The job, if it is this operator's."""
        job = self._jobs.get(job_id)
        return job if job is not None and job.operator_name == operator_name else None
