"""The Triton Python-backend model: Dia2 streamed as decoupled responses.

``dia2-rt triton-repo`` writes a ``model.py`` into the repository that only
re-exports :class:`TritonPythonModel` from here, so the code Triton runs is the
installed runtime's, never a copy that could drift from it. This module imports
only the runtime (no torch); ``triton_python_backend_utils`` exists only inside
Triton's Python-backend stub, so it is imported when the model initializes.

Each request gets a thread of its own (``--max-streams`` at most; up to
``--max-queue`` more wait) and a session on the one runtime this instance loads,
so concurrent streams share the runtime's weights and, once the runtime batches
sessions, one batch. A response goes out for every audio chunk (``pcm`` INT16,
``words`` JSON), then an empty response with the final flag. A bad request gets one
error response with the final flag; a cancelled stream stops at its next frame.
"""

from __future__ import annotations

import json
import logging
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..audio import pcm16
from .request import BadRequest, plan
from .settings import Settings

log = logging.getLogger("dia2_trt.triton")
OUTCOMES = ("done", "cancelled", "bad_request", "busy", "internal")


class _Cancelled(Exception):
    """Raised from the per-frame hook once Triton says the client cancelled."""


class TritonPythonModel:
    """What Triton's Python backend calls: ``initialize``, ``execute`` per request batch, ``finalize``."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb  # pyright: ignore[reportMissingImports]

        from .. import Dia2Runtime, TruncationWarning
        from ..serve.workers import VoicedSessions

        self.pb = pb
        config = json.loads(args["model_config"])
        if not pb.using_decoupled_model_transaction_policy(config):
            raise RuntimeError("the dia2 model streams: its config needs model_transaction_policy { decoupled: true }")
        self.settings = Settings.from_config(config, Path(args["model_repository"]) / args["model_version"])
        warnings.simplefilter("ignore", TruncationWarning)  # a request's script is checked to fit beforehand
        self.runtime = Dia2Runtime.load(self.settings.artifacts_dir, backend=self.settings.backend,
                                        threads=self.settings.thread_count, verify=self.settings.verify)
        self.voices = self.settings.voice_registry(self.runtime)
        self.open_session = VoicedSessions()
        self.pool = ThreadPoolExecutor(max_workers=self.settings.max_streams, thread_name_prefix="dia2-stream")
        self.admitted, self.lock = 0, threading.Lock()
        self.ipc = threading.Lock()  # one call to the server at a time, see _Sender
        self.closing = threading.Event()  # set by finalize: running streams stop at their next frame
        self.metrics = _Metrics(pb, args["model_name"], args["model_instance_name"], self.ipc)

    def execute(self, requests) -> None:
        for request in requests:
            sender = _Sender(request.get_response_sender(), self.ipc)
            text = _input(self.pb, request, "text")
            raw = _input(self.pb, request, "params")
            with self.lock:
                full = self.admitted >= self.settings.max_streams + self.settings.max_queue
                if not full:
                    self.admitted += 1
            if full:
                message = (f"busy: {self.settings.max_streams} streams running and {self.settings.max_queue} "
                           f"waiting; retry later")
                self._fail(sender, "busy", message, self.pb.TritonError.UNAVAILABLE)
                continue
            self.metrics.active(+1)  # from admission: a waiting stream holds its place too
            self.pool.submit(self._stream, sender, text, raw)
        return None  # decoupled: every response goes through the senders

    def finalize(self) -> None:
        """Triton unloads the model once in-flight requests are done or its exit timeout passed: stop
        what still runs at its next frame rather than generating for nobody."""
        self.closing.set()
        self.pool.shutdown(wait=True, cancel_futures=True)

    # --- one request, on its own thread ---------------------------------------

    def _stream(self, sender, text, raw) -> None:
        try:
            self._generate(sender, text, raw)
        except BadRequest as exc:
            self._fail(sender, "bad_request", str(exc), self.pb.TritonError.INVALID_ARG)
        except _Cancelled:
            self._fail(sender, "cancelled", "the request was cancelled", self.pb.TritonError.CANCELLED)
        except Exception as exc:  # one failing request must not take the model down
            log.exception("generation failed")
            self._fail(sender, "internal", f"generation failed: {type(exc).__name__}", self.pb.TritonError.INTERNAL)
        finally:
            self.metrics.active(-1)
            with self.lock:
                self.admitted -= 1

    def _generate(self, sender, text, raw) -> None:
        checked = plan(text, raw, self.voices, self.runtime, self.settings.max_input_chars)
        if sender.is_cancelled():  # while it waited for a thread
            raise _Cancelled

        def each_frame(_progress) -> None:  # one IPC to the server per frame: microseconds against a frame's ms
            if self.closing.is_set() or sender.is_cancelled():
                raise _Cancelled

        session = self.open_session(self.runtime, checked.params, checked.voices, each_frame, checked.chunking)
        try:
            session.feed(checked.text)
            session.close()
            for chunk in session:
                sender.send(self._response(chunk))
                self.metrics.audio(chunk.pcm.size / chunk.sample_rate)
        finally:
            if not session.done:
                session.cancel()  # hands its state back to the runtime now, not when collected
        sender.send(flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        self.metrics.finished("done")

    def _response(self, chunk):
        pcm = np.frombuffer(pcm16(chunk.pcm), dtype="<i2")  # dia2-rt speak --out -'s rounding, exactly
        words = json.dumps([[word, seconds] for word, seconds in chunk.words]).encode()
        return self.pb.InferenceResponse(output_tensors=[
            self.pb.Tensor("pcm", pcm.astype(np.int16)),
            self.pb.Tensor("words", np.array([words], dtype=np.object_))])

    def _fail(self, sender, outcome: str, message: str, code) -> None:
        self.metrics.finished(outcome)
        try:
            sender.send(self.pb.InferenceResponse(error=self.pb.TritonError(message, code)),
                        flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as exc:  # the client went away first: nobody is listening
            log.info("could not send the error response (%s): %s", message, exc)


class _Sender:
    """A request's response sender whose calls take turns with every other stream's and with the
    metric updates (all are messages from the stub to the server). With three streams sending and
    updating metrics at once from their threads, tritonserver 2.51 died (SIGSEGV in
    libtriton_python.so) within a second; with every such call under one lock, six streams ran
    clean, run after run. A call is microseconds against a frame's milliseconds."""

    def __init__(self, sender, lock: threading.Lock) -> None:
        self._sender, self._lock = sender, lock

    def send(self, *args, **kwargs) -> None:
        with self._lock:
            self._sender.send(*args, **kwargs)

    def is_cancelled(self) -> bool:
        with self._lock:
            return self._sender.is_cancelled()


def _input(pb, request, name: str) -> bytes | None:
    """The first element of a BYTES input, or None when the request left it out."""
    tensor = pb.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size == 0:
        return b""
    value = values[0]  # the inputs are declared [1]; Triton has checked the shape
    return value if isinstance(value, bytes) else str(value).encode()


class _Metrics:
    """Triton custom metrics (served on its metrics endpoint next to its own nv_* series). Each update
    is a message to the server, so it takes its turn on the same lock as the senders."""

    def __init__(self, pb, model: str, instance: str, lock: threading.Lock) -> None:
        labels = {"model": model, "instance": instance}
        streams = pb.MetricFamily(name="dia2_streams_total", description="Streams ended, by outcome",
                                  kind=pb.MetricFamily.COUNTER)
        self._outcomes = {o: streams.Metric(labels={**labels, "outcome": o}) for o in OUTCOMES}
        active = pb.MetricFamily(name="dia2_streams_active", kind=pb.MetricFamily.GAUGE,
                                 description="Streams admitted: generating or waiting for a thread")
        audio = pb.MetricFamily(name="dia2_audio_seconds_total", description="Seconds of audio streamed",
                                kind=pb.MetricFamily.COUNTER)
        self._active, self._audio = active.Metric(labels=labels), audio.Metric(labels=labels)
        self._families = (streams, active, audio)  # a collected family takes its metrics off the endpoint
        self._lock = lock

    def finished(self, outcome: str) -> None:
        with self._lock:
            self._outcomes[outcome].increment(1)

    def active(self, delta: int) -> None:
        with self._lock:
            self._active.increment(delta)

    def audio(self, seconds: float) -> None:
        with self._lock:
            self._audio.increment(seconds)
