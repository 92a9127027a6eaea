"""Generations on worker threads, and the bounded pool that admits them.

A :class:`Job` is one utterance: the event loop feeds it text and reads its
events (audio chunks, then one ``Finished`` or ``Failed``); a worker thread runs
the runtime's incremental session for it. The pool has N worker slots and a
queue of at most Q waiting jobs; past that, ``submit`` raises :class:`Busy`
(the routes answer 503 with Retry-After).

Cancellation reaches a running generation at its next frame: the session's
per-frame progress callback raises, so a client that goes away frees its worker
within one frame. The same check enforces the per-request time limit, counted
from admission (queueing included).

A job holds a queue place from admission but takes a worker only once it has input: a
WebSocket that sends its start message and then nothing (or only empty messages) waits
``Limits.idle_seconds`` without a worker, then fails.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .. import Chunking, Dia2Runtime, GenerationParams, ScriptError, SpeakResult
from ..audio import pcm16
from ..prefix import WarmState
from .voices import RegisteredVoice

log = logging.getLogger("dia2_trt.serve")


class Busy(Exception):
    """No worker and no queue place: come back after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Stop(Exception):
    """Raised inside the generation to end it at this frame."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class Chunk:
    audio: bytes  # s16le samples
    samples: int
    words: list[tuple[str, float]]  # (word, seconds from the audio start) starting in this chunk


@dataclass
class Finished:
    result: SpeakResult
    queued_seconds: float
    first_audio_seconds: float | None  # from the first text the server had to the first audio out


@dataclass
class Failed:
    kind: str  # "client" (bad input), "cancelled", "timeout", "idle" (no text in time) or "internal"
    message: str


@dataclass(frozen=True)
class Limits:
    seconds: float = 120.0  # per request, from admission to the last chunk
    max_chars: int = 4096  # of script text per request
    idle_seconds: float = 10.0  # a stream's wait for its start message, then for its first text


_CLOSE, _CANCEL = object(), object()


@dataclass
class Job:
    """One utterance in flight; the public methods are for the event loop's side."""

    params: GenerationParams
    voices: tuple[RegisteredVoice, RegisteredVoice]
    limits: Limits = field(default_factory=Limits)
    chunking: Chunking = field(default_factory=Chunking)

    def __post_init__(self) -> None:
        self._events: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()  # read by the worker thread
        self.cancel_requested = asyncio.Event()  # awaited by the pool while the job is queued
        self.has_input = asyncio.Event()  # text or the end arrived: the job may take a worker
        self.input_at: float | None = None
        self._chars = 0
        self.arrived = time.monotonic()
        self.deadline = self.arrived + self.limits.seconds
        self.started: float | None = None  # when a worker took it
        self.first_text: float | None = None
        self.first_audio: float | None = None
        self._session = None  # the worker's session once opened: cancel() stops it through Session.cancel()

    # --- event-loop side --------------------------------------------------------

    def feed(self, text: str) -> None:
        """Queue more script text; over the length limit is a ValueError (nothing queued)."""
        if self._chars + len(text) > self.limits.max_chars:
            raise ValueError(f"the script is longer than this server's limit of {self.limits.max_chars} characters")
        if not text:
            return  # nothing to wake the worker for
        self._chars += len(text)
        if self.first_text is None and text.strip():
            self.first_text = time.monotonic()
        self._inbox.put(text)
        self._input_arrived()

    def close(self) -> None:
        self._inbox.put(_CLOSE)
        self._input_arrived()

    def _input_arrived(self) -> None:
        if not self.has_input.is_set():
            self.input_at = time.monotonic()
            self.has_input.set()

    def cancel(self) -> None:
        """Stop at the next frame (or before starting); harmless once finished."""
        self._cancelled.set()
        self.cancel_requested.set()
        self._inbox.put(_CANCEL)  # wakes a worker waiting for text
        session = self._session
        if session is not None:
            session.cancel(wait=False)  # from the event loop: the session ends itself at its next frame

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def fail(self, kind: str, message: str) -> None:
        """End the job without running it (the pool's verdict while it was queued)."""
        self._emit(Failed(kind, message))

    async def next_event(self) -> Chunk | Finished | Failed:
        return await self._events.get()

    # --- worker side -------------------------------------------------------------

    def run(self, runtime: Dia2Runtime, open_session: Callable) -> None:
        self.started = time.monotonic()
        try:
            self._emit(self._generate(runtime, open_session))
        except _Stop as stop:
            self._emit(Failed(stop.kind, str(stop)))
        except ScriptError as exc:
            self._emit(Failed("client", str(exc)))
        except Exception as exc:  # one failing request must not take the server down
            log.exception("generation failed")
            self._emit(Failed("internal", f"generation failed: {type(exc).__name__}"))

    def _generate(self, runtime: Dia2Runtime, open_session: Callable) -> Finished:
        self._check(None)
        session = open_session(runtime, self.params, self.voices, self._check_deadline, self.chunking)
        self._session = session
        if self._cancelled.is_set():  # cancelled while the session opened
            session.cancel()
        try:
            while not session.done:
                self._take_input(session)
                for chunk in session:  # stops when the session needs words, or was cancelled
                    self._audio(chunk)
                if session.cancelled:
                    raise _Stop("cancelled", "the request was cancelled")
        finally:
            if not session.done:
                session.cancel()  # hands its state back to the runtime now, not when collected
        first = None if self.first_audio is None else self.first_audio - (self.first_text or self.arrived)
        assert self.started is not None  # run() sets it before generating
        return Finished(session.result, self.started - (self.input_at or self.arrived), first)

    def _audio(self, chunk) -> None:
        if chunk.pcm.size and self.first_audio is None:
            self.first_audio = time.monotonic()
        self._emit(Chunk(pcm16(chunk.pcm), int(chunk.pcm.size), list(chunk.words)))

    def _take_input(self, session) -> None:
        """Block until text arrives, then hand the session everything queued so far."""
        item = self._get(timeout=max(self.deadline - time.monotonic(), 0.0))
        while True:
            self._check(None)  # a client that keeps sending never outruns the time limit
            if item is _CANCEL:
                raise _Stop("cancelled", "the request was cancelled")
            if item is _CLOSE:
                session.close()
            else:
                session.feed(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _get(self, timeout: float):
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            raise _Stop("timeout", f"no end of input within this server's {self.limits.seconds:g} s "
                                   f"request limit") from None

    def _check(self, _progress) -> None:
        """Between inputs: stop here if the client went away or time is up."""
        if self._cancelled.is_set():
            raise _Stop("cancelled", "the request was cancelled")
        self._check_deadline(_progress)

    def _check_deadline(self, _progress) -> None:
        """The per-frame hook: stop here once time is up (a cancel reaches the session itself)."""
        if time.monotonic() > self.deadline:
            raise _Stop("timeout", f"the request ran past this server's {self.limits.seconds:g} s limit")

    def _emit(self, event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self._cancelled.set()


class VoicedSessions:
    """Opens sessions in their voices: each voice pair is warmed up once, then every session
    speaking in it starts from that warm state (the runtime's ``warm``), not from a fresh warm-up."""

    def __init__(self) -> None:
        self._warm: dict[tuple[str, str], WarmState] = {}
        self._lock = threading.Lock()  # one warm-up per pair, even when two requests want it at once

    def __call__(self, runtime: Dia2Runtime, params: GenerationParams,
                 voices: tuple[RegisteredVoice, RegisteredVoice], progress, chunking: Chunking | None = None):
        first, second = voices
        if not (first.conditioned or second.conditioned):
            return runtime.open_session(params, progress=progress, chunking=chunking)
        with self._lock:
            warm = self._warm.get((first.name, second.name))
            if warm is None:
                prefix = runtime.prefix(first.prefix, second.prefix)
                assert prefix is not None  # a conditioned voice makes a prefix (or a VoiceError)
                warm = runtime.warm(prefix)
                self._warm[(first.name, second.name)] = warm
        return runtime.open_session(params, progress=progress, prefix=warm, chunking=chunking)


class Pool:
    """N worker slots (each with the runtime it runs on), at most ``max_queue`` jobs waiting for one."""

    def __init__(self, slots: Sequence[Dia2Runtime], max_queue: int, open_session: Callable,
                 on_change: Callable[[Pool], None] | None = None) -> None:
        self.workers = len(slots)
        self.max_queue = max_queue
        self._slots = list(slots)
        self._free: asyncio.Queue | None = None
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="dia2-worker")
        self._open_session = open_session
        self._on_change = on_change or (lambda pool: None)
        self._tasks: dict[asyncio.Task, Job] = {}
        self._closing = False
        self._job_seconds: float | None = None  # running mean of a job's worker time, for Retry-After
        self.admitted = 0  # jobs queued or running
        self.busy = 0

    def submit(self, job: Job) -> None:
        """Admit ``job`` (it starts when a slot frees) or raise Busy."""
        if self._closing:
            raise Busy("the server is shutting down", self.retry_after())
        if self.admitted >= self.workers + self.max_queue:
            raise Busy(f"all {self.workers} workers are busy and {self.waiting} requests are queued",
                       self.retry_after())
        if self._free is None:  # made here, on the serving event loop
            self._free = asyncio.Queue()
            for slot in self._slots:
                self._free.put_nowait(slot)
        self.admitted += 1
        self._on_change(self)
        task = asyncio.get_running_loop().create_task(self._run(job))
        self._tasks[task] = job
        task.add_done_callback(self._tasks.pop)

    @property
    def _free_slots(self) -> asyncio.Queue:
        assert self._free is not None  # submit makes it before any job that could use it runs
        return self._free

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def waiting(self) -> int:
        """Admitted jobs beyond the worker count: the queue depth."""
        return max(0, self.admitted - self.workers)

    def retry_after(self) -> int:
        """Seconds until a queue place is likely free: the queue ahead, drained by N workers."""
        return max(1, math.ceil((self._job_seconds or 1.0) * (self.waiting + 1) / self.workers))

    async def _run(self, job: Job) -> None:
        try:
            await self._work(job)
        finally:
            self.admitted -= 1
            self._on_change(self)

    async def _work(self, job: Job) -> None:
        if not await self._wait_for_input(job):
            return
        slot = await self._wait_for_slot(job)
        if slot is None:
            return
        self.busy += 1
        self._on_change(self)
        began = time.monotonic()
        try:
            # Never cancelled from outside (see shutdown): the slot is freed only when its thread is done.
            await asyncio.get_running_loop().run_in_executor(self._executor, job.run, slot, self._open_session)
        finally:
            seconds = time.monotonic() - began
            self._job_seconds = seconds if self._job_seconds is None else 0.8 * self._job_seconds + 0.2 * seconds
            self.busy -= 1
            self._free_slots.put_nowait(slot)

    async def _wait_for_input(self, job: Job) -> bool:
        """Whether the job has text to speak; an idle one fails without ever taking a worker."""
        if job.has_input.is_set():
            return True
        limit = min(job.limits.idle_seconds, job.deadline - time.monotonic())
        arrived = asyncio.ensure_future(job.has_input.wait())
        stop = asyncio.ensure_future(job.cancel_requested.wait())
        try:
            await asyncio.wait({arrived, stop}, timeout=max(limit, 0.0), return_when=asyncio.FIRST_COMPLETED)
        finally:
            arrived.cancel()
            stop.cancel()
        if job.cancelled:
            job.fail("cancelled", "the request was cancelled")
        elif not job.has_input.is_set():
            job.fail("idle", f"no text within this server's {job.limits.idle_seconds:g} s idle limit")
        else:
            return True
        return False

    async def _wait_for_slot(self, job: Job):
        """A free slot, or None when the job was cancelled or ran out of time while queued."""
        getter = asyncio.ensure_future(self._free_slots.get())
        stop = asyncio.ensure_future(job.cancel_requested.wait())
        try:
            await asyncio.wait({getter, stop}, timeout=max(job.deadline - time.monotonic(), 0.0),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not getter.done():
                getter.cancel()
        slot = getter.result() if getter.done() and not getter.cancelled() else None
        if slot is not None and not job.cancelled:
            return slot
        if slot is not None:
            self._free_slots.put_nowait(slot)
        if job.cancelled:
            job.fail("cancelled", "the request was cancelled")
        else:
            job.fail("timeout", f"no worker became free within this server's {job.limits.seconds:g} s "
                                 f"request limit")
        return None

    async def shutdown(self, grace: float) -> None:
        """Refuse new jobs, give running ones ``grace`` seconds, cancel the rest at their next frame."""
        self._closing = True
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        for job in list(self._tasks.values()):
            job.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        self._executor.shutdown(wait=True)
