"""``Dia2Runtime``: the artifact's graphs loaded once through a backend, shared by every session.

The runtime holds what does not change while speaking: the manifest, the
tokenizer and the loaded graphs (weights). Each ``Session`` takes its own
``GenerationState`` (host buffers) from the runtime's pool and gives it back when
it ends. Its graph state (KV cache rows, codec state) is a slot of a
``step.FrameStepper``: with ``max_streams`` > 1 the runtime's one batch, stepped by
a ``batch.BatchEngine`` that runs every live session's frame in one graph call per
graph; with ``max_streams=1`` a stepper of the session's own, stepped in the
caller's thread. Either way sessions in different threads run side by side on one
copy of the weights and each produces exactly what it would alone.

Audio prefixes (``voice``, ``prefix``, ``warm``, ``turn_voice``) are the reference's
``generate(prefix_speaker_1=..., prefix_speaker_2=..., include_prefix=...)``: see
``voice.py`` for the word timings and ``prefix.py`` for the warm-up.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .artifacts import ArtifactError, Manifest, cache_name, load_manifest
from .audio import file_sha256, load_mono, read_audio
from .backends import Backend, Binding, Graph, TakingTurns, create_backend
from .batch import BatchEngine
from .codec import encode
from .params import Chunking, GenerationParams
from .prefix import WARM_REMEDY, Prefix, WarmState, check_warm, script_free_frames
from .script import parse_script
from .session import AudioChunk, Progress, Session, SpeakResult, TruncationWarning, _check_text
from .state import GenerationState, StatePool
from .state_machine import Entry, StateMachine
from .step import BRANCHES, K_ROWS, V_ROWS, BackboneCall, FrameStepper
from .tokenizer import TextTokenizer
from .voice import (
    Voice,
    VoiceError,
    Word,
    build_plan,
    check_codes,
    check_hashes,
    check_voice_values,
    parse_words,
    read_words,
    recreate,
    speaker_tag_for,
    words_to_entries,
)

__all__ = ["AudioChunk", "Dia2Runtime", "Progress", "Session", "SpeakResult", "TruncationWarning"]

STEP_GRAPHS = ("backbone", "depformer", "codec_decoder")  # every session binds these
# Loaded on first use (audio prompts only): the real Mimi encoder is 0.23 GB of weights that a
# runtime speaking without prefixes never reads.
ENCODER_GRAPH = "codec_encoder"
# Loaded on a prefix's first warm-up: it holds a second copy of the backbone's weights.
PREFILL_GRAPH = "backbone_prefill"
MISSING_TRANSCRIBER = "no word timings for the prefix audio: give a words JSON file or a transcriber"


class Dia2Runtime:
    """Loaded graphs and tokenizer; ``open_session`` / ``stream`` / ``speak`` from any thread."""

    def __init__(self, manifest: Manifest, backend: Backend, tokenizer: TextTokenizer,
                 max_streams: int | None = None) -> None:
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = tokenizer
        self.max_streams = _max_streams(manifest, max_streams)
        self.graphs: dict[str, Graph] = {name: backend.load(manifest.graph(name)) for name in STEP_GRAPHS}
        # One lock per graph whose bindings cannot run at the same time: sessions take turns on it.
        self._turns = {name: threading.Lock() for name, g in self.graphs.items() if not g.concurrent}
        self._check_codec()
        self.states: StatePool[GenerationState] = StatePool(lambda: GenerationState.allocate(manifest))
        # Steppers of one stream: a session's own on an unbatched runtime, and warm()'s.
        self.solo: StatePool[FrameStepper] = StatePool(lambda: FrameStepper(manifest, self.bind, 1))
        self.engine = BatchEngine(FrameStepper(manifest, self.bind, self.max_streams)) \
            if self.max_streams > 1 else None
        self._lazy_lock, self._prefill_unusable = threading.Lock(), False

    @classmethod
    def load(cls, artifacts_dir: str | Path, backend: str | Backend = "onnxruntime",
             threads: int | None = None, *, verify: bool = True, max_streams: int | None = None) -> Dia2Runtime:
        """``verify=False`` skips the files' checksums (the manifest's other checks always run).

        ``max_streams``: sessions stepped together in one graph call per frame (default: the
        artifacts' ``max_streams``); more sessions than that wait for a free slot. 1 gives each
        session graph bindings of its own, stepped in the thread that iterates it."""
        manifest = load_manifest(artifacts_dir, verify=verify)
        backend = create_backend(backend, threads) if isinstance(backend, str) else backend
        try:
            tokenizer = TextTokenizer.from_dir(manifest.tokenizer_dir)
        except Exception as exc:  # tokenizers raises bare Exceptions for malformed files
            raise ArtifactError(f"{manifest.tokenizer_dir}: cannot load tokenizer ({exc})") from None
        return cls(manifest, backend, tokenizer, max_streams)

    def _check_codec(self) -> None:
        spec = self.manifest.graph("codec_decoder")
        try:
            decoder = FrameStepper.codec_frame(self.bind("codec_decoder"))
        except ValueError as exc:
            if isinstance(exc, ArtifactError):
                raise
            raise ArtifactError(f"{spec.path}: unusable codec graph ({exc})") from None
        m = self.manifest
        if decoder != (m.audio_channels, m.samples_per_frame):
            raise ArtifactError(f"{spec.path}: codec frame ({decoder[0]} codes -> {decoder[1]} "
                                f"samples) does not match the manifest")

    def admit(self, session: Session) -> None:
        """A new session's driver: a slot in the batch (the engine steps it), or a stepper of its own."""
        if self.engine is not None:
            self.engine.admit(session)
            return
        session.stepper, session.slot = self.solo.take(), 0
        session.stepper.restart()

    def release(self, session: Session) -> None:
        """A session ended: its own stepper back to the pool (a batch slot the engine frees itself)."""
        if self.engine is None and session.stepper is not None:
            stepper, session.stepper = session.stepper, None
            self.solo.give_back(stepper)

    def close(self) -> None:
        """Stop the batch engine's thread (sessions still open fail); the runtime is not used after."""
        if self.engine is not None:
            self.engine.close()

    def bind(self, name: str) -> Binding:
        """A new binding of graph ``name`` (its own buffers), taking turns where the backend needs it."""
        binding = self.graphs[name].binding()
        return TakingTurns(binding, self._turns[name]) if name in self._turns else binding

    @property
    def sample_rate(self) -> int:
        return self.manifest.sample_rate

    def open_session(self, params: GenerationParams | None = None,
                     progress: Callable[[Progress], None] | None = None,
                     prefix: Prefix | WarmState | SpeakResult | None = None, *, include_prefix: bool = False,
                     prefill: bool = True, chunking: Chunking | None = None) -> Session:
        """Start an utterance fed incrementally (``feed``, ``close``, iterate); sessions are independent.

        ``prefix``: an audio prefix (``self.prefix(...)``), a warmed voice pair
        (``self.warm(...)``) or the previous turn's SpeakResult; ``include_prefix``
        keeps its audio (and words) in the output, when ``prefix`` is not a Prefix.
        ``prefill``: warm up in one graph call where the artifacts have the prefill
        graph (else frame by frame, as the reference).
        ``chunking``: frames per chunk (``Chunking(first_frames, frames)``); one each by default.
        """
        params = GenerationParams() if params is None else params
        if not isinstance(params, GenerationParams):
            raise TypeError(f"params must be GenerationParams, got {type(params).__name__}")
        if progress is not None and not callable(progress):
            raise TypeError(f"progress must be callable, got {type(progress).__name__}")
        if isinstance(prefix, SpeakResult):  # a conversation's previous turn
            prefix = self.prefix(self.turn_voice(prefix.tokens, prefix.timestamps), include_prefix=include_prefix)
        elif isinstance(prefix, WarmState):
            self.check_warm(prefix)
        elif prefix is not None and not isinstance(prefix, Prefix):
            raise TypeError(f"prefix must be a Prefix, WarmState or SpeakResult, got {type(prefix).__name__}")
        if chunking is not None and not isinstance(chunking, Chunking):
            raise TypeError(f"chunking must be a Chunking, got {type(chunking).__name__}")
        return Session(self, params, progress, prefix, include_prefix, prefill, chunking)

    def stream(self, text: str, params: GenerationParams | None = None,
               progress: Callable[[Progress], None] | None = None, **prefix_options) -> Session:
        """The whole script at once; iterate the result for AudioChunks. Bad scripts raise here.
        The keywords are open_session's (prefix, include_prefix, prefill, chunking)."""
        _check_text(text)
        session = self.open_session(params, progress, **prefix_options)
        try:
            session.feed(text)
            session.close()
        except BaseException:
            session.cancel()  # its state goes back to the pool at once
            raise
        return session

    def speak(self, text: str, params: GenerationParams | None = None,
              progress: Callable[[Progress], None] | None = None, **prefix_options) -> SpeakResult:
        """Generate ``text``; ``prefix=``, ``include_prefix=``, ``prefill=`` as for ``open_session``."""
        session = self.stream(text, params, progress, **prefix_options)
        for _ in session:
            pass
        # The input is closed and nothing else holds the session to cancel it, so the loop ran to its end.
        assert session.result is not None
        return session.result

    def encode(self, pcm: np.ndarray) -> np.ndarray:
        """Mono pcm at ``sample_rate`` -> audio codes [Q, frames] (the artifact's codec encoder)."""
        if ENCODER_GRAPH not in self.manifest.graphs:
            raise ArtifactError(f"{self.manifest.root}: no codec_encoder graph in these artifacts")
        self._load_once(ENCODER_GRAPH)
        return encode(self.bind(ENCODER_GRAPH), pcm)

    def parse(self, text: str) -> list[Entry]:
        return parse_script([text], self.tokenizer.encode, self.manifest.token_ids, self.manifest.frame_rate)

    def frames_needed(self, entries: list[Entry], params: GenerationParams) -> int:
        """A lower bound on the frames a script takes: the lead-in, each word's tokens plus its
        new-word frame, each break's length, the end mark, and the codebook delay tail."""
        body = sum(len(e.tokens) + 1 if e.tokens else max(e.padding, 1) for e in entries)
        return params.initial_padding + body + 1 + self.manifest.max_delay

    # --- voices ----------------------------------------------------------------

    def voice(self, audio: str | Path, words: list[Word] | str | Path | None = None, speaker: int = 1,
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
        m = self.manifest
        self.check_prefix_frames(-(-pcm.size // m.samples_per_frame))  # before encoding a long clip
        tag = speaker_tag_for(speaker, self.tokenizer.token_id, m.token_ids)
        entries, steps = words_to_entries(words, self.tokenizer.encode, tag, m.frame_rate)
        return Voice(speaker, np.ascontiguousarray(self.encode(pcm), dtype=np.int64), list(words), entries, steps,
                     file_sha256(audio), self.artifact_hashes())

    def turn_voice(self, codes: np.ndarray, timestamps: list[tuple[str, float]], speaker: int = 1) -> Voice:
        """A finished utterance (``SpeakResult.tokens``/``.timestamps``) as the next turn's prefix.

        No re-encoding or transcription: its codes are the prefix codes and its word
        times the word timings (each word lasting until the next one starts, the last
        until the audio ends). The speaker tag goes before its first word, as for a
        transcribed clip, so a dialogue keeps its voices turn after turn.
        """
        m = self.manifest
        codes = np.ascontiguousarray(codes, dtype=np.int64)
        vocab = m.codec.codebook_size
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

    def prefix(self, speaker_1: Voice | None, speaker_2: Voice | None = None,
               include_prefix: bool = False, *, include_audio: bool | None = None) -> Prefix | None:
        """The reference's prefix plan from voices (speaker 2 needs speaker 1); checked against the context.

        ``include_prefix`` keeps the prefix audio in the output, as ``open_session``'s and the reference's
        argument of that name; ``include_audio`` is its earlier spelling, still accepted."""
        if include_audio is not None:
            include_prefix = include_audio
        for voice in (speaker_1, speaker_2):
            if voice is not None:
                self.check_voice(voice)
        plan = build_plan(*(self._as_speaker(v, slot) if v else None for slot, v in ((1, speaker_1), (2, speaker_2))))
        if plan is None:
            return None
        if plan.codes.shape[0] != self.manifest.audio_channels:
            raise VoiceError(f"the prefix has {plan.codes.shape[0]} codebooks, "
                             f"the model {self.manifest.audio_channels}")
        self.check_prefix_frames(plan.frames)
        return Prefix(plan, include_prefix)

    def _as_speaker(self, voice: Voice, speaker: int) -> Voice:
        """A voice recorded for the other speaker slot gets its entries re-tokenised with this slot's tag."""
        if voice.speaker == speaker:
            return voice
        tag = speaker_tag_for(speaker, self.tokenizer.token_id, self.manifest.token_ids)
        entries, steps = words_to_entries(voice.words, self.tokenizer.encode, tag, self.manifest.frame_rate)
        return Voice(speaker, voice.codes, voice.words, entries, steps, voice.audio_sha256, voice.artifacts,
                     voice.source)

    def check_voice(self, voice: Voice) -> None:
        """Refuse (VoiceError, one line) a voice made with other artifacts, holding values these
        artifacts cannot take, or too long for their cache; before anything is allocated for it."""
        if not isinstance(voice, Voice):
            raise TypeError(f"a voice must be a Voice, got {type(voice).__name__}")
        m = self.manifest
        check_hashes(voice.artifacts, self.artifact_hashes(), voice.name,
                     "recreate it: " + recreate(voice, str(m.root)))
        check_voice_values(voice, m.audio_channels, m.codec.codebook_size, m.frame_rate, self.tokenizer.encode,
                           lambda n: speaker_tag_for(n, self.tokenizer.token_id, m.token_ids), str(m.root))
        self.check_prefix_frames(voice.frames)

    def check_prefix_frames(self, frames: int) -> None:
        """A prefix needs its frames in the KV cache plus room for at least one generated frame."""
        room = self.manifest.cache_capacity - 1
        if frames > room:
            raise VoiceError(f"the prefix is {frames} frames ({frames / self.manifest.frame_rate:.1f} s) but these "
                             f"artifacts hold at most {room} (rebuild them with a larger --prefix-frames)")

    def artifact_hashes(self) -> dict[str, str]:
        """What a voice depends on: the encoder that made its codes and the tokenizer that made its entries."""
        return {"codec_encoder": self.manifest.graph("codec_encoder").sha256,
                "tokenizer": self.manifest.tokenizer.files.get("tokenizer.json", "")}

    def warm_hashes(self) -> dict[str, str]:
        """What a warm state is bound to: every graph and the tokenizer. Its rows are the backbone's
        (or the prefill's) over codes the encoder made and entries the tokenizer made; the depformer
        and decoder never read it, but it is a cache of one directory's run, remade by one warm-up,
        so any changed file refuses it rather than leaving anyone to reason about which matter."""
        hashes = {name: spec.sha256 for name, spec in self.manifest.graphs.items()}
        return {**hashes, "tokenizer": self.manifest.tokenizer.files.get("tokenizer.json", "")}

    def warm_layout(self) -> dict:
        """The cache's shape ([2, Hkv, rows, D] per layer, at its bound), dtype and layers, and the codebooks."""
        spec = self.graphs["backbone"].spec
        cache = spec.input(cache_name("k", 0)).bounded(spec.dims)  # [2 * streams, Hkv, rows, D]
        return {"rows": (self.manifest.topology.n_layer, BRANCHES, cache.shape[1], cache.shape[3]),
                "dtype": cache.dtype, "channels": self.manifest.audio_channels}

    def check_warm(self, warm: WarmState) -> None:
        """Refuse (VoiceError, one line) a warm state of other artifacts or whose values these cannot
        take: see ``prefix.check_warm``."""
        if not isinstance(warm, WarmState):
            raise TypeError(f"a warm state must be a WarmState, got {type(warm).__name__}")
        check_hashes(warm.artifacts, self.warm_hashes(), "this warm state", WARM_REMEDY)
        m = self.manifest
        check_codes(warm.plan.codes, m.audio_channels, m.codec.codebook_size, "the warm state's codes")
        self.check_prefix_frames(warm.plan.frames)
        check_warm(warm, self._script_free(warm.plan), self.warm_layout(), m.topology.text_vocab_size)

    def _script_free(self, plan) -> np.ndarray:
        """The step tokens of ``plan``'s script-free warm-up frames on these artifacts (``warm`` keeps those)."""
        m = self.manifest
        machine = StateMachine(m.token_ids, second_stream_ahead=m.second_stream_ahead, initial_padding=0,
                               max_padding=m.max_padding)
        ids, tokens = m.token_ids, np.full((2, 2 + m.audio_channels), m.token_ids.pad, dtype=np.int64)
        tokens[0, 0], tokens[1, 0] = ids.bos, ids.zero  # as GenerationState.reset leaves them
        return script_free_frames(plan, machine, ids, m.delays, tokens)

    def warm(self, prefix: Prefix, prefill: bool = True) -> WarmState:
        """Run the script-independent part of ``prefix``'s warm-up once, for reuse by many sessions."""
        m = self.manifest
        machine = StateMachine(m.token_ids, second_stream_ahead=m.second_stream_ahead, initial_padding=0,
                               max_padding=m.max_padding)
        state, stepper = self.states.take(), self.solo.take()
        try:
            state.reset(m, machine, GenerationParams())
            stepper.restart()
            seq = script_free_frames(prefix.plan, machine, m.token_ids, m.delays, state.tokens)
            rows = self.prefill_rows(seq) if prefill else None
            if rows is not None:
                stepper.write_rows(0, 0, *rows)
            for t, tokens in enumerate(seq if rows is None else ()):
                stepper.backbone_step({0: BackboneCall(tokens, t, t)})
            k_rows, v_rows = stepper.read_rows(0, len(seq))
            return WarmState(prefix.plan, k_rows, v_rows, seq.copy(), self.warm_hashes())
        finally:
            self.states.give_back(state)
            self.solo.give_back(stepper)

    def prefill_rows(self, seq: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """K/V rows 0 .. T-1 ([L, 2, Hkv, T, D] each) of warm-up step tokens seq [T, 2, C] in one call of
        the prefill graph, or None where the artifacts have none (the caller steps frame by frame)."""
        prefill_graph = self._prefill_binding() if len(seq) else None
        if prefill_graph is None:
            return None
        out = prefill_graph.run({"tokens": np.ascontiguousarray(seq.transpose(1, 2, 0))})
        return out[K_ROWS], out[V_ROWS]

    def _prefill_binding(self):
        """A binding of the prefill graph (loaded on first use), or None in artifacts without one."""
        if PREFILL_GRAPH not in self.manifest.graphs or self._prefill_unusable:
            return None
        try:
            self._load_once(PREFILL_GRAPH)
        except ArtifactError:  # a backend without dynamic shapes: the step-wise warm-up still works
            self._prefill_unusable = True
            return None
        return self.bind(PREFILL_GRAPH)

    def _load_once(self, name: str) -> None:
        """Load graph ``name`` on its first use (the prefill and encoder graphs: not every runtime needs them)."""
        with self._lazy_lock:
            if name not in self.graphs:
                graph = self.backend.load(self.manifest.graph(name))
                if not graph.concurrent:
                    self._turns[name] = threading.Lock()
                self.graphs[name] = graph


def _max_streams(m: Manifest, asked: int | None) -> int:
    """The batch size a runtime steps: what was asked for, within what the artifacts' graphs take."""
    most = m.max_streams
    if asked is None:
        return most
    if isinstance(asked, bool) or not isinstance(asked, int) or asked < 1:
        raise ValueError(f"max_streams must be a positive integer, got {asked!r}")
    if asked > most:
        raise ArtifactError(f"{m.root}: these artifacts' graphs step at most {most} streams, not {asked}; "
                            f"rebuild them with dia2-export build ... --max-streams {asked}")
    return asked
