"""Capture: a thread that reads a source into a hand-over, reopening live sources with bounded backoff.

Live sources hand over through ``LatestSlot`` (only the newest frame waits; a replaced frame is
dropped and counted), files and folders through ``BlockingQueue`` (nothing lost, order kept).
Whatever happens, the capture thread ends by handing over ``END``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from .counters import Counters
from .sources import Source

END = object()  # the end-of-stream marker every stage passes on
STALLED, STOPPED = object(), object()  # a live source's read that did not return within the stall time / before the run stopped


class Reader:
    """Reads a live source on a helper thread, so that a read that never returns is noticed. ``request`` starts a read
    (unless one is pending), ``wait(timeout)`` gives ``("frame", frame or None)``, ``("error", exception)`` or None while
    the read is still pending. ``abandon`` leaves a stuck read to its thread (which ends if it ever returns) and the
    next ``request`` starts a new helper."""

    def __init__(self, source: Source):
        self.source = source
        self._requests: queue.Queue | None = None
        self._pending = False

    def request(self) -> None:
        if self._requests is None:
            self._requests, self._results = queue.Queue(), queue.Queue()
            requests, results = self._requests, self._results

            def serve():
                while requests.get() is not None:
                    try:
                        results.put(("frame", self.source.read()))
                    except BaseException as exc:  # handed to the capture thread, which raises it
                        results.put(("error", exc))

            threading.Thread(target=serve, name="capture-read", daemon=True).start()
        if not self._pending:
            self._requests.put(True)
            self._pending = True

    def wait(self, timeout: float):
        try:
            result = self._results.get(timeout=timeout)
        except queue.Empty:
            return None
        self._pending = False
        return result

    def abandon(self) -> None:
        if self._requests is not None:
            self._requests.put(None)  # the helper ends once its read returns, if it ever does
        self._requests, self._pending = None, False

    close = abandon


class LatestSlot:
    """A one-item mailbox for live sources: ``put`` replaces an unconsumed frame and reports the drop.

    The end marker never replaces a pending frame: it is delivered after it.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._item: Any = None
        self._has = False
        self._closed = False

    def put(self, item) -> bool:
        with self._cond:
            if item is END:
                self._closed = True
                self._cond.notify()
                return False
            dropped = self._has
            self._item, self._has = item, True
            self._cond.notify()
            return dropped

    def get(self):
        with self._cond:
            while not self._has and not self._closed:
                self._cond.wait()
            if self._has:
                item, self._item, self._has = self._item, None, False
                return item
            return END

    def discard(self, timeout: float = 0.1) -> None:
        """Throw away whatever waits (used while shutting down)."""
        with self._cond:
            self._item, self._has = None, False


class BlockingQueue:
    """Lossless hand-over for files and folders (bounded, so memory stays bounded)."""

    def __init__(self, size: int = 8):
        self._q: queue.Queue = queue.Queue(maxsize=size)

    def put(self, item) -> bool:
        self._q.put(item)
        return False

    def get(self):
        return self._q.get()

    def discard(self, timeout: float = 0.1) -> None:
        """Throw away one waiting item, or wait up to ``timeout`` for one (used while shutting down)."""
        try:
            self._q.get(timeout=timeout)
        except queue.Empty:
            pass


class Mux:
    """The hand-over of several sources to one inference thread that batches across them.

    Each source has a port: a live one keeps only its newest frame (a replaced frame is dropped
    and counted), a file or folder keeps up to ``depth`` frames in order (its capture waits, nothing
    is lost). ``get_batch`` waits for any frame and then takes one item from every source that has
    one: the newest of each live source, the next of each file source. A source that ends (``END``
    on its port) leaves the others running; ``get_batch`` returns ``END`` once every source ended
    and nothing waits.
    """

    def __init__(self, lives: list[bool], depth: int = 8, max_batch: int | None = None):
        self._cond = threading.Condition()
        self._live, self._depth = list(lives), depth
        self._items: list[deque] = [deque() for _ in lives]
        self._ended = [False] * len(lives)
        self.max_batch = max_batch or len(lives)  # 1: one frame per engine call, the sources taken in turn
        self._next = 0  # where the next batch starts looking, so that a cap serves every source in turn

    def port(self, index: int) -> "_MuxPort":
        return _MuxPort(self, index)

    def _put(self, i: int, item) -> bool:
        with self._cond:
            if item is END:
                self._ended[i] = True
                self._cond.notify_all()
                return False
            if self._live[i]:
                dropped = bool(self._items[i])
                self._items[i].clear()
                self._items[i].append(item)
                self._cond.notify_all()
                return dropped
            while len(self._items[i]) >= self._depth:
                self._cond.wait()
            self._items[i].append(item)
            self._cond.notify_all()
            return False

    def get_batch(self):
        """``[(source index, item), ...]`` with at most one item per source, or ``END``."""
        with self._cond:
            while not any(self._items) and not all(self._ended):
                self._cond.wait()
            if not any(self._items):
                return END
            n = len(self._items)
            order = [(self._next + k) % n for k in range(n)]
            batch = [(i, self._items[i].popleft()) for i in [i for i in order if self._items[i]][: self.max_batch]]
            self._next = (batch[-1][0] + 1) % n
            batch.sort(key=lambda item: item[0])
            self._cond.notify_all()  # file captures waiting for room
            return batch

    def _discard(self, i: int) -> None:
        with self._cond:
            self._items[i].clear()
            self._cond.notify_all()


class _MuxPort:
    """One source's side of a ``Mux`` (what ``Capture`` puts into)."""

    def __init__(self, mux: Mux, index: int):
        self.mux, self.index = mux, index

    def put(self, item) -> bool:
        return self.mux._put(self.index, item)

    def discard(self, timeout: float = 0.1) -> None:
        self.mux._discard(self.index)
        time.sleep(min(timeout, 0.01))


def handover_for(source: Source):
    return LatestSlot() if source.live else BlockingQueue()


@dataclass
class Reconnect:
    """How a live source that stops delivering is reopened: exponential backoff, bounded."""

    max_attempts: int = 5
    backoff_s: float = 0.5
    backoff_max_s: float = 8.0
    # a live source whose read has not returned for this long has stalled (a frozen camera, a stream that stopped sending but
    # keeps its connection): recorded, then reopened like a dropped stream. 0 = wait for ever
    stall_s: float = 10.0

    def delay(self, attempt: int) -> float:
        return min(self.backoff_s * (2**attempt), self.backoff_max_s)


class Capture:
    """Reads ``source`` into ``handover`` on its own thread until the end, ``stop`` or ``max_frames``.

    Items handed over are ``(frame, arrival perf_counter)``. Reconnects and give-ups are appended
    to ``events`` (records for the JSONL) and counted in ``counters``.
    """

    def __init__(self, source: Source, handover, counters: Counters, stop: threading.Event, events: list,
                 reconnect: Reconnect | None = None, max_frames: int | None = None, pace_fps: float | None = None):
        self.source, self.handover, self.counters, self.stop, self.events = source, handover, counters, stop, events
        self.reconnect = reconnect or Reconnect()
        self.max_frames = max_frames
        self.pace_fps = pace_fps  # read at most this many frames per second (a file played as a camera would deliver it)
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)

    def start(self) -> "Capture":
        self._thread.start()
        return self

    def join(self) -> None:
        self._thread.join()

    def stop_and_join(self) -> None:
        """Stop reading and wait for the thread, emptying the hand-over so a blocked ``put`` can finish.

        Without the draining, a consumer that failed would leave capture blocked on a full queue
        forever (and a Ctrl-C with it)."""
        self.stop.set()
        while self._thread.is_alive():
            self.handover.discard(0.05)
            self._thread.join(0.05)

    def _read(self, reader: Reader | None):
        """The next frame (None: the stream ended); with a ``reader`` (a live source with a stall time), ``STALLED`` when
        the read has not returned within it and ``STOPPED`` when the run stopped while it waited."""
        if reader is None:
            return self.source.read()
        deadline = time.perf_counter() + self.reconnect.stall_s
        reader.request()
        while True:
            result = reader.wait(min(0.25, max(0.0, deadline - time.perf_counter())))
            if result is not None:
                if result[0] == "error":
                    raise result[1]
                return result[1]
            stopped = self.stop.is_set()
            if stopped or time.perf_counter() >= deadline:  # the read still pending: leave it to its thread
                reader.abandon()
                self.source.abandon()
                return STOPPED if stopped else STALLED

    def _run(self) -> None:
        source, counters = self.source, self.counters
        reader = Reader(source) if source.live and self.reconnect.stall_s > 0 else None
        try:
            failures = 0
            t_pace = time.perf_counter()
            while not self.stop.is_set():
                if self.pace_fps:
                    t_pace += 1.0 / self.pace_fps
                    if self.stop.wait(max(0.0, t_pace - time.perf_counter())):
                        break
                if self.max_frames is not None and counters.read >= self.max_frames:
                    break
                frame = self._read(reader)
                if frame is STOPPED:
                    break
                if frame is STALLED:  # then as a dropped stream: reopened with the same backoff
                    counters.stalls += 1
                    self.events.append({"event": "stalled", "source": source.describe(), "after_frame": counters.read - 1,
                                        "waited_s": self.reconnect.stall_s, "time": time.time()})
                    frame = None
                if frame is None:
                    if not source.live or failures >= self.reconnect.max_attempts:
                        if source.live:
                            self.events.append({"event": "gave_up", "after_reconnects": failures, "source": source.describe()})
                        break
                    t_lost = time.time()
                    delay = self.reconnect.delay(failures)
                    failures += 1
                    if self.stop.wait(delay):
                        break
                    if source.reopen():
                        counters.reconnects += 1
                        gap = {"event": "reconnect", "gap_s": round(time.time() - t_lost, 3), "attempt": failures, "after_frame": counters.read - 1}
                        counters.gaps.append(gap)
                        self.events.append(gap)
                    continue
                failures = 0
                counters.read += 1
                if self.handover.put((frame, time.perf_counter())):
                    counters.dropped += 1
        finally:
            if reader is not None:
                reader.close()
            self.handover.put(END)
