"""``dia2-rt bench --positions``: ms per frame at given KV-cache positions, per component.

The backbone's step attends over every cache row written so far, so a frame late in a long
utterance costs more than an early one; the depformer and the codec have no position-dependent
input. This measures how much, without generating hundreds of frames: for each artifact
directory the runtime is loaded once and one generation state taken from its pool (its own
bindings and KV cache, exactly what a session steps with). In each of ``rounds`` walks from a
fresh state, at each position P (ascending) the cache rows 0..P are filled with random K/V
through the state's own ``write_rows`` (the values do not change the work a step does: a masked
row costs what a live one does), and then ``frames`` frames are timed after ``warmup`` untimed:

- backbone: the step at RoPE position P writing cache row P, fed through the runtime's own feed
  helper (so the graph contract stays the runtime's);
- depformer: the whole-frame graph on that step's outputs, sampling on (the default params);
- codec: one decoder stream advanced frame by frame through random codes to frame P, so its
  carried state is that of a stream P frames long, then one frame decoded per timed frame.

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
from dia2_trt.runtime.state_machine import StateMachine

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
                        backend: str, threads: int | None, seed: int = 0,
                        echo: Callable[[str], None] = lambda msg: None) -> dict:
    runs = []
    for directory in artifacts:
        echo(f"loading {directory}")
        rt = Dia2Runtime.load(directory, backend, threads, verify=False)  # bench's caller verified them
        runs.append(_measure(rt, directory, positions, _Plan(frames, rounds, warmup), seed, echo))
        del rt  # one artifact's graphs in memory at a time
    return {"machine": machine_info(), "settings": {"positions": positions, "frames": frames, "rounds": rounds,
                                                    "warmup": warmup, "backend": backend, "threads": threads,
                                                    "seed": seed},
            "artifacts": runs}


@dataclass(frozen=True)
class _Plan:
    frames: int  # timed runs per position per round
    rounds: int  # walks over every position from a fresh state
    warmup: int  # untimed runs before each position's timed ones


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
    state = rt.states.take()
    try:
        for r in range(plan.rounds):
            _reset(rt, state)
            probe, rows = _CodecProbe(state.codec, m.audio_channels, m.codec.codebook_size, rng), 0
            for p in usable:
                rows = _fill(state, rows, p + 1, rng)
                echo(f"{Path(directory).name}: round {r + 1}/{plan.rounds}, position {p}")
                for c, seconds in _at_position(rt, state, probe, p, plan, rng).items():
                    times[p][c] += seconds
                rows_read[p] = _rows_read(state)
    finally:
        rt.states.give_back(state)  # the next take() scrubs it
    measured = [_row(p, rows_read[p], times[p]) for p in usable]
    for row in measured:  # the backbone's own ratio too: the only part that depends on the position
        row["over_first"] = row["frame_seconds"] / measured[0]["frame_seconds"]
        row["backbone_over_first"] = (row["seconds"]["backbone"]["median"]
                                      / measured[0]["seconds"]["backbone"]["median"])
    return {"name": Path(directory).name, "source": str(directory), "precision": m.precision,
            "cache_capacity": m.cache_capacity, "frame_rate": m.frame_rate, "positions": measured,
            "skipped": skipped}


def _row(p: int, rows_read: int, times: dict[str, list[float]]) -> dict:
    return {"position": p, "cache_rows_read": rows_read, "seconds": {c: spread(v) for c, v in times.items()},
            "frame_seconds": sum(float(np.median(v)) for v in times.values())}


def _reset(rt: Dia2Runtime, state) -> None:
    """The state at an utterance's start (step tokens as a session's first frame has them)."""
    m = rt.manifest
    machine = StateMachine(m.token_ids, second_stream_ahead=m.second_stream_ahead, initial_padding=0,
                           max_padding=m.max_padding)
    state.reset(m, machine, GenerationParams())


def _fill(state, done: int, rows: int, rng: np.random.Generator) -> int:
    """Cache rows done..rows-1 get random K/V; returns ``rows``. One block of _FILL_ROWS rows is drawn once
    per call and written repeatedly: the values matter to no timing, only that they are finite."""
    if rows <= done:
        return done
    shape = _row_block_shape(state)
    k = rng.standard_normal((*shape[:3], min(_FILL_ROWS, rows - done), shape[3]), dtype=np.float32)
    k = k.astype(state.cache.layer("k", 0).dtype, copy=False)
    for start in range(done, rows, _FILL_ROWS):
        count = min(_FILL_ROWS, rows - start)
        block = k[..., :count, :]
        try:
            state.write_rows(slice(start, start + count), block, block)
        except ValueError:  # a binding that writes one row per call (TensorRT's)
            for j in range(count):
                row = np.ascontiguousarray(block[..., j, :])
                state.write_rows(start + j, row, row)
    return rows


def _row_block_shape(state) -> tuple[int, ...]:
    """[L, branches, Hkv, D]: what write_rows takes per row (L layers of the cache's [branches, Hkv, rows, D])."""
    layer = state.cache.layer("k", 0)
    return (len(state.cache_names), layer.shape[0], layer.shape[1], layer.shape[3])


def _at_position(rt: Dia2Runtime, state, probe: _CodecProbe, p: int, plan: _Plan,
                 rng: np.random.Generator) -> dict[str, list[float]]:
    """``plan.frames`` timed frames at position ``p`` after ``plan.warmup`` untimed: seconds per component."""
    feeds = _backbone_feeds(rt, state.tokens, p)
    params = GenerationParams()
    times: dict[str, list[float]] = {c: [] for c in COMPONENTS}
    probe.advance_to(p)
    for i in range(plan.warmup + plan.frames):
        began = time.perf_counter()
        out = state.backbone.run(feeds)
        backbone = time.perf_counter() - began
        state.write_rows(p, out["k_new"], out["v_new"])  # as a frame does (not timed: host work)
        dep_feeds = _depformer_feeds(rt, state, out, params, rng)
        began = time.perf_counter()
        state.depformer.run(dep_feeds)
        depformer = time.perf_counter() - began
        codec = probe.decode_one()
        if i >= plan.warmup:
            for name, seconds in zip(COMPONENTS, (backbone, depformer, codec)):
                times[name].append(seconds)
    return times


def _rows_read(state) -> int:
    """Cache rows a step reads now: the growing cache's current rows, or the capacity."""
    return int(state.cache.rows) if state.cache.grows else int(state.cache.capacity)


def _backbone_feeds(rt: Dia2Runtime, tokens: np.ndarray, p: int) -> dict:
    """The step's inputs at RoPE position ``p`` and cache row ``p``, through the runtime's own helper."""
    return rt.step_feeds(tokens, p, p)


def _depformer_feeds(rt: Dia2Runtime, state, out, params: GenerationParams, rng: np.random.Generator) -> dict:
    """The depformer's inputs as Session._depformer_step builds them (pad text tokens, fresh noise)."""
    pad = rt.manifest.token_ids.pad
    rng.random(out=state.noise, dtype=np.float32)
    return {"hidden": out["hidden"], "cb0_logits": out["cb0_logits"], "text_tokens": (pad, pad),
            "noise": state.noise, "temperature": params.audio_temperature, "top_k": params.audio_top_k,
            "cfg_scale": params.cfg_scale, "cfg_filter_k": params.cfg_filter_k}


class _CodecProbe:
    """One decoder stream, advanced through random codes, whose frames are timed at the positions asked."""

    def __init__(self, codec, channels: int, codebook: int, rng: np.random.Generator) -> None:
        self.codec, self.frames, self._channels, self._codebook, self._rng = codec, 0, channels, codebook, rng

    def _codes(self) -> np.ndarray:
        return self._rng.integers(0, self._codebook, self._channels, dtype=np.int64)

    def advance_to(self, frame: int) -> None:
        while self.frames < frame:
            self.codec.decode_frame(self._codes())
            self.frames += 1

    def decode_one(self) -> float:
        codes = self._codes()
        began = time.perf_counter()
        self.codec.decode_frame(codes)
        self.frames += 1
        return time.perf_counter() - began


# --- report ------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"ms per frame at each cache position ({s['backend']}; median of {s['frames']} frames x "
             f"{s['rounds']} rounds over the positions, {s['warmup']} untimed before each; "
             f"frame = backbone + depformer + codec medians, host work excluded).", "",
             "| artifacts | position | cache rows read | backbone ms | depformer ms | codec ms | frame ms "
             "| frame vs first | backbone vs first |", "|---|---|---|---|---|---|---|---|---|"]
    for a in result["artifacts"]:
        for row in a["positions"]:
            parts = " | ".join(f"{row['seconds'][c]['median'] * 1e3:.3g}" for c in COMPONENTS)
            lines.append(f"| {a['name']} ({a['precision']}) | {row['position']} | {row['cache_rows_read']} "
                         f"| {parts} | {row['frame_seconds'] * 1e3:.3g} | {row['over_first']:.2f}x "
                         f"| {row['backbone_over_first']:.2f}x |")
    skipped = [f"- {a['name']}: position {s['position']} skipped, {s['reason']}"
               for a in result["artifacts"] for s in a["skipped"]]
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
        ax.set_title(f"{a['name']} ({a['precision']})")
        ax.legend(fontsize=8, ncol=4, loc="upper center")
    fig.tight_layout()
    save(path, fig)
    plt.close(fig)
