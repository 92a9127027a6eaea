"""Two depformer graphs of one checkpoint side by side: frame time, memory after loading, same tokens?

    python benchmarks/depformer_ab.py A_DIR B_DIR [--frames 10] [--threads 2] [--temperature 0.8]

A_DIR and B_DIR are artifact directories (or depformer.onnx files), e.g. the same precision
exported before and after a change of the graph's form (the stage Loop against unrolled
stages). Each graph's load is measured in a fresh process (RSS before and after creating the
session and running it three times); then both run in one process on the same random inputs,
alternating which goes first, and the median ms per frame and the count of frames with
identical tokens are reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("a", type=Path, nargs="?")
    parser.add_argument("b", type=Path, nargs="?")
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--load-only", type=Path, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.load_only:
        print(json.dumps(_load_rss(args.load_only, args.threads)))
        return
    if args.b is None:
        parser.error("give two artifact directories (or depformer.onnx files)")
    paths = [_graph(args.a), _graph(args.b)]
    loaded = [_load_in_child(p, args.threads) for p in paths]
    times, same = _alternate(paths, args.frames, args.threads, args.temperature)
    for path, rss, samples in zip(paths, loaded, times):
        print(f"{path}: {statistics.median(samples) * 1e3:.1f} ms a frame (median of {len(samples)}), "
              f"+{rss['loaded_gib']:.2f} GiB loaded, +{rss['run_gib']:.2f} GiB after 3 runs")
    print(f"speed-up of B over A: {statistics.median(times[0]) / statistics.median(times[1]):.2f}x; "
          f"same tokens in {same}/{args.frames} frames")


def _graph(path: Path) -> Path:
    return path / "depformer.onnx" if path.is_dir() else path


def _session(path: Path, threads: int):
    """The session the runtime would open for this depformer file (its precision's options)."""
    from dia2_trt.runtime.artifacts import load_manifest
    from dia2_trt.runtime.backends import OrtBackend

    spec = load_manifest(path.parent, verify=False).graph("depformer")
    return OrtBackend(threads=threads).open_session(spec, path)


def _feeds(session, rng: np.random.Generator, temperature: float) -> dict:
    """One stream's frame (a graph with a streams axis takes it as S = 1)."""
    one = {"streams": 1, "stream_rows": 2}
    shapes = {i.name: [int(one[d]) if isinstance(d, str) else int(d) for d in i.shape] for i in session.get_inputs()}
    return {"hidden": rng.standard_normal(shapes["hidden"]).astype(np.float32),
            "cb0_logits": rng.standard_normal(shapes["cb0_logits"]).astype(np.float32),
            "text_tokens": np.array([[5, 3]]), "noise": rng.random(shapes["noise"]).astype(np.float32),
            "temperature": np.array([temperature], np.float32), "top_k": np.array([50]),
            "cfg_scale": np.array([2.0], np.float32), "cfg_filter_k": np.array([50])}


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 2**20


def _load_rss(path: Path, threads: int) -> dict:
    before = _rss_gib()
    session = _session(path, threads)
    loaded = _rss_gib()
    feeds = _feeds(session, np.random.default_rng(0), 0.8)
    for _ in range(3):
        session.run(None, feeds)
    return {"loaded_gib": loaded - before, "run_gib": _rss_gib() - before}


def _load_in_child(path: Path, threads: int) -> dict:
    """In a fresh process: memory one process freed would otherwise be reused by the next load."""
    out = subprocess.run([sys.executable, __file__, "--load-only", str(path), "--threads", str(threads)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _alternate(paths: list[Path], frames: int, threads: int, temperature: float) -> tuple[list, int]:
    sessions = [_session(p, threads) for p in paths]
    rng = np.random.default_rng(0)
    times: list[list[float]] = [[], []]
    same = 0
    for frame in range(frames):
        feeds = _feeds(sessions[0], rng, temperature)
        tokens: list[Any] = [None, None]  # ORT types run()'s outputs as a union; this graph's is a tensor
        for i in ((0, 1) if frame % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            tokens[i] = sessions[i].run(None, feeds)[0]
            times[i].append(time.perf_counter() - start)
        same += int(np.array_equal(tokens[0], tokens[1]))
    return times, same


if __name__ == "__main__":
    main()
