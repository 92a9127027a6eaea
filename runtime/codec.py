"""Streaming Mimi codec over backend bindings: decode one frame at a time, encode a whole clip.

The decoder step graph (written by dia2_trt.export.codec) carries its streaming
state as state pairs, which the binding double-buffers; this module only feeds
codes and reads PCM, so every backend runs the codec the same way it runs the
step graphs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .artifacts import GraphSpec, StatePair, TensorSpec
from .backends import Binding, OrtGraph


class CodecStream:
    """decode_frame(codes [Q]) -> pcm [frame_samples] float32, continuing the stream; encode(pcm) -> codes [Q, T].

    One per session: the decoder binding holds that session's codec state.
    """

    def __init__(self, decoder: Binding, codebook_size: int, encoder: Binding | None = None) -> None:
        spec = decoder.spec
        state_inputs = {i for i, _ in spec.state}
        state_outputs = {o for _, o in spec.state}
        codes = [t for t in spec.inputs if t.name not in state_inputs]
        pcm = [t for t in spec.outputs if t.name not in state_outputs]
        if len(codes) != 1 or len(pcm) != 1:
            raise ValueError(f"{spec.name}: a codec decoder has one codes input and one pcm output besides "
                             f"its state, got {[t.name for t in codes]} -> {[t.name for t in pcm]}")
        self._decoder, self._encoder = decoder, encoder
        self._codes, self._pcm = codes[0], pcm[0]
        self.num_quantizers = int(np.prod(self._codes.shape))
        self.frame_samples = int(np.prod(self._pcm.shape))
        self.codebook_size = int(codebook_size)

    def reset(self) -> None:
        """Start a new stream."""
        self._decoder.reset_state()

    def decode_frame(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.shape != (self.num_quantizers,) or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes must be {self.num_quantizers} integers, got {codes.dtype} {codes.shape}")
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{codes.min()}, {codes.max()}]")
        out = self._decoder.run({self._codes.name: codes.reshape(self._codes.shape)})
        return out[self._pcm.name].reshape(-1).copy()

    def encode(self, pcm: np.ndarray) -> np.ndarray:
        if self._encoder is None:
            raise ValueError("no encoder graph in these artifacts")
        return encode(self._encoder, pcm)


def encode(encoder: Binding, pcm: np.ndarray) -> np.ndarray:
    """Mono pcm (any shape with one non-unit axis, at the codec's sample rate) -> codes [Q, frames] int64."""
    pcm = np.asarray(pcm, dtype=np.float32).reshape(1, 1, -1)
    if pcm.shape[2] == 0:
        raise ValueError("cannot encode empty pcm")
    spec = encoder.spec
    return encoder.run({spec.inputs[0].name: pcm})[spec.outputs[0].name][0]


class StreamingCodec(CodecStream):
    """A CodecStream on ONNX Runtime, straight from exported files (tools and tests; the runtime
    loads the codec through its backend).

    ``session_or_path``: an InferenceSession or the decoder's .onnx path; ``io_spec``: the dict the
    exporter returns (inputs, outputs, state pairs, num_quantizers, codebook_size).
    """

    def __init__(self, session_or_path, io_spec: dict, *, encoder=None, encoder_spec: dict | None = None):
        missing = {"inputs", "outputs", "state", "num_quantizers", "codebook_size"} - set(io_spec)
        if missing:
            raise ValueError(f"codec io_spec lacks {sorted(missing)}")
        if encoder is not None and encoder_spec is None:
            raise ValueError("pass encoder_spec= with encoder=")
        decoder = OrtGraph(_session(session_or_path), _graph_spec("codec_decoder", io_spec)).binding()
        enc = OrtGraph(_session(encoder), _graph_spec("codec_encoder", encoder_spec)).binding() if encoder else None
        super().__init__(decoder, int(io_spec["codebook_size"]), enc)
        if self.num_quantizers != int(io_spec["num_quantizers"]):
            raise ValueError(f"codec io_spec says {io_spec['num_quantizers']} quantizers, its codes input "
                             f"holds {self.num_quantizers}")


def _session(session_or_path):
    if isinstance(session_or_path, (str, Path)):
        import onnxruntime as ort

        return ort.InferenceSession(str(session_or_path), providers=["CPUExecutionProvider"])
    return session_or_path


def _graph_spec(name: str, io_spec: dict) -> GraphSpec:
    def tensors(entries):
        return tuple(TensorSpec(e["name"], tuple(e["shape"]), np.dtype(e["dtype"])) for e in entries)

    # Only the I/O matters here: the file is already open, so its name and checksum are not needed.
    return GraphSpec(name=name, file=str(io_spec.get("file", f"{name}.onnx")), sha256="", precision="fp32",
                     inputs=tensors(io_spec["inputs"]), outputs=tensors(io_spec["outputs"]),
                     state=tuple(StatePair(p["input"], p["output"]) for p in io_spec.get("state", ())))
