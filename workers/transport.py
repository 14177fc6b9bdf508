"""Broker transports that hand a job back at the front of its queue, not the back.

Celery rejects a job with ``requeue=True`` when its pool process died under it (``task_reject_on_worker_lost``) or
a worker group broke: the job was first in line and has waited once already, so it must run before jobs submitted
after it. Stock kombu puts it last: its Redis transport consumes with BRPOP (the oldest message at the right) but
restores a rejected message with LPUSH, and its filesystem transport writes it as a new file, named by the clock,
which sorts after every waiting one (and writes every message in place, which a consumer may take half-written).
Celery is given these classes through ``broker_transport`` (see ``fastgen.workers.app``).

A whole worker that died (killed, its machine gone) cannot reject anything: Redis's transport keeps what it held
and hands it back only after the visibility timeout, longer than the longest allowed job. Here a live worker's
sweep also hands back, at the front, every held job whose worker stopped renewing its hold in the job store
(``fastgen.jobs.lost_jobs``, :data:`~fastgen.jobs.HELD_S`), within seconds of the death.
"""

from __future__ import annotations

import logging
import os
import uuid
from time import monotonic, time

from kombu.transport import filesystem, redis
from kombu.transport.redis import Mutex, MutexHeld
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from fastgen.jobs import HELD_S, lost_jobs

logger = logging.getLogger(__name__)


class RedisQoS(redis.QoS):
    sweep_failed = False  # the lost-job sweep has failed once (said at WARNING; later failures at DEBUG)

    def restore_by_tag(self, tag, client=None, leftmost=False):
        # Only reject(requeue=True) asks for leftmost (LPUSH: the back of a BRPOP queue); every restore goes in front.
        super().restore_by_tag(tag, client, leftmost=False)

    def restore_visible(self, start=0, num=10, interval=10):
        super().restore_visible(start, num, interval)
        try:
            self.restore_lost(num)
        except Exception as exc:  # the broker's own sweep and the consumer go on; the next sweep tries again
            level = logging.DEBUG if self.sweep_failed else logging.WARNING  # a sweep runs every second
            self.sweep_failed = True
            logger.log(level, "could not look for jobs whose worker is gone: %s", exc)

    def restore_lost(self, num: int | None = 10) -> None:
        """Hand back at once the held jobs whose worker is gone (its hold in the job store ran out)."""
        with self.channel.conn_or_acquire() as client:
            # Held at least HELD_S: a job just taken has had time to take its hold (the worker does so first).
            limit = {"offset": 0, "num": num} if num else {}
            tags = client.zrange(self.unacked_index_key, time() - HELD_S, 0, desc=True, byscore=True, **limit)
            jobs = {}
            for tag, raw in zip(tags, client.hmget(self.unacked_key, tags) if tags else [], strict=True):
                job_id = _job_id(raw)
                if job_id:
                    jobs[job_id] = tag
            lost = lost_jobs(client, list(jobs)) if jobs else set()
            if not lost:
                return
            try:
                with Mutex(client, self.unacked_mutex_key, self.unacked_mutex_expire):
                    for job_id in lost:
                        logger.warning("job %s: its worker stopped holding it; handed back to its queue", job_id)
                        self.restore_by_tag(jobs[job_id], client)
            except MutexHeld:  # another worker is restoring; the next sweep looks again
                pass


def _job_id(raw: bytes | None) -> str | None:
    """The job (Celery task) id of a held message, or None for a message that is not a fastgen job's."""
    try:
        message = loads(bytes_to_str(raw))[0]
        return message["headers"]["id"]
    except (TypeError, ValueError, KeyError, IndexError):
        return None


class RedisChannel(redis.Channel):
    QoS = RedisQoS


class RedisTransport(redis.Transport):
    Channel = RedisChannel


class FilesystemChannel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        """Publish as kombu does, but atomically: kombu writes the file in place, and a consumer that lists the folder
        meanwhile (a worker's main process, or a pool process taking a batch's jobs) moves it away empty and fails
        on it (JSONDecodeError), which stops the worker."""
        self._write(f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg", payload)

    def _restore_at_beginning(self, message):
        """Write the message under a name that sorts before every clock-named file (``_get`` takes the first)."""
        info = message.delivery_info
        payload = {**message.serializable(), "redelivered": True}
        for queue in self._lookup(info["exchange"], info["routing_key"]):
            self._write(f"0_{int(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg", payload)

    def _write(self, name: str, payload) -> None:
        # Written aside and renamed into place, so a consumer never takes a half-written file.
        path = os.path.join(self.data_folder_out, name)
        with open(path + ".tmp", "wb") as f:
            f.write(dumps(payload).encode())
        os.replace(path + ".tmp", path)


class FilesystemTransport(filesystem.Transport):
    Channel = FilesystemChannel
