"""Torch-free streaming Mimi codec over ONNX Runtime.

Runs the graphs written by dia2_trt.export.codec, described by the I/O spec those exporters return:
the decoder step one frame at a time (state fed back explicitly), the encoder on a whole clip.
Only `_open_session` and `_Binding` touch ONNX Runtime, so another backend can replace them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort


@dataclass
class CodecState:
    """The decoder's streaming state, keyed by the graph's state input names (zeros = start of a stream)."""

    arrays: dict[str, np.ndarray]

    @classmethod
    def zeros(cls, io_spec: dict) -> "CodecState":
        specs = {io["name"]: io for io in io_spec["inputs"]}
        return cls({pair["input"]: _zeros(specs[pair["input"]]) for pair in io_spec["state"]})

    def reset(self) -> None:
        for array in self.arrays.values():
            array.fill(0)


class StreamingCodec:
    """decode_frame(codes [Q]) -> pcm [frame_samples] float32, continuing the stream; encode(pcm) -> codes [Q, T].

    State lives in two preallocated buffer sets that the graph reads from and writes to alternately,
    so a frame costs no allocation (8 MB of K/V for the real Mimi) and no copy of the state."""

    def __init__(self, session_or_path, io_spec: dict, *, encoder=None, encoder_spec: dict | None = None):
        _check_spec(io_spec)
        self.io_spec = io_spec
        self.num_quantizers = int(io_spec["num_quantizers"])
        self.codebook_size = int(io_spec["codebook_size"])
        self._session = _open_session(session_or_path)
        state_inputs = {pair["input"] for pair in io_spec["state"]}
        state_outputs = {pair["output"] for pair in io_spec["state"]}
        (codes_io,) = [io for io in io_spec["inputs"] if io["name"] not in state_inputs]
        (pcm_io,) = [io for io in io_spec["outputs"] if io["name"] not in state_outputs]
        self._codes = _zeros(codes_io)
        self._pcm = _zeros(pcm_io)
        self.state = CodecState.zeros(io_spec)
        self._spare = CodecState.zeros(io_spec)
        self._bindings = [self._bind(codes_io["name"], pcm_io["name"], a, b) for a, b in
                          ((self.state, self._spare), (self._spare, self.state))]
        self._turn = 0
        self._encoder = _open_session(encoder) if encoder is not None else None
        self._encoder_spec = encoder_spec

    def _bind(self, codes_name: str, pcm_name: str, read: CodecState, write: CodecState) -> "_Binding":
        inputs = {codes_name: self._codes, **read.arrays}
        outputs = {pcm_name: self._pcm}
        outputs.update({pair["output"]: write.arrays[pair["input"]] for pair in self.io_spec["state"]})
        return _Binding(self._session, inputs, outputs)

    @property
    def frame_samples(self) -> int:
        return int(self._pcm.size)

    def reset(self) -> None:
        """Start a new stream."""
        self.state.reset()

    def decode_frame(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.shape != (self.num_quantizers,) or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes must be {self.num_quantizers} integers, got {codes.dtype} {codes.shape}")
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{codes.min()}, {codes.max()}]")
        self._codes.reshape(-1)[:] = codes
        self._bindings[self._turn].run()
        self._turn ^= 1
        self.state, self._spare = self._spare, self.state
        return self._pcm.reshape(-1).copy()

    def encode(self, pcm: np.ndarray) -> np.ndarray:
        """Mono pcm (any shape with one non-unit axis, 24 kHz) -> codes [Q, frames] int64."""
        if self._encoder is None:
            raise ValueError("no encoder graph: pass encoder= (and encoder_spec=) to StreamingCodec")
        pcm = np.asarray(pcm, dtype=np.float32).reshape(1, 1, -1)
        if pcm.shape[2] == 0:
            raise ValueError("cannot encode empty pcm")
        names = _io_names(self._encoder_spec) if self._encoder_spec else ("pcm", "codes")
        return _run(self._encoder, names[1], {names[0]: pcm})[0]


def _check_spec(io_spec: dict) -> None:
    missing = {"inputs", "outputs", "state", "num_quantizers", "codebook_size"} - set(io_spec)
    if missing:
        raise ValueError(f"codec io_spec lacks {sorted(missing)}")


def _io_names(io_spec: dict) -> tuple[str, str]:
    return io_spec["inputs"][0]["name"], io_spec["outputs"][0]["name"]


def _zeros(io: dict) -> np.ndarray:
    if any(not isinstance(dim, int) for dim in io["shape"]):
        raise ValueError(f"{io['name']}: streaming I/O must have a static shape, got {io['shape']}")
    return np.zeros(io["shape"], dtype=np.dtype(io["dtype"]))


# --- ONNX Runtime specifics -------------------------------------------------------------------


def _open_session(session_or_path) -> ort.InferenceSession:
    if isinstance(session_or_path, (str, Path)):
        return ort.InferenceSession(str(session_or_path), providers=["CPUExecutionProvider"])
    return session_or_path


def _run(session: ort.InferenceSession, output: str, feeds: dict) -> np.ndarray:
    return session.run([output], feeds)[0]


class _Binding:
    """A fixed set of host arrays bound as one run's inputs and outputs (outputs written in place)."""

    def __init__(self, session: ort.InferenceSession, inputs: dict, outputs: dict):
        self._session = session
        self._binding = session.io_binding()
        # the OrtValues wrap the arrays' memory; keep them alive as long as the binding
        self._values = []
        for name, array in inputs.items():
            self._values.append(ort.OrtValue.ortvalue_from_numpy(array))
            self._binding.bind_ortvalue_input(name, self._values[-1])
        for name, array in outputs.items():
            self._values.append(ort.OrtValue.ortvalue_from_numpy(array))
            self._binding.bind_ortvalue_output(name, self._values[-1])

    def run(self) -> None:
        self._session.run_with_iobinding(self._binding)
