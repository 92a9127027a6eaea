"""The reference's prefix warm-up (``warmup_with_prefix`` + ``build_initial_state``), host side.

For each prefix frame t = 0 .. A-1 the reference runs one backbone step whose
audio channels read the delayed prefix codes (bos where t < delay) and whose
text channels hold the previous frame's state-machine output, then forces the
machine with *new word* at the plan's steps and *pad* elsewhere. The logits are
discarded, so every input is known before the first step: ``warmup_tokens``
computes them all (and leaves the machine where the reference leaves it), and
the backbone can then run frame by frame (step graph) or in one call (prefill
graph). Generation restarts at frame A - 1 with A rows already in the cache, so
from then on frame t writes cache row t + 1 (``ROW_SHIFT``).

A ``WarmState`` keeps the cache rows of the script-independent part of a
warm-up; restoring it and generating gives the tokens of a fresh warm-up.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .files import write_atomic
from .state_machine import Entry, StateMachine, TextState, TokenIds
from .voice import PrefixPlan, VoiceError

ROW_SHIFT = 1  # after a warm-up, frame t's K/V row is t + 1 (the reference re-runs frame A - 1)
WARM_FORMAT, WARM_VERSION = "dia2-trt-warm-state", 1


@dataclass
class Prefix:
    """An audio prefix for one utterance: the plan, and whether its audio stays in the output."""

    plan: PrefixPlan
    include_audio: bool = False

    @property
    def frames(self) -> int:
        return self.plan.frames


def delay_codes(codes: np.ndarray, delays: Sequence[int], pad: int) -> np.ndarray:
    """The reference's ``delay_frames``: [Q, A] aligned -> [Q, A + max_delay], codebook q shifted right by delays[q]."""
    q, frames = codes.shape
    out = np.full((q, frames + max(delays, default=0)), pad, dtype=np.int64)
    for i, delay in enumerate(delays):
        out[i, delay: delay + frames] = codes[i]
    return out


def warmup_tokens(plan: PrefixPlan, machine: StateMachine, state: TextState, ids: TokenIds,
                  delays: Sequence[int], tokens: np.ndarray) -> np.ndarray:
    """Step tokens [A, 2, C] of the warm-up frames; advances ``state`` and ``tokens`` past them.

    ``tokens`` [2, C] enters holding the initial step tokens and leaves holding
    what the reference's first generation step reads (frame A - 1's machine output).
    """
    delayed = delay_codes(plan.codes, delays, ids.audio_pad)
    delays_arr = np.asarray(delays)
    forced_steps = set(plan.new_word_steps)
    out = np.empty((plan.frames, *tokens.shape), dtype=np.int64)
    for t in range(plan.frames):
        tokens[:, 2:] = np.where(delays_arr > t, ids.audio_bos, delayed[:, t])
        out[t] = tokens
        forced = ids.new_word if t in forced_steps else ids.pad
        main, second = machine.process(t, state, forced, forced=True)
        tokens[0, 0], tokens[0, 1] = main, second
        tokens[1, 0], tokens[1, 1] = ids.zero, ids.pad
    return out


def script_free_frames(plan: PrefixPlan, machine: StateMachine, ids: TokenIds, delays: Sequence[int],
                       tokens: np.ndarray) -> np.ndarray:
    """The leading warm-up inputs that do not depend on the script that follows: [W, 2, C].

    With a second text stream the machine looks ahead ``second_stream_ahead``
    words, so the last prefix words' frames read the script's first words. The
    warm-up is simulated with sentinel words (token -1) after the prefix; frames
    before the first sentinel are the same for every script.
    """
    sentinel = [Entry(tokens=[-1], text="", padding=0)] * (machine.second_stream_ahead + 1)
    state = machine.new_state([*plan.entries, *sentinel])
    seq = warmup_tokens(plan, machine, state, ids, delays, tokens.copy())
    tainted = np.flatnonzero((seq < 0).any(axis=(1, 2)))
    return seq[: tainted[0] if tainted.size else plan.frames]


@dataclass
class WarmState:
    """A voice pair's warm-up, reusable across scripts: the K/V rows [L, 2, Hkv, W, D] of its
    first W frames (those ``script_free_frames`` finds) and the step tokens [W, 2, C] they were
    computed from. A session restores the rows and runs only frames W .. A-1 (the last words,
    whose inputs read the script)."""

    plan: PrefixPlan
    k_rows: np.ndarray
    v_rows: np.ndarray
    tokens: np.ndarray
    artifacts: dict[str, str]

    @property
    def frames(self) -> int:
        return int(self.tokens.shape[0])

    def save(self, path: str | Path) -> None:
        meta = {"format": WARM_FORMAT, "version": WARM_VERSION, "artifacts": self.artifacts,
                "plan": {"entries": [_entry_json(e) for e in self.plan.entries],
                         "new_word_steps": self.plan.new_word_steps}}

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, k_rows=self.k_rows, v_rows=self.v_rows, tokens=self.tokens, codes=self.plan.codes,
                         meta=np.array(json.dumps(meta)))

        write_atomic(Path(path), write)

    @classmethod
    def load(cls, path: str | Path) -> "WarmState":
        path = Path(path)
        if path.is_file() and not zipfile.is_zipfile(path):
            raise VoiceError(f"{path}: not a warm-state file")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in ("k_rows", "v_rows", "tokens", "codes")}
                meta = json.loads(str(data["meta"]))
            if meta.get("format") != WARM_FORMAT or meta.get("version") != WARM_VERSION:
                raise ValueError("not a dia2-trt warm state of this version")
            plan = PrefixPlan([_entry(e) for e in meta["plan"]["entries"]],
                              [int(s) for s in meta["plan"]["new_word_steps"]], arrays["codes"])
            return cls(plan, arrays["k_rows"], arrays["v_rows"], arrays["tokens"],
                       {str(k): str(v) for k, v in dict(meta["artifacts"]).items()})
        except FileNotFoundError:
            raise VoiceError(f"{path}: no such warm-state file") from None
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise VoiceError(f"{path}: not a usable warm-state file ({str(exc).splitlines()[0]})") from None


def _entry_json(entry: Entry) -> dict:
    return {"text": entry.text, "tokens": list(entry.tokens), "padding": entry.padding}


def _entry(raw: dict) -> Entry:
    return Entry(tokens=[int(t) for t in raw["tokens"]], text=str(raw["text"]), padding=int(raw["padding"]))
