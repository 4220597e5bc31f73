"""Items of an iterator made in a daemon thread, a bounded number ahead of the consumer. No Ray, no
torch: the training loop prepares steps with it (batches.Ahead) and the stream reads epochs with it
(stream.RankStream.groups)."""
from __future__ import annotations

import queue
import threading
from typing import Iterator


class Background:
    """`next()` returns the iterator's items in order, re-raising the producer's error at the item
    it would have been; asking past the end raises RuntimeError (an error, not a hang). `done()`:
    the iterator is exhausted (what it made may still be queued). `close()` stops the producer and
    closes the iterator when it is a generator (e.g. a Ray Data read)."""

    def __init__(self, items: Iterator, depth: int, name: str):
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._items, self._stop, self._end = items, threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._put((True, item)):
                    break
            else:
                self._put((False, RuntimeError(f"{self._thread.name}: asked for more items than it makes")))
        except BaseException as e:  # handed to the consumer
            self._put((False, e))
        finally:
            self._end.set()
            getattr(self._items, "close", lambda: None)()

    def next(self):
        ok, item = self._q.get()
        if not ok:
            raise item
        return item

    def done(self) -> bool:
        return self._end.is_set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
