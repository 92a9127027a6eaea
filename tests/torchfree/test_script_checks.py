"""Hostile scripts (issue 11): bad tags, no words and huge inputs are one line, refused at once and in linear time."""

from __future__ import annotations

import re
import time

import pytest

from dia2_trt.runtime.script import MAX_SCRIPT_BYTES, ScriptError, check_complete_script, check_script

from hardening_support import _one_error_line, _rt

# --- scripts --------------------------------------------------------------------


@pytest.mark.parametrize("script,message", [
    ('[S1] a <break time="1x5s"/> b', "unknown tag"),
    ('[S1] a <break time="' + "9" * 400 + 's"/> b', "longer than any model context"),
    ('[S1] a <break time="4000s"/> b', "longer than any model context"),
    ("[S1] hello <break time=", "unmatched '<'"),
    ("[S1] hello [S2 there", "unmatched '['"),
    ("[S1] a > b", "unmatched '>'"),
    ("[S1] <<<<", "unmatched '<'"),
])
def test_bad_tags_are_refused(script, message):
    with pytest.raises(ScriptError, match=re.escape(message)):
        check_script(script)


@pytest.mark.parametrize("script", ["[S1]", "[S1] [S2]", '[S1] <break time="1s"/>', "  [S2]  \n"])
def test_a_script_without_words_is_refused(script):
    check_script(script)  # a prefix may still be waiting for its words
    with pytest.raises(ScriptError, match="no words"):
        check_complete_script(script)


def test_break_times_still_parse():
    from dia2_trt.runtime.script import parse_script
    from dia2_trt.runtime.state_machine import TokenIds

    ids = TokenIds(new_word=2, pad=3, bos=1, zero=7, spk1=5, spk2=6, audio_pad=0, audio_bos=0)
    text = '[S1] a <break time="1.5s"/> b <break time="2s"/> c <break time="0.s"/>'
    check_complete_script(text)
    entries = parse_script([text], lambda w: [9] * len(w), ids, frame_rate=10.0)
    assert [(e.text, e.padding) for e in entries][1:] == [("", 15), ("b", 1), ("", 20), ("c", 1)]  # "0.s": none


def test_huge_inputs_are_refused_at_once(tmp_path):
    """10 MB of text took minutes of quadratic parsing before "too long"; /dev/zero never ended.
    The artifact directory does not exist: the refusal must come before anything is loaded."""
    huge = tmp_path / "huge.txt"
    huge.write_text("[S1] " + "hello there friend " * (10_000_000 // 19))
    hostile = ["[S1] " + "<" * (MAX_SCRIPT_BYTES // 4 - 8), "[S1] " + "a" * (MAX_SCRIPT_BYTES // 4 - 8),
               "[S1] " + " " * (MAX_SCRIPT_BYTES // 4 - 8) + "x"]
    started = time.perf_counter()
    for source in (["--input", huge], ["--input", "/dev/zero"]):
        args = ["speak", *source, "--artifacts", tmp_path / "missing", "--out", tmp_path / "o.wav"]
        line = _one_error_line(_rt(args))
        assert "too long" in line
    for text in hostile:  # just under the limit: linear scans, refused or accepted quickly
        try:
            check_complete_script(text)
        except ScriptError:
            pass
    assert time.perf_counter() - started < 5.0  # quadratic parsing took minutes; linear is milliseconds
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.txt"]

def _prefix_by_walking_back(text: str) -> str:
    """The engine's original definition: cut at the last whitespace, then before the last open bracket, repeatedly."""
    match = re.search(r"\s(?=\S*\Z)", text)
    prefix = text[: match.start()] if match else ""
    while True:
        opened = [at for o, c in (("<", ">"), ("[", "]")) if (at := prefix.rfind(o)) > prefix.rfind(c)]
        if not opened:
            return prefix
        prefix = prefix[: max(opened)]


def test_complete_prefix_is_the_walk_back_in_one_pass():
    import random

    from dia2_trt.runtime.script import complete_prefix

    rng = random.Random(0)
    for _ in range(20000):
        text = "".join(rng.choice("ab <>[]\n") for _ in range(rng.randint(0, 14)))
        assert complete_prefix(text) == _prefix_by_walking_back(text), repr(text)
    assert complete_prefix('[S1] Hi <break time="1s"/> there <break ti') == '[S1] Hi <break time="1s"/> there '
