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
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np

POLL_S = 0.0005


class DynamicBatcher:
    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        max_batch: int,
        max_delay_s: float,
        on_batch: Callable[[int, float], None] | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.run, self.max_batch, self.max_delay = run, max_batch, max_delay_s
        self.on_batch = on_batch
        self.queue: queue.Queue = queue.Queue()
        self._held = None  # a request that did not fit the last batch; it starts the next
        self._expected = 0  # requests announced but not yet submitted
        self._lock = threading.Lock()
        self.worker = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self.worker.start()

    def expect(self, change: int) -> None:
        """+1 when a request that will submit starts being handled; -1 when it submits or fails."""
        with self._lock:
            self._expected += change

    async def infer(self, batch: np.ndarray) -> np.ndarray:
        """Model outputs for ``batch``, computed together with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        futures = []
        for start in range(0, len(batch), self.max_batch):
            future = loop.create_future()
            self.queue.put((batch[start : start + self.max_batch], future, loop))
            futures.append(future)
        return np.concatenate(await asyncio.gather(*futures))

    def _collect(self) -> list:
        items = [self._held if self._held is not None else self.queue.get()]
        self._held = None
        size = len(items[0][0])
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
            items.append(item)
            size += len(item[0])
        return items

    def _loop(self) -> None:
        while True:
            items = self._collect()
            inputs = np.concatenate([item[0] for item in items])
            start = time.perf_counter()
            try:
                outputs = self.run(inputs)
            except Exception as err:  # the model failed: every waiting request learns why
                _deliver([(future, loop, None) for _, future, loop in items], err)
                continue
            if self.on_batch is not None:
                self.on_batch(len(inputs), time.perf_counter() - start)
            answers, offset = [], 0
            for x, future, loop in items:
                answers.append((future, loop, outputs[offset : offset + len(x)]))
                offset += len(x)
            _deliver(answers, None)


def _deliver(answers: list, error: Exception | None) -> None:
    """Settle each event loop's futures in one call on that loop."""
    by_loop = defaultdict(list)
    for future, loop, result in answers:
        by_loop[loop].append((future, result))
    for loop, pairs in by_loop.items():
        loop.call_soon_threadsafe(_settle, pairs, error)


def _settle(pairs: list, error: Exception | None) -> None:
    for future, result in pairs:
        if future.done():  # its request was cancelled (the client went away)
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
