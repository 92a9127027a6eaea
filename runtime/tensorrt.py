"""TensorRT backend: engines shared across sessions, device buffers per session, CUDA-graph replay.

Implements the runtime's ``Backend``/``Graph``/``Binding`` interface. A loaded
engine is shared; each binding has its own execution context, CUDA stream and
device buffers (TensorRT runs several contexts of one engine at once). Every
buffer's address is fixed for the binding's life, so a step is captured once
(per state-pair turn) and replayed with ``cudaGraphLaunch``. Bound inputs (the
KV cache) live only on the device: ``write(name, (:, :, t), k_new[i])`` is one
pitched device-to-device copy from the binding's own output buffer, so the cache
never crosses PCIe, and neither does the codec's state.

An engine only runs on the TensorRT version and GPU it was built for: the
manifest's engine entry records both, and ``load`` refuses a mismatch with the
reason before deserialising anything. tensorrt and cuda-python are imported on
first use only.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from importlib import import_module
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import ArtifactError, GraphSpec
from .files import InputFileError, read_regular

MAX_ENGINE_BYTES = 64 << 30  # a 2B fp16 engine is about 5 GB


def _cuda():
    try:
        from cuda.bindings import runtime as cudart  # pyright: ignore[reportMissingImports]  (the [tensorrt] extra)
    except ImportError:
        try:
            from cuda import cudart  # pyright: ignore[reportMissingImports]  (cuda-python < 12.6)
        except ImportError:
            raise ArtifactError("the TensorRT backend needs cuda-python (pip install 'dia2-trt[tensorrt]')") from None
    return cudart


def _check(result: Any) -> Any:
    """cuda-python returns (error, *values); raise on error, unwrap the values (untyped: cuda-python's
    bindings return whatever the CUDA call does)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {int(err)}: {err}")
    return values[0] if len(values) == 1 else tuple(values) if values else None


class TrtBackend:
    name = "tensorrt"

    def __init__(self, device: int = 0, cuda_graphs: bool = True) -> None:
        try:  # by name: a type checker would take `import tensorrt` for this very module
            trt: Any = import_module("tensorrt")
        except ImportError:
            raise ArtifactError("TensorRT is not installed (pip install 'dia2-trt[tensorrt]')") from None
        self._trt = trt
        self.cudart = _cuda()
        self.device = device
        _check(self.cudart.cudaSetDevice(device))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.cuda_graphs = cuda_graphs
        self.gpu = gpu_info(self.cudart, device)

    def load(self, spec: GraphSpec) -> TrtGraph:
        plan = check_engine(spec, self._trt.__version__, self.gpu)
        try:  # a regular file only (with --no-verify nothing else has opened it): a FIFO is refused
            data = read_regular(plan, MAX_ENGINE_BYTES, "TensorRT engine")
        except InputFileError as exc:
            raise ArtifactError(str(exc)) from None
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise ArtifactError(f"{plan}: TensorRT cannot load it (see its log above)")
        return TrtGraph(self, engine, spec)


def check_engine(spec: GraphSpec, tensorrt_version: str, gpu: dict) -> Path:
    """The engine file of ``spec``, once its entry says it was built for this TensorRT and this GPU
    (``gpu_info``); otherwise an ArtifactError that says why, before anything is deserialised."""
    entry = spec.engine
    if entry is None:
        raise ArtifactError(f"graph {spec.name!r} has no TensorRT engine in the manifest (run dia2-export engines)")
    plan = spec.root / entry.file
    if entry.tensorrt != tensorrt_version:
        raise ArtifactError(f"{plan.name}: built with TensorRT {entry.tensorrt}, this is TensorRT "
                            f"{tensorrt_version}; rebuild it with dia2-export engines")
    built_for, here = (entry.gpu, entry.compute_capability), (gpu["device"], gpu["compute_capability"])
    # A field the build could not record (no cuda-python there) is left to TensorRT's own check.
    if any(built is not None and built != this for built, this in zip(built_for, here)):
        raise ArtifactError(f"{plan.name}: built for {built_for[0]} (compute {built_for[1]}), this GPU is "
                            f"{here[0]} (compute {here[1]}); rebuild it with dia2-export engines")
    if not plan.is_file():
        raise ArtifactError(f"{plan}: TensorRT engine missing (listed in manifest.json)")
    return plan


def gpu_info(cudart, device: int) -> dict:
    """What an engine entry records about the GPU: its name and compute capability."""
    props = _check(cudart.cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {"device": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}


class TrtGraph:
    """A deserialised engine; each binding gets its own execution context, so they run concurrently."""

    concurrent = True

    def __init__(self, backend: TrtBackend, engine, spec: GraphSpec) -> None:
        self.spec, self.backend, self.engine = spec, backend, engine

    def binding(self) -> TrtBinding | TrtDynamicBinding:
        if self.spec.fixed_shape:
            return TrtBinding(self)
        return TrtDynamicBinding(self)


class _DeviceBuffer:
    """A device allocation, with a pinned host mirror of the same shape when ``mirror``."""

    def __init__(self, cudart, shape: tuple[int, ...], dtype: np.dtype, mirror: bool = True) -> None:
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        count = int(np.prod(shape))
        self.nbytes = max(count * self.dtype.itemsize, 1)
        self.device = _check(cudart.cudaMalloc(self.nbytes))
        self.host: np.ndarray = np.empty(0, self.dtype)  # without a mirror: nothing is copied through it
        self._host_ptr = None
        if mirror:
            self._host_ptr = _check(cudart.cudaMallocHost(self.nbytes))
            raw = (ctypes.c_byte * self.nbytes).from_address(int(self._host_ptr))
            self.host = np.frombuffer(memoryview(raw), dtype=self.dtype, count=count).reshape(shape)

    def free(self, cudart) -> None:
        cudart.cudaFree(self.device)
        if self._host_ptr is not None:
            cudart.cudaFreeHost(self._host_ptr)


class TrtBinding:
    """One session's execution context, stream and device buffers for a static-shape engine.

    State pairs have a second device buffer each: turn 0 reads the first and
    writes the second, turn 1 the other way round, one captured CUDA graph per turn.
    A bounded axis (the cache's rows) is fixed at its bound: a captured CUDA graph
    replays one shape, so the cache lives at full capacity on the device.
    """

    resizable = False
    device_inputs = True  # a bound input lives on the device, at its bound, whatever set_dims does

    def __init__(self, graph: TrtGraph) -> None:
        self.spec = graph.spec
        spec = graph.spec.bounded()
        self._b, self._cudart = graph.backend, graph.backend.cudart
        self._context = graph.engine.create_execution_context()
        for t in graph.spec.inputs:
            if not t.static:  # the engine's profile admits the bound (export/tensorrt.py)
                self._context.set_input_shape(t.name, spec.input(t.name).shape)
        self._stream = _check(self._cudart.cudaStreamCreate())
        state_inputs, state_outputs = {i for i, _ in spec.state}, {o for _, o in spec.state}
        # A state output writes into its input's spare buffer; state never needs a host mirror.
        self._buffers = {t.name: _DeviceBuffer(self._cudart, t.static_shape, t.dtype, mirror=t.name not in state_inputs)
                         for t in (*spec.inputs, *spec.outputs) if t.name not in state_outputs}
        self._spare = {i: _DeviceBuffer(self._cudart, spec.input(i).static_shape, spec.input(i).dtype, mirror=False)
                       for i in state_inputs}
        self._outputs = [t.name for t in spec.outputs if t.name not in state_outputs]
        self._turn = 0
        self._dims = dict(graph.spec.dims)
        self._shapes = {t.name: t.static_shape for t in (*spec.inputs, *spec.outputs)}
        self._graphs: dict[tuple, list] = {}  # captured CUDA graphs per axis sizes, one per turn
        self._graph_exec = self._graphs.setdefault(tuple(sorted(self._dims.items())), [None, None])
        self._point(0)

    def _point(self, turn: int) -> None:
        """Tensor addresses for a turn: state inputs read one buffer set, state outputs write the other."""
        for name, buf in self._buffers.items():
            self._context.set_tensor_address(name, int(buf.device))
        for i, o in self.spec.state:
            live, spare = self._buffers[i].device, self._spare[i].device
            self._context.set_tensor_address(i, int(live if turn == 0 else spare))
            self._context.set_tensor_address(o, int(spare if turn == 0 else live))

    def bind(self, name: str, array: np.ndarray) -> None:
        """Upload ``array`` once; afterwards the device copy is the buffer (see ``write_rows``)."""
        buf = self._buffers[name]
        # the leading (stream) rows of the bound: a batch of fewer streams than the engine's bound
        if array.shape[1:] != buf.shape[1:] or array.shape[0] > buf.shape[0] or array.dtype != buf.dtype:
            raise ValueError(f"{name}: need {buf.dtype} {buf.shape}, got {array.dtype} {array.shape}")
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        host = np.ascontiguousarray(array)  # named: it must outlive the copy
        _check(self._cudart.cudaMemcpy(buf.device, host.ctypes.data, host.nbytes, kind))

    def set_dims(self, dims: Mapping[str, int]) -> None:
        """Run the next calls at these sizes of the named axes (the streams of a batch): the buffers
        stay at their bound and hold the smaller tensors packed at their start; each size gets its
        own pair of captured CUDA graphs."""
        sizes = {d: int(n) for d, n in dims.items() if d in self.spec.dims}
        if any(not 1 <= n <= self.spec.dims[d] for d, n in sizes.items()):
            raise ValueError(f"{self.spec.name}: axis sizes {sizes} outside the bounds {self.spec.dims}")
        if all(self._dims.get(d) == n for d, n in sizes.items()):
            return
        self._carry_state(sizes)
        self._dims.update(sizes)
        for t in self.spec.inputs:
            if not t.static:
                self._context.set_input_shape(t.name, t.bounded(self._dims).static_shape)
        self._shapes = {t.name: t.bounded(self._dims).static_shape for t in (*self.spec.inputs, *self.spec.outputs)}
        self._graph_exec = self._graphs.setdefault(tuple(sorted(self._dims.items())), [None, None])

    def _carry_state(self, sizes: Mapping[str, int]) -> None:
        """Before a state's leading (stream) axis shrinks: its rows past the new size, which runs no
        longer write, copied device to device from the buffer the next run reads into the other one.
        Runs swap the two, so without it a row left out for an odd number of runs would come back
        one run stale (or another stream's, after a reset) when the axis grows again. A row sits at
        the same offset at every size (the tensors are packed at the buffers' start)."""
        d2d = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        copied = False
        for i, _ in self.spec.state:
            axis = self.spec.input(i).shape[0] if self.spec.input(i).shape else None
            if not isinstance(axis, str) or axis not in sizes or sizes[axis] >= self._dims[axis]:
                continue
            live, other = (self._buffers[i], self._spare[i]) if self._turn == 0 else (self._spare[i], self._buffers[i])
            row = int(np.prod(live.shape[1:])) * live.dtype.itemsize
            lo, hi = sizes[axis] * row, self._dims[axis] * row
            _check(self._cudart.cudaMemcpyAsync(int(other.device) + lo, int(live.device) + lo, hi - lo, d2d,
                                                self._stream))
            copied = True
        if copied:
            _check(self._cudart.cudaStreamSynchronize(self._stream))

    def write_rows(self, name: str, batch: slice, rows: slice, values: np.ndarray) -> None:
        """``buffer[batch, :, rows] = values`` on the device, for a [batch, heads, rows, width] input
        at its bound: one pitched 2-D copy (a row block of each (batch row, head) pair).

        When ``values`` lies in one of this binding's output mirrors (the loop passes slices of
        ``k_new``), the copy reads that output's device buffer directly.
        """
        buf = self._buffers[name]
        _, heads, capacity, width = buf.shape
        b0, b1, _ = batch.indices(buf.shape[0])
        r0, r1, _ = rows.indices(capacity)
        item = buf.dtype.itemsize
        values = np.ascontiguousarray(values, dtype=buf.dtype)  # host memory the async copy reads
        if values.shape != (b1 - b0, heads, r1 - r0, width):
            raise ValueError(f"{name}: rows {values.shape} do not fit [{b0}:{b1}, :, {r0}:{r1}]")
        row_bytes = (r1 - r0) * width * item
        dst = int(buf.device) + ((b0 * heads) * capacity + r0) * width * item
        device = self._device_address(values)
        kinds = self._cudart.cudaMemcpyKind
        kind = kinds.cudaMemcpyDeviceToDevice if device is not None else kinds.cudaMemcpyHostToDevice
        src = device if device is not None else values.ctypes.data
        _check(self._cudart.cudaMemcpy2DAsync(dst, capacity * width * item, src, row_bytes, row_bytes,
                                              (b1 - b0) * heads, kind, self._stream))
        if device is None:
            _check(self._cudart.cudaStreamSynchronize(self._stream))

    def _device_address(self, values: np.ndarray) -> int | None:
        """The device address of ``values`` if it is a contiguous piece of an output mirror."""
        start = values.ctypes.data
        for name in self._outputs:
            buf = self._buffers[name]
            base = buf.host.ctypes.data
            if values.flags.c_contiguous and base <= start and start + values.nbytes <= base + buf.nbytes:
                return int(buf.device) + (start - base)
        return None

    def run(self, feeds: Mapping[str, Any]) -> Mapping[str, np.ndarray]:
        cudart, stream = self._cudart, self._stream
        _check(cudart.cudaSetDevice(self._b.device))  # the current device is per host thread
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, value in feeds.items():
            host = self._host(name)
            np.copyto(host, value, casting="same_kind")
            _check(cudart.cudaMemcpyAsync(self._buffers[name].device, host.ctypes.data, host.nbytes, h2d, stream))
        self._enqueue()
        out = {name: self._host(name) for name in self._outputs}
        for name, host in out.items():
            _check(cudart.cudaMemcpyAsync(host.ctypes.data, self._buffers[name].device, host.nbytes, d2h, stream))
        _check(cudart.cudaStreamSynchronize(stream))
        if self.spec.state:
            self._turn ^= 1
        return out

    def _host(self, name: str) -> np.ndarray:
        """The host mirror of ``name`` at the current sizes: a packed prefix of the bound's buffer."""
        shape = self._shapes[name]
        return self._buffers[name].host.reshape(-1)[: int(np.prod(shape))].reshape(shape)

    def _enqueue(self) -> None:
        """A turn's first run is eager (TensorRT finishes lazy setup there), then captured and replayed."""
        turn, stream = self._turn, self._stream
        if self._graph_exec[turn] is not None:
            _check(self._cudart.cudaGraphLaunch(self._graph_exec[turn], stream))
            return
        if self.spec.state:
            self._point(turn)
        if not self._context.execute_async_v3(int(stream)):
            raise RuntimeError(f"{self.spec.name}: TensorRT execution failed")
        if self._b.cuda_graphs:
            mode = self._cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            _check(self._cudart.cudaStreamBeginCapture(stream, mode))
            self._context.execute_async_v3(int(stream))
            graph = _check(self._cudart.cudaStreamEndCapture(stream))
            self._graph_exec[turn] = _check(self._cudart.cudaGraphInstantiate(graph, 0))

    def reset_state(self, streams: slice | None = None) -> None:
        """Zero the state the next run reads (rows ``streams`` of its leading axis only, if given)."""
        for i, _ in self.spec.state:
            buf = self._buffers[i] if self._turn == 0 else self._spare[i]
            shape = self._shapes[i]
            lo, hi, _ = (streams or slice(None)).indices(shape[0])
            row = int(np.prod(shape[1:])) * buf.dtype.itemsize
            _check(self._cudart.cudaMemsetAsync(int(buf.device) + lo * row, 0, (hi - lo) * row, self._stream))
        _check(self._cudart.cudaStreamSynchronize(self._stream))

    def __del__(self) -> None:
        cudart = getattr(self, "_cudart", None)
        if cudart is None:  # __init__ failed before anything was allocated
            return
        for buf in (*getattr(self, "_buffers", {}).values(), *getattr(self, "_spare", {}).values()):
            buf.free(cudart)
        for exe in getattr(self, "_graph_exec", ()):
            if exe is not None:
                cudart.cudaGraphExecDestroy(exe)
        if getattr(self, "_stream", None) is not None:
            cudart.cudaStreamDestroy(self._stream)


class TrtDynamicBinding:
    """A dynamic-shape engine (the codec encoder): buffers sized and allocated per run."""

    resizable = False

    def __init__(self, graph: TrtGraph) -> None:
        self.spec = graph.spec
        self._b, self._cudart = graph.backend, graph.backend.cudart
        self._context = graph.engine.create_execution_context()
        self._stream = _check(self._cudart.cudaStreamCreate())

    def bind(self, name: str, array: np.ndarray) -> None:
        raise ValueError(f"{self.spec.name}: a dynamic-shape graph takes no persistent inputs")

    def write_rows(self, name: str, batch: slice, rows: slice, values: np.ndarray) -> None:
        self.bind(name, values)

    def set_dims(self, dims: Mapping[str, int]) -> None:
        """Every run takes whatever shapes it is fed."""

    def reset_state(self, streams: slice | None = None) -> None:
        """Nothing carries over between runs of a dynamic graph."""

    def run(self, feeds: Mapping[str, Any]) -> Mapping[str, np.ndarray]:
        cudart, ctx, stream = self._cudart, self._context, self._stream
        _check(cudart.cudaSetDevice(self._b.device))
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        buffers, hosts = [], []  # hosts: the inputs' host memory, alive until the stream is synchronised
        try:
            for t in self.spec.inputs:
                hosts.append(array := np.ascontiguousarray(feeds[t.name], dtype=t.dtype))
                ctx.set_input_shape(t.name, array.shape)
                buffers.append(buf := _DeviceBuffer(cudart, array.shape, t.dtype, mirror=False))
                _check(cudart.cudaMemcpyAsync(buf.device, array.ctypes.data, buf.nbytes, h2d, stream))
                ctx.set_tensor_address(t.name, int(buf.device))
            out = {}
            for t in self.spec.outputs:
                out[t.name] = np.empty(tuple(ctx.get_tensor_shape(t.name)), dtype=t.dtype)
                buffers.append(buf := _DeviceBuffer(cudart, out[t.name].shape, t.dtype, mirror=False))
                ctx.set_tensor_address(t.name, int(buf.device))
            if not ctx.execute_async_v3(int(stream)):
                raise RuntimeError(f"{self.spec.name}: TensorRT execution failed")
            for array, buf in zip(out.values(), buffers[len(self.spec.inputs):]):
                _check(cudart.cudaMemcpyAsync(array.ctypes.data, buf.device, buf.nbytes, d2h, stream))
            _check(cudart.cudaStreamSynchronize(stream))
            return out
        finally:
            cudart.cudaStreamSynchronize(stream)  # nothing queued may still use what is freed here
            for buf in buffers:
                buf.free(cudart)

    def __del__(self) -> None:
        if getattr(self, "_stream", None) is not None:
            self._cudart.cudaStreamDestroy(self._stream)
