"""Request batching in the worker, end to end: a real Redis, a real worker process, the API over real HTTP."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from services import Api, cancel_one_of_a_call, on_redis, running, service_env, wait_until, worker

from fastgen.settings import Settings
from fastgen.workers.app import TASK_NAME, create_celery, queue_name

pytestmark = pytest.mark.timeout(300)


def quick(**fields) -> dict:
    return {"prompt": "a red circle", "model": "tiny-sd", "width": 64, "height": 64, "steps": 6, "seed": 3, **fields}


@pytest.fixture(scope="module")
def service(redis_url, tmp_path_factory):
    """One tiny-sd worker taking up to 4 jobs into one call, and an open API, both on Redis."""
    with on_redis(tmp_path_factory.mktemp("batching"), redis_url, job_timeout_s="60", batch_max="4") as service:
        yield service


@pytest.fixture()
def client(service):
    with service.api.client() as client:
        yield client


def hold_the_worker(client) -> str:
    """A long job the worker is busy with, so what is submitted next waits in the queue together."""
    blocker = client.submit(quick(width=256, height=256, steps=100, prompt="a blocker"))
    wait_until(lambda: running(client, blocker["id"]), 120, "the blocker to run")
    return blocker["id"]


def release(client, blocker: str) -> None:
    client.cancel(blocker)
    assert client.wait(blocker, timeout_s=60)["status"] == "cancelled"


def image(client, job_id: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(client.result_bytes(job_id)[0]))).astype(int)


def test_queued_compatible_jobs_share_one_call_and_each_gets_its_solo_image(client):
    blocker = hold_the_worker(client)
    batched = [client.submit(quick(prompt=p, seed=s))["id"] for p, s in (("a cat", 1), ("a dog", 2), ("a cow", 3))]
    other = client.submit(quick(steps=5))["id"]  # five steps: it cannot join the others' call
    release(client, blocker)
    results = [client.wait(job, timeout_s=120)["result"] for job in [*batched, other]]
    for job, result in zip(batched, results[:3], strict=True):
        assert result["batch"]["jobs"] == 3 and sorted(result["batch"]["others"]) == sorted(set(batched) - {job})
        assert result["batch"]["shared"]["steps"] == 6 and result["batch"]["shared"]["cache_start_step"] == 0
    assert results[3]["batch"] is None  # it ran next, alone
    alone = client.submit(quick(prompt="a dog", seed=2))["id"]  # nothing queued behind it: no batch, no waiting
    status = client.wait(alone, timeout_s=60)
    assert status["result"]["batch"] is None
    assert np.abs(image(client, batched[1]) - image(client, alone)).max() <= 2


def test_a_batched_job_cancelled_mid_call_reads_cancelled_at_once_and_the_others_finish(client):
    blocker = hold_the_worker(client)
    first, second = (client.submit(quick(width=256, height=256, steps=60, seed=s))["id"] for s in (1, 2))
    release(client, blocker)
    cancel_one_of_a_call(client, first, second)


def test_a_job_that_cannot_run_fails_alone_and_its_neighbours_share_the_call(service, client):
    settings = Settings(data_dir=service.data_dir, broker_url=service.env["FASTGEN_BROKER_URL"])
    celery = create_celery(settings, ["tiny-sd"])
    blocker = hold_the_worker(client)
    before = client.submit(quick(seed=1))["id"]
    # A bare Celery submission skips the door's checks; the worker finds the request out of its limits.
    bad = celery.send_task(TASK_NAME, [quick(steps=1000)], queue=queue_name("tiny-sd"))
    after = client.submit(quick(seed=2))["id"]
    release(client, blocker)
    with pytest.raises(Exception, match="steps: must be at most 100"):
        bad.get(timeout=120)
    for job, other in ((before, after), (after, before)):
        status = client.wait(job, timeout_s=120)
        assert status["status"] == "succeeded" and status["result"]["batch"]["others"] == [other], status


def test_a_worker_killed_mid_batch_loses_none_of_its_jobs(service, client):
    log = service.data_dir / "pixart-worker.log"
    first = worker(service.env, log, models="tiny-pixart")
    pixart = {"model": "tiny-pixart", "width": 256, "height": 256, "steps": 40}
    try:
        blocker = client.submit({**pixart, "prompt": "a blocker", "steps": 100})["id"]
        wait_until(lambda: running(client, blocker), 120, "the blocker to run")
        jobs = [client.submit({**pixart, "prompt": f"boat {i}", "seed": i})["id"] for i in range(2)]
        client.cancel(blocker)
        wait_until(lambda: all(running(client, job, 2) for job in jobs), 120, "both jobs to run in one call")
    finally:
        first.kill()
    wait_until(lambda: not first.group_alive(), 10, "the killed worker group to be gone")
    second = worker(service.env, log, models="tiny-pixart")
    try:
        statuses = [client.wait(job, timeout_s=180) for job in jobs]
    finally:
        second.stop()
    assert [status["status"] for status in statuses] == ["succeeded", "succeeded"], statuses
    for job in jobs:
        record = service.redis.hgetall(f"fastgen:job:{job}")
        assert record[b"attempts"] == b"2" and record[b"state"] == b"succeeded", record


def test_the_embedded_queue_batches_too(tmp_path):
    """No broker: the filesystem queue's messages are taken into a call the same way (and never read half-written)."""
    api = Api(service_env(tmp_path, job_timeout_s="60"), tmp_path / "serve.log", workers=1)
    try:
        with api.client() as client:
            blocker = hold_the_worker(client)
            jobs = [client.submit(quick(seed=s))["id"] for s in (1, 2, 3)]
            release(client, blocker)
            statuses = [client.wait(job, timeout_s=120) for job in jobs]
    finally:
        api.stop()
    assert all(status["status"] == "succeeded" for status in statuses), statuses
    assert [status["result"]["batch"]["jobs"] for status in statuses] == [3, 3, 3]
    assert "Unrecoverable" not in (tmp_path / "serve.log").read_text()
