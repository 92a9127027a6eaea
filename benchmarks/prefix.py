"""``dia2-rt bench --prefix``: time to first audio after a two-speaker audio prefix, three ways.

* ``step``: the reference's warm-up, one backbone step per prefix frame;
* ``prefill``: the whole warm-up in one call of the prefill graph;
* ``warm``: a restored ``WarmState`` (the voice pair warmed once beforehand), so
  only the frames that read the script are run.

The prefix is synthetic (a seeded harmonic signal per speaker, a word every
0.4 s), encoded once up front (encoding is reported on its own). Each repeat runs
the three contenders in rotated order in this one process, so machine noise falls
on all of them alike; the report gives medians and ratios, never absolute goals.
Time to first audio is from the session's start (before the warm-up) to the
first decoded chunk, as ``SpeakResult.first_audio_seconds`` counts it.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from dia2_trt.runtime import Dia2Runtime
from dia2_trt.runtime.files import write_atomic
from dia2_trt.runtime.params import GenerationParams
from dia2_trt.runtime.voice import Word

METHODS = ("step", "prefill", "warm")
WORD_SECONDS = 0.4


def synthetic_clip(path: Path, seconds: float, rate: int, f0: float, seed: int) -> list[Word]:
    """Write a voiced-sounding clip and return evenly spaced word timings for it."""
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.03 * np.sin(2 * np.pi * 5 * t))) / rate
    signal = sum(np.sin(k * phase) / k for k in range(1, 6)) * 0.5 * (1 - np.cos(2 * np.pi * 2.5 * t))
    signal = 0.3 * signal + 0.01 * np.random.default_rng(seed).standard_normal(t.size)
    sf.write(path, signal.astype(np.float32), rate, subtype="PCM_16")
    names = "hello there how are you doing today fine thanks for asking we will meet".split()
    count = int(seconds / WORD_SECONDS) - 1
    return [Word(names[i % len(names)], 0.1 + i * WORD_SECONDS, 0.1 + i * WORD_SECONDS + 0.3) for i in range(count)]


def run_prefix_bench(artifacts: str | Path, prefix_seconds: float, repeats: int, text: str, threads: int | None,
                     echo) -> dict:
    runtime = Dia2Runtime.load(artifacts, threads=threads)
    rate = runtime.sample_rate
    with tempfile.TemporaryDirectory() as tmp:
        voices, encode_s = [], []
        for slot, f0 in ((1, 140.0), (2, 210.0)):
            clip = Path(tmp) / f"speaker{slot}.wav"
            words = synthetic_clip(clip, prefix_seconds / 2, rate, f0, slot)
            started = time.perf_counter()
            voices.append(runtime.voice(clip, words, slot))
            encode_s.append(time.perf_counter() - started)
    prefix = runtime.prefix(*voices)
    assert prefix is not None  # None only when no voice is given; both are
    echo(f"prefix: {prefix.frames} frames ({prefix.frames / runtime.manifest.frame_rate:.1f} s), "
         f"encoded in {sum(encode_s):.2f} s")
    has_prefill = runtime._prefill_binding() is not None
    started = time.perf_counter()
    warm = runtime.warm(prefix, prefill=has_prefill)
    warm_s = time.perf_counter() - started
    methods = [m for m in METHODS if m != "prefill" or has_prefill]
    params = GenerationParams(seed=0)
    times: dict[str, list[float]] = {m: [] for m in methods}
    _first_audio(runtime, text, params, prefix, "step")  # load every graph and page the weights in once
    for r in range(repeats + 1):
        order = methods[r % len(methods):] + methods[: r % len(methods)]
        for method in order:
            seconds = _first_audio(runtime, text, params, warm if method == "warm" else prefix, method)
            if r:  # the first round is a warm-up of the process itself
                times[method].append(seconds)
        echo(f"round {r}: " + ", ".join(f"{m} {times[m][-1]:.3f}s" for m in methods if r and times[m]))
    medians = {m: statistics.median(v) for m, v in times.items()}
    return {
        "artifacts": str(artifacts), "precision": runtime.manifest.precision,
        "prefix_frames": prefix.frames, "prefix_seconds": prefix.frames / runtime.manifest.frame_rate,
        "script_free_frames": warm.frames, "encode_seconds": sum(encode_s), "warm_state_seconds": warm_s,
        "repeats": repeats, "time_to_first_audio_s": times, "median_s": medians,
        "speedup_vs_step": {m: medians["step"] / medians[m] for m in methods},
        "prefill_available": has_prefill,
    }


def _first_audio(runtime: Dia2Runtime, text: str, params: GenerationParams, prefix, method: str) -> float:
    started = time.perf_counter()
    session = runtime.stream(text, params, prefix=prefix, prefill=method != "step")
    try:
        for chunk in session:
            if chunk.pcm.size:
                return time.perf_counter() - started
        raise RuntimeError("the utterance produced no audio")
    finally:
        session.cancel()  # the rest of the utterance is not measured; its state goes back to the pool


def markdown(result: dict) -> str:
    lines = [f"Time to first audio after a {result['prefix_seconds']:.1f} s two-speaker prefix "
             f"({result['prefix_frames']} frames; {result['artifacts']}, {result['precision']}), "
             f"median of {result['repeats']}:", "",
             "| warm-up | first audio (s) | vs step-wise |", "|---|---|---|"]
    for method, seconds in result["median_s"].items():
        lines.append(f"| {method} | {seconds:.3f} | {result['speedup_vs_step'][method]:.2f}x |")
    lines += ["", f"Warm state: {result['script_free_frames']} of {result['prefix_frames']} frames reusable, "
              f"made in {result['warm_state_seconds']:.2f} s; encoding the prefix took "
              f"{result['encode_seconds']:.2f} s (not counted above)."]
    return "\n".join(lines) + "\n"


def write_report(result: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(result)
    write_atomic(out / "prefix_bench.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1) + "\n"))
    write_atomic(out / "prefix_bench.md", lambda tmp: Path(tmp).write_text(table))
    return table
