"""What the runtime feeds its graphs over real scripts, and replaying it through any artifact.

``record`` lets the torch-free runtime speak each script over fp32 artifacts and
keeps the per-step inputs that are not state: the backbone's step tokens and the
depformer's text tokens. The KV cache is state, so it is not stored: ``Replay``
rebuilds it by running a backbone over the recorded tokens. A 2B sample is then
a few hundred bytes instead of a 0.9 GB cache copy (28 layers x K,V x [2, 8, 1501,
128] fp32), and any artifact (fp32, fp16, quantized) can be driven teacher-forced
through the same steps, with intermediate tensors exposed on request. Calibration observes
activation ranges through it; ``validate --against`` (accuracy.py) compares precisions with it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from dia2_trt.runtime import Dia2Runtime, TruncationWarning
from dia2_trt.runtime.artifacts import GraphSpec, Manifest, cache_name, load_manifest
from dia2_trt.runtime.backends import Graph, OrtBackend
from dia2_trt.runtime.manifest import BACKBONE, DEPFORMER, STREAM_ROWS, STREAMS
from dia2_trt.runtime.params import GenerationParams


@dataclass(frozen=True)
class Trace:
    """One spoken script, step by step."""

    script: str
    tokens: np.ndarray  # [T, 2, C] backbone step tokens (CFG pair)
    text_tokens: np.ndarray  # [T, 2] (main, second) fed to the depformer
    audio_tokens: np.ndarray  # [T, Q] what the recorded run's depformer produced (-1 before first_live)
    # Steps before this one wrote columns inside every codebook's delay: the runtime skipped their
    # depformer (dead work), so the recorded run has no audio tokens there to compare with.
    first_live: int = 0

    @property
    def steps(self) -> int:
        return len(self.tokens)


class _Recorder:
    """A loaded graph whose bindings keep copies of some feeds and outputs of every run."""

    def __init__(self, inner, feeds: tuple[str, ...], outputs: tuple[str, ...]) -> None:
        self._inner, self._feeds, self._outputs = inner, feeds, outputs
        self.spec: GraphSpec = inner.spec
        self.concurrent = inner.concurrent
        self.calls: list[dict[str, np.ndarray]] = []

    def binding(self) -> _RecordingBinding:
        return _RecordingBinding(self._inner.binding(), self)


class _RecordingBinding:
    def __init__(self, inner, recorder: _Recorder) -> None:
        self._inner, self._recorder = inner, recorder
        self.spec, self.resizable = inner.spec, inner.resizable

    def __getattr__(self, name):  # the rest of the binding's interface (bind, write_rows, set_dims...) as is
        return getattr(self._inner, name)

    def run(self, feeds):
        out = self._inner.run(feeds)
        r = self._recorder
        kept = {k: np.array(feeds[k]) for k in r._feeds}
        kept.update({k: np.array(out[k]) for k in r._outputs})
        r.calls.append(kept)
        return out


class _RecordingBackend(OrtBackend):
    _KEEP = {BACKBONE: (("tokens",), ()), DEPFORMER: (("text_tokens",), ("audio_tokens",))}

    def __init__(self, threads: int | None = None) -> None:
        super().__init__(threads)
        self.recorders: dict[str, _Recorder] = {}

    def load(self, spec: GraphSpec) -> Graph:
        graph = super().load(spec)
        if spec.name not in self._KEEP:
            return graph
        self.recorders[spec.name] = recorder = _Recorder(graph, *self._KEEP[spec.name])
        return cast(Graph, recorder)  # a Graph by its attributes (spec, concurrent, binding)


def record(artifacts: Path, scripts: Sequence[str], params: GenerationParams,
           threads: int | None = None) -> list[Trace]:
    """Speak every script with the runtime and return what its graphs were fed."""
    backend = _RecordingBackend(threads)
    runtime = Dia2Runtime.load(artifacts, backend, max_streams=1)  # each script's calls in this thread
    traces = []
    for script in scripts:
        for recorder in backend.recorders.values():
            recorder.calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TruncationWarning)  # a cut-off script still calibrates
            runtime.speak(script, params)
        bb, dep = backend.recorders[BACKBONE].calls, backend.recorders[DEPFORMER].calls
        traces.append(_trace(script, [_one_stream(c["tokens"], 2) for c in bb],
                             [_one_stream(c["text_tokens"], 1)[0] for c in dep],
                             [_one_stream(c["audio_tokens"], 1)[0] for c in dep]))
    return traces


def _trace(script: str, tokens: list, text: list, audio: list) -> Trace:
    """A trace from one run's calls. The depformer ran for the last steps only (the first ones'
    columns were dead): their text tokens are the next step's (row 0 of the backbone's step tokens
    carries the previous frame's main and second text tokens), their audio tokens unknown (-1)."""
    dead = len(tokens) - len(text)
    lead = [tokens[min(t + 1, len(tokens) - 1)][0, :2] for t in range(dead)]
    q = audio[0].shape[0] if audio else tokens[0].shape[1] - 2
    return Trace(script, np.stack(tokens), np.stack([*lead, *text]).astype(np.int64),
                 np.concatenate([np.full((dead, q), -1, np.int64), np.asarray(audio, np.int64).reshape(-1, q)]),
                 first_live=dead)


def _one_stream(value: np.ndarray, rows: int) -> np.ndarray:
    """A recorded feed or output of a one-stream call (``rows`` rows a stream): one script is spoken at a time."""
    value = np.asarray(value)
    if value.shape[0] != rows:
        raise ValueError(f"recorded a call of {value.shape[0] // rows} streams; the recorder speaks one at a time")
    return value


# --- replay ------------------------------------------------------------------


@dataclass(frozen=True)
class StepOutputs:
    backbone: dict[str, np.ndarray]  # the graph's outputs plus any requested intermediates
    depformer: dict[str, np.ndarray]


class Replay:
    """One artifact's backbone and depformer as plain ONNX Runtime sessions with their own KV cache.

    ``extra`` names intermediate tensors per graph to return as well (the graph is
    re-saved with them as outputs, into ``workdir``; weights in a side file are
    hard-linked, not copied, except a looped graph's: see _with_outputs).
    """

    def __init__(self, artifacts: Path, extra: Mapping[str, Sequence[str]] | None = None,
                 workdir: Path | None = None, threads: int | None = None) -> None:
        self.manifest: Manifest = load_manifest(artifacts)
        extra = extra or {}
        self._tmp = tempfile.TemporaryDirectory(prefix=".replay-", dir=workdir)
        backend = OrtBackend(threads)
        self.sessions, self.outputs = {}, {}
        for name in (BACKBONE, DEPFORMER):
            spec = self.manifest.graph(name)
            path = _with_outputs(spec.path, extra.get(name, ()), Path(self._tmp.name))
            # The runtime's own session options (threads, a weight-only graph's ORT accuracy level).
            self.sessions[name] = backend.open_session(spec, path)
            self.outputs[name] = [t.name for t in spec.outputs] + list(extra.get(name, ()))
        bb = self.manifest.graph(BACKBONE)
        # One stream, at full capacity: a replay is teacher-forced over few steps, where a growing
        # cache saves little.
        one = {**bb.dims, STREAMS: 1, STREAM_ROWS: 2}
        self._cache = {t.name: t.bounded(one).zeros() for t in bb.inputs if t.name.startswith(("k_cache.", "v_cache."))}
        self._dtypes = {g: {t.name: t.dtype for t in self.manifest.graph(g).inputs} for g in (BACKBONE, DEPFORMER)}

    def close(self) -> None:
        self.sessions.clear()
        self._tmp.cleanup()

    def run(self, trace: Trace, params: GenerationParams, extra_at=lambda t: True) -> Iterator[StepOutputs]:
        """Teacher-forced: the recorded tokens go in, whatever this artifact computes comes out.

        ``extra_at(t)`` says whether step t also returns the intermediate tensors.
        The depformer samples greedily (temperature 0) with the run's guidance settings.
        """
        n_layer = self.manifest.topology.n_layer
        for buf in self._cache.values():
            buf.fill(0)  # rows past t are masked, but a clean start keeps runs reproducible
        for t in range(trace.steps):
            want = extra_at(t)
            step = {"tokens": trace.tokens[t], "position": np.array([t]), "cache_length": np.array([t])}
            bb = self._run(BACKBONE, {**step, **self._cache}, want)
            for i in range(n_layer):
                self._cache[cache_name("k", i)][:, :, t] = bb["k_new"][i]
                self._cache[cache_name("v", i)][:, :, t] = bb["v_new"][i]
            dep = self._run(DEPFORMER, {
                "hidden": bb["hidden"], "cb0_logits": bb["cb0_logits"], "text_tokens": trace.text_tokens[t][None],
                "noise": np.full((1, self.manifest.audio_channels), 0.5),
                "temperature": np.array([0.0]), "top_k": np.array([params.audio_top_k]),
                "cfg_scale": np.array([params.cfg_scale]), "cfg_filter_k": np.array([params.cfg_filter_k]),
            }, want)
            dep["audio_tokens"] = dep["audio_tokens"][0]  # the one stream's [Q]
            yield StepOutputs(bb, dep)

    def _run(self, graph: str, feeds: dict, want_extra: bool) -> dict[str, np.ndarray]:
        dtypes = self._dtypes[graph]
        feeds = {k: np.asarray(v, dtype=dtypes[k]) for k, v in feeds.items()}
        names = self.outputs[graph] if want_extra else [t.name for t in self.manifest.graph(graph).outputs]
        return dict(zip(names, self.sessions[graph].run(names, feeds)))


def _with_outputs(path: Path, names: Sequence[str], workdir: Path) -> Path:
    """``path`` itself, or a copy of its graph with ``names`` added as outputs."""
    if not names:
        return path
    import onnx
    from onnx import helper

    from .unroll import unroll_loops

    model = onnx.load(str(path), load_external_data=False)
    # A Loop's stages cannot show their values as outputs: lay them out, computing as the Loop does.
    looped = unroll_loops(model, copy_quantized=True)
    present = {o.name for o in model.graph.output}
    # No type given: ONNX Runtime infers it (fp16 graphs have fp16 intermediates).
    model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n not in present)
    out = workdir / path.name
    onnx.save_model(model, str(out))
    for location in _external_files(model):
        # ONNX Runtime refuses a Loop body's weights from a data file with a second hard link (a
        # "hardlink attack"): linking the looped graph's file would break the artifact for every
        # other process while this one runs (or for good, if it is killed). Copy that one.
        (shutil.copyfile if looped else _link)(path.parent / location, workdir / location)
    return out


def _external_files(model) -> set[str]:
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    return {ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)}


def _link(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    try:
        os.link(src, dst)  # same file system: no copy, and ONNX Runtime sees a plain file
    except OSError:
        os.symlink(src.resolve(), dst)
