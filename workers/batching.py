"""Request batching in a worker: the job that starts takes compatible jobs from the head of its queue into its
pipeline call (``Engine.run_members``; on a multi-device worker rank 0 takes them and every rank runs the call).

A consumer of our own, not celery-batches: that buffers messages in the worker's main process, which needs an
unbounded prefetch (``worker_prefetch_multiplier=0``), so one worker would hold every queued job while others idle
(and a dead one strands them until the visibility timeout), and it flushes on a timer, so a lone request waits.
Here, when a job starts, its pool process takes the next messages of the same queue (kombu's ``basic_get``) while
they are compatible (``fastgen.engine.batch.batch_key``; LoRAs may differ, up to the slots), up to
``FASTGEN_BATCH_MAX`` jobs; the first one that is not goes back to the front and runs next, so no job is overtaken
by a later one. With nothing queued it waits ``FASTGEN_BATCH_WAIT_MS`` at most (0, the default: not at all). Each
taken message stays unacknowledged until its job has ended, and its job is started and held in the job store like
any running job, so a worker that dies mid-batch loses none: the broker's sweep hands each back once its hold
lapses.

A job taken this way never passes through Celery's task machinery, so :class:`Companion` writes what Celery writes
for a task (started, progress, the result or the failure in the result backend) and the job store's final state
last, as ``JobTask`` does, then acknowledges its message.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery import states
from kombu import Connection

from fastgen.cache.embedder import PromptEmbedding
from fastgen.engine import Engine, ResolvedRequest
from fastgen.engine.batch import batch_key
from fastgen.errors import Cancelled
from fastgen.jobs import DEFAULT_TENANT, JobStore
from fastgen.workers.app import CANCELLED, PROGRESS, TASK_NAME, progress_meta, started_meta

if TYPE_CHECKING:
    from collections.abc import Iterator

    from celery.backends.base import Backend

logger = logging.getLogger(__name__)
POLL_S = 0.005  # how often an empty queue is asked again while a batch waits for company


def shared_by(resolved: ResolvedRequest) -> str:
    """What every job of a batch has in common with the first, as one comparable value."""
    return json.dumps(batch_key(resolved.request), sort_keys=True)


@dataclass
class Companion:
    """A job taken from the queue into a running job's batch: its message (acknowledged when the job has ended) and
    the job's state, written as Celery writes a task's."""

    message: Any
    job_id: str
    payload: dict
    tenant: str
    embedded: PromptEmbedding | None
    backend: Backend
    jobs: JobStore
    attempt: int = 0
    ended: bool = field(default=False, init=False)

    @classmethod
    def of(cls, message, backend: Backend, jobs: JobStore) -> Companion | None:
        """The fastgen job a message carries (None for anything else)."""
        headers = message.headers or {}
        if headers.get("task") != TASK_NAME:
            return None
        args, kwargs, _ = message.decode()
        tenant = kwargs.get("tenant") or DEFAULT_TENANT
        embedded = PromptEmbedding.from_message(kwargs.get("embedded"))
        return cls(message, headers["id"], args[0], tenant, embedded, backend, jobs)

    def start(self) -> None:
        self.attempt = self.jobs.started(self.job_id)
        logger.info("job %s: attempt %d, batched", self.job_id, self.attempt)
        self.backend.store_result(self.job_id, started_meta(self.attempt), states.STARTED)

    def progress(self, progress) -> None:
        self.backend.store_result(self.job_id, progress_meta(progress, self.attempt), PROGRESS)

    def cancelled(self, stopped: Cancelled) -> None:
        self._end(CANCELLED, {"step": stopped.step, "total": stopped.total}, "cancelled")

    def succeeded(self, result: dict) -> None:
        self._end(states.SUCCESS, result, "succeeded")

    def failed(self, message: str) -> None:
        from fastgen.workers.tasks import JobFailed

        self._end(states.FAILURE, JobFailed(message), "failed")

    def hand_back(self) -> None:
        """Back to the front of its queue, reading queued (its call broke off: a multi-device worker's rank died)."""
        if self.ended:
            return
        self.ended = True
        try:
            self.jobs.requeued(self.job_id)
        except Exception as exc:  # it reads running until its lease lapses, then queued
            logger.warning("job %s: could not mark it requeued: %s", self.job_id, exc)
        self.message.requeue()

    def _end(self, state: str, result: Any, final: str) -> None:
        if self.ended:
            return
        self.ended = True
        try:
            if state == states.FAILURE:
                self.backend.mark_as_failure(self.job_id, result)
            else:
                self.backend.store_result(self.job_id, result, state)
            self.jobs.finished(self.job_id, final)
        except Exception as exc:  # its hold lapses and the sweep hands it back: better run twice than be lost
            logger.warning(
                "job %s: could not record its end (%s): %s; it goes back to its queue", self.job_id, final, exc
            )
            self.message.requeue()
            return
        self.message.ack()
        logger.info("job %s: %s (batched)", self.job_id, final)


@contextmanager
def gathered(
    connection: Connection,
    queue: str,
    engine: Engine,
    lead: ResolvedRequest,
    jobs: JobStore,
    backend: Backend,
    max_jobs: int,
    wait_s: float,
) -> Iterator[list[tuple[Companion, ResolvedRequest]]]:
    """Take compatible jobs from the head of ``queue`` for ``lead``'s call, up to ``max_jobs`` in all (the lead
    included); on leaving, any taken message whose job has not ended goes back to its queue (the channel restores
    what it did not acknowledge)."""
    taken: list[tuple[Companion, ResolvedRequest]] = []
    channel = connection.channel()
    fits = Fits(shared_by(lead), engine.settings.lora_slots, {info.sha256 for info, _ in lead.adapters})
    try:
        _take(channel, queue, engine, fits, jobs, backend, max_jobs - 1, wait_s, taken)
        yield taken
    finally:
        for companion, _ in taken:
            if not companion.ended:
                companion.message.requeue()
        channel.close()


@dataclass
class Fits:
    """Whether a job can join the batch: the same shared settings, and no more adapters than the slots hold."""

    key: str
    slots: int
    adapters: set[str]

    def take(self, resolved: ResolvedRequest) -> bool:
        adapters = self.adapters | {info.sha256 for info, _ in resolved.adapters}
        if shared_by(resolved) != self.key or len(adapters) > self.slots:
            return False
        self.adapters = adapters
        return True


def _take(channel, queue, engine, fits: Fits, jobs, backend, wanted, wait_s, taken) -> None:
    deadline = time.monotonic() + wait_s
    while len(taken) < wanted:
        message = channel.basic_get(queue, no_ack=False)
        if message is None:
            if time.monotonic() >= deadline:
                return
            time.sleep(POLL_S)
            continue
        companion = Companion.of(message, backend, jobs)
        if companion is None:
            message.requeue()
            return
        if jobs.cancel_requested(companion.job_id):  # cancelled while it waited: dropped, as a task would drop it
            companion.cancelled(Cancelled(0, 0))
            continue
        try:
            resolved = engine.resolve(companion.payload)
        except Exception as exc:  # this job cannot run (a bad LoRA, say): it fails alone
            companion.start()
            companion.failed(str(exc))
            continue
        if not fits.take(resolved):
            message.requeue()  # to the front: it runs next
            return
        taken.append((companion, resolved))
