"""Response audio formats: what streams, what is encoded whole, and the bytes of each.

``pcm`` is OpenAI's: raw signed 16-bit little-endian mono at the model's sample
rate (24 kHz for Dia2), no header. ``wav`` streams the same samples behind a
44-byte header whose RIFF and data sizes are 0xFFFFFFFF, because the length is
unknown when the header goes out: a client reads the header for the format and
then takes every byte up to the end of the body as samples (Python's ``wave``,
ffmpeg and browsers do this; soundfile/libsndfile reads it too). ``flac``,
``mp3`` and ``opus`` are encoded once the utterance is complete, so their body
arrives whole at the end. The float-to-int16 rounding is ``dia2-rt speak``'s
(``runtime.audio.pcm16``), so the samples equal a CLI run's.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np

from ..audio import pcm16

UNKNOWN_SIZE = 0xFFFFFFFF


@dataclass(frozen=True)
class AudioFormat:
    name: str
    media_type: str
    streams: bool  # sent as generated (True) or encoded whole at the end
    soundfile: tuple[str, str] | None = None  # (format, subtype) for the whole-file encoders


FORMATS = {
    "pcm": AudioFormat("pcm", "audio/pcm", True),
    "wav": AudioFormat("wav", "audio/wav", True),
    "flac": AudioFormat("flac", "audio/flac", False, ("FLAC", "PCM_16")),
    "mp3": AudioFormat("mp3", "audio/mpeg", False, ("MP3", "MPEG_LAYER_III")),
    "opus": AudioFormat("opus", "audio/ogg", False, ("OGG", "OPUS")),
}


def available_formats() -> dict[str, AudioFormat]:
    """FORMATS minus the encoders this machine's libsndfile lacks (MP3 and Opus came late to it)."""
    import soundfile as sf

    known = sf.available_formats()
    return {name: fmt for name, fmt in FORMATS.items()
            if fmt.soundfile is None or (fmt.soundfile[0] in known
                                         and fmt.soundfile[1] in sf.available_subtypes(fmt.soundfile[0]))}


def wav_header(sample_rate: int, data_bytes: int = UNKNOWN_SIZE) -> bytes:
    """A canonical 16-bit mono PCM header; the default sizes say "read to the end"."""
    riff = UNKNOWN_SIZE if data_bytes == UNKNOWN_SIZE else 36 + data_bytes
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", data_bytes))


def encode_whole(fmt: AudioFormat, pcm: np.ndarray, sample_rate: int) -> bytes:
    """The complete file for a non-streaming format, encoded from the streamed int16 samples.

    Handing libsndfile floats would round differently (it scales by 32768 and clips;
    FLAC and WAV even differ from each other by one step on some samples), and a
    lossless format must decode to exactly what ``pcm`` and ``wav`` send.
    """
    import soundfile as sf

    assert fmt.soundfile is not None  # only the formats encoded whole come here
    buffer = io.BytesIO()
    kind, subtype = fmt.soundfile
    sf.write(buffer, np.frombuffer(pcm16(pcm), dtype="<i2"), sample_rate, format=kind, subtype=subtype)
    return buffer.getvalue()
