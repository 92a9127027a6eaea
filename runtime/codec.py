"""Streaming Mimi codec over backend bindings: decode one frame at a time, encode a whole clip.

The decoder step graph (written by dia2_trt.export.codec) carries its streaming
state as state pairs, which the binding double-buffers; this module only feeds
codes and reads PCM, so every backend runs the codec the same way it runs the
step graphs.
"""

from __future__ import annotations

import numpy as np

from .backends import Binding
from .step import ACTIVE, STREAMS


class CodecStream:
    """decode_frame(codes [Q]) -> pcm [frame_samples] float32, continuing the stream; encode(pcm) -> codes [Q, T].

    A codec on its own, over one decoder binding (which holds its state): the codec tests drive
    exported graphs with it. Sessions decode through their slot of ``step.FrameStepper`` instead.
    """

    def __init__(self, decoder: Binding, codebook_size: int, encoder: Binding | None = None) -> None:
        spec = decoder.spec
        state_inputs, state_outputs = {i for i, _ in spec.state}, {o for _, o in spec.state}
        codes = [t.name for t in spec.inputs if t.name not in state_inputs and t.name != ACTIVE]
        pcm = [t.name for t in spec.outputs if t.name not in state_outputs]
        if len(codes) != 1 or len(pcm) != 1:
            raise ValueError(f"{spec.name}: a codec decoder has one codes input and one pcm output besides "
                             f"its state, got {codes} -> {pcm}")
        self._decoder, self._encoder = decoder, encoder
        # a graph with a stream axis decodes this one stream as its row 0, always active
        self._batched = any(t.name == ACTIVE for t in spec.inputs)
        if self._batched:
            decoder.set_dims({STREAMS: 1})
        one = {**spec.dims, STREAMS: 1}
        self._codes, self._pcm = spec.input(codes[0]).bounded(one), spec.output(pcm[0]).bounded(one)
        self.num_quantizers = int(np.prod(self._codes.static_shape))
        self.frame_samples = int(np.prod(self._pcm.static_shape))
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
        feeds: dict[str, np.ndarray] = {self._codes.name: codes.reshape(self._codes.static_shape)}
        if self._batched:
            feeds[ACTIVE] = np.ones(1, np.bool_)
        return self._decoder.run(feeds)[self._pcm.name].reshape(-1).copy()

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

