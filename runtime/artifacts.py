"""The artifact directory: manifest.json, the graphs it lists, the tokenizer.

This is the runtime's only description of the model; it never reads the
checkpoint's config or Python code, nor any file outside the directory.
``load_manifest`` parses the typed manifest (manifest.py), then refuses a
directory whose paths leave it, whose values are out of range or disagree with
the graphs' own declared I/O, or whose files fail their checksums. Everything
wrong is an ``ArtifactError`` with a one-line message naming the file or field.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from dataclasses import fields
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import first_line
from .files import InputFileError, open_regular, parse_json, read_json_file, read_regular, write_atomic
from .graph_io import GraphFormatError, read_io
from .manifest import (  # noqa: F401  (the names the runtime has always imported from here)
    ACTIVE,
    BACKBONE,
    BACKEND_NAMES,
    CACHE_ROWS,
    CODEC_DECODER,
    DEPFORMER,
    FORMAT,
    GRAPH_NAMES,
    MANIFEST,
    MAX_STREAMS_LIMIT,
    PRECISIONS,
    REQUIRED_GRAPHS,
    STREAM_ROWS,
    STREAMS,
    VERSION,
    ArtifactError,
    CodecInfo,
    EngineEntry,
    FileRef,
    GraphSpec,
    Manifest,
    QuantizationRecord,
    StatePair,
    TensorSpec,
    TokenizerEntry,
    Topology,
    cache_name,
    state_names,
)

# Files up to this size are hashed on every load (~30 ms at ~2 GB/s); bigger ones once per
# (size, mtime, ctime, inode), remembered in STAMP. ctime cannot be set back by a user, so a file
# replaced or edited in place, even with its mtime restored, is hashed again.
CHEAP_BYTES = 64 << 20
STAMP = ".verified.json"
# A manifest is tens of kB (the 2B's, with a cache input per layer); the stamps a line per big file.
MAX_MANIFEST_BYTES = 16 << 20
MAX_STAMP_BYTES = 1 << 20
# Bounds on the values the runtime sizes buffers and loops by, far past any Dia2 (the 2B: 1501 cache
# rows, 32 codebooks, a 49280-token vocabulary, 24 kHz): a manifest past them is refused in one line
# before anything is allocated from it, instead of failing (or swapping) deep inside numpy.
MAX_COUNT = 1 << 20  # any count or size: layers, heads, widths, vocabularies, delays, graph axes
MAX_FRAMES = 1 << 16  # context, prefix and cache rows: 87 minutes at 12.5 Hz (the 2B's context is 2)
MAX_SAMPLE_RATE = 384_000
MAX_RANK = 8
# One stream's share of the graph buffers at their bounds (the bindings allocate them all for
# max_streams streams; the 2B's are ~1 GB a stream, 0.69 GB of it the KV cache): room for 10x the 2B's
# context, not for a manifest that asks for 10^12.
MAX_BUFFER_BYTES = 8 << 30
_TEXT_IDS = ("new_word", "pad", "bos", "zero", "spk1", "spk2")
_AUDIO_IDS = ("audio_pad", "audio_bos")


def load_manifest(directory: str | Path, *, verify: bool = True) -> Manifest:
    """Parse and check ``directory/manifest.json``; ``verify`` also checks every file's sha256."""
    root = Path(directory)
    if not root.is_dir():
        raise ArtifactError(f"artifact directory not found: {root}")
    path = root / MANIFEST
    where = str(path)
    raw = _read_json(path)
    try:
        manifest = Manifest.from_json(raw, root)
    except ArtifactError as exc:
        raise ArtifactError(f"{where}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        detail = f"missing field {exc}" if isinstance(exc, KeyError) else first_line(exc)
        raise ArtifactError(f"{where}: malformed manifest ({detail})") from None
    contain_paths(manifest)
    _check_files(manifest)
    check_values(manifest)
    if verify:  # before reading the graphs: a corrupt file is named as such, not as a strange graph
        verify_checksums(manifest)
    _check_graph_io(manifest)
    return manifest


def _read_json(path: Path) -> dict[str, Any]:
    if not os.path.lexists(path):
        raise ArtifactError(f"{path} not found: not an artifact directory (build one with dia2-export build)")
    try:
        data = read_regular(path, MAX_MANIFEST_BYTES, "manifest")
    except InputFileError as exc:
        raise ArtifactError(str(exc)) from None
    try:
        raw = parse_json(data, str(path), nonfinite=True)  # check_values names a non-finite field
    except InputFileError as exc:
        raise ArtifactError(f"corrupt manifest: {exc}") from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path}: corrupt manifest (not a JSON object)")
    return raw


# --- containment --------------------------------------------------------------------------------


def named_paths(m: Manifest) -> list[tuple[str, str]]:
    """(field, relative path) for every file or folder the manifest names."""
    named = [("tokenizer.directory", m.tokenizer.directory)]
    named += [(f"tokenizer.files.{name}", f"{m.tokenizer.directory}/{name}") for name in m.tokenizer.files]
    for name, g in m.graphs.items():
        named.append((f"graphs.{name}.file", g.file))
        if g.external_data:
            named.append((f"graphs.{name}.external_data.file", g.external_data.file))
        if g.engine:
            named.append((f"graphs.{name}.engine.file", g.engine.file))
    return named


def contain_paths(m: Manifest) -> None:
    """Every path the manifest names is relative, has no '..', and resolves (symlinks followed) inside
    the artifact directory: an artifact from elsewhere must not make the runtime read other files."""
    root = m.root.resolve()
    for where, text in named_paths(m):
        rel = PurePosixPath(text)
        if not text or rel.is_absolute() or ".." in rel.parts or "\\" in text or ":" in text:
            raise ArtifactError(f"{m.root / MANIFEST}: {where} {text!r} is not a path inside the artifact directory")
        if not (root / rel).resolve().is_relative_to(root):
            raise ArtifactError(f"{m.root / MANIFEST}: {where} {text!r} leads outside the artifact directory "
                                f"(symbolic link)")


def _check_files(m: Manifest) -> None:
    for name in REQUIRED_GRAPHS:
        if name not in m.graphs:
            raise ArtifactError(f"{m.root / MANIFEST}: graph {name!r} is missing")
    for spec in m.graphs.values():
        _need_file(spec.path, "graph file")
        if spec.external_data_path is not None:
            _need_file(spec.external_data_path, "weights file")
    for name in m.tokenizer.files:
        _need_file(m.tokenizer_dir / name, "tokenizer file")
    if "tokenizer.json" not in m.tokenizer.files:
        raise ArtifactError(f"{m.root / MANIFEST}: tokenizer.files lists no tokenizer.json")


def _need_file(path: Path, what: str) -> None:
    """A listed file must be a regular file: a FIFO or device would block or never end a reader."""
    try:
        mode = path.stat().st_mode
    except OSError:
        raise ArtifactError(f"{path}: {what} missing (listed in {MANIFEST})") from None
    if not stat.S_ISREG(mode):
        raise ArtifactError(f"{path}: {what} is not a regular file (a directory, device, pipe or socket)")


# --- values -------------------------------------------------------------------------------------


def check_values(m: Manifest) -> None:
    """Ranges and cross-field consistency; graph shapes are compared in _check_graph_io."""
    where = f"{m.root / MANIFEST}"

    def need(ok: bool, field_name: str, message: str) -> None:
        if not ok:
            raise ArtifactError(f"{where}: {field_name} {message}")

    _check_bounds(m, need)
    t, c = m.topology, m.codec
    for f in fields(Topology):
        value = getattr(t, f.name)
        if isinstance(value, int):
            need(value >= 1, f"topology.{f.name}", f"must be >= 1, got {value}")
    need(t.channels == t.audio_channels + 2, "topology.channels", f"{t.channels} != audio_channels + 2")
    need(len(m.delays) == t.audio_channels, "delays", f"has {len(m.delays)} entries for {t.audio_channels} "
                                                     "audio channels")
    for i, delay in enumerate(m.delays):
        need(delay >= 1, f"delays[{i}]", f"must be >= 1, got {delay}")
    for name in _TEXT_IDS:
        _need_id(m, name, t.text_vocab_size, "text_vocab_size")
    for name in _AUDIO_IDS:
        _need_id(m, name, t.audio_vocab_size, "audio_vocab_size")
    need(math.isfinite(c.frame_rate) and c.frame_rate > 0, "codec.frame_rate", f"must be > 0, got {c.frame_rate}")
    need(c.sample_rate > 0, "codec.sample_rate", f"must be > 0, got {c.sample_rate}")
    need(c.samples_per_frame > 0 and abs(c.samples_per_frame * c.frame_rate - c.sample_rate) < 1e-6 * c.sample_rate,
         "codec.samples_per_frame", f"{c.samples_per_frame} != sample_rate / frame_rate "
                                    f"({c.sample_rate} / {c.frame_rate})")
    need(c.num_quantizers == t.audio_channels, "codec.num_quantizers", f"{c.num_quantizers} != the "
                                                                      f"{t.audio_channels} audio channels")
    need(1 <= c.codebook_size <= t.audio_vocab_size, "codec.codebook_size",
         f"{c.codebook_size} is not in [1, audio_vocab_size {t.audio_vocab_size}]")
    need(m.second_stream_ahead >= 0, "second_stream_ahead", f"must be >= 0, got {m.second_stream_ahead}")
    need(m.max_padding >= 0, "max_padding", f"must be >= 0, got {m.max_padding}")
    need(m.max_context_steps >= 1, "max_context_steps", f"must be >= 1, got {m.max_context_steps}")
    need(m.prefix_frames >= 0, "prefix_frames", f"must be >= 0, got {m.prefix_frames}")
    need(m.cache_capacity == m.max_context_steps + 1 + m.prefix_frames, "cache_capacity",
         f"{m.cache_capacity} != max_context_steps + 1 + prefix_frames")
    _check_streams(m, need)


def _check_streams(m: Manifest, need) -> None:
    """max_streams in 1..MAX_STREAMS_LIMIT, and every graph's streams axes bounded by it."""
    need(1 <= m.max_streams <= MAX_STREAMS_LIMIT, "max_streams",
         f"must be in [1, {MAX_STREAMS_LIMIT}], got {m.max_streams}")
    for name, g in m.graphs.items():
        for axis, bound in ((STREAMS, m.max_streams), (STREAM_ROWS, 2 * m.max_streams)):
            if axis in g.dims:
                need(g.dims[axis] == bound, f"graphs.{name}.dims.{axis}",
                     f"{g.dims[axis]} != {bound} (max_streams {m.max_streams})")


def _check_bounds(m: Manifest, need) -> None:
    """Every count within MAX_COUNT (frames within MAX_FRAMES), and one session's buffers within
    MAX_BUFFER_BYTES, before any other check does arithmetic with them."""
    t, c = m.topology, m.codec
    counts = [(f"topology.{f.name}", getattr(t, f.name)) for f in fields(Topology)]
    counts += [(f"topology.depformer.{f.name}", getattr(t.depformer, f.name)) for f in fields(type(t.depformer))]
    counts += [(f"topology.depformer.weights_schedule[{i}]", w) for i, w in enumerate(t.depformer.weights_schedule)]
    counts += [(f"delays[{i}]", d) for i, d in enumerate(m.delays)]
    counts += [("opset", m.opset), ("second_stream_ahead", m.second_stream_ahead), ("max_padding", m.max_padding),
               ("codec.samples_per_frame", c.samples_per_frame), ("codec.num_quantizers", c.num_quantizers),
               ("codec.codebook_size", c.codebook_size)]
    for where, value in counts:
        if isinstance(value, int) and not isinstance(value, bool):
            need(abs(value) <= MAX_COUNT, where, f"{value} is past the bound {MAX_COUNT}")
    need(len(m.delays) <= MAX_COUNT, "delays", f"has {len(m.delays)} entries")
    for where in ("max_context_steps", "prefix_frames", "cache_capacity"):
        value = getattr(m, where)
        need(abs(value) <= MAX_FRAMES, where, f"{value} is past the bound {MAX_FRAMES} frames")
    need(abs(c.sample_rate) <= MAX_SAMPLE_RATE, "codec.sample_rate", f"{c.sample_rate} is past {MAX_SAMPLE_RATE} Hz")
    total = 0
    for name, g in m.graphs.items():
        for axis, bound in g.dims.items():
            need(1 <= bound <= MAX_COUNT, f"graphs.{name}.dims.{axis}", f"{bound} is not in [1, {MAX_COUNT}]")
        for kind, tensors in (("inputs", g.inputs), ("outputs", g.outputs)):
            for tensor in tensors:
                total += _tensor_bytes(tensor.bounded(g.dims), f"graphs.{name}.{kind}.{tensor.name}", need)
    streams = max(1, min(m.max_streams, MAX_STREAMS_LIMIT))  # range-checked in _check_streams
    need(total <= MAX_BUFFER_BYTES * streams, "graphs",
         f"need {total / streams / 2**30:.3g} GiB of buffers per session at their bounds ({streams} stream(s): "
         f"{total / 2**30:.3g} GiB), past {MAX_BUFFER_BYTES / 2**30:.3g} GiB")


def _tensor_bytes(t: TensorSpec, where: str, need) -> int:
    """The bytes a binding allocates for ``t`` at its bounds (0 for an axis only known at run time)."""
    need(len(t.shape) <= MAX_RANK, where, f"has {len(t.shape)} axes (at most {MAX_RANK})")
    size = t.dtype.itemsize
    for dim in t.shape:
        if isinstance(dim, int):
            need(0 <= dim <= MAX_COUNT, where, f"axis {dim} is not in [0, {MAX_COUNT}]")
            size *= dim
    return size if t.static else 0


def _need_id(m: Manifest, name: str, vocab: int, vocab_name: str) -> None:
    value = getattr(m.token_ids, name)
    if not 0 <= value < vocab:
        raise ArtifactError(f"{m.root / MANIFEST}: token_ids.{name} {value} is outside [0, {vocab_name} {vocab})")


# --- the graphs' own I/O ------------------------------------------------------------------------


def _check_graph_io(m: Manifest) -> None:
    for spec in m.graphs.values():
        _same_io(spec)
    _check_backbone(m)
    _check_depformer(m)
    _check_codec(m)


def _same_io(spec: GraphSpec) -> None:
    """The manifest's I/O for a graph must be the graph file's own, name for name."""
    try:
        inputs, outputs = read_io(spec.path)
    except (GraphFormatError, InputFileError, OSError) as exc:
        raise ArtifactError(f"{spec.path}: not a readable ONNX graph ({exc})") from None
    for kind, declared, actual in (("inputs", spec.inputs, inputs), ("outputs", spec.outputs, outputs)):
        mine = {t.name: t.to_json() for t in declared}
        theirs = {t["name"]: t for t in actual}
        for name in sorted(mine.keys() | theirs.keys()):
            if mine.get(name) != theirs.get(name):
                raise ArtifactError(f"{spec.root / MANIFEST}: graphs.{spec.name}.{kind}.{name}: the manifest says "
                                    f"{_describe(mine.get(name))}, the graph {_describe(theirs.get(name))}")


def _describe(io: dict | None) -> str:
    return "nothing" if io is None else f"{io['dtype']} {io['shape']}"


def _fail(m: Manifest, message: str) -> None:
    raise ArtifactError(f"{m.root / MANIFEST}: {message}")


def _check_backbone(m: Manifest) -> None:
    g = m.graph(BACKBONE)
    if not g.fixed_shape:
        first, *more = [t for t in g.inputs + g.outputs if not t.bounded(g.dims).static]
        axes = sorted({d for t in (first, *more) for d in t.shape if isinstance(d, str) and d not in g.dims})
        _fail(m, f"graphs.backbone.{first.name} has an unbounded dynamic shape {list(first.shape)}"
                 + (f" (and {len(more)} more)" if more else "") + f": no bound for {', '.join(axes)} in its dims")
    channels = g.input("tokens").shape
    if channels != (STREAM_ROWS, 2 + m.audio_channels):
        _fail(m, f"graphs.backbone.inputs.tokens {list(channels)} is not [{STREAM_ROWS}, {2 + m.audio_channels}] "
                 f"({m.audio_channels} delays)")
    for name in ("position", "cache_length"):  # per stream: its RoPE position, its cache's valid rows
        if g.input(name).shape != (STREAMS,):
            _fail(m, f"graphs.backbone.inputs.{name} {list(g.input(name).shape)} is not [{STREAMS}]")
    cache = g.input(cache_name("k", 0)).shape
    if (len(cache) != 4 or cache[0] != STREAM_ROWS or cache[2] != CACHE_ROWS
            or g.dims.get(CACHE_ROWS) != m.cache_capacity):
        _fail(m, f"graphs.backbone.inputs.{cache_name('k', 0)} {list(cache)} (dims {g.dims}) does not take "
                 f"up to cache_capacity {m.cache_capacity} rows")
    for i in range(m.topology.n_layer):
        for kind in ("k", "v"):
            if g.input(cache_name(kind, i)).shape != cache:
                _fail(m, f"graphs.backbone.inputs.{cache_name(kind, i)} differs from {cache_name('k', 0)}")
    expected_new = (m.topology.n_layer, *cache[:2], cache[3])
    for name in ("k_new", "v_new"):
        if g.output(name).shape != expected_new:
            _fail(m, f"graphs.backbone.outputs.{name} {list(g.output(name).shape)} != {list(expected_new)}")
    if g.output("cb0_logits").shape[-1] != m.topology.audio_vocab_size:
        _fail(m, f"topology.audio_vocab_size {m.topology.audio_vocab_size} differs from the backbone's "
                 f"cb0_logits {list(g.output('cb0_logits').shape)}")
    if g.output("action_logits").shape[-1] != m.topology.action_vocab_size:
        _fail(m, f"topology.action_vocab_size {m.topology.action_vocab_size} differs from the backbone's "
                 f"action_logits {list(g.output('action_logits').shape)}")


def _check_depformer(m: Manifest) -> None:
    g = m.graph(DEPFORMER)
    for spec in g.inputs + g.outputs:
        if not spec.bounded(g.dims).static:
            _fail(m, f"graphs.depformer.{spec.name} has an unbounded dynamic shape {list(spec.shape)}")
    noise = g.input("noise")  # one uniform number per codebook and stream for the in-graph sampler
    if noise.shape != (STREAMS, m.audio_channels) or noise.dtype.name != "float32":
        _fail(m, f"graphs.depformer.inputs.noise must be float32 [{STREAMS}, {m.audio_channels}], "
                 f"got {noise.dtype} {list(noise.shape)}")
    if g.output("audio_tokens").shape != (STREAMS, m.audio_channels):
        _fail(m, f"graphs.depformer.outputs.audio_tokens {list(g.output('audio_tokens').shape)} "
                 f"!= [{STREAMS}, {m.audio_channels}]")


def _check_codec(m: Manifest) -> None:
    g = m.graph(CODEC_DECODER)
    state_in = {p.input for p in g.state}
    state_out = {p.output for p in g.state}
    for pair in g.state:  # both ends must exist
        g.input(pair.input)
        g.output(pair.output)
    # one stream (batch 1), or a streams axis with an ``active`` mask: the runtime drives either
    batch = STREAMS if STREAMS in g.dims else 1
    active = [t for t in g.inputs if t.name == ACTIVE]
    if (batch == STREAMS) != bool(active) or any(t.shape != (STREAMS,) or t.dtype.name != "bool" for t in active):
        _fail(m, f"graphs.codec_decoder: a decoder with a {STREAMS} axis takes {ACTIVE} bool [{STREAMS}], "
                 f"one without takes none")
    codes = [t for t in g.inputs if t.name not in state_in and t.name != ACTIVE]
    pcm = [t for t in g.outputs if t.name not in state_out]
    if len(codes) != 1 or codes[0].shape != (batch, m.codec.num_quantizers, 1):
        _fail(m, f"graphs.codec_decoder: expected one codes input [{batch}, {m.codec.num_quantizers}, 1] "
                 f"besides its state")
    if len(pcm) != 1 or pcm[0].shape != (batch, 1, m.codec.samples_per_frame):
        _fail(m, f"codec.samples_per_frame {m.codec.samples_per_frame} differs from the decoder's pcm output "
                 f"{[list(t.shape) for t in pcm]}")
    for t in g.inputs + g.outputs:
        if t.name in state_in | state_out and (not t.shape or t.shape[0] != batch):
            _fail(m, f"graphs.codec_decoder.{t.name} {list(t.shape)}: a state's leading axis must be {batch}")
    for t in g.inputs + g.outputs:
        if not t.bounded(g.dims).static:
            _fail(m, f"graphs.codec_decoder.{t.name} has an unbounded dynamic shape {list(t.shape)}")


# --- checksums ----------------------------------------------------------------------------------


def checked_files(m: Manifest) -> list[tuple[Path, str]]:
    """(path, sha256) of every file the runtime may read: graphs, external weights, tokenizer, and the
    engines that are present (an artifact copied to a CPU-only machine may leave them behind; the
    TensorRT backend says so when it needs one)."""
    files = [(m.tokenizer_dir / name, digest) for name, digest in m.tokenizer.files.items()]
    for g in m.graphs.values():
        files.append((g.path, g.sha256))
        if g.external_data and (data := g.external_data_path):
            files.append((data, g.external_data.sha256))
        if g.engine and (engine := g.engine_path) and engine.is_file():
            files.append((engine, g.engine.sha256))
    return files


def verify_checksums(m: Manifest) -> None:
    """Refuse a file whose sha256 differs from the manifest's (corrupt, truncated or replaced)."""
    stamps = _Stamps(m.root)
    for path, digest in checked_files(m):
        verify_file(path, digest, stamps)
    stamps.save()


def verify_file(path: Path, digest: str, stamps: _Stamps | None = None) -> None:
    """One file against its recorded sha256 (an engine, when a backend is about to load it)."""
    stat = path.stat()
    if stat.st_size <= CHEAP_BYTES:
        stamps = None  # a small file is hashed on every load (CHEAP_BYTES)
    if stamps is not None and stamps.matches(path, stat, digest):
        return
    if sha256(path) != digest:
        raise ArtifactError(f"{path}: checksum mismatch with {MANIFEST} (corrupt or replaced file); "
                            f"rebuild the artifacts, or pass --no-verify to load it anyway")
    if stamps is not None:
        stamps.record(path, stat, digest)


class _Stamps:
    """Big files already verified, keyed by what changes whenever their content can have changed.

    Kept in the artifact directory itself, so verification never reads or writes outside it; when
    the directory is read-only the stamps are not saved and big files are hashed on every load
    (seconds for the 2B; --no-verify skips it).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / STAMP
        self.entries: dict = {}
        if os.path.lexists(self.path):
            try:  # bounded, regular files only: a bad stamps file only costs a re-hash
                entries = read_json_file(self.path, MAX_STAMP_BYTES, "stamps file")
                self.entries = entries if isinstance(entries, dict) else {}
            except (InputFileError, OSError):
                pass
        self.changed = False

    @staticmethod
    def _key(stat: os.stat_result, digest: str) -> list:
        return [digest, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]

    def matches(self, path: Path, stat: os.stat_result, digest: str) -> bool:
        return self.entries.get(self._name(path)) == self._key(stat, digest)

    def record(self, path: Path, stat: os.stat_result, digest: str) -> None:
        self.entries[self._name(path)] = self._key(stat, digest)
        self.changed = True

    def _name(self, path: Path) -> str:
        return os.path.relpath(path, self.root)

    def save(self) -> None:
        if not self.changed or not os.access(self.path.parent, os.W_OK):
            return
        try:
            write_atomic(self.path, lambda tmp: Path(tmp).write_text(json.dumps(self.entries, indent=1) + "\n"))
        except OSError:
            pass  # a full or read-only disk only costs the next load a re-hash


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        f = open_regular(path, 1 << 62, "artifact file")  # no size bound: weights are GBs, read in blocks
    except InputFileError as exc:
        raise ArtifactError(str(exc)) from None
    with f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()

