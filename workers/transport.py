"""Broker transports that hand a job back at the front of its queue, not the back.

Celery rejects a job with ``requeue=True`` when its pool process died under it (``task_reject_on_worker_lost``) or
a worker group broke: the job was first in line and has waited once already, so it must run before jobs submitted
after it. Stock kombu puts it last: its Redis transport consumes with BRPOP (the oldest message at the right) but
restores a rejected message with LPUSH, and its filesystem transport writes it as a new file, named by the clock,
which sorts after every waiting one. (Redis's visibility-timeout restore of a dead whole worker pushes at the
front already.) Celery is given these classes through ``broker_transport`` (see ``fastgen.workers.app``).
"""

from __future__ import annotations

import os
import uuid
from time import monotonic

from kombu.transport import filesystem, redis
from kombu.utils.json import dumps


class RedisQoS(redis.QoS):
    def restore_by_tag(self, tag, client=None, leftmost=False):
        # Only reject(requeue=True) asks for leftmost (LPUSH: the back of a BRPOP queue); every restore goes in front.
        super().restore_by_tag(tag, client, leftmost=False)


class RedisChannel(redis.Channel):
    QoS = RedisQoS


class RedisTransport(redis.Transport):
    Channel = RedisChannel


class FilesystemChannel(filesystem.Channel):
    def _restore_at_beginning(self, message):
        """Write the message under a name that sorts before every clock-named file (``_get`` takes the first)."""
        info = message.delivery_info
        payload = {**message.serializable(), "redelivered": True}
        for queue in self._lookup(info["exchange"], info["routing_key"]):
            name = f"0_{int(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
            path = os.path.join(self.data_folder_out, name)
            # Written aside and renamed into place, so a consumer never takes a half-written file.
            with open(path + ".tmp", "wb") as f:
                f.write(dumps(payload).encode())
            os.replace(path + ".tmp", path)


class FilesystemTransport(filesystem.Transport):
    Channel = FilesystemChannel
