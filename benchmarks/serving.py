"""Serving benchmark: request batching in the worker, off against on, under Poisson arrivals of real user prompts.

What runs, exactly as a deployment runs it, as real processes on loopback: a private ``redis-server`` (broker,
result backend, job store), ``python -m fastgen serve --workers 0`` (the API) and one ``python -m fastgen worker``
(concurrency 1, ``OMP_NUM_THREADS=1``), started once with ``FASTGEN_BATCH_MAX=1`` (off) and once with
``--batch-max`` (on), one after the other against the same API and Redis.

1. Off: the unbatched worker's capacity, from ``--capacity-jobs`` jobs run one after another (jobs per second of
   their median submit-to-result time).
2. For each load in ``--loads`` (fractions of that capacity) and each mode, ``--jobs`` requests arrive as a Poisson
   process (exponential gaps, seeded: the same arrival times and the same requests in both modes). Requests are
   the first prompts of ``../shared/data/prompts/krea_open_prompts_1k.jsonl`` (real Discord ``!dream`` prompts, read
   at run time), each with its own seed, on ``--model``. A poller reads every unfinished job's status every
   ``--poll-ms``.
3. Per load and mode: images per second (jobs done / first submit to last result seen), latency from submit to
   the result seen (p50, p99), and how the jobs were batched (``result.batch.jobs``).
4. Fidelity: every image batching on made, against the image the same request (prompt, seed) got with batching
   off, where it ran alone: PSNR and SSIM (``fastgen.quality``).

Goals (issue 20): at the highest load (saturation: 3x capacity, more than either mode serves), images per second
at least 2x the unbatched worker's; p50 latency at the lowest load within 10% of unbatched; every batched image
within float tolerance of its solo one.

Run from the repository root (about 4 minutes on 2 CPU cores)::

    HF_HUB_OFFLINE=1 python benchmarks/serving.py
    HF_HUB_OFFLINE=1 python benchmarks/serving.py --loads 0.3,0.9,1.5,3 --jobs 60 --batch-max 8

Writes ``serving.json`` (settings, machine, summaries, every job) and ``serving.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from fastgen.client import FINAL, FastgenClient
from fastgen.quality import psnr, ssim

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from services import Process, RedisServer, free_port, service_env, wait_until, worker  # noqa: E402  (the tests' helpers)

logger = logging.getLogger("benchmarks.serving")
TRACE = REPO.parent / "shared" / "data" / "prompts" / "krea_open_prompts_1k.jsonl"
DEFAULT_OUT = REPO / "benchmarks" / "results"
STARTUP_TIMEOUT_S = 180


@dataclass
class Job:
    index: int
    prompt: str
    seed: int
    arrival_s: float  # after the load's start
    id: str = ""
    submitted: float = 0.0
    done: float = 0.0
    status: str = ""
    batch_jobs: int = 1

    @property
    def latency_s(self) -> float:
        return self.done - self.submitted


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fastgen-shapes")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--loads", default="0.3,0.9,1.5,3", help="arrival rates as fractions of unbatched capacity")
    parser.add_argument("--jobs", type=int, default=40, help="requests per load and mode")
    parser.add_argument("--batch-max", type=int, default=4)
    parser.add_argument("--capacity-jobs", type=int, default=10)
    parser.add_argument("--poll-ms", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.loads = [float(x) for x in args.loads.split(",")]
    return args


def trace_prompts(count: int) -> list[str]:
    prompts = []
    with TRACE.open(encoding="utf-8") as f:
        for line in f:
            prompt = " ".join(json.loads(line)["prompt"].split())[:500]
            if prompt:
                prompts.append(prompt)
            if len(prompts) == count:
                return prompts
    raise SystemExit(f"{TRACE} holds fewer than {count} prompts")


def request_of(args, job: Job) -> dict[str, Any]:
    return {"prompt": job.prompt, "model": args.model, "width": args.size, "height": args.size,
            "steps": args.steps, "seed": job.seed}  # fmt: skip


def start_worker(stack: ExitStack, env: dict, workdir: Path, mode: str, batch_max: int, model: str) -> Process:
    env = {**env, "FASTGEN_BATCH_MAX": str(batch_max)}
    proc = worker(env, workdir / f"worker-{mode}.log", models=model)
    stack.callback(proc.stop)
    wait_until(lambda: " ready." in proc.log() and f"loaded {model}" in proc.log(), STARTUP_TIMEOUT_S, "the worker")
    return proc


def run_one_by_one(client: FastgenClient, args, jobs: list[Job]) -> list[Job]:
    for job in jobs:
        job.submitted = time.perf_counter()
        job.id = client.submit(request_of(args, job))["id"]
        status = client.wait(job.id, timeout_s=300, poll_s=args.poll_ms / 1000)
        job.done, job.status = time.perf_counter(), status["status"]
    return jobs


def run_load(url: str, args, jobs: list[Job]) -> list[Job]:
    """Submit each job at its arrival time (a thread), poll all unfinished ones (this thread) until all are final."""
    start = time.perf_counter()
    submitted: list[Job] = []
    lock = threading.Lock()

    def submit_all() -> None:
        with FastgenClient(url) as client:
            for job in jobs:
                time.sleep(max(0.0, start + job.arrival_s - time.perf_counter()))
                job.submitted = time.perf_counter()
                job.id = client.submit(request_of(args, job))["id"]
                with lock:
                    submitted.append(job)

    submitter = threading.Thread(target=submit_all, daemon=True)
    submitter.start()
    with FastgenClient(url) as client:
        while True:
            with lock:
                pending = [job for job in submitted if not job.status]
                all_in = len(submitted) == len(jobs)
            if all_in and not pending:
                break
            for job in pending:
                status = client.status(job.id)
                if status["status"] in FINAL:
                    job.done, job.status = time.perf_counter(), status["status"]
                    batch = (status.get("result") or {}).get("batch")
                    job.batch_jobs = batch["jobs"] if batch else 1
            time.sleep(args.poll_ms / 1000)
    submitter.join()
    return jobs


def summarize(jobs: list[Job]) -> dict[str, Any]:
    done = [job for job in jobs if job.status == "succeeded"]
    span = max(job.done for job in done) - min(job.submitted for job in jobs)
    latencies = sorted(job.latency_s for job in done)
    sizes: dict[str, int] = {}
    for job in done:
        sizes[str(job.batch_jobs)] = sizes.get(str(job.batch_jobs), 0) + 1
    return {
        "jobs": len(jobs),
        "succeeded": len(done),
        "images_per_s": len(done) / span,
        "latency_s": {
            "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99),
            "mean": statistics.mean(latencies),
        },
        "jobs_by_batch_size": sizes,
    }


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def fidelity(url: str, off: list[Job], on: list[Job]) -> dict[str, Any]:
    """Each image batching on made against the same request's solo image (batching off)."""
    rows = []
    with FastgenClient(url) as client:
        for solo, batched in zip(off, on, strict=True):
            if batched.batch_jobs == 1 or solo.batch_jobs != 1 or "succeeded" not in (solo.status, batched.status):
                continue
            a, b = (np.asarray(Image.open(io.BytesIO(client.result_bytes(job.id)[0]))) for job in (solo, batched))
            rows.append({"index": solo.index, "psnr_db": psnr(a, b), "ssim": ssim(a, b),
                         "max_abs": int(np.abs(a.astype(int) - b.astype(int)).max())})  # fmt: skip
    if not rows:
        return {"compared": 0}
    finite = [row["psnr_db"] for row in rows if np.isfinite(row["psnr_db"])]
    return {
        "compared": len(rows),
        "bit_identical": sum(row["max_abs"] == 0 for row in rows),
        "max_abs_of_255": max(row["max_abs"] for row in rows),
        "psnr_db_min": min(finite) if finite else float("inf"),
        "ssim_min": min(row["ssim"] for row in rows),
        "rows": rows,
    }


def machine_info() -> dict[str, Any]:
    import celery
    import torch

    return {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "celery": celery.__version__}  # fmt: skip


def goals(results: dict[str, Any]) -> dict[str, Any]:
    loads = results["loads"]
    low, high = loads[0], loads[-1]
    speedup = high["on"]["images_per_s"] / high["off"]["images_per_s"]
    p50_ratio = low["on"]["latency_s"]["p50"] / low["off"]["latency_s"]["p50"]
    worst = max((load["fidelity"].get("max_abs_of_255", 0) for load in loads), default=0)
    return {
        "throughput_at_highest_load_x": speedup,
        "throughput_goal_met": speedup >= 2.0,
        "p50_at_lowest_load_ratio": p50_ratio,
        "p50_goal_met": p50_ratio <= 1.10,
        "batched_max_abs_of_255": worst,
        "fidelity_goal_met": worst <= 2,
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"capacity unbatched: {results['capacity_jobs_per_s']:.2f} jobs/s ({results['settings']['model']}, "
        f"{results['settings']['size']}², {results['settings']['steps']} steps, 1 thread)",
        "",
        "| load | batching | images/s | p50 s | p99 s | jobs by batch size | batched vs solo |",
        "|---|---|---|---|---|---|---|",
    ]
    for load in results["loads"]:
        f = load["fidelity"]
        vs = ""
        if f.get("compared"):
            vs = f"{f['bit_identical']}/{f['compared']} identical, max {f['max_abs_of_255']}/255"
            vs += f", SSIM ≥ {f['ssim_min']:.4f}"
        for mode in ("off", "on"):
            s = load[mode]
            lines.append(
                f"| {load['load']:.0%} | {mode} | {s['images_per_s']:.2f} | {s['latency_s']['p50']:.2f} | "
                f"{s['latency_s']['p99']:.2f} | {s['jobs_by_batch_size']} | {vs if mode == 'on' else ''} |"
            )
    g = results["goals"]
    lines += [
        "",
        f"- throughput at the highest load: {g['throughput_at_highest_load_x']:.2f}x (goal ≥ 2x: "
        f"{'met' if g['throughput_goal_met'] else 'NOT met'})",
        f"- p50 at the lowest load: {g['p50_at_lowest_load_ratio']:.2f}x unbatched (goal ≤ 1.10: "
        f"{'met' if g['p50_goal_met'] else 'NOT met'})",
        f"- batched images: at most {g['batched_max_abs_of_255']}/255 from solo (goal ≤ 2: "
        f"{'met' if g['fidelity_goal_met'] else 'NOT met'})",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    started = time.perf_counter()
    prompts = trace_prompts(args.jobs * len(args.loads) + args.capacity_jobs)
    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="fastgen-serving-"))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        server = RedisServer(workdir)
        stack.callback(server.stop)
        env = service_env(workdir / "data", broker_url=server.url, job_timeout_s="600")
        port = free_port()
        api = Process(["serve", "--workers", "0", "--port", str(port)], env, workdir / "api.log")
        stack.callback(api.stop)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _up(url), STARTUP_TIMEOUT_S, "the API", 0.2)
        per_mode: dict[str, dict[float, list[Job]]] = {"off": {}, "on": {}}
        capacity = 0.0
        for mode, batch_max in (("off", 1), ("on", args.batch_max)):
            with ExitStack() as worker_stack:
                start_worker(worker_stack, env, workdir, mode, batch_max, args.model)
                if mode == "off":
                    warm = [Job(-1 - i, prompts[-1 - i], 10_000 + i, 0.0) for i in range(args.capacity_jobs)]
                    with FastgenClient(url) as client:
                        run_one_by_one(client, args, warm[:2])  # warm-up
                        measured = run_one_by_one(client, args, warm[2:])
                    capacity = 1.0 / statistics.median(job.latency_s for job in measured)
                    logger.info("unbatched capacity: %.2f jobs/s", capacity)
                for n, load in enumerate(args.loads):
                    rate = load * capacity
                    if mode == "off":
                        chosen = prompts[n * args.jobs : (n + 1) * args.jobs]
                        jobs = _arrivals(chosen, rate, random.Random(args.seed + n), n * args.jobs)
                    else:  # the same requests at the same times
                        jobs = [Job(j.index, j.prompt, j.seed, j.arrival_s) for j in per_mode["off"][load]]
                    logger.info("%s, load %.0f%% (%.2f jobs/s): %d jobs", mode, load * 100, rate, len(jobs))
                    per_mode[mode][load] = run_load(url, args, jobs)
        loads = []
        for load in args.loads:
            off, on = per_mode["off"][load], per_mode["on"][load]
            loads.append({"load": load, "off": summarize(off), "on": summarize(on), "fidelity": fidelity(url, off, on),
                          "jobs": {"off": [asdict(j) for j in off], "on": [asdict(j) for j in on]}})  # fmt: skip
    results = {
        "machine": machine_info(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "capacity_jobs_per_s": capacity,
        "wall_s": time.perf_counter() - started,
        "loads": loads,
    }
    results["goals"] = goals(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (args.out / "serving.md").write_text(markdown(results), encoding="utf-8")
    print(markdown(results))


def _arrivals(prompts: list[str], rate: float, rng: random.Random, first: int) -> list[Job]:
    jobs, at = [], 0.0
    for i, prompt in enumerate(prompts):
        jobs.append(Job(first + i, prompt, first + i, at))
        at += rng.expovariate(rate)
    return jobs


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
