"""Side-by-side performance of the PyTorch reference loop and the runtime's backends.

Every contender runs in its own worker process (``python -m
dia2_trt.benchmarks.harness WORKER_JSON``, or ``dia2_trt.benchmarks.reference_worker``
for the reference), loaded once, so its peak RSS is its
own (``ru_maxrss``) and no contender's allocations or caches flatter another.
The parent sends "run" requests to the workers in turn, rotating the order each
repeat, so machine noise is spread over all contenders alike. The reference
contender (torch) lives in ``dia2_trt.benchmarks.reference_worker`` and is started
by module name: this module imports neither torch, onnx nor export/.

Timing inside a worker: the graph calls are wrapped (the runtime is loaded on
a ``TimedBackend``, whose bindings time the backbone, depformer and codec
decoder runs; the reference's ``step_reference`` / ``stage_reference`` / Mimi
decode), so the split between
backbone, depformer, codec and host is measured inside a real generation.
A frame starts when its backbone call starts; host time is everything else
(sampling, the text state machine, buffer copies, Python).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from dia2_trt.runtime import Dia2Runtime, GenerationParams
from dia2_trt.runtime.artifacts import GraphSpec, Manifest, Topology, load_manifest
from dia2_trt.runtime.backends import Backend, Binding, Graph, create_backend

from . import node_profile

COMPONENTS = ("backbone", "depformer", "codec")
DEFAULT_TEXT = ("[S1] Hello there, how are you doing today? [S2] I'm fine, thanks for asking. "
                "[S1] We'll meet at 10 o'clock near the old station.")
BACKENDS = ("onnxruntime", "tensorrt")
_PROTOCOL = "@@bench "  # prefix of the worker's protocol lines: stray output cannot be mistaken for one


# --- contenders --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # "runtime" or "reference"
    source: str  # artifact directory (runtime) or checkpoint directory (reference)
    precision: str
    backend: str | None = None
    threads: int | None = None
    profile_dir: str | None = None  # runtime only: ORT per-node traces go here (node_profile)


def plan_contenders(artifacts: Iterable[Path], backends: Iterable[str], reference: str | None,
                    threads: int | None) -> tuple[list[Contender], list[dict]]:
    """The reference (if a checkpoint is given) plus every (artifacts, backend) pair that can run here.

    Returns (contenders, skipped), each skipped entry saying why.
    """
    contenders, skipped = [], []
    if reference is not None:
        reason = reference_unavailable()
        if reason:
            skipped.append({"contender": "reference", "reason": reason})
        else:
            contenders.append(Contender("reference", "reference", str(reference), "fp32", threads=threads))
    artifacts = list(artifacts)
    precisions = [load_manifest(directory, verify=False).precision for directory in artifacts]
    for backend in backends:
        reason = backend_unavailable(backend)
        for directory, precision in zip(artifacts, precisions):
            # two builds of one precision (before/after a change) are told apart by their directory
            name = f"{backend}-{precision if precisions.count(precision) == 1 else Path(directory).name}"
            if reason:
                skipped.append({"contender": name, "reason": reason})
            else:
                contenders.append(Contender(name, "runtime", str(directory), precision, backend, threads))
    return contenders, skipped


# Each contender kind's worker module, started by name: this process never imports torch or export/.
WORKER_MODULES = {"runtime": "dia2_trt.benchmarks.harness", "reference": "dia2_trt.benchmarks.reference_worker"}


def reference_unavailable() -> str | None:
    """Probe the reference worker's imports in a child, so torch never loads into this process."""
    probe = subprocess.run([sys.executable, "-c", f"import {WORKER_MODULES['reference']}"],
                           capture_output=True, text=True)
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
        return f"torch or the export extra is not installed ({last})"
    return None


def backend_unavailable(name: str) -> str | None:
    try:
        create_backend(name)
    except Exception as exc:  # missing packages, no GPU, no driver: each means "not here", with its reason
        return f"backend {name} cannot load here ({exc})"
    return None


# --- per-frame clock ---------------------------------------------------------------------------


class FrameCap(Exception):
    """Raised from a wrapped backbone call once the requested number of frames has run."""


@dataclass
class FrameClock:
    """Frame starts and time per component, in all and per frame; a capped run stops at the start of
    frame ``cap``. Work after the last frame (the reference's batch decode) counts in ``totals`` only."""

    cap: int = 0
    starts: list[float] = field(default_factory=list)
    stop: float | None = None
    totals: dict[str, float] = field(default_factory=dict)
    parts: list[dict[str, float]] = field(default_factory=list)  # per frame: seconds per component

    def reset(self, cap: int) -> None:
        self.cap, self.starts, self.stop, self.parts = cap, [], None, []
        self.totals = dict.fromkeys(COMPONENTS, 0.0)

    def frame(self) -> None:
        now = time.perf_counter()
        if len(self.starts) >= self.cap:
            self.stop = now
            raise FrameCap
        self.starts.append(now)
        self.parts.append(dict.fromkeys(COMPONENTS, 0.0))

    def end(self) -> None:
        """The last frame is over (called where the generation loop is known to have ended)."""
        if self.stop is None:
            self.stop = time.perf_counter()

    def timed(self, component: str, fn: Callable, starts_frame: bool = False) -> Callable:
        def wrapper(*args, **kwargs):
            if starts_frame:
                self.frame()
            began = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - began
                self.totals[component] += spent
                if self.parts and self.stop is None:
                    self.parts[-1][component] += spent
        return wrapper

    def frame_seconds(self) -> list[float]:
        """Start-to-start durations; the last frame only when its end is known."""
        marks = self.starts + ([self.stop] if self.stop is not None else [])
        return list(np.diff(marks)) if len(marks) > 1 else []

    def report(self, wall: float, samples: int, first_audio: float | None) -> dict:
        return {"frames": len(self.starts), "wall_seconds": wall, "samples": samples,
                "first_audio_seconds": first_audio, "frame_seconds": self.frame_seconds(),
                "component_seconds": dict(self.totals), "frame_parts": self.parts}


# --- the runtime contender (runs inside a worker) ----------------------------------------------


# The graph whose runs each component's time counts.
TIMED_GRAPHS = {"backbone": "backbone", "depformer": "depformer", "codec_decoder": "codec"}


class TimedBackend:
    """A backend whose bindings time their runs into ``clock``; a backbone run starts a frame."""

    def __init__(self, inner: Backend, clock: FrameClock) -> None:
        self.name, self._inner, self._clock = inner.name, inner, clock

    def load(self, spec: GraphSpec) -> _TimedGraph:
        return _TimedGraph(self._inner.load(spec), self._clock)


class _TimedGraph:
    def __init__(self, graph: Graph, clock: FrameClock) -> None:
        self.spec, self.concurrent, self._graph, self._clock = graph.spec, graph.concurrent, graph, clock

    def binding(self) -> Binding:
        return _TimedBinding(self._graph.binding(), self._clock, TIMED_GRAPHS.get(self.spec.name))


class _TimedBinding:
    def __init__(self, binding: Binding, clock: FrameClock, component: str | None) -> None:
        self.spec, self.resizable = binding.spec, binding.resizable
        self.bind, self.write_rows, self.reset_state = binding.bind, binding.write_rows, binding.reset_state
        self.set_dims = binding.set_dims
        self.run = clock.timed(component, binding.run, component == "backbone") if component else binding.run


class RuntimeSubject:
    def __init__(self, spec: Contender) -> None:
        self.clock = clock = FrameClock()
        assert spec.backend is not None  # plan_contenders names one for every runtime contender
        inner = create_backend(spec.backend, spec.threads)
        self.profiled = node_profile.profiled(inner, spec.profile_dir) if spec.profile_dir else None
        backend = TimedBackend(inner, clock)
        # The parent has verified the checksums already (or was told not to). One stream per session: the
        # session steps its graphs in this thread, where the clock's FrameCap can end it (a batch engine's
        # thread would take the exception for a failure of every stream).
        self.runtime = rt = Dia2Runtime.load(spec.source, backend=backend, verify=False, max_streams=1)
        self.sample_rate, self.frame_rate = rt.sample_rate, rt.manifest.frame_rate

    def run(self, text: str, seed: int, frames: int) -> dict:
        self.clock.reset(frames)
        samples, first = 0, None
        started = time.perf_counter()
        try:
            for chunk in self.runtime.stream(text, GenerationParams(seed=seed)):
                if chunk.pcm.size and first is None:
                    first = time.perf_counter() - started
                samples += chunk.pcm.size
        except FrameCap:
            pass  # enough frames: the session ends mid-utterance (its state goes back to the runtime)
        return self.clock.report(time.perf_counter() - started, samples, first)

    def profile(self) -> dict:
        """Per graph, the top op types of every run so far (warm-up included)."""
        traces = self.profiled.finish() if self.profiled else {}
        summaries = {graph: node_profile.summarize(path) for graph, path in traces.items()}
        return {graph: s for graph, s in summaries.items() if s["runs"]}  # e.g. an encoder never run


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark.

    VmHWM belongs to the address space exec() created, so unlike ru_maxrss it does
    not inherit the parent's peak (which fork + exec carries over on Linux).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class Subject(Protocol):
    """What a worker drives: RuntimeSubject, or the reference worker's (a ``profile()`` method is optional)."""

    sample_rate: int
    frame_rate: float

    def run(self, text: str, seed: int, frames: int) -> dict: ...


def worker_main(spec_json: str, load_subject: Callable[[Contender], Subject]) -> None:
    """Load one contender, then answer run requests on stdin until "quit"."""
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # library prints must not reach the protocol pipe

    def send(message: dict) -> None:
        protocol.write(_PROTOCOL + json.dumps(message) + "\n")

    spec = Contender(**json.loads(spec_json))
    started = time.perf_counter()
    subject = load_subject(spec)
    send({"event": "ready", "load_seconds": time.perf_counter() - started, "peak_rss_load_bytes": peak_rss_bytes(),
          "sample_rate": subject.sample_rate, "frame_rate": subject.frame_rate})
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "quit":
            break
        if request["cmd"] == "profile":
            profile = getattr(subject, "profile", None)
            send({"event": "profile", "graphs": profile() if profile is not None else {}})
            continue
        result = subject.run(request["text"], request["seed"], request["frames"])
        send({"event": "result", **result, "peak_rss_bytes": peak_rss_bytes()})


class Worker:
    """The parent's handle on one contender's worker process."""

    def __init__(self, spec: Contender) -> None:
        self.spec = spec
        self.proc = proc = subprocess.Popen([sys.executable, "-m", WORKER_MODULES[spec.kind],
                                             json.dumps(asdict(spec))],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        assert proc.stdin is not None and proc.stdout is not None  # both are PIPEs
        self._requests, self._replies = proc.stdin, proc.stdout
        self.info = self._receive()

    def _receive(self) -> dict:
        for line in self._replies:
            if line.startswith(_PROTOCOL):
                return json.loads(line[len(_PROTOCOL):])
        raise RuntimeError(f"benchmark worker {self.spec.name} exited with status {self.proc.wait()}")

    def run(self, text: str, seed: int, frames: int) -> dict:
        self._requests.write(json.dumps({"cmd": "run", "text": text, "seed": seed, "frames": frames}) + "\n")
        return self._receive()

    def profile(self) -> dict:
        self._requests.write(json.dumps({"cmd": "profile"}) + "\n")
        return self._receive()["graphs"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self._requests.write(json.dumps({"cmd": "quit"}) + "\n")
            self._requests.close()
        self.proc.wait()


# --- memory bandwidth and the roofline ---------------------------------------------------------


# Read kernels for the bandwidth probe: a float sum can be compute-bound on one core,
# an integer max rarely is; the fastest one is the truest measure of the memory.
_READ_KERNELS = {
    "sum_float32": lambda part: float(part.sum()),
    "max_int64": lambda part: int(part.view(np.int64).max()),
}


def measure_bandwidth(mib: int = 256, repeats: int = 5) -> dict:
    """Best-of-N read bandwidth over a float32 array far larger than any cache, per kernel and thread count.

    Weights are only read during a step, so a read stream is the right yardstick;
    numpy releases the GIL in reductions, so threads read disjoint slices in parallel.
    """
    data = np.ones(mib * 2**20 // 4, dtype=np.float32)
    results = {}
    for kernel, fn in _READ_KERNELS.items():
        for threads in sorted({1, os.cpu_count() or 1}):
            parts = np.array_split(data, threads)
            best = float("inf")
            for _ in range(repeats):
                began = time.perf_counter()
                _parallel(fn, parts)
                best = min(best, time.perf_counter() - began)
            results[f"{kernel}/{threads}"] = data.nbytes / best
    return {"array_bytes": data.nbytes, "repeats": repeats, "read_bytes_per_second_by_kernel_threads": results,
            "read_bytes_per_second": max(results.values())}


def _parallel(fn: Callable, parts: list) -> None:
    threads = [threading.Thread(target=fn, args=(part,)) for part in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def weight_elements_per_frame(topology: Topology) -> dict[str, int]:
    """Weight elements one frame reads, from the manifest's topology (the checkpoint's parameter shapes).

    Matrices are read whole; an embedding lookup reads one row per CFG branch.
    The backbone runs once per frame; each depformer stage reads its own
    scheduled depformer_in / in_proj / out_proj, the shared MLPs and norms, and
    its own logits head.
    """
    t = topology
    e, f, d = t.n_embd, t.n_hidden, t.head_dim
    h, kv = t.heads, t.kv_heads
    audio_v, q = t.audio_vocab_size, t.audio_channels
    base = t.low_rank_dim or e
    rows = 2  # conditional and unconditional branch
    layer = 2 * e + 2 * d + e * h * d * 2 + e * kv * d * 2 + e * 2 * f + f * e
    backbone = (2 * rows * base + 2 * base * e  # text: main + second lookups and projections
                + q * rows * e  # audio embeddings
                + t.n_layer * layer
                + e + t.action_vocab_size * e + audio_v * e)
    dep = t.depformer
    de, df, dh, dd = dep.n_embd, dep.n_hidden, dep.heads, dep.head_dim
    dep_layer = 2 * de + 2 * dd + de * 3 * dh * dd + dh * dd * de + de * 2 * df + df * de
    stage = rows * de + e * de + dep.n_layer * dep_layer + de + de * audio_v
    text = (2 * rows * de + 2 * de * de) if dep.text_embedding else 0  # stage 0 only
    return {"backbone": backbone, "depformer": t.num_depth * stage + text}


def kv_cache_elements_per_frame(topology: Topology, capacity: int) -> int:
    """The backbone attends over the whole fixed-capacity K and V cache (masked), every frame."""
    return 2 * topology.n_layer * 2 * topology.kv_heads * capacity * topology.head_dim


def roofline(manifest: Manifest, bandwidth: float, *, float_only: bool = False) -> dict:
    """Minimum time per frame if only the weight reads cost anything, at the measured bandwidth.

    Bytes per weight come from each graph of ``manifest`` itself (its precision, its weight-only
    record), so every contender is held to the bytes its own artifacts read: an int4 build against
    the fp32 build's bytes showed 228 % "of roofline". ``float_only``: fp32 weights whatever the
    manifest holds (the PyTorch reference, which reads the checkpoint's fp32 tensors).
    """
    elements = weight_elements_per_frame(manifest.topology)
    weights = {k: int(v * (4 if float_only else weight_bytes_per_element(manifest.graphs.get(k))))
               for k, v in elements.items()}
    total = sum(weights.values())
    cache = kv_cache_elements_per_frame(manifest.topology, manifest.cache_capacity) * _cache_itemsize(manifest)
    return {"weight_bytes_per_frame": {**weights, "total": total}, "kv_cache_bytes_per_frame": cache,
            "bandwidth_bytes_per_second": bandwidth, "min_frame_seconds": total / bandwidth,
            "max_frames_per_second": bandwidth / total,
            "min_frame_seconds_with_cache": (total + cache) / bandwidth}


def weight_bytes_per_element(graph: GraphSpec | None) -> float:
    """Bytes a frame reads per weight of ``graph``.

    A weight-only graph: its recorded MatMul bytes over their fp32 bytes (the integers plus one fp32
    scale per block, as written), else bits / 8 plus a scale per block; fp16: 2; otherwise 4.
    """
    if graph is None:
        return 4.0
    q = graph.quantization
    matmul = q.weights.get("matmul_weights", {}) if q else {}
    if matmul.get("fp32_bytes"):
        return 4.0 * matmul["bytes"] / matmul["fp32_bytes"]
    if q and q.block_size:
        return q.bits / 8 + 4 / q.block_size
    return 2.0 if graph.precision == "fp16" else 4.0


def _cache_itemsize(manifest: Manifest) -> int:
    """Bytes per K/V element, from the backbone's declared cache input (fp32, or fp16 with the fp16 cache)."""
    backbone = manifest.graphs.get("backbone")
    k0 = next((t for t in backbone.inputs if t.name.startswith("k_cache")), None) if backbone else None
    return k0.dtype.itemsize if k0 is not None else 4


# --- statistics and the orchestration ----------------------------------------------------------


def spread(values: Iterable[float]) -> dict | None:
    values = np.asarray(list(values), dtype=np.float64)
    if values.size == 0:
        return None
    p10, q1, median, q3, p90 = np.percentile(values, [10, 25, 50, 75, 90])
    return {"median": median, "p10": p10, "q1": q1, "q3": q3, "p90": p90, "n": int(values.size)}


def summarize(spec: Contender, info: dict, runs: list[dict], manifest: Manifest, bandwidth: float) -> dict:
    """``manifest``: the topology's (the reference's roofline); a runtime contender reads its own."""
    frames = sum(r["frames"] for r in runs)
    frame_rate = info["frame_rate"]
    lead = steady_from(runs, manifest.max_delay)
    frame_seconds = [s for r in runs for s in r["frame_seconds"][lead:]]
    median_frame = float(np.median(frame_seconds)) if frame_seconds else sum(r["wall_seconds"] for r in runs) / frames
    own = manifest if spec.kind == "reference" else load_manifest(spec.source, verify=False)
    line = roofline(own, bandwidth, float_only=spec.kind == "reference")
    line["achieved_over_roofline"] = line["min_frame_seconds"] / median_frame
    first_audio = spread(r["first_audio_seconds"] for r in runs if r["first_audio_seconds"] is not None)
    return {
        **asdict(spec),
        "load_seconds": info["load_seconds"],
        "peak_rss_load_bytes": info["peak_rss_load_bytes"],
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
        "frames_per_run": [r["frames"] for r in runs],
        "frames_per_second": spread(r["frames"] / r["wall_seconds"] for r in runs),
        "steady_frames_per_second": 1.0 / median_frame,
        "real_time_factor": spread(r["wall_seconds"] * frame_rate / r["frames"] for r in runs),
        "first_audio_seconds": first_audio,
        # time to first audio in steady frame-times: how many frames a listener waits
        "first_audio_frame_times": first_audio["median"] / median_frame if first_audio else None,
        "steady_from_frame": lead,
        "frame_seconds": spread(frame_seconds),
        "breakdown_seconds_per_frame": _steady_breakdown(runs, lead),
        "breakdown_whole_run_seconds_per_frame": _breakdown(runs),
        "roofline": line,
        "node_profile": info.get("node_profile"),
        "raw": {"frame_seconds": frame_seconds, "runs": [{k: v for k, v in r.items()
                                                           if k not in ("frame_seconds", "frame_parts")}
                                                          for r in runs]},
    }


def steady_from(runs: list[dict], max_delay: int) -> int:
    """The first frame of the steady state: ``max_delay``, where every component runs every frame.

    Before it a fresh utterance is cheaper: the depformer skips the columns inside every codebook's
    delay and the codec has nothing complete to decode (the 2B's first 18 frames), so a median over a
    32-frame run would be a lead-in frame. 0 when no run reaches it (a few frames on a tiny model).
    """
    return max_delay if any(len(r["frame_seconds"]) > max_delay for r in runs) else 0


def _steady_breakdown(runs: list[dict], lead: int) -> dict[str, float]:
    """Per component, its mean time in the steady frames (from ``lead``) of each run, median over runs;
    work outside any frame (the reference's batch decode) spread over all the run's frames; host: the
    rest of the steady frames' time."""
    per_run = []
    for r in runs:
        n = min(len(r["frame_seconds"]), len(r["frame_parts"]))
        if n <= lead:
            continue
        steady = r["frame_parts"][lead:n]
        parts = {c: float(np.mean([p[c] for p in steady])) for c in COMPONENTS}
        inside = sum(parts.values())
        for c in COMPONENTS:
            parts[c] += (r["component_seconds"][c] - sum(p[c] for p in r["frame_parts"])) / r["frames"]
        parts["host"] = float(np.mean(r["frame_seconds"][lead:n])) - inside
        per_run.append(parts)
    if not per_run:
        return _breakdown(runs)
    return {k: float(np.median([p[k] for p in per_run])) for k in (*COMPONENTS, "host")}


def _breakdown(runs: list[dict]) -> dict[str, float]:
    """Each run's time per frame in each component (host: the rest of its wall time), median over runs.

    A median, because one slow repeat (a cold kernel for a new shape, a busy
    machine) would otherwise dominate the split.
    """
    per_run = []
    for r in runs:
        parts = {c: r["component_seconds"][c] / r["frames"] for c in COMPONENTS}
        parts["host"] = r["wall_seconds"] / r["frames"] - sum(parts.values())
        per_run.append(parts)
    return {k: float(np.median([p[k] for p in per_run])) for k in (*COMPONENTS, "host")}


def choose_schedule(contenders: list[Contender], requested: str) -> str:
    """Interleave unless the workers would not fit in memory together (then one after another)."""
    if requested != "auto":
        return requested
    need = sum(_resident_estimate(c) for c in contenders)
    return "interleaved" if need < 0.8 * _available_memory() else "sequential"


def _resident_estimate(spec: Contender) -> int:
    """Peak RSS from the weights on disk, by the ratios measured on the 2B: the reference holds
    its model plus the mmapped safetensors (1.9x), ONNX Runtime its weights plus buffers (1.15x)."""
    root = Path(spec.source)
    if spec.kind == "reference":
        return 2 * sum(p.stat().st_size for p in root.rglob("*.safetensors"))
    return int(1.2 * sum(p.stat().st_size for p in root.iterdir() if p.suffix in (".onnx", ".data")))


def _available_memory() -> int:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", info["MemTotal"])


@dataclass(frozen=True)
class Settings:
    text: str = DEFAULT_TEXT
    seed: int = 0
    frames: int = 64
    repeats: int = 3
    warmup_frames: int = 4
    schedule: str = "auto"


def run_bench(contenders: list[Contender], skipped: list[dict], settings: Settings, manifest: Manifest,
              echo: Callable[[str], None] = lambda msg: None) -> dict:
    """Measure every contender (warm-up excluded) and summarize; ``manifest`` gives the topology."""
    echo("measuring memory bandwidth")
    before = measure_bandwidth()
    schedule = choose_schedule(contenders, settings.schedule)
    echo(f"{len(contenders)} contenders, {schedule}")
    groups = [contenders] if schedule == "interleaved" else [[c] for c in contenders]
    measured = [m for group in groups for m in _measure_group(group, settings, echo)]
    # Measured again at the end and the better probe kept: a busy machine only ever lowers it.
    bandwidth = max(before, measure_bandwidth(), key=lambda b: b["read_bytes_per_second"])
    summaries = [summarize(spec, info, runs, manifest, bandwidth["read_bytes_per_second"])
                 for spec, info, runs in measured]
    _relative_to_reference(summaries)
    return {"machine": machine_info(), "bandwidth": bandwidth, "settings": {**asdict(settings), "schedule": schedule},
            "skipped": skipped, "contenders": summaries}


def _measure_group(group: list[Contender], settings: Settings, echo) -> list[tuple[Contender, dict, list[dict]]]:
    """Load the group's workers, warm each up, then run them in turn, rotating who goes first."""
    workers = []
    try:
        for spec in group:
            echo(f"loading {spec.name}")
            workers.append(Worker(spec))
        for w in workers:
            echo(f"warm-up {w.spec.name}")
            w.run(settings.text, settings.seed, settings.warmup_frames)
        runs = {w.spec.name: [] for w in workers}
        for rep in range(settings.repeats):
            for w in workers[rep % len(workers):] + workers[: rep % len(workers)]:
                result = w.run(settings.text, settings.seed, settings.frames)
                echo(f"repeat {rep + 1}/{settings.repeats} {w.spec.name}: {result['frames']} frames "
                     f"in {result['wall_seconds']:.2f}s")
                runs[w.spec.name].append(result)
        for w in workers:
            if w.spec.profile_dir:
                w.info["node_profile"] = w.profile()
        return [(w.spec, w.info, runs[w.spec.name]) for w in workers]
    finally:
        for w in workers:
            w.close()


def _relative_to_reference(summaries: list[dict]) -> None:
    ref = next((s for s in summaries if s["kind"] == "reference"), None)
    for s in summaries:
        s["speedup_vs_reference"] = (s["frames_per_second"]["median"] / ref["frames_per_second"]["median"]
                                     if ref else None)


def machine_info() -> dict:
    import onnxruntime

    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "python": platform.python_version(), "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
            "load_average": os.getloadavg()}


if __name__ == "__main__":
    worker_main(sys.argv[1], RuntimeSubject)
