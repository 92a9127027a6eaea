"""Graph execution backends.

A backend loads one graph of the artifact directory and runs it on fixed,
named buffers: every input and output of a step graph has a static shape, so
the buffers are allocated once at load time and each step only copies the
small per-step inputs in. Large persistent inputs (the KV cache) are bound once
with ``Graph.bind`` and changed only through ``Graph.write``, so a device
backend (TensorRT) can keep them in device memory and write rows in place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np

from .artifacts import ArtifactError, GraphSpec
from .manifest import BACKEND_NAMES


class Graph(Protocol):
    spec: GraphSpec

    def bind(self, name: str, array: np.ndarray) -> None:
        """Use ``array`` as the persistent buffer of input ``name`` (read in place by every run)."""

    def write(self, name: str, index: Any, values: np.ndarray) -> None:
        """``buffer[index] = values`` on a bound input, wherever the backend keeps it."""

    def run(self, feeds: Mapping[str, Any]) -> Mapping[str, np.ndarray]:
        """Copy ``feeds`` into their input buffers, run, and return the output buffers.

        The returned arrays are the backend's own: valid until the next run.
        """


class Backend(Protocol):
    name: str

    def load(self, spec: GraphSpec, path: Path | None = None) -> Graph:
        """Load ``spec``'s graph (from ``path`` when given, else the file the manifest names)."""


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


class OrtBackend:
    """ONNX Runtime on the CPU, or with the CUDA execution provider when installed and asked for.

    With CUDA the bound buffers stay in host memory and ORT copies them in on
    each run: correct, but the device-resident cache is the TensorRT backend's job.
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

    def session_options(self, threads: int = 1, accuracy_level: int | None = None):
        ort = self._ort
        opts = ort.SessionOptions()
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
        if accuracy_level is not None:
            # How the fused MatMulNBits kernels of a weight-only int8/int4 graph compute (the
            # manifest's quantization record says; 4 = int8 activations).
            opts.add_session_config_entry(ORT_ACCURACY_LEVEL_KEY, str(int(accuracy_level)))
        return opts

    def open_session(self, spec: GraphSpec, path: Path | None = None):
        """A plain InferenceSession with this backend's options (the codec drives its own bindings)."""
        path = Path(path or spec.path)
        try:
            threads = self.threads or auto_threads(graph_bytes(path))
            level = spec.quantization.ort_accuracy_level if spec.quantization else None
            return self._ort.InferenceSession(str(path), self.session_options(threads, level),
                                              providers=self.providers)
        except Exception as exc:  # ORT raises its own exception types for unreadable models
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(f"{path}: cannot load graph ({message})") from None

    def load(self, spec: GraphSpec, path: Path | None = None) -> "OrtGraph":
        return OrtGraph(self.open_session(spec, path), spec)


class OrtGraph:
    """Every input and output bound once, by pointer, to host buffers allocated here."""

    def __init__(self, session, spec: GraphSpec) -> None:
        self.spec = spec
        self._session = session
        self._check_signature(session, spec)
        self._binding = session.io_binding()
        self._inputs: dict[str, np.ndarray] = {}
        self._outputs: dict[str, np.ndarray] = {}
        for t in spec.inputs:
            self._bind_input(t.name, t.zeros())
        for t in spec.outputs:
            self._outputs[t.name] = buf = t.zeros()
            self._binding.bind_output(t.name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)

    @staticmethod
    def _check_signature(session, spec: GraphSpec) -> None:
        declared = {t.name for t in spec.inputs}, {t.name for t in spec.outputs}
        actual = {i.name for i in session.get_inputs()}, {o.name for o in session.get_outputs()}
        if declared != actual:
            raise ArtifactError(f"{spec.path}: graph I/O {sorted(actual[0])} -> {sorted(actual[1])} "
                                f"does not match the manifest")

    def _bind_input(self, name: str, buf: np.ndarray) -> None:
        self._inputs[name] = buf
        self._binding.bind_input(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)

    def bind(self, name: str, array: np.ndarray) -> None:
        spec = self.spec.input(name)
        if array.shape != spec.shape or array.dtype != spec.dtype or not array.flags.c_contiguous:
            raise ValueError(f"{name}: need a C-contiguous {spec.dtype} array of shape {spec.shape}, "
                             f"got {array.dtype} {array.shape}")
        self._bind_input(name, array)

    def write(self, name: str, index: Any, values: np.ndarray) -> None:
        self._inputs[name][index] = values

    def run(self, feeds: Mapping[str, Any]) -> Mapping[str, np.ndarray]:
        for name, value in feeds.items():
            np.copyto(self._inputs[name], value, casting="same_kind")
        self._session.run_with_iobinding(self._binding)
        return self._outputs


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
