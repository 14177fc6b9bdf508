"""The job registry the API and the workers share.

Celery's result backend answers PENDING for any id it has never seen, so the service keeps its
own record of every job: who owns it (tenant), which model and queue, when it was submitted, how
often a worker started it, whether someone asked to cancel it, and how it ended. How it ended (``state``, one of
FINAL_STATES) is the job's final word for every reader; Celery's state fills in only while it is unset (the rule is
``fastgen.workers.queue.JobQueue._status``). Counters and a latency histogram for ``/metrics`` come from here too.

A worker running a job holds a lease on it (``started``, then ``heartbeat`` about every second): a job whose lease
has lapsed while it has no final state lost its worker (the pool process died, or the whole worker) and waits to
be handed out again, whatever the result backend last heard from it.

Two stores with one interface: Redis when the service runs on a Redis broker (shared by every
machine), SQLite under the data directory in the embedded one-machine mode.
"""

from __future__ import annotations

import bisect
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, float("inf"))
FINAL_STATES = ("succeeded", "failed", "cancelled")
DEFAULT_TENANT = "public"  # who owns a job on an open service (no FASTGEN_API_KEYS), or one sent with no tenant
RETENTION_S = 7 * 24 * 3600  # how long a job's record outlives it
# A Redis that hangs (stopped, partitioned) must fail a request within seconds, not hold it: every call to it is
# bounded, and a timeout is never retried (a retry would double the wait a caller sees).
REDIS_CONNECT_TIMEOUT_S = 2
REDIS_TIMEOUT_S = 3
SQLITE_BUSY_S = 5  # how long a write waits for another process's lock on the embedded store
LEASE_S = 5.0  # a running job's worker renews its lease every second; one not renewed this long has stopped
# Not renewed this long, its worker is gone (dead, or cut off from the store): Redis's broker hands the job out again
# at once (fastgen.workers.transport) instead of after the visibility timeout. Twice the lease: a slow renewal or a
# short store blip never makes a live job run twice.
HELD_S = 2 * LEASE_S


class StoreUnavailable(Exception):
    """The job store (Redis, or the SQLite file) cannot be reached or read."""


def redis_client(url: str):
    """A Redis client whose every call ends within REDIS_TIMEOUT_S, answered or not."""
    import redis

    return redis.Redis.from_url(
        url, socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S, retry_on_timeout=False
    )


def redis_fault(exc: BaseException) -> bool:
    """Whether ``exc`` says Redis is down, hung or unreachable (redis-py's TimeoutError is no ConnectionError)."""
    import redis

    return isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError)


@dataclass(frozen=True)
class JobRecord:
    id: str
    tenant: str
    model: str
    queue: str
    submitted_at: float
    # What happened to it since, as the store knew when it was read (``add`` ignores these):
    attempts: int = 0  # how many times a worker started it
    state: str | None = None  # its final state, once it ended
    lease_lapsed: bool = False  # a worker took it and no longer holds it: it waits to be handed out again


SUBMISSION_FIELDS = ("id", "tenant", "model", "queue", "submitted_at")


@dataclass(frozen=True)
class Histogram:
    buckets: tuple[float, ...]
    counts: tuple[int, ...]  # per bucket, not cumulative
    total: float
    count: int


class JobStore(Protocol):
    def add(self, job: JobRecord) -> None: ...

    def get(self, job_id: str) -> JobRecord | None: ...

    def request_cancel(self, job_id: str) -> None: ...

    def cancel_requested(self, job_id: str) -> bool: ...

    def started(self, job_id: str, lease_s: float = LEASE_S) -> int:
        """Count one more start of the job and take its lease; return how many starts there have been."""

    def heartbeat(self, job_id: str, lease_s: float = LEASE_S) -> None:
        """The worker running the job still holds it, for ``lease_s`` more."""

    def requeued(self, job_id: str) -> None:
        """The job went back to its queue: its lease ends now."""

    def finished(self, job_id: str, state: str) -> None:
        """Record the job's final state, the one every reader believes; the first one recorded stays.

        Written last, once the result backend holds the outcome (result, error, progress), so a job that reads ended
        has its details to show."""

    def state_counts(self) -> dict[str, int]:
        """queued, running and each final state."""

    def queue_depths(self) -> dict[str, int]: ...

    def latency(self) -> Histogram: ...


def bucket_index(seconds: float) -> int:
    return bisect.bisect_left(LATENCY_BUCKETS, seconds)


def lost_jobs(client, job_ids: list[str], prefix: str = "fastgen") -> set[str]:
    """Those of ``job_ids`` that a worker took, has not held for :data:`HELD_S` and that have not ended: their worker
    is gone. ``client``: a redis-py client on the store's database (the broker's, which is the same)."""
    pipe = client.pipeline()
    for job_id in job_ids:
        pipe.hmget(f"{prefix}:job:{job_id}", "leased", "state")
        pipe.exists(f"{prefix}:held:{job_id}")
    answers = pipe.execute()
    return {
        job_id
        for job_id, (leased, state), held in zip(job_ids, answers[::2], answers[1::2], strict=True)
        if leased and not state and not held
    }


class RedisJobStore:
    """Job records as Redis hashes; queued/running sets and counters kept up to date as jobs move."""

    def __init__(self, url: str, prefix: str = "fastgen"):
        self.redis = redis_client(url)
        self.prefix = prefix

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @contextmanager
    def _reachable(self) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            if redis_fault(exc):
                raise StoreUnavailable(f"the Redis job store did not answer: {exc}") from None
            raise

    def add(self, job: JobRecord) -> None:
        with self._reachable():
            pipe = self.redis.pipeline()
            submitted = {k: str(v) for k, v in asdict(job).items() if k in SUBMISSION_FIELDS}
            pipe.hset(self._key("job", job.id), mapping=submitted)
            pipe.expire(self._key("job", job.id), RETENTION_S)
            pipe.sadd(self._key("queued", job.queue), job.id)
            pipe.sadd(self._key("queues"), job.queue)
            pipe.execute()

    def get(self, job_id: str) -> JobRecord | None:
        with self._reachable():
            pipe = self.redis.pipeline()
            pipe.hgetall(self._key("job", job_id))
            pipe.exists(self._key("lease", job_id))
            fields, leased = pipe.execute()
        if not fields or b"tenant" not in fields:
            return None
        values = {k.decode(): v.decode() for k, v in fields.items()}
        return JobRecord(
            *(values[k] for k in ("id", "tenant", "model", "queue")),
            float(values["submitted_at"]),
            attempts=int(values.get("attempts", 0)),
            state=values.get("state"),
            lease_lapsed="leased" in values and not leased,
        )

    def request_cancel(self, job_id: str) -> None:
        with self._reachable():
            self.redis.set(self._key("cancel", job_id), 1, ex=RETENTION_S)

    def cancel_requested(self, job_id: str) -> bool:
        with self._reachable():
            return bool(self.redis.exists(self._key("cancel", job_id)))

    def started(self, job_id: str, lease_s: float = LEASE_S) -> int:
        job = self.get(job_id)
        with self._reachable():
            pipe = self.redis.pipeline()
            pipe.hincrby(self._key("job", job_id), "attempts", 1)
            # "leased": this job has had a lease, so a missing lease key means it lapsed (not "never taken").
            pipe.hset(self._key("job", job_id), "leased", 1)
            pipe.set(self._key("lease", job_id), 1, px=int(lease_s * 1000))
            pipe.set(self._key("held", job_id), 1, px=int(lease_s * HELD_S / LEASE_S * 1000))
            if job is not None:
                pipe.smove(self._key("queued", job.queue), self._key("running"), job_id)
            return pipe.execute()[0]

    def heartbeat(self, job_id: str, lease_s: float = LEASE_S) -> None:
        # The lease is a key with a time to live, kept by Redis's clock: worker and API clocks need not agree.
        with self._reachable():
            pipe = self.redis.pipeline()
            pipe.set(self._key("lease", job_id), 1, px=int(lease_s * 1000))
            pipe.set(self._key("held", job_id), 1, px=int(lease_s * HELD_S / LEASE_S * 1000))
            pipe.execute()

    def requeued(self, job_id: str) -> None:
        job = self.get(job_id)
        with self._reachable():
            pipe = self.redis.pipeline()
            pipe.delete(self._key("lease", job_id), self._key("held", job_id))
            if job is not None:
                pipe.smove(self._key("running"), self._key("queued", job.queue), job_id)
            pipe.execute()

    def finished(self, job_id: str, state: str) -> None:
        job = self.get(job_id)
        with self._reachable():
            if job is None or not self.redis.hsetnx(self._key("job", job_id), "state", state):
                return  # unknown, or already counted: a redelivered job ends once
            latency = time.time() - job.submitted_at
            pipe = self.redis.pipeline()
            pipe.srem(self._key("queued", job.queue), job_id)
            pipe.srem(self._key("running"), job_id)
            pipe.hincrby(self._key("finished"), state, 1)
            pipe.hincrby(self._key("latency"), str(bucket_index(latency)), 1)
            pipe.hincrbyfloat(self._key("latency"), "sum", latency)
            pipe.execute()

    def state_counts(self) -> dict[str, int]:
        with self._reachable():
            finished = {k.decode(): int(v) for k, v in self.redis.hgetall(self._key("finished")).items()}
            queued = sum(self.queue_depths().values())
            running = self.redis.scard(self._key("running"))
        return {"queued": queued, "running": running, **{s: finished.get(s, 0) for s in FINAL_STATES}}

    def queue_depths(self) -> dict[str, int]:
        with self._reachable():
            queues = sorted(q.decode() for q in self.redis.smembers(self._key("queues")))
            return {q: self.redis.scard(self._key("queued", q)) for q in queues}

    def latency(self) -> Histogram:
        with self._reachable():
            raw = {k.decode(): float(v) for k, v in self.redis.hgetall(self._key("latency")).items()}
        counts = tuple(int(raw.get(str(i), 0)) for i in range(len(LATENCY_BUCKETS)))
        return Histogram(LATENCY_BUCKETS, counts, raw.get("sum", 0.0), sum(counts))


SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, model TEXT NOT NULL, queue TEXT NOT NULL,
    submitted_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, cancel INTEGER NOT NULL DEFAULT 0,
    state TEXT, latency REAL, lease_until REAL
)
"""
ADDED_COLUMNS = {"lease_until": "REAL"}  # columns newer than a store file may be: added when missing


class SqliteJobStore:
    """The embedded store: one SQLite file that the API and every local worker process open."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)
            _add_missing_columns(db)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        # A connection per call: the store is used from API threads and forked worker processes alike.
        try:
            db = sqlite3.connect(self.path, timeout=SQLITE_BUSY_S)
            try:
                with db:
                    yield db
            finally:
                db.close()
        except sqlite3.IntegrityError:
            raise
        except sqlite3.DatabaseError as exc:  # locked past the timeout, unreadable, not a database
            raise StoreUnavailable(f"the job store {self.path} cannot be used: {exc}") from None

    def add(self, job: JobRecord) -> None:
        with self._db() as db:
            db.execute(
                "INSERT INTO jobs (id, tenant, model, queue, submitted_at) VALUES (?, ?, ?, ?, ?)",
                (job.id, job.tenant, job.model, job.queue, job.submitted_at),
            )

    def get(self, job_id: str) -> JobRecord | None:
        with self._db() as db:
            row = db.execute(
                "SELECT id, tenant, model, queue, submitted_at, attempts, state, lease_until FROM jobs WHERE id = ?",
                (job_id,),
            ).fetchone()
        if row is None:
            return None
        *submitted, attempts, state, lease_until = row
        lapsed = lease_until is not None and lease_until < time.time()
        return JobRecord(*submitted, attempts=attempts, state=state, lease_lapsed=lapsed)

    def request_cancel(self, job_id: str) -> None:
        with self._db() as db:
            db.execute("UPDATE jobs SET cancel = 1 WHERE id = ?", (job_id,))

    def cancel_requested(self, job_id: str) -> bool:
        with self._db() as db:
            row = db.execute("SELECT cancel FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def started(self, job_id: str, lease_s: float = LEASE_S) -> int:
        with self._db() as db:
            lease_until = time.time() + lease_s
            db.execute("UPDATE jobs SET attempts = attempts + 1, lease_until = ? WHERE id = ?", (lease_until, job_id))
            row = db.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row[0] if row else 1

    def heartbeat(self, job_id: str, lease_s: float = LEASE_S) -> None:
        # One machine in embedded mode: the worker's and the API's clocks are the same clock.
        with self._db() as db:
            db.execute("UPDATE jobs SET lease_until = ? WHERE id = ?", (time.time() + lease_s, job_id))

    def requeued(self, job_id: str) -> None:
        with self._db() as db:
            db.execute("UPDATE jobs SET lease_until = 0 WHERE id = ? AND lease_until IS NOT NULL", (job_id,))

    def finished(self, job_id: str, state: str) -> None:
        with self._db() as db:
            db.execute(
                "UPDATE jobs SET state = ?, latency = ? - submitted_at WHERE id = ? AND state IS NULL",
                (state, time.time(), job_id),
            )

    def state_counts(self) -> dict[str, int]:
        with self._db() as db:
            rows = db.execute(
                "SELECT CASE WHEN state IS NOT NULL THEN state WHEN attempts > 0 THEN 'running' ELSE 'queued' END,"
                " COUNT(*) FROM jobs GROUP BY 1"
            ).fetchall()
        counts = dict(rows)
        return {s: counts.get(s, 0) for s in ("queued", "running", *FINAL_STATES)}

    def queue_depths(self) -> dict[str, int]:
        with self._db() as db:
            rows = db.execute(
                "SELECT queue, SUM(state IS NULL AND attempts = 0) FROM jobs GROUP BY queue ORDER BY queue"
            ).fetchall()
        return {queue: int(depth) for queue, depth in rows}

    def latency(self) -> Histogram:
        with self._db() as db:
            values = [row[0] for row in db.execute("SELECT latency FROM jobs WHERE latency IS NOT NULL")]
        counts = [0] * len(LATENCY_BUCKETS)
        for value in values:
            counts[bucket_index(value)] += 1
        return Histogram(LATENCY_BUCKETS, tuple(counts), sum(values), len(values))


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Bring a store file written by an older fastgen up to this schema."""
    present = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    for column, kind in ADDED_COLUMNS.items():
        if column in present:
            continue
        try:
            db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):  # another process added it first
                raise


def open_job_store(broker_url: str | None, data_dir: Path) -> JobStore:
    """Redis beside a Redis broker; SQLite under the data directory otherwise."""
    if broker_url and broker_url.startswith(("redis://", "rediss://")):
        return RedisJobStore(broker_url)
    return SqliteJobStore(Path(data_dir) / "jobs.sqlite3")
