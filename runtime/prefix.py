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
warm-up; restoring it and generating gives the tokens of a fresh warm-up. It is
a cache of one artifact directory's run, so it records the sha256 of every graph
and of the tokenizer, and is refused (one line naming the file that differs) by
other artifacts; a file of format version 1 (which recorded only the encoder and
tokenizer) is refused with the way to make it again. Its file is read like a
voice's (``voice.read_npz``: shapes and sizes checked before any data is read),
and its values are checked against the artifacts before a session restores them
(``check_warm``): shapes and dtype of the rows, finite rows, codes and tokens in
range, and step tokens equal to what the plan gives now.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .files import InputFileError, parse_json, write_atomic
from .state_machine import Entry, StateMachine, TextState, TokenIds
from .voice import (
    MAX_CODES_BYTES,
    MAX_META_BYTES,
    NpyMember,
    PrefixPlan,
    VoiceError,
    check_codes,
    checked_hashes,
    checked_ints,
    entries_from_json,
    is_int64,
    is_text,
    read_npz,
)

if TYPE_CHECKING:
    from .runtime import Dia2Runtime

ROW_SHIFT = 1  # after a warm-up, frame t's K/V row is t + 1 (the reference re-runs frame A - 1)
# Version 2 records every graph's hash (version 1: the encoder's and the tokenizer's only).
WARM_FORMAT, WARM_VERSION = "dia2-trt-warm-state", 2
WARM_REMEDY = "recreate it with Dia2Runtime.warm(prefix).save(path) on these artifacts"
# A warm state's rows are as large as the prefix's cache: 2B's 1500 rows are 0.69 GB. They are
# stored, not compressed (read_npz refuses a large compressed member), so each byte is on disk.
MAX_WARM_BYTES = 8 << 30
ROW_DTYPES = (np.dtype("<f4"), np.dtype("<f2"))


@dataclass
class Prefix:
    """An audio prefix for one utterance: the plan, and whether its audio stays in the output."""

    plan: PrefixPlan
    include_prefix: bool = False

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
    # The row arrays _check_finite last passed, by identity: new arrays are scanned again.
    _finite: tuple[np.ndarray | None, np.ndarray | None] = field(default=(None, None), init=False, repr=False,
                                                                 compare=False)

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
    def load(cls, path: str | Path, runtime: Dia2Runtime | None = None) -> WarmState:
        """A saved warm state. With ``runtime`` its arrays' shapes are checked against those
        artifacts before any is read, and the whole state after (``runtime.check_warm``)."""
        path = Path(path)
        rows = NpyMember(lambda d: d in ROW_DTYPES, "float32 or float16", 5, MAX_WARM_BYTES)
        members = {"k_rows": rows, "v_rows": rows, "tokens": NpyMember(is_int64, "int64", 3, MAX_CODES_BYTES),
                   "codes": NpyMember(is_int64, "int64", 2, MAX_CODES_BYTES),
                   "meta": NpyMember(is_text, "text", 0, MAX_META_BYTES)}
        expect = runtime.warm_layout() if runtime is not None else None
        try:
            data = read_npz(path, members, MAX_WARM_BYTES, "warm-state file", lambda h: _check_layout(h, expect))
            meta = parse_json(str(data["meta"]), f"warm-state file {path}: meta")
            warm = _warm_from(meta, data)
            if runtime is not None:
                runtime.check_warm(warm)
        except (InputFileError, VoiceError) as exc:
            text = str(exc)
            raise VoiceError(text if text.startswith(("warm-state file", str(path))) else f"{path}: {text}") from None
        return warm


def _check_layout(headers: dict, expect: dict | None) -> None:
    """The members' shapes agree with each other (and with the artifacts' cache, when known)."""
    (k_shape, k_dtype), (v_shape, v_dtype) = headers["k_rows"], headers["v_rows"]
    tokens, codes = headers["tokens"][0], headers["codes"][0]
    frames = tokens[0]
    if k_shape != v_shape or k_dtype != v_dtype or k_shape[3] != frames or tokens[1:] != (2, codes[0] + 2) \
            or not 0 < frames <= codes[1]:
        raise VoiceError(f"arrays of mismatched shapes: k_rows {k_shape}, v_rows {v_shape}, tokens {tokens}, "
                         f"codes {codes}")
    if expect is not None:
        want = (*expect["rows"][:3], frames, expect["rows"][3])
        if k_shape != want or k_dtype != expect["dtype"] or codes[0] != expect["channels"]:
            raise VoiceError(f"k_rows/v_rows are {k_dtype} {k_shape}, these artifacts' cache rows "
                             f"{expect['dtype']} {want}")


def _warm_from(meta, data: dict) -> WarmState:
    if not isinstance(meta, dict) or meta.get("format") != WARM_FORMAT:
        raise VoiceError("not a dia2-trt warm-state file")
    if meta.get("version") == 1:
        raise VoiceError(f"warm-state format version 1 records only the codec encoder's and tokenizer's hashes, not "
                         f"every graph's; {WARM_REMEDY}")
    if meta.get("version") != WARM_VERSION or set(meta) != {"format", "version", "artifacts", "plan"}:
        raise VoiceError(f"warm-state format version {_version(meta)} is not supported; {WARM_REMEDY}")
    plan = meta["plan"]
    if not isinstance(plan, dict) or set(plan) != {"entries", "new_word_steps"}:
        raise VoiceError("plan: expected {\"entries\", \"new_word_steps\"}")
    check_codes(data["codes"], None, None, "codes")
    if data["tokens"].min() < 0:
        raise VoiceError("tokens must be non-negative")
    prefix_plan = PrefixPlan(entries_from_json(plan["entries"], "plan.entries"),
                             checked_ints(plan["new_word_steps"], "plan.new_word_steps"), data["codes"])
    warm = WarmState(prefix_plan, data["k_rows"], data["v_rows"], data["tokens"],
                     checked_hashes(meta["artifacts"], "artifacts"))
    _check_finite(warm)
    return warm


def _version(meta: dict) -> str:
    version = meta.get("version")
    return repr(version) if isinstance(version, (int, str)) and len(str(version)) < 20 else "?"


def check_warm(warm: WarmState, expected_tokens: np.ndarray, layout: dict, text_vocab: int) -> None:
    """A warm state's values against the artifacts (its hashes and codes are checked before): the plan's
    tokens in the vocabulary, rows of the cache's shape and dtype, finite, and step tokens equal to
    ``expected_tokens`` (what the plan gives on these artifacts now)."""
    plan = warm.plan
    if len(plan.new_word_steps) != len(plan.entries):
        raise VoiceError(f"the warm state's plan has {len(plan.entries)} entries, {len(plan.new_word_steps)} steps")
    for entry in plan.entries:
        if any(not 0 <= t < text_vocab for t in entry.tokens):
            raise VoiceError(f"the warm state's entry {entry.text!r} has tokens outside [0, {text_vocab})")
    if not isinstance(warm.tokens, np.ndarray) or not np.array_equal(warm.tokens, expected_tokens):
        raise VoiceError(f"the warm state's step tokens are not what its plan gives on these artifacts; {WARM_REMEDY}")
    want = (*layout["rows"][:3], warm.frames, layout["rows"][3])
    for name, rows in (("k_rows", warm.k_rows), ("v_rows", warm.v_rows)):
        if not isinstance(rows, np.ndarray) or rows.shape != want or rows.dtype != layout["dtype"]:
            got = f"{rows.dtype} {rows.shape}" if isinstance(rows, np.ndarray) else type(rows).__name__
            raise VoiceError(f"the warm state's {name} are {got}, these artifacts' cache rows {layout['dtype']} {want}")
    _check_finite(warm)


def _check_finite(warm: WarmState) -> None:
    """NaN or infinite rows would be read by every step. Checked once per pair of row arrays (at 2B
    size 126 frames of rows are 58 MB, ~60 ms to scan); arrays changed in place later are the caller's."""
    seen = warm._finite
    if seen[0] is warm.k_rows and seen[1] is warm.v_rows:
        return
    for name, rows in (("k_rows", warm.k_rows), ("v_rows", warm.v_rows)):
        if not np.isfinite(rows).all():
            raise VoiceError(f"the warm state's {name} hold NaN or infinite values")
    warm._finite = (warm.k_rows, warm.v_rows)


def _entry_json(entry: Entry) -> dict:
    return {"text": entry.text, "tokens": list(entry.tokens), "padding": entry.padding}
