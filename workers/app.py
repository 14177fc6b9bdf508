"""The Celery app factory: broker, result backend, queues and the settings that keep jobs safe.

Redis when ``FASTGEN_BROKER_URL`` names one; otherwise an embedded mode that needs no server:
Celery's filesystem broker and a file result backend under the data directory.

Crash safety (see FACTS.md): a job is acknowledged only after it finished (``task_acks_late``),
a worker that dies hands it back (``task_reject_on_worker_lost``), and Redis hands back what a
dead worker held after the visibility timeout, which is derived from the longest allowed job so
a slow job is never run twice; kombu sweeps for such jobs every second instead of every ~100 s.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import ssl
import warnings
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from celery import Celery
from celery.exceptions import SecurityWarning
from kombu import Exchange, Queue

from fastgen.jobs import REDIS_CONNECT_TIMEOUT_S, REDIS_TIMEOUT_S
from fastgen.settings import Settings

logger = logging.getLogger(__name__)
TASK_NAME = "fastgen.generate"
# Our own task states, here rather than in tasks.py so the API can read them without importing torch.
PROGRESS = "PROGRESS"
CANCELLED = "CANCELLED"
EXCHANGE = Exchange("fastgen", type="direct")
VISIBILITY_MARGIN_S = 30  # at most this long between a job's hard limit and Redis handing it to another worker


def queue_name(model: str) -> str:
    """One queue per model, so a worker only takes work for what it has loaded."""
    return "fastgen." + re.sub(r"[^A-Za-z0-9_-]+", "_", model).strip("_")


def started_meta(attempt: int) -> dict:
    """A running job's STARTED meta: which attempt, in which process."""
    return {"attempt": attempt, "pid": os.getpid()}


def progress_meta(progress, attempt: int) -> dict:
    """A running job's PROGRESS meta after a step (``progress``: a ``fastgen.engine.Progress``)."""
    return {
        "step": progress.step,
        "total": progress.total,
        "eta_s": round(progress.eta_s, 3),
        "elapsed_s": round(progress.elapsed_s, 3),
        "attempt": attempt,
    }


def visibility_timeout(job_timeout_s: int) -> int:
    """Longer than any job may run, so a slow job is never handed to a second worker while it runs."""
    return job_timeout_s + min(VISIBILITY_MARGIN_S, job_timeout_s)


def soft_time_limit(job_timeout_s: int) -> int:
    """When a job is stopped as too long (the hard limit, ``job_timeout_s``, kills its process a little later)."""
    return max(job_timeout_s - 5, 1)


def is_redis(url: str | None) -> bool:
    return bool(url) and url.startswith(("redis://", "rediss://"))


def create_celery(settings: Settings, models: list[str]) -> Celery:
    """A Celery app for ``settings`` whose queues are those of ``models``."""
    app = Celery("fastgen", set_as_current=False)
    app.conf.update(
        **_transport(settings),
        task_queues=[Queue(queue_name(m), EXCHANGE, routing_key=queue_name(m)) for m in models],
        task_create_missing_queues=False,
        task_default_exchange=EXCHANGE.name,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # No STARTED from Celery: the task writes it itself after its cancel check, so a job cancelled while it
        # waited never reads running.
        task_track_started=False,
        task_time_limit=settings.job_timeout_s,
        task_soft_time_limit=soft_time_limit(settings.job_timeout_s),
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=2,
        result_extended=True,
        result_expires=7 * 24 * 3600,
    )
    return app


class ResultsOutOfLogs(logging.Filter):
    """Celery's INFO line at a task's end ("Task ... succeeded in 0.4s: {...}") shows its return value, and a job's
    result holds its request, prompt and all; every tenant's prompts would land in the worker's log. This filter
    leaves the line and drops the value (and the arguments Celery passes along for custom handlers)."""

    HIDDEN = {"return_value": "(result not logged: it holds the prompt)", "args": "(not logged)", "kwargs": "()"}

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, dict) and "return_value" in record.args:
            record.args = record.data = {**record.args, **self.HIDDEN}
        return True


def keep_results_out_of_logs() -> None:
    """Install ResultsOutOfLogs on Celery's task trace logger (once; pool processes inherit it when they fork)."""
    trace = logging.getLogger("celery.app.trace")
    if not any(isinstance(f, ResultsOutOfLogs) for f in trace.filters):
        trace.addFilter(ResultsOutOfLogs())


def start_worker(app: Celery, models: list[str], pool: str, concurrency: int, name: str) -> None:
    """Consume ``models``' queues until stopped (no gossip or mingle: workers share nothing but the broker)."""
    keep_results_out_of_logs()
    calm_start()
    app.Worker(
        queues=[queue_name(m) for m in models],
        concurrency=concurrency,
        pool=pool,
        loglevel="INFO",
        hostname=f"{name}@{socket.gethostname()}",
        without_gossip=True,
        without_mingle=True,
        quiet=True,  # no banner: fastgen says what it serves in one line
    ).start()


def calm_start() -> None:
    """A worker's start says what starts and when it is ready, not what merely looks like failures: faiss's search
    for CPU-specific builds (INFO lines about modules it cannot load) is hidden, and Celery's eight-line warning about
    running as root becomes one line."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=SecurityWarning)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        logger.warning("the worker runs as root; a user of its own is safer (Celery's advice)")


def _transport(settings: Settings) -> dict:
    if is_redis(settings.broker_url):
        return {
            "broker_url": settings.broker_url,
            **_front_requeue(settings.broker_url),
            "result_backend": settings.broker_url,
            "broker_transport_options": {
                "visibility_timeout": visibility_timeout(settings.job_timeout_s),
                "unacked_restore_interval": 1,
                "unacked_restore_throttle": 1,
                "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_S,
                "socket_timeout": REDIS_TIMEOUT_S,  # a hung Redis fails a submission in seconds (default: never)
            },
            "result_backend_transport_options": {"socket_connect_timeout": REDIS_CONNECT_TIMEOUT_S},
            "redis_socket_connect_timeout": REDIS_CONNECT_TIMEOUT_S,
            "redis_socket_timeout": REDIS_TIMEOUT_S,  # Celery's default is 120 s
            "redis_retry_on_timeout": False,
            "redis_backend_health_check_interval": 30,
        }
    if settings.broker_url:
        return {"broker_url": settings.broker_url, "result_backend": f"file://{_folder(settings, 'results')}"}
    messages = _folder(settings, "broker")
    return {
        "broker_url": "filesystem://localhost//",  # a host, though unused: kombu warns at every start without one
        "broker_transport": "fastgen.workers.transport:FilesystemTransport",  # a requeued job goes first
        "broker_transport_options": {
            "data_folder_in": str(messages),
            "data_folder_out": str(messages),
            "processed_folder": str(_folder(settings, "broker-processed")),
            "control_folder": str(_folder(settings, "broker-control")),  # default is ./control in the cwd
            "store_processed": False,
            "polling_interval": 0.05,
        },
        "result_backend": f"file://{_folder(settings, 'results')}",
    }


def _front_requeue(url: str) -> dict:
    """The Redis transport that requeues a job at the front (fastgen.workers.transport).

    kombu turns TLS on from the URL's scheme, which a transport class does not carry, so for rediss:// the URL's
    own TLS settings (``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, what Celery's result
    backend already requires there) are handed to the broker as ``broker_use_ssl``.
    """
    front = {"broker_transport": "fastgen.workers.transport:RedisTransport"}
    if url.startswith("redis://"):
        return front
    return front | {"broker_use_ssl": tls_options(url)}


CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


def tls_options(url: str) -> dict:
    """A rediss:// URL's TLS settings as the Redis client takes them."""
    query = parse_qs(urlsplit(url).query)
    options = {name: query[name][-1] for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile") if name in query}
    reqs = query.get("ssl_cert_reqs", ["required"])[-1].lower().removeprefix("cert_")
    if reqs not in CERT_REQS:
        raise ValueError(f"FASTGEN_BROKER_URL: ssl_cert_reqs must be one of {', '.join(CERT_REQS)}, got {reqs!r}")
    return options | {"ssl_cert_reqs": CERT_REQS[reqs]}


def _folder(settings: Settings, name: str) -> Path:
    folder = settings.data_dir / "queue" / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder
