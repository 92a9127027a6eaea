"""A streaming gRPC client for the Triton model (``tritonclient[grpc]``, imported when used).

    with TritonSpeech("127.0.0.1:8001") as client:
        for pcm, words in client.stream("[S1] Hello there.", {"seed": 1}):
            ...  # pcm: int16 samples of one chunk; words: [[word, seconds], ...]

One gRPC stream per client object, one request on it at a time; open a client per
concurrent stream (they are cheap). Error responses raise :class:`TritonRequestError`
with Triton's one-line message.
"""

from __future__ import annotations

import json
import queue
import uuid
from collections.abc import Iterator

import numpy as np

_END = object()


class TritonRequestError(RuntimeError):
    """The model's error response (bad input, busy, cancelled, internal)."""


class TritonSpeech:
    def __init__(self, url: str, model: str = "dia2", timeout: float = 120.0) -> None:
        import tritonclient.grpc as grpcclient  # pyright: ignore[reportMissingImports]

        self._grpc = grpcclient
        self.model, self.timeout = model, timeout
        self._client = grpcclient.InferenceServerClient(url)
        self._events: queue.Queue = queue.Queue()
        self._client.start_stream(callback=lambda result, error: self._events.put((result, error)))

    def stream(self, text: str, params: dict | str | bytes | None = None) -> Iterator[tuple[np.ndarray, list]]:
        """Send one request and yield its chunks as they arrive, until the final response.
        ``params``: the extras as a dict, or their JSON text as it is."""
        inputs = [self._bytes("text", text.encode())]
        if params is not None:
            raw = json.dumps(params) if isinstance(params, dict) else params
            inputs.append(self._bytes("params", raw.encode() if isinstance(raw, str) else raw))
        self._client.async_stream_infer(self.model, inputs, request_id=uuid.uuid4().hex,
                                        outputs=[self._grpc.InferRequestedOutput(n) for n in ("pcm", "words")],
                                        enable_empty_final_response=True)
        while True:
            result, error = self._events.get(timeout=self.timeout)
            if error is not None:
                raise TritonRequestError(error.message() if hasattr(error, "message") else str(error))
            response = result.get_response()
            if response.outputs:
                words = result.as_numpy("words")
                yield result.as_numpy("pcm"), json.loads(words[0]) if words is not None else []
            if response.parameters["triton_final_response"].bool_param:
                return

    def cancel(self) -> None:
        """Cancel the request in flight (the model stops at its next frame) and close the stream."""
        self._client.stop_stream(cancel_requests=True)

    def close(self) -> None:
        self._client.stop_stream()
        self._client.close()

    def __enter__(self) -> TritonSpeech:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _bytes(self, name: str, value: bytes):
        tensor = self._grpc.InferInput(name, [1], "BYTES")
        tensor.set_data_from_numpy(np.array([value], dtype=np.object_))
        return tensor
