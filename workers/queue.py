"""Submitting, reading and cancelling jobs: what the REST API and ``fastgen.workers.submit`` share.

A job is validated at the door (limits, then the model's capabilities, without loading the
model), registered in the job store and sent to its model's queue with the job id as the Celery
task id and its tenant in the message. Its status is told in five words: queued, running, succeeded,
failed, cancelled, by one rule (``JobQueue._status``): the job store's final state wins; Celery's
state (one ``get_task_meta``: state and meta in one read, so they cannot disagree) speaks only while
the store has none, and its meta gives the details (progress, the result, the error).
"""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import contextmanager
from typing import Any, Literal

from celery import Celery
from pydantic import BaseModel, ValidationError

from fastgen.cache import open_door_embedder
from fastgen.cache.embedder import DoorEmbedder
from fastgen.errors import FastgenError, InvalidRequest
from fastgen.jobs import FINAL_STATES, JobRecord, JobStore, StoreUnavailable, open_job_store, redis_fault
from fastgen.lora.library import LoraLibrary
from fastgen.models.registry import ModelRegistry
from fastgen.schema import GenerationRequest, GenerationResult, parse_request
from fastgen.settings import Settings
from fastgen.workers.app import CANCELLED, PROGRESS, TASK_NAME, create_celery, queue_name

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
logger = logging.getLogger(__name__)
CELERY_STATES: dict[str, JobState] = {
    "PENDING": "queued",
    "RECEIVED": "queued",
    "RETRY": "queued",
    "STARTED": "running",
    PROGRESS: "running",
    "SUCCESS": "succeeded",
    "FAILURE": "failed",
    "REVOKED": "cancelled",
    CANCELLED: "cancelled",
}


UNREADABLE = "the job's stored result is damaged and cannot be read; submit the job again"
LOST_WORKER = "the worker running attempt {attempt} stopped; the job waits in its queue to run again"


class JobNotFound(FastgenError):
    SHOWN_CHARS = 64  # a 404 never echoes an attacker's 100 kB id back

    def __init__(self, job_id: str):
        shown = job_id if len(job_id) <= self.SHOWN_CHARS else f"{job_id[: self.SHOWN_CHARS]}... ({len(job_id)} chars)"
        super().__init__(f"no job {shown!r}")


class QueueUnavailable(FastgenError):
    """The broker, result backend or job store cannot be reached."""


class JobProgress(BaseModel):
    step: int
    total: int
    eta_s: float = 0.0
    elapsed_s: float = 0.0


class JobStatus(BaseModel):
    id: str
    status: JobState
    model: str
    submitted_at: float
    progress: JobProgress | None = None
    result: GenerationResult | None = None
    error: str | None = None
    attempts: int = 0  # how many times a worker started it
    note: str | None = None  # why a job that had started reads queued again


class JobQueue:
    """The service's view of the job queue, for one set of served models."""

    def __init__(
        self,
        settings: Settings,
        celery: Celery | None = None,
        jobs: JobStore | None = None,
        registry: ModelRegistry | None = None,
        loras: LoraLibrary | None = None,
        door_embedder: DoorEmbedder | None = None,
    ):
        self.settings = settings
        # The door only names adapters; the workers read their tensors, so nothing is pre-read here.
        self.loras = loras or LoraLibrary(settings.lora_dir, host_bytes=0)
        self.registry = registry or ModelRegistry(settings.model_dir)
        self.models = settings.served_models(self.registry.names())
        self.celery = celery or create_celery(settings, self.models)
        self.jobs = jobs or open_job_store(settings.broker_url, settings.data_dir)
        # Cached requests' prompts are embedded here, while they wait for a worker, not on the worker's clock.
        self.door_embedder = door_embedder or open_door_embedder(settings)

    def validate(self, payload: Any) -> GenerationRequest:
        """The request with the model's defaults filled; InvalidRequest naming each bad field otherwise."""
        request = parse_request(payload, self.settings.limits)
        model = request.model or self.settings.default_model
        if model not in self.models:
            raise InvalidRequest.one("model", f"{model!r} is not served here; served models: {', '.join(self.models)}")
        request = self.registry.resolve(model).complete(request, self.settings.limits)
        for i, lora in enumerate(request.loras):
            self.loras.get(lora.name, f"loras[{i}]")  # unknown or unusable: a 422 that lists the library
        return request

    def submit(self, payload: Any, tenant: str) -> JobRecord:
        request = self.validate(payload)
        job = JobRecord(uuid.uuid4().hex, tenant, request.model, queue_name(request.model), time.time())
        embedded = self.door_embedder and self.door_embedder.embed(request.prompt, request.accelerate.cache.enabled)
        # The tenant travels in the message: the worker reads it there (a bare Celery submission has no record).
        kwargs, shown = {"tenant": tenant}, f"{{'tenant': {tenant!r}}}"
        if embedded:
            kwargs["embedded"] = embedded.message()
            shown = f"{{'tenant': {tenant!r}, 'embedded': (the prompt's embedding, not shown)}}"
        with self._reachable():
            self.jobs.add(job)
            self.celery.send_task(
                TASK_NAME,
                args=[request.model_dump(mode="json")],
                kwargs=kwargs,
                # What task events and Celery's logs show instead of the arguments, which hold the prompt.
                argsrepr="(the request, not shown)",
                kwargsrepr=shown,
                task_id=job.id,
                queue=job.queue,
                routing_key=job.queue,
                retry=False,
            )
        return job

    def job(self, job_id: str, tenant: str | None) -> JobRecord:
        """The job's record; JobNotFound for an unknown id or another tenant's job (existence is not leaked)."""
        with self._reachable():
            job = self.jobs.get(job_id)
        if job is None or (tenant is not None and job.tenant != tenant):
            raise JobNotFound(job_id)
        return job

    def status(self, job_id: str, tenant: str | None = None) -> JobStatus:
        job = self.job(job_id, tenant)
        return self._status(job, self._meta(job_id))

    def cancel(self, job_id: str, tenant: str | None = None) -> JobStatus:
        """Ask the job to stop: a queued job never starts, a running one stops at its next step."""
        job = self.job(job_id, tenant)
        with self._reachable():
            self.jobs.request_cancel(job_id)
            meta = self._meta(job_id)
            if self._status(job, meta).status == "queued":  # waiting, or back in the queue after its worker died
                self.celery.backend.store_result(job_id, {"step": 0, "total": 0}, CANCELLED)
                self.jobs.finished(job_id, "cancelled")
                meta = self._meta(job_id)
        return self._status(job, meta)

    def _meta(self, job_id: str) -> dict:
        """The backend's record of the job; one that cannot be read fails this job only, never the endpoint."""
        with self._reachable():
            try:
                return self.celery.backend.get_task_meta(job_id)
            except Exception as exc:
                if isinstance(exc, OSError) or _is_connection_error(exc):
                    raise  # the backend is unreachable: a 503, not this job's fault
                logger.warning("job %s: its result record cannot be read: %s", job_id, exc)
                return {"status": "FAILURE", "result": f"{UNREADABLE} ({type(exc).__name__}: {exc})"}

    def check(self) -> None:
        """Raise QueueUnavailable unless the job store and the broker answer."""
        with self._reachable():
            self.jobs.state_counts()
            with self.celery.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=2)

    def _status(self, job: JobRecord, meta: dict) -> JobStatus:
        """The job's status by the one rule that every reader goes through (``GET /v1/jobs/{id}``, its result, the
        client's wait and the web page, which poll it, and a cancel, which asks it whether the job still waits):

        **the job store's final state (succeeded, failed, cancelled) is the job's status whenever it has one.**
        Only while it has none does Celery's state speak: queued or running (queued again, with a note, once the
        running attempt's lease lapsed), or a final state the store never got (a job killed at its hard time
        limit, a result record that cannot be read). Celery's meta gives the details only: progress, the result,
        the error text (a generic one when Celery holds no failure for a job the store says failed).

        Every writer of an outcome (the worker's task class, the door's cancel) stores it in the result backend
        first and the store's final state last, so both agree once the store has spoken. One exception keeps
        broken data from being served: a success whose stored result does not validate reads failed.
        """
        final = job.state in FINAL_STATES
        state = job.state if final else CELERY_STATES.get(meta["status"], "running")
        status = JobStatus(
            id=job.id, status=state, model=job.model, submitted_at=job.submitted_at, attempts=job.attempts
        )
        if state == "running" and job.lease_lapsed:
            # The backend still holds the dead attempt's last progress; the job waits to be handed out again.
            status.status, status.note = "queued", LOST_WORKER.format(attempt=job.attempts)
            return status
        info = meta.get("result")
        if state in ("running", "cancelled") and isinstance(info, dict) and "step" in info:
            status.progress = JobProgress(**{k: info[k] for k in JobProgress.model_fields if k in info})
        elif state == "succeeded":
            try:
                status.result = GenerationResult.model_validate(info)
            except ValidationError as exc:
                logger.warning("job %s: its stored result does not validate: %s", job.id, exc)
                status.status, status.error = "failed", f"{UNREADABLE} (it is not a GenerationResult)"
        elif state == "failed":
            status.error = failure_text(info if meta["status"] == "FAILURE" else None)
        return status

    @contextmanager
    def _reachable(self):
        try:
            yield
        except (StoreUnavailable, OSError) as exc:
            raise QueueUnavailable(f"the job queue is unreachable: {exc}") from None
        except Exception as exc:
            if _is_connection_error(exc):
                raise QueueUnavailable(f"the job queue is unreachable: {exc}") from None
            raise


def failure_text(info: Any) -> str:
    if isinstance(info, dict) and "exc_message" in info:
        message = info["exc_message"]
        return " ".join(str(m) for m in message) if isinstance(message, list | tuple) else str(message)
    return str(info) if info else "the job failed"


def _is_connection_error(exc: Exception) -> bool:
    import kombu.exceptions

    return redis_fault(exc) or isinstance(exc, kombu.exceptions.OperationalError | TimeoutError)
