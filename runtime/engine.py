"""The streaming generation loop over the exported graphs, without torch.

Per frame t (the reference's ``run_generation_loop``): the backbone graph reads
the step tokens and the KV cache and returns the new K/V row, the text-action
logits and the cb0 logits; the action is guided and sampled here; the text state
machine turns it into (main, second) text tokens; the depformer graph samples all
audio codebooks of frame t + 1. Aligned frames go through the streaming codec as
soon as every codebook of them exists, so audio starts long before the script ends.
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .artifacts import ArtifactError, Manifest, cache_name, load_manifest
from .backends import Backend, create_backend
from .codec import StreamingCodec
from .frames import UNGENERATED, finish
from .params import GenerationParams
from .sampling import guide, sample
from .script import ScriptError, check_script, parse_script
from .state_machine import Entry, StateMachine, TextState
from .tokenizer import TextTokenizer

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

    @classmethod
    def load(cls, artifacts_dir: str | Path, backend: str | Backend = "onnxruntime",
             threads: int | None = None, *, verify: bool = True) -> "Dia2Runtime":
        """``verify=False`` skips the files' checksums (the manifest's other checks always run)."""
        manifest = load_manifest(artifacts_dir, verify=verify)
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
                     progress: Callable[[Progress], None] | None = None) -> "Session":
        """Start an utterance fed incrementally; any earlier unfinished session is abandoned."""
        session = Session(self, params or GenerationParams(), progress)
        self._active = session
        return session

    def stream(self, text: str, params: GenerationParams | None = None,
               progress: Callable[[Progress], None] | None = None) -> "Session":
        """The whole script at once; iterate the result for AudioChunks. Bad scripts raise here."""
        session = self.open_session(params, progress)
        session.feed(text)
        session.close()
        return session

    def speak(self, text: str, params: GenerationParams | None = None,
              progress: Callable[[Progress], None] | None = None) -> SpeakResult:
        session = self.stream(text, params, progress)
        for _ in session:
            pass
        return session.result

    def parse(self, text: str) -> list[Entry]:
        return parse_script([text], self.tokenizer.encode, self.manifest.token_ids, self.manifest.frame_rate)

    def frames_needed(self, entries: list[Entry], params: GenerationParams) -> int:
        """A lower bound on the frames a script takes: the lead-in, each word's tokens plus its
        new-word frame, each break's length, the end mark, and the codebook delay tail."""
        body = sum(len(e.tokens) + 1 if e.tokens else max(e.padding, 1) for e in entries)
        return params.initial_padding + body + 1 + self.manifest.max_delay

    def _owns(self, session: "Session") -> bool:
        return self._active is session


def _load_codec(manifest: Manifest, backend: Backend) -> StreamingCodec:
    spec = manifest.graph("codec_decoder")
    # The codec drives ONNX Runtime bindings itself; hand it a session with the backend's options.
    opener = getattr(backend, "open_session", None)
    try:
        io_spec = {**spec.to_json(), "num_quantizers": manifest.codec.num_quantizers,
                   "codebook_size": manifest.codec.codebook_size}
        codec = StreamingCodec(opener(spec) if opener else spec.path, io_spec)
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
    audio: np.ndarray  # [Q, max_context + 1] delayed codes (both CFG rows get the same ones)
    noise: np.ndarray  # [Q, V] uniform noise for the in-graph audio sampler
    k_cache: np.ndarray  # [L, 2, Hkv, S, D]; layer i is bound as the graph's k_cache.i
    v_cache: np.ndarray

    @classmethod
    def allocate(cls, m: Manifest, cache) -> "_StepBuffers":
        q, vocab = m.audio_channels, m.topology.audio_vocab_size
        return cls(
            tokens=np.zeros((BRANCHES, 2 + q), dtype=np.int64),
            audio=np.zeros((q, m.max_context_steps + 1), dtype=np.int64),
            noise=np.zeros((q, vocab), dtype=np.float32),
            k_cache=np.zeros((m.topology.n_layer, *cache.shape), dtype=cache.dtype),
            v_cache=np.zeros((m.topology.n_layer, *cache.shape), dtype=cache.dtype),
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

    def __init__(self, runtime: Dia2Runtime, params: GenerationParams, progress) -> None:
        m = runtime.manifest
        self.runtime, self.params, self._progress = runtime, params, progress
        self.machine = StateMachine(m.token_ids, second_stream_ahead=m.second_stream_ahead,
                                    initial_padding=params.initial_padding, max_padding=m.max_padding)
        self.state: TextState = self.machine.new_state([])
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
        limit = self.runtime.manifest.max_context_steps
        if needed > limit:
            raise ScriptError(f"the script is too long: it needs at least {needed} frames "
                              f"({needed / self.runtime.manifest.frame_rate:.1f} s) but the model's context "
                              f"holds {limit}; split it into shorter scripts")
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
        rt.codec.reset()
        rng = np.random.default_rng(p.seed)
        tally.started = time.perf_counter()
        flush_tail = m.max_delay + self.machine.max_padding
        capacity = buffers.audio.shape[1]
        for t in range(m.max_context_steps):
            if (tally.eos_cutoff is not None and t >= tally.eos_cutoff) or t + 1 >= capacity:
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

    def _backbone_step(self, t: int, rng: np.random.Generator) -> int:
        m, p, buf = self.runtime.manifest, self.params, self.runtime.buffers
        ids = m.token_ids
        buf.tokens[:, 2:] = np.where(self._delays > t, ids.audio_bos, buf.audio[:, t])
        buf.tokens[1, 0], buf.tokens[1, 1] = ids.zero, ids.pad
        out = self.runtime.backbone.run({"tokens": buf.tokens, "position": t})
        row = (slice(None), slice(None), t)
        for i, (k_name, v_name) in enumerate(self.runtime._cache_names):
            self.runtime.backbone.write(k_name, row, out["k_new"][i])
            self.runtime.backbone.write(v_name, row, out["v_new"][i])
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

        It is (first word frame - initial padding), or 0 if no main-stream new-word
        token ever appears. With a second stream the machine always moves the
        new-word token to the second stream, so (as in the reference) there is no
        crop and it is known to be 0 from the start.
        """
        fwf = self._tally.first_word_frame
        if fwf is not None:
            return max(fwf, 0)
        return 0 if self.machine.second_stream_ahead else None

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
        limit = min(tally.last_step + 2, self.runtime.buffers.audio.shape[1]) if tally.last_step >= 0 else 1
        tokens, stamps, crop = finish(self.runtime.buffers.audio[:, :limit], m.delays, m.token_ids.audio_pad,
                                      tally.first_word_frame or 0, self.state.transcript, m.frame_rate)
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
