"""Audio-prefix conditioning: word timings -> state-machine entries, prefix plans, voice files.

The spec is nari-labs/dia2's ``runtime/voice_clone.py``:

* ``words_to_entries``: each transcribed word becomes an entry whose tokens are
  the word's (the speaker tag ``[S1]``/``[S2]`` is spelled before the first word),
  starting at frame ``max(previous word's end + 1, round(start * frame_rate))``;
  its new-word step is that frame - 1, its padding the frames until the next word
  starts (or until the last word's end) minus one.
* ``build_prefix_plan``: speaker 1's steps are shifted by 3 (the reference's
  "legacy BOS/PAD offset"), speaker 2's by speaker 1's frame count; the codes
  are concatenated along time. Speaker 2 without speaker 1 is an error.

The warm-up itself (``runtime/prefix.py``) forces new-word actions at those
steps while the backbone reads the prefix codes. A ``Voice`` is one speaker's
half of that, and a ``.voice`` file stores it so later runs skip transcription
and encoding: an ``.npz`` read with ``allow_pickle=False`` (never pickle).
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .files import write_atomic
from .state_machine import Entry, TokenIds

SPEAKER_1_OFFSET = 3  # the reference's "legacy BOS/PAD offset" for speaker 1's new-word steps
VOICE_FORMAT = "dia2-trt-voice"
VOICE_VERSION = 1
# Whisper rounds word times to 10 ms and may stamp the last word a little past the
# clip's end; more than this past the end is a words file for some other audio.
END_TOLERANCE_S = 0.05

Encode = Callable[[str], list[int]]


class VoiceError(ValueError):
    """A prefix, words file or voice file that cannot be used."""


@dataclass(frozen=True)
class Word:
    text: str
    start: float
    end: float


# --- words ------------------------------------------------------------------


def parse_words(raw: Any, duration: float | None = None, where: str = "words") -> list[Word]:
    """Validate ``[{"word": str, "start": s, "end": s}, ...]`` (whisper's word-timestamp shape).

    Words must be in order (starts non-decreasing, each start <= its end) and, when
    ``duration`` is known, within the audio. Texts are stripped and empty words
    dropped, as the reference does with whisper's output.
    """
    if not isinstance(raw, list):
        raise VoiceError(f"{where}: expected a JSON list of {{\"word\", \"start\", \"end\"}} objects")
    words: list[Word] = []
    for i, item in enumerate(raw):
        word = _one_word(item, f"{where}[{i}]")
        if words and word.start < words[-1].start:
            raise VoiceError(f"{where}[{i}]: starts at {word.start}s, before the previous word ({words[-1].start}s)")
        if duration is not None and word.end > duration + END_TOLERANCE_S:
            raise VoiceError(f"{where}[{i}]: ends at {word.end}s, past the end of the audio ({duration:.2f}s)")
        if word.text:
            words.append(word)
    return words


def _one_word(item: Any, where: str) -> Word:
    if not isinstance(item, dict) or not {"word", "start", "end"} <= set(item):
        raise VoiceError(f"{where}: expected an object with \"word\", \"start\" and \"end\"")
    text, start, end = item["word"], item["start"], item["end"]
    if not isinstance(text, str):
        raise VoiceError(f"{where}: \"word\" must be a string")
    for name, value in (("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise VoiceError(f"{where}: \"{name}\" must be a non-negative number of seconds")
    if end < start:
        raise VoiceError(f"{where}: ends ({end}s) before it starts ({start}s)")
    return Word(text.strip(), float(start), float(end))


def read_words(path: str | Path, duration: float | None = None) -> list[Word]:
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VoiceError(f"{path}: no such words file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise VoiceError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    except json.JSONDecodeError as exc:
        raise VoiceError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno})") from None
    return parse_words(raw, duration, where=str(path))


# --- entries ----------------------------------------------------------------


def speaker_tag(speaker: int) -> str:
    if speaker not in (1, 2):
        raise VoiceError(f"speaker must be 1 or 2, not {speaker}")
    return f"[S{speaker}]"


def words_to_entries(words: Sequence[Word], encode: Encode, tag: str | None,
                     frame_rate: float) -> tuple[list[Entry], list[int]]:
    """The reference's ``words_to_entries``: (entries, new-word steps before any offset).

    ``tag`` is spelled before the first word; the reference uses the tag only
    when the tokenizer's id for it is the speaker token (``speaker_tag_for``).
    Frames use Python's round (half to even), as the reference does.
    """
    entries: list[Entry] = []
    steps: list[int] = []
    position = 0
    for i, word in enumerate(words):
        tokens = encode(f"{tag} {word.text}" if tag and i == 0 else word.text)
        start = max(position + 1, int(round(word.start * frame_rate)))
        end = start + len(tokens)
        steps.append(start - 1)
        following = words[i + 1].start if i + 1 < len(words) else words[-1].end
        next_start = max(end + 1, int(round(following * frame_rate)))
        entries.append(Entry(tokens=tokens, text=word.text, padding=max(0, next_start - start - 1)))
        position = end
    return entries, steps


def speaker_tag_for(speaker: int, token_id: Callable[[str], int | None], ids: TokenIds) -> str | None:
    """``[S1]``/``[S2]`` if the tokenizer maps it to the speaker token, else None (the reference's check)."""
    tag = speaker_tag(speaker)
    return tag if token_id(tag) == (ids.spk1 if speaker == 1 else ids.spk2) else None


# --- voices and plans ---------------------------------------------------------


@dataclass
class Voice:
    """One speaker's prefix: Mimi codes [Q, T], the words, and their entries/new-word steps."""

    speaker: int
    codes: np.ndarray
    words: list[Word]
    entries: list[Entry]
    steps: list[int]  # new-word steps within this voice's own frames (no offset)
    audio_sha256: str | None = None
    artifacts: dict[str, str] = field(default_factory=dict)  # codec/tokenizer hashes it was made with

    @property
    def frames(self) -> int:
        return int(self.codes.shape[1])


@dataclass
class PrefixPlan:
    """What the warm-up needs: entries (first in the queue), forced new-word steps, aligned codes [Q, A]."""

    entries: list[Entry]
    new_word_steps: list[int]
    codes: np.ndarray

    @property
    def frames(self) -> int:
        return int(self.codes.shape[1])


def build_plan(speaker_1: Voice | None, speaker_2: Voice | None = None) -> PrefixPlan | None:
    """Join the speakers' prefixes the reference's way (None when there is no prefix)."""
    if speaker_1 is None:
        if speaker_2 is not None:
            raise VoiceError("a speaker 2 prefix needs a speaker 1 prefix too (as in the reference)")
        return None
    entries = list(speaker_1.entries)
    steps = [s + SPEAKER_1_OFFSET for s in speaker_1.steps]
    codes = speaker_1.codes
    if speaker_2 is not None:
        entries += speaker_2.entries
        steps += [s + speaker_1.frames for s in speaker_2.steps]
        codes = np.concatenate([codes, speaker_2.codes], axis=1)
    return PrefixPlan(entries, steps, np.ascontiguousarray(codes, dtype=np.int64))


# --- voice files --------------------------------------------------------------


def save_voice(voice: Voice, path: str | Path) -> None:
    """Write ``path`` atomically: codes as an int64 array, everything else as one JSON string."""
    meta = {
        "format": VOICE_FORMAT, "version": VOICE_VERSION, "speaker": voice.speaker,
        "words": [{"word": w.text, "start": w.start, "end": w.end} for w in voice.words],
        "entries": [{"text": e.text, "tokens": e.tokens, "padding": e.padding} for e in voice.entries],
        "new_word_steps": voice.steps, "audio_sha256": voice.audio_sha256, "artifacts": voice.artifacts,
    }

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, codes=np.asarray(voice.codes, dtype=np.int64), meta=np.array(json.dumps(meta)))

    write_atomic(Path(path), write)


def load_voice(path: str | Path) -> Voice:
    path = Path(path)
    if path.is_file() and not zipfile.is_zipfile(path):  # np.load would blame pickling for any other file
        raise VoiceError(f"{path}: not a voice file")
    try:
        with np.load(path, allow_pickle=False) as data:
            codes, meta = data["codes"], json.loads(str(data["meta"]))
    except FileNotFoundError:
        raise VoiceError(f"{path}: no such voice file") from None
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise VoiceError(f"{path}: not a voice file ({_first_line(exc)})") from None
    if not isinstance(meta, dict) or meta.get("format") != VOICE_FORMAT:
        raise VoiceError(f"{path}: not a dia2-trt voice file")
    if meta.get("version") != VOICE_VERSION:
        raise VoiceError(f"{path}: voice format version {meta.get('version')!r} is not supported; recreate it")
    try:
        return _voice_from(meta, codes)
    except (KeyError, TypeError, ValueError) as exc:
        raise VoiceError(f"{path}: malformed voice file ({_first_line(exc)})") from None


def _voice_from(meta: dict, codes: np.ndarray) -> Voice:
    if codes.ndim != 2 or codes.dtype != np.int64 or codes.shape[1] == 0:
        raise ValueError(f"codes must be a non-empty int64 [Q, T] array, got {codes.dtype} {codes.shape}")
    entries = [Entry(tokens=[int(t) for t in e["tokens"]], text=str(e["text"]), padding=int(e["padding"]))
               for e in meta["entries"]]
    words = [Word(str(w["word"]), float(w["start"]), float(w["end"])) for w in meta["words"]]
    steps = [int(s) for s in meta["new_word_steps"]]
    if len(steps) != len(entries):
        raise ValueError("new_word_steps and entries differ in length")
    return Voice(int(meta["speaker"]), codes, words, entries, steps, meta.get("audio_sha256"),
                 {str(k): str(v) for k, v in dict(meta.get("artifacts") or {}).items()})


def _first_line(exc: Exception) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__
