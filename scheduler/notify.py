"""Wake-ups for long polls and log followers, callable from any thread.

Each key has a counter. A waiter takes a ticket (the counter) before it looks at the store, then waits
until the counter moves past it, so a notify between the look and the wait is never missed.
"""

from __future__ import annotations

import asyncio
import threading


class Notifier:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, int] = {}
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}

    def ticket(self, key: str) -> int:
        with self._lock:
            return self._counters.get(key, 0)

    def notify(self, key: str) -> None:
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + 1
            waiters = self._waiters.pop(key, [])
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_resolve, fut)

    async def wait(self, key: str, ticket: int, timeout: float) -> bool:
        """True if notified after `ticket`, False on timeout."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._counters.get(key, 0) != ticket:
                return True
            self._waiters.setdefault(key, []).append((loop, fut))
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            with self._lock:
                lst = self._waiters.get(key)
                if lst is not None:
                    lst[:] = [w for w in lst if w[1] is not fut]
                    if not lst:
                        del self._waiters[key]

    def forget(self, key: str) -> None:
        with self._lock:
            self._counters.pop(key, None)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
