"""Concurrent requests grouped into batched decoder calls, under a budget of beam rows.

One worker takes the oldest waiting request and the requests behind it that share its
:meth:`~decoding.serving.decoders.Decoder.batch_key`, oldest first, while their rows fit
``max_batch_rows`` and their prompts, padded to the longest, ``max_batch_tokens``. When the
worker is free and the budget is not full, it waits for more while requests that can share the
batch keep arriving: until none arrived for ``arrival_gap_s``, and never past ``max_wait_s``
after the oldest request arrived (a burst of concurrent clients, whose requests reach the server
over tens of milliseconds, becomes one batch; a lone request waits one gap). A request larger than
the budgets runs alone; a batch that fails is decoded again one request at a time, so that one
request cannot fail the others. Every batch starts with the oldest request still waiting, so a
request is held back by at most the batch that is running when it arrives (a request at the
operator's cap included) plus the requests that arrived before it.

A request whose client left before its batch starts is never decoded; one that leaves while its
batch runs has its result dropped. At most ``max_queue`` requests wait: beyond them
:meth:`Batcher.submit` raises :class:`QueueFull` (HTTP 429). :meth:`Batcher.close` answers every
request already accepted before it returns (a server's drain on SIGTERM).

The decoder runs in one worker thread (a search already uses every core through torch's own
threads); the event loop stays free to accept, refuse and cancel requests meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from decoding.serving.requests import DecodeRequest

logger = logging.getLogger("decoding.serving")


class ShuttingDown(RuntimeError):
    """The batcher is closing: it takes no new request (HTTP 503)."""


class QueueFull(RuntimeError):
    """The server holds ``max_queue`` waiting requests; the client should retry later."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"the server is at its queue limit; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass
class _Entry:
    request: DecodeRequest
    key: object
    rows: int
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class BatchStats:
    """What the batcher did, for ``/metrics`` and tests: a hook per event (no-ops here; the server
    binds them to Prometheus metrics)."""

    def accepted(self) -> None: ...
    def batch(self, requests: int, rows: int, seconds: float) -> None: ...
    def decoded(self, requests: int) -> None: ...
    def cancelled(self, stage: str) -> None: ...


class Batcher:
    """Groups :meth:`submit` calls into batched ``decoder.decode`` calls (see the module docstring).

    Args:
        decoder: a :class:`~decoding.serving.decoders.Decoder`.
        max_batch_rows: the budget of beam rows per batch (a larger request runs alone).
        max_batch_tokens: the budget of prompt tokens per batch, counted as the prompts are
            padded (requests x the longest prompt); None: no budget.
        max_queue: most requests waiting for a batch.
        max_wait_s: longest the oldest waiting request waits for others to fill the budget.
        arrival_gap_s: the wait ends once no request arrived for this long.
        stats: a :class:`BatchStats` to report to.
    """

    def __init__(self, decoder, *, max_batch_rows: int = 2048, max_batch_tokens: int | None = 1 << 17,
                 max_queue: int = 1024, max_wait_s: float = 0.1, arrival_gap_s: float = 0.02,
                 stats: BatchStats | None = None):
        for name, value in (("max_batch_rows", max_batch_rows), ("max_queue", max_queue),
                            ("max_batch_tokens", 1 if max_batch_tokens is None else max_batch_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        for name, value in (("max_wait_s", max_wait_s), ("arrival_gap_s", arrival_gap_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name}: expected a non-negative number of seconds, got {value!r}")
        self.decoder, self.max_batch_rows, self.max_queue = decoder, max_batch_rows, max_queue
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s, self.arrival_gap_s = max_wait_s, arrival_gap_s
        self.stats = stats or BatchStats()
        self._queue: collections.deque[_Entry] = collections.deque()
        self._arrived = asyncio.Event()
        self._closing = False
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="decoding-serve")
        self._current: list[_Entry] = []  # the batch being decoded
        self.last_batch_s = 0.0

    @property
    def waiting(self) -> int:
        return sum(not e.future.done() for e in self._queue)

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="decoding-serve batcher")
            self._worker.add_done_callback(self._stopped)

    @property
    def running(self) -> int:
        """Requests in the batch being decoded."""
        return len(self._current)

    @property
    def alive(self) -> bool:
        """The worker runs (``/health``)."""
        return self._worker is not None and not self._worker.done()

    def _stopped(self, worker: asyncio.Task) -> None:
        """The worker ended. After a clean close nothing waits; cancelled, or stopped by an error of
        its own, it fails every request still waiting or in its batch (rather than leaving them to
        wait forever), and every later one."""
        self._closing = True
        error = None if worker.cancelled() else worker.exception()
        if error is not None:
            logger.error("the decoding-serve batcher stopped: %r", error)
        for entry in (*self._queue, *self._current):
            if not entry.future.done():
                entry.future.set_exception(ShuttingDown("the server's batcher stopped; the server log says why"))
        self._queue.clear()

    async def submit(self, request: DecodeRequest):
        """The decoder's result for ``request``, once its batch ran. Raises :class:`QueueFull`,
        or :class:`ShuttingDown` once the batcher closed. Cancelling the awaiting task withdraws the
        request (never decoded if its batch had not started)."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        if self.waiting >= self.max_queue:
            raise QueueFull(max(1, round(self.last_batch_s + 0.5)))
        entry = _Entry(request, self.decoder.batch_key(request), self.decoder.rows(request),
                       asyncio.get_running_loop().create_future())
        self._queue.append(entry)
        self.stats.accepted()
        self._arrived.set()
        return await entry.future  # a cancelled caller cancels the future: the worker skips it

    def _prune(self) -> None:
        """Drop withdrawn requests from the queue (they cost nothing)."""
        kept = collections.deque()
        for entry in self._queue:
            if entry.future.cancelled():
                self.stats.cancelled("queued")
            else:
                kept.append(entry)
        self._queue = kept

    def _compatible(self, head: _Entry) -> tuple[int, float]:
        """The rows of the waiting requests that can share ``head``'s batch, and when the last of
        them arrived."""
        rows, last = 0, head.arrived
        for entry in self._queue:
            if entry.key == head.key and not entry.future.done():
                rows += entry.rows
                last = max(last, entry.arrived)
        return rows, last

    def _take(self) -> list[_Entry]:
        """The next batch: the oldest request and the compatible ones behind it, in arrival
        order, while they fit the budgets (the oldest alone if it is larger)."""
        head = self._queue[0]
        batch, rows, longest, rest = [head], head.rows, head.request.length, collections.deque()
        self._queue.popleft()
        full = False
        for entry in self._queue:
            padded = max(longest, entry.request.length)
            fits = (rows + entry.rows <= self.max_batch_rows
                    and (self.max_batch_tokens is None or (len(batch) + 1) * padded <= self.max_batch_tokens))
            if not full and entry.key == head.key and fits:
                batch.append(entry)
                rows, longest = rows + entry.rows, padded
            else:
                full = full or entry.key == head.key  # stop at the first compatible one that does not fit
                rest.append(entry)
        self._queue = rest
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._prune()
            if not self._queue:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            head = self._queue[0]
            # a bounded wait for more requests to fill the budget: while requests that can share
            # the batch keep arriving (others do not hold it), never past max_wait_s after the oldest's arrival
            while not self._closing:
                rows, last = self._compatible(head)
                left = min(head.arrived + self.max_wait_s, last + self.arrival_gap_s) - time.monotonic()
                if rows >= self.max_batch_rows or left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
            self._prune()
            if not self._queue:
                continue
            batch = self._current = self._take()
            started = time.monotonic()
            try:
                outcomes = await loop.run_in_executor(self._executor, self._decode, [e.request for e in batch])
            finally:
                self.last_batch_s = time.monotonic() - started
            self.stats.batch(len(batch), sum(e.rows for e in batch), self.last_batch_s)
            self.stats.decoded(len(batch))
            for entry, (result, error) in zip(batch, outcomes):
                if entry.future.cancelled():
                    self.stats.cancelled("running")  # its client left mid-batch: the result is dropped
                elif error is not None:
                    entry.future.set_exception(error)
                else:
                    entry.future.set_result(result)
            self._current = []

    def _decode(self, requests: list[DecodeRequest]) -> list[tuple]:
        """``(result, None)`` or ``(None, exception)`` per request. A batch that fails is decoded
        again one request at a time, so that one request cannot fail the others (the worker
        thread)."""
        try:
            results = self.decoder.decode(requests)
            if len(results) != len(requests):
                raise RuntimeError(f"the decoder answered {len(results)} of {len(requests)} requests")
            return [(result, None) for result in results]
        except Exception as exc:
            if len(requests) == 1:
                return [(None, exc)]
            logger.warning("a batch of %d requests failed (%s); decoding them one by one", len(requests), exc)
            return [outcome for request in requests for outcome in self._decode([request])]

    async def close(self) -> None:
        """Stop taking requests; return once every accepted request has its answer."""
        self._closing = True
        self._arrived.set()
        if self._worker is not None:
            await asyncio.gather(self._worker, return_exceptions=True)  # a worker's own error: logged
        self._executor.shutdown(wait=True)
