"""``Dia2Runtime``: the artifact's graphs loaded once through a backend, shared by every session.

The runtime holds what does not change while speaking: the manifest, the
tokenizer and the loaded graphs (weights). Each ``Session`` takes its own
``GenerationState`` (buffers, KV cache, codec state) from the runtime's pool and
gives it back when it ends, so sessions in different threads run side by side
on one copy of the weights and each produces exactly what it would alone.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import numpy as np

from .artifacts import ArtifactError, Manifest, load_manifest
from .backends import Backend, Binding, Graph, TakingTurns, create_backend
from .codec import CodecStream, encode
from .params import GenerationParams
from .script import parse_script
from .session import AudioChunk, Progress, Session, SpeakResult, TruncationWarning, _check_text
from .state import StatePool
from .state_machine import Entry
from .tokenizer import TextTokenizer

__all__ = ["AudioChunk", "Dia2Runtime", "Progress", "Session", "SpeakResult", "TruncationWarning"]

STEP_GRAPHS = ("backbone", "depformer", "codec_decoder")  # every session binds these
OPTIONAL_GRAPHS = ("codec_encoder",)  # audio prompts only


class Dia2Runtime:
    """Loaded graphs and tokenizer; ``open_session`` / ``stream`` / ``speak`` from any thread."""

    def __init__(self, manifest: Manifest, backend: Backend, tokenizer: TextTokenizer) -> None:
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = tokenizer
        names = STEP_GRAPHS + tuple(g for g in OPTIONAL_GRAPHS if g in manifest.graphs)
        self.graphs: dict[str, Graph] = {name: backend.load(manifest.graph(name)) for name in names}
        # One lock per graph whose bindings cannot run at the same time: sessions take turns on it.
        self._turns = {name: threading.Lock() for name, g in self.graphs.items() if not g.concurrent}
        self._check_codec()
        self.states = StatePool(manifest, self.bind)

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

    def _check_codec(self) -> None:
        spec = self.manifest.graph("codec_decoder")
        try:
            codec = CodecStream(self.bind("codec_decoder"), self.manifest.codec.codebook_size)
        except ValueError as exc:
            if isinstance(exc, ArtifactError):
                raise
            raise ArtifactError(f"{spec.path}: unusable codec graph ({exc})") from None
        m = self.manifest
        if codec.frame_samples != m.samples_per_frame or codec.num_quantizers != m.audio_channels:
            raise ArtifactError(f"{spec.path}: codec frame ({codec.num_quantizers} codes -> {codec.frame_samples} "
                                f"samples) does not match the manifest")

    def bind(self, name: str) -> Binding:
        """A new binding of graph ``name`` (its own buffers), taking turns where the backend needs it."""
        binding = self.graphs[name].binding()
        return TakingTurns(binding, self._turns[name]) if name in self._turns else binding

    @property
    def sample_rate(self) -> int:
        return self.manifest.sample_rate

    def open_session(self, params: GenerationParams | None = None,
                     progress: Callable[[Progress], None] | None = None) -> Session:
        """Start an utterance fed incrementally (``feed``, ``close``, iterate); sessions are independent."""
        params = GenerationParams() if params is None else params
        if not isinstance(params, GenerationParams):
            raise TypeError(f"params must be GenerationParams, got {type(params).__name__}")
        if progress is not None and not callable(progress):
            raise TypeError(f"progress must be callable, got {type(progress).__name__}")
        return Session(self, params, progress)

    def stream(self, text: str, params: GenerationParams | None = None,
               progress: Callable[[Progress], None] | None = None) -> Session:
        """The whole script at once; iterate the result for AudioChunks. Bad scripts raise here."""
        _check_text(text)
        session = self.open_session(params, progress)
        try:
            session.feed(text)
            session.close()
        except BaseException:
            session.cancel()  # its state goes back to the pool at once
            raise
        return session

    def speak(self, text: str, params: GenerationParams | None = None,
              progress: Callable[[Progress], None] | None = None) -> SpeakResult:
        session = self.stream(text, params, progress)
        for _ in session:
            pass
        return session.result

    def encode(self, pcm: np.ndarray) -> np.ndarray:
        """Mono pcm at ``sample_rate`` -> audio codes [Q, frames] (the artifact's codec encoder)."""
        if "codec_encoder" not in self.graphs:
            raise ArtifactError(f"{self.manifest.root}: no codec_encoder graph in these artifacts")
        return encode(self.bind("codec_encoder"), pcm)

    def parse(self, text: str) -> list[Entry]:
        return parse_script([text], self.tokenizer.encode, self.manifest.token_ids, self.manifest.frame_rate)

    def frames_needed(self, entries: list[Entry], params: GenerationParams) -> int:
        """A lower bound on the frames a script takes: the lead-in, each word's tokens plus its
        new-word frame, each break's length, the end mark, and the codebook delay tail."""
        body = sum(len(e.tokens) + 1 if e.tokens else max(e.padding, 1) for e in entries)
        return params.initial_padding + body + 1 + self.manifest.max_delay
