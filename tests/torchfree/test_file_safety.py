"""Hostile files (issue 22, items 3 and 4, and the BOM): no output replaces an input, a link or a
device, and every file is checked for type, size and shape before it is decoded or allocated.
Each refusal is one ``Error:`` line, exit 1, and leaves nothing behind. Commands that could block
on a FIFO run in a subprocess with a timeout, so a regression fails instead of hanging the suite."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dia2_trt.runtime import artifacts
from dia2_trt.runtime.artifacts import ArtifactError, load_manifest
from dia2_trt.runtime.audio import AudioError, load_mono, read_audio
from dia2_trt.runtime.files import InputFileError, parse_json

from .conftest import DATA, edit_manifest
from snapshots import snapshot

VOICES = DATA / "voices"
DIA2_RT = str(Path(sys.executable).with_name("dia2-rt"))  # the console script of this venv
SCRIPT = "[S1] Hello there. [S2] Hi."


def _rt(*args, input: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([DIA2_RT, *map(str, args)], capture_output=True, input=input, timeout=timeout)


def _error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def work(tmp_path, artifact_copy):
    """A directory with a script, a prefix clip and its words; ``work.speak(...)`` runs speak there."""
    (tmp_path / "s.txt").write_text(SCRIPT)
    shutil.copy(VOICES / "s1_24k_mono.flac", tmp_path / "p.flac")
    shutil.copy(VOICES / "s1_24k_mono.words.json", tmp_path / "w.json")
    return tmp_path


def _speak(work: Path, *args, **kwargs):
    return _rt("speak", "--artifacts", work / "art", "--quiet", *args, **kwargs)


def _refused_untouched(work: Path, args, *needles: str, timeout: float = 120) -> str:
    """Refused in one line; no file in ``work`` replaced, rewritten or added (no output, no temporary)."""
    before = snapshot(work)
    line = _error(_speak(work, *args, timeout=timeout), *needles)
    assert snapshot(work) == before
    return line


# --- outputs never replace inputs ---------------------------------------------------------------


def test_an_output_that_is_the_script_is_refused(work):
    _refused_untouched(work, ["--input", work / "s.txt", "--out", work / "o.wav", "--tokens-out", work / "s.txt"],
                       "--tokens-out", "same file as the script --input")


def test_an_output_hard_linked_to_the_script_is_refused(work):
    os.link(work / "s.txt", work / "h.json")
    _refused_untouched(work, ["--input", work / "s.txt", "--out", work / "o.wav", "--tokens-out", work / "h.json"],
                       "same file as the script --input")


@pytest.mark.parametrize("target", ["file", "dangling", "device"])
def test_an_output_that_is_a_symbolic_link_is_refused(work, target):
    if target == "file":
        (work / "target.wav").write_bytes(b"precious")
        (work / "link.wav").symlink_to(work / "target.wav")
    else:
        (work / "link.wav").symlink_to("/dev/null" if target == "device" else work / "nowhere.wav")
    _refused_untouched(work, ["--input", work / "s.txt", "--out", work / "link.wav"], "is a symbolic link")
    assert (work / "link.wav").is_symlink()
    if target == "file":
        assert (work / "target.wav").read_bytes() == b"precious"
    assert not os.path.isfile("/dev/null")


def test_an_output_that_is_a_device_or_fifo_is_refused(work):
    _refused_untouched(work, ["--input", work / "s.txt", "--out", work / "o.wav", "--tokens-out", os.devnull],
                       "not a regular file")
    os.mkfifo(work / "f.wav")
    _refused_untouched(work, ["--input", work / "s.txt", "--out", work / "f.wav"], "not a regular file")


def test_an_output_that_is_a_prefix_input_is_refused(work):
    prefix = ["--input", work / "s.txt", "--prefix-speaker-1", work / "p.flac", "--prefix-words-1", work / "w.json"]
    _refused_untouched(work, [*prefix, "--out", work / "o.wav", "--tokens-out", work / "w.json"],
                       "same file as the --prefix-words-1 file")
    os.link(work / "p.flac", work / "p2.flac")
    _refused_untouched(work, [*prefix, "--out", work / "p2.flac"], "same file as the --prefix-speaker-1 audio")


def test_the_next_turn_cannot_overwrite_the_turn_it_continues(work):
    done = _speak(work, "--input", work / "s.txt", "--out", work / "t.wav", "--tokens-out", work / "turn.json")
    assert done.returncode == 0, done.stderr
    _refused_untouched(work, ["--input", work / "s.txt", "--prefix-turn", work / "turn.json", "--out", work / "o.wav",
                              "--tokens-out", work / "turn.json"], "same file as the --prefix-turn file")


def test_an_output_hard_linked_into_the_artifacts_is_refused(work):
    os.link(work / "art" / "tokenizer" / "vocab.json", work / "o.json")
    _refused_untouched(work, ["--input", work / "s.txt", "--out", work / "o.wav", "--tokens-out", work / "o.json"],
                       "hard link to", "vocab.json in the artifact directory")


def test_voice_create_refuses_an_output_that_is_its_audio(work):
    os.link(work / "p.flac", work / "p.voice")
    before = snapshot(work)
    proc = _rt("voice", "create", work / "p.flac", "--artifacts", work / "art", "--speaker", 1,
               "--words", work / "w.json", "--out", work / "p.voice")
    _error(proc, "same file as the AUDIO")
    assert snapshot(work) == before


def test_stdout_stays_an_output(work):
    done = _speak(work, "--input", work / "s.txt", "--temperature", 0, "--out", "-")
    assert done.returncode == 0 and len(done.stdout) > 0 and len(done.stdout) % 2 == 0, done.stderr


# --- bounded reads: words, turns, audio ---------------------------------------------------------


@pytest.mark.parametrize("content,needle", [
    (b"[" * 100_000 + b"]" * 100_000, "nests deeper than 64 levels"),
    (b'[{"word": "hi", "start": ' + b"9" * 5000 + b', "end": 1}]', "integer of 5000 digits"),
    (b'[{"word": "hi", "start": 0, "end": ' + b"9" * 4000 + b"}]", "integer of 4000 digits"),
    (b'[{"word": "hi", "start": 0, "end": 1e999}]', "not a finite number"),
    (b'[{"word": "\\ud800", "start": 0, "end": 1}]', "not UTF-8 text"),  # valid JSON; tokenizers raised TypeError
])
def test_a_hostile_words_file_is_one_line(work, content, needle):
    (work / "w.json").write_bytes(content)
    _refused_untouched(work, ["--input", work / "s.txt", "--prefix-speaker-1", work / "p.flac",
                              "--prefix-words-1", work / "w.json", "--out", work / "o.wav"], needle)


def test_a_huge_sparse_words_file_is_refused_by_its_size(work):
    with open(work / "w.json", "wb") as f:
        f.truncate(2 << 30)  # 2 GB that take no disk: refused from the size, never read
    _refused_untouched(work, ["--input", work / "s.txt", "--prefix-speaker-1", work / "p.flac",
                              "--prefix-words-1", work / "w.json", "--out", work / "o.wav"],
                       "too large: 2147483648 bytes")


@pytest.mark.parametrize("option", ["--prefix-words-1", "--prefix-speaker-1", "--prefix-turn", "--voice-1"])
def test_a_fifo_as_an_input_is_refused_without_waiting(work, option):
    os.mkfifo(work / "fifo")
    args = ["--prefix-speaker-1", work / "p.flac", "--prefix-words-1", work / "fifo"] \
        if option == "--prefix-words-1" else [option, work / "fifo"]
    _refused_untouched(work, ["--input", work / "s.txt", *args, "--out", work / "o.wav"], "not a regular file",
                       timeout=60)


def test_a_deep_turn_file_is_one_line(work):
    (work / "t.json").write_bytes(b'{"tokens": ' + b"[" * 100_000 + b"]" * 100_000 + b', "timestamps": []}')
    _refused_untouched(work, ["--input", work / "s.txt", "--prefix-turn", work / "t.json", "--out", work / "o.wav"],
                       "nests deeper than 64 levels")


def _one_hertz(path: Path, frames: int) -> Path:
    sf.write(path, np.zeros(frames, np.int16), 1, subtype="PCM_16")
    return path


def test_a_tiny_rate_wav_is_refused_before_it_is_resampled(work):
    # 200000 frames at 1 Hz: 400 kB on disk, 4.8 * 10^9 samples (36 GiB of indices) at 24 kHz.
    _one_hertz(work / "slow.wav", 200_000)
    (work / "w.json").write_text('[{"word": "hi", "start": 0, "end": 1}]')
    _refused_untouched(work, ["--input", work / "s.txt", "--prefix-speaker-1", work / "slow.wav",
                              "--prefix-words-1", work / "w.json", "--out", work / "o.wav"],
                       "200000.0 s long", "at most 600.0 s")


def test_a_prefix_longer_than_the_artifacts_hold_is_refused_from_its_header(work):
    _one_hertz(work / "slow.wav", 100)  # 100 s: within the absolute bound, past the fixture's 16.7 s
    (work / "w.json").write_text('[{"word": "hi", "start": 0, "end": 1}]')
    _refused_untouched(work, ["--input", work / "s.txt", "--prefix-speaker-1", work / "slow.wav",
                              "--prefix-words-1", work / "w.json", "--out", work / "o.wav"],
                       "100.0 s long", "rebuild them with a larger --prefix-frames")


def test_audio_reads_are_bounded_by_the_header(tmp_path):
    with pytest.raises(AudioError, match="at most 5.0 s"):
        read_audio(_one_hertz(tmp_path / "a.wav", 10), max_seconds=5)
    assert load_mono(tmp_path / "a.wav", 24_000).shape == (240_000,)  # 10 s at 24 kHz, as asked
    with pytest.raises(AudioError, match="not a regular file"):
        read_audio("/dev/zero")
    reference, rate = sf.read(VOICES / "s2_44k_stereo.flac", dtype="float32")
    audio, same_rate = read_audio(VOICES / "s2_44k_stereo.flac")
    assert same_rate == rate and np.array_equal(audio, reference)  # reading by the header loses nothing


# --- bounded reads: the manifest and its side files ---------------------------------------------


def _cache_rows(n: int):
    def edit(raw):
        raw["cache_capacity"] = n
        raw["max_context_steps"] = n - 1 - raw["prefix_frames"]
        raw["graphs"]["backbone"]["dims"]["cache_rows"] = n
    return edit


def _codec_state_axis(n: int):
    def edit(raw):
        state = next(t for t in raw["graphs"]["codec_decoder"]["inputs"] if t["name"] == "state.upsample")
        state["shape"] = [state["shape"][0], 32, n]
    return edit


@pytest.mark.parametrize("edit,needle", [
    (_cache_rows(10**12), "max_context_steps 999999999951 is past the bound 65536 frames"),
    (_cache_rows(10**8), "past the bound 65536 frames"),
    (lambda raw: raw["delays"].__setitem__(4, 10**9), "delays[4] 1000000000 is past the bound"),
    (lambda raw: raw["codec"].update(sample_rate=10**12), "codec.sample_rate 1000000000000 is past 384000 Hz"),
    (_codec_state_axis(10**9), "state.upsample axis 1000000000 is not in"),
    (_codec_state_axis(-2), "state.upsample axis -2 is not in"),
    (lambda raw: raw["topology"].__setitem__("n_layer", 10**4000), "integer of 4001 digits"),
    (lambda raw: raw["codec"].__setitem__("frame_rate", 10**400), "integer of 401 digits"),
    (lambda raw: raw["codec"].__setitem__("frame_rate", math_nan()), "codec.frame_rate must be > 0, got nan"),
])
def test_manifest_values_that_would_commit_gigabytes_are_one_line(artifact_copy, edit, needle):
    edit_manifest(artifact_copy, edit)
    with pytest.raises(ArtifactError) as info:
        load_manifest(artifact_copy, verify=False)
    assert needle in str(info.value) and "\n" not in str(info.value)


def math_nan() -> float:
    return float("nan")


def test_a_session_s_buffers_are_bounded_in_bytes(artifact_copy, monkeypatch):
    monkeypatch.setattr(artifacts, "MAX_BUFFER_BYTES", 100_000)  # the fixture's are 486 kB at their bounds
    with pytest.raises(ArtifactError, match="GiB of buffers per session"):
        load_manifest(artifact_copy, verify=False)


@pytest.mark.parametrize("content,needle", [
    (b"[" * 100_000 + b"]" * 100_000, "nests deeper than 64 levels"),
    (None, "too large: 3221225472 bytes"),
])
def test_a_hostile_manifest_file_is_one_line(artifact_copy, content, needle):
    manifest = artifact_copy / "manifest.json"
    if content is None:
        with open(manifest, "ab") as f:
            f.truncate(3 << 30)
    else:
        manifest.write_bytes(content)
    with pytest.raises(ArtifactError, match=needle):
        load_manifest(artifact_copy)


def test_a_manifest_with_a_byte_order_mark_loads(artifact_copy):
    manifest = artifact_copy / "manifest.json"
    manifest.write_bytes(b"\xef\xbb\xbf" + manifest.read_bytes())
    assert load_manifest(artifact_copy).precision == "fp32"


@pytest.mark.parametrize("name,verify", [
    ("manifest.json", True), ("tokenizer/tokenizer.json", True), ("tokenizer/tokenizer.json", False),
    ("tokenizer/vocab.json", True), ("depformer.onnx", True), ("depformer.onnx", False),
])
def test_a_fifo_in_the_artifacts_is_refused_without_waiting(work, name, verify):
    (work / "art" / name).unlink()
    os.mkfifo(work / "art" / name)
    args = ["--input", work / "s.txt", "--out", work / "o.wav"] + ([] if verify else ["--no-verify"])
    _refused_untouched(work, args, "not a regular file", timeout=60)


def test_a_huge_tokenizer_is_refused_by_its_size(work):
    with open(work / "art" / "tokenizer" / "tokenizer.json", "ab") as f:
        f.truncate(3 << 30)
    _refused_untouched(work, ["--input", work / "s.txt", "--out", work / "o.wav", "--no-verify"],
                       "too large: 3221225472 bytes")


@pytest.mark.parametrize("kind", ["fifo", "garbage", "deep"])
def test_a_bad_stamps_file_is_ignored(artifact_copy, kind, monkeypatch):
    stamps = artifact_copy / artifacts.STAMP
    if kind == "fifo":
        os.mkfifo(stamps)
    else:
        stamps.write_bytes(b"\x00garbage" if kind == "garbage" else b"[" * 100_000)
    monkeypatch.setattr(artifacts, "CHEAP_BYTES", 1 << 40)  # nothing is big: the stamps are only read
    code = f"from dia2_trt.runtime.artifacts import load_manifest; load_manifest({str(artifact_copy)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr


# --- the shared JSON parser ---------------------------------------------------------------------


@pytest.mark.parametrize("text,ok", [
    ("12345678901234567890", True), ("-12345678901234567890", True), ("123456789012345678901", False),
    ("1e308", True), ("1e999", False), ("-1e999", False), ("NaN", False), ("\ufeff[1]", True),
    ('["\\ud83d\\ude00"]', True), ('["\\ud800"]', False), ('{"\\udc00": 1}', False), ('["\\\\ud800"]', True),
])
def test_json_numbers_are_bounded(text, ok):
    if ok:
        parse_json(text)
    else:
        with pytest.raises(InputFileError):
            parse_json(text)


# --- a byte-order mark is not part of a script --------------------------------------------------


def _tokens(work: Path, name: str, *args, input: bytes | None = None) -> list:
    done = _speak(work, "--temperature", 0, "--out", work / f"{name}.wav", "--tokens-out", work / f"{name}.json",
                  *args, input=input)
    assert done.returncode == 0, done.stderr
    return json.loads((work / f"{name}.json").read_text())["tokens"]


def test_a_script_with_a_byte_order_mark_speaks_as_without(work):
    (work / "bom.txt").write_bytes(b"\xef\xbb\xbf" + SCRIPT.encode())
    plain = _tokens(work, "plain", "--input", work / "s.txt")
    assert _tokens(work, "file", "--input", work / "bom.txt") == plain
    assert _tokens(work, "stdin", input=b"\xef\xbb\xbf" + SCRIPT.encode()) == plain
