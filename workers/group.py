"""A multi-device worker: N ranks serve one model queue together, each request spread over all of them.

``fastgen worker --devices N`` starts a supervisor and N rank processes in one torch.distributed group (NCCL on
GPUs, one device per rank; gloo on CPU). Rank 0 is the Celery worker (solo pool: the group lives in its process).
For each job it fixes the seed and hands the job to the other ranks over a control group; every rank then runs
``Engine.run`` with the ``parallel`` accelerator bound to the group's layouts (``fastgen.parallel.layout``), so
only the denoiser's work is split. Rank 0 publishes progress and stores the result.

Everything every rank must agree on goes through the control group, from rank 0, at the same point of the run:
the job, whether it was cancelled or ran past FASTGEN_JOB_TIMEOUT_S (asked after every step: the solo pool keeps
no time limit), and the approximate cache's hit (its state is sent to the others, so no rank looks anything up by
itself).

Failure: when any rank dies the supervisor takes the whole group down and exits non-zero. A rank 0 whose
collective fails hands its job back to the queue (Celery ``Reject(requeue=True)``) before exiting; a rank 0 that
is killed leaves its job unacknowledged, and the broker redelivers it (acks late). Either way the job is not lost.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastgen.accelerators import ACCELERATORS
from fastgen.cache import open_cache
from fastgen.cache.approximate import CacheRun, Lookup
from fastgen.cache.embedder import PromptEmbedding
from fastgen.engine import CancelFlag, Engine, Generation, StepCallback
from fastgen.errors import FastgenError
from fastgen.parallel import layout
from fastgen.parallel.groups import free_port
from fastgen.settings import Settings
from fastgen.workers.app import create_celery, soft_time_limit, start_worker
from fastgen.workers.tasks import GroupBroken, WorkerContext, register_tasks, time_limit_message

logger = logging.getLogger(__name__)

IDLE_TIMEOUT = timedelta(days=3650)  # ranks wait on the control group for the next job as long as it takes
STOP_GRACE_S = 20.0  # after one rank ends, how long the others get to stop before they are killed


@dataclass(frozen=True)
class RankGroup:
    """This rank's place in the worker's group, and the control group rank 0 speaks on."""

    rank: int
    size: int
    control: Any  # a gloo ProcessGroup spanning every rank

    def share(self, value: Any = None) -> Any:
        """Rank 0's ``value``, on every rank (collective)."""
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]


@dataclass(frozen=True)
class GroupJob:
    payload: dict
    job_id: str
    tenant: str


class JobTimedOut(FastgenError):
    """A group job past FASTGEN_JOB_TIMEOUT_S: stopped between steps on every rank, so the group stays in step."""


GO_ON, CANCEL, TIME_UP = 0, 1, 2  # rank 0's verdict after each step


class GroupCancel:
    """Rank 0's verdict after each step, agreed by every rank at the same step (so all stop together).

    Cancelled (rank 0's ``local`` flag), or past ``deadline`` (monotonic; raises JobTimedOut with ``limit_message``
    on every rank): rank 0 runs Celery's solo pool, which enforces no time limit, so the group keeps it here.
    """

    def __init__(
        self,
        group: RankGroup,
        local: CancelFlag | None = None,
        deadline: float | None = None,
        limit_message: str = "the job ran longer than its time limit",  # rank 0's is the one reported
    ):
        self.group, self.local, self.deadline, self.limit_message = group, local, deadline, limit_message

    def is_set(self) -> bool:
        verdict = torch.tensor([self._verdict() if self.group.rank == 0 else GO_ON])
        dist.broadcast(verdict, src=0, group=self.group.control)
        if verdict.item() == TIME_UP:
            raise JobTimedOut(self.limit_message)
        return verdict.item() == CANCEL

    def _verdict(self) -> int:
        if self.deadline is not None and time.monotonic() > self.deadline:
            return TIME_UP
        return CANCEL if self.local is not None and self.local.is_set() else GO_ON


class GroupCache:
    """The approximate cache for a rank group: rank 0 looks up and stores; the others resume from its hit."""

    def __init__(self, cache, group: RankGroup):
        self.cache, self.group = cache, group

    def begin(
        self, pipe, model: str, request, seed: int, tenant: str, adapters: tuple = (), embedded=None
    ) -> CacheRun | None:
        if self.group.rank == 0:
            run = self.cache.begin(pipe, model, request, seed, tenant, adapters, embedded)
            self.group.share((run is not None, run.hit if run else None))
            return run
        used, hit = self.group.share()
        if not used:
            return None
        # No request: this rank captures and stores nothing (rank 0 does); it only resumes from the same state.
        return CacheRun(self.cache, pipe, model, None, seed, Lookup("", "", np.zeros(0, np.float32), hit=hit))


def check_models(specs: list, devices: int) -> None:
    unsplittable = [spec.name for spec in specs if "parallel" not in spec.supported_accelerations]
    if unsplittable:
        raise ValueError(
            f"--devices {devices}: {', '.join(unsplittable)} cannot be split over devices (fastgen splits Stable"
            " Diffusion, SDXL, PixArt and Wan pipelines); serve them from a single-device worker"
        )


def run_group_worker(settings: Settings, models: list[str], devices: int) -> int:
    """Start the rank group and supervise it; the exit code is non-zero when a rank failed."""
    from fastgen.models.registry import ModelRegistry

    registry = ModelRegistry(settings.model_dir)
    specs = [registry.resolve(name) for name in models]
    check_models(specs, devices)
    for spec in specs:
        registry.source(spec)  # build built-ins once, here, rather than N ranks racing to write the same files
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    context = mp.start_processes(
        _rank_main, args=(settings, models, devices, free_port()), nprocs=devices, join=False, start_method="spawn"
    )
    return _supervise(context.processes)


def _supervise(processes: list) -> int:
    """Wait until a rank ends; then take the group down. SIGTERM/SIGINT here stop rank 0, which releases the rest."""

    def stop(signum, frame):
        if processes[0].is_alive():
            os.kill(processes[0].pid, signal.SIGTERM)  # Celery's warm shutdown: the running job finishes first

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while all(p.is_alive() for p in processes):
        time.sleep(0.2)
    ended = next(rank for rank, p in enumerate(processes) if not p.is_alive())
    clean = ended == 0 and processes[0].exitcode == 0
    if not clean:
        code = processes[ended].exitcode
        logger.error("rank %d of the worker group exited with %s: stopping the group", ended, code)
        for p in processes:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)  # rank 0 hands a running job back to the queue before it stops
    deadline = time.monotonic() + STOP_GRACE_S
    while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in processes:
        if p.is_alive():
            p.kill()
        p.join()
    return 0 if clean and all(p.exitcode == 0 for p in processes) else 1


def _rank_main(rank: int, settings: Settings, models: list[str], devices: int, port: int) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {rank} %(name)s: %(message)s")
    try:
        _serve_rank(rank, settings, models, devices, port)
    except BaseException:
        logger.exception("rank %d stopped", rank)
        raise


def _serve_rank(rank: int, settings: Settings, models: list[str], devices: int, port: int) -> None:
    group = _join(rank, devices, port, settings)
    logger.info("rank %d of %d joined (pid %d)", rank, devices, os.getpid())
    settings = _rank_settings(settings, rank, devices)
    cache = open_cache(settings)
    row = layout.accelerator(layout.RankLayouts.build(devices), settings.parallel_mode)
    engine = Engine(settings, accelerators=ACCELERATORS + (row,), cache=GroupCache(cache, group) if cache else None)
    for name in models:
        engine.pool.get(engine.registry.resolve(name))
    if rank == 0:
        _serve_queue(settings, models, engine, group)
        _release(group)
    else:
        _follow(engine, group)
    dist.destroy_process_group()


def _release(group: RankGroup) -> None:
    """Tell the other ranks there are no more jobs (after a broken group there may be nobody to tell)."""
    try:
        group.share(None)
    except Exception as exc:
        logger.warning("could not release the other ranks (%s): the supervisor stops them", exc)


def _join(rank: int, devices: int, port: int, settings: Settings) -> RankGroup:
    backend = "nccl" if settings.device != "cpu" and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    # A job's collectives may wait at most as long as a job may run; the control group waits for jobs forever.
    timeout = timedelta(seconds=settings.job_timeout_s + 60)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=devices, timeout=timeout
    )
    control = dist.new_group(list(range(devices)), backend="gloo", timeout=IDLE_TIMEOUT)
    return RankGroup(rank, devices, control)


def _rank_settings(settings: Settings, rank: int, devices: int) -> Settings:
    # Every rank must run every step with the same weights: a LoRA swapped in the background could come on at a
    # different step on each rank, so ranks swap before the first step.
    settings = dataclasses.replace(settings, lora_apply_by_step=0)
    if torch.cuda.is_available() and settings.device != "cpu":
        return dataclasses.replace(settings, device=f"cuda:{rank}")
    # The worker's thread budget (OMP_NUM_THREADS, which `fastgen serve` sets per worker, else every core) is shared
    # by its ranks: more threads than cores make every rank spin and crawl.
    budget = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    torch.set_num_threads(max(1, budget // devices))
    return dataclasses.replace(settings, device="cpu")


def _follow(engine: Engine, group: RankGroup) -> None:
    """Ranks 1..N-1: run every job rank 0 hands over, until it hands over None."""
    while (job := group.share()) is not None:
        try:
            # Only rank 0's image is kept: the others stop at the latents rather than decode one to drop it.
            engine.run(job.payload, cancel=GroupCancel(group), result_id=job.job_id, tenant=job.tenant, decode=False)
        except FastgenError:
            pass  # the same on every rank: rank 0 reports it
        except Exception:
            logger.exception("rank %d failed job %s: stopping the group", group.rank, job.job_id)
            os._exit(1)


def _serve_queue(settings: Settings, models: list[str], engine: Engine, group: RankGroup) -> None:
    app = create_celery(settings, models)
    context = GroupWorkerContext(settings, engine, group)
    register_tasks(app, context)
    start_worker(app, models, pool="solo", concurrency=1, name=f"fastgen-{group.size}x-{os.getpid()}")


def _with_seed(payload: dict) -> dict:
    """Every rank must draw the same starting noise: rank 0 picks the seed a request leaves open."""
    return payload if payload.get("seed") is not None else {**payload, "seed": secrets.randbelow(2**31)}


class GroupWorkerContext(WorkerContext):
    """Rank 0's WorkerContext: the same stores, and an engine whose every run the whole group joins."""

    def __init__(self, settings: Settings, engine: Engine, group: RankGroup):
        super().__init__(settings)
        self.engine = engine  # overrides the cached single-device engine
        self.group = group

    def run(
        self,
        payload: dict,
        on_step: StepCallback,
        cancel: CancelFlag,
        result_id: str,
        tenant: str,
        embedded: PromptEmbedding | None = None,
    ) -> Generation:
        payload = _with_seed(payload)
        deadline = time.monotonic() + soft_time_limit(self.settings.job_timeout_s)  # as the prefork soft limit
        self.group.share(GroupJob(payload, result_id, tenant))
        try:
            cancel = GroupCancel(self.group, cancel, deadline, time_limit_message(self.settings))
            return self.engine.run(
                payload, on_step=on_step, cancel=cancel, result_id=result_id, tenant=tenant, embedded=embedded
            )
        except FastgenError:
            raise  # the same on every rank; the group is still in step
        except Exception as exc:
            os.kill(os.getpid(), signal.SIGTERM)  # stop taking jobs once this one is handed back
            raise GroupBroken(f"{type(exc).__name__}: {exc}") from exc
