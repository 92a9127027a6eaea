"""A graph's declared inputs and outputs, read straight from the ONNX file's protobuf bytes.

The runtime does not depend on the ``onnx`` package, and loading a multi-GB graph only to compare
its signature with the manifest would cost the load twice. The file is memory-mapped and walked
field by field; the weights (initializers, nodes) are skipped by their length without being read,
so this touches a few pages of the 7.7 GB 2B backbone.

Only the fields needed are decoded (ModelProto.graph=7; GraphProto.input=11, output=12;
ValueInfoProto.name=1, type=2; TypeProto.tensor_type=1; Tensor.elem_type=1, shape=2;
TensorShapeProto.dim=1; Dimension.dim_value=1, dim_param=2), as in onnx/onnx.proto3.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path

from .files import InputFileError, open_regular

# TensorProto.DataType values of the dtypes a manifest may declare.
ELEM_TYPES = {1: "float32", 6: "int32", 7: "int64", 9: "bool", 10: "float16"}


class GraphFormatError(ValueError):
    """The file is not an ONNX model this reader understands."""


def read_io(path: str | Path) -> tuple[list[dict], list[dict]]:
    """([{name, shape, dtype}] inputs, outputs); a dynamic axis is its dim_param string."""
    try:  # a regular file only: mmap of a FIFO or device would block or fail obscurely
        f = open_regular(path, 1 << 62, "graph file")
    except InputFileError as exc:
        raise GraphFormatError(str(exc)) from None
    with f:
        if os.fstat(f.fileno()).st_size == 0:
            raise GraphFormatError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            graph = _only(buf, 0, len(buf), 7, "graph")
            inputs, outputs = [], []
            for number, start, end in _fields(buf, *graph):
                if number == 11:
                    inputs.append(_value_info(buf, start, end))
                elif number == 12:
                    outputs.append(_value_info(buf, start, end))
            return inputs, outputs


def _value_info(buf, start: int, end: int) -> dict:
    name, shape, dtype = "", [], "undefined"
    for number, s, e in _fields(buf, start, end):
        if number == 1:
            name = bytes(buf[s:e]).decode("utf-8", "replace")
        elif number == 2:
            tensor = _only(buf, s, e, 1, f"{name}: tensor type")
            for n, ts, te in _fields(buf, *tensor):
                if n == 1:
                    elem = _varint(buf, ts)[0]
                    dtype = ELEM_TYPES.get(elem, f"onnx type {elem}")
                elif n == 2:
                    shape = [_dim(buf, ds, de) for _, ds, de in _fields(buf, ts, te)]
    return {"name": name, "shape": shape, "dtype": dtype}


def _dim(buf, start: int, end: int) -> int | str:
    for number, s, e in _fields(buf, start, end):
        if number == 1:
            value = _varint(buf, s)[0]
            return value - (1 << 64) if value >= 1 << 63 else value
        if number == 2:
            return bytes(buf[s:e]).decode("utf-8", "replace")
    return ""  # neither: an unnamed dynamic axis


def _only(buf, start: int, end: int, wanted: int, what: str) -> tuple[int, int]:
    for number, s, e in _fields(buf, start, end):
        if number == wanted:
            return s, e
    raise GraphFormatError(f"no {what}")


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, value start, value end) for each field in buf[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value_start = pos
            _, pos = _varint(buf, pos)
        elif wire == 1:
            value_start, pos = pos, pos + 8
        elif wire == 2:
            length, value_start = _varint(buf, pos)
            pos = value_start + length
        elif wire == 5:
            value_start, pos = pos, pos + 4
        else:
            raise GraphFormatError(f"unsupported protobuf wire type {wire} at byte {pos}")
        if pos > end:
            raise GraphFormatError(f"truncated field {number} at byte {value_start}")
        yield number, value_start, pos


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise GraphFormatError("truncated or malformed varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
