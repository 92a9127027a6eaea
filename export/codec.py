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
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch
from transformers import MimiModel

from dia2_trt.models.mimi_stream import MimiEncoderGraph, MimiStreamingDecoder
from dia2_trt.runtime.manifest import (
    CODEC_DECODER,
    CODEC_ENCODER,
    FLOAT_PRECISIONS,
    STATE_IN,
    STATE_OUT,
    CodecInfo,
    GraphSpec,
    StatePair,
    TensorSpec,
)

from .manifest import graph_spec
from .onnx_io import EXTERNAL_DATA_BYTES, module_bytes, save_model

log = logging.getLogger(__name__)

CODEC_PRECISIONS = FLOAT_PRECISIONS  # the codec graphs' own; a weight-only build quantizes the fp32 ones
_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64"}


def export_codec_decoder(
    mimi: MimiModel, path: str | Path, *, opset: int = 18, precision: str = "fp32", num_quantizers: int | None = None
) -> tuple[GraphSpec, CodecInfo]:
    """Export the streaming decoder step: codes [1,Q,1] int64 + state -> pcm [1,1,1920] float32 + next state.

    precision "fp16": weights and activations fp16, with RoPE, LayerNorm statistics, attention softmax,
    state I/O and pcm kept fp32."""
    _check_precision(precision)
    decoder = MimiStreamingDecoder(mimi if precision == "fp32" else copy.deepcopy(mimi), num_quantizers).eval()
    if precision == "fp16":
        decoder.half_compute()
    codes = torch.zeros((1, decoder.num_quantizers, 1), dtype=torch.int64)
    args = (codes, *decoder.initial_state())
    names = decoder.state_names
    inputs = ["codes"] + [STATE_IN + n for n in names]
    outputs = ["pcm"] + [STATE_OUT + n for n in names]
    _export(decoder, args, Path(path), inputs, outputs, opset=opset)
    spec = _checked_spec(
        path, CODEC_DECODER, precision,
        [_io("codes", codes.shape, torch.int64)]
        + [_io(STATE_IN + n, shape, dtype) for n, shape, dtype in decoder.state_specs],
        [_io("pcm", (1, 1, decoder.frame_samples), torch.float32)]
        + [_io(STATE_OUT + n, shape, dtype) for n, shape, dtype in decoder.state_specs],
        tuple(StatePair(STATE_IN + n, STATE_OUT + n) for n in names))
    config = mimi.config
    codec = CodecInfo(frame_rate=float(config.frame_rate), sample_rate=int(config.sampling_rate),
                      samples_per_frame=int(decoder.frame_samples), num_quantizers=int(decoder.num_quantizers),
                      codebook_size=int(config.codebook_size))
    return spec, codec


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
    _name_dim(path, "codes", 2, "frames")
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
        shapes = tuple(
            {axis: torch.export.Dim(label) for axis, label in dynamic.get(name, {}).items()} or None
            for name in inputs
        )
    program = torch.onnx.export(
        module, args, None, input_names=inputs, output_names=outputs, opset_version=opset,
        dynamo=True, dynamic_shapes=shapes,
    )
    assert program is not None  # dynamo=True returns an ONNXProgram
    program.save(str(path), external_data=module_bytes(module) > EXTERNAL_DATA_BYTES)


def _validate(path: Path) -> None:
    onnx.checker.check_model(str(path))  # by path: works for graphs with external data too
    model = onnx.load(str(path), load_external_data=False)
    foreign = {node.domain for node in model.graph.node if node.domain not in ("", "ai.onnx")}
    if foreign:
        raise ValueError(f"{path}: non-standard ONNX domains {sorted(foreign)} (TensorRT cannot parse them)")


def _name_dim(path: Path, output: str, axis: int, label: str) -> None:
    # the exporter spells the encoder's frame count as a long symbolic formula of the sample count
    model = onnx.load(str(path))
    for value in model.graph.output:
        if value.name == output:
            value.type.tensor_type.shape.dim[axis].dim_param = label
    # save_model starts FILE.data afresh: onnx appends to an existing one (the weights, loaded
    # above, were written twice: a 448 MB data file for the 2B encoder's 224 MB)
    save_model(model, path)
