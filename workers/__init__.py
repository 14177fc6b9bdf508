"""The Celery side of fastgen: app factory, thin tasks over the engine, worker bootstrap.

Installed as ``fastgen.workers``. Python users who talk to Celery directly submit with
:func:`submit`, or send the task ``fastgen.generate`` themselves with a GenerationRequest JSON
object as its one argument, to the queue ``fastgen.<model>`` (see :func:`queue_name`); its keyword
``tenant`` names who owns the job (the approximate cache's partition), ``fastgen.jobs.DEFAULT_TENANT`` when left out.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from celery.result import AsyncResult

from fastgen.jobs import DEFAULT_TENANT
from fastgen.settings import Settings
from fastgen.workers.app import TASK_NAME, create_celery, queue_name
from fastgen.workers.queue import JobQueue, JobStatus

__all__ = ["TASK_NAME", "JobQueue", "JobStatus", "create_celery", "queue_name", "submit"]


def submit(
    request: dict[str, Any],
    broker_url: str | None = None,
    settings: Settings | None = None,
    tenant: str = DEFAULT_TENANT,
) -> AsyncResult:
    """Validate ``request``, register it for ``tenant`` and queue it (the tenant travels in the task's message);
    ``.get()`` on the answer waits for the result dict.

    Only the broker URL is needed (``broker_url``, else ``FASTGEN_BROKER_URL``, else the embedded
    broker under ``FASTGEN_DATA_DIR``). Raises InvalidRequest naming each bad field. The job's status, as the REST
    API tells it, is ``JobQueue(settings).status(answer.id)``: the job store's final state wins over Celery's.
    """
    settings = settings or Settings.from_env()
    if broker_url is not None:
        settings = replace(settings, broker_url=broker_url)
    queue = JobQueue(settings)
    job = queue.submit(request, tenant)
    return queue.celery.AsyncResult(job.id)
