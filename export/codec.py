"""ONNX export of the Mimi codec: the one-frame streaming decoder step and the whole-clip encoder.

Both exporters return the graph's manifest entry (``GraphSpec``: I/O, state pairs, checksum), checked
against the written file; the decoder's also returns the codec facts (``CodecInfo``: rates and sizes).
A dynamic dimension is a string naming it.

Exporter: both paths produce correct graphs on torch 2.13 (checked: decoder parity and encoder codes
for off-grid lengths).  The dynamo exporter (dynamo=True) is used first: it is the maintained path and
keeps the encoder's input length symbolic through the padding arithmetic as a plain shape expression.
The TorchScript exporter (dynamo=False, deprecated) stays as a fallback for torch versions whose
torch.export rejects the modules; it takes `dynamic_axes` instead of `dynamic_shapes`.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from transformers import MimiModel

from dia2_trt.models.mimi_stream import MimiEncoderGraph, MimiStreamingDecoder
from dia2_trt.runtime.manifest import (
    ACTIVE,
    CODEC_DECODER,
    CODEC_ENCODER,
    FLOAT_PRECISIONS,
    MAX_STREAMS_LIMIT,
    STATE_IN,
    STATE_OUT,
    STREAMS,
    CodecInfo,
    GraphSpec,
    StatePair,
    TensorSpec,
)

from .graphs import EXAMPLE_STREAMS
from .manifest import graph_spec
from .onnx_io import EXTERNAL_DATA_BYTES, module_bytes, save_model

log = logging.getLogger(__name__)

CODEC_PRECISIONS = FLOAT_PRECISIONS  # the codec graphs' own; a weight-only build quantizes the fp32 ones
_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64", torch.bool: "bool"}


def export_codec_decoder(
    mimi: MimiModel, path: str | Path, *, max_streams: int | None, opset: int = 18, precision: str = "fp32",
    num_quantizers: int | None = None,
) -> tuple[GraphSpec, CodecInfo]:
    """Export the streaming decoder step of S streams, S in 1..``max_streams`` (the "streams" axis):
    codes [S,Q,1] int64, active [S] bool, state -> pcm [S,1,1920] float32, next state (every state
    tensor with a leading S axis; an inactive row's next state is its state).

    ``max_streams`` None writes the single-stream decoder artifacts had before the stream axis
    (codes [1,Q,1] + state, no ``active``), which the runtime still drives one binding a stream.

    precision "fp16": weights and activations fp16, with RoPE, LayerNorm statistics, attention softmax,
    state I/O and pcm kept fp32."""
    _check_precision(precision)
    if max_streams is not None and not 1 <= max_streams <= MAX_STREAMS_LIMIT:
        raise ValueError(f"max_streams must be in 1..{MAX_STREAMS_LIMIT}, got {max_streams}")
    decoder = MimiStreamingDecoder(mimi if precision == "fp32" else copy.deepcopy(mimi), num_quantizers).eval()
    if precision == "fp16":
        decoder.half_compute()
    names, specs = decoder.state_names, decoder.state_specs
    path = Path(path)
    if max_streams is None:
        _export(_OneStream(decoder).eval(), (_codes(decoder, 1), *decoder.initial_state()), path,
                ["codes"] + [STATE_IN + n for n in names], ["pcm"] + [STATE_OUT + n for n in names], opset=opset)
        batch, dims, active = 1, {}, []
    else:
        # traced with EXAMPLE_STREAMS rows: torch.export would fix an axis of size 1 as a constant
        args = (_codes(decoder, EXAMPLE_STREAMS), torch.ones(EXAMPLE_STREAMS, dtype=torch.bool),
                *decoder.initial_state(EXAMPLE_STREAMS))
        inputs = ["codes", ACTIVE] + [STATE_IN + n for n in names]
        outputs = ["pcm"] + [STATE_OUT + n for n in names]
        _export(decoder, args, path, inputs, outputs, opset=opset, dynamic={n: {0: STREAMS} for n in inputs})
        _name_dims(path, {n: {0: STREAMS} for n in inputs + outputs})
        batch, dims, active = STREAMS, {STREAMS: max_streams}, [_io(ACTIVE, (STREAMS,), torch.bool)]
    spec = _checked_spec(
        path, CODEC_DECODER, precision,
        [_io("codes", (batch, decoder.num_quantizers, 1), torch.int64), *active]
        + [_io(STATE_IN + n, (batch, *shape[1:]), dtype) for n, shape, dtype in specs],
        [_io("pcm", (batch, 1, decoder.frame_samples), torch.float32)]
        + [_io(STATE_OUT + n, (batch, *shape[1:]), dtype) for n, shape, dtype in specs],
        tuple(StatePair(STATE_IN + n, STATE_OUT + n) for n in names))
    config = mimi.config
    codec = CodecInfo(frame_rate=float(config.frame_rate), sample_rate=int(config.sampling_rate),
                      samples_per_frame=int(decoder.frame_samples), num_quantizers=int(decoder.num_quantizers),
                      codebook_size=int(config.codebook_size))
    return replace(spec, dims=dims), codec


class _OneStream(torch.nn.Module):
    """The decoder without a stream axis: codes [1,Q,1] + state, the one stream always active."""

    def __init__(self, decoder: MimiStreamingDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, codes: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.decoder(codes, torch.ones(1, dtype=torch.bool), *states)


def _codes(decoder: MimiStreamingDecoder, streams: int) -> torch.Tensor:
    return torch.zeros((streams, decoder.num_quantizers, 1), dtype=torch.int64)


def export_codec_encoder(
    mimi: MimiModel, path: str | Path, *, opset: int = 18, precision: str = "fp32", num_quantizers: int | None = None
) -> GraphSpec:
    """Export the encoder: pcm [1,1,samples] float32 -> codes [1,Q,frames] int64.

    Always computed in fp32, whatever `precision`: nearest-centroid search flips codes under fp16 rounding,
    and the encoder runs once per voice prompt, off the streaming path."""
    _check_precision(precision)
    encoder = MimiEncoderGraph(mimi, num_quantizers).eval()
    frame = int(mimi.config.frame_size)
    pcm = torch.zeros((1, 1, 3 * frame), dtype=torch.float32)
    path = Path(path)
    _export(encoder, (pcm,), path, ["pcm"], ["codes"], opset=opset, dynamic={"pcm": {2: "samples"}})
    _name_dims(path, {"codes": {2: "frames"}})
    return _checked_spec(path, CODEC_ENCODER, "fp32", [_io("pcm", (1, 1, "samples"), torch.float32)],
                         [_io("codes", (1, encoder.num_quantizers, "frames"), torch.int64)])


def _check_precision(precision: str) -> None:
    if precision not in CODEC_PRECISIONS:
        raise ValueError(f"precision must be one of {CODEC_PRECISIONS}, got {precision!r}")


def _io(name: str, shape, dtype: torch.dtype) -> TensorSpec:
    return TensorSpec(name, tuple(int(d) if not isinstance(d, str) else d for d in shape), np.dtype(_DTYPES[dtype]))


def _checked_spec(path: str | Path, name: str, precision: str, inputs: list[TensorSpec], outputs: list[TensorSpec],
                  state: tuple[StatePair, ...] = ()) -> GraphSpec:
    """The written graph's manifest entry, once it is known to have exactly the expected inputs and outputs."""
    path = Path(path)
    spec = replace(graph_spec(path.parent, name, path.name, precision), state=state)
    for kind, expected in (("inputs", tuple(inputs)), ("outputs", tuple(outputs))):
        if getattr(spec, kind) != expected:
            raise ValueError(f"{path}: graph {kind} {getattr(spec, kind)} differ from the expected {expected}")
    return spec


def _export(module, args, path: Path, inputs, outputs, *, opset: int, dynamic: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        try:
            _export_dynamo(module, args, path, inputs, outputs, opset, dynamic)
        except Exception as err:  # torch.export failures have many types; any of them means "try the old path"
            log.warning("dynamo ONNX export failed (%s); falling back to the TorchScript exporter", err)
            torch.onnx.export(
                module, args, str(path), input_names=inputs, output_names=outputs, opset_version=opset,
                dynamo=False, dynamic_axes=dynamic,
            )
    _validate(path)


def _export_dynamo(module, args, path: Path, inputs, outputs, opset: int, dynamic: dict | None) -> None:
    shapes = None
    if dynamic:
        dims: dict[str, Any] = {}  # one Dim per label: inputs that share a label share the size
        per_input = [{axis: dims.setdefault(label, torch.export.Dim(label)) for axis, label in axes.items()} or None
                     for axes in (dynamic.get(name, {}) for name in inputs)]
        shapes = _by_parameter(module, per_input)
    program = torch.onnx.export(
        module, args, None, input_names=inputs, output_names=outputs, opset_version=opset,
        dynamo=True, dynamic_shapes=shapes,
    )
    assert program is not None  # dynamo=True returns an ONNXProgram
    program.save(str(path), external_data=module_bytes(module) > EXTERNAL_DATA_BYTES)


def _by_parameter(module, shapes: list) -> tuple:
    """torch.export takes dynamic shapes per parameter of forward: the ones a ``*args`` takes as one tuple."""
    params = list(inspect.signature(module.forward).parameters.values())
    named = [p for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    if len(named) == len(params):
        return tuple(shapes)
    return (*shapes[: len(named)], tuple(shapes[len(named):]))


def _validate(path: Path) -> None:
    onnx.checker.check_model(str(path))  # by path: works for graphs with external data too
    model = onnx.load(str(path), load_external_data=False)
    foreign = {node.domain for node in model.graph.node if node.domain not in ("", "ai.onnx")}
    if foreign:
        raise ValueError(f"{path}: non-standard ONNX domains {sorted(foreign)} (TensorRT cannot parse them)")


def _name_dims(path: Path, dims: dict[str, dict[int, str]]) -> None:
    """Give named axes of inputs and outputs their labels: the exporter spells a size it derives
    (the encoder's frame count) as a long formula, and an output's copy of an input's axis by its own name."""
    model = onnx.load(str(path))
    for value in (*model.graph.input, *model.graph.output):
        for axis, label in dims.get(value.name, {}).items():
            value.type.tensor_type.shape.dim[axis].dim_param = label
    # save_model starts FILE.data afresh: onnx appends to an existing one (the weights, loaded
    # above, were written twice: a 448 MB data file for the 2B encoder's 224 MB)
    save_model(model, path)
