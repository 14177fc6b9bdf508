"""A multi-device worker (`fastgen worker --devices 2`: two gloo ranks on CPU) serving jobs over HTTP and Redis."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import queue
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import parallel_ranks
import pytest
import redis
import torch
import torch.multiprocessing as mp
from PIL import Image
from services import Api, Process, cancel_one_of_a_call, running, service_env, wait_until, worker

from fastgen.engine import Engine
from fastgen.lora.synthetic import random_lora, write_lora
from fastgen.parallel.groups import free_port, run_ranks
from fastgen.settings import Settings

pytestmark = pytest.mark.timeout(300)


def job(**fields) -> dict:
    request = {"prompt": "a lighthouse at dusk", "model": "tiny-sd", "width": 64, "height": 64, "steps": 6, "seed": 5}
    return {**request, "guidance": 5.0, **fields}


def long_job(**fields) -> dict:
    return job(**{"width": 256, "height": 256, "steps": 100, "accelerate": {"parallel": {"cfg": False}}, **fields})


def group_worker(env: dict, log, models: str = "tiny-sd,tiny-pixart") -> Process:
    process = Process(["worker", "--models", models, "--devices", "2"], env, log)
    wait_until(lambda: "ready." in process.log() or process.process.poll() is not None, 120, "the group to start")
    assert process.process.poll() is None, process.log()
    return process


def rank_pid(process: Process, rank: int) -> int:
    return int(re.search(rf"rank {rank} of 2 joined \(pid (\d+)\)", process.log()).group(1))


@pytest.fixture(scope="module")
def service(redis_url, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("group")
    env = service_env(data_dir, broker_url=redis_url, job_timeout_s="60", cache_default="false")
    group = group_worker(env, data_dir / "group.log")
    api = Api(env, data_dir / "api.log")
    service = SimpleNamespace(api=api, group=group, env=env, data_dir=data_dir, redis=redis.Redis.from_url(redis_url))
    yield service
    api.stop()
    service.group.stop()  # the dead-rank test replaces the group


@pytest.fixture()
def client(service):
    with service.api.client() as client:
        yield client


def pixels(client, job_id: str) -> np.ndarray:
    data, _ = client.result_bytes(job_id)
    return np.asarray(Image.open(io.BytesIO(data))).astype(int)


def report(status: dict) -> dict:
    return next(a for a in status["result"]["accelerations"] if a["name"] == "parallel")["details"]


@pytest.mark.parametrize(
    ("options", "degrees"),
    [({}, {"patch": 1, "cfg": 2}), ({"cfg": False, "mode": "sync"}, {"patch": 2, "cfg": 1, "mode": "sync"})],
)
def test_a_two_rank_worker_serves_a_rest_job_with_the_single_device_image(service, client, engine, options, degrees):
    request = job(accelerate={"parallel": options})
    status = client.wait(client.submit(request)["id"], timeout_s=120)
    assert status["status"] == "succeeded", status
    assert report(status).items() >= {"world_size": 2, **degrees}.items()
    single = np.asarray(engine.run(job()).images[0]).astype(int)
    assert np.abs(pixels(client, status["id"]) - single).max() <= 1  # exact layouts: float rounding only


def test_a_dit_split_by_tokens_through_the_service(service, client, engine):
    request = job(model="tiny-pixart", accelerate={"parallel": {"cfg": False, "mode": "sync"}})
    status = client.wait(client.submit(request)["id"], timeout_s=120)
    assert status["status"] == "succeeded", status
    assert report(status).items() >= {"patch": 2, "split": "tokens", "ulysses": True}.items()
    single = np.asarray(engine.run({**request, "accelerate": {}}).images[0]).astype(int)
    assert np.abs(pixels(client, status["id"]) - single).max() <= 1


@pytest.mark.parametrize(
    "request_fields",
    [
        {"accelerate": {"parallel": {}}},
        {"model": "tiny-pixart", "accelerate": {"parallel": {"cfg": False, "mode": "sync"}}},
    ],
    ids=["unet-cfg-split", "dit-token-split"],
)
def test_several_images_through_a_two_rank_worker_are_each_the_single_device_image(
    service, client, engine, request_fields
):
    request = job(**request_fields, num_images=2)
    status = client.wait(client.submit(request)["id"], timeout_s=120)
    assert status["status"] == "succeeded", status
    assert report(status)["world_size"] == 2 and len(status["result"]["artifacts"]) == 2
    for index, seed in enumerate(status["result"]["seeds"]):
        single = np.asarray(engine.run({**request, "accelerate": {}, "num_images": 1, "seed": seed}).images[0])
        data, _ = client.result_bytes(status["id"], index)
        assert np.abs(np.asarray(Image.open(io.BytesIO(data))).astype(int) - single.astype(int)).max() <= 2


def test_queued_jobs_share_one_call_on_every_rank_and_each_gets_its_single_device_image(service, client, engine):
    blocker = client.submit(long_job())["id"]
    wait_until(lambda: running(client, blocker), 120, "the blocker to run")
    asked = [("a cat", 1, 1), ("a dog", 2, 2), ("a cow", 3, 1)]
    batched = [client.submit(job(prompt=p, seed=s, num_images=n))["id"] for p, s, n in asked]
    client.cancel(blocker)
    statuses = [client.wait(job_id, timeout_s=120) for job_id in batched]
    assert [status["status"] for status in statuses] == ["succeeded"] * 3, statuses
    for job_id, status, (prompt, _, count) in zip(batched, statuses, asked, strict=True):
        result = status["result"]
        assert (
            result["batch"]["jobs"] == 3 and result["batch"]["images"] == 4 and job_id not in result["batch"]["others"]
        )
        assert report(status)["world_size"] == 2
        for index, seed in enumerate(result["seeds"]):
            single = engine.run(job(prompt=prompt, seed=seed)).images[0]
            data, _ = client.result_bytes(job_id, index)
            solo = np.asarray(single).astype(int)
            assert np.abs(np.asarray(Image.open(io.BytesIO(data))).astype(int) - solo).max() <= 2
        assert len(result["seeds"]) == count


def test_a_batched_job_cancelled_on_the_group_leaves_the_call_and_the_other_finishes(service, client):
    blocker = client.submit(long_job())["id"]
    wait_until(lambda: running(client, blocker), 120, "the blocker to run")
    first, second = (client.submit(long_job(steps=60, seed=s))["id"] for s in (1, 2))
    client.cancel(blocker)
    cancel_one_of_a_call(client, first, second)
    assert client.wait(client.submit(job())["id"], timeout_s=60)["status"] == "succeeded"  # the group is in step


def test_displaced_patches_through_the_service(service, client, engine):
    status = client.wait(client.submit(job(steps=8, accelerate={"parallel": {"cfg": False}}))["id"], timeout_s=120)
    assert status["status"] == "succeeded", status
    details = report(status)
    assert details["mode"] == "displaced"
    assert set(details["bytes_received_per_call_by_phase"]) == {"synchronous", "stale"}


def test_a_height_that_does_not_split(service, client):
    asked = client.wait(client.submit(job(height=72, accelerate={"parallel": {"cfg": False}}))["id"], 120)
    assert asked["status"] == "failed" and asked["error"].startswith("height: the height's 9 latent rows"), asked
    unasked = client.wait(client.submit(job(height=72, guidance=1.0))["id"], 120)
    assert unasked["status"] == "succeeded" and report(unasked)["replicated"], unasked
    assert "multiple of 32 pixels" in report(unasked)["reason"]


def test_cancel_stops_every_rank_and_the_group_keeps_serving(service, client):
    long = client.submit(long_job())["id"]
    wait_until(lambda: running(client, long, 2), 120, "the job to run")
    client.cancel(long)
    assert client.wait(long, timeout_s=60)["status"] == "cancelled"
    assert client.wait(client.submit(job())["id"], timeout_s=60)["status"] == "succeeded"


def test_the_approximate_cache_through_the_group(service, client):
    cached = {"parallel": {"cfg": False, "mode": "sync"}, "cache": {"enabled": True}}
    first = client.wait(client.submit(job(prompt="a harbour", seed=1, accelerate=cached))["id"], timeout_s=120)
    second = client.wait(client.submit(job(prompt="a harbour", seed=2, accelerate=cached))["id"], timeout_s=120)
    assert first["status"] == second["status"] == "succeeded"
    hit = next(a for a in second["result"]["accelerations"] if a["name"] == "cache")["details"]
    assert hit["hit"] and hit["steps_saved"] > 0, hit


def test_a_dead_rank_takes_the_group_down_and_every_job_of_its_call_is_redelivered(service, client):
    log = service.data_dir / "doomed.log"
    doomed = group_worker(service.env, log, models="tiny-sd")
    try:
        service.group.stop()  # only the doomed group takes jobs now
        blocker = client.submit(long_job())["id"]
        wait_until(lambda: running(client, blocker), 120, "the blocker to run")
        jobs = [client.submit(long_job(steps=40, seed=seed))["id"] for seed in (1, 2)]
        client.cancel(blocker)
        wait_until(lambda: all(running(client, job_id, 2) for job_id in jobs), 120, "both jobs to run in one call")
        os.kill(rank_pid(doomed, 1), signal.SIGKILL)
        assert doomed.process.wait(timeout=60) != 0
        assert "handing the job back to the queue" in doomed.log()
        rescuer = worker(service.env, service.data_dir / "rescuer.log")
        try:
            statuses = [client.wait(job_id, timeout_s=180) for job_id in jobs]
        finally:
            rescuer.stop()
    finally:
        doomed.stop()
        service.group = group_worker(service.env, service.data_dir / "group.log")
    assert [status["status"] for status in statuses] == ["succeeded", "succeeded"], statuses
    for job_id in jobs:
        assert service.redis.hget(f"fastgen:job:{job_id}", "attempts") == b"2"


def test_a_job_past_the_time_limit_fails_on_every_rank_and_the_group_serves_the_next(redis_url, tmp_path):
    """Rank 0 runs Celery's solo pool, which keeps no time limit: the group stops the job between steps itself."""
    base, _, _ = redis_url.rpartition("/")  # a database of its own: the module's group does not take these jobs
    env = service_env(tmp_path, broker_url=f"{base}/4", job_timeout_s="10", cache_default="false")
    group = group_worker(env, tmp_path / "group.log", models="tiny-sd")
    api = Api(env, tmp_path / "api.log")
    try:
        with api.client() as client:
            started = time.monotonic()
            slow = job(width=512, height=512, steps=100, accelerate={"parallel": {"cfg": False}})
            status = client.wait(client.submit(slow)["id"], timeout_s=120)
            assert status["status"] == "failed", status
            assert status["error"] == "the job ran longer than the limit of 10s (FASTGEN_JOB_TIMEOUT_S)"
            assert time.monotonic() - started < 60  # stopped at its 5 s soft limit, give or take a step
            assert client.wait(client.submit(job())["id"], timeout_s=60)["status"] == "succeeded"
        assert group.process.poll() is None, group.log()
    finally:
        api.stop()
        group.stop()


def test_a_multi_device_worker_runs_one_job_at_a_time(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "fastgen", "worker", "--devices", "2", "--concurrency", "2"],
        env=service_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "--concurrency: a multi-device worker" in run.stderr, run.stderr


def rank_settings(settings: Settings, data_dir, **fields) -> Settings:
    """Settings for ranks started by hand: their own data directory, the session's built models."""
    return Settings(data_dir=data_dir, model_dir=settings.model_dir, device="cpu", **fields)


def test_helper_ranks_run_rank_0s_plan_and_refuse_a_lora_file_they_do_not_hold(settings, engine, tmp_path):
    unet = engine.pool.get(engine.registry.resolve("tiny-sd"))[0].pipe.unet  # also builds tiny-sd for the ranks
    own, helpers = tmp_path / "rank-0-loras", tmp_path / "rank-1-loras"
    for folder in (own, helpers):
        write_lora(folder / "same.safetensors", random_lora(unet, 4, seed=1))
    write_lora(own / "differs.safetensors", random_lora(unet, 4, seed=2))
    write_lora(helpers / "differs.safetensors", random_lora(unet, 4, seed=3))  # a file of the same name, not the same
    write_lora(own / "only-here.safetensors", random_lora(unet, 4, seed=4))
    cached = {"cache": {"enabled": True}}
    jobs = [
        {"prompt": "a lighthouse at dusk", "model": "tiny-sd", "width": 64, "height": 64},  # seed, steps: rank 0's
        job(steps=4, loras=[{"name": "same", "scale": 0.8}]),
        job(steps=4, loras=[{"name": "differs"}]),
        job(steps=4, loras=[{"name": "only-here"}]),
        job(prompt="a harbour", seed=1, steps=6, accelerate=cached),
        job(prompt="a harbour", seed=2, steps=6, accelerate=cached),  # a hit: rank 0's state travels in the plan
        job(steps=4),
    ]
    ranks = run_ranks(
        parallel_ranks.group_jobs, 2, rank_settings(settings, tmp_path / "data"), jobs, [own, helpers], timeout_s=240
    )
    outcomes, helper_plans = pickle.loads(ranks[0])["outcomes"], pickle.loads(ranks[1])["plans"]
    assert None not in [outcome["plan"] for outcome in outcomes]
    assert helper_plans == [outcome["plan"] for outcome in outcomes]  # every plan reached the helper, as resolved
    plans = [outcome["plan"].jobs[0] for outcome in outcomes]
    helper_plans = [plan.jobs[0] for plan in helper_plans]
    errors = [outcome["error"] for outcome in outcomes]
    assert errors[:2] == [None, None] and errors[4:] == [None, None, None], errors

    first = plans[0]
    assert first.request.seed == first.seed is not None and (first.request.steps, first.request.guidance) == (20, 7.5)
    single = engine.run({**first.request.model_dump(mode="json"), "accelerate": {}})  # what rank 0 resolved, as is
    assert np.abs(outcomes[0]["image"].astype(int) - np.asarray(single.images[0]).astype(int)).max() <= 1

    checksum = hashlib.sha256((own / "same.safetensors").read_bytes()).hexdigest()
    assert plans[1].loras == (("same", checksum, 0.8),)
    assert next(r for r in outcomes[1]["reports"] if r.name == "loras").details

    name, message = errors[2]
    assert name == "PlanRefused", errors[2]
    assert message.startswith("rank 1 cannot run this job's plan: loras[0]: its LoRA 'differs'"), message
    assert "SHA-256" in message and "every rank needs the same file" in message
    name, message = errors[3]
    assert name == "PlanRefused" and message.startswith("rank 1 cannot run this job's plan: loras[0].name: unknown"), (
        message
    )

    assert plans[4].cache is not None and plans[4].cache.entry is None  # a miss, stored by rank 0
    assert plans[5].cache.entry is not None and plans[5].cache.skip > 0
    assert torch.equal(helper_plans[5].cache.hit.state.latents, plans[5].cache.hit.state.latents)
    hit = next(r for r in outcomes[5]["reports"] if r.name == "cache").details
    assert hit["hit"] and hit["steps_saved"] == plans[5].cache.skip

    last = engine.run(job(steps=4))  # the group served on after the refusals: the single-device image
    assert np.abs(outcomes[6]["image"].astype(int) - np.asarray(last.images[0]).astype(int)).max() <= 1


def test_one_call_of_several_jobs_on_every_rank_refuses_only_the_job_a_helper_cannot_run(settings, engine, tmp_path):
    unet = engine.pool.get(engine.registry.resolve("tiny-sd"))[0].pipe.unet
    own, helpers = tmp_path / "rank-0-loras", tmp_path / "rank-1-loras"
    for folder in (own, helpers):
        write_lora(folder / "same.safetensors", random_lora(unet, 4, seed=1))
    write_lora(own / "differs.safetensors", random_lora(unet, 4, seed=2))
    write_lora(helpers / "differs.safetensors", random_lora(unet, 4, seed=3))
    jobs = [
        job(steps=4, prompt="a cat", seed=1),
        job(steps=4, prompt="a dog", seed=2, loras=[{"name": "differs"}]),  # rank 1's file is another
        job(steps=4, prompt="a cow", seed=3, loras=[{"name": "same", "scale": 0.8}], num_images=2),
    ]
    settings = rank_settings(settings, tmp_path / "data", lora_dir=own)
    ranks = run_ranks(parallel_ranks.group_batch, 2, settings, jobs, [own, helpers], timeout_s=240)
    led, followed = pickle.loads(ranks[0]), pickle.loads(ranks[1])
    assert followed["plans"] == [led["plan"]] and len(led["plan"].jobs) == 3  # one plan, one call, every rank
    outcomes = led["outcomes"]
    name, message = outcomes[1]["error"]
    assert name == "PlanRefused" and "rank 1 cannot run this job's plan: loras[0]: its LoRA 'differs'" in message
    alone = Engine(settings)  # rank 0's library, one device
    for index in (0, 2):
        assert outcomes[index]["batch"].jobs == 2  # the refused job left the call before it began
        single = np.asarray(alone.run({**jobs[index], "num_images": 1}).images[0]).astype(int)
        assert np.abs(outcomes[index]["image"].astype(int) - single).max() <= 2


def test_a_helper_that_hangs_in_a_job_fails_the_job_within_the_collective_bound(settings, engine, tmp_path):
    engine.pool.get(engine.registry.resolve("tiny-sd"))  # builds tiny-sd for the ranks
    bound_s = 4
    context = mp.get_context("spawn")
    results = context.Queue()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ranks = mp.start_processes(
        parallel_ranks.hanging_helper,
        args=(
            2,
            free_port(),
            rank_settings(settings, tmp_path, job_timeout_s=bound_s),
            job(steps=6),
            3 * bound_s,
            results,
        ),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    seen: dict = {}
    try:
        while len(seen) < 2:
            rank, what = results.get(timeout=180)
            seen[rank] = what
        helper = ranks.processes[1]
        helper.join(timeout=60)  # its own collective fails once it wakes: it ends, for the supervisor to restart all
        assert helper.exitcode not in (None, 0), helper.exitcode
    except queue.Empty:
        pytest.fail(f"the ranks reported only {seen}")
    finally:
        for process in ranks.processes:
            if process.is_alive():
                process.kill()
            process.join()
    outcome, hung_at = seen[0], seen[1]["hung_at"]
    assert outcome["error"] == (
        "GroupTimedOut",
        f"a rank of the worker group did not answer within {bound_s}s (FASTGEN_JOB_TIMEOUT_S): it hung; the group"
        " restarts",
    ), outcome["error"]
    assert hung_at is not None and bound_s - 1 < outcome["ended_at"] - hung_at < bound_s + 10


def test_a_hung_rank_fails_its_job_within_the_bound_and_the_group_stops_to_be_restarted(redis_url, tmp_path):
    """A rank that stops answering (SIGSTOP: alive, silent) fails the job it is in, not hangs it; the worker exits."""
    base, _, _ = redis_url.rpartition("/")  # a database of its own: the module's group does not take these jobs
    env = service_env(tmp_path, broker_url=f"{base}/5", job_timeout_s="20", cache_default="false")
    group = group_worker(env, tmp_path / "group.log", models="tiny-sd")
    api = Api(env, tmp_path / "api.log")
    helper = rank_pid(group, 1)
    try:
        with api.client() as client:
            long = client.submit(long_job())["id"]
            wait_until(lambda: running(client, long, 2), 120, "running")
            os.kill(helper, signal.SIGSTOP)
            stopped = time.monotonic()
            status = client.wait(long, timeout_s=120)
            assert status["status"] == "failed", status
            assert status["error"] == (
                "a rank of the worker group did not answer within 20s (FASTGEN_JOB_TIMEOUT_S): it hung; the group"
                " restarts"
            )
            assert time.monotonic() - stopped < 20 + 15  # the bound, give or take a step and the store's update
        assert group.process.wait(timeout=90) != 0, group.log()  # for its supervisor to start it again
        assert "the group fell out of step in job" in group.log()
    finally:
        try:
            os.kill(helper, signal.SIGCONT)
        except ProcessLookupError:
            pass
        api.stop()
        group.stop()
