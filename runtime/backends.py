"""Graph execution backends: the runtime's only seam to an inference engine.

``Backend.load(spec)`` turns one graph of the artifact directory into a
``Graph``: the loaded program and its weights, shared by every session of a
runtime. A session never runs a ``Graph`` directly: it asks for its own
``Binding`` (``graph.binding()``), which owns every buffer one run reads and
writes, so sessions on one graph never share memory.

A static-shape binding allocates its buffers once and each step only copies the
small per-step inputs in. Large persistent inputs (the KV cache) are attached
once with ``Binding.bind`` and changed only through ``Binding.write_rows``, so a
device backend (TensorRT) keeps them in device memory and writes rows in place.
An axis with a bound (``GraphSpec.dims``: the cache's rows, the streams of a
batch) counts as static at its bound; ``set_dims`` lays the buffers out for fewer
(the streams of this batch), and a ``resizable`` binding also takes a smaller
cache through ``bind`` between runs (ONNX Runtime reads whatever shape it is given).
State pairs (``GraphSpec.state``: an output fed back as an input on the next
run, e.g. the codec's streaming state) are double-buffered by the binding: each
run reads one set and writes the other, then they swap, with no copy.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .artifacts import ArtifactError, GraphSpec
from .errors import first_line
from .manifest import BACKEND_NAMES, QDQ_PRECISIONS


class Binding(Protocol):
    """One session's buffers for one graph: its inputs, outputs and carried state."""

    spec: GraphSpec
    resizable: bool  # whether bind() takes a bounded axis below its bound (else only at the bound)
    # (optional, default False) whether bound inputs live on a device, bound once at their bound: set_dims
    # keeps them, and they change only through write_rows (TensorRT). Else bind() again after set_dims.

    def bind(self, name: str, array: np.ndarray) -> None:
        """Use ``array`` as the persistent buffer of input ``name`` (read in place by every run)."""

    def write_rows(self, name: str, batch: slice, rows: slice, values: np.ndarray) -> None:
        """``buffer[batch, :, rows] = values`` on a bound [batch, heads, rows, width] input (the KV cache),
        wherever the backend keeps it."""

    def set_dims(self, dims: Mapping[str, int]) -> None:
        """Lay every buffer out for these sizes of named axes (each within its bound); what a state
        pair holds for the leading rows is kept. Inputs attached with ``bind`` must be bound again."""

    def run(self, feeds: Mapping[str, Any]) -> Mapping[str, np.ndarray]:
        """Copy ``feeds`` into their input buffers, run, and return the outputs.

        The returned arrays (every output but the state pairs') are the binding's
        own: valid until its next run. A state pair's output stays in the binding
        as the pair's input for the next run.
        """
        ...

    def reset_state(self, streams: slice | None = None) -> None:
        """Zero the state pairs (only rows ``streams`` of their leading stream axis, if given): the next
        run starts a new stream there."""


class Graph(Protocol):
    """A loaded graph, shared by every session of a runtime."""

    spec: GraphSpec
    concurrent: bool  # whether bindings of this graph may run at the same time in different threads

    def binding(self) -> Binding:
        """Fresh buffers for one session (cheap next to loading; reuse them across utterances)."""
        ...


class Backend(Protocol):
    name: str

    def load(self, spec: GraphSpec) -> Graph:
        """Load the graph ``spec`` describes (its file, or the backend's compiled form of it)."""
        ...


# --- ONNX Runtime ------------------------------------------------------------

# Chosen by measurement on 2 cores. Intra-op threads, when not given, depend on
# the graph's weight bytes: a small graph is a chain of tiny kernels where thread
# hand-offs cost more than they save (tiny: 1 thread ~1500 frames/s, 2 threads
# ~1090), while a large one is a stream of weight reads that one core cannot
# sustain alone (2B fp32: 517 ms/frame on 1 thread, 292 ms on 2). Spinning is
# off: the backbone, depformer and codec sessions run one after another, and a
# finished session's spinning workers steal the cores the next one needs (2
# threads with spinning ran the loop 1.6-3.7x slower). Optimisation levels
# basic/extended/all were equal within noise; "all" stays, as ORT's default.
LARGE_GRAPH_BYTES = 64 << 20
ORT_ACCURACY_LEVEL_KEY = "session.qdq_matmulnbits_accuracy_level"
DEFAULT_SPINNING = False


def auto_threads(graph_bytes: int) -> int:
    return (os.cpu_count() or 1) if graph_bytes >= LARGE_GRAPH_BYTES else 1


def graph_bytes(path: Path) -> int:
    """The graph file plus its external weights, if any."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


# Q/DQ artifacts are made for TensorRT, which multiplies int8 (or fp8) values exactly and accumulates
# in int32/fp32. ONNX Runtime CPU would fuse int8 Q/DQ into integer kernels whose numerics depend on
# the instruction set: without VNNI, its u8 x s8 kernels sum byte pairs into saturating int16 lanes
# (a 1024x512 int8-qdq MatMul: max error 5.2% of the output range on AVX2 against 1.2% with VNNI
# or unfused; tests/test_calibration.py). Unfused, the weights are dequantized once at load (ORT
# folds the constant DequantizeLinear) and every CPU computes what TensorRT does, to fp32 rounding.
# So QDQ_PRECISIONS (runtime/manifest.py) run unfused: OrtBackend.open_session.


class OrtBackend:
    """ONNX Runtime on the CPU, or with the CUDA execution provider when installed and asked for.

    One InferenceSession per graph, shared; ONNX Runtime allows concurrent runs
    on one session, each with its own IOBinding. With CUDA the buffers stay in
    host memory and ORT copies them in on each run: correct, but the
    device-resident cache is the TensorRT backend's job.
    """

    name = "onnxruntime"

    def __init__(self, threads: int | None = None, *, spinning: bool = DEFAULT_SPINNING,
                 optimization: str = "all", device: str = "cpu") -> None:
        import onnxruntime as ort

        self._ort = ort
        if threads is not None and threads < 1:
            raise ValueError("threads must be >= 1")
        self.threads = threads  # None: per graph, see auto_threads
        self.spinning = spinning
        self.optimization = optimization
        self.providers = self._providers(device)

    def _providers(self, device: str) -> list[str]:
        if device == "cpu":
            return ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in self._ort.get_available_providers():
                raise ValueError("onnxruntime has no CUDA execution provider here (install onnxruntime-gpu)")
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        raise ValueError(f"unknown device {device!r}; choose cpu or cuda")

    def session_options(self, threads: int = 1, accuracy_level: int | None = None, arena: bool = True,
                        fuse_qdq: bool = True):
        ort = self._ort
        opts = ort.SessionOptions()
        opts.enable_cpu_mem_arena = opts.enable_mem_pattern = arena
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.optimization]
        spin = "1" if self.spinning else "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
        opts.log_severity_level = 3  # ORT's warnings about unused initializers are noise here
        if not fuse_qdq:
            opts.add_session_config_entry("session.disable_quant_qdq", "1")
        if accuracy_level is not None:
            # How the fused MatMulNBits kernels of a weight-only int8/int4 graph compute (the
            # manifest's quantization record says; 4 = int8 activations).
            opts.add_session_config_entry(ORT_ACCURACY_LEVEL_KEY, str(int(accuracy_level)))
        return opts

    def load(self, spec: GraphSpec) -> OrtGraph:
        return OrtGraph(self.open_session(spec), spec)

    def open_session(self, spec: GraphSpec, path: Path | None = None):
        """A plain InferenceSession of ``spec``'s graph (or of a variant of it at ``path``, as the
        calibration replay uses) with this backend's options: threads, a weight-only graph's accuracy level."""
        path = Path(path or spec.path)
        try:
            threads = self.threads or auto_threads(graph_bytes(path))
            level = spec.quantization.ort_accuracy_level if spec.quantization else None
            qdq = spec.precision in QDQ_PRECISIONS
            # No arena for Q/DQ graphs: ORT's CPU provider has no FP8 MatMul and dequantizes every
            # fp8 weight on every run, and the arena kept each copy (2B fp8-qdq backbone: 10.3 GiB
            # after two runs; without the arena 5.7 GiB at peak, 1.5 between runs).
            options = self.session_options(threads, level, arena=not qdq, fuse_qdq=not qdq)
            return self._ort.InferenceSession(str(path), options, providers=self.providers)
        except Exception as exc:  # ORT raises its own exception types for unreadable models
            message = first_line(exc)
            if "multiple hard links" in message:
                # ONNX Runtime reads a Loop body's weights (the depformer's stages) only from a data
                # file with a single link: a hard-linked copy of the artifacts breaks both copies.
                raise ArtifactError(f"{path}: ONNX Runtime refuses its weights file, which has more than one "
                                    f"hard link; copy artifact directories instead of hard-linking them") from None
            raise ArtifactError(f"{path}: cannot load graph ({message})") from None


class OrtGraph:
    """An InferenceSession whose I/O matches its spec; bindings run on it concurrently."""

    concurrent = True

    def __init__(self, session, spec: GraphSpec) -> None:
        self.spec = spec
        self.session = session
        declared = {t.name for t in spec.inputs}, {t.name for t in spec.outputs}
        actual = {i.name for i in session.get_inputs()}, {o.name for o in session.get_outputs()}
        if declared != actual:
            raise ArtifactError(f"{spec.path}: graph I/O {sorted(actual[0])} -> {sorted(actual[1])} "
                                f"does not match the manifest")

    def binding(self) -> OrtBinding | OrtDynamicBinding:
        if self.spec.fixed_shape:
            return OrtBinding(self.session, self.spec)
        return OrtDynamicBinding(self.session, self.spec)


class OrtBinding:
    """Every input and output bound once, by pointer, to host buffers this binding owns.

    Each buffer is one flat allocation at its bound, viewed at the current sizes of its named
    axes (``set_dims``): a view of a prefix, so a smaller batch needs no allocation, and a state
    whose leading axis is the streams keeps every leading stream's values across a resize.
    With state pairs there are two IOBindings over two sets of state buffers, used
    alternately: run n reads set n % 2 and writes set (n + 1) % 2.
    """

    resizable = True

    def __init__(self, session, spec: GraphSpec) -> None:
        self.spec = spec
        self._session = session
        full = spec.bounded()  # np.zeros commits no memory until written: a bound costs nothing unused
        self._flat = {t.name: np.zeros(int(np.prod(t.static_shape)), t.dtype) for t in (*full.inputs, *full.outputs)}
        self._spare_flat = {i: np.zeros_like(self._flat[i]) for i, _ in spec.state}
        self._attached: dict[str, np.ndarray] = {}  # inputs given with bind()
        self._dims = dict(spec.dims)
        self._turn = 0
        self._layout()

    def _view(self, flat: np.ndarray, name: str, shape: tuple[int, ...]) -> np.ndarray:
        return flat[: int(np.prod(shape))].reshape(shape)

    def _layout(self) -> None:
        spec, dims = self.spec, self._dims
        shapes = {t.name: t.bounded(dims).static_shape for t in (*spec.inputs, *spec.outputs)}
        self._inputs = {t.name: self._attached.get(t.name, self._view(self._flat[t.name], t.name, shapes[t.name]))
                        for t in spec.inputs}
        outputs = {t.name: self._view(self._flat[t.name], t.name, shapes[t.name]) for t in spec.outputs}
        spare = {i: self._view(self._spare_flat[i], i, shapes[i]) for i, _ in spec.state}
        # Turn 0 reads the live state and writes the spare; turn 1 the other way round.
        self._sides = [(dict(self._inputs), {**outputs, **{o: spare[i] for i, o in spec.state}})]
        if spec.state:
            self._sides.append(({**self._inputs, **spare}, {**outputs, **{o: self._inputs[i] for i, o in spec.state}}))
        self._bindings = [self._io_binding(*side) for side in self._sides]
        self._returned = {name: buf for name, buf in outputs.items() if name not in dict(spec.state).values()}

    def _io_binding(self, inputs: dict, outputs: dict):
        binding = self._session.io_binding()
        for name, buf in inputs.items():
            binding.bind_input(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        for name, buf in outputs.items():
            binding.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        return binding

    def set_dims(self, dims: Mapping[str, int]) -> None:
        sizes = {d: int(n) for d, n in dims.items() if d in self.spec.dims}  # axes this graph lacks: no-op
        if any(not 1 <= n <= self.spec.dims[d] for d, n in sizes.items()):
            raise ValueError(f"{self.spec.name}: axis sizes {sizes} outside the bounds {self.spec.dims}")
        if all(self._dims.get(d) == n for d, n in sizes.items()):
            return
        self._carry_state(sizes)
        self._dims.update(sizes)
        self._attached.clear()
        self._layout()

    def _carry_state(self, sizes: Mapping[str, int]) -> None:
        """Before the leading axis of a state shrinks: its rows past the new size, which runs no longer
        write, copied from the set the next run reads into the other set. Runs swap the sets, so
        without it a row left out for an odd number of runs would come back one run stale (or
        another stream's, after a reset) when the axis grows again."""
        if not self.spec.state:
            return
        live, other = self._sides[self._turn][0], self._sides[1 - self._turn][0]
        for name, _ in self.spec.state:
            shape = self.spec.input(name).shape
            axis = shape[0] if shape else None
            if isinstance(axis, str) and axis in sizes and sizes[axis] < live[name].shape[0]:
                other[name][sizes[axis]:] = live[name][sizes[axis]:]

    def bind(self, name: str, array: np.ndarray) -> None:
        spec = self.spec.input(name)
        if any(name == i for i, _ in self.spec.state):
            raise ValueError(f"{name}: a state input is the binding's own buffer")
        if not spec.fits(array.shape, self.spec.dims) or array.dtype != spec.dtype or not array.flags.c_contiguous:
            raise ValueError(f"{name}: need a C-contiguous {spec.dtype} array of shape {spec.shape} "
                             f"(bounds {self.spec.dims}), got {array.dtype} {array.shape}")
        self._attached[name] = self._inputs[name] = array
        for (inputs, _), binding in zip(self._sides, self._bindings):
            inputs[name] = array
            binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)

    def write_rows(self, name: str, batch: slice, rows: slice, values: np.ndarray) -> None:
        self._inputs[name][batch, :, rows] = values

    def run(self, feeds: Mapping[str, Any]) -> Mapping[str, np.ndarray]:
        inputs = self._sides[self._turn][0]
        for name, value in feeds.items():
            np.copyto(inputs[name], value, casting="same_kind")
        self._session.run_with_iobinding(self._bindings[self._turn])
        self._turn = (self._turn + 1) % len(self._sides)
        return self._returned

    def state(self, name: str) -> np.ndarray:
        """The buffer the next run reads for state input ``name``."""
        return self._sides[self._turn][0][name]

    def reset_state(self, streams: slice | None = None) -> None:
        for name, _ in self.spec.state:
            self.state(name)[streams if streams is not None else slice(None)] = 0


class OrtDynamicBinding:
    """A graph with dynamic axes (the codec encoder): ORT allocates its outputs on each run."""

    resizable = False  # it takes no persistent inputs at all

    def __init__(self, session, spec: GraphSpec) -> None:
        self.spec = spec
        self._session = session
        self._outputs = [t.name for t in spec.outputs]

    def bind(self, name: str, array: np.ndarray) -> None:
        raise ValueError(f"{self.spec.name}: a dynamic-shape graph takes no persistent inputs")

    def write_rows(self, name: str, batch: slice, rows: slice, values: np.ndarray) -> None:
        self.bind(name, values)

    def set_dims(self, dims: Mapping[str, int]) -> None:
        """Every run takes whatever shapes it is fed."""

    def run(self, feeds: Mapping[str, Any]) -> Mapping[str, np.ndarray]:
        arrays = {t.name: np.ascontiguousarray(feeds[t.name], dtype=t.dtype) for t in self.spec.inputs}
        return dict(zip(self._outputs, self._session.run(self._outputs, arrays)))

    def reset_state(self, streams: slice | None = None) -> None:
        """Nothing carries over between runs of a dynamic graph."""


class TakingTurns:
    """A binding of a graph that cannot run two bindings at once: ``run`` waits for the graph's lock."""

    def __init__(self, binding: Binding, lock) -> None:
        self.spec, self._binding, self._lock = binding.spec, binding, lock
        self.resizable = binding.resizable
        self.device_inputs = getattr(binding, "device_inputs", False)
        self.bind, self.write_rows, self.reset_state = binding.bind, binding.write_rows, binding.reset_state
        self.set_dims = binding.set_dims

    def run(self, feeds: Mapping[str, Any]) -> Mapping[str, np.ndarray]:
        with self._lock:
            return self._binding.run(feeds)


def create_backend(name: str = "onnxruntime", threads: int | None = None) -> Backend:
    """A backend by name; ``threads`` is ONNX Runtime's intra-op thread count (TensorRT ignores it)."""
    if name == "onnxruntime":
        return OrtBackend(threads)
    if name == "onnxruntime-cuda":
        return OrtBackend(threads, device="cuda")
    if name == "tensorrt":
        from .tensorrt import TrtBackend  # imports tensorrt and cuda-python: only when asked for

        return TrtBackend()
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
