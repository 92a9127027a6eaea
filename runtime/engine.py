"""The streaming generation loop over the exported graphs, without torch.

Per frame t (the reference's ``run_generation_loop``): the backbone graph reads
the step tokens and the KV cache and returns the new K/V row, the text-action
logits and the cb0 logits; the action is guided and sampled here; the text state
machine turns it into (main, second) text tokens; the depformer graph samples all
audio codebooks of frame t + 1. Aligned frames go through the streaming codec as
soon as every codebook of them exists, so audio starts long before the script ends.

With an audio prefix (``runtime/prefix.py``) the loop first warms the cache up on
the prefix frames and then starts at frame A - 1, as the reference does.
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .artifacts import ArtifactError, Manifest, cache_name, load_manifest, sha256
from .audio import file_sha256, load_mono, read_audio
from .backends import Backend, create_backend
from .codec import StreamingCodec
from .frames import UNGENERATED, finish
from .params import GenerationParams
from .prefix import ROW_SHIFT, Prefix, WarmState, delay_codes, script_free_frames, warmup_tokens
from .sampling import guide, sample
from .script import ScriptError, check_script, parse_script
from .state_machine import Entry, StateMachine, TextState
from .tokenizer import TextTokenizer
from .voice import (Voice, VoiceError, Word, build_plan, parse_words, read_words, speaker_tag_for,
                    words_to_entries)

MISSING_TRANSCRIBER = "no word timings for the prefix audio: give a words JSON file or a transcriber"
BRANCHES = 2  # conditional row 0, unconditional row 1: always both, as in the reference


class TruncationWarning(UserWarning):
    """The context ran out before the script's end (``SpeakResult.truncated`` says the same)."""


@dataclass
class AudioChunk:
    pcm: np.ndarray  # float32 samples at the manifest's sample rate
    words: list[tuple[str, float]]  # words starting in this chunk: (word, seconds from the audio start)


@dataclass
class Progress:
    frame: int
    words_done: int
    words_total: int  # words parsed so far (final once the input is closed)


@dataclass
class SpeakResult:
    pcm: np.ndarray
    sample_rate: int
    tokens: np.ndarray  # [Q, T] aligned codes after undelay and crop
    timestamps: list[tuple[str, float]]
    frames: int  # generation steps run
    wall_seconds: float
    first_audio_seconds: float | None  # None when no audio came out
    truncated: bool  # the context ran out before the script's end

    @property
    def audio_seconds(self) -> float:
        return self.pcm.size / self.sample_rate

    @property
    def real_time_factor(self) -> float:
        """Wall time per second of audio (< 1 is faster than real time)."""
        return self.wall_seconds / self.audio_seconds if self.audio_seconds else float("inf")


class Dia2Runtime:
    """Loaded graphs plus the buffers of one generation; one session runs at a time."""

    def __init__(self, manifest: Manifest, backend: Backend, tokenizer: TextTokenizer) -> None:
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = tokenizer
        self.backbone = backend.load(manifest.graph("backbone"))
        self.depformer = backend.load(manifest.graph("depformer"))
        self.codec = _load_codec(manifest, backend)
        self.buffers = _StepBuffers.allocate(manifest, self.backbone.spec.input(cache_name("k", 0)))
        self._cache_names = [(cache_name("k", i), cache_name("v", i)) for i in range(len(self.buffers.k_cache))]
        for i, (k_name, v_name) in enumerate(self._cache_names):
            self.backbone.bind(k_name, self.buffers.k_cache[i])  # a view: the layers share one allocation
            self.backbone.bind(v_name, self.buffers.v_cache[i])
        self._active: Session | None = None
        self._encoder = self._prefill = None  # opened on first use: only voice prompts need them
        # Artifacts exported before prefixes have no cache_length input: they speak, without prefixes.
        self._row_input = any(t.name == "cache_length" for t in self.backbone.spec.inputs)

    @classmethod
    def load(cls, artifacts_dir: str | Path, backend: str | Backend = "onnxruntime",
             threads: int | None = None) -> "Dia2Runtime":
        manifest = load_manifest(artifacts_dir)
        engine = create_backend(backend, threads) if isinstance(backend, str) else backend
        try:
            tokenizer = TextTokenizer.from_dir(manifest.tokenizer_dir)
        except Exception as exc:  # tokenizers raises bare Exceptions for malformed files
            raise ArtifactError(f"{manifest.tokenizer_dir}: cannot load tokenizer ({exc})") from None
        return cls(manifest, engine, tokenizer)

    @property
    def sample_rate(self) -> int:
        return self.manifest.sample_rate

    def open_session(self, params: GenerationParams | None = None,
                     progress: Callable[[Progress], None] | None = None,
                     prefix: "Prefix | WarmState | SpeakResult | None" = None, *, include_prefix: bool = False,
                     prefill: bool = True) -> "Session":
        """Start an utterance fed incrementally; any earlier unfinished session is abandoned.

        ``prefix``: an audio prefix (``self.prefix(...)``), a warmed voice pair
        (``self.warm(...)``) or the previous turn's SpeakResult; ``include_prefix``
        keeps its audio (and words) in the output, when ``prefix`` is not a Prefix. ``prefill``: warm up in one graph call
        where the artifacts have the prefill graph (else frame by frame).
        """
        if isinstance(prefix, SpeakResult):  # a conversation's previous turn
            prefix = self.prefix(self.turn_voice(prefix.tokens, prefix.timestamps), include_audio=include_prefix)
        if isinstance(prefix, WarmState):
            self._check_hashes(prefix.artifacts, "warm state")
            self.check_prefix_frames(prefix.plan.frames)
        session = Session(self, params or GenerationParams(), progress, prefix, include_prefix, prefill)
        self._active = session
        return session

    def stream(self, text: str, params: GenerationParams | None = None,
               progress: Callable[[Progress], None] | None = None, **prefix_options) -> "Session":
        """The whole script at once; iterate the result for AudioChunks. Bad scripts raise here."""
        session = self.open_session(params, progress, **prefix_options)
        session.feed(text)
        session.close()
        return session

    def speak(self, text: str, params: GenerationParams | None = None,
              progress: Callable[[Progress], None] | None = None, **prefix_options) -> SpeakResult:
        """Generate ``text``; ``prefix=``, ``include_prefix=``, ``prefill=`` as for ``open_session``."""
        session = self.stream(text, params, progress, **prefix_options)
        for _ in session:
            pass
        return session.result

    # --- voices ----------------------------------------------------------------

    def voice(self, audio: str | Path, words: "list[Word] | str | Path | None" = None, speaker: int = 1,
              transcriber: Callable[[Path, float], list[Word]] | None = None) -> Voice:
        """One speaker's prefix from an audio file and its word timings.

        ``words``: Word objects or a words JSON file; None transcribes with
        ``transcriber(path, duration)`` (e.g. ``transcribe.transcribe`` over a faster-whisper model).
        Words are checked to be in order and inside the audio.
        """
        raw, rate = read_audio(audio)
        duration = raw.shape[0] / rate
        if words is None:
            if transcriber is None:
                raise VoiceError(MISSING_TRANSCRIBER)
            words = transcriber(Path(audio), duration)
        elif isinstance(words, (str, Path)):
            words = read_words(words, duration)
        else:
            words = parse_words([{"word": w.text, "start": w.start, "end": w.end} for w in words], duration)
        pcm = load_mono(audio, self.sample_rate)
        self.check_prefix_frames(-(-pcm.size // self.manifest.samples_per_frame))  # before encoding a long clip
        m = self.manifest
        tag = speaker_tag_for(speaker, self.tokenizer.token_id, m.token_ids)
        entries, steps = words_to_entries(words, self.tokenizer.encode, tag, m.frame_rate)
        return Voice(speaker, self.encode(pcm), list(words), entries, steps, file_sha256(audio),
                     self.artifact_hashes())

    def turn_voice(self, codes: np.ndarray, timestamps: list[tuple[str, float]], speaker: int = 1) -> Voice:
        """A finished utterance (``SpeakResult.tokens``/``.timestamps``) as the next turn's prefix.

        No re-encoding or transcription: its codes are the prefix codes and its word
        times the word timings (each word lasting until the next one starts, the last
        until the audio ends). The speaker tag goes before its first word, as for a
        transcribed clip, so a dialogue keeps its voices turn after turn.
        """
        m = self.manifest
        codes = np.ascontiguousarray(codes, dtype=np.int64)
        vocab = int(m.topology["audio_vocab_size"]) - 2  # codebook entries; pad and bos are not audio
        if codes.ndim != 2 or codes.shape[0] != m.audio_channels or codes.shape[1] == 0 \
                or codes.min() < 0 or codes.max() >= vocab:
            raise VoiceError(f"a turn prefix needs {m.audio_channels} rows of codes in [0, {vocab}), "
                             f"got shape {codes.shape}")
        self.check_prefix_frames(codes.shape[1])
        end = codes.shape[1] / m.frame_rate
        starts = [float(s) for _, s in timestamps]
        raw = [{"word": str(w), "start": s, "end": min(max(nxt, s), end)}
               for (w, s), nxt in zip(timestamps, [*starts[1:], end])]
        words = parse_words(raw, end, where="turn timestamps")
        tag = speaker_tag_for(speaker, self.tokenizer.token_id, m.token_ids)
        entries, steps = words_to_entries(words, self.tokenizer.encode, tag, m.frame_rate)
        return Voice(speaker, codes, words, entries, steps, None, self.artifact_hashes())

    def encode(self, pcm: np.ndarray) -> np.ndarray:
        """Mono pcm at the codec's rate -> Mimi codes [Q, T] (the codec_encoder graph, fp32)."""
        if self._encoder is None:
            self._encoder = _open_plain(self.backend, self.manifest.graph("codec_encoder"))
        codes = self._encoder.run(None, {"pcm": np.asarray(pcm, np.float32).reshape(1, 1, -1)})[0]
        return np.ascontiguousarray(codes[0], dtype=np.int64)

    def prefix(self, speaker_1: Voice | None, speaker_2: Voice | None = None,
               include_audio: bool = False) -> Prefix | None:
        """The reference's prefix plan from voices (speaker 2 needs speaker 1); checked against the context."""
        voices = [v for v in (speaker_1, speaker_2) if v is not None]
        for slot, voice in ((1, speaker_1), (2, speaker_2)):
            if voice is not None:
                self._check_hashes(voice.artifacts, "voice")
        plan = build_plan(*(self._as_speaker(v, slot) if v else None for slot, v in ((1, speaker_1), (2, speaker_2))))
        if plan is None:
            return None
        if voices and plan.codes.shape[0] != self.manifest.audio_channels:
            raise VoiceError(f"the prefix has {plan.codes.shape[0]} codebooks, the model {self.manifest.audio_channels}")
        self.check_prefix_frames(plan.frames)
        return Prefix(plan, include_audio)

    def _as_speaker(self, voice: Voice, speaker: int) -> Voice:
        """A voice recorded for the other speaker slot gets its entries re-tokenised with this slot's tag."""
        if voice.speaker == speaker:
            return voice
        tag = speaker_tag_for(speaker, self.tokenizer.token_id, self.manifest.token_ids)
        entries, steps = words_to_entries(voice.words, self.tokenizer.encode, tag, self.manifest.frame_rate)
        return Voice(speaker, voice.codes, voice.words, entries, steps, voice.audio_sha256, voice.artifacts)

    def check_prefix_frames(self, frames: int) -> None:
        """A prefix needs its frames in the KV cache plus room for at least one generated frame."""
        if not self._row_input:
            raise VoiceError(f"{self.manifest.root}: these artifacts predate audio prefixes (their backbone has no "
                             f"cache_length input); rebuild them to use a prefix")
        room = self.manifest.cache_capacity - 1
        if frames > room:
            raise VoiceError(f"the prefix is {frames} frames ({frames / self.manifest.frame_rate:.1f} s) but these "
                             f"artifacts hold at most {room} (rebuild them with a larger --prefix-frames)")

    def artifact_hashes(self) -> dict[str, str]:
        """What a voice depends on: the encoder that made its codes and the tokenizer that made its entries."""
        return {"codec_encoder": self.manifest.graph("codec_encoder").sha256 or "",
                "tokenizer": sha256(self.manifest.tokenizer_dir / "tokenizer.json")}

    def _check_hashes(self, hashes: dict[str, str], what: str) -> None:
        if hashes != self.artifact_hashes():
            raise VoiceError(f"this {what} was made with other artifacts (codec encoder or tokenizer differ); "
                             f"recreate it with these")

    def warm(self, prefix: Prefix, prefill: bool = True) -> WarmState:
        """Run the script-independent part of ``prefix``'s warm-up once, for reuse by many sessions."""
        self._active = None  # the cache below is the runtime's one buffer set
        m, buf = self.manifest, self.buffers
        buf.reset(m.token_ids)
        machine = StateMachine(m.token_ids, second_stream_ahead=m.second_stream_ahead, initial_padding=0,
                               max_padding=m.max_padding)
        seq = script_free_frames(prefix.plan, machine, m.token_ids, m.delays, buf.tokens)
        self.fill_cache(seq, prefill)
        rows = (slice(None), slice(None), slice(None), slice(0, len(seq)))
        return WarmState(prefix.plan, buf.k_cache[rows].copy(), buf.v_cache[rows].copy(), seq.copy(),
                         self.artifact_hashes())

    def fill_cache(self, seq: np.ndarray, prefill: bool, start: int = 0) -> None:
        """K/V rows start .. start+T-1 from the warm-up step tokens seq [T, 2, C] (frame t at position t)."""
        if not len(seq):
            return
        graph = self._prefill_graph() if prefill and start == 0 else None
        if graph is not None:
            k_rows, v_rows = graph.run(None, {"tokens": np.ascontiguousarray(seq.transpose(1, 2, 0))})
            self._write_rows(slice(0, len(seq)), k_rows, v_rows)
            return
        for i, tokens in enumerate(seq):
            t = start + i
            out = self.backbone.run(self.step_feeds(tokens, t, t))
            self._write_rows(t, out["k_new"], out["v_new"])

    def step_feeds(self, tokens: np.ndarray, position: int, row: int) -> dict:
        feeds = {"tokens": tokens, "position": position}
        if self._row_input:
            feeds["cache_length"] = row
        return feeds

    def _write_rows(self, rows, k_new: np.ndarray, v_new: np.ndarray) -> None:
        index = (slice(None), slice(None), rows)
        for i, (k_name, v_name) in enumerate(self._cache_names):
            self.backbone.write(k_name, index, k_new[i])
            self.backbone.write(v_name, index, v_new[i])

    def _prefill_graph(self):
        """The prefill graph's session, or None (artifacts without one, or a backend that cannot run it)."""
        if self._prefill is None and "backbone_prefill" in self.manifest.graphs \
                and hasattr(self.backend, "open_session"):
            self._prefill = _open_plain(self.backend, self.manifest.graph("backbone_prefill"))
        return self._prefill

    def parse(self, text: str) -> list[Entry]:
        return parse_script([text], self.tokenizer.encode, self.manifest.token_ids, self.manifest.frame_rate)

    def frames_needed(self, entries: list[Entry], params: GenerationParams) -> int:
        """A lower bound on the frames a script takes: the lead-in, each word's tokens plus its
        new-word frame, each break's length, the end mark, and the codebook delay tail."""
        body = sum(len(e.tokens) + 1 if e.tokens else max(e.padding, 1) for e in entries)
        return params.initial_padding + body + 1 + self.manifest.max_delay

    def _owns(self, session: "Session") -> bool:
        return self._active is session


def _open_plain(backend: Backend, spec):
    """A plain session for a graph with a dynamic axis (the runtime's Graph binds static buffers only)."""
    opener = getattr(backend, "open_session", None)
    if opener is None:
        raise ArtifactError(f"the {getattr(backend, 'name', 'selected')} backend cannot run {spec.name} "
                            f"(dynamic shapes); use the onnxruntime backend for voice prompts")
    return opener(spec)


def _load_codec(manifest: Manifest, backend: Backend) -> StreamingCodec:
    spec = manifest.graph("codec_decoder")
    # The codec drives ONNX Runtime bindings itself; hand it a session with the backend's options.
    opener = getattr(backend, "open_session", None)
    try:
        codec = StreamingCodec(opener(spec) if opener else spec.path, spec.raw)
    except (ValueError, KeyError) as exc:
        if isinstance(exc, ArtifactError):
            raise
        raise ArtifactError(f"{spec.path}: unusable codec graph ({exc})") from None
    if codec.frame_samples != manifest.samples_per_frame or codec.num_quantizers != manifest.audio_channels:
        raise ArtifactError(f"{spec.path}: codec frame ({codec.num_quantizers} codes -> {codec.frame_samples} "
                            f"samples) does not match the manifest")
    return codec


@dataclass
class _StepBuffers:
    """Preallocated per-generation arrays; reset() readies them for a new utterance.

    The KV cache is never cleared: row t is written at step t before any step reads it.
    """

    tokens: np.ndarray  # [2, C] the step tokens fed to the backbone
    audio: np.ndarray  # [Q, cache_capacity + max_delay + 1] delayed codes (both CFG rows get the same ones)
    noise: np.ndarray  # [Q, V] uniform noise for the in-graph audio sampler
    k_cache: np.ndarray  # [L, 2, Hkv, S, D]; layer i is bound as the graph's k_cache.i
    v_cache: np.ndarray

    @classmethod
    def allocate(cls, m: Manifest, cache) -> "_StepBuffers":
        q, vocab = m.audio_channels, int(m.topology["audio_vocab_size"])
        return cls(
            tokens=np.zeros((BRANCHES, 2 + q), dtype=np.int64),
            # a prefix moves generation A frames later: size by the cache's frames plus the delay tail
            audio=np.zeros((q, m.cache_capacity + m.max_delay + 1), dtype=np.int64),
            noise=np.zeros((q, vocab), dtype=np.float32),
            k_cache=np.zeros((int(m.topology["n_layer"]), *cache.shape), dtype=cache.dtype),
            v_cache=np.zeros((int(m.topology["n_layer"]), *cache.shape), dtype=cache.dtype),
        )

    def reset(self, ids) -> None:
        self.tokens.fill(ids.pad)
        self.tokens[0, 0] = ids.bos
        self.tokens[1, 0] = ids.zero
        self.audio.fill(UNGENERATED)
        self.noise.fill(0.0)


@dataclass
class _Emitter:
    """Which aligned frames and words have gone out; reset() for a new utterance."""

    crop: int | None = None  # first aligned frame of the output, once the first word is known
    next_frame: int = 0  # next aligned frame (absolute) to decode
    words_sent: int = 0  # transcript entries already attached to a chunk or dropped

    def reset(self) -> None:
        self.crop, self.next_frame, self.words_sent = None, 0, 0


@dataclass
class _Tally:
    """What the loop learned so far; reset() for a new utterance."""

    first_word_frame: int | None = None
    eos_cutoff: int | None = None
    last_step: int = -1
    started: float = 0.0
    first_audio: float | None = None
    pcm: list[np.ndarray] = field(default_factory=list)

    def reset(self) -> None:
        self.first_word_frame = self.eos_cutoff = self.first_audio = None
        self.last_step, self.started, self.pcm = -1, 0.0, []


_WAIT = object()  # the loop needs more text before it can go on


class Session:
    """One utterance. ``feed`` text, ``close`` when done, iterate for AudioChunks.

    Iteration yields every chunk that can be made with the text so far and stops
    when the model wants a word that has not arrived yet (feed more and iterate
    again) or, after ``close``, when the utterance is complete (``result`` is set).
    """

    def __init__(self, runtime: Dia2Runtime, params: GenerationParams, progress,
                 prefix: "Prefix | WarmState | None" = None, include_prefix: bool = False,
                 prefill: bool = True) -> None:
        m = runtime.manifest
        self.runtime, self.params, self._progress = runtime, params, progress
        self.machine = StateMachine(m.token_ids, second_stream_ahead=m.second_stream_ahead,
                                    initial_padding=params.initial_padding, max_padding=m.max_padding)
        self._warm = prefix if isinstance(prefix, WarmState) else None
        self.prefix: Prefix | None = Prefix(prefix.plan, include_prefix) if self._warm else prefix
        self._prefill = prefill
        plan = self.prefix.plan if self.prefix else None
        # The reference queues the prefix's words before the script's (build_prefix_plan + parse_script).
        self.state: TextState = self.machine.new_state(list(plan.entries) if plan else [])
        # Generation starts at frame A - 1 after a warm-up (warmup_with_prefix's return value).
        self._start = plan.frames - 1 if plan else 0
        self._row_shift = ROW_SHIFT if plan else 0
        self.result: SpeakResult | None = None
        self._text, self._closed, self._given, self._words_total = "", False, [], 0
        self._delays = np.asarray(m.delays)
        self._emitter, self._tally = _Emitter(), _Tally()
        self._loop = self._generate()

    # --- input ---------------------------------------------------------------

    def feed(self, text: str) -> None:
        if self._closed:
            raise RuntimeError("this session's input is closed")
        self._text += text
        self._take_entries(_complete_prefix(self._text))

    def close(self) -> None:
        """No more text: the rest of the buffer is complete, and the script may now end."""
        if self._closed:
            return
        check_script(self._text)
        self._take_entries(self._text)
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def done(self) -> bool:
        return self.result is not None

    def _take_entries(self, text: str) -> None:
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
            with_prefix = f" after the {self._start + 1}-frame prefix" if self.prefix else ""
            raise ScriptError(f"the script is too long: it needs at least {needed} frames "
                              f"({needed / m.frame_rate:.1f} s) but the model's context holds {limit}"
                              f"{with_prefix}; split it into shorter scripts")
        new = entries[len(self._given):]
        self._given.extend(new)
        self._words_total += sum(1 for entry in new if entry.tokens)
        self.state.entries.extend(new)

    # --- output --------------------------------------------------------------

    def __iter__(self) -> Iterator[AudioChunk]:
        while not self.done:
            # The runtime's buffers are shared: a newer session has overwritten this one's.
            if not self.runtime._owns(self):
                raise RuntimeError("this session was superseded by a newer one on the same runtime")
            item = next(self._loop, _WAIT)
            if item is _WAIT:
                return
            yield item

    def _generate(self) -> Iterator[AudioChunk | object]:
        rt, m, p = self.runtime, self.runtime.manifest, self.params
        buffers, tally, emitter = rt.buffers, self._tally, self._emitter
        buffers.reset(m.token_ids)
        emitter.reset()
        tally.reset()
        emitter.words_sent = self._dropped_words()
        rt.codec.reset()
        rng = np.random.default_rng(p.seed)
        tally.started = time.perf_counter()
        if self.prefix is not None:
            while not self._script_ready():
                yield _WAIT
            self._warm_up()
        flush_tail = m.max_delay + self.machine.max_padding
        capacity = buffers.audio.shape[1]
        for t in range(self._start, self._start + m.max_context_steps):
            if (tally.eos_cutoff is not None and t >= tally.eos_cutoff) or t + 1 >= capacity \
                    or t + self._row_shift >= m.cache_capacity:
                break
            action = self._backbone_step(t, rng)
            while self._starved(action):
                yield _WAIT
            main, second = self.machine.process(t, self.state, action)
            if tally.first_word_frame is None and main == m.token_ids.new_word:
                tally.first_word_frame = t - p.initial_padding
            self._depformer_step(t, main, second, rng)
            tally.last_step = t
            if tally.eos_cutoff is None and self.state.end_step is not None:
                tally.eos_cutoff = self.state.end_step + flush_tail
            chunk = self._emit_ready(t)
            if chunk is not None:
                yield chunk
            self._report(t)
        yield from self._finish()

    def _script_ready(self) -> bool:
        """The warm-up's look-ahead reads the script's first words: wait for them (or the end of input)."""
        words = sum(1 for entry in self.state.entries if entry.tokens) - len(self.prefix.plan.entries)
        return self._closed or words >= self.machine.second_stream_ahead

    def _warm_up(self) -> None:
        """The reference's warm-up: prefix codes into the delayed buffer, forced steps through the machine,
        and the prefix frames' K/V rows (restored from a WarmState, by the prefill graph, or step by step)."""
        rt, m = self.runtime, self.runtime.manifest
        plan, buf = self.prefix.plan, rt.buffers
        delayed = delay_codes(plan.codes, m.delays, m.token_ids.audio_pad)
        buf.audio[:, : delayed.shape[1]] = delayed
        seq = warmup_tokens(plan, self.machine, self.state, m.token_ids, m.delays, buf.tokens)
        done = 0
        if self._warm is not None:
            done = self._warm.frames
            if not np.array_equal(seq[:done], self._warm.tokens):
                raise RuntimeError("internal error: the warm state's frames differ from this warm-up's")
            rows = (slice(None), slice(None), slice(None), slice(0, done))
            buf.k_cache[rows], buf.v_cache[rows] = self._warm.k_rows, self._warm.v_rows
        rt.fill_cache(seq[done:], self._prefill, start=done)

    def _backbone_step(self, t: int, rng: np.random.Generator) -> int:
        m, p, buf = self.runtime.manifest, self.params, self.runtime.buffers
        ids = m.token_ids
        buf.tokens[:, 2:] = np.where(self._delays > t, ids.audio_bos, buf.audio[:, t])
        buf.tokens[1, 0], buf.tokens[1, 1] = ids.zero, ids.pad
        row = t + self._row_shift
        out = self.runtime.backbone.run(self.runtime.step_feeds(buf.tokens, t, row))
        self.runtime._write_rows(row, out["k_new"], out["v_new"])
        self._hidden, self._cb0 = out["hidden"], out["cb0_logits"]
        return sample(guide(out["action_logits"], p.cfg_scale, p.cfg_filter_k), p.text_temperature, p.text_top_k, rng)

    def _starved(self, action: int) -> bool:
        """Open input and the machine about to take a word it (or its look-ahead) does not have yet."""
        if self._closed or not self.machine.takes_entry(self.state, action):
            return False
        words = sum(1 for entry in self.state.entries if entry.tokens)
        return words < 1 + self.machine.second_stream_ahead

    def _depformer_step(self, t: int, main: int, second: int, rng: np.random.Generator) -> None:
        p, buf = self.params, self.runtime.buffers
        buf.tokens[:, 0], buf.tokens[:, 1] = main, second
        if p.audio_temperature > 0:
            rng.random(out=buf.noise, dtype=np.float32)
        out = self.runtime.depformer.run({
            "hidden": self._hidden, "cb0_logits": self._cb0, "text_tokens": (main, second), "noise": buf.noise,
            "temperature": p.audio_temperature, "top_k": p.audio_top_k,
            "cfg_scale": p.cfg_scale, "cfg_filter_k": p.cfg_filter_k,
        })
        buf.audio[:, t + 1] = out["audio_tokens"]

    def _emit_ready(self, t: int) -> AudioChunk | None:
        """Decode the aligned frames that step t completed, once the crop (first word) is known.

        Aligned frame k reads delayed column k + delays[q], written at step k + delays[q] - 1,
        so it is complete after step k + max_delay - 1.
        """
        e = self._emitter
        if e.crop is None:
            crop = self._known_crop()
            if crop is None or crop > t + 1 - self.runtime.manifest.max_delay:
                return None
            e.crop = e.next_frame = crop
        return self._chunk(t + 2 - self.runtime.manifest.max_delay, final=False)

    def _known_crop(self) -> int | None:
        """The lead-in to cut, as soon as it is certain.

        It is (first word frame - initial padding), or the start frame (0, or A - 1
        after a prefix) if no main-stream new-word token ever appears. With a second
        stream the machine always moves the new-word token to the second stream, so
        (as in the reference) the crop is the start frame, known from the start.
        A prefix kept in the output means no crop.
        """
        if self.prefix is not None and self.prefix.include_audio:
            return 0
        fwf = self._tally.first_word_frame
        if fwf is not None:
            return max(fwf, 0)
        return self._start if self.machine.second_stream_ahead else None

    def _chunk(self, stop: int, final: bool) -> AudioChunk | None:
        """Decode aligned frames [next_frame, stop) and attach the words that start in them."""
        e, m, buf = self._emitter, self.runtime.manifest, self.runtime.buffers
        pcm = []
        q = np.arange(m.audio_channels)
        for k in range(e.next_frame, stop):
            codes = buf.audio[q, k + self._delays]
            frame = self.runtime.codec.decode_frame(np.where(codes == UNGENERATED, m.token_ids.audio_pad, codes))
            pcm.append(np.clip(frame, -1.0, 1.0))  # the reference clamps Mimi's output
        e.next_frame = max(e.next_frame, stop)
        words = self._words(None if final else e.next_frame)
        if not pcm and not words:
            return None
        chunk = AudioChunk(np.concatenate(pcm) if pcm else np.zeros(0, np.float32), words)
        if pcm:
            self._tally.pcm.append(chunk.pcm)
            if self._tally.first_audio is None:
                self._tally.first_audio = time.perf_counter() - self._tally.started
        return chunk

    def _words(self, before: int | None) -> list[tuple[str, float]]:
        """Transcript words not yet sent that start before aligned frame ``before`` (all if None)."""
        e, rate = self._emitter, max(self.runtime.manifest.frame_rate, 1.0)
        transcript, out = self.state.transcript, []
        while e.words_sent < len(transcript):
            word, step = transcript[e.words_sent]
            if before is not None and step >= before:
                break
            if step >= e.crop:
                out.append((word, (step - e.crop) / rate))
            e.words_sent += 1
        return out

    def _finish(self) -> Iterator[AudioChunk]:
        m, tally, e = self.runtime.manifest, self._tally, self._emitter
        last = tally.last_step if tally.last_step >= self._start else None
        limit = min(last + 2, self.runtime.buffers.audio.shape[1]) if last is not None else self._start + 1
        keep = self.prefix is not None and self.prefix.include_audio
        first = 0 if keep else (tally.first_word_frame if tally.first_word_frame is not None else self._start)
        tokens, stamps, crop = finish(self.runtime.buffers.audio[:, :limit], m.delays, m.token_ids.audio_pad,
                                      first, self.state.transcript[self._dropped_words():], m.frame_rate)
        if e.crop is None:  # nothing went out yet: the final crop decides (it falls back to 0 on a short run)
            e.crop = e.next_frame = crop
        chunk = self._chunk(crop + tokens.shape[1], final=True)
        if chunk is not None:
            yield chunk
        truncated = tally.eos_cutoff is None or tally.last_step + 1 < tally.eos_cutoff
        if truncated:
            warnings.warn(f"the model's context ({m.max_context_steps} frames) ran out before the script "
                          f"ended; the audio is truncated", TruncationWarning, stacklevel=2)
        pcm = np.concatenate(tally.pcm) if tally.pcm else np.zeros(0, np.float32)
        self.result = SpeakResult(pcm, m.sample_rate, tokens, stamps, tally.last_step + 1,
                                  time.perf_counter() - tally.started, tally.first_audio, truncated)

    def _dropped_words(self) -> int:
        """A trimmed prefix's words leave the timestamps (the reference drops that many transcript entries)."""
        if self.prefix is None or self.prefix.include_audio:
            return 0
        return len(self.prefix.plan.entries)

    def _report(self, t: int) -> None:
        if self._progress is not None:
            self._progress(Progress(t + 1, len(self.state.transcript), self._words_total))


def _complete_prefix(text: str) -> str:
    """The longest prefix of ``text`` that ends on a word boundary outside any tag.

    Up to the last whitespace, then back before a ``<`` or ``[`` that is still open
    (a break tag has a space inside it); what follows may still grow.
    """
    match = re.search(r"\s(?=\S*$)", text)
    prefix = text[: match.start()] if match else ""
    while True:
        open_at = max(_unclosed(prefix, "<", ">"), _unclosed(prefix, "[", "]"))
        if open_at < 0:
            return prefix
        prefix = prefix[:open_at]


def _unclosed(text: str, opener: str, closer: str) -> int:
    at = text.rfind(opener)
    return at if at > text.rfind(closer) else -1
