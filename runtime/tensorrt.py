"""TensorRT backend: engines with device-resident buffers, replayed as CUDA graphs.

Implements the runtime's ``Backend``/``Graph`` interface. Every I/O tensor gets
one device buffer for the life of the graph, so addresses never change and a
step can be captured once and replayed (``cudaGraphLaunch``) with no per-step
enqueue cost. Bound inputs (the KV cache) live only on the device: the loop's
``write(name, (:, :, t), k_new[i])`` becomes one strided device-to-device copy
from this graph's own output buffer, and the cache never crosses PCIe.

tensorrt and cuda-python are imported on first use only.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .artifacts import ArtifactError, GraphSpec


def _cuda():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            raise ArtifactError("the TensorRT backend needs cuda-python (pip install 'dia2-trt[tensorrt]')") from None
    return cudart


def _check(result):
    """cuda-python returns (error, *values); raise on error, unwrap the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {int(err)}: {err}")
    return values[0] if len(values) == 1 else tuple(values)


class TrtBackend:
    name = "tensorrt"

    def __init__(self, device: int = 0, cuda_graphs: bool = True) -> None:
        try:
            import tensorrt as trt
        except ImportError:
            raise ArtifactError("TensorRT is not installed (pip install 'dia2-trt[tensorrt]')") from None
        self._trt = trt
        self._cudart = _cuda()
        _check(self._cudart.cudaSetDevice(device))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.stream = _check(self._cudart.cudaStreamCreate())
        self.cuda_graphs = cuda_graphs

    def load(self, spec: GraphSpec, path: Path | None = None) -> "TrtGraph":
        if path is None and spec.engine is None:
            raise ArtifactError(f"graph {spec.name!r} has no TensorRT engine in the manifest (run dia2-export engines)")
        plan = Path(path) if path else spec.engine_path
        if not plan.is_file():
            raise ArtifactError(f"no TensorRT engine {plan.name} for graph {spec.name!r} (run dia2-export engines)")
        engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise ArtifactError(f"{plan}: TensorRT cannot load it (built for another GPU or TensorRT version?)")
        return TrtGraph(self, engine, spec)


class _DeviceBuffer:
    """A device allocation plus a pinned host mirror of the same shape."""

    def __init__(self, cudart, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.nbytes = max(int(np.prod(shape)) * self.dtype.itemsize, 1)
        self.device = _check(cudart.cudaMalloc(self.nbytes))
        host = _check(cudart.cudaMallocHost(self.nbytes))
        raw = (ctypes.c_byte * self.nbytes).from_address(int(host))
        self.host = np.frombuffer(raw, dtype=self.dtype, count=int(np.prod(shape))).reshape(shape)
        self._host_ptr = host

    def free(self, cudart) -> None:
        cudart.cudaFree(self.device)
        cudart.cudaFreeHost(self._host_ptr)


class TrtGraph:
    def __init__(self, backend: TrtBackend, engine, spec: GraphSpec) -> None:
        self.spec = spec
        self._b = backend
        self._cudart = backend._cudart
        self._engine = engine
        self._context = engine.create_execution_context()
        self._buffers: dict[str, _DeviceBuffer] = {}
        self._bound: set[str] = set()
        for t in (*spec.inputs, *spec.outputs):
            if not t.static:
                raise ArtifactError(f"{spec.name}.{t.name}: the TensorRT backend runs static-shape graphs only")
            self._buffers[t.name] = buf = _DeviceBuffer(self._cudart, tuple(t.shape), t.dtype)
            self._context.set_tensor_address(t.name, int(buf.device))
        self._graph_exec = None

    def bind(self, name: str, array: np.ndarray) -> None:
        """Upload ``array`` once; afterwards the device copy is the buffer (see ``write``)."""
        buf = self._buffers[name]
        if array.shape != buf.shape or array.dtype != buf.dtype:
            raise ValueError(f"{name}: need {buf.dtype} {buf.shape}, got {array.dtype} {array.shape}")
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check(self._cudart.cudaMemcpy(buf.device, np.ascontiguousarray(array).ctypes.data, buf.nbytes, kind))
        self._bound.add(name)

    def write(self, name: str, index: Any, values: np.ndarray) -> None:
        """``buffer[:, ..., :, i] = values`` on the device: a pitched 2-D copy.

        When ``values`` lies in one of this graph's output mirrors (the loop passes
        ``k_new[i]``), the copy reads that output's device buffer directly.
        """
        buf = self._buffers[name]
        axis, i = _row_index(index, len(buf.shape))
        width = int(np.prod(buf.shape[axis + 1:])) * buf.dtype.itemsize
        height = int(np.prod(buf.shape[:axis]))
        pitch = buf.shape[axis] * width
        src, kind = self._source(values)
        _check(self._cudart.cudaMemcpy2DAsync(int(buf.device) + i * width, pitch, src, width, width, height,
                                              kind, self._b.stream))

    def _source(self, values: np.ndarray):
        """The device address of ``values`` if it is a contiguous piece of an output mirror."""
        start = values.ctypes.data
        for out in self.spec.outputs:
            buf = self._buffers[out.name]
            base = buf.host.ctypes.data
            if values.flags.c_contiguous and base <= start and start + values.nbytes <= base + buf.nbytes:
                return int(buf.device) + (start - base), self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        return np.ascontiguousarray(values).ctypes.data, self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice

    def run(self, feeds: Mapping[str, Any]) -> Mapping[str, np.ndarray]:
        h2d = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        stream = self._b.stream
        for name, value in feeds.items():
            buf = self._buffers[name]
            np.copyto(buf.host, value, casting="same_kind")
            _check(self._cudart.cudaMemcpyAsync(buf.device, buf.host.ctypes.data, buf.nbytes, h2d, stream))
        self._enqueue()
        for out in self.spec.outputs:
            buf = self._buffers[out.name]
            _check(self._cudart.cudaMemcpyAsync(buf.host.ctypes.data, buf.device, buf.nbytes, d2h, stream))
        _check(self._cudart.cudaStreamSynchronize(stream))
        return {out.name: self._buffers[out.name].host for out in self.spec.outputs}

    def _enqueue(self) -> None:
        """First run eagerly (TensorRT finishes lazy setup there), then capture and replay."""
        stream = self._b.stream
        if self._graph_exec is not None:
            _check(self._cudart.cudaGraphLaunch(self._graph_exec, stream))
            return
        if not self._context.execute_async_v3(stream):
            raise RuntimeError(f"{self.spec.name}: TensorRT execution failed")
        if self._b.cuda_graphs:
            mode = self._cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            _check(self._cudart.cudaStreamBeginCapture(stream, mode))
            self._context.execute_async_v3(stream)
            graph = _check(self._cudart.cudaStreamEndCapture(stream))
            self._graph_exec = _check(self._cudart.cudaGraphInstantiate(graph, 0))

    def __del__(self) -> None:
        for buf in getattr(self, "_buffers", {}).values():
            buf.free(self._cudart)


def _row_index(index: Any, ndim: int) -> tuple[int, int]:
    """(axis, i) for an index of full slices followed by one integer: the only write the loop makes."""
    index = index if isinstance(index, tuple) else (index,)
    *head, last = index
    if len(index) > ndim or not all(s == slice(None) for s in head) or not isinstance(last, (int, np.integer)):
        raise ValueError(f"the TensorRT backend writes whole rows only (buffer[:, ..., i]); got {index!r}")
    return len(head), int(last)
