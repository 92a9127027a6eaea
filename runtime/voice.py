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
and encoding: an ``.npz`` (a zip of ``.npy`` members) that ``read_npz`` checks
before decoding anything -- a regular file within a size bound, exactly the
expected members, each member's declared size, dtype and shape, and no member
that inflates past a small bound -- and reads without numpy's loader (never
pickle). The values are checked next (``_voice_from``), and against the artifacts
when the voice is used (``Dia2Runtime.prefix``).
"""

from __future__ import annotations

import json
import math
import re
import struct
import zipfile
import zlib
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from .errors import first_line
from .files import InputFileError, open_regular, parse_json, read_json_file, write_atomic
from .state_machine import Entry, TokenIds

SPEAKER_1_OFFSET = 3  # the reference's "legacy BOS/PAD offset" for speaker 1's new-word steps
VOICE_FORMAT = "dia2-trt-voice"
VOICE_VERSION = 1
# Whisper rounds word times to 10 ms and may stamp the last word a little past the
# clip's end; more than this past the end is a words file for some other audio.
END_TOLERANCE_S = 0.05
# Bounds on what a voice holds. A real one is a clip of at most the cache's frames: 2B's 1501
# frames of 32 codebooks are 0.4 MB of codes, its words ~0.1 MB of JSON (4 bytes a character
# as numpy stores text). These bounds are a hundred times that and still far from memory trouble.
MAX_VOICE_BYTES = 128 << 20
MAX_CODES_BYTES = 64 << 20
MAX_META_BYTES = 16 << 20
MAX_WORDS_BYTES = 16 << 20  # a words JSON file
MAX_CODEBOOKS = 256
MAX_INT = 2**31 - 1  # token ids, steps and paddings (the graphs read them as int32/int64)
SHA256 = re.compile(r"[0-9a-f]{64}")
RECREATE = "dia2-rt voice create AUDIO --artifacts {artifacts} --speaker {speaker} --words WORDS.json --out {path}"

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
    """A words JSON file: a regular file of at most MAX_WORDS_BYTES, bounded JSON, checked words."""
    try:
        raw = read_json_file(path, MAX_WORDS_BYTES, "words file")
    except InputFileError as exc:
        raise VoiceError(str(exc).replace(" is not valid JSON", " is malformed JSON", 1)) from None
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
    source: str | None = field(default=None, compare=False)  # the file it was loaded from, for messages

    @property
    def frames(self) -> int:
        return int(self.codes.shape[1])

    @property
    def name(self) -> str:
        return f"voice {self.source}" if self.source else "this voice"


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
    """A ``.voice`` file, every value checked that can be without the artifacts (``Dia2Runtime.prefix``
    checks the rest). Anything wrong is one ``VoiceError`` line."""
    path = Path(path)
    members = {"codes": NpyMember(is_int64, "int64", 2, MAX_CODES_BYTES),
               "meta": NpyMember(is_text, "text", 0, MAX_META_BYTES)}
    try:
        data = read_npz(path, members, MAX_VOICE_BYTES, "voice file")
        meta = parse_json(str(data["meta"]), f"voice file {path}: meta")
    except InputFileError as exc:
        raise VoiceError(str(exc)) from None
    if not isinstance(meta, dict) or meta.get("format") != VOICE_FORMAT:
        raise VoiceError(f"voice file {path}: not a dia2-trt voice file")
    if meta.get("version") != VOICE_VERSION:
        raise VoiceError(f"voice file {path}: format version {_short(meta.get('version'))} is not supported; "
                         f"recreate it: " + RECREATE.format(artifacts="DIR", speaker="N", path=path))
    try:
        voice = _voice_from(meta, data["codes"])
    except VoiceError as exc:
        raise VoiceError(f"voice file {path}: {exc}") from None
    voice.source = str(path)
    return voice


VOICE_KEYS = {"format", "version", "speaker", "words", "entries", "new_word_steps", "audio_sha256", "artifacts"}


def _voice_from(meta: dict, codes: np.ndarray) -> Voice:
    """The voice a file's meta and codes describe, each value checked on its own and against the others."""
    if set(meta) != VOICE_KEYS:
        raise VoiceError(f"meta has keys {sorted(meta)}, expected {sorted(VOICE_KEYS)}")
    speaker = meta["speaker"]
    if type(speaker) is not int or speaker not in (1, 2):
        raise VoiceError(f"speaker must be 1 or 2, not {_short(speaker)}")
    check_codes(codes, MAX_CODEBOOKS, None, "codes")
    words = parse_words(meta["words"], None, where="words")
    if len(words) != len(meta["words"]):
        raise VoiceError("words: an empty word (a voice file holds only words with text)")
    entries = entries_from_json(meta["entries"], "entries")
    steps = checked_ints(meta["new_word_steps"], "new_word_steps")
    if len(entries) != len(words) or len(steps) != len(words):
        raise VoiceError(f"{len(words)} words, {len(entries)} entries and {len(steps)} new_word_steps: "
                         f"a voice has one of each per word")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise VoiceError("new_word_steps must increase")
    for i, (word, entry) in enumerate(zip(words, entries)):
        if entry.text != word.text or not entry.tokens:
            raise VoiceError(f"entries[{i}] is not words[{i}] ({_short(entry.text)} vs {_short(word.text)})")
    sha = meta["audio_sha256"]
    if sha is not None and not (isinstance(sha, str) and SHA256.fullmatch(sha)):
        raise VoiceError("audio_sha256 must be a sha256 hex digest or null")
    return Voice(speaker, codes, words, entries, steps, sha, checked_hashes(meta["artifacts"], "artifacts"))


def check_codes(codes: Any, channels: int | None, vocab: int | None, what: str) -> None:
    """Codes are a non-empty int64 [Q, T] array, Q == ``channels`` (or at most it, when not exact),
    every code in [0, ``vocab``) (or non-negative, when the vocabulary is not known yet)."""
    if not isinstance(codes, np.ndarray) or codes.dtype != np.int64 or codes.ndim != 2 or 0 in codes.shape:
        shape = f"{codes.dtype} {codes.shape}" if isinstance(codes, np.ndarray) else type(codes).__name__
        raise VoiceError(f"{what} must be a non-empty int64 [codebooks, frames] array, got {shape}")
    if vocab is not None and codes.shape[0] != channels:
        raise VoiceError(f"{what} have {codes.shape[0]} codebooks, these artifacts {channels}")
    if codes.shape[0] > (channels or MAX_CODEBOOKS):
        raise VoiceError(f"{what} have {codes.shape[0]} codebooks, at most {channels or MAX_CODEBOOKS}")
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or (vocab is not None and high >= vocab):
        bound = f"lie in [0, {vocab})" if vocab is not None else "be non-negative"
        raise VoiceError(f"{what} must {bound}, got values in [{low}, {high}]")


def entries_from_json(raw: Any, where: str) -> list[Entry]:
    if not isinstance(raw, list):
        raise VoiceError(f"{where}: expected a list")
    out = []
    for i, item in enumerate(raw):
        keys = set(item) if isinstance(item, dict) else set()
        if keys != {"text", "tokens", "padding"} or not isinstance(item["text"], str):
            raise VoiceError(f"{where}[{i}]: expected {{\"text\": str, \"tokens\": [int], \"padding\": int}}")
        tokens = checked_ints(item["tokens"], f"{where}[{i}].tokens")
        (padding,) = checked_ints([item["padding"]], f"{where}[{i}].padding")
        out.append(Entry(tokens=tokens, text=item["text"], padding=padding))
    return out


def checked_ints(raw: Any, where: str) -> list[int]:
    """A list of integers in [0, MAX_INT] (no bools, no floats)."""
    if not isinstance(raw, list):
        raise VoiceError(f"{where}: expected a list of integers")
    for value in raw:
        if type(value) is not int or not 0 <= value <= MAX_INT:
            raise VoiceError(f"{where}: {_short(value)} is not an integer in [0, {MAX_INT}]")
    return list(raw)


def checked_hashes(raw: Any, where: str) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise VoiceError(f"{where}: expected an object of sha256 digests")
    if len(raw) > 64 or any(len(k) > 64 or len(v) > 64 for k, v in raw.items()):
        raise VoiceError(f"{where}: not an object of sha256 digests")
    return dict(raw)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --- against the artifacts ------------------------------------------------------------------


def check_hashes(theirs: dict[str, str], ours: dict[str, str], name: str, remedy: str) -> None:
    """Refuse ``name`` unless it records exactly these artifacts' hashes; the line names the first
    file that differs and says how to make it again."""
    if not theirs:
        raise VoiceError(f"{name} records no artifact hashes, so nothing says which artifacts it fits; {remedy}")
    for key in sorted(ours.keys() | theirs.keys()):
        if theirs.get(key) != ours.get(key):
            raise VoiceError(f"{name} was made with other artifacts: its {key} sha256 is {_digest(theirs.get(key))}, "
                             f"these artifacts' is {_digest(ours.get(key))}; {remedy}")


def recreate(voice: Voice, artifacts: str) -> str:
    """The command that makes ``voice`` again for ``artifacts``."""
    speaker = voice.speaker if voice.speaker in (1, 2) else "N"
    return RECREATE.format(artifacts=artifacts, speaker=speaker, path=voice.source or "NAME.voice")


def _digest(value: str | None) -> str:
    return "not recorded" if value is None else (value[:12] + "..." if len(value) > 12 else repr(value))


def check_voice_values(voice: Voice, channels: int, vocab: int, frame_rate: float, encode: Encode,
                       tag_for: Callable[[int], str | None], artifacts: str = "DIR") -> None:
    """Everything a voice holds, against the artifacts: speaker 1 or 2; ``channels`` rows of codes
    in [0, ``vocab``); words in order and inside the audio its codes are; and its entries and new-word
    steps exactly what ``words_to_entries`` makes of its words with this tokenizer (so no token,
    padding or step the words do not give reaches the warm-up)."""
    if type(voice.speaker) is not int or voice.speaker not in (1, 2):
        raise VoiceError(f"{voice.name}: speaker must be 1 or 2, not {_short(voice.speaker)}")
    check_codes(voice.codes, channels, vocab, f"{voice.name}: its codes")
    duration = voice.frames / frame_rate
    raw = [{"word": w.text, "start": w.start, "end": w.end} if isinstance(w, Word) else w for w in voice.words]
    words = parse_words(raw, duration + 1e-3, where=f"{voice.name}: words")  # 1 ms: resampling's rounding
    entries, steps = words_to_entries(words, encode, tag_for(voice.speaker), frame_rate)
    if words != list(voice.words) or entries != list(voice.entries) or steps != list(voice.steps):
        raise VoiceError(f"{voice.name}: its entries and new-word steps are not what its words give with these "
                         f"artifacts' tokenizer (an edited file?); recreate it: "
                         + recreate(voice, artifacts))


# --- bounded .npz reading -------------------------------------------------------------------

# A member this large or smaller may be compressed; a larger one must be stored as is (np.savez
# stores), so every byte it inflates to is in the file: a small file cannot declare gigabytes.
MAX_DEFLATED_BYTES = 16 << 20
MAX_CENTRAL_DIRECTORY = 64 << 10  # the zip's table of contents: ~100 bytes a member
MAX_NPY_HEADER = 4096


@dataclass(frozen=True)
class NpyMember:
    """What one ``NAME.npy`` member of an npz must be: its dtype (a test and its name), its number
    of dimensions, and the most bytes its data may take."""

    dtype_ok: Callable[[np.dtype], bool]
    dtype_name: str
    ndim: int
    max_bytes: int


def is_int64(dtype: np.dtype) -> bool:
    return dtype == np.dtype("<i8")


def is_text(dtype: np.dtype) -> bool:
    return dtype.kind == "U" and dtype.byteorder in ("<", "=", "|")


Shapes = Callable[[dict[str, tuple[tuple[int, ...], np.dtype]]], None]


def read_npz(path: str | Path, members: dict[str, NpyMember], max_bytes: int, what: str,
             check: Shapes | None = None) -> dict[str, np.ndarray]:
    """The arrays of an npz file, checked before any of them is decoded or allocated.

    ``path`` is a regular file of at most ``max_bytes``; its zip directory lists exactly
    ``NAME.npy`` for each of ``members``, none encrypted, each stored or deflated, a deflated one
    inflating to at most MAX_DEFLATED_BYTES; each member's npy header gives a C-order array of
    the member's dtype and dimensions whose data is exactly the member's declared size, at most
    the member's bound. ``check`` then sees every (shape, dtype) and may refuse them (raising
    InputFileError or ValueError) before any data is read. Raises InputFileError, one line.
    """
    label = f"{what} {path}"
    with open_regular(path, max_bytes, what) as f, _as_input_error(label):
        _check_directory(f, len(members), label, what)
        with zipfile.ZipFile(f) as zf:
            infos = _member_infos(zf, members, label)
            headers = {name: _npy_header(zf, info, members[name], label) for name, info in infos.items()}
            if check is not None:
                try:
                    check({name: (shape, dtype) for name, (shape, dtype, _) in headers.items()})
                except ValueError as exc:
                    raise InputFileError(f"{label}: {exc}") from None
            return {name: _npy_data(zf, infos[name], *headers[name]) for name in members}


@contextmanager
def _as_input_error(label: str):
    """What zipfile, zlib and numpy's header parser raise on a malformed file, as one line."""
    try:
        yield
    except InputFileError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError, RuntimeError,
            SyntaxError, struct.error, MemoryError) as exc:
        raise InputFileError(f"{label} is not a usable npz ({first_line(exc)})") from None


def _check_directory(f, count: int, label: str, kind: str) -> None:
    """The end-of-directory record promises ``count`` members in a small directory: zipfile reads
    the whole directory into objects before anything else can be checked."""
    size = f.seek(0, 2)
    tail_start = max(0, size - (22 + 0xFFFF))
    f.seek(tail_start)
    tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        raise InputFileError(f"{label}: not a {kind} (it is no npz archive)")
    disk_entries, entries, directory_size = struct.unpack("<HHI", tail[at + 8: at + 16])
    if entries != count or disk_entries != count or directory_size > MAX_CENTRAL_DIRECTORY:
        raise InputFileError(f"{label} lists {entries} members in a {directory_size}-byte directory; "
                             f"expected {count} in at most {MAX_CENTRAL_DIRECTORY}")
    f.seek(0)


def _member_infos(zf: zipfile.ZipFile, members: dict[str, NpyMember], label: str) -> dict[str, zipfile.ZipInfo]:
    infos = zf.infolist()
    names = sorted(i.filename for i in infos)
    if names != sorted(f"{name}.npy" for name in members):
        raise InputFileError(f"{label} holds members {names[:8]}, expected {sorted(f'{n}.npy' for n in members)}")
    out = {}
    for info in infos:
        name = info.filename[: -len(".npy")]
        if info.flag_bits & 0x1:
            raise InputFileError(f"{label}: member {info.filename} is encrypted")
        stored = info.compress_type == zipfile.ZIP_STORED and info.compress_size == info.file_size
        deflated = info.compress_type == zipfile.ZIP_DEFLATED and info.file_size <= MAX_DEFLATED_BYTES
        if not (stored or deflated):
            raise InputFileError(f"{label}: member {info.filename} declares {info.file_size} bytes "
                                 f"{'compressed' if info.compress_type != zipfile.ZIP_STORED else 'stored'} "
                                 f"into {info.compress_size}; only members up to {MAX_DEFLATED_BYTES} bytes "
                                 f"may be compressed")
        if info.file_size > members[name].max_bytes + MAX_NPY_HEADER:
            raise InputFileError(f"{label}: member {info.filename} is {info.file_size} bytes, "
                                 f"at most {members[name].max_bytes}")
        out[name] = info
    return out


def _npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, member: NpyMember, label: str):
    """(shape, dtype, header bytes) of a member, from its npy header alone."""
    fmt = np.lib.format
    with zf.open(info) as m:
        version = fmt.read_magic(m)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(m, max_header_size=MAX_NPY_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(m, max_header_size=MAX_NPY_HEADER)
        else:
            raise InputFileError(f"{label}: member {info.filename} has npy format version {version}")
        header = m.tell()
    if fortran or not member.dtype_ok(dtype) or len(shape) != member.ndim:
        raise InputFileError(f"{label}: member {info.filename} is a {dtype.str} array of shape {shape}"
                             f"{' (Fortran order)' if fortran else ''}; expected {member.ndim}-D {member.dtype_name}")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > member.max_bytes or header + nbytes != info.file_size:
        raise InputFileError(f"{label}: member {info.filename} declares a {shape} {dtype.str} array "
                             f"({nbytes} bytes) in {info.file_size - header} bytes (at most {member.max_bytes})")
    return shape, dtype, header


def _npy_data(zf: zipfile.ZipFile, info: zipfile.ZipInfo, shape, dtype: np.dtype, header: int) -> np.ndarray:
    """The member's data (its declared size, which zipfile never reads past; CRC checked at the end)."""
    nbytes = info.file_size - header
    buffer = bytearray(nbytes)
    # typeshed types ZipFile.open as IO[bytes], which lacks readinto; in read mode it is a ZipExtFile
    with cast(zipfile.ZipExtFile, zf.open(info)) as m:
        m.read(header)
        view, got = memoryview(buffer), 0
        while got < nbytes:
            n = m.readinto(view[got:])
            if not n:
                raise EOFError(f"member {info.filename} ends {nbytes - got} bytes early")
            got += n
        m.read(1)  # at the end: zipfile checks the CRC
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)
