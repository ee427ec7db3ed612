"""Dynamic batching: concurrent requests share one ONNX Runtime call.

Requests wait in a queue; a worker thread takes the first, then keeps collecting until the batch
holds ``max_batch`` samples or ``max_delay`` has passed since the first arrived, runs the model
once on the concatenation and hands every request its rows. It waits only while more requests
are on their way (announced with :meth:`DynamicBatcher.expect` when their HTTP handling starts),
so a lone request runs at once instead of sitting out the delay. A request larger than
``max_batch`` is cut into pieces that go through the same queue.

Coroutines await :meth:`DynamicBatcher.infer`; the model runs in the batcher's own thread, and
the results of one batch reach each event loop in a single ``call_soon_threadsafe``, so a batch
of 32 wakes the loop once rather than 32 threads that would then queue for the GIL.

The worker is supervised: whatever fails while one batch is collected, concatenated, run or
split fails that batch's requests with :class:`BatchFailed` (naming the stage and the cause) and
the worker goes on with the next. Should the thread end all the same (an exception that is not
an ``Exception``), every waiting request is failed, new ones are refused with a 503, and
:meth:`DynamicBatcher.health` says so, as it says when one batch runs past ``stall_s`` (a wedged
model call): the server's readiness answers from it. The queue is bounded (``max_queue``
samples): past it a request is refused at once with :class:`~gala_serve.errors.Overloaded`
(HTTP 503 with ``Retry-After``, gRPC ``UNAVAILABLE``) instead of waiting without end.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np

from gala_serve.errors import NotReady, Overloaded, ServerFault

POLL_S = 0.0005
log = logging.getLogger("gala_serve")


class BatchFailed(ServerFault):
    """A batch could not be computed; its requests get this (a 500, gRPC INTERNAL)."""


class DynamicBatcher:
    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        max_batch: int,
        max_delay_s: float,
        on_batch: Callable[[int, float], None] | None = None,
        max_queue: int | None = None,
        stall_s: float = 60.0,
        on_failure: Callable[[str], None] | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.run, self.max_batch, self.max_delay = run, max_batch, max_delay_s
        self.on_batch, self.on_failure = on_batch, on_failure
        self.max_queue, self.stall_s = max_queue, stall_s
        self.queue: queue.Queue = queue.Queue()
        self._held = None  # a request that did not fit the last batch; it starts the next
        self._expected = 0  # requests announced but not yet submitted
        self.queued = 0  # samples submitted and not yet taken into a batch
        self.busy_since: float | None = None  # when the batch now being computed was collected
        self.death: BaseException | None = None  # what ended the worker thread, if it ended
        self._lock = threading.Lock()
        self.worker = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self.worker.start()

    def expect(self, change: int) -> None:
        """+1 when a request that will submit starts being handled; -1 when it submits or fails."""
        with self._lock:
            self._expected += change

    def health(self) -> str | None:
        """Why the batcher cannot serve (a dead or wedged worker), or None when it can."""
        if self.death is not None or not self.worker.is_alive():
            return f"the batcher's worker thread died ({_describe(self.death)})"
        busy = self.busy_since
        if busy is not None and time.monotonic() - busy > self.stall_s:
            return (
                f"the batcher's worker has been computing one batch for "
                f"{time.monotonic() - busy:.1f} s (over {self.stall_s:g} s: wedged)"
            )
        return None

    async def infer(self, batch: np.ndarray) -> np.ndarray:
        """Model outputs for ``batch``, computed together with whatever else is waiting;
        :class:`Overloaded` when the queue is full, :class:`NotReady` when the worker died."""
        loop = asyncio.get_running_loop()
        futures = []
        with self._lock:  # one decision for all pieces, and none after the worker died
            if self.death is not None:
                raise NotReady(f"the batcher's worker thread died ({_describe(self.death)})")
            if self.max_queue is not None and self.queued + len(batch) > self.max_queue:
                raise Overloaded(
                    f"the server is overloaded: {self.queued} samples wait for the model and "
                    f"the queue holds {self.max_queue}; retry later"
                )
            self.queued += len(batch)
            for start in range(0, len(batch), self.max_batch):
                future = loop.create_future()
                self.queue.put((batch[start : start + self.max_batch], future, loop))
                futures.append(future)
        return np.concatenate(await asyncio.gather(*futures))

    def _take(self, items: list, item) -> None:
        items.append(item)
        with self._lock:
            self.queued -= len(item[0])

    def _collect(self, items: list) -> None:
        """Fill ``items`` with the next batch. It is the caller's list, so that a failure part
        way through still knows which requests it holds."""
        first = self._held if self._held is not None else self.queue.get()
        self._held = None
        self._take(items, first)
        size = len(first[0])
        deadline = time.perf_counter() + self.max_delay
        while size < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                if remaining <= 0 or self._expected <= 0:
                    break  # nothing else is coming soon enough
                try:  # short slices, so a withdrawn announcement ends the wait early
                    item = self.queue.get(timeout=min(remaining, POLL_S))
                except queue.Empty:
                    continue
            if size + len(item[0]) > self.max_batch:
                self._held = item
                break
            self._take(items, item)
            size += len(item[0])

    def _loop(self) -> None:
        items: list = []
        try:
            while True:
                items = []
                self._step(items)
        except BaseException as err:  # the thread ends: nobody may wait for it any more
            log.critical("the batcher's worker thread died", exc_info=True)
            with self._lock:
                self.death = err
                waiting = [] if self._held is None else [self._held]
                self._held = None
                while not self.queue.empty():
                    waiting.append(self.queue.get_nowait())
            failure = BatchFailed(f"the batcher's worker thread died ({_describe(err)})")
            _deliver([(future, loop, None) for _, future, loop in items + waiting], failure)
            raise

    def _step(self, items: list) -> None:
        """One batch: collect, concatenate, run, split, deliver. A failure at any stage fails
        this batch's requests, naming the stage and the cause; the worker goes on."""
        stage = "collecting"
        try:
            self._collect(items)
            self.busy_since = time.monotonic()
            stage = "concatenating"
            inputs = np.concatenate([item[0] for item in items])
            stage = "running the model"
            start = time.perf_counter()
            outputs = self.run(inputs)
            stage = "recording the batch"
            if self.on_batch is not None:
                self.on_batch(len(inputs), time.perf_counter() - start)
            stage = "splitting the outputs"
            answers, offset = [], 0
            for x, future, loop in items:
                answers.append((future, loop, outputs[offset : offset + len(x)]))
                offset += len(x)
            if offset != len(outputs):
                raise ValueError(f"the model answered {len(outputs)} rows for {offset} samples")
        except Exception as err:
            self._fail(items, stage, err)
            return
        finally:
            self.busy_since = None
        _deliver(answers, None)

    def _fail(self, items: list, stage: str, err: Exception) -> None:
        log.error("a batch of %d requests failed while %s", len(items), stage, exc_info=err)
        samples = sum(len(item[0]) for item in items)
        failure = BatchFailed(
            f"a batch of {samples} samples from {len(items)} requests failed while {stage}: "
            f"{_describe(err)}"
        )
        failure.__cause__ = err
        _deliver([(future, loop, None) for _, future, loop in items], failure)
        if self.on_failure is not None:
            try:
                self.on_failure(stage)
            except Exception:  # a metric must not take the worker down
                log.exception("counting the failed batch failed")


def _describe(err: BaseException | None) -> str:
    if err is None:
        return "no exception was recorded"
    text = str(err)[:300]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _deliver(answers: list, error: Exception | None) -> None:
    """Settle each event loop's futures in one call on that loop. A loop that has closed (its
    requests are gone with it) is skipped; it must not take the worker down."""
    by_loop = defaultdict(list)
    for future, loop, result in answers:
        by_loop[loop].append((future, result))
    for loop, pairs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, pairs, error)
        except RuntimeError:  # "Event loop is closed"
            log.warning("dropped the answers of %d requests: their event loop closed", len(pairs))


def _settle(pairs: list, error: Exception | None) -> None:
    for future, result in pairs:
        if future.done():  # its request was cancelled (the client went away)
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
