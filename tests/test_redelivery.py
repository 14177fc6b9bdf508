"""Jobs whose worker died, jobs cancelled while they waited, prompts in logs: real workers (one pool process each)
on a real Redis and on the embedded broker.

A job whose pool process is killed is handed back at the front of its queue and reads queued until it runs again;
one whose whole worker died reads queued once its lease lapses. A job cancelled while queued is dropped by the
worker that takes it, without ever reading running. No prompt reaches the worker's or the API's log at INFO. The
job stores' leases are tested directly too.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
from services import Api, TlsRedisServer, service_env, wait_until, worker

from fastgen.jobs import HELD_S, LEASE_S, JobRecord, RedisJobStore, SqliteJobStore, lost_jobs

pytestmark = pytest.mark.timeout(300)
FINAL = ("succeeded", "failed", "cancelled")


def quick(**fields) -> dict:
    return {"prompt": "a red circle", "model": "tiny-sd", "width": 64, "height": 64, "steps": 4, "seed": 3, **fields}


def long_job(**fields) -> dict:
    return quick(**{"width": 256, "height": 256, "steps": 40, **fields})


def own_database(redis_url: str, db: int) -> str:
    """The same Redis, another database: no job left in a queue by other modules' tests reaches these workers."""
    base, _, last = redis_url.rpartition("/")
    return f"{base}/{db}" if last.isdigit() else f"{redis_url.rstrip('/')}/{db}"


def start(data_dir: Path, **fastgen: str) -> SimpleNamespace:
    env = service_env(data_dir, job_timeout_s="60", **fastgen)
    return SimpleNamespace(worker=worker(env, data_dir / "worker.log"), api=Api(env, data_dir / "api.log"), env=env)


def stop(service: SimpleNamespace) -> None:
    service.api.stop()
    service.worker.stop()


@pytest.fixture(scope="module")
def on_redis(redis_url, tmp_path_factory):
    service = start(tmp_path_factory.mktemp("redelivery-redis"), broker_url=own_database(redis_url, 5))
    yield service
    stop(service)


@pytest.fixture(scope="module")
def on_tls_redis(tmp_path_factory):
    """A rediss:// broker: kombu takes TLS from the URL's scheme, which fastgen's own transport must keep."""
    try:
        server = TlsRedisServer(tmp_path_factory.mktemp("tls-redis"))
    except RuntimeError as exc:
        pytest.skip(str(exc))
    service = start(tmp_path_factory.mktemp("redelivery-tls"), broker_url=server.url)
    yield service
    stop(service)
    server.stop()


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    service = start(tmp_path_factory.mktemp("redelivery-embedded"))
    yield service
    stop(service)


def children(pid: int) -> list[int]:
    """The live child processes of ``pid``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError, ValueError):
            continue
        if int(ppid) == pid and state != "Z":
            found.append(int(entry.name))
    return found


def running_at_step(client, job_id: str, step: int) -> bool:
    status = client.status(job_id)
    return status["status"] == "running" and (status.get("progress") or {}).get("step", 0) >= step


@pytest.mark.parametrize("broker", ["on_redis", "on_tls_redis", "embedded"])
def test_a_job_whose_pool_process_died_reads_queued_and_runs_before_later_jobs(request, broker):
    service = request.getfixturevalue(broker)
    with service.api.client() as client:
        first = client.submit(long_job())["id"]
        wait_until(lambda: running_at_step(client, first, 2), 120, "the first job to run")
        later = client.submit(quick())["id"]
        (pool_process,) = children(service.worker.process.pid)  # one pool process: it runs the first job
        os.kill(pool_process, signal.SIGKILL)
        killed_at = time.monotonic()
        seen = []  # (seconds since the kill, first job's status, later job's status)
        while not (seen and all(s["status"] in FINAL for s in seen[-1][1:])):
            assert time.monotonic() - killed_at < 180, seen[-1]
            seen.append((time.monotonic() - killed_at, client.status(first), client.status(later)))
            time.sleep(0.02)
    requeued = [(t, a) for t, a, _ in seen if a["status"] == "queued"]
    assert requeued, "the first job never read queued after its pool process died"
    t, status = requeued[0]
    assert t < LEASE_S + 3 and status["attempts"] == 1 and "stopped" in status["note"], status
    assert "progress" not in status or status["progress"] is None
    # It started again (attempt 2) while the later job still waited: the requeued job went to the front.
    restarted = next(i for i, (_, a, _) in enumerate(seen) if a["status"] != "queued" and a["attempts"] == 2)
    assert all(b["status"] == "queued" and b["attempts"] == 0 for _, _, b in seen[: restarted + 1]), seen[restarted]
    assert seen[-1][1]["status"] == seen[-1][2]["status"] == "succeeded", seen[-1]
    assert seen[-1][1]["attempts"] == 2 and seen[-1][2]["attempts"] == 1


def test_a_job_whose_whole_worker_died_reads_queued_and_can_be_cancelled(on_redis):
    with on_redis.api.client() as client:
        job = client.submit(long_job(steps=100))["id"]
        wait_until(lambda: running_at_step(client, job, 2), 120, "the job to run")
        on_redis.worker.kill()  # the whole worker, and no other: nobody can take the job until one starts
        killed_at = time.monotonic()
        try:
            status = wait_until(lambda: queued(client.status(job)), LEASE_S + 5, "the job to read queued")
            assert time.monotonic() - killed_at < LEASE_S + 5
            assert status["attempts"] == 1 and "stopped" in status["note"] and status["progress"] is None, status
            # Waiting for a worker, it is cancelled at once, like any queued job.
            assert client.cancel(job)["status"] == "cancelled"
            assert client.status(job)["status"] == "cancelled"
        finally:
            on_redis.worker = worker(on_redis.env, on_redis.worker.log_path)


def test_a_job_whose_whole_worker_died_runs_again_at_the_front_within_seconds_of_a_worker(on_redis):
    """Not after Redis's visibility timeout (the job timeout plus 30 s): once the dead worker's hold has run out
    (HELD_S), a live worker's sweep hands the job back in front of the jobs submitted after it. (A worker that starts
    sooner than that may take a later job first; the lost one then runs next.)"""
    with on_redis.api.client() as client:
        job = client.submit(long_job(steps=60))["id"]
        wait_until(lambda: running_at_step(client, job, 2), 120, "the job to run")
        on_redis.worker.kill()
        killed_at = time.monotonic()
        later = client.submit(quick())["id"]
        store = redis.Redis.from_url(on_redis.env["FASTGEN_BROKER_URL"])
        wait_until(lambda: lost_jobs(store, [job]), HELD_S + 5, "the dead worker's hold to run out")
        on_redis.worker = worker(on_redis.env, on_redis.worker.log_path)
        seen = []  # (seconds since the kill, the job's status, the later job's status)
        while not (seen and all(s["status"] in FINAL for s in seen[-1][1:])):
            assert time.monotonic() - killed_at < 120, seen[-1]
            seen.append((time.monotonic() - killed_at, client.status(job), client.status(later)))
            time.sleep(0.05)
    restarted = next(i for i, (_, a, _) in enumerate(seen) if a["attempts"] == 2)
    visibility_timeout = 60 + 30  # FASTGEN_JOB_TIMEOUT_S=60 here
    assert seen[restarted][0] < visibility_timeout - 30, seen[restarted]
    assert all(b["status"] == "queued" for _, _, b in seen[: restarted + 1]), "the later job ran first"
    assert seen[-1][1]["status"] == seen[-1][2]["status"] == "succeeded", seen[-1]
    assert seen[-1][1]["attempts"] == 2 and seen[-1][2]["attempts"] == 1
    assert f"job {job}: its worker stopped holding it; handed back to its queue" in on_redis.worker.log()


def test_a_job_cancelled_while_queued_never_starts(on_redis):
    with on_redis.api.client() as client:
        busy = client.submit(long_job(steps=100))["id"]
        wait_until(lambda: running_at_step(client, busy, 2), 120, "the worker to be busy")
        dropped = client.submit(quick())["id"]
        assert client.cancel(dropped)["status"] == "cancelled"
        after = client.submit(quick())["id"]
        client.cancel(busy)  # the worker moves on: to the cancelled job, then to the next one
        seen = [client.status(dropped)]
        while client.status(after)["status"] not in FINAL:
            seen.append(client.status(dropped))
        seen.append(client.status(dropped))
        assert client.status(after)["status"] == "succeeded"
    assert [s for s in seen if s["status"] != "cancelled" or s.get("attempts") != 0] == [], "it read otherwise"
    store = redis.Redis.from_url(on_redis.env["FASTGEN_BROKER_URL"])
    assert store.hget(f"fastgen:job:{dropped}", "attempts") is None  # no worker counted a start


def test_prompts_stay_out_of_the_logs(on_redis):
    marker = f"secret-{uuid.uuid4().hex}"
    broker = redis.Redis.from_url(on_redis.env["FASTGEN_BROKER_URL"])
    with on_redis.api.client() as client:
        busy = client.submit(long_job(steps=100))["id"]  # so the next job waits in Redis, where it can be read
        wait_until(lambda: running_at_step(client, busy, 1), 120, "the worker to be busy")
        job = client.submit(quick(prompt=f"a boat named {marker}", negative_prompt=marker))["id"]
        (message,) = [m for m in broker.lrange("fastgen.tiny-sd", 0, -1) if job.encode() in m]
        # The request travels in the (encoded) body; the headers that task events and Celery's logs show do not
        # repeat it.
        assert marker.encode() not in message
        client.cancel(busy)
        assert client.wait(job, timeout_s=120)["status"] == "succeeded"
    worker_log = on_redis.worker.log_path
    # Celery logs the task's end after the result is stored: wait for its line.
    wait_until(lambda: f"[{job}] succeeded" in worker_log.read_text(), 30, "the worker to log the job's end")
    assert marker not in worker_log.read_text()
    assert marker not in on_redis.api.process.log()


def queued(status: dict) -> dict | None:
    return status if status["status"] == "queued" else None


@pytest.fixture(params=["redis", "sqlite"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return SqliteJobStore(tmp_path / "jobs.sqlite3")
    url = own_database(request.getfixturevalue("redis_url"), 6)
    return RedisJobStore(url, prefix=f"test-{uuid.uuid4().hex}")


def test_a_lease_lapses_unless_renewed_and_ends_when_the_job_is_requeued(store):
    job = JobRecord(uuid.uuid4().hex, "alice", "tiny-sd", "fastgen.tiny-sd", time.time())
    store.add(job)
    assert store.get(job.id) == job  # never started: no lease to lapse
    assert store.started(job.id, lease_s=0.5) == 1
    assert not store.get(job.id).lease_lapsed
    record = wait_until(lambda: _lapsed(store, job.id), 10, "the lease to lapse")
    assert record.attempts == 1 and record.state is None and record.tenant == "alice"
    store.heartbeat(job.id, lease_s=30)
    assert not store.get(job.id).lease_lapsed
    store.requeued(job.id)
    assert store.get(job.id).lease_lapsed
    assert store.started(job.id) == 2 and not store.get(job.id).lease_lapsed
    store.finished(job.id, "succeeded")
    assert store.get(job.id).state == "succeeded"


def _lapsed(store, job_id: str) -> JobRecord | None:
    record = store.get(job_id)
    return record if record.lease_lapsed else None


def test_a_store_file_from_before_leases_gets_the_column(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(path) as db:  # the schema as fastgen wrote it before leases
        db.execute(
            "CREATE TABLE jobs (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, model TEXT NOT NULL, queue TEXT NOT NULL,"
            " submitted_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, cancel INTEGER NOT NULL DEFAULT 0,"
            " state TEXT, latency REAL)"
        )
        db.execute("INSERT INTO jobs (id, tenant, model, queue, submitted_at) VALUES ('old', 'bob', 'm', 'q', 1.0)")
    db.close()
    store = SqliteJobStore(path)
    assert store.get("old") == JobRecord("old", "bob", "m", "q", 1.0)
    assert store.started("old", lease_s=30) == 1 and not store.get("old").lease_lapsed
    SqliteJobStore(path)  # opening it again finds the column there


def test_a_job_is_lost_only_once_its_hold_runs_out_and_never_once_it_ended(redis_url):
    store = RedisJobStore(own_database(redis_url, 6), prefix=f"test-{uuid.uuid4().hex}")
    taken, waiting = (JobRecord(uuid.uuid4().hex, "alice", "tiny-sd", "fastgen.tiny-sd", time.time()) for _ in "ab")
    store.add(taken)
    store.add(waiting)
    store.started(taken.id, lease_s=1.0)  # held for twice that
    started_at = time.monotonic()
    assert lost_jobs(store.redis, [taken.id, waiting.id], store.prefix) == set()
    wait_until(lambda: store.get(taken.id).lease_lapsed, 5, "the lease to lapse")  # it reads queued now
    lost, seconds = lost_jobs(store.redis, [taken.id], store.prefix), time.monotonic() - started_at
    assert seconds < 1.9, f"{seconds:.2f} s: too slow to tell the lapsed lease from the lapsed hold"
    assert lost == set()  # the hold has not run out
    wait_until(lambda: lost_jobs(store.redis, [taken.id], store.prefix), 5, "the hold to run out")
    store.heartbeat(taken.id, lease_s=30)  # a worker that renews again holds it again
    assert lost_jobs(store.redis, [taken.id], store.prefix) == set()
    store.heartbeat(taken.id, lease_s=0.05)
    time.sleep(0.2)
    store.finished(taken.id, "succeeded")
    assert lost_jobs(store.redis, [taken.id, waiting.id], store.prefix) == set()  # ended, or never taken


def test_a_rediss_urls_tls_settings_reach_the_broker():
    import ssl

    from fastgen.workers.app import tls_options

    url = "rediss://cache.internal:6380/0?ssl_cert_reqs=CERT_OPTIONAL&ssl_ca_certs=/etc/ca.pem&ssl_certfile=/etc/c.pem"
    assert tls_options(url) == {
        "ssl_cert_reqs": ssl.CERT_OPTIONAL,
        "ssl_ca_certs": "/etc/ca.pem",
        "ssl_certfile": "/etc/c.pem",
    }
    assert tls_options("rediss://cache.internal:6380/0") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}  # verify by default
    with pytest.raises(ValueError, match="ssl_cert_reqs must be one of required, optional, none, got 'maybe'"):
        tls_options("rediss://cache.internal:6380/0?ssl_cert_reqs=maybe")
