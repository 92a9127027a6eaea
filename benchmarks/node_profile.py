"""Where a graph's time goes, per op type, from ONNX Runtime's own profiler.

``profiled(backend, out_dir)`` makes every graph the backend loads write a
trace (``SessionOptions.enable_profiling``) into ``out_dir``; ``finish`` ends
the traces and ``summarize`` folds one into the top op types by total kernel
time. Profiling costs time per node, so a profiled run's frame timings are not
comparable with an unprofiled one's: read its shares, not its milliseconds.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnxruntime as ort


class ProfiledSessions:
    """The sessions of the graphs loaded through a backend since ``profiled``, by graph name."""

    def __init__(self) -> None:
        self.sessions: dict[str, ort.InferenceSession] = {}

    def finish(self) -> dict[str, Path]:
        """End every trace; returns graph -> trace file."""
        return {name: Path(session.end_profiling()) for name, session in self.sessions.items()}


def profiled(backend, out_dir: str | Path) -> ProfiledSessions:
    """Turn on ORT profiling for the graphs ``backend`` (an OrtBackend) loads from now on."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    opened = ProfiledSessions()
    make_options, load = backend.session_options, backend.load

    def load_profiled(spec):
        def options(*args, **kwargs):  # whatever session_options takes (fuse_qdq came later and broke a copy)
            opts = make_options(*args, **kwargs)
            opts.enable_profiling = True
            opts.profile_file_prefix = str(out / spec.name)
            return opts

        backend.session_options = options
        try:
            graph = load(spec)
        finally:
            backend.session_options = make_options
        opened.sessions[spec.name] = graph.session
        return graph

    backend.load = load_profiled
    return opened


def summarize(trace: str | Path, top: int = 8) -> dict:
    """{"runs", "run_ms", "ops": [{"op", "ms", "percent", "calls"}]}: the ``top`` op types by kernel time.

    ``percent`` is of the graph's total run time (model_run events), so what the
    listed ops leave is the rest of the ops plus ORT's own per-run overhead.
    """
    events = json.loads(Path(trace).read_text())
    run_us = [e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    per_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            entry = per_op[e.get("args", {}).get("op_name", "?")]
            entry[0] += e["dur"]
            entry[1] += 1
    total = sum(run_us) or sum(us for us, _ in per_op.values()) or 1.0
    ranked = sorted(per_op.items(), key=lambda item: -item[1][0])[:top]
    return {"runs": len(run_us), "run_ms": sum(run_us) / 1e3,
            "ops": [{"op": op, "ms": us / 1e3, "percent": 100.0 * us / total, "calls": calls}
                    for op, (us, calls) in ranked]}


def markdown(profiles: dict[str, dict[str, dict]]) -> str:
    """contender -> graph -> summary, as one table per contender and graph."""
    lines = []
    for contender, graphs in profiles.items():
        for graph, s in graphs.items():
            per_run = s["run_ms"] / s["runs"] if s["runs"] else 0.0
            lines += ["", f"{contender} / {graph}: {s['runs']} runs, {per_run:.3f} ms a run (profiled)", "",
                      "| op | total ms | % of graph | calls |", "|---|---|---|---|"]
            lines += [f"| {o['op']} | {o['ms']:.2f} | {o['percent']:.1f} | {o['calls']} |" for o in s["ops"]]
    return "\n".join(lines) + "\n" if lines else ""
