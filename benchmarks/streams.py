"""``dia2-rt bench --streams``: N sessions on one runtime from N threads, started together.

For each stream count N, N threads open a session each on ONE runtime (loaded with
``max_streams`` = the largest N, or the artifacts' own maximum if smaller, so the sessions are
batched in one graph call per frame; artifacts without a stream axis run them side by side on
shared weights, and sessions beyond the batch wait for a slot), each with its own
script and seed, released together by a barrier. A stream stops after ``frames`` frames (its
progress callback cancels it) or at its script's end. Measured per stream, from the common start:
the end of every frame (progress callbacks), the first audio chunk, and its end.

- aggregate frames/s: every stream's frames over the time until the last stream ended;
- ms per frame per stream: a stream's wall time over its frames (median over streams);
- real time: a stream keeps it when its own frames/s (frames over its wall time) reaches the
  model's frame rate (12.5 frames/s for Dia2);
- time to first audio: p50 and p99 over every stream of every repeat, in ms and in frame-times
  (TTFA over that count's median ms per frame).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dia2_trt.runtime import Dia2Runtime, GenerationParams
from dia2_trt.runtime.artifacts import load_manifest

from .harness import machine_info

# Different scripts per stream (rotated and numbered): streams that share a batch should not all take
# the same path through the text state machine.
_SENTENCES = (
    "[S1] Hello there, how are you doing today? [S2] I'm fine, thanks for asking.",
    "[S1] We'll meet at ten o'clock near the old station. [S2] Bring the tickets, please.",
    "[S1] The weather turned cold overnight. [S2] Then we should light the fire early.",
    "[S1] Did you read the letter I left on the table? [S2] Not yet, I was out all day.",
    "[S1] Numbers like forty two are easy to say. [S2] Try three hundred and seven.",
    "[S1] Let's take the long road home tonight. [S2] Only if you drive slowly.",
)


def parse_streams(text: str) -> list[int]:
    """"1,2,4,8" -> [1, 2, 4, 8] (sorted, unique, each 1..64); ValueError with one line otherwise."""
    try:
        counts = sorted({int(p) for p in text.split(",") if p.strip()})
    except ValueError:
        raise ValueError(f"--streams takes comma-separated integers, got {text!r}") from None
    if not counts or counts[0] < 1 or counts[-1] > 64:
        raise ValueError(f"--streams takes integers from 1 to 64, got {text!r}")
    return counts


def scripts(rt: Dia2Runtime, n: int, frames: int) -> list[str]:
    """``n`` different scripts: stream i starts at sentence i and takes sentences in turn until the script
    lasts ``frames`` frames or one more would not fit the model's context."""
    m, params, k = rt.manifest, GenerationParams(), len(_SENTENCES)
    room = min(m.max_context_steps, m.cache_capacity)
    out = []
    for i in range(n):
        text = _SENTENCES[i % k]
        for j in range(1, 4 * k):
            longer = f"{text} {_SENTENCES[(i + j) % k]}"
            if rt.frames_needed(rt.parse(text), params) >= frames or rt.frames_needed(rt.parse(longer), params) > room:
                break
            text = longer
        out.append(text)
    return out


def load_runtime(artifacts: str, streams: int, backend: str, threads: int | None) -> tuple[Dia2Runtime, int]:
    """The runtime batching up to ``streams`` sessions, within what the artifacts' graphs take (artifacts
    without a stream axis: 1, sessions side by side on shared weights); returns it and that batch size.
    More sessions than the batch wait for a free slot, which is what a caller of the runtime gets."""
    most = getattr(load_manifest(artifacts, verify=False), "max_streams", 1)
    batch = min(streams, most)
    return Dia2Runtime.load(artifacts, backend, threads, verify=False, max_streams=batch), batch


def run_streams_bench(artifacts: str, counts: list[int], frames: int, repeats: int, warmup_frames: int,
                      backend: str, threads: int | None, seed: int = 0,
                      echo: Callable[[str], None] = lambda msg: None) -> dict:
    echo(f"loading {artifacts}")
    rt, batch = load_runtime(artifacts, max(counts), backend, threads)
    try:
        rows = _measure(rt, counts, frames, repeats, warmup_frames, seed, echo)
    finally:
        rt.close()  # the batch engine's thread
    return {"machine": machine_info(), "artifacts": str(artifacts), "precision": rt.manifest.precision,
            "frame_rate": rt.manifest.frame_rate, "max_streams": batch,
            "settings": {"streams": counts, "frames": frames, "repeats": repeats, "warmup_frames": warmup_frames,
                         "backend": backend, "threads": threads, "seed": seed},
            "counts": rows}


def _measure(rt: Dia2Runtime, counts: list[int], frames: int, repeats: int, warmup_frames: int, seed: int,
             echo: Callable[[str], None]) -> list[dict]:
    # Warm-up: as many sessions as the largest count (every slot or pooled stepper then exists: none is
    # made while measured) and past the codebook delays (the codec's first run is not timed either).
    echo("warm-up")
    _round(rt, max(counts), max(warmup_frames, rt.manifest.max_delay + 2), seed)
    # The counts take turns within each repeat, so a host that speeds up or slows down over the run
    # (a shared 2-core VM moved 90 -> 140 frames/s between runs) skews every count alike, not the ratio.
    runs: dict[int, list[dict]] = {n: [] for n in counts}
    for rep in range(repeats):
        for n in counts:
            runs[n].append(_round(rt, n, frames, seed + 1000 * rep))
            echo(f"{n} streams, repeat {rep + 1}/{repeats}: {runs[n][-1]['frames']} frames "
                 f"in {runs[n][-1]['wall_seconds']:.2f}s")
    return [summarize(n, runs[n], rt.manifest.frame_rate) for n in counts]


def _round(rt: Dia2Runtime, n: int, frames: int, seed: int) -> dict:
    """N streams released together; returns each stream's marks (seconds from the release)."""
    barrier = threading.Barrier(n + 1)
    texts = scripts(rt, n, frames)
    streams: list[dict] = [{} for _ in range(n)]
    workers = [threading.Thread(target=_stream, args=(rt, texts[i], seed + i, frames, barrier, streams[i]),
                                daemon=True) for i in range(n)]
    for w in workers:
        w.start()
    barrier.wait()
    start = time.perf_counter()
    for w in workers:
        w.join()
    errors = [s["error"] for s in streams if "error" in s]
    if errors:
        raise RuntimeError(f"a stream failed: {errors[0]}")
    for s in streams:
        s["marks"] = [t - start for t in s["marks"]]
        s["end"] -= start
        s["first_audio"] = None if s["first_audio"] is None else s["first_audio"] - start
    return {"streams": streams, "frames": sum(len(s["marks"]) for s in streams),
            "wall_seconds": max(s["end"] for s in streams)}


def _stream(rt: Dia2Runtime, text: str, seed: int, frames: int, barrier: threading.Barrier, out: dict) -> None:
    """One stream: wait for the others, then generate, marking each frame's end and the first audio."""
    marks: list[float] = []
    out.update(marks=marks, first_audio=None, end=0.0)
    holder: dict = {}

    def progress(p) -> None:
        marks.append(time.perf_counter())
        if len(marks) >= frames:
            holder["session"].cancel()  # safe mid-frame: the loop ends at the next frame

    try:
        barrier.wait()
        session = holder["session"] = rt.open_session(GenerationParams(seed=seed), progress)
        session.feed(text)
        session.close()
        for chunk in session:
            if chunk.pcm.size and out["first_audio"] is None:
                out["first_audio"] = time.perf_counter()
    except Exception as exc:  # reported by the parent as one line
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["end"] = time.perf_counter()


def summarize(n: int, runs: list[dict], frame_rate: float) -> dict:
    streams = [s for r in runs for s in r["streams"]]
    # Each stream's own wall time over its frames: a stream waiting for the cores is slower by all it waits.
    per_stream_fps = [len(s["marks"]) / s["end"] for s in streams if s["end"] > 0 and s["marks"]]
    frame_ms = 1e3 / float(np.median(per_stream_fps)) if per_stream_fps else None
    ttfa = [s["first_audio"] for s in streams if s["first_audio"] is not None]
    aggregate = [r["frames"] / r["wall_seconds"] for r in runs]
    return {
        "streams": n,
        "aggregate_frames_per_second": float(np.median(aggregate)),
        "per_stream_frames_per_second": 1e3 / frame_ms if frame_ms else None,
        "ms_per_frame_per_stream": frame_ms,
        "real_time_streams": int(np.median([sum(len(s["marks"]) / s["end"] >= frame_rate for s in r["streams"])
                                            for r in runs])),
        "ttfa_ms": _percentiles(ttfa, 1e3),
        "ttfa_frame_times": _percentiles(ttfa, 1e3 / frame_ms) if frame_ms else None,
        "streams_without_audio": sum(s["first_audio"] is None for s in streams),
        "raw": runs,
    }


def _percentiles(values: list[float], scale: float) -> dict | None:
    if not values:
        return None
    p50, p99 = np.percentile(np.asarray(values) * scale, [50, 99])
    return {"p50": float(p50), "p99": float(p99), "n": len(values)}


# --- report ------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    s = result["settings"]
    batch = result["max_streams"]
    mode = (f"batched, up to {batch} in one graph call per frame" if batch > 1
            else "side by side on shared weights (artifacts without a stream axis)")
    lines = [f"{Path(result['artifacts']).name} ({result['precision']}), {s['backend']}, sessions {mode}; "
             f"up to {s['frames']} frames per stream, {s['repeats']} repeats per count; real time = "
             f"{result['frame_rate']:g} frames/s per stream.", "",
             "| streams | aggregate frames/s | vs 1 stream | frames/s per stream | ms/frame per stream "
             "| real-time streams | TTFA p50 ms | TTFA p99 ms | TTFA p50 frames |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = result["counts"][0]["aggregate_frames_per_second"] if result["counts"] else None
    for row in result["counts"]:
        ttfa, frames = row["ttfa_ms"], row["ttfa_frame_times"]
        lines.append(
            f"| {row['streams']} | {row['aggregate_frames_per_second']:.1f} "
            f"| {row['aggregate_frames_per_second'] / base:.2f}x | {row['per_stream_frames_per_second']:.1f} "
            f"| {_num(row['ms_per_frame_per_stream'])} | {row['real_time_streams']}/{row['streams']} "
            f"| {_num(ttfa and ttfa['p50'])} | {_num(ttfa and ttfa['p99'])} | {_num(frames and frames['p50'])} |")
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def plot(result: dict, path: Path, save: Callable[[Path, object], None]) -> None:
    """Three panels against the stream count: aggregate frames/s (with the linear ideal), frames/s per
    stream (with the real-time line), time to first audio p50/p99."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["counts"]
    n = [r["streams"] for r in rows]
    fig, (agg, per, ttfa) = plt.subplots(1, 3, figsize=(15, 4))
    agg.plot(n, [r["aggregate_frames_per_second"] for r in rows], marker="o", label="measured")
    agg.plot(n, [rows[0]["aggregate_frames_per_second"] * k / n[0] for k in n], linestyle=":", color="gray",
             label="linear from the first count")
    agg.set_title("aggregate frames/s")
    per.plot(n, [r["per_stream_frames_per_second"] for r in rows], marker="o", label="per stream (median)")
    per.axhline(result["frame_rate"], color="red", linestyle="--", label=f"real time ({result['frame_rate']:g}/s)")
    per.set_title("frames/s per stream")
    for key, style in (("p50", "o-"), ("p99", "s--")):
        ttfa.plot(n, [r["ttfa_ms"][key] if r["ttfa_ms"] else np.nan for r in rows], style, label=key)
    ttfa.set_title("time to first audio (ms)")
    for ax in (agg, per, ttfa):
        ax.set_xscale("log", base=2)
        ax.set_xticks(n, [str(k) for k in n])
        ax.set_xlabel("concurrent streams")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.suptitle(f"{Path(result['artifacts']).name} ({result['precision']})")
    fig.tight_layout()
    save(path, fig)
    plt.close(fig)
