"""Dialogue script parsing: ``[S1]``/``[S2]`` turns and ``<break time="1.5s"/>`` pauses.

The output is the state machine's word queue, built exactly as the reference
builds it (speaker tokens prefixed to a turn's first word, ``padding`` =
number of extra tokens in a word, breaks as token-less silence entries).
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

from .state_machine import Entry, TokenIds

_EVENT = re.compile(r"(?:<break\s+time=\"([0-9]+(?:.[0-9]*)?)s\"\s*/?>)|(?:\s+)")
_TAG = re.compile(r"<[^>]*>|\[[^\]]*\]")
_SPEAKERS = ("[S1]", "[S2]")

Encode = Callable[[str], list[int]]


class ScriptError(ValueError):
    """A script the model cannot speak."""


def check_script(text: str) -> None:
    """Reject input that the reference would silently mangle.

    The reference happily speaks unknown tags as words and starts with no
    speaker; we ask for a speaker tag up front and known tags only.
    """
    if not text.strip():
        raise ScriptError("the script is empty")
    stripped = text.lstrip()
    if not stripped.startswith(_SPEAKERS):
        raise ScriptError("the script must start with a speaker tag, [S1] or [S2]")
    for match in _TAG.finditer(text):
        tag = match.group(0)
        if tag not in _SPEAKERS and not _EVENT.fullmatch(tag):
            raise ScriptError(f"unknown tag {tag!r}: only [S1], [S2] and <break time=\"Ns\"/> are understood")


def parse_script(lines: Sequence[str], encode: Encode, ids: TokenIds, frame_rate: float) -> list[Entry]:
    """Turn script lines into word entries (the reference passes the whole text as one line)."""
    entries: list[Entry] = []
    last_speaker: list[int | None] = [None]
    for idx, line in enumerate(lines):
        _parse_line(idx, line.replace("\u2019", "'").replace(":", " "), encode, ids, frame_rate, entries, last_speaker)
    return entries


def _parse_line(idx, line, encode, ids, frame_rate, entries, last_speaker) -> None:
    first_content = True
    pending_speaker: int | None = None
    remaining = line
    while remaining:
        match = _EVENT.search(remaining)
        segment = remaining if match is None else remaining[: match.start()]
        remaining = "" if match is None else remaining[match.end():]
        for word in segment.split():
            if word in _SPEAKERS:
                pending_speaker = ids.spk1 if word == "[S1]" else ids.spk2
                continue
            entries.append(_word_entry(idx, word, pending_speaker, first_content, encode, ids, last_speaker))
            first_content = False
            pending_speaker = None
        if match is not None and match.group(1):
            frames = int(round(float(match.group(1)) * frame_rate))
            if frames > 0:
                entries.append(Entry(tokens=[], text="", padding=frames))


def _word_entry(idx, word, pending_speaker, first_content, encode, ids, last_speaker) -> Entry:
    if pending_speaker is not None:
        tag = "[S1]" if pending_speaker == ids.spk1 else "[S2]"
        tokens = encode(f"{tag} {word}")
    else:
        tokens = encode(word)
    if first_content:
        # A line's first word carries the line's speaker (alternating by line index)
        # unless the previous line already set it.
        speaker_idx = idx % 2
        speaker = (ids.spk1, ids.spk2)[speaker_idx]
        if last_speaker[0] != speaker_idx:
            if not tokens or tokens[0] != speaker:
                tokens.insert(0, speaker)
            last_speaker[0] = speaker_idx
    # The reference's padding is 1 + len(tokens) - 1: one frame per extra token.
    return Entry(tokens=tokens, text=word, padding=max(0, len(tokens)))
