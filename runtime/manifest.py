"""The artifact manifest as typed objects: what export/ writes and every reader (runtime, validate,
engines, benchmark) reads, through one ``from_json`` / ``to_json`` pair.

Names that more than one package must agree on are defined here once: graph names, the cache and
codec-state name schemes, precisions and backend names. This module only describes; reading a
directory, containing its paths and verifying its files is ``artifacts.load_manifest``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .state_machine import TokenIds

FORMAT = "dia2-trt-artifacts"
# 2: typed manifest (codec block, tokenizer checksums, per-graph engine entries).
# 3: the depformer's noise is one uniform per codebook ([Q], was [Q, V]).
# 4: the backbone reads a prefix of its cache ("cache_rows", bounded by graphs.*.dims).
VERSION = 5  # 5: the per-frame graphs serve 1..max_streams streams a call ("streams", "stream_rows")
REBUILD = "dia2-export build ... --overwrite"  # what a directory of an older version needs
MANIFEST = "manifest.json"

BACKBONE, DEPFORMER, CODEC_DECODER, CODEC_ENCODER = "backbone", "depformer", "codec_decoder", "codec_encoder"
BACKBONE_PREFILL = "backbone_prefill"  # an audio prefix's warm-up in one call (artifacts with --prefix-frames)
GRAPH_NAMES = (BACKBONE, DEPFORMER, CODEC_DECODER, CODEC_ENCODER, BACKBONE_PREFILL)
# Graphs the generation loop cannot run without (the codec encoder is only for voice prompts).
REQUIRED_GRAPHS = (BACKBONE, DEPFORMER, CODEC_DECODER)
# A closed set, in three kinds. Float: every tensor in that type (export's build).
FLOAT_PRECISIONS = ("fp32", "fp16")
# Weight-only: fp32 compute, integer MatMul weights read through DequantizeLinear (export's build).
WEIGHT_ONLY_PRECISIONS = ("int8", "int4")
# Calibrated Q/DQ on activations and weights, for TensorRT's strongly typed engines (calibration).
QDQ_PRECISIONS = ("int8-qdq", "fp8-qdq")
PRECISIONS = FLOAT_PRECISIONS + WEIGHT_ONLY_PRECISIONS + QDQ_PRECISIONS
BACKEND_NAMES = ("onnxruntime", "onnxruntime-cuda", "tensorrt")
DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}
STATE_IN, STATE_OUT = "state.", "next."  # a graph's carried state: input state.<x> -> output next.<x>


class ArtifactError(ValueError):
    """An artifact directory the runtime cannot use."""


# The backbone step's cache inputs are [2, Hkv, CACHE_ROWS, D]: any number of rows up to the
# capacity, of which the first cache_length are valid. ONNX Runtime then reads only as many rows
# as the runtime has grown the cache to, where a fixed capacity had every step read all of them.
CACHE_ROWS = "cache_rows"
# Many streams in one call (manifest version 5): the per-frame graphs' leading axis is the streams
# (one value each: positions, sampler settings, noise, tokens) or their rows (stream s owns rows 2s
# and 2s + 1, its CFG pair), always 2 * streams. Bounded by the manifest's max_streams (2x for rows).
STREAMS, STREAM_ROWS = "streams", "stream_rows"
# The codec decoder with a streams axis takes this bool [streams]: a row with False keeps its state.
ACTIVE = "active"
MAX_STREAMS_LIMIT = 64  # the largest max_streams a manifest may record


def cache_name(kind: str, layer: int) -> str:
    """The backbone's per-layer cache inputs: ``k_cache.0``, ``v_cache.0``, ..."""
    return f"{kind}_cache.{layer}"


def state_names(name: str) -> StatePair:
    """The input/output pair that carries state ``name`` from one run of a graph to the next."""
    return StatePair(STATE_IN + name, STATE_OUT + name)


# --- pieces -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # a str is a dynamic axis
    dtype: np.dtype

    @property
    def static(self) -> bool:
        return all(isinstance(dim, int) for dim in self.shape)

    def bounded(self, dims: dict[str, int]) -> TensorSpec:
        """This tensor at its largest: each named axis with a bound in ``dims`` replaced by it."""
        return replace(self, shape=tuple(dims.get(d, d) if isinstance(d, str) else d for d in self.shape))

    def fits(self, shape: tuple[int, ...], dims: dict[str, int]) -> bool:
        """Whether ``shape`` is one of this tensor's: fixed axes equal, bounded axes 1..bound."""
        return len(shape) == len(self.shape) and all(
            s == d if isinstance(d, int) else d in dims and 1 <= s <= dims[d] for s, d in zip(shape, self.shape))

    @property
    def static_shape(self) -> tuple[int, ...]:
        """The shape of a static tensor (ArtifactError for one with a named axis left)."""
        if not self.static:
            raise ArtifactError(f"{self.name}: no static shape to allocate ({list(self.shape)})")
        return tuple(int(dim) for dim in self.shape)

    def zeros(self) -> np.ndarray:
        return np.zeros(self.static_shape, dtype=self.dtype)

    @classmethod
    def from_json(cls, d: dict) -> TensorSpec:
        dtype = str(d["dtype"])
        if dtype not in DTYPES:
            raise ArtifactError(f"tensor {d['name']!r}: unsupported dtype {dtype!r}")
        shape = tuple(dim if isinstance(dim, str) else _int(dim, f"{d['name']}.shape") for dim in d["shape"])
        return cls(str(d["name"]), shape, np.dtype(DTYPES[dtype]))

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype.name}


class StatePair(NamedTuple):
    """An input fed with the previous run's output: the graph's explicit state."""

    input: str
    output: str


@dataclass(frozen=True)
class FileRef:
    """A file of the artifact directory (relative path) and its checksum."""

    file: str
    sha256: str

    @classmethod
    def from_json(cls, d: dict) -> FileRef:
        return cls(str(d["file"]), _sha(d["sha256"], d["file"]))

    def to_json(self) -> dict:
        return {"file": self.file, "sha256": self.sha256}


@dataclass(frozen=True)
class QuantizationRecord:
    """How a graph's weights were quantized (filled in by the quantization tools)."""

    scheme: str  # one of PRECISIONS (the quantized ones)
    bits: int
    symmetric: bool
    block_size: int | None = None  # None: per channel
    ops: tuple[str, ...] = ()  # ONNX op types whose weights were quantized
    calibration: str | None = None  # what the activation ranges came from, when they were calibrated
    # ONNX Runtime's MatMulNBits accuracy level for fused weight-only MatMuls (4: int8 activations);
    # the ONNX Runtime backend sets it as session.qdq_matmulnbits_accuracy_level.
    ort_accuracy_level: int | None = None
    # Per quantized kind ("matmul_weights", "gather_tables"): count, bits, fp32_bytes, bytes.
    weights: dict[str, dict[str, int]] = field(default_factory=dict, compare=False)
    kept_float: tuple[str, ...] = ()  # what stayed in float, in words

    @classmethod
    def from_json(cls, d: dict) -> QuantizationRecord:
        level = d.get("ort_accuracy_level")
        return cls(scheme=_choice(d["scheme"], PRECISIONS, "quantization.scheme"), bits=_int(d["bits"], "bits"),
                   symmetric=bool(d["symmetric"]), block_size=None if d.get("block_size") is None
                   else _int(d["block_size"], "block_size"), ops=tuple(str(o) for o in d.get("ops", ())),
                   calibration=d.get("calibration"),
                   ort_accuracy_level=None if level is None else _int(level, "ort_accuracy_level"),
                   weights={str(k): {str(f): _int(v, f) for f, v in dict(e).items()}
                            for k, e in dict(d.get("weights", {})).items()},
                   kept_float=tuple(str(x) for x in d.get("kept_float", ())))

    def to_json(self) -> dict:
        return _drop_none({"scheme": self.scheme, "bits": self.bits, "symmetric": self.symmetric,
                           "block_size": self.block_size, "ops": list(self.ops), "calibration": self.calibration,
                           "ort_accuracy_level": self.ort_accuracy_level, "weights": self.weights or None,
                           "kept_float": list(self.kept_float) or None})


@dataclass(frozen=True)
class EngineValidation:
    passed: bool
    iterations: int
    atol: float
    rtol: float

    @classmethod
    def from_json(cls, d: dict) -> EngineValidation:
        return cls(bool(d["passed"]), int(d["iterations"]), float(d["atol"]), float(d["rtol"]))

    def to_json(self) -> dict:
        return {"passed": self.passed, "iterations": self.iterations, "atol": self.atol, "rtol": self.rtol}


@dataclass(frozen=True)
class EngineEntry:
    """A TensorRT engine built from a graph: valid only for this TensorRT version and GPU."""

    file: str
    sha256: str
    tensorrt: str  # TensorRT version that built it
    gpu: str | None  # device name, when cuda-python could tell
    compute_capability: str | None
    built_at: str  # ISO 8601, UTC
    validation: EngineValidation | None = None  # Polygraphy comparison with ONNX Runtime, if run

    @classmethod
    def from_json(cls, d: dict) -> EngineEntry:
        validation = d.get("validation")
        return cls(file=str(d["file"]), sha256=_sha(d["sha256"], d["file"]), tensorrt=str(d["tensorrt"]),
                   gpu=d.get("gpu"), compute_capability=d.get("compute_capability"), built_at=str(d["built_at"]),
                   validation=EngineValidation.from_json(validation) if validation else None)

    def to_json(self) -> dict:
        return _drop_none({"file": self.file, "sha256": self.sha256, "tensorrt": self.tensorrt, "gpu": self.gpu,
                           "compute_capability": self.compute_capability, "built_at": self.built_at,
                           "validation": self.validation.to_json() if self.validation else None})


# --- graphs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphSpec:
    name: str
    file: str  # relative to the artifact directory
    sha256: str
    precision: str  # this graph's own (the codec encoder stays fp32 in an fp16 build)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    state: tuple[StatePair, ...] = ()  # (input, output) pairs carried from one run to the next
    external_data: FileRef | None = None  # FILE.data: the weights of a graph past 32 MB (export/onnx_io.py)
    quantization: QuantizationRecord | None = None
    engine: EngineEntry | None = None
    dims: dict[str, int] = field(default_factory=dict, hash=False)  # the bound of each named axis that has one
    root: Path = field(default=Path("."), compare=False, repr=False)  # the artifact directory

    @property
    def path(self) -> Path:
        return self.root / self.file

    @property
    def external_data_path(self) -> Path | None:
        return self.root / self.external_data.file if self.external_data else None

    @property
    def engine_path(self) -> Path | None:
        return self.root / self.engine.file if self.engine else None

    def input(self, name: str) -> TensorSpec:
        return _find(self.inputs, name, self.name, "input")

    @property
    def fixed_shape(self) -> bool:
        """Whether every axis is static or bounded: a binding can allocate all its buffers once."""
        full = self.bounded()
        return all(t.static for t in (*full.inputs, *full.outputs))

    def bounded(self) -> GraphSpec:
        """This graph with every bounded axis at its bound (what a fixed-shape binding allocates)."""
        return replace(self, inputs=tuple(t.bounded(self.dims) for t in self.inputs),
                       outputs=tuple(t.bounded(self.dims) for t in self.outputs))

    def output(self, name: str) -> TensorSpec:
        return _find(self.outputs, name, self.name, "output")

    @classmethod
    def from_json(cls, name: str, d: dict, root: Path = Path(".")) -> GraphSpec:
        opt = lambda key, parse: parse(d[key]) if d.get(key) is not None else None  # noqa: E731
        return cls(
            name=name, file=str(d["file"]), sha256=_sha(d["sha256"], d["file"]),
            precision=_choice(d["precision"], PRECISIONS, f"graphs.{name}.precision"),
            inputs=tuple(TensorSpec.from_json(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in d["outputs"]),
            state=tuple(StatePair(str(p["input"]), str(p["output"])) for p in d.get("state", ())),
            external_data=opt("external_data", FileRef.from_json),
            quantization=opt("quantization", QuantizationRecord.from_json),
            engine=opt("engine", EngineEntry.from_json),
            dims=_dims(d.get("dims") or {}, name), root=root,
        )

    def to_json(self) -> dict:
        return _drop_none({
            "file": self.file, "sha256": self.sha256, "precision": self.precision,
            "inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs],
            "state": [{"input": p.input, "output": p.output} for p in self.state],
            "external_data": self.external_data.to_json() if self.external_data else None,
            "quantization": self.quantization.to_json() if self.quantization else None,
            "engine": self.engine.to_json() if self.engine else None,
            "dims": dict(self.dims) or None,
        })


def _find(specs: tuple[TensorSpec, ...], name: str, graph: str, kind: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise ArtifactError(f"graph {graph!r} has no {kind} {name!r}")


# --- model facts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DepformerTopology:
    n_layer: int
    n_embd: int
    n_hidden: int
    heads: int
    head_dim: int
    text_embedding: bool
    weights_schedule: tuple[int, ...]


@dataclass(frozen=True)
class Topology:
    """The checkpoint's shapes, as far as the runtime and the benchmark's roofline need them."""

    channels: int
    audio_channels: int
    num_depth: int
    n_layer: int
    n_embd: int
    n_hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    low_rank_dim: int | None
    depformer: DepformerTopology
    text_vocab_size: int
    audio_vocab_size: int
    action_vocab_size: int

    @classmethod
    def from_json(cls, d: dict) -> Topology:
        dep = dict(d["depformer"])
        depformer = DepformerTopology(**{f.name: _int(dep[f.name], f"topology.depformer.{f.name}")
                                         for f in fields(DepformerTopology)
                                         if f.name not in ("text_embedding", "weights_schedule")},
                                      text_embedding=bool(dep["text_embedding"]),
                                      weights_schedule=tuple(int(w) for w in dep["weights_schedule"]))
        ints = {f.name: _int(d[f.name], f"topology.{f.name}") for f in fields(cls)
                if f.name not in ("depformer", "low_rank_dim")}
        low_rank = d.get("low_rank_dim")
        low_rank = None if low_rank is None else _int(low_rank, "topology.low_rank_dim")
        return cls(**ints, depformer=depformer, low_rank_dim=low_rank)

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "depformer"}
        dep = {f.name: getattr(self.depformer, f.name) for f in fields(DepformerTopology)}
        dep["weights_schedule"] = list(self.depformer.weights_schedule)
        out["depformer"] = dep
        return out


@dataclass(frozen=True)
class CodecInfo:
    frame_rate: float  # frames per second
    sample_rate: int
    samples_per_frame: int
    num_quantizers: int  # codes per frame (= audio channels)
    codebook_size: int  # codes lie in [0, codebook_size)

    @classmethod
    def from_json(cls, d: dict) -> CodecInfo:
        return cls(frame_rate=float(d["frame_rate"]), sample_rate=_int(d["sample_rate"], "codec.sample_rate"),
                   samples_per_frame=_int(d["samples_per_frame"], "codec.samples_per_frame"),
                   num_quantizers=_int(d["num_quantizers"], "codec.num_quantizers"),
                   codebook_size=_int(d["codebook_size"], "codec.codebook_size"))

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class TokenizerEntry:
    directory: str  # relative to the artifact directory
    files: dict[str, str]  # file name -> sha256

    @classmethod
    def from_json(cls, d: dict) -> TokenizerEntry:
        return cls(str(d["directory"]), {str(k): _sha(v, k) for k, v in dict(d["files"]).items()})

    def to_json(self) -> dict:
        return {"directory": self.directory, "files": dict(self.files)}


@dataclass(frozen=True)
class SourceInfo:
    """Where the artifacts came from: validate and bench find the checkpoint through it."""

    repo_id: str | None
    checkpoint: str | None
    mimi: str | None
    files: dict[str, str]  # checkpoint file name -> sha256

    @classmethod
    def from_json(cls, d: dict) -> SourceInfo:
        return cls(d.get("repo_id"), d.get("checkpoint"), d.get("mimi"), dict(d.get("files", {})))

    def to_json(self) -> dict:
        return {"repo_id": self.repo_id, "checkpoint": self.checkpoint, "mimi": self.mimi, "files": dict(self.files)}


# --- the manifest -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    precision: str
    opset: int
    topology: Topology
    token_ids: TokenIds
    delays: tuple[int, ...]
    second_stream_ahead: int
    max_padding: int
    max_context_steps: int
    prefix_frames: int  # cache rows reserved for an audio prefix: capacity = context + 1 + prefix
    cache_capacity: int
    codec: CodecInfo
    tokenizer: TokenizerEntry
    graphs: dict[str, GraphSpec]
    source: SourceInfo
    tools: dict[str, str]  # versions of the tools that built it (provenance for bug reports)
    max_streams: int = 1  # streams one call of the per-frame graphs serves at most (1..MAX_STREAMS_LIMIT)
    root: Path = field(default=Path("."), compare=False, repr=False)

    @property
    def audio_channels(self) -> int:
        return len(self.delays)

    @property
    def max_delay(self) -> int:
        return max(self.delays, default=0)

    @property
    def frame_rate(self) -> float:
        return self.codec.frame_rate

    @property
    def sample_rate(self) -> int:
        return self.codec.sample_rate

    @property
    def samples_per_frame(self) -> int:
        return self.codec.samples_per_frame

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / self.tokenizer.directory

    def graph(self, name: str) -> GraphSpec:
        if name not in self.graphs:
            raise ArtifactError(f"{self.root / MANIFEST}: no graph {name!r}")
        return self.graphs[name]

    def with_engine(self, name: str, engine: EngineEntry | None) -> Manifest:
        """A copy with graph ``name``'s engine entry replaced."""
        return replace(self, graphs={**self.graphs, name: replace(self.graph(name), engine=engine)})

    @classmethod
    def from_json(cls, d: dict, root: str | Path = Path(".")) -> Manifest:
        """Parse (types and names only: ``artifacts.load_manifest`` checks values and files)."""
        root = Path(root)
        if d.get("format") != FORMAT:
            raise ArtifactError(f"not a dia2-trt artifact manifest (format {d.get('format')!r})")
        if d.get("version") != VERSION:
            raise ArtifactError(f"manifest version {d.get('version')!r} is not supported (this runtime reads "
                                f"version {VERSION}, graphs with a streams axis); rebuild the artifacts: "
                                f"{REBUILD}")
        unknown = sorted(set(d["graphs"]) - set(GRAPH_NAMES))
        if unknown:
            raise ArtifactError(f"unknown graph {unknown[0]!r} (known: {', '.join(GRAPH_NAMES)})")
        return cls(
            precision=_choice(d["precision"], PRECISIONS, "precision"), opset=_int(d["opset"], "opset"),
            topology=Topology.from_json(d["topology"]),
            token_ids=TokenIds(**{k: _int(v, f"token_ids.{k}") for k, v in dict(d["token_ids"]).items()}),
            delays=tuple(_int(x, "delays") for x in d["delays"]),
            second_stream_ahead=_int(d["second_stream_ahead"], "second_stream_ahead"),
            max_padding=_int(d["max_padding"], "max_padding"),
            max_context_steps=_int(d["max_context_steps"], "max_context_steps"),
            prefix_frames=_int(d["prefix_frames"], "prefix_frames"),
            cache_capacity=_int(d["cache_capacity"], "cache_capacity"),
            codec=CodecInfo.from_json(d["codec"]), tokenizer=TokenizerEntry.from_json(d["tokenizer"]),
            graphs={name: GraphSpec.from_json(name, g, root) for name, g in dict(d["graphs"]).items()},
            source=SourceInfo.from_json(d.get("source") or {}),
            tools={str(k): str(v) for k, v in dict(d.get("tools") or {}).items()},
            max_streams=_int(d["max_streams"], "max_streams"), root=root,
        )

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "precision": self.precision, "opset": self.opset,
            "max_streams": self.max_streams,
            "topology": self.topology.to_json(), "token_ids": {f.name: int(getattr(self.token_ids, f.name))
                                                               for f in fields(TokenIds)},
            "delays": list(self.delays), "second_stream_ahead": self.second_stream_ahead,
            "max_padding": self.max_padding, "max_context_steps": self.max_context_steps,
            "prefix_frames": self.prefix_frames, "cache_capacity": self.cache_capacity,
            "codec": self.codec.to_json(), "tokenizer": self.tokenizer.to_json(),
            "graphs": {name: g.to_json() for name, g in self.graphs.items()},
            "source": self.source.to_json(), "tools": dict(self.tools),
        }


# --- field parsing: a wrong type is one line naming the field -----------------------------------


def _dims(d: Any, graph: str) -> dict[str, int]:
    if not isinstance(d, dict):
        raise ArtifactError(f"graphs.{graph}.dims: expected an object, got {d!r}")
    return {str(k): _int(v, f"graphs.{graph}.dims.{k}") for k, v in d.items()}


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise ArtifactError(f"{where}: expected an integer, got {value!r}")
    return value


def _choice(value: Any, allowed: tuple[str, ...], where: str) -> str:
    if value not in allowed:
        raise ArtifactError(f"{where}: {value!r} is not one of {', '.join(allowed)}")
    return str(value)


def _sha(value: Any, where: Any) -> str:
    text = str(value)
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ArtifactError(f"{where}: sha256 {text[:80]!r} is not a hex digest")
    return text


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}
