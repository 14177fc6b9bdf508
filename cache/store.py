"""The cache's shared records: entries, their stored marks, LCBFU scores, an event log and counters.

Every worker keeps an in-memory nearest-neighbour index and brings it up to date from the event log
before each lookup (one round trip when nothing changed), so an entry one worker adds is seen by
every other worker, and a worker that starts later loads every entry made before it.

Eviction is LCBFU (Nirvana's "least computationally beneficial and frequently used"): each stored
state (entry, K) scores K x (hits + 1), the steps it has saved and would save again, and the lowest
scores go first when the byte budget is exceeded (older first among equals). Popping the lowest score is
atomic (Redis ZPOPMIN, or one SQLite transaction), so concurrent workers never evict one state twice.

Two stores with one interface, as for jobs: Redis beside a Redis broker, SQLite in one-machine mode.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

COUNTERS = ("hits", "misses", "steps_saved", "steps_run", "evictions", "bad_states")


@dataclass(frozen=True)
class Entry:
    """One prompt's stored states: the states themselves live in the state store, one file per mark."""

    id: int
    partition: str  # tenant, embedder and compatibility key: only entries of one partition can match
    prompt_id: str  # a hash of the prompt: reported on hits, never the text (it may be another user's)
    seed: int
    total_steps: int
    embedding: np.ndarray = field(repr=False)
    marks: dict[int, int] = field(default_factory=dict)  # K -> bytes of its state
    created_at: float = field(default_factory=time.time)
    # An entry stored by a hit: (embedding, K) of each earlier prompt whose first K steps its states carry.
    lineage: list[tuple[np.ndarray, int]] = field(default_factory=list, repr=False)

    def to_json(self) -> str:
        data = asdict(self) | {"embedding": _floats(self.embedding)}
        lineage = [[_floats(embedding), k] for embedding, k in self.lineage]
        return json.dumps(data | {"marks": {str(k): v for k, v in self.marks.items()}, "lineage": lineage})

    @staticmethod
    def from_json(text: str | bytes) -> Entry:
        data = json.loads(text)
        data["embedding"] = np.asarray(data["embedding"], dtype=np.float32)
        data["marks"] = {int(k): int(v) for k, v in data["marks"].items()}
        data["lineage"] = [(np.asarray(e, dtype=np.float32), int(k)) for e, k in data.get("lineage", [])]
        return Entry(**data)


def _floats(vector: np.ndarray) -> list[float]:
    return vector.astype(np.float32).tolist()


@dataclass(frozen=True)
class Event:
    """A change to the shared index: an entry added, or one of its marks dropped."""

    op: str  # "add" or "drop"
    entry_id: int
    k: int = 0


def member(entry_id: int, k: int) -> str:
    # Zero-padded so that equal scores pop in order of age (members sort lexically).
    return f"{entry_id:012d}:{k:04d}"


def parse_member(text: str | bytes) -> tuple[int, int]:
    entry_id, k = (text.decode() if isinstance(text, bytes) else text).split(":")
    return int(entry_id), int(k)


class CacheStore(Protocol):
    def new_id(self) -> int: ...

    def add(self, entry: Entry) -> None:
        """Record the entry and score each of its marks at K."""

    def entry(self, entry_id: int) -> Entry | None: ...

    def snapshot(self) -> tuple[list[Entry], str]:
        """Every live entry (with only its live marks) and the log cursor to read further events from."""

    def events(self, cursor: str) -> tuple[list[Event], str | None]:
        """Events after ``cursor`` and the new cursor; None when the cursor fell off the log (reload)."""

    def hit(self, entry_id: int, k: int) -> None:
        """Count a reuse of (entry, K): its score rises by K."""

    def drop(self, entry_id: int, k: int) -> bool:
        """Remove a stored state (evicted or unreadable); False when it was already gone."""

    def evict(self, budget_bytes: int) -> list[tuple[int, int]]:
        """Pop the lowest-scoring states until the stored bytes fit the budget; return them."""

    def stored_bytes(self) -> int: ...

    def count(self, model: str, **amounts: int) -> None: ...

    def counters(self) -> dict[str, dict[str, int]]:
        """counter name -> model -> value."""


class RedisCacheStore:
    """Entries as JSON strings, scores in a sorted set, the event log in a capped Redis stream."""

    LOG_LENGTH = 100_000

    def __init__(self, url: str, prefix: str):
        from fastgen.jobs import redis_client

        self.redis = redis_client(url)
        self.prefix = prefix

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def new_id(self) -> int:
        return int(self.redis.incr(self._key("next_id")))

    def add(self, entry: Entry) -> None:
        pipe = self.redis.pipeline()
        pipe.set(self._key("entry", str(entry.id)), entry.to_json())
        for k, size in entry.marks.items():
            pipe.zadd(self._key("scores"), {member(entry.id, k): k})
            pipe.hset(self._key("sizes"), member(entry.id, k), size)
            pipe.incrby(self._key("bytes"), size)
        pipe.xadd(self._key("log"), {"op": "add", "id": entry.id}, maxlen=self.LOG_LENGTH, approximate=True)
        pipe.execute()

    def entry(self, entry_id: int) -> Entry | None:
        raw = self.redis.get(self._key("entry", str(entry_id)))
        if raw is None:
            return None
        entry = Entry.from_json(raw)
        scores = self.redis.pipeline()
        for k in entry.marks:
            scores.zscore(self._key("scores"), member(entry.id, k))
        live = scores.execute()
        return _with_marks(entry, {k: v for (k, v), s in zip(entry.marks.items(), live, strict=True) if s is not None})

    def snapshot(self) -> tuple[list[Entry], str]:
        last = self.redis.xrevrange(self._key("log"), count=1)
        cursor = last[0][0].decode() if last else "0-0"
        live: dict[int, dict[int, int]] = {}
        for raw in self.redis.zrange(self._key("scores"), 0, -1):
            entry_id, k = parse_member(raw)
            live.setdefault(entry_id, {})[k] = 0
        keys = [self._key("entry", str(i)) for i in live]
        entries = []
        for raw in self.redis.mget(keys) if keys else []:
            if raw is not None:
                entry = Entry.from_json(raw)
                entries.append(_with_marks(entry, {k: entry.marks[k] for k in live[entry.id] if k in entry.marks}))
        return entries, cursor

    def events(self, cursor: str) -> tuple[list[Event], str | None]:
        first = self.redis.xrange(self._key("log"), count=1)
        if first and cursor != "0-0" and _stream_id(first[0][0].decode()) > _stream_id(cursor):
            return [], None  # trimmed past us: the caller reloads the snapshot
        rows = self.redis.xrange(self._key("log"), min=f"({cursor}", count=10_000)
        events = []
        for stream_id, fields in rows:
            fields = {k.decode(): v.decode() for k, v in fields.items()}
            events.append(Event(fields["op"], int(fields["id"]), int(fields.get("k", 0))))
            cursor = stream_id.decode()
        return events, cursor

    def hit(self, entry_id: int, k: int) -> None:
        self.redis.zadd(self._key("scores"), {member(entry_id, k): k}, xx=True, incr=True)

    def drop(self, entry_id: int, k: int) -> bool:
        if not self.redis.zrem(self._key("scores"), member(entry_id, k)):
            return False
        self._forget(entry_id, k)
        return True

    def _forget(self, entry_id: int, k: int) -> None:
        size = int(self.redis.hget(self._key("sizes"), member(entry_id, k)) or 0)
        pipe = self.redis.pipeline()
        pipe.hdel(self._key("sizes"), member(entry_id, k))
        pipe.decrby(self._key("bytes"), size)
        pipe.xadd(self._key("log"), {"op": "drop", "id": entry_id, "k": k}, maxlen=self.LOG_LENGTH, approximate=True)
        pipe.execute()

    def evict(self, budget_bytes: int) -> list[tuple[int, int]]:
        evicted = []
        while self.stored_bytes() > budget_bytes:
            popped = self.redis.zpopmin(self._key("scores"))
            if not popped:
                break
            entry_id, k = parse_member(popped[0][0])
            self._forget(entry_id, k)
            evicted.append((entry_id, k))
        return evicted

    def stored_bytes(self) -> int:
        return int(self.redis.get(self._key("bytes")) or 0)

    def count(self, model: str, **amounts: int) -> None:
        pipe = self.redis.pipeline()
        for name, amount in amounts.items():
            pipe.hincrby(self._key("counter", name), model, amount)
        pipe.execute()

    def counters(self) -> dict[str, dict[str, int]]:
        pipe = self.redis.pipeline()
        for name in COUNTERS:
            pipe.hgetall(self._key("counter", name))
        return {
            name: {m.decode(): int(v) for m, v in values.items()}
            for name, values in zip(COUNTERS, pipe.execute(), strict=True)
        }


def _stream_id(text: str) -> tuple[int, int]:
    ms, seq = text.split("-")
    return int(ms), int(seq)


def _with_marks(entry: Entry, marks: dict[int, int]) -> Entry:
    return Entry(**{**entry.__dict__, "marks": marks})


SCHEMA = (
    "CREATE TABLE IF NOT EXISTS entries (id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT)",
    "CREATE TABLE IF NOT EXISTS marks (entry_id INTEGER, k INTEGER, bytes INTEGER, score REAL,"
    " PRIMARY KEY (entry_id, k))",
    "CREATE INDEX IF NOT EXISTS marks_by_score ON marks (score, entry_id, k)",
    "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT, entry_id INTEGER, k INTEGER)",
    "CREATE TABLE IF NOT EXISTS counters (name TEXT, model TEXT, value INTEGER, PRIMARY KEY (name, model))",
)


class SqliteCacheStore:
    """The one-machine store: a SQLite file every local worker process opens."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        setup = sqlite3.connect(self.path, timeout=30)
        try:
            setup.execute("PRAGMA journal_mode=WAL")  # outside any transaction, or SQLite refuses
        finally:
            setup.close()
        with self._db() as db:
            for statement in SCHEMA:
                db.execute(statement)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")  # one writer at a time: eviction pops each state once
            yield db
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    def new_id(self) -> int:
        with self._db() as db:
            return int(db.execute("INSERT INTO entries (body) VALUES (NULL)").lastrowid)

    def add(self, entry: Entry) -> None:
        with self._db() as db:
            db.execute("UPDATE entries SET body = ? WHERE id = ?", (entry.to_json(), entry.id))
            db.executemany(
                "INSERT OR REPLACE INTO marks VALUES (?, ?, ?, ?)",
                [(entry.id, k, size, k) for k, size in entry.marks.items()],
            )
            db.execute("INSERT INTO events (op, entry_id, k) VALUES ('add', ?, 0)", (entry.id,))

    def entry(self, entry_id: int) -> Entry | None:
        with self._db() as db:
            row = db.execute("SELECT body FROM entries WHERE id = ?", (entry_id,)).fetchone()
            marks = dict(db.execute("SELECT k, bytes FROM marks WHERE entry_id = ?", (entry_id,)).fetchall())
        return _with_marks(Entry.from_json(row[0]), marks) if row and row[0] else None

    def snapshot(self) -> tuple[list[Entry], str]:
        with self._db() as db:
            cursor = db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
            marks: dict[int, dict[int, int]] = {}
            for entry_id, k, size in db.execute("SELECT entry_id, k, bytes FROM marks"):
                marks.setdefault(entry_id, {})[k] = size
            rows = db.execute("SELECT id, body FROM entries WHERE body IS NOT NULL").fetchall()
        entries = [_with_marks(Entry.from_json(body), marks[i]) for i, body in rows if i in marks]
        return entries, str(cursor)

    def events(self, cursor: str) -> tuple[list[Event], str | None]:
        with self._db() as db:
            rows = db.execute("SELECT seq, op, entry_id, k FROM events WHERE seq > ? ORDER BY seq", (int(cursor),))
            rows = rows.fetchall()
        events = [Event(op, entry_id, k) for _, op, entry_id, k in rows]
        return events, str(rows[-1][0]) if rows else cursor

    def hit(self, entry_id: int, k: int) -> None:
        with self._db() as db:
            db.execute("UPDATE marks SET score = score + k WHERE entry_id = ? AND k = ?", (entry_id, k))

    def drop(self, entry_id: int, k: int) -> bool:
        with self._db() as db:
            return self._drop(db, entry_id, k)

    def _drop(self, db: sqlite3.Connection, entry_id: int, k: int) -> bool:
        if not db.execute("DELETE FROM marks WHERE entry_id = ? AND k = ?", (entry_id, k)).rowcount:
            return False
        db.execute("INSERT INTO events (op, entry_id, k) VALUES ('drop', ?, ?)", (entry_id, k))
        return True

    def evict(self, budget_bytes: int) -> list[tuple[int, int]]:
        with self._db() as db:
            stored = db.execute("SELECT COALESCE(SUM(bytes), 0) FROM marks").fetchone()[0]
            evicted = []
            for entry_id, k, size in db.execute(
                "SELECT entry_id, k, bytes FROM marks ORDER BY score, entry_id, k"
            ).fetchall():
                if stored <= budget_bytes:
                    break
                self._drop(db, entry_id, k)
                stored -= size
                evicted.append((entry_id, k))
        return evicted

    def stored_bytes(self) -> int:
        with self._db() as db:
            return int(db.execute("SELECT COALESCE(SUM(bytes), 0) FROM marks").fetchone()[0])

    def count(self, model: str, **amounts: int) -> None:
        with self._db() as db:
            db.executemany(
                "INSERT INTO counters VALUES (?, ?, ?) ON CONFLICT (name, model) DO UPDATE SET value = value + ?",
                [(name, model, amount, amount) for name, amount in amounts.items()],
            )

    def counters(self) -> dict[str, dict[str, int]]:
        with self._db() as db:
            rows = db.execute("SELECT name, model, value FROM counters").fetchall()
        result: dict[str, dict[str, int]] = {name: {} for name in COUNTERS}
        for name, model, value in rows:
            result.setdefault(name, {})[model] = value
        return result


def open_cache_store(broker_url: str | None, data_dir: Path, state_url: str) -> CacheStore:
    """Redis beside a Redis broker; SQLite under the data directory otherwise.

    Records are only meaningful with their state files, so the Redis keys are namespaced by the state
    store's URL: deployments (or test runs) with different state stores never see each other's entries.
    """
    if broker_url and broker_url.startswith(("redis://", "rediss://")):
        namespace = hashlib.sha256(state_url.encode()).hexdigest()[:10]
        return RedisCacheStore(broker_url, prefix=f"fastgen:cache:{namespace}")
    return SqliteCacheStore(Path(data_dir) / "cache.sqlite3")
