"""Benchmark of the job service's own overhead per job: REST submit to result seen, minus the engine's work.

What runs, exactly as a deployment runs it, as real processes on loopback:
- a private ``redis-server`` on a free port (``--save "" --appendonly no``) as broker, result backend and job store;
- ``--workers`` (default 2) ``python -m fastgen worker --models tiny-sd`` processes, concurrency 1 each,
  ``OMP_NUM_THREADS=1``;
- ``python -m fastgen serve --workers 0`` (the API alone, one uvicorn process);
- ``FASTGEN_DATA_DIR`` in a temporary folder, removed at the end with every process group (also on Ctrl-C).

Each client is a thread with its own ``fastgen.client.FastgenClient`` (httpx, keep-alive): it submits a job
(``tiny-sd``, 64x64, 1 step, so the engine's part is small), polls ``GET /v1/jobs/{id}`` every ``--poll-ms``
until the job is final, records it and submits the next (a closed loop). Each phase (``--concurrency 1,32``)
runs warm-up jobs first (at least one per client), then ``--jobs`` measured jobs, and keeps the load on until
the last measured job is seen, so the measured jobs all run at the phase's concurrency.

Per job:
- ``e2e``: from just before the POST to the moment the client read the final status;
- ``engine``: ``timings.total_s + timings.encode_s`` from the result (the engine's wall time and writing the
  image), which is engine work, not service overhead;
- ``overhead = e2e - engine``. It includes the time a job waits in the queue while every worker is busy with
  other jobs, which at 32 clients on 2 workers is most of it;
- ``busy_wait``: that queue wait, measured without touching the service: the previous job on the same worker
  ended at its ``date_done`` (Celery's result meta, written by the worker; ``result_extended`` names the
  worker), and the job was registered at ``submitted_at`` (the API's clock, in the status). Both are wall
  clocks of this one host. ``busy_wait = max(0, previous date_done - submitted_at)``;
- ``queue_free = overhead - busy_wait``: the per-job cost of the service itself, including broker delivery to a
  free worker, the worker's bookkeeping, the result write and the client seeing it (half a poll interval on
  average). It is split into ``api`` (POST start to ``submitted_at``), ``worker`` (``submitted_at`` to
  ``date_done`` less busy wait and engine) and ``observe`` (``date_done`` to the client reading it).

Also measured: the "plain" reference, ``Engine.run`` on the same request in this process (median of
``--plain-runs`` after warm-up, with as many torch threads as a worker gives itself), side by side with the
service's p50 end to end and throughput.

The project's goal is a p50 overhead under 15 ms at one client with Redis; the run prints whether it is met.
All processes share this machine's cores with the clients, so the numbers are for this machine under the load
it had: each phase records the CPU cores its parts used (clients, API, workers, Redis, by process group, from
/proc) and those used by every other process, so other work running beside the benchmark shows.

Run from the repository root (about 3 minutes on 2 CPU cores, most of it the 32-client phase)::

    HF_HUB_OFFLINE=1 python benchmarks/service_overhead.py
    HF_HUB_OFFLINE=1 python benchmarks/service_overhead.py --workers 2 --concurrency 1,8,32 --jobs 100,160,320

Writes ``service_overhead.json`` (settings, machine, summaries and every measured job) and
``service_overhead.md`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import celery
import diffusers
import fastapi
import httpx
import kombu
import redis
import torch
import uvicorn

from fastgen.client import FINAL, FastgenClient
from fastgen.engine import Engine
from fastgen.settings import Settings

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from services import Process, RedisServer, free_port, service_env, wait_until, worker  # noqa: E402  (the service tests' helpers)

logger = logging.getLogger("benchmarks.service_overhead")

DEFAULT_OUT = REPO / "benchmarks" / "results"
MODEL = "tiny-sd"
GOAL_P50_OVERHEAD_MS = 15.0  # at one client, with Redis
STARTUP_TIMEOUT_S = 180


@dataclass
class JobSample:
    """One job as its client saw it, completed afterwards with what the worker wrote (``date_done``, ``worker``)."""

    id: str
    ticket: int
    role: str  # warmup, measured or cooldown
    client: int
    submit_wall: float  # time.time() just before the POST
    observed_wall: float  # time.time() when the final status was read
    e2e_s: float  # perf_counter, same two moments
    submit_s: float  # the POST's round trip
    polls: int
    status: str
    submitted_at: float  # the API's time.time() when it registered the job
    engine_s: float = 0.0  # timings.total_s + timings.encode_s
    date_done: float | None = None  # the worker's time.time() when it stored the result
    worker: str | None = None
    busy_wait_s: float | None = None

    @property
    def overhead_s(self) -> float:
        return self.e2e_s - self.engine_s


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="`fastgen worker` processes, concurrency 1 each")
    parser.add_argument("--concurrency", default="1,32", help="comma-separated client counts, one phase each")
    parser.add_argument("--jobs", default="100,320", help="measured jobs per phase (one value, or one per phase)")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up jobs per phase (at least one per client)")
    parser.add_argument("--poll-ms", type=float, default=5.0, help="the clients' status poll interval")
    parser.add_argument("--size", type=int, default=64, help="image width and height")
    parser.add_argument("--steps", type=int, default=1, help="denoising steps per job")
    parser.add_argument("--plain-runs", type=int, default=20, help="timed in-process Engine.run calls")
    parser.add_argument("--job-timeout", type=float, default=120.0, help="seconds a client waits for one job")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the .json and .md results")
    args = parser.parse_args(argv)
    args.concurrency = _ints(args.concurrency, "--concurrency")
    jobs = _ints(args.jobs, "--jobs")
    if len(set(args.concurrency)) != len(args.concurrency):
        parser.error("--concurrency names each client count once")
    if len(jobs) not in (1, len(args.concurrency)):
        parser.error("--jobs takes one value or one per --concurrency value")
    args.jobs = jobs * len(args.concurrency) if len(jobs) == 1 else jobs
    if args.workers < 1 or args.poll_ms < 0 or args.plain_runs < 1:
        parser.error("--workers and --plain-runs must be positive and --poll-ms not negative")
    return args


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{name} must be comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"{name} must name at least one positive number, got {text!r}")
    return values


def job_request(args: argparse.Namespace) -> dict[str, Any]:
    return {"prompt": "a red circle", "model": MODEL, "width": args.size, "height": args.size, "steps": args.steps}


# --- the plain reference -------------------------------------------------------------------------------------


def worker_threads() -> int:
    """The torch threads each worker runs with: they are started with ``OMP_NUM_THREADS=1`` (``service_env``)."""
    return 1


def plain_reference(data_dir: Path, request: dict[str, Any], runs: int) -> dict[str, Any]:
    """``Engine.run`` on the request in this process: the speed with no service around it.

    Also builds the built-in model into ``data_dir``, so the workers only load it.
    """
    torch.set_num_threads(worker_threads())
    engine = Engine(Settings(data_dir=data_dir))
    for seed in range(3):  # the first loads the model
        engine.run({**request, "seed": seed})
    wall, total = [], []
    for seed in range(runs):
        start = time.perf_counter()
        result = engine.run({**request, "seed": seed}).result
        wall.append(time.perf_counter() - start)
        total.append(result.timings.total_s)
    return {
        "runs": runs,
        "torch_threads": torch.get_num_threads(),
        "run_ms_median": 1000 * statistics.median(wall),
        "run_ms_min": 1000 * min(wall),
        "engine_total_ms_median": 1000 * statistics.median(total),
    }


# --- the service ---------------------------------------------------------------------------------------------


@dataclass
class Service:
    """The running service: its Redis, its workers and its API."""

    redis: RedisServer
    url: str
    workers: list[Process]
    api: Process

    @property
    def processes(self) -> list[Process]:
        return [*self.workers, self.api]

    def cpu_groups(self) -> dict[str, list[int]]:
        """Process groups by part, for CpuMeter ("clients" is this process)."""
        workers = [w.process.pid for w in self.workers]
        return {"clients": [], "api": [self.api.process.pid], "workers": workers, "redis": [self.redis.process.pid]}


def start_service(stack: ExitStack, workdir: Path, workers: int) -> Service:
    """Redis, the workers and the API, each stopped by ``stack`` however the run ends; returns once all are warm."""
    server = RedisServer(workdir)
    stack.callback(server.stop)
    env = service_env(workdir / "data", broker_url=server.url)
    procs = []
    for i in range(workers):
        procs.append(worker(env, workdir / f"worker-{i}.log", models=MODEL))
        stack.callback(procs[-1].stop)
    port = free_port()
    api = Process(["serve", "--workers", "0", "--port", str(port)], env, workdir / "api.log")
    stack.callback(api.stop)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _api_up(api, url), STARTUP_TIMEOUT_S, f"the API on {url}", 0.2)
    for proc in procs:
        wait_until(lambda p=proc: _worker_warm(p), STARTUP_TIMEOUT_S, f"worker {proc.log_path.name}", 0.2)
    return Service(server, url, procs, api)


def _api_up(api: Process, url: str) -> bool:
    if api.process.poll() is not None:
        raise RuntimeError(f"the API exited:\n{api.log()[-3000:]}")
    try:
        return httpx.get(f"{url}/openapi.json", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _worker_warm(proc: Process) -> bool:
    """Celery says ready before its pool process has loaded the model; wait for both."""
    if proc.process.poll() is not None:
        raise RuntimeError(f"a worker exited:\n{proc.log()[-3000:]}")
    log = proc.log()
    return " ready." in log and f"loaded {MODEL}" in log


def check_alive(procs: list[Process]) -> None:
    dead = [p.log_path.name for p in procs if p.process.poll() is not None]
    if dead:
        raise RuntimeError(f"service processes exited during the run: {', '.join(dead)}")


def _stat_fields(pid: int | str) -> list[str] | None:
    """/proc/<pid>/stat after the command name: state, ppid, pgrp, ... (utime and stime at 11 and 12)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


class CpuMeter:
    """CPU time of the benchmark's own parts (by process group) and of everything else on the machine."""

    def __init__(self, groups: dict[str, list[int]]):
        self.groups = groups  # name -> process group ids; "clients" is this process
        self.ticks = os.sysconf("SC_CLK_TCK")

    def snapshot(self) -> tuple[dict[str, float], float]:
        used = dict.fromkeys(self.groups, 0)
        owner = {pgid: name for name, pgids in self.groups.items() for pgid in pgids}
        for entry in Path("/proc").iterdir():
            fields = _stat_fields(entry.name) if entry.name.isdigit() else None
            if fields is None:
                continue
            name = "clients" if int(entry.name) == os.getpid() else owner.get(int(fields[2]))
            if name is not None:
                used[name] += int(fields[11]) + int(fields[12])
        cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        used["busy"] = sum(cpu) - cpu[3] - cpu[4]  # all but idle and iowait
        return {name: jiffies / self.ticks for name, jiffies in used.items()}, time.perf_counter()

    def cores(self, before: tuple[dict[str, float], float]) -> dict[str, float]:
        """Cores used per part since ``before`` (a snapshot); "other" is the rest of the machine."""
        (start, t0), (end, t1) = before, self.snapshot()
        used = {name: (end[name] - start[name]) / (t1 - t0) for name in start}
        used["other"] = used.pop("busy") - sum(used.values())
        return used


# --- the clients ---------------------------------------------------------------------------------------------


class Tickets:
    """Hands out job numbers: the first ``warmup`` warm up, the next ``measured`` count, later ones keep the load."""

    def __init__(self, warmup: int, measured: int):
        self.warmup, self.measured = warmup, measured
        self.lock = threading.Lock()
        self.next = 0
        self.measured_seen = 0
        self.done = threading.Event()

    def take(self) -> tuple[int, str] | None:
        with self.lock:
            if self.done.is_set():
                return None
            ticket, self.next = self.next, self.next + 1
        return ticket, self.role(ticket)

    def role(self, ticket: int) -> str:
        if ticket < self.warmup:
            return "warmup"
        return "measured" if ticket < self.warmup + self.measured else "cooldown"

    def seen(self, role: str) -> None:
        if role != "measured":
            return
        with self.lock:
            self.measured_seen += 1
            if self.measured_seen == self.measured:
                self.done.set()


def run_client(
    index: int, url: str, request: dict, tickets: Tickets, args: argparse.Namespace, out: list, errors: list
) -> None:
    """Submit, poll until final, record, repeat, until the tickets run out."""
    try:
        with FastgenClient(url, timeout_s=args.job_timeout) as client:
            while (taken := tickets.take()) is not None:
                ticket, role = taken
                out.append(one_job(client, index, ticket, role, {**request, "seed": ticket}, args))
                tickets.seen(role)
    except BaseException as exc:  # reported by the main thread
        errors.append(exc)
        tickets.done.set()


def one_job(client: FastgenClient, index: int, ticket: int, role: str, request: dict, args) -> JobSample:
    poll_s = args.poll_ms / 1000
    submit_wall, start = time.time(), time.perf_counter()
    job = client.submit(request)
    submit_s = time.perf_counter() - start
    deadline = start + args.job_timeout
    polls = 0
    while True:
        status = client.status(job["id"])
        polls += 1
        if status["status"] in FINAL:
            break
        if time.perf_counter() > deadline:
            raise TimeoutError(f"job {job['id']} still {status['status']} after {args.job_timeout}s")
        time.sleep(poll_s)
    e2e_s, observed_wall = time.perf_counter() - start, time.time()
    timings = (status.get("result") or {}).get("timings") or {}
    return JobSample(
        id=job["id"],
        ticket=ticket,
        role=role,
        client=index,
        submit_wall=submit_wall,
        observed_wall=observed_wall,
        e2e_s=e2e_s,
        submit_s=submit_s,
        polls=polls,
        status=status["status"],
        submitted_at=status["submitted_at"],
        engine_s=timings.get("total_s", 0.0) + timings.get("encode_s", 0.0),
    )


def run_phase(url: str, concurrency: int, measured: int, request: dict, args, procs: list[Process]) -> list:
    warmup = max(args.warmup, concurrency)
    tickets = Tickets(warmup, measured)
    samples: list[JobSample] = []
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=run_client, args=(i, url, request, tickets, args, samples, errors), daemon=True)
        for i in range(concurrency)
    ]
    logger.info("phase: %d client(s), %d warm-up + %d measured jobs", concurrency, warmup, measured)
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):  # short joins, so Ctrl-C reaches this thread
        for thread in threads:
            thread.join(0.2)
        check_alive(procs)
    if errors:
        raise RuntimeError(f"a client failed: {errors[0]!r}") from errors[0]
    return samples


# --- what the workers wrote ----------------------------------------------------------------------------------


def add_worker_times(samples: list[JobSample], redis_url: str) -> None:
    """Each job's ``date_done`` and ``worker`` from Celery's result meta, then its busy wait (read only)."""
    client = redis.Redis.from_url(redis_url)
    pipe = client.pipeline(transaction=False)
    for sample in samples:
        pipe.get(f"celery-task-meta-{sample.id}")
    for sample, raw in zip(samples, pipe.execute(), strict=True):
        meta = json.loads(raw) if raw else {}
        if meta.get("date_done"):
            sample.date_done = datetime.fromisoformat(meta["date_done"]).timestamp()
            sample.worker = meta.get("worker")
    client.close()
    by_worker: dict[str, list[JobSample]] = {}
    for sample in samples:
        if sample.worker is not None:
            by_worker.setdefault(sample.worker, []).append(sample)
    for jobs in by_worker.values():
        jobs.sort(key=lambda s: s.date_done)
        jobs[0].busy_wait_s = 0.0  # the phase starts with every worker idle
        for previous, sample in pairwise(jobs):
            sample.busy_wait_s = max(0.0, previous.date_done - sample.submitted_at)


def clocks_agree(sample: JobSample, slack_s: float = 0.002) -> bool:
    """POST sent <= job registered <= result stored <= result seen, as the one host clock must have it."""
    order = (sample.submit_wall, sample.submitted_at, sample.date_done, sample.observed_wall)
    return all(a <= b + slack_s for a, b in pairwise(order))


# --- numbers -------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _ms(values: list[float]) -> dict[str, float]:
    ms = [1000 * v for v in values]
    return {"p50": percentile(ms, 50), "p99": percentile(ms, 99), "mean": statistics.fmean(ms), "max": max(ms)}


def summarize(samples: list[JobSample], concurrency: int, plain_ms: float) -> dict[str, Any]:
    measured = [s for s in samples if s.role == "measured" and s.status == "succeeded"]
    failed = [s.id for s in samples if s.status != "succeeded"]
    start = min(s.submit_wall for s in measured)
    end = max(s.observed_wall for s in measured)
    completed = sum(start <= s.observed_wall <= end for s in samples if s.status == "succeeded")
    timed = [s for s in measured if s.busy_wait_s is not None]
    reliable = len(timed) == len(measured) and all(clocks_agree(s) for s in timed)
    e2e = _ms([s.e2e_s for s in measured])
    throughput = completed / (end - start)
    summary = {
        "clients": concurrency,
        "measured_jobs": len(measured),
        "all_jobs": len(samples),
        "failed_jobs": failed,
        "overhead_ms": _ms([s.overhead_s for s in measured]),
        "overhead_includes_queue_wait": True,
        "e2e_ms": e2e,
        "engine_ms_mean": 1000 * statistics.fmean(s.engine_s for s in measured),
        "throughput_jobs_per_s": throughput,
        "polls_per_job_mean": statistics.fmean(s.polls for s in measured),
        "submit_post_ms_p50": 1000 * statistics.median(s.submit_s for s in measured),
        "e2e_p50_over_plain": e2e["p50"] / plain_ms,
        "throughput_over_plain": throughput * plain_ms / 1000,
        "queue_free_measured": reliable,
        "jobs_with_busy_wait": sum(s.busy_wait_s > 0 for s in timed),
        "clock_violations": sum(not clocks_agree(s) for s in timed),
    }
    if reliable:
        summary.update(queue_free_summary(timed))
    return summary


def queue_free_summary(samples: list[JobSample]) -> dict[str, Any]:
    """Overhead without the wait behind other jobs, and where the rest of it goes (medians, ms)."""
    api = [s.submitted_at - s.submit_wall for s in samples]
    worker_path = [s.date_done - s.submitted_at - s.busy_wait_s - s.engine_s for s in samples]
    observe = [s.observed_wall - s.date_done for s in samples]
    return {
        "queue_free_overhead_ms": _ms([s.overhead_s - s.busy_wait_s for s in samples]),
        "busy_wait_ms": _ms([s.busy_wait_s for s in samples]),
        "breakdown_ms_p50": {
            "api": 1000 * statistics.median(api),
            "worker": 1000 * statistics.median(worker_path),
            "observe": 1000 * statistics.median(observe),
        },
    }


def sample_row(sample: JobSample) -> dict[str, Any]:
    """One measured job for the JSON: durations in ms, wall-clock moments in seconds since the epoch."""
    row = {k: v for k, v in asdict(sample).items() if not k.endswith("_s")}
    for name in ("e2e_s", "submit_s", "engine_s", "overhead_s", "busy_wait_s"):
        value = getattr(sample, name)
        row[name.removesuffix("_s") + "_ms"] = None if value is None else round(1000 * value, 3)
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}


DEFINITIONS = {
    "e2e_ms": "client: just before POST /v1/jobs to reading the final status (polling every poll_ms)",
    "engine_ms_mean": "the result's timings.total_s + timings.encode_s (engine wall time and writing the image)",
    "overhead_ms": "e2e - engine; INCLUDES the wait in the queue behind other jobs",
    "busy_wait_ms": "max(0, date_done of the previous job on the same worker - this job's submitted_at)",
    "queue_free_overhead_ms": "overhead - busy_wait: the service's own cost per job, without queueing",
    "breakdown_ms_p50": "medians of the queue-free part: api = POST start to submitted_at; worker = submitted_at "
    "to date_done less busy wait and engine; observe = date_done to the client reading the final status",
    "throughput_jobs_per_s": "jobs seen final per second between the first measured submit and the last measured "
    "result",
    "e2e_p50_over_plain": "e2e p50 / the median in-process Engine.run time",
    "throughput_over_plain": "throughput x the median in-process Engine.run time (1.0: one engine back to back)",
}


# --- reporting -----------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "redis_server": next((w[2:] for w in redis_version if w.startswith("v=")), "unknown"),
        "redis_py": redis.__version__,
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "fastapi": fastapi.__version__,
        "uvicorn": uvicorn.__version__,
        "httpx": httpx.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }


def goal_line(results: dict[str, Any]) -> str:
    one = results["phases"].get("1")
    if one is None:
        return "goal (p50 overhead < 15 ms at 1 client): not measured (no 1-client phase)"
    p50 = one["overhead_ms"]["p50"]
    verdict = "MET" if p50 < GOAL_P50_OVERHEAD_MS else "NOT MET"
    return f"goal (p50 overhead < {GOAL_P50_OVERHEAD_MS:.0f} ms at 1 client, Redis): {verdict} ({p50:.1f} ms)"


def _stat(key: str, stat: str, digits: int = 1):
    return lambda s: f"{s[key][stat]:.{digits}f}" if key in s else "n/a"


def _value(key: str, digits: int = 1):
    return lambda s: f"{s[key]:.{digits}f}"


def _split(s: dict[str, Any]) -> str:
    parts = s.get("breakdown_ms_p50")
    return " / ".join(f"{parts[k]:.1f}" for k in ("api", "worker", "observe")) if parts else "n/a"


def _cores(s: dict[str, Any]) -> str:
    return " / ".join(f"{s['cpu_cores'][k]:.2f}" for k in ("clients", "api", "workers", "redis"))


# One row per number, one column per phase.
TABLE_ROWS = (
    ("measured jobs", lambda s: str(s["measured_jobs"])),
    ("overhead p50 ms (incl. queue wait)", _stat("overhead_ms", "p50")),
    ("overhead p99 ms (incl. queue wait)", _stat("overhead_ms", "p99")),
    ("queue-free overhead p50 ms", _stat("queue_free_overhead_ms", "p50")),
    ("queue-free overhead p99 ms", _stat("queue_free_overhead_ms", "p99")),
    ("queue wait behind other jobs p50 ms", _stat("busy_wait_ms", "p50")),
    ("queue-free split p50 ms: api / worker / observe", _split),
    ("end-to-end p50 ms", _stat("e2e_ms", "p50")),
    ("end-to-end p99 ms", _stat("e2e_ms", "p99")),
    ("engine mean ms (total_s + encode_s)", _value("engine_ms_mean")),
    ("throughput jobs/s", _value("throughput_jobs_per_s")),
    ("end-to-end p50 / plain Engine.run", _value("e2e_p50_over_plain", 2)),
    ("throughput x plain Engine.run time", _value("throughput_over_plain", 2)),
    ("POST round trip p50 ms", _value("submit_post_ms_p50")),
    ("status polls per job", _value("polls_per_job_mean")),
    ("CPU cores busy: clients / API / workers / Redis", _cores),
    ("CPU cores busy with other processes", lambda s: f"{s['cpu_cores']['other']:.2f}"),
)


def markdown_table(results: dict[str, Any]) -> str:
    phases = list(results["phases"].values())
    head = "| | " + " | ".join(f"{s['clients']} client{'s' if s['clients'] > 1 else ''}" for s in phases) + " |\n"
    rule = "|---|" + "---|" * len(phases) + "\n"
    rows = "".join(f"| {label} | " + " | ".join(cell(s) for s in phases) + " |\n" for label, cell in TABLE_ROWS)
    return head + rule + rows + "\n" + notes(results)


def notes(results: dict[str, Any]) -> str:
    st, m, plain = results["settings"], results["machine"], results["plain"]
    unmeasured = [k for k, s in results["phases"].items() if not s["queue_free_measured"]]
    lines = [
        f"**{goal_line(results)}**",
        "",
        f"- tiny-sd {st['size']}x{st['size']}, {st['steps']} step(s); {st['workers']} `fastgen worker` process(es), "
        f"concurrency 1 each; the API as `fastgen serve --workers 0`; a private Redis {m['redis_server']}; "
        f"clients are threads polling every {st['poll_ms']:g} ms.",
        "- overhead = end-to-end - (engine total_s + encode_s); it includes waiting in the queue behind other jobs.",
        "- queue-free overhead = overhead - the time the job's worker was still busy with an earlier job after the "
        "job was submitted (Celery's date_done of that earlier job minus the job's submitted_at); api = POST start "
        "to submitted_at, worker = submitted_at to date_done less queue wait and engine, observe = date_done to the "
        "client reading the final status.",
        f"- plain = `Engine.run` in this process: {plain['run_ms_median']:.1f} ms median of {plain['runs']} runs "
        f"({plain['torch_threads']} torch threads, as a worker gives itself).",
        f"- {m['cpu_count']} CPUs ({m['processor']}), shared by clients, API, workers and Redis; "
        f"Python {m['python']}, torch {m['torch']}, celery {m['celery']}, kombu {m['kombu']}, "
        f"redis-py {m['redis_py']}, uvicorn {m['uvicorn']}, httpx {m['httpx']}. 1-min load average before the run: "
        f"{results['load_before'][0]:.2f}. The run took {results['wall_s']:.0f} s.",
    ]
    if unmeasured:
        lines.append(
            f"- queue-free overhead could NOT be measured reliably at {', '.join(unmeasured)} client(s); "
            "there, only the overhead including queue wait is given."
        )
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "service_overhead.json", out / "service_overhead.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown_table(results), encoding="utf-8")
    return json_path, md_path


def _raise_exit(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_exit)  # so the finally below stops the service on `kill` too
    os.environ["HF_HUB_OFFLINE"] = "1"
    started, load_before = time.perf_counter(), os.getloadavg()
    request = job_request(args)
    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="fastgen-overhead-"))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        logger.info("plain reference: Engine.run x %d", args.plain_runs)
        plain = plain_reference(workdir / "data", request, args.plain_runs)
        service = start_service(stack, workdir, args.workers)
        meter = CpuMeter(service.cpu_groups())
        phases, samples = {}, {}
        for concurrency, jobs in zip(args.concurrency, args.jobs, strict=True):
            before = meter.snapshot()
            phase = run_phase(service.url, concurrency, jobs, request, args, service.processes)
            cores = meter.cores(before)
            add_worker_times(phase, service.redis.url)
            summary = summarize(phase, concurrency, plain["run_ms_median"])
            summary["cpu_cores"] = cores
            phases[str(concurrency)] = summary
            samples[str(concurrency)] = [sample_row(s) for s in phase if s.role == "measured"]
            logger.info("%d client(s): overhead p50 %.1f ms", concurrency, summary["overhead_ms"]["p50"])
    settings = {
        "workers": args.workers,
        "worker_concurrency": 1,
        "concurrency": args.concurrency,
        "jobs": args.jobs,
        "warmup": args.warmup,
        "poll_ms": args.poll_ms,
        "size": args.size,
        "steps": args.steps,
        "request": request,
        "worker_env": {"OMP_NUM_THREADS": "1"},
    }
    results = {
        "machine": machine_info(),
        "settings": settings,
        "load_before": load_before,
        "wall_s": time.perf_counter() - started,
        "plain": plain,
        "definitions": DEFINITIONS,
        "phases": phases,
        "samples": samples,
    }
    paths = write_results(results, args.out)
    print(markdown_table(results))
    print(f"wrote {paths[0]} and {paths[1]} in {results['wall_s']:.0f}s")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: the service's processes were stopped and its temporary folder removed")
