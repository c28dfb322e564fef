"""Wake-ups shared by scheduler replicas over Redis pub/sub (see RelayNotifier)."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from typing import Any

import redis

from .notify import Notifier

log = logging.getLogger("fedml.scheduler")


class RelayNotifier(Notifier):
    """A Notifier whose wake-ups reach every scheduler replica: local waiters are woken at once, other
    replicas through a Redis pub/sub channel. Keys are batched by a publisher thread, so a pass that places
    thousands of runs costs a few PUBLISHes, not one round trip per key."""

    def __init__(self, r: redis.Redis, channel: str) -> None:
        super().__init__()
        self.r, self.channel = r, channel
        self.origin = os.urandom(6).hex()
        self.on_key: dict[str, Any] = {}  # callbacks for wake-ups from other replicas
        self._out: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._closed = threading.Event()
        self._pubsub = r.pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(channel)
        threading.Thread(target=self._publish, name="notify-publish", daemon=True).start()
        threading.Thread(target=self._listen, name="notify-listen", daemon=True).start()

    def notify(self, key: str) -> None:
        super().notify(key)
        self._out.put(key)

    def _publish(self) -> None:
        while not self._closed.is_set():
            key = self._out.get()
            if key is None:
                return
            keys = {key}
            with contextlib.suppress(queue.Empty):
                while len(keys) < 5000:
                    more = self._out.get_nowait()
                    if more is None:
                        self._closed.set()
                        break
                    keys.add(more)
            try:
                self.r.publish(self.channel, self.origin + "\n" + "\n".join(sorted(keys)))
            except redis.RedisError as exc:  # other replicas still wake on their own timeouts
                log.warning("could not relay wake-ups: %s", exc)
                time.sleep(0.5)

    def _listen(self) -> None:
        while not self._closed.is_set():
            try:
                msg = self._pubsub.get_message(timeout=1.0)
            except Exception as exc:  # noqa: BLE001 - closing under a blocked read raises all sorts
                if self._closed.is_set():
                    return
                log.warning("wake-up relay lost (%s); resubscribing", exc)
                time.sleep(0.5)
                with contextlib.suppress(redis.RedisError):
                    self._pubsub = self.r.pubsub(ignore_subscribe_messages=True)
                    self._pubsub.subscribe(self.channel)
                    for key in ("schedule", "nodes"):  # what we may have missed matters most here
                        super().notify(key)
                continue
            if not msg or msg.get("type") != "message":
                continue
            origin, _, body = msg["data"].decode().partition("\n")
            if origin == self.origin:
                continue
            for key in body.split("\n"):
                if key:
                    super().notify(key)
                    if key in self.on_key:
                        self.on_key[key]()

    def close(self) -> None:
        self._closed.set()
        self._out.put(None)
        with contextlib.suppress(Exception):
            self._pubsub.close()
