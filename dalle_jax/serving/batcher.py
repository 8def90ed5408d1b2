"""Batching rows of many requests into fixed-size calls, on one worker thread.

    batcher = Batcher(run_batch, batch_size=8, max_waiting=64)
    future = batcher.submit(group, rows)     # concurrent.futures.Future of the rows' results
    results = future.result()                # or: await asyncio.wrap_future(future)

`run_batch(group, rows) -> results` is called with up to `batch_size` rows that share a
`group` (for the image server: the sampling settings, which one compiled call shares), taken
from every waiting request in arrival order, so several clients' images are drawn in one call
and a large request is spread over several. One thread runs every call: the device is used by
one batch at a time, and requests that find `max_waiting` requests already waiting are turned
away (`QueueFull`) instead of queueing without bound.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
from concurrent.futures import Future
from typing import Any, Callable, Hashable, Sequence


class QueueFull(Exception):
    """Raised by `submit` when `max_waiting` requests are already waiting."""


@dataclasses.dataclass(eq=False)
class _Request:
    group: Hashable
    rows: Sequence[Any]
    future: Future
    results: list
    taken: int = 0  # rows handed to a batch so far
    done: int = 0  # rows whose results are in


class Batcher:
    def __init__(self, run_batch: Callable[[Hashable, list], Sequence[Any]], batch_size: int,
                 max_waiting: int):
        if batch_size < 1 or max_waiting < 1:
            raise ValueError(f"batch_size={batch_size} and max_waiting={max_waiting} must be "
                             "positive")
        self.run_batch, self.batch_size, self.max_waiting = run_batch, batch_size, max_waiting
        self.batches_run = 0
        self._waiting: collections.deque[_Request] = collections.deque()
        self._lock = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="batcher", daemon=True)
        self._worker.start()

    def submit(self, group: Hashable, rows: Sequence[Any]) -> Future:
        if not rows:
            raise ValueError("a request needs at least one row")
        request = _Request(group, list(rows), Future(), [None] * len(rows))
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are waiting, the most this "
                                "server queues")
            self._waiting.append(request)
            self._lock.notify()
        return request.future

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def close(self) -> None:
        """Stops the worker after the batch it is running; waiting requests are cancelled."""
        with self._lock:
            self._closed = True
            for request in self._waiting:
                request.future.cancel()
            self._waiting.clear()
            self._lock.notify()
        self._worker.join()

    def _next_batch(self) -> tuple[Hashable, list[tuple[_Request, int]]] | None:
        """Up to batch_size (request, row) pairs of the oldest request's group, oldest first."""
        with self._lock:
            while not self._waiting and not self._closed:
                self._lock.wait()
            if self._closed:
                return None
            group = self._waiting[0].group
            picked = []
            for request in list(self._waiting):
                if request.group != group:
                    continue
                while request.taken < len(request.rows) and len(picked) < self.batch_size:
                    picked.append((request, request.taken))
                    request.taken += 1
                if request.taken == len(request.rows):
                    self._waiting.remove(request)
                if len(picked) == self.batch_size:
                    break
            return group, picked

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            group, picked = batch
            try:
                results = self.run_batch(group, [r.rows[i] for r, i in picked])
                if len(results) != len(picked):
                    raise RuntimeError(f"run_batch gave {len(results)} results for "
                                       f"{len(picked)} rows")
            except BaseException as error:  # noqa: B036 - every failure goes to its requests
                self._fail({request for request, _ in picked}, error)
                continue
            finally:
                self.batches_run += 1
            for (request, index), result in zip(picked, results):
                request.results[index] = result
                request.done += 1
                if request.done == len(request.rows) and not request.future.done():
                    request.future.set_result(request.results)

    def _fail(self, requests, error: BaseException) -> None:
        with self._lock:
            for request in requests:
                if request in self._waiting:
                    self._waiting.remove(request)
                if not request.future.done():
                    request.future.set_exception(error)
