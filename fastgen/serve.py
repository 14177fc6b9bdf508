"""`fastgen serve`: the API, the UI and worker processes in one command.

Workers run as `fastgen worker` subprocesses, each in its own process group so that stopping
the service (Ctrl-C, SIGTERM) takes down each worker with its pool children: no orphans keep a
model in memory.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

from fastgen.settings import Settings

logger = logging.getLogger(__name__)
STOP_GRACE_S = 10


@dataclass
class WorkerProcesses:
    processes: list[subprocess.Popen]

    @classmethod
    def start(cls, count: int, models: list[str], concurrency: int = 1) -> WorkerProcesses:
        command = [sys.executable, "-m", "fastgen", "worker", "--models", ",".join(models)]
        command += ["--concurrency", str(concurrency)]
        # The workers share this host's cores: one thread pool each, sized so they do not oversubscribe.
        threads = str(max(1, (os.cpu_count() or 1) // max(1, count * concurrency)))
        env = {"OMP_NUM_THREADS": threads, **os.environ}
        return cls([subprocess.Popen(command, env=env, start_new_session=True) for _ in range(count)])

    def stop(self) -> None:
        """Warm-stop every worker at once, then make sure each is gone with its whole process group."""
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            stop_process_group(process)


def stop_process_group(process: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the group's leader (a warm shutdown), then SIGKILL whatever of its group is left."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        logger.warning("process %d did not stop in %ss; killing its group", process.pid, grace_s)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # pool children a dead parent left behind
    except ProcessLookupError:
        pass
    process.wait()


def serve(settings: Settings, workers: int = 1, models: list[str] | None = None) -> None:
    """Run until Ctrl-C: workers for ``models`` (default: every served model) and the API on host:port."""
    import uvicorn

    from fastgen.api import create_api
    from fastgen.models.registry import ModelRegistry

    models = models or settings.served_models(ModelRegistry(settings.model_dir).names())
    base = own_url(settings.host, settings.port)
    # The page is a client of this very API, over loopback HTTP.
    app = create_api(settings, ui_api_url=base, ui_api_key=settings.ui_api_key or None)
    pool = WorkerProcesses.start(workers, models)
    print(
        f"fastgen is serving {', '.join(models)} with {workers} worker(s) on "
        f"{settings.broker_url or 'the embedded broker'}\n  web page: {base}/ui\n  API docs: {base}/docs",
        flush=True,
    )
    # uvicorn re-raises the signal that stopped it once it has shut down; with these handlers that
    # becomes an exception here, so the workers are stopped before the process ends.
    signal.signal(signal.SIGTERM, _raise_exit)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        print("stopping workers", flush=True)
        pool.stop()


def own_url(host: str, port: int) -> str:
    """The URL this service answers on from its own host: a wildcard listen address means loopback."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _raise_exit(signum, frame) -> None:
    raise SystemExit(128 + signum)
