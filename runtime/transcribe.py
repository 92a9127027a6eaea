"""Word timings for a prefix clip from faster-whisper (the ``[transcribe]`` extra), torch-free.

The reference transcribes with whisper_timestamped on torch; faster-whisper runs
the same Whisper models on CTranslate2 and returns the same word shape
(text, start, end), which ``voice.parse_words`` validates like a words file.
Imported lazily: without the extra, the one-line error names the way out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import first_line
from .voice import VoiceError, Word, parse_words

DEFAULT_MODEL = "large-v3"  # the reference uses openai/whisper-large-v3
MISSING = ("transcribing prefix audio needs faster-whisper: pip install 'dia2-trt[transcribe]', "
           "or pass the word timings with --prefix-words-1/--prefix-words-2 (or voice create --words)")


def load_model(name: str = DEFAULT_MODEL, device: str = "auto", compute_type: str = "default") -> Any:
    """A ``faster_whisper.WhisperModel`` (downloads the CTranslate2 model unless it is cached or a path)."""
    try:
        from faster_whisper import WhisperModel  # pyright: ignore[reportMissingImports]  # optional extra
    except ImportError:
        raise VoiceError(MISSING) from None
    try:
        return WhisperModel(name, device=device, compute_type=compute_type)
    except Exception as exc:  # download, file and device errors all come from different libraries
        raise VoiceError(f"cannot load the Whisper model {name!r}: {first_line(exc)}") \
            from None


def transcribe(model: Any, audio_path: str | Path, duration: float | None = None,
               language: str | None = None) -> list[Word]:
    """Words of ``audio_path`` from a WhisperModel-like object (``transcribe(..., word_timestamps=True)``)."""
    segments, _info = model.transcribe(str(audio_path), language=language, word_timestamps=True)
    raw = [{"word": w.word, "start": float(w.start), "end": float(w.end)}
           for segment in segments for w in (segment.words or [])]
    if not raw:
        raise VoiceError(f"{audio_path}: no words were recognised; pass the word timings as a JSON file instead")
    return parse_words(raw, duration, where=f"{audio_path} (transcribed)")
