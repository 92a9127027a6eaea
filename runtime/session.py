"""One utterance: text in (all at once or incrementally), audio chunks out.

Per frame t (the reference's ``run_generation_loop``): the backbone graph reads
the step tokens and the KV cache and returns the new K/V row, the text-action
logits and the cb0 logits; the action is guided and sampled here; the text state
machine turns it into (main, second) text tokens; the depformer graph samples all
audio codebooks of frame t + 1. Aligned frames go through the streaming codec as
soon as every codebook of them exists, so audio starts long before the script ends.

Everything a session writes lives in its ``GenerationState``; the runtime it
came from only lends it graphs, so sessions in different threads never meet.

With an audio prefix (``prefix.py``) the loop first warms the cache up on the
prefix frames, then starts at frame A - 1, as the reference does.

The loop (``_frames``) is written once, as a generator that yields its graph calls
(``step.BackboneCall`` ...) and is sent their results. Who runs the calls is the
driver's business: a runtime of one stream per session runs them at once on the
session's own ``FrameStepper`` in the caller's thread (``__iter__``); a batched
runtime's ``batch.BatchEngine`` gathers the calls of every live session into one
graph call per frame, and the session's iteration reads what the engine made.
"""

from __future__ import annotations

import inspect
import threading
import time
import warnings
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .frames import UNGENERATED, finish
from .params import Chunking, GenerationParams
from .prefix import ROW_SHIFT, Prefix, WarmState, delay_codes, warmup_tokens
from .sampling import guide, sample
from .script import ScriptError, check_complete_script, check_script, check_size, complete_prefix
from .state_machine import StateMachine
from .step import BackboneCall, BackboneResult, DecodeCall, DepformerCall, FrameStepper

if TYPE_CHECKING:
    from .batch import Lane
    from .runtime import Dia2Runtime
    from .state import GenerationState

CALLS = (BackboneCall, DepformerCall, DecodeCall)


class TruncationWarning(UserWarning):
    """The context ran out before the script's end (``SpeakResult.truncated`` says the same)."""


@dataclass
class AudioChunk:
    """Audio as it is made, with the words that start in it."""

    pcm: np.ndarray
    """float32 mono samples in [-1, 1]."""
    words: list[tuple[str, float]]
    """Words starting in this chunk: (word, seconds from the start of the utterance's audio)."""
    sample_rate: int
    """Samples per second of ``pcm``."""

    @property
    def seconds(self) -> float:
        return self.pcm.size / self.sample_rate


@dataclass
class Progress:
    """Where a generation stands, reported after every frame."""

    frame: int
    """Frames run so far."""
    words_done: int
    """Words the model has started speaking."""
    words_total: int
    """Words parsed so far (final once the input is closed)."""


@dataclass
class SpeakResult:
    """A finished utterance."""

    pcm: np.ndarray
    """float32 mono samples in [-1, 1], the whole utterance."""
    sample_rate: int
    """Samples per second of ``pcm``."""
    tokens: np.ndarray
    """[Q, T] aligned audio codes after undelay and crop (what ``dia2-export reference`` prints)."""
    timestamps: list[tuple[str, float]]
    """(word, seconds from the start of the audio) for every word spoken."""
    frames: int
    """Generation steps run."""
    wall_seconds: float
    """From the first frame to the result."""
    first_audio_seconds: float | None
    """From the first frame to the first PCM sample; None when no audio came out."""
    truncated: bool
    """The context ran out before the script's end."""

    @property
    def audio_seconds(self) -> float:
        return self.pcm.size / self.sample_rate

    @property
    def real_time_factor(self) -> float:
        """Wall time per second of audio (< 1 is faster than real time)."""
        return self.wall_seconds / self.audio_seconds if self.audio_seconds else float("inf")


_WAIT = object()  # the loop needs more text before it can go on


class Session:
    """One utterance. ``feed`` text, ``close`` when done, iterate for AudioChunks.

    Iteration yields every chunk that can be made with the text so far and stops
    when the model wants a word that has not arrived yet (feed more and iterate
    again) or, after ``close``, when the utterance is complete (``result`` is set).
    ``cancel`` (from any thread) ends it at the next frame. Use a session from one
    thread at a time; different sessions of one runtime may run in parallel.
    """

    def __init__(self, runtime: Dia2Runtime, params: GenerationParams,
                 progress: Callable[[Progress], None] | None = None,
                 prefix: Prefix | WarmState | None = None, include_prefix: bool = False,
                 prefill: bool = True, chunking: Chunking | None = None) -> None:
        m = runtime.manifest
        self.chunking = Chunking() if chunking is None else chunking
        self.runtime, self.params, self._progress = runtime, params, progress
        self.machine = StateMachine(m.token_ids, second_stream_ahead=m.second_stream_ahead,
                                    initial_padding=params.initial_padding, max_padding=m.max_padding)
        self._warm: WarmState | None = None
        self.prefix: Prefix | None = None
        if isinstance(prefix, WarmState):
            self._warm, self.prefix = prefix, Prefix(prefix.plan, include_prefix)
        else:
            self.prefix = prefix
        self._prefill = prefill
        # Generation starts at frame A - 1 after a warm-up (warmup_with_prefix's return value),
        # and frame t's K/V row is then t + 1.
        self._start = self.prefix.frames - 1 if self.prefix else 0
        self._row_shift = ROW_SHIFT if self.prefix else 0
        self.result: SpeakResult | None = None
        self._text, self._closed, self._cancelled = "", False, False
        self._given, self._words_total = [], 0
        self._delays = np.asarray(m.delays)
        # Columns below the smallest delay are dead: the backbone reads bos there and undelay never reads them.
        self._first_live = int(self._delays.min())
        self._hidden = self._cb0 = np.zeros(0, np.float32)
        # One step, feed or cancel at a time; reentrant so a progress callback may feed or cancel.
        self._lock = threading.RLock()
        self.stepper: FrameStepper | None = None  # set by the driver before the loop's first step
        self.slot = 0
        self._lane: Lane | None = None  # the batch engine's handle, on a batched runtime
        self._state: GenerationState | None = runtime.states.take()
        try:
            self._state.reset(m, self.machine, params)
            if self.prefix is not None:
                self._start_prefix()
        except BaseException:
            self._release()  # back to the pool; the next session's reset scrubs whatever this start wrote
            raise
        self._loop = self._generate()
        runtime.admit(self)  # a slot in the batch, or a stepper of its own

    def _start_prefix(self) -> None:
        """The reference queues the prefix's words before the script's; a trimmed prefix's words
        leave the timestamps (it drops that many transcript entries)."""
        prefix = self.prefix
        assert prefix is not None, "called only for a session with a prefix"
        s, m, plan = self._held(), self.runtime.manifest, prefix.plan
        s.live_text.entries.extend(plan.entries)
        s.rule = s.live_rule.after_prefix(plan.frames, m.max_context_steps, m.max_delay, m.cache_capacity,
                                          prefix.include_prefix)
        s.emitter.words_sent = self._dropped_words()

    # --- input ---------------------------------------------------------------

    def feed(self, text: str) -> None:
        """Add text; a word is taken once whitespace follows it. A rejected call keeps nothing."""
        _check_text(text)
        with self._lock:
            self._check_open()
            candidate = self._text + text
            check_size(candidate)  # O(1), before anything scans the text
            self._take_entries(complete_prefix(candidate))
            self._text = candidate
        self._wake()

    def close(self) -> None:
        """No more text: the rest of the buffer is complete, and the script may now end."""
        with self._lock:
            if self._closed:
                return
            self._check_open()
            check_complete_script(self._text)  # a script of tags alone would speak 0.7 s of lead-in
            self._take_entries(self._text)
            self._closed = True
        self._wake()

    def _wake(self) -> None:
        """New input: a batched runtime's engine steps this session again."""
        if self._lane is not None:
            self._lane.wake()

    def cancel(self, wait: bool = True) -> None:
        """Stop at the next frame (safe from another thread) and free this session's state.

        On a batched runtime the engine ends it before its next frame; with ``wait`` (the default)
        this returns once it has (its state and slot free), without, at once (an event loop)."""
        self._cancelled = True
        if self._lane is not None:
            self._lane.cancel(wait)
            return
        if self._lock.acquire(blocking=False):  # not mid-frame: end the loop now
            try:
                self._end()
            finally:
                self._lock.release()

    def _end(self) -> None:
        # a progress callback may cancel mid-frame: the loop ends itself (RUNNING is gi_running, which
        # typing's Generator does not declare)
        if inspect.getgeneratorstate(self._loop) != inspect.GEN_RUNNING:
            self._loop.close()
            self._release()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def done(self) -> bool:
        return self.result is not None

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def _check_open(self) -> None:
        if self._cancelled:
            raise RuntimeError("this session was cancelled")
        if self._closed:
            raise RuntimeError("this session's input is closed")
        if self._state is None:
            raise RuntimeError("this session has ended")

    def _take_entries(self, text: str) -> None:
        """Parse ``text`` (the whole input so far) and queue its new entries; on error change nothing."""
        if not text.strip():
            return
        check_script(text)
        entries = self.runtime.parse(text)
        if entries[: len(self._given)] != self._given:
            raise RuntimeError("internal error: the incremental parse diverged from the full parse")
        needed = self.runtime.frames_needed(entries, self.params)
        m = self.runtime.manifest
        limit = min(m.max_context_steps, m.cache_capacity - self._start - self._row_shift)
        if needed > limit:
            after = f" after the {self._start + 1}-frame prefix" if self.prefix else ""
            raise ScriptError(f"the script is too long: it needs at least {needed} frames "
                              f"({needed / m.frame_rate:.1f} s) but the model's context holds {limit}{after}; "
                              f"split it into shorter scripts")
        new = entries[len(self._given):]
        self._given.extend(new)
        self._words_total += sum(1 for entry in new if entry.tokens)
        self._held().live_text.entries.extend(new)

    # --- output --------------------------------------------------------------

    def __iter__(self) -> Iterator[AudioChunk]:
        if self._lane is not None:
            yield from self._lane.chunks()
            return
        while not self.done:
            with self._lock:
                if self._cancelled:
                    self._end()
                    return
                item = self._advance_solo()
            if item is _WAIT or item is None:
                return
            assert isinstance(item, AudioChunk)  # the loop yields chunks and _WAIT only
            yield item

    def _advance_solo(self, reply=None) -> AudioChunk | object | None:
        """Run the loop on this session's own stepper to its next chunk or wait (None: it ended)."""
        stepper = self.stepper
        assert stepper is not None, "a session without a batch engine runs on its own stepper"
        while True:
            item = self.send(reply)
            if not isinstance(item, CALLS):
                return item
            try:
                reply = run_calls(stepper, {self.slot: item})[self.slot]
            except BaseException as exc:  # as if the loop's own call failed: its `finally` frees the state
                self._loop.throw(exc)
                raise

    def send(self, reply=None) -> object | None:
        """The loop's next item (a graph call, a chunk or a wait) after sending it ``reply``; None at its end."""
        try:
            return self._loop.send(reply)
        except StopIteration:
            return None

    def __del__(self) -> None:
        # A session dropped before its first frame never starts its loop, whose `finally` gives
        # the state back: give it back here (a no-op once the loop did). On a batched runtime the
        # engine holds it weakly, so a dropped unfinished session ends up here too: its slot goes.
        lane = getattr(self, "_lane", None)
        if lane is not None and not lane.ended:
            lane.engine.cancel(lane)
        loop = getattr(self, "_loop", None)
        if getattr(self, "_state", None) is not None and not (loop is not None and loop.gi_running):
            self._release()

    def _release(self) -> None:
        """Hand the state (and a stepper of its own) back to the runtime for another session (once)."""
        state, self._state = self._state, None
        if state is not None:
            self.runtime.states.give_back(state)
            self.runtime.release(self)

    def _held(self) -> GenerationState:
        """The state, which this session holds until ``_release``: feed and close check ``_check_open``
        first, and the loop (the other reader) releases it only as it ends."""
        assert self._state is not None, "this session has ended"
        return self._state

    def _generate(self) -> Generator[object, object, None]:
        try:
            yield from self._frames()
        finally:  # finished, failed, cancelled or abandoned: the state is free either way
            self._release()

    def _frames(self) -> Generator[object, object, None]:
        s, m = self._held(), self.runtime.manifest
        s.emitter.started = time.perf_counter()
        if self.prefix is not None:
            while not self._script_ready(self.prefix):
                yield _WAIT
            yield from self._warm_up(self.prefix)
        for t in range(self._start, self._start + m.max_context_steps):
            if self._cancelled:
                return
            if s.live_rule.stops_before(t):
                break
            action = self._action((yield self._backbone_call(t)))
            while self._starved(action):
                yield _WAIT
            main, second = self.machine.process(t, s.live_text, action)
            yield from self._depformer_step(t, main, second)
            s.rule = s.live_rule.after(t, main, s.live_text.end_step)
            chunk = yield from self._emit_ready(t)
            if chunk is not None:
                yield chunk
            self._report(t)
        yield from self._finish()

    def _script_ready(self, prefix: Prefix) -> bool:
        """The warm-up's look-ahead reads the script's first words: wait for them (or the end of input)."""
        words = sum(1 for entry in self._held().live_text.entries if entry.tokens) - len(prefix.plan.entries)
        return self._closed or words >= self.machine.second_stream_ahead

    def _warm_up(self, prefix: Prefix) -> Generator[object, object, None]:
        """The reference's warm-up: prefix codes into the delayed buffer (one buffer serves both CFG rows),
        forced steps through the machine, and the prefix frames' K/V rows (restored from a WarmState,
        by the prefill graph, or step by step)."""
        s, m, plan = self._held(), self.runtime.manifest, prefix.plan
        delayed = delay_codes(plan.codes, m.delays, m.token_ids.audio_pad)
        s.audio[:, : delayed.shape[1]] = delayed
        seq = warmup_tokens(plan, self.machine, s.live_text, m.token_ids, m.delays, s.tokens)
        done = 0
        stepper = self.stepper
        assert stepper is not None, "the driver gives the session a stepper before its first step"
        if self._warm is not None:
            done = self._warm.frames
            if not np.array_equal(seq[:done], self._warm.tokens):
                raise RuntimeError("internal error: the warm state's frames differ from this warm-up's")
            stepper.write_rows(self.slot, 0, self._warm.k_rows, self._warm.v_rows)
        rows = self.runtime.prefill_rows(seq) if self._prefill and done == 0 else None
        if rows is not None:
            stepper.write_rows(self.slot, 0, *rows)
            return
        for i, tokens in enumerate(seq[done:], start=done):  # frame by frame, as the reference
            yield BackboneCall(tokens, i, i)

    def _backbone_call(self, t: int) -> BackboneCall:
        s, ids = self._held(), self.runtime.manifest.token_ids
        s.tokens[:, 2:] = np.where(self._delays > t, ids.audio_bos, s.audio[:, t])
        s.tokens[1, 0], s.tokens[1, 1] = ids.zero, ids.pad
        return BackboneCall(s.tokens.copy(), t, t + self._row_shift)

    def _action(self, out) -> int:
        """The text action from the backbone's logits (guided and sampled on the host: the state
        machine needs it before the depformer's input is known)."""
        assert isinstance(out, BackboneResult), "the driver answers a backbone call with its result"
        s, p = self._held(), self.params
        self._hidden, self._cb0 = out.hidden, out.cb0_logits
        return sample(guide(out.action_logits, p.cfg_scale, p.cfg_filter_k), p.text_temperature, p.text_top_k,
                      s.rng)

    def _starved(self, action: int) -> bool:
        """Open input and the machine about to take a word it (or its look-ahead) does not have yet."""
        text = self._held().live_text
        if self._closed or not self.machine.takes_entry(text, action):
            return False
        words = sum(1 for entry in text.entries if entry.tokens)
        return words < 1 + self.machine.second_stream_ahead

    def _depformer_step(self, t: int, main: int, second: int) -> Generator[object, object, None]:
        """Frame t + 1's codebooks into delayed column t + 1. On a fresh utterance the first columns
        lie inside every codebook's delay: the backbone reads bos there and undelay never reads
        them (the reference's ``_fill_audio_channels``), so the depformer is skipped for them; the
        noise is still drawn, so a seed gives the same audio as a run that computed them."""
        s, p = self._held(), self.params
        s.tokens[:, 0], s.tokens[:, 1] = main, second
        if p.audio_temperature > 0:
            s.rng.random(out=s.noise, dtype=np.float32)
        if t + 1 < self._first_live:
            return
        tokens = yield DepformerCall(self._hidden, self._cb0, (main, second), s.noise.copy(), p)
        assert isinstance(tokens, np.ndarray), "the driver answers a depformer call with its tokens"
        s.audio[:, t + 1] = tokens

    def _emit_ready(self, t: int) -> Generator[object, object, AudioChunk | None]:
        """Decode the aligned frames that step t completed, once the crop (first word) is known.

        Aligned frame k reads delayed column k + delays[q], written at step k + delays[q] - 1,
        so it is complete after step k + max_delay - 1.
        """
        e = self._held().emitter
        if e.crop is None:
            crop = self._known_crop()
            if crop is None or crop > t + 1 - self.runtime.manifest.max_delay:
                return None
            e.crop = e.next_frame = crop
        return (yield from self._chunk(t + 2 - self.runtime.manifest.max_delay, final=False))

    def _known_crop(self) -> int | None:
        """The lead-in to cut, as soon as it is certain.

        It is (first word frame - initial padding), or the start frame (0, or A - 1
        after a prefix) if no main-stream new-word token ever appears. With a second
        stream the machine always moves the new-word token to the second stream, so
        (as in the reference) the crop is the start frame, known from the start.
        A prefix kept in the output means no crop.
        """
        rule = self._held().live_rule
        if rule.include_prefix or rule.first_word_frame is not None:
            return max(rule.crop, 0)
        return rule.first_frame if self.machine.second_stream_ahead else None

    def _chunk(self, stop: int, final: bool) -> Generator[object, object, AudioChunk | None]:
        """Decode aligned frames [next_frame, stop) and attach the words that start in them."""
        s, m = self._held(), self.runtime.manifest
        e, pcm = s.emitter, []
        q = np.arange(m.audio_channels)
        for k in range(e.next_frame, stop):
            codes = s.audio[q, k + self._delays]
            frame = yield DecodeCall(check_codes(np.where(codes == UNGENERATED, m.token_ids.audio_pad, codes),
                                                 m.codec.codebook_size))
            assert isinstance(frame, np.ndarray), "the driver answers a decode call with the frame's pcm"
            pcm.append(np.clip(frame, -1.0, 1.0))  # the reference clamps Mimi's output
        e.next_frame = max(e.next_frame, stop)
        e.held += pcm
        target = self.chunking.first_frames if e.first_audio is None else self.chunking.frames
        if e.held and len(e.held) < target and not final:
            return None  # the chunk fills up first (its words wait with it)
        words = self._words(None if final else e.next_frame)
        pcm, e.held = e.held, []
        if not pcm and not words:
            return None
        chunk = AudioChunk(np.concatenate(pcm) if pcm else np.zeros(0, np.float32), words, m.sample_rate)
        if pcm:
            e.pcm.append(chunk.pcm)
            if e.first_audio is None:
                e.first_audio = time.perf_counter() - e.started
        return chunk

    def _words(self, before: int | None) -> list[tuple[str, float]]:
        """Transcript words not yet sent that start before aligned frame ``before`` (all if None)."""
        s, rate = self._held(), max(self.runtime.manifest.frame_rate, 1.0)
        e, transcript, out = s.emitter, s.live_text.transcript, []
        crop = e.crop
        assert crop is not None, "a chunk is decoded only once the crop is set"
        while e.words_sent < len(transcript):
            word, step = transcript[e.words_sent]
            if before is not None and step >= before:
                break
            if step >= crop:
                out.append((word, (step - crop) / rate))
            e.words_sent += 1
        return out

    def _finish(self) -> Generator[object, object, None]:
        s, m = self._held(), self.runtime.manifest
        rule, e = s.live_rule, s.emitter
        tokens, stamps, crop = finish(s.audio[:, :rule.columns], m.delays, m.token_ids.audio_pad, rule.crop,
                                      s.live_text.transcript[self._dropped_words():], m.frame_rate)
        if e.crop is None:  # nothing went out yet: the final crop decides (it falls back to 0 on a short run)
            e.crop = e.next_frame = crop
        chunk = yield from self._chunk(crop + tokens.shape[1], final=True)
        if chunk is not None:
            yield chunk
        if rule.truncated:
            warnings.warn(f"the model's context ({m.max_context_steps} frames) ran out before the script "
                          f"ended; the audio is truncated", TruncationWarning, stacklevel=2)
        pcm = np.concatenate(e.pcm) if e.pcm else np.zeros(0, np.float32)
        self.result = SpeakResult(pcm, m.sample_rate, tokens, stamps, rule.last_step + 1,
                                  time.perf_counter() - e.started, e.first_audio, rule.truncated)

    def _dropped_words(self) -> int:
        """A trimmed prefix's words leave the timestamps (the reference drops that many transcript entries)."""
        if self.prefix is None or self.prefix.include_prefix:
            return 0
        return len(self.prefix.plan.entries)

    def _report(self, t: int) -> None:
        if self._progress is not None:
            self._progress(Progress(t + 1, len(self._held().live_text.transcript), self._words_total))


def _check_text(text) -> None:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")


def check_codes(codes: np.ndarray, codebook_size: int) -> np.ndarray:
    """A frame's codes before the codec reads them: a NaN-poisoned depformer gives codes out of range."""
    if codes.min() < 0 or codes.max() >= codebook_size:
        raise RuntimeError(f"the depformer produced codes outside [0, {codebook_size}) "
                           f"([{codes.min()}, {codes.max()}]): the model's outputs are not finite")
    return codes


def run_calls(stepper: FrameStepper, calls: dict[int, object]) -> dict[int, object]:
    """Run graph calls of one kind for the slots in ``calls`` on ``stepper``: slot -> result."""
    first = next(iter(calls.values()))
    if isinstance(first, BackboneCall):
        return stepper.backbone_step(calls)  # type: ignore[arg-type]
    if isinstance(first, DepformerCall):
        return stepper.depformer_frame(calls)  # type: ignore[arg-type]
    return stepper.decode(calls)  # type: ignore[arg-type]
