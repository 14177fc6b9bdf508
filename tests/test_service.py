"""The job service end to end: a real Redis, real worker processes, the API over real HTTP."""

from __future__ import annotations

import inspect
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
import zipfile

import httpx
import pytest
from PIL import Image
from services import Api, free_port, on_redis, pid_alive, service_env, wait_until, worker

from fastgen.client import ServiceError
from fastgen.jobs import DEFAULT_TENANT, RedisJobStore
from fastgen.settings import Settings
from fastgen.workers.app import TASK_NAME, create_celery, queue_name

pytestmark = pytest.mark.timeout(240)
JOB_TIMEOUT_S = "15"


def quick(**fields) -> dict:
    return {"prompt": "a red circle", "model": "tiny-sd", "width": 64, "height": 64, "steps": 4, "seed": 3, **fields}


def long_job(**fields) -> dict:
    return quick(width=256, height=256, steps=100, **fields)


@pytest.fixture(scope="module")
def service(redis_url, tmp_path_factory):
    """One tiny-sd worker and an open API, both on Redis; the cache embeds with MiniLM (at the door)."""
    with on_redis(
        tmp_path_factory.mktemp("service"), redis_url, job_timeout_s=JOB_TIMEOUT_S, cache_embedder="minilm"
    ) as service:
        yield service


@pytest.fixture()
def client(service):
    with service.api.client() as client:
        yield client


@pytest.fixture(scope="module")
def celery_app(service):
    """A Celery app on the service's broker and result backend, as a Python user who talks to Celery would have."""
    settings = Settings(data_dir=service.data_dir, broker_url=service.env["FASTGEN_BROKER_URL"])
    return create_celery(settings, ["tiny-sd"])


def test_submit_poll_download(client):
    job = client.submit(quick(steps=12, width=128, height=96))
    assert job["status"] == "queued" and job["status_url"] == f"/v1/jobs/{job['id']}"
    seen = []
    status = client.wait(job["id"], timeout_s=120, poll_s=0.02, on_progress=seen.append)
    assert status["status"] == "succeeded", status
    assert status["result"]["seed"] == 3 and status["result"]["steps"] == 12
    assert all(p["total"] == 12 and 1 <= p["step"] <= 12 for p in seen)
    data, media_type = client.result_bytes(job["id"])
    assert media_type == "image/png"
    assert Image.open(io.BytesIO(data)).size == (128, 96)


def test_several_images_each_served_by_index_and_all_in_one_zip(client):
    job = client.submit(quick(num_images=3))
    status = client.wait(job["id"], timeout_s=120)
    assert status["status"] == "succeeded", status
    result = status["result"]
    assert result["seeds"] == [3, 4, 5]
    assert [(a["name"], a["seed"]) for a in result["artifacts"]] == [(f"image_{i}.png", 3 + i) for i in range(3)]
    images = [client.result_bytes(job["id"], i)[0] for i in range(3)]
    assert client.result_bytes(job["id"])[0] == images[0]  # no index: the first
    assert len(set(images)) == 3 and all(Image.open(io.BytesIO(data)).size == (64, 64) for data in images)
    with pytest.raises(ServiceError) as info:
        client.result_bytes(job["id"], 3)
    assert info.value.status_code == 422 and info.value.detail[0]["field"] == "index"
    assert "must be 0 to 2" in info.value.detail[0]["message"]
    with zipfile.ZipFile(io.BytesIO(client.result_zip(job["id"]))) as archive:
        assert archive.namelist() == ["image_0.png", "image_1.png", "image_2.png", "result.json"]
        assert [archive.read(f"image_{i}.png") for i in range(3)] == images
        assert json.loads(archive.read("result.json"))["seeds"] == [3, 4, 5]


def test_direct_celery_submission_from_a_process_that_only_has_the_broker_url(service, redis_url, client):
    script = (
        "import json, sys\n"
        "from fastgen.workers import submit\n"
        "result = submit(json.loads(sys.argv[1]), broker_url=sys.argv[2])\n"
        "print(json.dumps({'id': result.id, 'result': result.get(timeout=120)}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTGEN_")}
    run = subprocess.run(
        [sys.executable, "-c", script, json.dumps(quick(seed=11)), redis_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout.strip().splitlines()[-1])
    assert answer["result"]["seed"] == 11 and answer["result"]["artifacts"][0]["media_type"] == "image/png"
    assert client.status(answer["id"])["status"] == "succeeded"  # the REST side sees it too


def test_cancel_a_running_job_and_the_worker_stays_healthy(service, client):
    job = client.submit(long_job())
    running = wait_until(lambda: _running_at_step(client, job["id"], 2), 120, "the job to run")
    client.cancel(job["id"])
    cancelled_at = time.monotonic()
    status = client.wait(job["id"], timeout_s=60, poll_s=0.02)
    assert status["status"] == "cancelled"
    assert running["step"] <= status["progress"]["step"] < 100
    per_step = running["elapsed_s"] / running["step"]
    assert time.monotonic() - cancelled_at < 10 * per_step + 2
    assert service.worker.group_alive()
    assert client.wait(client.submit(quick())["id"], timeout_s=60)["status"] == "succeeded"


def _running_at_step(client, job_id: str, step: int):
    status = client.status(job_id)
    assert status["status"] in ("queued", "running"), status
    progress = status.get("progress")
    return progress if progress and progress["step"] >= step else None


def test_cancel_a_queued_job_means_it_never_runs(service, client):
    blocker = client.submit(long_job())
    queued = client.submit(quick())["id"]
    assert client.cancel(queued)["status"] == "cancelled"
    client.cancel(blocker["id"])
    assert client.wait(blocker["id"], timeout_s=60)["status"] == "cancelled"
    # The one worker takes the cancelled job next and drops it; it logs that once it is done with the job.
    dropped = f"job {queued}: cancelled before it started; dropped"
    seen = []

    def taken_and_dropped() -> bool:
        seen.append(client.status(queued))
        return dropped in service.worker.log()

    wait_until(taken_and_dropped, 60, "the worker to take the cancelled job and drop it")
    seen.append(client.status(queued))
    never_ran = [s for s in seen if s["status"] == "cancelled" and s["attempts"] == 0 and s["result"] is None]
    assert never_ran == seen, seen  # it never read running, and never had a start counted
    assert all((s["progress"] or {}).get("step", 0) == 0 for s in seen), seen
    assert f"job {queued}: attempt" not in service.worker.log()  # the worker never started it
    assert service.redis.hget(f"fastgen:job:{queued}", "attempts") is None
    assert not (service.data_dir / "artifacts" / queued).exists()


@pytest.mark.parametrize("final", ["failed", "cancelled"])
def test_the_job_stores_final_state_wins_over_celerys(service, client, celery_app, final):
    """While Celery's record says queued, and after the worker made it say succeeded, the job store says ``final``:
    that is what the status, the wait and the result endpoint tell."""
    blocker = client.submit(long_job())["id"]
    wait_until(lambda: _running_at_step(client, blocker, 1), 120, "the worker to be busy")
    job = client.submit(quick(seed=5))["id"]
    RedisJobStore(service.env["FASTGEN_BROKER_URL"]).finished(job, final)  # no cancel flag: a worker still runs it
    assert celery_app.backend.get_task_meta(job)["status"] == "PENDING"
    assert client.status(job)["status"] == final
    client.cancel(blocker)
    wait_until(lambda: celery_app.backend.get_task_meta(job)["status"] == "SUCCESS", 120, "Celery to say succeeded")
    status = client.wait(job, timeout_s=5)
    assert status["status"] == final and status["result"] is None and status["progress"] is None, status
    assert status["error"] == ("the job failed" if final == "failed" else None), status
    with pytest.raises(ServiceError) as info:
        client.result_bytes(job)
    assert info.value.status_code == 409 and final in info.value.message
    assert service.redis.hget(f"fastgen:job:{job}", "state") == final.encode()  # the worker's end did not overwrite it


def test_a_bare_celery_submission_runs_in_the_tenant_its_message_names(service, client, celery_app, tmp_path):
    """No door and no job record: the task's ``tenant`` keyword alone says whose cache partition the job uses; left
    out, the job is DEFAULT_TENANT's, the open door's tenant."""
    request = quick(prompt=f"a tenant's prompt {uuid.uuid4().hex}", steps=6, accelerate={"cache": {"enabled": True}})

    def bare(**kwargs) -> bool:
        queue = queue_name("tiny-sd")
        result = celery_app.send_task(TASK_NAME, args=[request], kwargs=kwargs, queue=queue, routing_key=queue)
        return cache_hit(result.get(timeout=120))

    assert bare(tenant="alice") is False  # the first of its prompt anywhere
    assert bare(tenant="alice") is True  # alice's own states
    env = {**service.env, "FASTGEN_API_KEYS": "alice-key=alice,bob-key=bob"}
    api = Api(env, tmp_path / "api-keys.log")
    try:
        with api.client("alice-key") as alice, api.client("bob-key") as bob:
            # Through the door the tenant travels in the message too: alice's job finds the bare job's states,
            # bob's does not.
            assert cache_hit(bob.wait(bob.submit(request)["id"], timeout_s=120)["result"]) is False
            assert cache_hit(alice.wait(alice.submit(request)["id"], timeout_s=120)["result"]) is True
    finally:
        api.stop()
    assert bare() is False  # DEFAULT_TENANT's partition has none of alice's or bob's states
    assert cache_hit(client.wait(client.submit(request)["id"], timeout_s=120)["result"]) is True  # the open door's


def cache_hit(result: dict) -> bool:
    (report,) = [a["details"] for a in result["accelerations"] if a["name"] == "cache"]
    return report["hit"]


def test_the_default_tenant_is_named_once():
    from fastgen import workers
    from fastgen.engine import Engine
    from fastgen.workers.tasks import run_job

    for function in (Engine.run, workers.submit, run_job):
        assert inspect.signature(function).parameters["tenant"].default is DEFAULT_TENANT, function


def test_worker_killed_mid_job_the_job_completes_exactly_once(service, client):
    log = service.data_dir / "pixart-worker.log"
    first = worker(service.env, log, models="tiny-pixart")
    try:
        job = client.submit({"prompt": "a boat", "model": "tiny-pixart", "width": 512, "height": 512, "steps": 60})
        wait_until(lambda: _running_at_step(client, job["id"], 2), 120, "the job to run")
    finally:
        first.kill()
    # SIGKILL reaches every process of the group, but a busy machine may take a moment to tear them down.
    wait_until(lambda: not first.group_alive(), 10, "the killed worker group to be gone")
    second = worker(service.env, log, models="tiny-pixart")
    try:
        status = client.wait(job["id"], timeout_s=150)
    finally:
        second.stop()
    assert status["status"] == "succeeded", status
    record = service.redis.hgetall(f"fastgen:job:{job['id']}")
    assert record[b"attempts"] == b"2" and record[b"state"] == b"succeeded"


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ("{not json", "request", "JSON"),
        ("[1, 2]", "request", "object"),
        (json.dumps({"model": "tiny-sd"}), "prompt", "Field required"),
        (json.dumps(quick(steps=1000)), "steps", "at most 100 (FASTGEN_MAX_STEPS)"),
        (json.dumps(quick(width=4096)), "width", "at most 2048 (FASTGEN_MAX_SIDE)"),
        (json.dumps(quick(width=1536, height=1536)), "height", "FASTGEN_MAX_PIXELS"),
        (json.dumps(quick(guidance=99)), "guidance", "FASTGEN_MAX_GUIDANCE"),
        (json.dumps(quick(prompt="x" * 3000)), "prompt", "FASTGEN_MAX_PROMPT_CHARS"),
        (json.dumps(quick(num_frames=9)), "num_frames", "only video models"),
        (json.dumps(quick(num_images=5)), "num_images", "at most 4 (FASTGEN_MAX_IMAGES)"),
        (json.dumps(quick(model="tiny-wan", width=32, height=32, num_images=2)), "num_images", "one video"),
        (json.dumps(quick(width=60)), "width", "multiple of 8"),
        (json.dumps(quick(model="nope")), "model", "not served here"),
        (json.dumps(quick(colour="red")), "colour", "not a known field"),
        (json.dumps(quick(loras=[{"name": "../x"}])), "loras.0.name", "no paths"),
        (json.dumps(quick(accelerate={"parallel": {"mode": "fast"}})), "accelerate.parallel.mode", "'displaced'"),
    ],
)
def test_invalid_input_is_422_naming_the_field(service, body, field, words):
    response = httpx.post(f"{service.api.url}/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail[0]["field"] == field and words in detail[0]["message"], detail


def test_unknown_job_is_404(client):
    with pytest.raises(ServiceError) as info:
        client.status("0123456789abcdef")
    assert info.value.status_code == 404 and "no job" in info.value.message
    with pytest.raises(ServiceError) as info:
        client.result_bytes("0123456789abcdef")
    assert info.value.status_code == 404


def test_result_of_an_unfinished_job_is_409(client):
    job = client.submit(long_job())
    with pytest.raises(ServiceError) as info:
        client.result_bytes(job["id"])
    assert info.value.status_code == 409
    client.cancel(job["id"])
    client.wait(job["id"], timeout_s=60)


def test_models_health_metrics_and_docs(service, client):
    assert [m["name"] for m in client.models()] == ["fastgen-shapes", "tiny-pixart", "tiny-sd", "tiny-wan"]
    assert httpx.get(f"{service.api.url}/healthz").json()["status"] == "ok"
    client.wait(client.submit(quick())["id"], timeout_s=60)
    metrics = httpx.get(f"{service.api.url}/metrics").text
    assert 'fastgen_queue_depth{queue="fastgen.tiny-sd"} 0' in metrics
    succeeded = int(metrics.split('fastgen_jobs{state="succeeded"} ')[1].split()[0])
    count = int(metrics.split("fastgen_job_latency_seconds_count ")[1].split()[0])
    assert succeeded >= 1 and count >= succeeded
    assert "/v1/jobs" in httpx.get(f"{service.api.url}/openapi.json").json()["paths"]


def test_approximate_cache_through_the_service(service, client):
    """Two jobs on the same prompt with the cache on: the second resumes the first's state; /metrics counts it.

    The API embedded both prompts (the worker used its vectors).
    """
    # Only a repeat may match: the default tenant's partition holds other tests' prompts ("a tenant's prompt <hex>"),
    # which MiniLM can find similar enough to hit at a random hex's whim.
    cache = {"enabled": True, "min_similarity": 0.99}
    request = quick(prompt=f"a cached prompt {uuid.uuid4().hex}", steps=6, accelerate={"cache": cache})
    reports = []
    for _ in range(2):
        status = client.wait(client.submit(request)["id"], timeout_s=120)
        assert status["status"] == "succeeded", status
        (report,) = [a["details"] for a in status["result"]["accelerations"] if a["name"] == "cache"]
        reports.append(report)
    assert reports[0]["hit"] is False and reports[0]["stored_steps"] == [1, 2, 3], reports
    assert reports[1]["hit"] is True and reports[1]["k"] == 3 and reports[1]["steps_saved"] == 3
    assert reports[0]["embedded_at_door"] is True and reports[1]["embedded_at_door"] is True
    metrics = httpx.get(f"{service.api.url}/metrics").text
    assert int(metrics.split('fastgen_cache_hits_total{model="tiny-sd"} ')[1].split()[0]) >= 1


def test_tenants_see_only_their_own_jobs(service, tmp_path):
    env = {**service.env, "FASTGEN_API_KEYS": "alice-key=alice,bob-key=bob"}
    api = Api(env, tmp_path / "api-keys.log")
    try:
        with api.client("alice-key") as alice, api.client("bob-key") as bob, api.client() as nobody:
            job = alice.submit(quick())
            assert alice.wait(job["id"], timeout_s=60)["status"] == "succeeded"
            for call in (bob.status, bob.result_bytes, bob.cancel):
                with pytest.raises(ServiceError) as info:
                    call(job["id"])
                assert info.value.status_code == 404
            with pytest.raises(ServiceError) as info:
                nobody.submit(quick())
            assert info.value.status_code == 401 and "API key" in info.value.message
    finally:
        api.stop()
    assert "open to anyone" not in (tmp_path / "api-keys.log").read_text()


def test_broker_down_is_503_not_a_hang(service, tmp_path):
    env = {**service.env, "FASTGEN_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    api = Api(env, tmp_path / "api-down.log")
    try:
        started = time.monotonic()
        response = httpx.post(f"{api.url}/v1/jobs", json=quick(), timeout=30)
        assert response.status_code == 503 and "unreachable" in response.json()["error"]
        assert time.monotonic() - started < 15
        assert httpx.get(f"{api.url}/healthz", timeout=30).status_code == 503
        assert httpx.get(f"{api.url}/v1/jobs/abc", timeout=30).status_code == 503
    finally:
        api.stop()


def test_embedded_mode_serves_without_any_server(tmp_path):
    """`fastgen serve` with no broker configured: filesystem queue, file results, SQLite job store."""
    api = Api(service_env(tmp_path, job_timeout_s=JOB_TIMEOUT_S), tmp_path / "serve.log", workers=1)
    try:
        with api.client() as client:
            job = client.submit(quick(steps=6))
            status = client.wait(job["id"], timeout_s=120)
            assert status["status"] == "succeeded", (status, api.process.log())
            assert Image.open(io.BytesIO(client.result_bytes(job["id"])[0])).size == (64, 64)
            assert "open to anyone" in api.process.log()
        workers = _children(api.process.process.pid)
        assert workers
    finally:
        api.process.process.send_signal(signal.SIGINT)
        api.process.process.wait(30)
    wait_until(lambda: not any(pid_alive(pid) for pid in workers), 20, "workers to stop after Ctrl-C")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    pids = [int(p) for p in out.split()]
    return pids + [grandchild for child in pids for grandchild in _children(child)]
