"""A multi-device worker: N ranks serve one model queue together, each request spread over all of them.

``fastgen worker --devices N`` starts a supervisor and N rank processes in one torch.distributed group (NCCL on
GPUs, one device per rank; gloo on CPU). Rank 0 is the Celery worker (solo pool: the group lives in its process).
For each pipeline call (a job, and the compatible jobs it took from its queue: ``fastgen.workers.batching``) rank 0
resolves one :class:`RunPlan` (per job: the request with its model's defaults, the seed, the LoRAs with their files'
SHA-256, the approximate cache's decision) and hands it to the other ranks, which run exactly that plan
(``Engine.run_members``: nothing is validated, looked up or decided again) with the ``parallel`` accelerator bound
to the group's layouts (``fastgen.parallel.layout``), so only the denoiser's work is split. Rank 0 publishes
progress and stores the results.

The protocol (:class:`RankGroup`): rank 0 announces each plan by number on the *idle* group, where the others wait
between calls for as long as it takes; everything inside a call goes over the *job* group and the layouts' groups,
whose collectives wait at most FASTGEN_JOB_TIMEOUT_S. Per plan, in this order, every message carrying its number:
the plan; every rank's readiness per job (a job some rank cannot run, e.g. its own LoRA file is not the plan's,
fails on every rank: ``PlanRefused``; the others run); then, per job, the after-step agreement, before the first
step and after every step while the job is in the call (``RankGroup.agree_after_step``: rank 0's verdict, cancelled
or past the time limit, which the solo pool does not keep; every rank drops a job at the same step).

Failure: a collective that fails (a rank died) or waits past its bound (a rank hung) leaves the group out of step:
rank 0 hands every job of the call back to the queue (the running one through Celery ``Reject(requeue=True)``), or
fails them when a rank hung (``GroupTimedOut``), and stops; the supervisor takes the whole group down and exits
non-zero, to be restarted.
A rank 0 that is killed leaves its job unacknowledged, and the broker redelivers it (acks late).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastgen.accelerators import ACCELERATORS
from fastgen.cache import open_cache
from fastgen.cache.approximate import ApproximateCache, CacheRun, Hit, Lookup
from fastgen.engine import CancelFlag, Engine, Generation, Member, ResolvedRequest
from fastgen.errors import FastgenError
from fastgen.lora.library import LoraInfo, LoraLibrary, fingerprints
from fastgen.parallel import layout
from fastgen.parallel.groups import free_port
from fastgen.schema import GenerationRequest, image_seeds
from fastgen.settings import Settings
from fastgen.workers.app import create_celery, soft_time_limit, start_worker
from fastgen.workers.tasks import GroupBroken, WorkerContext, register_tasks, time_limit_message

logger = logging.getLogger(__name__)

IDLE_TIMEOUT = timedelta(days=3650)  # the other ranks wait on the idle group for the next job as long as it takes
STOP_GRACE_S = 20.0  # after one rank ends, how long the others get to stop before they are killed


@dataclass(frozen=True)
class CacheDecision:
    """The approximate cache's decision in a plan: a miss (``entry`` None), or a hit on ``entry`` that skips ``skip``
    steps and starts from ``hit``'s stored state, which travels with the plan: no other rank looks anything up."""

    entry: int | None = None
    skip: int = 0
    hit: Hit | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, run: CacheRun | None) -> CacheDecision | None:
        """None when the request does not use the cache."""
        if run is None:
            return None
        return cls(run.hit.entry.id, run.hit.skip, run.hit) if run.hit else cls()

    def for_helper(self, cache: ApproximateCache, pipe, job: PlannedJob) -> CacheRun:
        """A helper rank's use of it: resume from the same state; capture and store nothing (rank 0 does)."""
        return CacheRun(
            cache,
            pipe,
            job.model,
            None,
            image_seeds(job.seed, job.request.num_images),
            Lookup("", "", np.zeros(0, np.float32), hit=self.hit, policy=cache.policy_for(job.model)),
        )


@dataclass(frozen=True)
class PlannedJob:
    """One job of a plan as rank 0 resolved it."""

    job_id: str
    tenant: str
    model: str  # the model's registry name
    request: GenerationRequest  # validated, with the model's defaults filled and ``seed`` set
    seed: int
    loras: tuple[tuple[str, str, float], ...] = ()  # (name, SHA-256 of the file, scale): what every rank must load
    cache: CacheDecision | None = None  # None: the request does not use the approximate cache


@dataclass(frozen=True)
class RunPlan:
    """One pipeline call as rank 0 resolved it, which every rank runs as it is (pickled over the job group): the
    running job and the compatible jobs it took from its queue (``fastgen.workers.batching``), in that order."""

    number: int  # the call's number in this group: every message of it carries it
    jobs: tuple[PlannedJob, ...]

    @property
    def job_id(self) -> str:
        """The running job's (the batch's first)."""
        return self.jobs[0].job_id


class PlanRefused(FastgenError):
    """A rank cannot run the plan rank 0 resolved (e.g. its LoRA file is not the plan's): failed on every rank."""


class LoraMismatch(FastgenError):
    """This rank's LoRA of a plan's name is another file than rank 0's (its SHA-256 differs)."""


class JobTimedOut(FastgenError):
    """A group job past FASTGEN_JOB_TIMEOUT_S: stopped between steps on every rank, so the group stays in step."""


class GroupTimedOut(FastgenError):
    """A collective inside a job waited past its bound (a rank hung): the job fails and the group is restarted."""


class OutOfStep(RuntimeError):
    """The ranks disagree on which job or which step they are at: the group must be restarted."""


GO_ON, CANCEL, TIME_UP = 0, 1, 2  # rank 0's verdict after each step


@dataclass
class RankGroup:
    """This rank's place in the worker's group and the two gloo groups rank 0 speaks on (see the module).

    ``idle`` carries only the announcement of the next job (or of the end) and waits forever; ``job`` carries
    everything inside a job, and none of its collectives waits longer than ``timeout_s``.
    """

    rank: int
    size: int
    idle: Any  # gloo ProcessGroups spanning every rank
    job: Any
    timeout_s: float
    plan: RunPlan | None = None  # the job in progress (or the last one)
    broken: bool = False  # a collective failed or timed out: the ranks are out of step until the group restarts

    @classmethod
    def create(cls, rank: int, size: int, timeout_s: float) -> RankGroup:
        """Collective over the initialised default group: every rank calls it once, at start."""
        ranks = list(range(size))
        idle = dist.new_group(ranks, backend="gloo", timeout=IDLE_TIMEOUT)
        job = dist.new_group(ranks, backend="gloo", timeout=timedelta(seconds=timeout_s))
        return cls(rank, size, idle, job, timeout_s)

    @property
    def timeout(self) -> timedelta:
        return timedelta(seconds=self.timeout_s)

    def next_number(self) -> int:
        return self.plan.number + 1 if self.plan else 1

    def announce(self, plan: RunPlan) -> None:
        """Rank 0: hand ``plan`` to the other ranks (its number on the idle group, then the plan on the job group)."""
        self.plan = plan
        _broadcast((plan.number, plan.job_id), self.idle)
        _broadcast(plan, self.job)

    def next_plan(self) -> RunPlan | None:
        """Ranks 1..N-1: wait for rank 0's next plan; None when it announces there are no more jobs."""
        announced = _broadcast(None, self.idle)
        if announced is None:
            return None
        plan = _broadcast(None, self.job)
        if (plan.number, plan.job_id) != tuple(announced):
            raise OutOfStep(f"rank {self.rank} was announced job {announced}, then sent job {plan.number}")
        self.plan = plan
        return plan

    def release(self) -> None:
        """Rank 0: tell the other ranks there are no more jobs."""
        _broadcast(None, self.idle)

    def check_ready(self, plan: RunPlan, problems: list[str | None] | None = None) -> list[str | None]:
        """Every rank says, per job of ``plan``, whether it can run it (``problems``: why not, None where it can).

        Returns, per job, why some rank cannot run it (the job fails on every rank with PlanRefused), or None."""
        problems = problems or [None] * len(plan.jobs)
        answers: list = [None] * self.size
        dist.all_gather_object(answers, (plan.number, problems), group=self.job)
        if any(number != plan.number for number, _ in answers):
            raise OutOfStep(f"the ranks are at plans {[number for number, _ in answers]}, not all at {plan.number}")
        refusals = []
        for index in range(len(plan.jobs)):
            said = [
                f"rank {rank} cannot run this job's plan: {why[index]}"
                for rank, (_, why) in enumerate(answers)
                if why[index]
            ]
            refusals.append("; ".join(said) or None)
        return refusals

    def agree_after_step(self, plan: RunPlan, index: int, asked: int, verdict: int = GO_ON) -> int:
        """The group's one agreement per job per step (before the first step and after each): rank 0's ``verdict``.

        ``index``: the job's place in the plan; ``asked``: how many times this job asked before. Every rank sends
        (plan, job, asked), so a rank at another point of the run makes every rank raise OutOfStep rather than take a
        verdict meant for another.
        """
        mine = torch.tensor([plan.number, index, asked, verdict], dtype=torch.int64)
        rows = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(rows, mine, group=self.job)
        where = [tuple(row[:3].tolist()) for row in rows]
        if len(set(where)) > 1:
            raise OutOfStep(f"the ranks are at (plan, job, step) {where}")
        return int(rows[0][3])


def _broadcast(value: Any, group) -> Any:
    """Rank 0's ``value``, on every rank of ``group`` (collective)."""
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


class StepAgreement:
    """The cancel flag of one job of a group's run on every rank: each ask is one ``RankGroup.agree_after_step``.

    Every rank asks its jobs' flags alike (the engine asks each job's before anything is done for it and after each
    step while it is in the run; a job leaves on every rank at the same step). Rank 0's verdict: cancelled (its
    ``local`` flag), or past ``deadline`` (monotonic; raises JobTimedOut with ``limit_message`` on every rank):
    rank 0 runs Celery's solo pool, which enforces no time limit, so the group keeps it here.
    """

    def __init__(
        self,
        group: RankGroup,
        plan: RunPlan,
        index: int = 0,
        local: CancelFlag | None = None,
        deadline: float | None = None,
        limit_message: str = "the job ran longer than its time limit",  # rank 0's is the one reported
    ):
        self.group, self.plan, self.index, self.local = group, plan, index, local
        self.deadline, self.limit_message = deadline, limit_message
        self.asked = 0  # how many times this job's flag was asked

    def is_set(self) -> bool:
        mine = self._verdict() if self.group.rank == 0 else GO_ON
        verdict = self.group.agree_after_step(self.plan, self.index, self.asked, mine)
        self.asked += 1
        if verdict == TIME_UP:
            raise JobTimedOut(self.limit_message)
        return verdict == CANCEL

    def _verdict(self) -> int:
        if self.deadline is not None and time.monotonic() > self.deadline:
            return TIME_UP
        return CANCEL if self.local is not None and self.local.is_set() else GO_ON


def plan_members(engine: Engine, number: int, members: list[Member]) -> RunPlan:
    """Rank 0: the plan of a call for ``members`` (resolved requests), each member's cache looked up here, once.

    Each member's request gets its seed written in (every rank must draw the same starting noise) and its lookup
    (``Member.looked_up``), so the engine runs them as planned."""
    jobs = []
    for member in members:
        resolved = member.resolved
        request = resolved.request.model_copy(update={"seed": resolved.seed})
        member.resolved = ResolvedRequest(resolved.spec, request, resolved.seed, resolved.adapters)
        member.cached, member.looked_up = engine.look_up(engine.pool.get(resolved.spec)[0], member), True
        loras = fingerprints(resolved.adapters)
        cache = CacheDecision.of(member.cached)
        jobs.append(
            PlannedJob(member.result_id, member.tenant, resolved.spec.name, request, resolved.seed, loras, cache)
        )
    return RunPlan(number, tuple(jobs))


def held_adapters(library: LoraLibrary, job: PlannedJob) -> list[tuple[LoraInfo, float]]:
    """The job's LoRAs from this rank's library, each the very file rank 0 read; LoraError or LoraMismatch."""
    held = []
    for i, (name, sha256, scale) in enumerate(job.loras):
        info = library.get(name, f"loras[{i}]")
        if info.sha256 != sha256:
            raise LoraMismatch(
                f"loras[{i}]: its LoRA {name!r} ({info.path}) has SHA-256 {info.sha256[:16]}, rank 0's has"
                f" {sha256[:16]}; every rank needs the same file"
            )
        held.append((info, scale))
    return held


def lead(
    engine: Engine,
    group: RankGroup,
    members: list[Member],
    deadline: float | None = None,
    limit_message: str = "the job ran longer than its time limit",
) -> list[Generation | BaseException]:
    """Rank 0's side of one call: plan it, announce it, check every rank can run each job, run them together.

    Each member gets its Generation or what stopped it (Cancelled, or PlanRefused when a rank cannot run it).
    FastgenError raised: the call failed the same way on every rank, and the group serves the next. GroupTimedOut (a
    rank hung) or GroupBroken (a rank died): ``group.broken``, the group must be restarted.
    """
    if group.broken:
        raise GroupBroken("the worker group is out of step since an earlier job")
    plan = plan_members(engine, group.next_number(), members)
    try:
        group.announce(plan)
        refusals = group.check_ready(plan)
        runnable = []
        for index, (member, refused) in enumerate(zip(members, refusals, strict=True)):
            member.cancel = StepAgreement(group, plan, index, member.cancel, deadline, limit_message)
            if refused is None:
                runnable.append(member)
        outcomes = iter(engine.run_members(runnable) if runnable else [])
        return [PlanRefused(refused) if refused else next(outcomes) for refused in refusals]
    except FastgenError:
        raise  # the same on every rank; the group is still in step
    except Exception as exc:
        group.broken = True
        if not _timed_out(exc):
            raise GroupBroken(f"{type(exc).__name__}: {exc}") from exc
        logger.error("job %s: a collective timed out (%s)", plan.job_id, exc)
        raise GroupTimedOut(
            f"a rank of the worker group did not answer within {group.timeout_s:g}s (FASTGEN_JOB_TIMEOUT_S): it hung;"
            " the group restarts"
        ) from exc


def follow(engine: Engine, group: RankGroup) -> list[RunPlan]:
    """Ranks 1..N-1: run every plan rank 0 announces, until it announces the end; the plans run, in order."""
    ran = []
    while (plan := group.next_plan()) is not None:
        try:
            run_plan(engine, group, plan)
        except FastgenError:
            pass  # the same on every rank: rank 0 reports it
        except Exception:
            group.broken = True
            logger.exception("rank %d failed job %s: stopping the group", group.rank, plan.job_id)
            os._exit(1)
        ran.append(plan)
    return ran


def run_plan(engine: Engine, group: RankGroup, plan: RunPlan) -> list[Generation | BaseException]:
    """A helper rank's side of one call: check it can run each job of ``plan`` as it is, say so, and run the jobs
    every rank can run with rank 0."""
    problems: list[str | None] = []
    members: list[Member | None] = []
    for index, job in enumerate(plan.jobs):
        try:
            members.append(_helper_member(engine, group, plan, index, job))
            problems.append(None)
        except FastgenError as exc:
            members.append(None)
            problems.append(str(exc))
    refusals = group.check_ready(plan, problems)
    runnable = [member for member, refused in zip(members, refusals, strict=True) if refused is None]
    # Only rank 0's images are kept: the others stop at the latents rather than decode them to drop them.
    return engine.run_members(runnable, decode=False) if runnable else []


def _helper_member(engine: Engine, group: RankGroup, plan: RunPlan, index: int, job: PlannedJob) -> Member:
    """A helper rank's member for a planned job, or the FastgenError that says why this rank cannot run it."""
    spec = engine.registry.resolve(job.model)
    adapters = held_adapters(engine.loras, job)
    cached = None
    if job.cache is not None:
        if engine.cache is None:
            raise FastgenError("the plan resumes from the approximate cache, which this rank does not have")
        cached = job.cache.for_helper(engine.cache, engine.pool.get(spec)[0].pipe, job)
    resolved = ResolvedRequest(spec, job.request, job.seed, adapters)
    member = Member(resolved, job.job_id, job.tenant, cancel=StepAgreement(group, plan, index))
    member.cached, member.looked_up = cached, True
    return member


def _timed_out(exc: BaseException) -> bool:
    """A collective that waited past its bound (gloo: "Timed out waiting 20000ms for recv operation")."""
    return isinstance(exc, TimeoutError) or "timed out" in str(exc).lower()


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
    except SystemExit:
        raise
    except BaseException:
        logger.exception("rank %d stopped", rank)
        raise


def _serve_rank(rank: int, settings: Settings, models: list[str], devices: int, port: int) -> None:
    _join(rank, devices, port, settings)
    logger.info("rank %d of %d joined (pid %d)", rank, devices, os.getpid())
    group = RankGroup.create(rank, devices, job_collective_timeout_s(settings))
    engine = rank_engine(settings, models, group)
    if rank == 0:
        _serve_queue(settings, models, engine, group)
        if group.broken:  # nobody to release: the supervisor stops the others, and the group is started again
            logger.error("rank 0: the group fell out of step in job %s; stopping it", group.plan and group.plan.job_id)
            raise SystemExit(1)
        _release(group)
    else:
        follow(engine, group)
    dist.destroy_process_group()


def job_collective_timeout_s(settings: Settings) -> float:
    """How long any collective inside a job may wait for the other ranks: as long as a whole job may run."""
    return float(settings.job_timeout_s)


def rank_engine(settings: Settings, models: list[str], group: RankGroup) -> Engine:
    """This rank's engine: the ``parallel`` row bound to the group's layouts (built here: collective), the cache
    (rank 0 looks up and stores; the others take rank 0's lookups from its plans), ``models`` loaded."""
    settings = _rank_settings(settings, group.rank, group.size)
    # Rank 0 opens the cache first: ranks creating one SQLite store at once would lock each other out.
    cache = open_cache(settings) if group.rank == 0 else None
    dist.barrier(group=group.idle)
    cache = open_cache(settings) if group.rank else cache
    layouts = layout.RankLayouts.build(group.size, group.timeout)
    row = layout.accelerator(layouts, settings.parallel_mode)
    engine = Engine(settings, accelerators=ACCELERATORS + (row,), cache=cache)
    for name in models:
        engine.pool.get(engine.registry.resolve(name))
    dist.barrier(group=group.idle)  # no job before every rank has loaded: a job's collectives wait only so long
    return engine


def _release(group: RankGroup) -> None:
    """Tell the other ranks there are no more jobs (after a broken group there may be nobody to tell)."""
    try:
        group.release()
    except Exception as exc:
        logger.warning("could not release the other ranks (%s): the supervisor stops them", exc)


def _join(rank: int, devices: int, port: int, settings: Settings) -> None:
    backend = "nccl" if settings.device != "cpu" and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    # The default group only joins the ranks and builds the others (each with its own timeout); a minute more than
    # a job, for ranks that start slowly.
    timeout = timedelta(seconds=settings.job_timeout_s + 60)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=devices, timeout=timeout
    )


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


def _serve_queue(settings: Settings, models: list[str], engine: Engine, group: RankGroup) -> None:
    app = create_celery(settings, models)
    context = GroupWorkerContext(settings, engine, group)
    register_tasks(app, context)
    start_worker(app, models, pool="solo", concurrency=1, name=f"fastgen-{group.size}x-{os.getpid()}")


class GroupWorkerContext(WorkerContext):
    """Rank 0's WorkerContext: the same stores and batching, and an engine whose every call the whole group joins
    (``lead``)."""

    def __init__(self, settings: Settings, engine: Engine, group: RankGroup):
        super().__init__(settings)
        self.engine = engine  # overrides the cached single-device engine
        self.group = group

    def run_members(self, members: list[Member]) -> list[Generation | BaseException]:
        deadline = time.monotonic() + soft_time_limit(self.settings.job_timeout_s)  # as the prefork soft limit
        try:
            return lead(self.engine, self.group, members, deadline, time_limit_message(self.settings))
        finally:
            if self.group.broken:
                os.kill(os.getpid(), signal.SIGTERM)  # stop taking jobs once these are handed back or failed
