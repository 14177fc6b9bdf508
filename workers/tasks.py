"""The generation task: thin, over the engine.

It validates the payload, runs the engine with a step callback that publishes progress and
honours cancellation, stores the artifacts and returns the result metadata. The stable public
name is ``fastgen.generate``; its one argument is a GenerationRequest as a JSON object, its keywords
``tenant`` (who owns the job; ``DEFAULT_TENANT`` when absent) and ``embedded`` (the door's prompt vector).

A job's outcome goes to Celery's result backend first and to the job store's final state last (``JobTask``), since
the store's final state is what every reader believes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import ExitStack
from functools import cached_property, partial
from typing import NoReturn

import torch
from celery import Celery, Task, states
from celery.exceptions import Ignore, Reject, SoftTimeLimitExceeded
from celery.worker.request import Request

from fastgen.artifacts import ArtifactStore
from fastgen.cache import open_cache
from fastgen.cache.embedder import PromptEmbedding
from fastgen.engine import CancelFlag, Engine, Generation, Member, Progress, ResolvedRequest, StepCallback
from fastgen.errors import Cancelled, FastgenError
from fastgen.jobs import DEFAULT_TENANT, JobStore, open_job_store
from fastgen.settings import Settings
from fastgen.workers import batching
from fastgen.workers.app import CANCELLED, PROGRESS, TASK_NAME, progress_meta, started_meta

logger = logging.getLogger(__name__)

LEASE_RENEW_S = 1.0  # how often a running job's lease is renewed (it lasts fastgen.jobs.LEASE_S)


class JobFailed(Exception):
    """A job that cannot succeed; its message is what the caller reads."""


class GroupBroken(Exception):
    """A multi-device worker's collective failed (a rank died or hung): the job goes back to the queue."""


class WorkerContext:
    """What one worker process keeps warm: the engine with its loaded models, and the stores."""

    def __init__(self, settings: Settings):
        self.settings = settings

    @cached_property
    def engine(self) -> Engine:
        return Engine(self.settings, cache=open_cache(self.settings))

    @cached_property
    def artifacts(self) -> ArtifactStore:
        return ArtifactStore(self.settings.artifact_url)

    @cached_property
    def jobs(self) -> JobStore:
        return open_job_store(self.settings.broker_url, self.settings.data_dir)

    def run(
        self,
        payload: dict,
        on_step: StepCallback,
        cancel: CancelFlag,
        result_id: str,
        tenant: str,
        embedded: PromptEmbedding | None = None,
    ) -> Generation:
        started = time.perf_counter()
        member = Member(self.engine.resolve(payload), result_id, tenant, on_step, cancel, embedded, started)
        (outcome,) = self.run_members([member])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def run_members(self, members: list[Member]) -> list[Generation | BaseException]:
        """One pipeline call for ``members`` (``Engine.run_members``); a multi-device worker's whole group joins it."""
        return self.engine.run_members(members)

    def batches(self) -> bool:
        """Whether a job takes compatible queued jobs into its call (``fastgen.workers.batching``)."""
        return self.settings.batch_max > 1

    def run_batched(
        self,
        task: Task,
        payload: dict,
        on_step: StepCallback,
        cancel: CancelFlag,
        tenant: str,
        embedded: PromptEmbedding | None = None,
    ) -> Generation:
        """The running job's generation, computed in one call with the compatible jobs at the head of its queue; each
        of those ends on its own (result, failure or cancel) as soon as the call is done."""
        resolved = self.engine.resolve(payload)  # a job that cannot run fails alone, before it takes any company
        lead = Member(resolved, task.request.id, tenant, on_step, cancel, embedded)
        lead.on_cancelled = partial(record_cancelled, task, self.jobs)  # it reads cancelled while the others finish
        with ExitStack() as stack:
            taken = self._gather(task, resolved, stack)
            members = [
                lead,
                *(self._member(companion, companion_resolved, stack) for companion, companion_resolved in taken),
            ]
            try:
                outcomes = self.run_members(members)
            except GroupBroken:  # every job of the call goes back to its queue (the lead's through Reject)
                for companion, _ in taken:
                    companion.hand_back()
                raise
            except BaseException as exc:  # the call failed: every job in it failed
                for companion, _ in taken:
                    companion.failed(failure_message(exc, self.settings) if isinstance(exc, Exception) else repr(exc))
                raise
            for (companion, _), outcome in zip(taken, outcomes[1:], strict=True):
                self._end(companion, outcome)
        if isinstance(outcomes[0], BaseException):
            raise outcomes[0]
        return outcomes[0]

    def _gather(self, task: Task, lead: ResolvedRequest, stack: ExitStack) -> list:
        queue = (task.request.delivery_info or {}).get("routing_key")
        if not queue:  # not from a queue (run eagerly): nothing to take
            return []
        connection = stack.enter_context(task.app.connection_for_read())
        wait_s, most = self.settings.batch_wait_ms / 1000, self.settings.batch_max
        return stack.enter_context(
            batching.gathered(connection, queue, self.engine, lead, self.jobs, task.backend, most, wait_s)
        )

    def _member(self, companion: batching.Companion, resolved: ResolvedRequest, stack: ExitStack) -> Member:
        """A taken job as a member of the call: started, held, with its own progress and cancel flag."""
        companion.start()
        stack.enter_context(Lease(self.jobs, companion.job_id))
        flag = CancelRequested(self.jobs, companion.job_id)
        member = Member(resolved, companion.job_id, companion.tenant, companion.progress, flag, companion.embedded)
        member.on_cancelled = companion.cancelled
        return member

    def _end(self, companion: batching.Companion, outcome: Generation | BaseException) -> None:
        if isinstance(outcome, Cancelled):
            companion.cancelled(outcome)
            return
        try:
            if isinstance(outcome, BaseException):
                raise outcome
            companion.succeeded(self.artifacts.save(outcome).model_dump(mode="json"))
        except Exception as exc:
            companion.failed(failure_message(exc, self.settings))

    def start_process(self, models: list[str], processes: int) -> None:
        """Share the CPU cores among the pool's processes and load the models before the first job."""
        if self.engine.device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
            # torch takes OMP_NUM_THREADS when set (`fastgen serve` sets it for several workers); more
            # threads than cores make every process spin and crawl.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes))
        for name in models:
            self.engine.pool.get(self.engine.registry.resolve(name))


class CancelRequested:
    """The engine's cancel flag for one job: asked of the job store between steps."""

    def __init__(self, jobs: JobStore, job_id: str):
        self.jobs, self.job_id = jobs, job_id

    def is_set(self) -> bool:
        return self.jobs.cancel_requested(self.job_id)


class Lease:
    """Renews a running job's lease in the job store from a thread, so a long step never makes a live job look lost."""

    def __init__(self, jobs: JobStore, job_id: str, every_s: float = LEASE_RENEW_S):
        self.jobs, self.job_id, self.every_s = jobs, job_id, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _renew(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.jobs.heartbeat(self.job_id)
            except Exception as exc:  # a store blip: the next renewal may get through before the lease lapses
                logger.warning("job %s: renewing its lease failed: %s", self.job_id, exc)


def request_class(context: WorkerContext) -> type[Request]:
    """Celery's request for our task, in the worker's main process, where a job is handed back to its queue."""

    class JobRequest(Request):
        def reject(self, requeue: bool = False) -> None:
            if requeue and not self.acknowledged:
                # Its pool process died or its group broke: it reads queued at once, not after its lease lapses.
                try:
                    context.jobs.requeued(self.id)
                except Exception as exc:
                    logger.warning("job %s: could not mark it requeued: %s", self.id, exc)
            super().reject(requeue=requeue)

    return JobRequest


def task_class(context: WorkerContext) -> type[Task]:
    """Our task's class, which records a job's final state in the job store once Celery stored its outcome."""

    class JobTask(Task):
        def after_return(self, status, retval, task_id, args, kwargs, einfo) -> None:
            # Celery calls this after it stored the result or the failure, in the pool process, or in the main one
            # for a job killed at its hard time limit (not for Ignore or Reject: a cancelled job records its own
            # end, a rejected one goes back to its queue). The store's final state, the one every reader believes,
            # is written last, so a job that reads succeeded always has its result to show.
            if status not in (states.SUCCESS, states.FAILURE):
                return
            try:
                context.jobs.finished(task_id, "succeeded" if status == states.SUCCESS else "failed")
            except Exception as exc:  # readers fall back on Celery's state, which holds the outcome already
                logger.warning("job %s: could not record its end (%s) in the job store: %s", task_id, status, exc)

    return JobTask


def register_tasks(app: Celery, context: WorkerContext) -> None:
    @app.task(name=TASK_NAME, bind=True, base=task_class(context), Request=request_class(context))
    def generate(task: Task, payload: dict, embedded: dict | None = None, tenant: str = DEFAULT_TENANT) -> dict:
        return run_job(task, context, payload, embedded, tenant)


def run_job(
    task: Task, context: WorkerContext, payload: dict, embedded: dict | None = None, tenant: str = DEFAULT_TENANT
) -> dict:
    """``embedded``: the prompt's cache vector, when the door computed it (bare Celery submissions have none);
    ``tenant``: who owns the job, from the task's message (the door puts it there; a bare submission may)."""
    job_id = task.request.id
    if context.jobs.cancel_requested(job_id):
        drop_cancelled(task, context.jobs, job_id)
    attempt = context.jobs.started(job_id)
    logger.info("job %s: attempt %d", job_id, attempt)
    # Our own STARTED (Celery's task_track_started is off: it would write it before the cancel check above).
    task.update_state(state=states.STARTED, meta=started_meta(attempt))
    on_step, cancel = progress_publisher(task, attempt), CancelRequested(context.jobs, job_id)
    embedded = PromptEmbedding.from_message(embedded)  # None when absent or malformed
    try:
        with Lease(context.jobs, job_id):
            if context.batches():
                generation = context.run_batched(task, payload, on_step, cancel, tenant, embedded)
            else:
                generation = context.run(payload, on_step, cancel, job_id, tenant, embedded)
            result = context.artifacts.save(generation)
    except GroupBroken as exc:
        logger.error("job %s: the worker group broke (%s); handing the job back to the queue", job_id, exc)
        raise Reject(str(exc), requeue=True) from None
    except Cancelled as exc:
        record_cancelled(task, context.jobs, exc)
        raise Ignore() from None
    except Exception as exc:
        raise JobFailed(failure_message(exc, context.settings)) from None  # JobTask records it failed
    logger.info("job %s: succeeded with %d artifact(s)", job_id, len(result.artifacts))  # Celery's line omits it
    return result.model_dump(mode="json")  # JobTask records it succeeded once Celery stored this


def record_cancelled(task: Task, jobs: JobStore, stopped: Cancelled) -> None:
    """The running job reads cancelled (after ``stopped.step`` steps): its meta, then the store's final state."""
    task.update_state(state=CANCELLED, meta={"step": stopped.step, "total": stopped.total})
    jobs.finished(task.request.id, "cancelled")


def drop_cancelled(task: Task, jobs: JobStore, job_id: str) -> NoReturn:
    """A job cancelled before it started: acknowledged and dropped, no attempt counted, its state cancelled.

    Its log line, written once the job is done with, is the sign that a worker took the job and dropped it."""
    # Usually the door already wrote both; not when the job was cancelled while it ran and its worker then died.
    record_cancelled(task, jobs, Cancelled(0, 0))
    logger.info("job %s: cancelled before it started; dropped", job_id)
    raise Ignore()


def progress_publisher(task: Task, attempt: int):
    def publish(progress: Progress) -> None:
        task.update_state(state=PROGRESS, meta=progress_meta(progress, attempt))

    return publish


def time_limit_message(settings: Settings) -> str:
    return f"the job ran longer than the limit of {settings.job_timeout_s}s (FASTGEN_JOB_TIMEOUT_S)"


def failure_message(exc: Exception, settings: Settings) -> str:
    if isinstance(exc, SoftTimeLimitExceeded):
        return time_limit_message(settings)
    if isinstance(exc, FastgenError):
        return str(exc)
    logger.exception("job failed")
    return f"internal error: {type(exc).__name__}: {exc}"
