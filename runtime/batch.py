"""The batch engine: every live session's frame in one graph call per graph.

Each frame reads every weight byte once, whoever asks: one stream of 2B int4 reads
about 1.8 GB a frame, and eight streams stepped one by one read it eight times. The
engine owns one ``step.FrameStepper`` of N slots (moshi-server's batched TTS slots):
a session joins a free slot (or waits in line for one), leaves it when it ends, and
between those the engine drives the session's loop (``Session._frames``, a generator
of graph calls) on its own thread. A frame of the engine runs, in order:

1. one backbone call for every session that wants a step (its CFG pair's two rows);
2. one depformer call for those that sampled an action (a session waiting for text,
   or still inside the codebook delays, has none);
3. codec decoder calls until no session has a complete frame left to decode.

A session waiting for text parks (its slot idles, the others go on); ``feed``,
``close`` and ``cancel`` wake it. Each session keeps its own RNG and its own rows of
every graph (rows never mix in a graph), so a seed gives exactly its solo output
whoever shares the batch. Chunks go to the session's queue; ``Session.__iter__``
reads them in the caller's thread, so the API is the same as unbatched.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .step import BackboneCall, DecodeCall, DepformerCall, FrameStepper

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .session import AudioChunk, Session

_END = object()  # the lane ended: every chunk is out
# A cancel waits for the engine to reach the stream: one frame, unless a graph call hangs.
CANCEL_WAIT_SECONDS = 60.0


@dataclass(frozen=True)
class _Waiting:
    """The session wants text it does not have; ``wakes`` tells a stale mark from a fresh one."""

    wakes: int


class Lane:
    """One session's place in the engine: its slot, the graph call it waits on, what it made."""

    def __init__(self, engine: BatchEngine, session: Session) -> None:
        self.engine = engine
        # Weak: a session its caller dropped (never closed or cancelled) must not keep its slot.
        self._session = weakref.ref(session)
        self.slot: int | None = None
        self.pending: object | None = None  # the graph call the session waits on
        self.parked = False  # waiting for text: not stepped until woken
        self.ended = False
        self.wakes = 0  # feed/close/cancel calls so far
        self.advancing = False  # the engine is running this session's loop now
        self.over = threading.Event()  # set once the lane has ended and its state is back
        self._out: queue.SimpleQueue = queue.SimpleQueue()

    @property
    def session(self) -> Session | None:
        """The session, or None once nothing but the engine referred to it (it was collected)."""
        return self._session()

    def wake(self) -> None:
        self.engine.wake(self)

    def cancel(self, wait: bool = True) -> None:
        """End at the next frame; with ``wait``, wait for that (a frame at most), so the session's state
        and slot are free when ``Session.cancel`` returns. Not while the engine is running this session's
        loop (a progress callback may be waiting on the caller): the loop ends itself right after."""
        self.engine.cancel(self)
        if wait and not self.advancing:
            self.over.wait(CANCEL_WAIT_SECONDS)

    def put(self, item: object) -> None:
        self._out.put(item)

    def chunks(self) -> Iterator[AudioChunk]:
        """What the engine made for the session, up to its end or to its wait for more text."""
        while True:
            session = self.session
            if session is None or session.cancelled:  # what it made before the cancel is dropped, as solo
                self.over.wait(CANCEL_WAIT_SECONDS)  # and the iteration ends once its state is back
                return
            item = self._out.get()
            if item is _END:
                self._out.put(_END)  # iterating again ends at once
                return
            if isinstance(item, _Waiting):
                if item.wakes == self.wakes:  # nothing fed since it parked: wait for more input
                    return
                continue
            if isinstance(item, BaseException):
                self._out.put(_END)
                raise item
            yield item  # type: ignore[misc]


@dataclass
class EngineStats:
    """What the engine did so far: frames, time in them, and how full they were."""

    frames: int = 0
    frame_seconds: float = 0.0
    streams_stepped: int = 0  # summed over frames: / frames is the mean occupancy
    slots: int = 0
    busy: int = 0  # slots held now
    waiting: int = 0  # sessions waiting for a slot now


class BatchEngine:
    """Steps every seated session's frame together, on a thread of its own while any session lives."""

    def __init__(self, stepper: FrameStepper) -> None:
        self.stepper = stepper
        self._cond = threading.Condition()
        self._line: deque[Lane] = deque()  # admitted, waiting for a slot
        self._slots: list[Lane | None] = [None] * stepper.streams
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stats = EngineStats(slots=stepper.streams)

    # --- the sessions' side ---------------------------------------------------------------------

    def admit(self, session: Session) -> None:
        """Give ``session`` a lane; it is stepped once it has a slot and input."""
        lane = Lane(self, session)
        session._lane = lane
        with self._cond:
            if self._closed:
                raise RuntimeError("this runtime was closed")
            self._line.append(lane)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dia2-batch", daemon=True)
                self._thread.start()
            self._cond.notify()

    def wake(self, lane: Lane) -> None:
        with self._cond:
            lane.wakes += 1
            lane.parked = False
            self._cond.notify()

    def cancel(self, lane: Lane) -> None:
        """A session waiting for a slot ends here; a seated one is ended by the engine's next frame
        (also when its session was collected unfinished: ``Session.__del__`` cancels its lane)."""
        with self._cond:
            if lane in self._line:
                self._line.remove(lane)
                seated = False
            else:
                seated = True
                lane.wakes += 1
                lane.parked = False
                self._cond.notify()
        if not seated:
            session = lane.session
            if session is not None:
                with session._lock:
                    session._end()  # its loop never ran: this gives its state back
            self._end(lane, None)


    def stats(self) -> EngineStats:
        with self._cond:
            busy = sum(lane is not None for lane in self._slots)
            return EngineStats(**{**self._stats.__dict__, "busy": busy, "waiting": len(self._line)})

    def close(self) -> None:
        """Stop the thread after its frame; every lane still open fails."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # --- the engine's thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                lanes = self._next_lanes()
                if lanes is None:
                    return
            started = time.perf_counter()
            self._frame(lanes)
            with self._cond:
                self._stats.frames += 1
                self._stats.streams_stepped += len(lanes)
                self._stats.frame_seconds += time.perf_counter() - started

    def _next_lanes(self) -> list[Lane] | None:
        """(Holding the lock) seat waiting sessions, then the lanes to step; None: the thread ends."""
        while True:
            if self._closed:
                self._fail_all(RuntimeError("this runtime was closed"))
                self._thread = None
                return None
            self._seat()
            lanes = [lane for lane in self._slots if lane is not None and not lane.parked]
            if lanes:
                return lanes
            if not self._line and all(lane is None for lane in self._slots):
                self._thread = None  # admit() starts another
                return None
            self._cond.wait()

    def _seat(self) -> None:
        if self._line and all(lane is None for lane in self._slots):
            self.stepper.restart()  # a new batch: every slot scrubbed, the cache back to its first rows
        for slot, lane in enumerate(self._slots):
            while lane is None and self._line:
                new = self._line.popleft()
                session = new.session
                if session is None:  # dropped while it waited
                    self._end(new, None)
                    continue
                self.stepper.scrub(slot)  # nothing of the slot's last stream reaches this one
                new.slot, session.stepper, session.slot = slot, self.stepper, slot
                self._slots[slot] = lane = new

    def _frame(self, lanes: list[Lane]) -> None:
        for lane in lanes:
            if lane.pending is None:
                self._advance(lane, None)
        self._phase(lanes, BackboneCall, once=True)
        self._phase(lanes, DepformerCall)
        self._phase(lanes, DecodeCall)

    def _phase(self, lanes: list[Lane], kind: type, once: bool = False) -> None:
        """Run the graph calls of ``kind`` the lanes wait on as one call, and move each lane on."""
        from .session import run_calls  # session imports this module's types for checking only

        while True:
            group = {lane.slot: lane for lane in lanes
                     if lane.slot is not None and not lane.ended and isinstance(lane.pending, kind)}
            if not group:
                return
            calls = {slot: lane.pending for slot, lane in group.items()}
            for lane in group.values():
                lane.pending = None
            try:
                results = run_calls(self.stepper, calls)  # type: ignore[arg-type]
            except Exception as exc:  # the batch's call failed: every stream in it fails with it
                for lane in group.values():
                    self._end(lane, exc)
                return
            for slot, lane in group.items():
                self._advance(lane, results[slot])
            if once:
                return

    def _advance(self, lane: Lane, reply: object) -> None:
        """Run the lane's loop to its next graph call, putting out its chunks; park or end it there."""
        from .session import _WAIT, CALLS

        session = lane.session
        if session is None:  # collected unfinished: its state went back with it
            self._end(lane, None)
            return
        with self._cond:
            wakes = lane.wakes
            lane.advancing = True
        try:
            with session._lock:
                if session.cancelled:
                    session._end()
                    self._end(lane, None)
                    return
                item = session.send(reply)
                while item is not None and item is not _WAIT and not isinstance(item, CALLS):
                    lane.put(item)  # a chunk
                    item = session.send(None)
        except Exception as exc:
            self._end(lane, exc)
            return
        finally:
            lane.advancing = False
        if item is None:
            self._end(lane, None)
        elif item is _WAIT:
            with self._cond:
                if lane.wakes == wakes:  # not fed while it ran: it waits for input
                    lane.parked = True
                    lane.put(_Waiting(wakes))
        else:
            lane.pending = item

    def _end(self, lane: Lane, error: BaseException | None) -> None:
        """The lane is over (done, cancelled or failed): its slot freed, its reader told."""
        if lane.ended:
            return
        lane.ended = True
        session = lane.session
        if error is not None and session is not None:
            session._end()  # the loop's `finally` gives its state back
        with self._cond:  # the slot is free before the reader hears of the end
            if lane.slot is not None and self._slots[lane.slot] is lane:
                self._slots[lane.slot] = None
            if session is not None:
                session.stepper = None
            self._cond.notify()
        if error is not None:
            lane.put(error)
        lane.put(_END)
        lane.over.set()

    def _fail_all(self, error: Exception) -> None:
        """(Holding the lock) end every lane, seated or waiting."""
        for lane in [*self._line, *(lane for lane in self._slots if lane is not None)]:
            lane.ended = True
            lane.put(error)
            lane.put(_END)
            lane.over.set()
        self._line.clear()
        self._slots = [None] * len(self._slots)
