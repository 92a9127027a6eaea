"""The artifact directory: manifest.json, the graphs it lists, the tokenizer.

This is the runtime's only description of the model; it never reads the
checkpoint's config or Python code. Everything wrong with a directory is an
``ArtifactError`` with a one-line message naming the file at fault.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .state_machine import TokenIds

FORMAT = "dia2-trt-artifacts"
VERSION = 1
MANIFEST = "manifest.json"
# Graphs the generation loop cannot run without (the codec encoder is only for voice prompts).
REQUIRED_GRAPHS = ("backbone", "depformer", "codec_decoder")
_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


class ArtifactError(ValueError):
    """An artifact directory the runtime cannot use."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # a str is a dynamic axis
    dtype: np.dtype

    @property
    def static(self) -> bool:
        return all(isinstance(dim, int) for dim in self.shape)

    def zeros(self) -> np.ndarray:
        if not self.static:
            raise ArtifactError(f"{self.name}: no static shape to allocate ({list(self.shape)})")
        return np.zeros(self.shape, dtype=self.dtype)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    path: Path
    sha256: str | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    state: tuple[tuple[str, str], ...] = ()  # (input, output) pairs carried from one run to the next
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def input(self, name: str) -> TensorSpec:
        return _find(self.inputs, name, self.name, "input")

    def output(self, name: str) -> TensorSpec:
        return _find(self.outputs, name, self.name, "output")


def _find(specs: tuple[TensorSpec, ...], name: str, graph: str, kind: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise ArtifactError(f"graph {graph!r} has no {kind} {name!r}")


@dataclass(frozen=True)
class Manifest:
    root: Path
    precision: str
    opset: int
    topology: dict[str, Any]
    token_ids: TokenIds
    delays: tuple[int, ...]
    second_stream_ahead: int
    max_padding: int
    max_context_steps: int
    cache_capacity: int
    frame_rate: float
    sample_rate: int
    samples_per_frame: int
    tokenizer_dir: Path
    graphs: dict[str, GraphSpec]
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def audio_channels(self) -> int:
        return len(self.delays)

    @property
    def max_delay(self) -> int:
        return max(self.delays, default=0)

    def graph(self, name: str) -> GraphSpec:
        if name not in self.graphs:
            raise ArtifactError(f"{self.root / MANIFEST}: no graph {name!r}")
        return self.graphs[name]

    def verify_checksums(self) -> None:
        """Hash every graph file against the manifest (seconds for the 2B; not done on every load)."""
        for spec in self.graphs.values():
            if spec.sha256 and sha256(spec.path) != spec.sha256:
                raise ArtifactError(f"{spec.path}: checksum mismatch (corrupt or replaced file)")
            extra = spec.raw.get("external_data") or {}
            if extra.get("sha256") and sha256(spec.path.parent / extra["file"]) != extra["sha256"]:
                raise ArtifactError(f"{spec.path.parent / extra['file']}: checksum mismatch")


def load_manifest(directory: str | Path) -> Manifest:
    root = Path(directory)
    if not root.is_dir():
        raise ArtifactError(f"artifact directory not found: {root}")
    path = root / MANIFEST
    raw = _read_json(path)
    where = str(path)
    if raw.get("format") != FORMAT:
        raise ArtifactError(f"{where}: not a dia2-trt artifact manifest (format {raw.get('format')!r})")
    if raw.get("version") != VERSION:
        raise ArtifactError(f"{where}: manifest version {raw.get('version')!r} is not supported "
                            f"(this runtime reads version {VERSION}); rebuild the artifacts")
    try:
        manifest = _parse(root, raw)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ArtifactError):
            raise
        detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ArtifactError(f"{where}: malformed manifest ({detail})") from None
    _check_consistency(manifest, where)
    return manifest


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} not found: not an artifact directory (build one with dia2-export build)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: corrupt manifest ({exc})") from None
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read ({exc.strerror})") from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path}: corrupt manifest (not a JSON object)")
    return raw


def _parse(root: Path, raw: dict[str, Any]) -> Manifest:
    return Manifest(
        root=root,
        precision=str(raw["precision"]),
        opset=int(raw["opset"]),
        topology=dict(raw["topology"]),
        token_ids=TokenIds(**{k: int(v) for k, v in raw["token_ids"].items()}),
        delays=tuple(int(d) for d in raw["delays"]),
        second_stream_ahead=int(raw["second_stream_ahead"]),
        max_padding=int(raw["max_padding"]),
        max_context_steps=int(raw["max_context_steps"]),
        cache_capacity=int(raw["cache_capacity"]),
        frame_rate=float(raw["frame_rate"]),
        sample_rate=int(raw["sample_rate"]),
        samples_per_frame=int(raw["samples_per_frame"]),
        tokenizer_dir=root / str(raw["tokenizer"]),
        graphs={name: _graph(root, name, entry) for name, entry in dict(raw["graphs"]).items()},
        raw=raw,
    )


def _graph(root: Path, name: str, entry: dict[str, Any]) -> GraphSpec:
    return GraphSpec(
        name=name,
        path=root / str(entry["file"]),
        sha256=entry.get("sha256"),
        inputs=tuple(_tensor(t) for t in entry["inputs"]),
        outputs=tuple(_tensor(t) for t in entry["outputs"]),
        state=tuple(_pair(p) for p in entry.get("state", ())),
        raw=entry,
    )


def _tensor(entry: dict[str, Any]) -> TensorSpec:
    dtype = str(entry["dtype"])
    if dtype not in _DTYPES:
        raise ArtifactError(f"tensor {entry['name']!r}: unsupported dtype {dtype!r}")
    shape = tuple(d if isinstance(d, str) else int(d) for d in entry["shape"])
    return TensorSpec(str(entry["name"]), shape, np.dtype(_DTYPES[dtype]))


def _pair(pair: Any) -> tuple[str, str]:
    # The exporters write {"input": ..., "output": ...}; a two-item list means the same.
    if isinstance(pair, dict):
        return str(pair["input"]), str(pair["output"])
    source, target = pair
    return str(source), str(target)


def _check_consistency(m: Manifest, where: str) -> None:
    for name in REQUIRED_GRAPHS:
        if name not in m.graphs:
            raise ArtifactError(f"{where}: graph {name!r} is missing")
    for spec in m.graphs.values():
        if not spec.path.is_file():
            raise ArtifactError(f"{spec.path}: graph file missing (listed in {MANIFEST})")
        extra = spec.raw.get("external_data")
        if extra and not (spec.path.parent / extra["file"]).is_file():
            raise ArtifactError(f"{spec.path.parent / extra['file']}: weights file missing (listed in {MANIFEST})")
    if not (m.tokenizer_dir / "tokenizer.json").is_file():
        raise ArtifactError(f"{m.tokenizer_dir / 'tokenizer.json'}: tokenizer missing")
    if m.cache_capacity < m.max_context_steps + 1:
        raise ArtifactError(f"{where}: cache_capacity {m.cache_capacity} < max_context_steps + 1")
    _check_backbone(m, where)
    _check_depformer(m, where)


def _check_backbone(m: Manifest, where: str) -> None:
    g = m.graph("backbone")
    channels = g.input("tokens").shape
    if channels != (2, 2 + m.audio_channels):
        raise ArtifactError(f"{where}: backbone tokens {list(channels)} do not match {m.audio_channels} delays")
    n_layer = int(m.topology["n_layer"])
    cache = g.input(cache_name("k", 0)).shape
    if len(cache) != 4 or cache[2] != m.cache_capacity:
        raise ArtifactError(f"{where}: backbone cache shape {list(cache)} does not match capacity {m.cache_capacity}")
    for i in range(n_layer):
        for kind in ("k", "v"):
            if g.input(cache_name(kind, i)).shape != cache:
                raise ArtifactError(f"{where}: backbone {cache_name(kind, i)} differs from {cache_name('k', 0)}")
    expected_new = (n_layer, *cache[:2], cache[3])
    for name in ("k_new", "v_new"):
        if g.output(name).shape != expected_new:
            raise ArtifactError(f"{where}: backbone {name} {list(g.output(name).shape)} != {list(expected_new)}")
    for spec in g.inputs + g.outputs:
        if not spec.static:
            raise ArtifactError(f"{where}: backbone {spec.name} has a dynamic shape {list(spec.shape)}")


def cache_name(kind: str, layer: int) -> str:
    """The backbone's per-layer cache inputs: ``k_cache.0``, ``v_cache.0``, ..."""
    return f"{kind}_cache.{layer}"


def _check_depformer(m: Manifest, where: str) -> None:
    g = m.graph("depformer")
    noise = g.input("noise")
    vocab = int(m.topology["audio_vocab_size"])
    if noise.shape != (m.audio_channels, vocab) or noise.dtype != np.float32:
        raise ArtifactError(f"{where}: depformer noise must be float32 [{m.audio_channels}, {vocab}], "
                            f"got {noise.dtype} {list(noise.shape)}")
    if g.output("audio_tokens").shape != (m.audio_channels,):
        raise ArtifactError(f"{where}: depformer audio_tokens {list(g.output('audio_tokens').shape)} "
                            f"!= [{m.audio_channels}]")
    for spec in g.inputs + g.outputs:
        if not spec.static:
            raise ArtifactError(f"{where}: depformer {spec.name} has a dynamic shape {list(spec.shape)}")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
