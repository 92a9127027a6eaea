"""``dia2-rt bench``: the reference loop and every runtime backend side by side, in one run.

Loaded by ``dia2_trt.runtime.cli`` only when ``bench`` is the command.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, replace
from pathlib import Path

import click

from dia2_trt.runtime.artifacts import ArtifactError, load_manifest
from dia2_trt.runtime.cli_common import check_outputs
from dia2_trt.runtime.files import write_atomic

from . import node_profile
from .harness import BACKENDS, DEFAULT_TEXT, Settings, plan_contenders, run_bench
from .report import markdown, plot


@click.command()
@click.option("--artifacts", "artifacts", multiple=True, required=True, type=click.Path(file_okay=False),
              help="Artifact directory (repeat for fp32 and fp16 builds of one checkpoint).")
@click.option("--reference/--no-reference", default=True, show_default=True,
              help="Also run the PyTorch reference loop (needs torch; skipped with a note otherwise).")
@click.option("--checkpoint", type=click.Path(file_okay=False),
              help="Checkpoint for the reference [default: the one the artifacts were built from].")
@click.option("--backend", "backends", multiple=True, type=click.Choice(BACKENDS),
              help="Runtime backends to try [default: all; those that cannot load here are skipped].")
@click.option("--frames", default=64, show_default=True, type=click.IntRange(1),
              help="Frames per measured run (fewer if the script ends first).")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1))
@click.option("--warmup-frames", default=4, show_default=True, type=click.IntRange(1),
              help="Frames of the unmeasured warm-up run per contender.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--text", default=DEFAULT_TEXT, help="Dialogue script to speak.")
@click.option("--threads", type=click.IntRange(1), help="Threads per contender [default: each one's own default].")
@click.option("--schedule", default="auto", show_default=True, type=click.Choice(("auto", "interleaved", "sequential")),
              help="interleaved: all workers loaded, runs alternate; sequential: one worker at a time "
                   "(auto picks sequential when they would not fit in memory together).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Directory for bench.json, bench.md, latency.png, breakdown.png.")
@click.option("--profile", is_flag=True,
              help="Also trace every ONNX Runtime node and list each graph's top op types (slows the runtime "
                   "contenders: read the shares, not the timings; traces land in OUT/profile/).")
@click.option("--no-plots", is_flag=True, help="Skip the PNGs (they need matplotlib, the [bench] extra).")
@click.option("--no-verify", is_flag=True, help="Skip the artifact files' checksums.")
@click.option("--prefix", is_flag=True,
              help="Instead: time to first audio after a two-speaker audio prefix, step-wise warm-up vs the "
                   "prefill graph vs a restored warm state (first --artifacts only; writes prefix_bench.*).")
@click.option("--prefix-seconds", default=10.0, show_default=True, type=click.FloatRange(min=1.0),
              help="Length of the synthetic prefix for --prefix (split between the two speakers).")
@click.option("--positions", "positions_arg", metavar="P,P,...",
              help="Instead: ms per frame at these KV-cache positions (e.g. 0,375,750,1125,1500), per component "
                   "(backbone step, depformer frame, codec decode), for every --artifacts: --frames timed frames per "
                   "position after --warmup-frames, in --repeats rounds; with --streams, every count's streams "
                   "stepped together at each position (writes positions_bench.*).")
@click.option("--streams", "streams_arg", metavar="N,N,...",
              help="Instead: N sessions from N threads on one runtime, different scripts started together, for "
                   "each N (e.g. 1,2,4,8): aggregate frames/s, per-stream ms/frame, real-time streams, time to "
                   "first audio p50/p99 (first --artifacts; up to --frames frames a stream; writes streams_bench.*).")
def bench(artifacts, reference, checkpoint, backends, frames, repeats, warmup_frames, seed, text, threads,
          schedule, out, profile, no_plots, no_verify, prefix, prefix_seconds, positions_arg, streams_arg) -> None:
    """Measure frames/s, real-time factor, time to first audio, per-frame breakdown, peak RSS and
    the memory-bandwidth roofline, for each contender in its own worker process."""
    modes = [name for name, on in (("--prefix", prefix), ("--positions", positions_arg), ("--streams", streams_arg))
             if on]
    if prefix and len(modes) > 1:
        raise click.ClickException(f"{' and '.join(modes)} are separate benchmarks: run one at a time")
    check_bench_outputs(Path(out), PREFIX_FILES if prefix else POSITIONS_FILES if positions_arg
                        else STREAMS_FILES if streams_arg else BENCH_FILES)
    if prefix:
        _prefix_bench(artifacts[0], prefix_seconds, repeats, text, threads, Path(out))
        return
    if not no_plots and importlib.util.find_spec("matplotlib") is None:  # before minutes of measuring
        raise click.ClickException("the plots need matplotlib: pip install 'dia2-trt[bench]', or pass --no-plots")
    try:
        manifests = [load_manifest(a, verify=not no_verify) for a in artifacts]
    except ArtifactError as exc:
        raise click.ClickException(str(exc)) from None
    if positions_arg or streams_arg:
        settings = ModeSettings(list(artifacts), (backends or BACKENDS)[0], threads, frames, repeats, warmup_frames,
                                seed, Path(out), not no_plots)
        if positions_arg:
            _positions_bench(positions_arg, streams_arg, settings)
        else:
            _streams_bench(streams_arg, settings)
        return
    ref_checkpoint = (checkpoint or manifests[0].source.checkpoint) if reference else None
    contenders, skipped = plan_contenders([Path(a) for a in artifacts], backends or BACKENDS, ref_checkpoint, threads)
    if not contenders:
        raise click.ClickException("no contender can run here: " + "; ".join(s["reason"] for s in skipped))
    if profile:
        contenders = [replace(c, profile_dir=str(Path(out, "profile", c.name).resolve())) if c.kind == "runtime"
                      else c for c in contenders]
    echo = lambda msg: click.echo(f"[bench] {msg}", err=True)  # noqa: E731
    for s in skipped:
        echo(f"skipped {s['contender']}: {s['reason']}")
    settings = Settings(text=text, seed=seed, frames=frames, repeats=repeats, warmup_frames=warmup_frames,
                        schedule=schedule)
    result = run_bench(contenders, skipped, settings, manifests[0], echo)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(result) + node_profile.markdown(
        {c["name"]: c["node_profile"] for c in result["contenders"] if c.get("node_profile")})
    write_text(out / "bench.json", json.dumps(result, indent=1) + "\n")
    write_text(out / "bench.md", table)
    if not no_plots:
        plot(result, out)
    click.echo(table)


BENCH_FILES = ("bench.json", "bench.md", "latency.png", "breakdown.png")
PREFIX_FILES = ("prefix_bench.json", "prefix_bench.md")
POSITIONS_FILES = ("positions_bench.json", "positions_bench.md", "positions.png")
STREAMS_FILES = ("streams_bench.json", "streams_bench.md", "streams.png")


@dataclass(frozen=True)
class ModeSettings:
    """What --positions and --streams take from the bench's options."""

    artifacts: list[str]
    backend: str
    threads: int | None
    frames: int
    repeats: int
    warmup_frames: int
    seed: int
    out: Path
    plots: bool


def _positions_bench(arg: str, streams_arg: str | None, s: ModeSettings) -> None:
    from . import positions, streams

    try:
        wanted = positions.parse_positions(arg)
        counts = streams.parse_streams(streams_arg) if streams_arg else [1]
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    result = positions.run_positions_bench(s.artifacts, wanted, s.frames, s.repeats, s.warmup_frames, s.backend,
                                           s.threads, s.seed, tuple(counts), _echo)
    if not any(a["positions"] for a in result["artifacts"]):
        reasons = [f"{a['name']}: {a['cache_capacity']} rows" for a in result["artifacts"]]
        reasons += [f"{k['artifacts']}: {k['reason']}" for k in result["skipped_streams"]]
        raise click.ClickException("nothing to measure: no position fits these artifacts' caches or no stream "
                                   "count their graphs: " + "; ".join(reasons))
    _write_mode(s, "positions_bench", result, positions.markdown(result),
                lambda: positions.plot(result, s.out / "positions.png", save_png))


def _streams_bench(arg: str, s: ModeSettings) -> None:
    from . import streams

    try:
        counts = streams.parse_streams(arg)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    result = streams.run_streams_bench(s.artifacts[0], counts, s.frames, s.repeats, s.warmup_frames, s.backend,
                                       s.threads, s.seed, _echo)
    _write_mode(s, "streams_bench", result, streams.markdown(result),
                lambda: streams.plot(result, s.out / "streams.png", save_png))


def _write_mode(s: ModeSettings, stem: str, result: dict, table: str, draw) -> None:
    s.out.mkdir(parents=True, exist_ok=True)
    write_text(s.out / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    write_text(s.out / f"{stem}.md", table)
    if s.plots:
        draw()
    click.echo(table)


def _echo(msg: str) -> None:
    click.echo(f"[bench] {msg}", err=True)


def save_png(path: Path, fig) -> None:
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def check_bench_outputs(out: Path, names: tuple[str, ...]) -> None:
    """Before minutes of measuring: OUT is a directory (or can be made), and no report file in it is
    a symbolic link, device or directory (they are replaced by renaming, never written through)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise click.ClickException(f"--out {out} is not a directory")
    if out.is_dir():
        check_outputs({f"--out {name}": str(out / name) for name in names})


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _prefix_bench(artifacts: str, seconds: float, repeats: int, text: str, threads, out: Path) -> None:
    from dia2_trt.runtime.audio import AudioError
    from dia2_trt.runtime.script import ScriptError
    from dia2_trt.runtime.voice import VoiceError

    from .prefix import run_prefix_bench, write_report

    echo = lambda msg: click.echo(f"[bench] {msg}", err=True)  # noqa: E731
    try:
        result = run_prefix_bench(artifacts, seconds, repeats, text, threads, echo)
    except (ArtifactError, AudioError, ScriptError, VoiceError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(write_report(result, out))
