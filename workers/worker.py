"""`fastgen worker`: a Celery worker for some models on this host, its engine loaded once per process."""

from __future__ import annotations

import logging
import os

from celery.signals import worker_process_init

from fastgen.settings import Settings
from fastgen.workers.app import create_celery, start_worker
from fastgen.workers.tasks import WorkerContext, register_tasks

logger = logging.getLogger(__name__)


def run_worker(settings: Settings, models: list[str], concurrency: int = 1, warm: bool = True) -> None:
    """Serve ``models``' queues until stopped. Each pool process loads the models once and keeps them."""
    app = create_celery(settings, models)
    context = WorkerContext(settings)
    register_tasks(app, context)
    # Set up each pool process after the fork: CUDA and thread pools do not survive a fork.
    worker_process_init.connect(lambda **_: context.start_process(models if warm else [], concurrency), weak=False)
    logger.info("worker for %s on %s", ", ".join(models), settings.broker_url or "the embedded broker")
    start_worker(app, models, pool="prefork", concurrency=concurrency, name=f"fastgen-{os.getpid()}")
