"""ONNX -> TensorRT engines, validated against ONNX Runtime with Polygraphy.

Every network is built *strongly typed*: precision comes from the ONNX tensor
types (fp16 ONNX -> fp16 kernels, Q/DQ ONNX -> INT8), which is the only way
TensorRT 11 offers (no FP16/INT8 builder flags, no implicit calibration) and
works the same on TensorRT 10.x.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from importlib import import_module
from pathlib import Path
from typing import Any

import onnx

from dia2_trt.runtime.artifacts import load_manifest
from dia2_trt.runtime.files import write_atomic
from dia2_trt.runtime.graph_io import read_io
from dia2_trt.runtime.manifest import (
    CACHE_ROWS,
    GRAPH_NAMES,
    STREAM_ROWS,
    STREAMS,
    EngineEntry,
    EngineValidation,
    GraphSpec,
    Manifest,
    TensorSpec,
)

from .manifest import sha256, write_manifest
from .unroll import unroll_loops

ENGINE_GRAPHS = GRAPH_NAMES
ENCODER_SAMPLES = (1920, 1920 * 125, 1920 * 750)  # min / opt / max: 0.08 s, 10 s, 60 s
# The smallest size a bounded axis is built for: one stream (its CFG pair of rows), one cache row.
BOUNDED_MIN = {STREAMS: 1, STREAM_ROWS: 2, CACHE_ROWS: 1}


class EngineError(RuntimeError):
    """TensorRT is missing or refused the network."""


def import_tensorrt() -> Any:
    try:  # by name: a type checker would take `import tensorrt` for this very module
        tensorrt: Any = import_module("tensorrt")
    except ImportError:
        raise EngineError("TensorRT is not installed "
                          "(pip install 'dia2-trt[tensorrt]' on a machine with an NVIDIA GPU)") from None
    return tensorrt


@dataclass(frozen=True)
class EngineOptions:
    workspace_gib: int = 4
    timing_cache: Path | None = None


def axis_ranges(manifest: Manifest, spec: GraphSpec) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of each named input axis of ``spec``'s graph, for its optimisation profile.

    A bounded axis spans BOUNDED_MIN .. its bound, tuned for the bound: 1..max_streams streams
    (2..2N rows), 1..capacity cache rows. The optimum is the bound because the TensorRT binding
    runs at it (a captured CUDA graph replays one shape: every slot, the cache at capacity); the
    range lets a caller run fewer streams without another engine.
    """
    frames = max(1, manifest.prefix_frames)
    ranges = {"samples": ENCODER_SAMPLES, "frames": (1, frames, frames)}
    ranges.update({name: (min(BOUNDED_MIN.get(name, bound), bound), bound, bound) for name, bound in spec.dims.items()})
    return ranges


def profile_shapes(inputs: tuple[TensorSpec, ...] | list[TensorSpec], ranges: dict[str, tuple[int, int, int]],
                   graph: str = "graph") -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shapes of each input with a named axis: what the optimisation profile sets."""
    shapes = {}
    for tensor in inputs:
        if tensor.static:
            continue
        unknown = sorted({d for d in tensor.shape if isinstance(d, str) and d not in ranges})
        if unknown:
            raise EngineError(f"{graph}: input {tensor.name} has axes {unknown} with no range to build for")
        shapes[tensor.name] = tuple(tuple(ranges[d][k] if isinstance(d, str) else d for d in tensor.shape)
                                    for k in range(3))
    return shapes


def build_engine(onnx_path: Path, plan_path: Path, options: EngineOptions = EngineOptions(),
                 ranges: dict[str, tuple[int, int, int]] | None = None) -> EngineEntry:
    """Parse, build and serialise one engine; returns what the manifest records about it.
    ``ranges``: (min, opt, max) of the graph's named input axes (see ``axis_ranges``)."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # also resolves external weight files
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise EngineError(f"{onnx_path.name}: TensorRT cannot parse it: {errors[0] if errors else 'unknown error'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_gib << 30)
    _add_profile(builder, network, config, onnx_path, ranges or {"samples": ENCODER_SAMPLES})
    cache = _load_timing_cache(config, options.timing_cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"{onnx_path.name}: TensorRT could not build an engine (see its log above)")
    _write_atomic(plan_path, bytes(plan))
    if cache is not None:
        assert options.timing_cache is not None  # a cache is only loaded from this path
        _write_atomic(options.timing_cache, bytes(cache.serialize()))
    gpu, capability = _device_info()
    return EngineEntry(file=plan_path.name, sha256=sha256(plan_path), tensorrt=trt.__version__, gpu=gpu,
                       compute_capability=capability,
                       built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _add_profile(builder, network, config, onnx_path: Path, ranges: dict[str, tuple[int, int, int]]) -> None:
    """One optimisation profile covering every dynamic input, each named axis over its range."""
    dynamic = [network.get_input(i) for i in range(network.num_inputs) if -1 in tuple(network.get_input(i).shape)]
    if not dynamic:
        return
    shapes = profile_shapes([TensorSpec.from_json(t) for t in read_io(onnx_path)[0]], ranges, onnx_path.name)
    profile = builder.create_optimization_profile()
    for tensor in dynamic:
        profile.set_shape(tensor.name, *shapes[tensor.name])
    config.add_optimization_profile(profile)


def _load_timing_cache(config, path: Path | None):
    if path is None:
        return None
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _device_info() -> tuple[str | None, str | None]:
    """(name, compute capability) of the GPU an engine was built for: engines are specific to it
    and to the TensorRT version."""
    try:
        from cuda.bindings import runtime as cudart  # pyright: ignore[reportMissingImports]  (the [tensorrt] extra)
    except ImportError:
        return None, None
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        return None, None
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return name, f"{props.major}.{props.minor}"


def _write_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def input_ranges(manifest: Manifest) -> dict[str, tuple[float, float]]:
    """Value ranges that keep random validation inputs meaningful (ids inside their tables)."""
    topo = manifest.topology
    return {
        "tokens": (0, min(topo.text_vocab_size, topo.audio_vocab_size) - 1),
        "position": (0, manifest.cache_capacity - 1),
        "cache_length": (0, manifest.cache_capacity - 1),
        "text_tokens": (0, topo.text_vocab_size - 1),
        "codes": (0, manifest.codec.codebook_size - 1),
        "noise": (0.0, 1.0),
        "temperature": (0.0, 1.0),
        "top_k": (1, 50),
        "cfg_scale": (1.0, 3.0),
        "cfg_filter_k": (1, 50),
    }


def compare_engine(onnx_path: Path, plan_path: Path, ranges: dict, *, atol: float, rtol: float,
                   iterations: int = 8, spec: GraphSpec | None = None) -> EngineValidation:
    """TensorRT vs ONNX Runtime on the same random inputs, through Polygraphy.
    ``spec``: inputs with a bounded axis are fed at the bound, as the TensorRT binding feeds them."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.common import TensorMetadata
    from polygraphy.comparator import Comparator, CompareFunc, DataLoader

    shapes = TensorMetadata()
    if spec is not None:
        for t in spec.bounded().inputs:
            if t.static and not spec.input(t.name).static:
                shapes.add(t.name, None, t.shape)
    loader = DataLoader(iterations=iterations, val_range=ranges, input_metadata=shapes or None)
    runners = [TrtRunner(EngineFromBytes(plan_path.read_bytes())), OnnxrtRunner(SessionFromOnnx(str(onnx_path)))]
    results = Comparator.run(runners, data_loader=loader)
    accuracy = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol))
    return EngineValidation(passed=bool(accuracy), iterations=iterations, atol=atol, rtol=rtol)


def build_engines(artifacts: Path, graphs: tuple[str, ...] = ENGINE_GRAPHS, options: EngineOptions = EngineOptions(),
                  validate: bool = True, echo: Callable[[str], None] = print) -> dict[str, EngineEntry]:
    """Engines for the artifact directory's graphs, each recorded in its graph's manifest entry."""
    manifest = load_manifest(artifacts)
    unknown = set(graphs) - set(manifest.graphs)
    if unknown:
        raise EngineError(f"no such graph(s) in {artifacts}: {', '.join(sorted(unknown))}")
    built = {}
    for name in graphs:
        spec = manifest.graph(name)
        plan_path = spec.path.with_suffix(".plan")
        echo(f"[engine] building {plan_path.name}")
        with laid_out(spec.path) as source:
            engine = _build_checked(source, plan_path, options, manifest, spec)
            if validate:
                atol = rtol = 1e-3 if spec.precision == "fp32" else 5e-2
                result = compare_engine(source, plan_path, input_ranges(manifest), atol=atol, rtol=rtol, spec=spec)
                engine = replace(engine, validation=result)
                echo(f"[engine] {name}: {'ok' if result.passed else 'MISMATCH'} vs ONNX Runtime")
        manifest = manifest.with_engine(name, engine)
        built[name] = engine
    write_manifest(manifest, artifacts)
    return built


def _build_checked(source: Path, plan_path: Path, options: EngineOptions, manifest: Manifest, spec: GraphSpec):
    try:
        return build_engine(source, plan_path, options, axis_ranges(manifest, spec))
    except EngineError as exc:
        if "cannot parse" not in str(exc):
            raise
        # The usual cause: the graphs' opset is newer than this TensorRT's ONNX parser.
        raise EngineError(f"{exc} (graphs exported at opset {manifest.opset}; an older TensorRT may need "
                          f"dia2-export build --opset 20)") from None


@contextlib.contextmanager
def laid_out(path: Path):
    """``path``, or for a graph with a Loop (the depformer's shared stages) an unrolled copy beside it.

    TensorRT's loops take no If inside (the sampler has them) and no carried value that grows (the
    stages' K/V). The copy shares the original's data file and is removed afterwards.
    """
    model = onnx.load(str(path), load_external_data=False)
    if not unroll_loops(model):
        yield path
        return
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.unrolled-", suffix=".onnx", dir=path.parent)
    os.close(fd)
    flat = Path(name)
    try:
        onnx.save_model(model, str(flat))
        yield flat
    finally:
        flat.unlink(missing_ok=True)


def have_gpu_tensorrt() -> tuple[bool, str]:
    """(available, reason) for tests and the CLI to explain a skip."""
    try:
        import_tensorrt()
    except EngineError as exc:
        return False, str(exc)
    try:
        from cuda.bindings import runtime as cudart  # pyright: ignore[reportMissingImports]  (the [tensorrt] extra)
    except ImportError:
        return False, "cuda-python is not installed (pip install 'dia2-trt[tensorrt]')"
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        return False, "no CUDA device visible"
    return True, ""

