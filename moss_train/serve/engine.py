"""The decoding engine behind moss-serve: one model, one thread, every request's rows batched.

The thread runs a :class:`~moss_train.chat.generate.DecodingBatch` (continuous batching): a row
submitted while others decode joins the batch before the next step and leaves as soon as it
stops, so a new request waits one step, not a whole generation. Each generated token goes back
to the request's asyncio task through a queue (``loop.call_soon_threadsafe``); the torch work
never runs on the event loop, which stays free to accept and stream.

Admission is per request (a *slot*, held from pass one to the end of pass two and the tool
call between them): at most ``max_batch`` turns at once, the others wait in arrival order.
``max_batch=1`` is strictly sequential service, the baseline of bench/serve_latency.py. A
request whose client goes away cancels its row (it leaves at the next step) and frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable

from moss_train.chat.generate import DecodingBatch, Row

log = logging.getLogger("moss_train.serve")
_DONE = object()  # a row's last message: it stopped or was cancelled
# What /health counts: turns admitted; rows that stopped / were cancelled (a client gone, a stop
# string); tokens generated; decoding steps; the most rows in one step; the most turns waiting.
COUNTS = ("requests", "finished", "cancelled", "tokens", "steps", "peak_rows", "peak_waiting")


class EngineError(RuntimeError):
    """Generation failed inside the engine (the request gets a 500; the engine goes on)."""


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 16):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.context = model.config.n_positions
        self.batch = DecodingBatch(model, tokenizer.pad_id, tokenizer.vocab_size)
        self.counts = Counter(dict.fromkeys(COUNTS, 0))
        self.active = self.waiting = 0  # turns holding a slot / waiting for one
        self._slots: asyncio.Semaphore | None = None
        self._incoming: list[tuple[Row, Callable]] = []
        self._listeners: dict[Row, Callable] = {}
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="moss-serve-engine")
        self._thread.start()

    # ------------------------------------------------------------------ the event-loop side
    @contextlib.asynccontextmanager
    async def slot(self):
        """Hold one of the max_batch places for a whole turn; waits (in order) while all are taken."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_batch)
        self.waiting += 1
        self.counts["peak_waiting"] = max(self.counts["peak_waiting"], self.waiting)
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        self.counts["requests"] += 1
        try:
            yield
        finally:
            self.active -= 1
            self._slots.release()

    async def tokens(self, row: Row) -> AsyncIterator[int]:
        """The row's tokens as they are generated. Closing the iterator early (the client went
        away, a stop string) cancels the row. Use it under contextlib.aclosing."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._submit(row, lambda item: loop.call_soon_threadsafe(queue.put_nowait, item))
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise EngineError(f"generation failed: {item}") from item
                yield item
        finally:
            if not row.done:
                row.cancelled = True
                self.counts["cancelled"] += 1

    def stats(self) -> dict:
        return {
            "active": self.active,
            "waiting": self.waiting,
            "rows": len(self.batch.rows),
            "max_batch": self.max_batch,
            **self.counts,
        }

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(10)

    # ------------------------------------------------------------------ the engine thread
    def _submit(self, row: Row, listener: Callable) -> None:
        with self._wake:
            self._incoming.append((row, listener))
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._incoming and not self.batch.rows and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                incoming, self._incoming = self._incoming, []
            try:
                self._listeners.update(incoming)
                self.batch.add([row for row, _ in incoming])
                events = self.batch.step()
            except Exception as error:  # a bug or out of memory: fail these rows, keep serving
                log.exception("generation step failed")
                self._fail_all(error)
                continue
            self.counts["steps"] += bool(events)
            self.counts["tokens"] += len(events)
            self.counts["peak_rows"] = max(self.counts["peak_rows"], len(events))
            for row, token in events:
                self._listeners[row](token)
            self._release_finished()

    def _release_finished(self) -> None:
        running = set(self.batch.rows)
        for row in [row for row in self._listeners if row not in running]:
            self.counts["finished"] += row.stopped
            self._listeners.pop(row)(_DONE)

    def _fail_all(self, error: Exception) -> None:
        for listener in self._listeners.values():
            listener(error)
        self._listeners.clear()
        self.batch = DecodingBatch(self.model, self.tokenizer.pad_id, self.tokenizer.vocab_size)
