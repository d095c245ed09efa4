"""Event hub: backends publish cluster events from any thread; SSE clients consume them.

Event dicts always carry "type" (status, request_start, chunk, reassignment, failure,
request_done, request_failed) and "t" (unix seconds).
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time

QUEUE_SIZE = 1000


class EventHub:
    """Fan-out of events to asyncio subscribers, plus the last status and the last requests."""

    def __init__(self, keep_requests: int = 10):
        self._lock = threading.Lock()
        self._subs: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = set()
        self.requests: collections.deque[dict] = collections.deque(maxlen=keep_requests)
        self.status: dict = {}
        self.counters = collections.Counter()

    def publish(self, event: dict) -> None:
        """Send an event to every subscriber (thread-safe, never blocks)."""
        event.setdefault("t", time.time())
        kind = event.get("type")
        with self._lock:
            self.counters[kind] += 1
            if kind == "status":
                self.status = event
            elif kind in ("request_done", "request_failed"):
                self.requests.append(event)
            subs = list(self._subs)
        for loop, queue in subs:
            try:
                loop.call_soon_threadsafe(_put_drop_oldest, queue, event)
            except RuntimeError:  # loop closed: the subscriber is gone
                self.unsubscribe((loop, queue))

    def subscribe(self) -> tuple[asyncio.AbstractEventLoop, asyncio.Queue]:
        """Register the calling event loop; returns a handle whose queue receives events."""
        handle = (asyncio.get_running_loop(), asyncio.Queue(QUEUE_SIZE))
        with self._lock:
            self._subs.add(handle)
        return handle

    def subscribers(self) -> int:
        with self._lock:
            return len(self._subs)

    def unsubscribe(self, handle) -> None:
        with self._lock:
            self._subs.discard(handle)

    def close(self) -> None:
        """Tell every subscriber to finish (server shutdown): they receive a 'close' event."""
        self.publish({"type": "close"})

    def snapshot(self) -> dict:
        """Last status and the last requests, for a client that just connected."""
        with self._lock:
            return {"type": "snapshot", "t": time.time(), "status": self.status,
                    "requests": list(self.requests), "counters": dict(self.counters)}

    def find_request(self, request_id: str) -> dict | None:
        with self._lock:
            for ev in self.requests:
                if ev.get("id") == request_id:
                    return ev
        return None


def _put_drop_oldest(queue: asyncio.Queue, event: dict) -> None:
    if queue.full():  # a slow client loses the oldest events, never blocks the publisher
        queue.get_nowait()
    queue.put_nowait(event)
