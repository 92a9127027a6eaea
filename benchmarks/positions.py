"""``dia2-rt bench --positions``: ms per frame at given KV-cache positions, per component.

The backbone's step attends over every cache row written so far, so a frame late in a long
utterance costs more than an early one; the depformer and the codec have no position-dependent
input. This measures how much, without generating hundreds of frames: for each artifact
directory the runtime is loaded once (one stream per session) and one ``step.FrameStepper``
taken from its pool: the bindings, KV cache and codec state a session steps with, driven
through the stepper's own calls, so the graph contract stays the runtime's. In each of
``rounds`` walks from a restarted stepper, at each position P (ascending) the cache rows 0..P
are filled with random K/V through ``FrameStepper.write_rows`` (the values do not change the
work a step does: a masked row costs what a live one does), and then ``frames`` frames are timed
after ``warmup`` untimed:

- backbone: ``backbone_step`` at RoPE position P writing cache row P (the stepper's feed
  assembly and row write included, as in a session's frame);
- depformer: ``depformer_frame`` on that step's outputs, sampling on (the default params);
- codec: ``decode`` of one stream advanced frame by frame through random codes to frame P, so its
  carried state is that of a stream P frames long.

The runtime's growing cache (ONNX Runtime) means a step at P reads P + 1 rows rounded up to
``KVCache.ROW_STEP``; TensorRT's cache is read at its capacity at every position.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dia2_trt.runtime import Dia2Runtime, GenerationParams
from dia2_trt.runtime.step import BackboneCall, DecodeCall, DepformerCall, FrameStepper

from .harness import COMPONENTS, machine_info, spread

_FILL_ROWS = 64  # random K/V written this many rows at a time: one small block reused, not a cache-sized array


def parse_positions(text: str) -> list[int]:
    """"0,375,750" -> [0, 375, 750] (sorted, unique); ValueError with one line otherwise."""
    try:
        positions = sorted({int(p) for p in text.split(",") if p.strip()})
    except ValueError:
        raise ValueError(f"--positions takes comma-separated integers, got {text!r}") from None
    if not positions or positions[0] < 0:
        raise ValueError(f"--positions takes integers >= 0, got {text!r}")
    return positions


def run_positions_bench(artifacts: list[str], positions: list[int], frames: int, rounds: int, warmup: int,
                        backend: str, threads: int | None, seed: int = 0, streams: tuple[int, ...] = (1,),
                        echo: Callable[[str], None] = lambda msg: None) -> dict:
    """One entry per (artifacts, stream count) in ``artifacts``; counts past an artifact's max_streams are
    listed under ``skipped_streams``."""
    runs, skipped = [], []
    for directory in artifacts:
        echo(f"loading {directory}")
        # bench's caller verified the files; no batch engine: the steppers are driven here
        rt = Dia2Runtime.load(directory, backend, threads, verify=False, max_streams=1)
        most = getattr(rt.manifest, "max_streams", 1)
        for n in streams:
            if n > most:
                skipped.append({"artifacts": Path(directory).name, "streams": n,
                                "reason": f"these graphs step at most {most} streams"})
                continue
            runs.append(_measure(rt, directory, positions, _Plan(frames, rounds, warmup, n), seed, echo))
        del rt  # one artifact's graphs in memory at a time
    return {"machine": machine_info(), "settings": {"positions": positions, "frames": frames, "rounds": rounds,
                                                    "warmup": warmup, "streams": list(streams), "backend": backend,
                                                    "threads": threads, "seed": seed},
            "artifacts": runs, "skipped_streams": skipped}


@dataclass(frozen=True)
class _Plan:
    frames: int  # timed runs per position per round
    rounds: int  # walks over every position from a fresh state
    warmup: int  # untimed runs before each position's timed ones
    streams: int = 1  # streams stepped in each call, every one at the same position


def _measure(rt: Dia2Runtime, directory: str, positions: list[int], plan: _Plan, seed: int,
             echo: Callable[[str], None]) -> dict:
    """Every position, in ``plan.rounds`` walks from a fresh state: the machine's drift over a run (10-20 %
    on this 2-core host) falls on every position alike instead of on whichever was measured last."""
    m = rt.manifest
    usable = [p for p in positions if p < m.cache_capacity]
    skipped = [{"position": p, "reason": f"past the cache capacity ({m.cache_capacity} rows, positions "
                                         f"0..{m.cache_capacity - 1})"} for p in positions if p >= m.cache_capacity]
    rng = np.random.default_rng(seed)
    times = {p: {c: [] for c in COMPONENTS} for p in usable}
    rows_read: dict[int, int] = {}
    # One stream: the pooled stepper a session gets. More: a batch of that many slots, as the engine's.
    stepper = rt.solo.take() if plan.streams == 1 else FrameStepper(m, rt.bind, plan.streams)
    slots = range(plan.streams)
    try:
        for r in range(plan.rounds):
            stepper.restart()
            probe, rows = _CodecProbe(stepper, slots, m.audio_channels, m.codec.codebook_size, rng), 0
            for p in usable:
                rows = _fill(stepper, slots, rows, p + 1, rng)
                echo(f"{Path(directory).name} x{plan.streams}: round {r + 1}/{plan.rounds}, position {p}")
                for c, seconds in _at_position(rt, stepper, slots, probe, p, plan, rng).items():
                    times[p][c] += seconds
                rows_read[p] = _rows_read(stepper)
    finally:
        if plan.streams == 1:
            rt.solo.give_back(stepper)  # the next session restarts it
    measured = [_row(p, rows_read[p], times[p]) for p in usable]
    for row in measured:  # the backbone's own ratio too: the only part that depends on the position
        row["over_first"] = row["frame_seconds"] / measured[0]["frame_seconds"]
        row["backbone_over_first"] = (row["seconds"]["backbone"]["median"]
                                      / measured[0]["seconds"]["backbone"]["median"])
        row["frame_seconds_per_stream"] = row["frame_seconds"] / plan.streams
    return {"name": Path(directory).name, "source": str(directory), "precision": m.precision,
            "streams": plan.streams, "cache_capacity": m.cache_capacity, "frame_rate": m.frame_rate,
            "positions": measured, "skipped": skipped}


def _row(p: int, rows_read: int, times: dict[str, list[float]]) -> dict:
    return {"position": p, "cache_rows_read": rows_read, "seconds": {c: spread(v) for c, v in times.items()},
            "frame_seconds": sum(float(np.median(v)) for v in times.values())}


def _fill(stepper: FrameStepper, slots: range, done: int, rows: int, rng: np.random.Generator) -> int:
    """Every slot's cache rows done..rows-1 get random K/V; returns ``rows``. One block of _FILL_ROWS rows
    is drawn once per call and written repeatedly: the values matter to no timing, only that they are finite."""
    if rows <= done:
        return done
    c = stepper.cache
    block = rng.standard_normal((len(stepper.cache_names), 2, c.heads, min(_FILL_ROWS, rows - done), c.width),
                                dtype=np.float32).astype(c.dtype, copy=False)
    for start in range(done, rows, _FILL_ROWS):
        part = block[..., : min(_FILL_ROWS, rows - start), :]
        for slot in slots:
            stepper.write_rows(slot, start, part, part)
    return rows


def _at_position(rt: Dia2Runtime, stepper: FrameStepper, slots: range, probe: _CodecProbe, p: int, plan: _Plan,
                 rng: np.random.Generator) -> dict[str, list[float]]:
    """``plan.frames`` timed frames at position ``p`` after ``plan.warmup`` untimed: seconds per component
    (each one call for every slot)."""
    m, params = rt.manifest, GenerationParams()
    step = {slot: BackboneCall(_start_tokens(rt), p, p) for slot in slots}
    text = (m.token_ids.pad, m.token_ids.pad)
    times: dict[str, list[float]] = {c: [] for c in COMPONENTS}
    probe.advance_to(p)
    for i in range(plan.warmup + plan.frames):
        began = time.perf_counter()
        out = stepper.backbone_step(step)
        backbone = time.perf_counter() - began
        frame = {slot: DepformerCall(out[slot].hidden, out[slot].cb0_logits, text,
                                     rng.random(m.audio_channels, np.float32), params) for slot in slots}
        began = time.perf_counter()
        stepper.depformer_frame(frame)
        depformer = time.perf_counter() - began
        codec = probe.decode_one()
        if i >= plan.warmup:
            for name, seconds in zip(COMPONENTS, (backbone, depformer, codec)):
                times[name].append(seconds)
    return times


def _start_tokens(rt: Dia2Runtime) -> np.ndarray:
    """A CFG pair's step tokens as at an utterance's start: bos / zero, pad text, audio bos (inside the delays)."""
    ids, q = rt.manifest.token_ids, rt.manifest.audio_channels
    tokens = np.full((2, 2 + q), ids.pad, dtype=np.int64)
    tokens[:, 2:] = ids.audio_bos
    tokens[0, 0], tokens[1, 0] = ids.bos, ids.zero
    return tokens


def _rows_read(stepper: FrameStepper) -> int:
    """Cache rows a step reads now: the growing cache's current rows, or the capacity."""
    return int(stepper.cache.rows) if stepper.cache.grows else int(stepper.cache.capacity)


class _CodecProbe:
    """The slots' decoder streams, advanced through random codes, whose frames are timed at the positions
    asked (one ``decode`` call for every slot: batched where the codec graph has a stream axis)."""

    def __init__(self, stepper: FrameStepper, slots: range, channels: int, codebook: int,
                 rng: np.random.Generator) -> None:
        self.stepper, self.slots, self.frames = stepper, slots, 0
        self._channels, self._codebook, self._rng = channels, codebook, rng

    def _calls(self) -> dict[int, DecodeCall]:
        return {slot: DecodeCall(self._rng.integers(0, self._codebook, self._channels, dtype=np.int64))
                for slot in self.slots}

    def advance_to(self, frame: int) -> None:
        while self.frames < frame:
            self.stepper.decode(self._calls())
            self.frames += 1

    def decode_one(self) -> float:
        calls = self._calls()
        began = time.perf_counter()
        self.stepper.decode(calls)
        self.frames += 1
        return time.perf_counter() - began


# --- report ------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"ms per frame at each cache position ({s['backend']}; median of {s['frames']} frames x "
             f"{s['rounds']} rounds over the positions, {s['warmup']} untimed before each; "
             f"frame = backbone + depformer + codec medians, host work excluded; with several streams, every "
             f"stream at the position, one call per graph for all).", "",
             "| artifacts | streams | position | cache rows read | backbone ms | depformer ms | codec ms | frame ms "
             "| ms per stream | frame vs first | backbone vs first |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in result["artifacts"]:
        for row in a["positions"]:
            parts = " | ".join(f"{row['seconds'][c]['median'] * 1e3:.3g}" for c in COMPONENTS)
            lines.append(f"| {a['name']} ({a['precision']}) | {a['streams']} | {row['position']} "
                         f"| {row['cache_rows_read']} | {parts} | {row['frame_seconds'] * 1e3:.3g} "
                         f"| {row['frame_seconds_per_stream'] * 1e3:.3g} | {row['over_first']:.2f}x "
                         f"| {row['backbone_over_first']:.2f}x |")
    skipped = [f"- {a['name']} x{a['streams']}: position {s['position']} skipped, {s['reason']}"
               for a in result["artifacts"] for s in a["skipped"]]
    skipped += [f"- {s['artifacts']}: {s['streams']} streams skipped, {s['reason']}"
                for s in result.get("skipped_streams", [])]
    return "\n".join(lines + ([""] + skipped if skipped else [])) + "\n"


def plot(result: dict, path: Path, save: Callable[[Path, object], None]) -> None:
    """Per artifact directory: ms per frame against position, one line per component and the total."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [a for a in result["artifacts"] if a["positions"]]
    fig, axes = plt.subplots(1, max(len(runs), 1), figsize=(5.5 * max(len(runs), 1), 4), squeeze=False)
    for ax, a in zip(axes[0], runs):
        x = [row["position"] for row in a["positions"]]
        for c in COMPONENTS:
            ax.plot(x, [row["seconds"][c]["median"] * 1e3 for row in a["positions"]], marker="o", label=c)
        ax.plot(x, [row["frame_seconds"] * 1e3 for row in a["positions"]], marker="s", color="black",
                label="frame")
        ax.set_xlabel("cache position (frames)")
        ax.set_ylabel("ms (median)")
        ax.set_ylim(0, 1.3 * max(row["frame_seconds"] * 1e3 for row in a["positions"]))  # room for the legend
        ax.set_title(f"{a['name']} ({a['precision']}), {a['streams']} stream{'s' if a['streams'] > 1 else ''}")
        ax.legend(fontsize=8, ncol=4, loc="upper center")
    fig.tight_layout()
    save(path, fig)
    plt.close(fig)
