"""Dialogue script parsing: ``[S1]``/``[S2]`` turns and ``<break time="1.5s"/>`` pauses.

The output is the state machine's word queue, built exactly as the reference
builds it (speaker tokens prefixed to a turn's first word, ``padding`` =
number of extra tokens in a word, breaks as token-less silence entries).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

from .state_machine import Entry, TokenIds

# Break times are digits with an optional fraction ("1", "1.5", "2."), as the reference's
# pattern means to accept (its unescaped "." also took "1x5", which then crashed float()).
_BREAK = r"<break\s+time=\"([0-9]+(?:\.[0-9]*)?)s\"\s*/?>"
_EVENT = re.compile(rf"(?:{_BREAK})|(?:\s+)")
# A tag stops at the next opener, so "<<<<..." is scanned once, not once per "<".
_TAG = re.compile(r"<[^<>\[\]]*>|\[[^<>\[\]]*\]")
_STRAY = re.compile(r"[<>\[\]]")
_SPEAKERS = ("[S1]", "[S2]")

# Dia2's context is 1500 frames (120 s at 12.5 Hz) and every word or break takes at least
# one, so a script that fits is at most ~30 kB even if it were all break tags. 256 Ki
# characters leaves room for any formatting, and bounds the worst hostile input (a flood
# of brackets) to about a second of scanning (a 10 MB one would take minutes).
MAX_SCRIPT_CHARS = 1 << 18
MAX_SCRIPT_BYTES = 4 * MAX_SCRIPT_CHARS  # UTF-8 needs at most 4 bytes per character
# Longer than any Dia2 context; past this a break could only overflow the frame count.
MAX_BREAK_SECONDS = 3600.0

Encode = Callable[[str], list[int]]


class ScriptError(ValueError):
    """A script the model cannot speak."""


def check_size(text: str) -> None:
    """O(1): refuse text no model context could hold before anything scans it."""
    if len(text) > MAX_SCRIPT_CHARS:
        raise ScriptError(f"the script is too long: {len(text)} characters, at most {MAX_SCRIPT_CHARS} are "
                          f"accepted (and far fewer fit in the model's context); split it into shorter scripts")


def check_script(text: str) -> None:
    """Reject input that the reference would silently mangle; safe on a complete prefix of a script.

    The reference happily speaks unknown tags and stray brackets as words; we ask for
    known tags only, every ``<``/``[`` closed, and break times that are numbers of
    seconds. Text before any speaker tag is not refused: the reference speaks it as
    speaker 1 (``parse_script`` puts ``[S1]``'s token before the first word, as it
    does), which is what plain-text clients (OpenAI's ``input``) send.
    """
    check_size(text)
    if not text.strip():
        raise ScriptError("the script is empty")
    for match in _TAG.finditer(text):
        _check_tag(match.group(0))
    stray = _STRAY.search(_TAG.sub(" ", text))
    if stray is not None:
        raise ScriptError(f"unmatched {stray.group(0)!r}: brackets only appear in tags, [S1], [S2] and "
                          f"<break time=\"Ns\"/>")


def check_complete_script(text: str) -> None:
    """``check_script`` plus what only a whole script can show: it has something to say."""
    check_script(text)
    if not _TAG.sub(" ", text).split():
        raise ScriptError("the script has no words to speak (only tags)")


def complete_prefix(text: str) -> str:
    """The longest prefix of ``text`` that ends on a word boundary outside any tag: what an
    incremental feed may parse now (a break tag has a space inside it; what follows may still grow).

    Up to the last whitespace, then back to where the last still-open ``<`` or ``[`` opened.
    One pass over the brackets: walking back one opener at a time from the end took
    minutes on a megabyte of ``<``.
    """
    match = re.search(r"\s\S*\Z", text)
    end = match.start() if match else 0
    open_at: dict[str, int | None] = {"<": None, "[": None}
    opened_from_closed = end
    for bracket in _STRAY.finditer(text, 0, end):
        char, at = bracket.group(0), bracket.start()
        if char in open_at:
            if open_at["<"] is None and open_at["["] is None:
                opened_from_closed = at
            if open_at[char] is None:
                open_at[char] = at
        else:
            open_at["<" if char == ">" else "["] = None
    closed = open_at["<"] is None and open_at["["] is None
    return text[:end] if closed else text[:opened_from_closed]


def _check_tag(tag: str) -> None:
    if tag in _SPEAKERS:
        return
    match = _EVENT.fullmatch(tag)
    if match is None:
        raise ScriptError(f"unknown tag {tag!r}: only [S1], [S2] and <break time=\"Ns\"/> are understood")
    if _break_seconds(match.group(1)) > MAX_BREAK_SECONDS:
        raise ScriptError(f"break of {match.group(1)[:20]}{'...' if len(match.group(1)) > 20 else ''}s is "
                          f"longer than any model context ({MAX_BREAK_SECONDS:.0f} s at most)")


def _break_seconds(digits: str) -> float:
    # 400 digits parse to inf, which has no frame count; the cap above refuses them.
    seconds = float(digits)
    return seconds if math.isfinite(seconds) else math.inf


def parse_script(lines: Sequence[str], encode: Encode, ids: TokenIds, frame_rate: float) -> list[Entry]:
    """Turn script lines into word entries (the reference passes the whole text as one line)."""
    entries: list[Entry] = []
    last_speaker: list[int | None] = [None]
    for idx, line in enumerate(lines):
        _parse_line(idx, line.replace("\u2019", "'").replace(":", " "), encode, ids, frame_rate, entries, last_speaker)
    return entries


def _parse_line(idx, line, encode, ids, frame_rate, entries, last_speaker) -> None:
    # One pass over the events; slicing the rest of the line at each one made this quadratic.
    first_content = True
    pending_speaker: int | None = None
    start = 0
    for match in [*_EVENT.finditer(line), None]:
        segment = line[start:] if match is None else line[start: match.start()]
        for word in segment.split():
            if word in _SPEAKERS:
                pending_speaker = ids.spk1 if word == "[S1]" else ids.spk2
                continue
            entries.append(_word_entry(idx, word, pending_speaker, first_content, encode, ids, last_speaker))
            first_content = False
            pending_speaker = None
        if match is None:
            break
        start = match.end()
        if match.group(1):
            frames = _break_frames(match.group(1), frame_rate)
            if frames > 0:
                entries.append(Entry(tokens=[], text="", padding=frames))


def _break_frames(digits: str, frame_rate: float) -> int:
    seconds = _break_seconds(digits)
    if seconds > MAX_BREAK_SECONDS:
        raise ScriptError(f"break of {digits[:20]}s is longer than any model context")
    return int(round(seconds * frame_rate))


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
