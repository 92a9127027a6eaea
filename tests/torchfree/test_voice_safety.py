"""Crafted voice files, warm states and words files: each is one ``VoiceError`` line (``Error:`` and
exit 1 from the CLI), refused before anything is decoded or allocated from what it declares.

Classes: zip bombs and lying npy headers (a few KB declaring gigabytes), members and dtypes other
than the writer's, every value out of range (codes, tokens, steps, paddings, times, speaker),
entries that are not what the words give, files made with other artifacts (the line names the
graph that differs), files that are not regular files (a FIFO must not block), and the older
formats: a version 1 voice (it recorded the encoder's and tokenizer's hashes, all a voice depends
on) still loads; a version 1 warm state (no backbone hash) is refused with the way to remake it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dia2_trt.runtime import Dia2Runtime, GenerationParams
from dia2_trt.runtime.prefix import WarmState
from dia2_trt.runtime.voice import MAX_WORDS_BYTES, Voice, VoiceError, Word, load_voice, save_voice

from .conftest import DATA, FIXTURE, edit_manifest

VOICES = DATA / "voices"
CLIP, WORDS = VOICES / "s1_24k_mono.flac", VOICES / "s1_24k_mono.words.json"
GREEDY = GenerationParams(text_temperature=0.0, audio_temperature=0.0)
SCRIPT = "[S1] Hello there. [S2] Fine."


@pytest.fixture(scope="module")
def runtime() -> Dia2Runtime:
    return Dia2Runtime.load(FIXTURE, threads=1)


@pytest.fixture(scope="module")
def good(runtime, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("voice") / "good.voice"
    save_voice(runtime.voice(CLIP, WORDS, 1), path)
    return path


def _parts(path: Path) -> tuple[dict, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:  # our own, known-good file
        return json.loads(str(data["meta"])), data["codes"]


def _npz(path: Path, arrays: dict, compress: bool = False) -> Path:
    with open(path, "wb") as f:
        (np.savez_compressed if compress else np.savez)(f, **arrays)
    return path


def _crafted(good: Path, tmp_path: Path, edit=None, codes=None, meta_text=None) -> Path:
    meta, original = _parts(good)
    if edit is not None:
        edit(meta)
    text = meta_text if meta_text is not None else json.dumps(meta)
    return _npz(tmp_path / "crafted.voice", {"codes": original if codes is None else codes, "meta": np.array(text)})


def _npy(array_header: dict, data: bytes = b"") -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, array_header)
    return out.getvalue() + data


def _refused(runtime, path: Path, fragment: str) -> str:
    """load_voice + runtime.prefix refuse ``path`` with one line holding ``fragment``."""
    with pytest.raises(VoiceError) as info:
        runtime.prefix(load_voice(path))
    message = str(info.value)
    assert fragment in message and "\n" not in message, message
    return message


# --- bombs and lying headers ----------------------------------------------------------------


def test_a_compressed_bomb_is_refused_from_its_declared_size(runtime, good, tmp_path):
    """80 MiB of zero codes deflate to ~80 KB; np.load would inflate all of it before any check."""
    meta, _ = _parts(good)
    arrays = {"codes": np.zeros((5, 2 << 20), np.int64), "meta": np.array(json.dumps(meta))}
    bomb = _npz(tmp_path / "bomb.voice", arrays, compress=True)
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        _refused(runtime, bomb, "may be compressed")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak


def test_an_npy_header_declaring_gigabytes_is_refused_before_allocating(runtime, good, tmp_path):
    meta, _ = _parts(good)
    path = tmp_path / "liar.voice"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("codes.npy", _npy({"descr": "<i8", "fortran_order": False, "shape": (8, 1 << 26)}, b"\0" * 64))
        z.writestr("meta.npy", _npy({"descr": "<U2", "fortran_order": False, "shape": ()}, "{}".encode("utf-32-le")))
    tracemalloc.start()
    try:
        _refused(runtime, path, "declares a (8, 67108864) <i8 array")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


@pytest.mark.parametrize("case", ["extra member", "missing member", "object dtype", "fortran", "not a zip", "empty",
                                  "big-endian", "float codes", "3-D codes", "many members"])
def test_members_other_than_the_writers_are_refused(runtime, good, tmp_path, case):
    meta, codes = _parts(good)
    text = np.array(json.dumps(meta))
    path = tmp_path / "bad.voice"
    if case == "extra member":
        _npz(path, {"codes": codes, "meta": text, "extra": np.zeros(3)})
    elif case == "missing member":
        _npz(path, {"codes": codes})
    elif case == "object dtype":
        with zipfile.ZipFile(path, "w") as z:
            buf = io.BytesIO()
            np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
            z.writestr("codes.npy", buf.getvalue())
            buf = io.BytesIO()
            np.save(buf, text)
            z.writestr("meta.npy", buf.getvalue())
    elif case == "fortran":
        _npz(path, {"codes": np.asfortranarray(codes), "meta": text})
    elif case == "not a zip":
        path.write_bytes(b"\x93NUMPY" + b"\0" * 100)
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "big-endian":
        _npz(path, {"codes": codes.astype(">i8"), "meta": text})
    elif case == "float codes":
        _npz(path, {"codes": codes.astype(np.float64), "meta": text})
    elif case == "3-D codes":
        _npz(path, {"codes": codes[None], "meta": text})
    else:
        with zipfile.ZipFile(path, "w") as z:
            for i in range(2000):
                z.writestr(f"m{i}.npy", b"")
    with pytest.raises(VoiceError) as info:
        load_voice(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("kind", ["fifo", "directory", "device", "missing", "too large"])
def test_only_a_regular_file_of_bounded_size_is_read(tmp_path, kind):
    path = tmp_path / "x.voice"
    if kind == "fifo":
        os.mkfifo(path)  # opening it for reading would wait for a writer forever
    elif kind == "directory":
        path.mkdir()
    elif kind == "device":
        path = Path("/dev/zero")
    elif kind == "too large":
        with open(path, "wb") as f:
            f.truncate(1 << 40)  # sparse: 1 TiB declared, nothing written
    for load in (load_voice, WarmState.load):
        with pytest.raises(VoiceError) as info:
            load(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)


# --- values ---------------------------------------------------------------------------------


def _word(i):
    return lambda m: m["words"][i]


VALUE_CASES = {
    "codes past the codebook": (dict(codes=lambda c: np.full_like(c, 64)), "must lie in [0, 64)"),
    "codes huge": (dict(codes=lambda c: np.full_like(c, 10**12)), "must lie in [0, 64)"),
    "negative codes": (dict(codes=lambda c: c - 100), "must be non-negative"),
    "too few codebooks": (dict(codes=lambda c: c[:3]), "3 codebooks, these artifacts 5"),
    "no frames": (dict(codes=lambda c: c[:, :0]), "non-empty int64"),
    "negative start": (dict(edit=lambda m: _word(0)(m).update(start=-1.0)), "non-negative number of seconds"),
    "infinite end": (dict(text=lambda t: t.replace('"end": ', '"end": 1e999, "was": ', 1)),
                     "1e999 is not a finite number"),  # refused by the shared JSON parser
    "NaN time": (dict(text=lambda t: t.replace('"start": ', '"start": NaN, "was": ', 1)), "NaN"),
    "string time": (dict(edit=lambda m: _word(0)(m).update(start="0")), "non-negative number of seconds"),
    "end before start": (dict(edit=lambda m: _word(0)(m).update(end=0.0, start=0.1)), "before it starts"),
    "starts out of order": (dict(edit=lambda m: _word(2)(m).update(start=0.0, end=0.0)), "before the previous word"),
    "past the audio": (dict(edit=lambda m: _word(-1)(m).update(end=1e6)), "past the end of the audio"),
    "speaker 3": (dict(edit=lambda m: m.update(speaker=3)), "speaker must be 1 or 2, not 3"),
    "speaker 0": (dict(edit=lambda m: m.update(speaker=0)), "speaker must be 1 or 2"),
    "speaker true": (dict(edit=lambda m: m.update(speaker=True)), "speaker must be 1 or 2, not True"),
    "speaker string": (dict(edit=lambda m: m.update(speaker="1")), "speaker must be 1 or 2"),
    "token past the vocabulary": (dict(edit=lambda m: m["entries"][0].update(tokens=[10**6])),
                                  "not what its words give"),
    "negative token": (dict(edit=lambda m: m["entries"][0].update(tokens=[-1])), "not an integer in"),
    "bool token": (dict(edit=lambda m: m["entries"][0].update(tokens=[True])), "not an integer in"),
    "huge padding": (dict(edit=lambda m: m["entries"][0].update(padding=10**12)), "not an integer in"),
    "edited padding": (dict(edit=lambda m: m["entries"][0].update(padding=500)), "not what its words give"),
    "negative step": (dict(edit=lambda m: m["new_word_steps"].__setitem__(0, -5)), "not an integer in"),
    "huge step": (dict(edit=lambda m: m["new_word_steps"].__setitem__(0, 2**40)), "not an integer in"),
    "31-digit step": (dict(edit=lambda m: m["new_word_steps"].__setitem__(0, 10**30)), "an integer of 31 digits"),
    "steps not increasing": (dict(edit=lambda m: m.update(new_word_steps=sorted(m["new_word_steps"])[::-1])),
                             "must increase"),
    "edited step": (dict(edit=lambda m: m["new_word_steps"].__setitem__(0, m["new_word_steps"][0] + 1)),
                    "not what its words give"),
    "a step too few": (dict(edit=lambda m: m["new_word_steps"].pop()), "one of each per word"),
    "entry for another word": (dict(edit=lambda m: m["entries"][0].update(text="other")), "is not words[0]"),
    "empty word": (dict(edit=lambda m: _word(0)(m).update(word="  ")), "an empty word"),
    "unknown key": (dict(edit=lambda m: m.update(extra=1)), "keys"),
    "bad audio hash": (dict(edit=lambda m: m.update(audio_sha256="zz")), "audio_sha256"),
    "deep nesting": (dict(text=lambda t: "[" * 100_000 + "]" * 100_000), "nests deeper than 64"),
    "huge integer": (dict(text=lambda t: t.replace('"speaker": 1', '"speaker": ' + "9" * 5000)), "not valid JSON"),
    "not an object": (dict(text=lambda t: "[]"), "not a dia2-trt voice file"),
    "other version": (dict(edit=lambda m: m.update(version=7)), "format version 7 is not supported"),
}


@pytest.mark.parametrize("case", list(VALUE_CASES), ids=list(VALUE_CASES))
def test_crafted_values_are_refused_in_one_line(runtime, good, tmp_path, case):
    how, fragment = VALUE_CASES[case]
    meta, codes = _parts(good)
    if "edit" in how:
        how["edit"](meta)
    text = json.dumps(meta)
    if "text" in how:
        text = how["text"](text)
    new_codes = how["codes"](codes) if "codes" in how else codes
    path = _npz(tmp_path / "crafted.voice", {"codes": new_codes, "meta": np.array(text)})
    _refused(runtime, path, fragment)


def test_crafted_voice_objects_are_refused_too(runtime):
    voice = runtime.voice(CLIP, WORDS, 1)
    cases = {
        "speaker must be 1 or 2": Voice(3, voice.codes, voice.words, voice.entries, voice.steps, None, voice.artifacts),
        "must lie in [0, 64)": Voice(1, voice.codes + 64, voice.words, voice.entries, voice.steps, None,
                                     voice.artifacts),
        "past the end of the audio": Voice(1, voice.codes, [*voice.words[:-1], Word("x", 0.9, 99.0)], voice.entries,
                                           voice.steps, None, voice.artifacts),
        "non-negative number": Voice(1, voice.codes, [Word("x", float("nan"), 1.0), *voice.words[1:]], voice.entries,
                                     voice.steps, None, voice.artifacts),
        "not what its words give": Voice(1, voice.codes, voice.words, voice.entries[::-1], voice.steps, None,
                                         voice.artifacts),
        "non-empty int64": Voice(1, voice.codes.astype(np.float32), voice.words, voice.entries, voice.steps, None,
                                 voice.artifacts),
    }
    for fragment, crafted in cases.items():
        with pytest.raises(VoiceError, match=None) as info:
            runtime.prefix(crafted)
        assert fragment in str(info.value), (fragment, str(info.value))


# --- artifacts ------------------------------------------------------------------------------


def _retouch(directory: Path, graph: str) -> None:
    """Give ``graph`` other bytes that still load (an ONNX doc_string field appended: protobuf merges
    it), and record its new sha256 in the manifest, as a re-export would."""
    path = directory / f"{graph}.onnx"
    note = b"re-exported"
    with open(path, "ab") as f:
        f.write(bytes([0x32, len(note)]) + note)  # ModelProto.doc_string = 6, length-delimited
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    edit_manifest(directory, lambda raw: raw["graphs"][graph].update(sha256=digest))


@pytest.fixture(scope="module")
def other_encoder(tmp_path_factory) -> Dia2Runtime:
    directory = Path(shutil.copytree(FIXTURE, tmp_path_factory.mktemp("enc") / "art"))
    _retouch(directory, "codec_encoder")
    return Dia2Runtime.load(directory, threads=1)  # checksums verified: a consistent other artifact set


def test_a_voice_made_with_other_artifacts_is_refused_naming_the_graph(runtime, other_encoder, good):
    sha = runtime.manifest.graph("codec_encoder").sha256
    message = _refused(other_encoder, good, f"its codec_encoder sha256 is {sha[:12]}...")
    assert f"--artifacts {other_encoder.manifest.root}" in message and "--speaker 1" in message
    made_there = other_encoder.voice(CLIP, WORDS, 1)
    with pytest.raises(VoiceError, match="codec_encoder sha256"):
        runtime.prefix(made_there)


def test_a_voice_without_hashes_is_refused_with_the_command_to_remake_it(runtime, good, tmp_path):
    path = _crafted(good, tmp_path, lambda m: m.update(artifacts={}))
    message = _refused(runtime, path, "records no artifact hashes")
    assert "dia2-rt voice create AUDIO --artifacts" in message and str(path) in message


def test_a_version_1_voice_of_older_releases_still_speaks(runtime, tmp_path):
    """Voices written before this check (same format: the encoder's and tokenizer's hashes, which is
    all a voice depends on) load and give the tokens of the raw clip."""
    voice = runtime.voice(CLIP, WORDS, 1)
    meta = {"format": "dia2-trt-voice", "version": 1, "speaker": 1,
            "words": [{"word": w.text, "start": w.start, "end": w.end} for w in voice.words],
            "entries": [{"text": e.text, "tokens": e.tokens, "padding": e.padding} for e in voice.entries],
            "new_word_steps": voice.steps, "audio_sha256": voice.audio_sha256, "artifacts": voice.artifacts}
    path = _npz(tmp_path / "old.voice", {"codes": voice.codes, "meta": np.array(json.dumps(meta))})
    expected = runtime.speak(SCRIPT, GREEDY, prefix=runtime.prefix(voice))
    again = runtime.speak(SCRIPT, GREEDY, prefix=runtime.prefix(load_voice(path)))
    np.testing.assert_array_equal(again.tokens, expected.tokens)


def test_the_cli_says_one_line_and_writes_nothing(good, tmp_path):
    crafted = {
        "speaker": _crafted(good, tmp_path, lambda m: m.update(speaker=3)),
    }
    meta, codes = _parts(good)
    crafted["codes"] = _npz(tmp_path / "codes.voice", {"codes": codes + 1000, "meta": np.array(json.dumps(meta))})
    crafted["bomb"] = _npz(tmp_path / "bomb.voice", {"codes": np.zeros((5, 2 << 20), np.int64),
                                                     "meta": np.array(json.dumps(meta))}, compress=True)
    dia2_rt = str(Path(sys.executable).with_name("dia2-rt"))
    out = tmp_path / "out.wav"
    for name, path in crafted.items():
        proc = subprocess.run([dia2_rt, "speak", "--artifacts", str(FIXTURE), "--quiet", "--out", str(out),
                               "--voice-1", str(path), SCRIPT], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and not out.exists(), (name, proc.stderr)
        assert proc.stderr.startswith("Error: ") and proc.stderr.count("\n") == 1, (name, proc.stderr)


# --- warm states ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def warm_file(runtime, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("warm") / "pair.warm"
    runtime.warm(runtime.prefix(runtime.voice(CLIP, WORDS, 1))).save(path)
    return path


def _warm_parts(path: Path) -> tuple[dict, dict]:
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in ("k_rows", "v_rows", "tokens", "codes")}
        return json.loads(str(data["meta"])), arrays


def _rewarm(path: Path, tmp_path: Path, edit_meta=None, **arrays) -> Path:
    meta, original = _warm_parts(path)
    if edit_meta:
        edit_meta(meta)
    return _npz(tmp_path / "crafted.warm", {**original, **arrays, "meta": np.array(json.dumps(meta))})


def test_a_restored_warm_state_checks_out(runtime, warm_file):
    warm = WarmState.load(warm_file, runtime)
    assert set(warm.artifacts) == {*runtime.manifest.graphs, "tokenizer"}
    np.testing.assert_array_equal(runtime.speak(SCRIPT, GREEDY, prefix=warm).tokens,
                                  runtime.speak(SCRIPT, GREEDY, prefix=WarmState.load(warm_file)).tokens)


@pytest.mark.parametrize("graph", ["backbone", "depformer"])
def test_a_warm_state_from_other_artifacts_is_refused_naming_the_graph(warm_file, tmp_path, graph):
    directory = Path(shutil.copytree(FIXTURE, tmp_path / "art"))
    _retouch(directory, graph)
    other = Dia2Runtime.load(directory, threads=1)
    for load in (lambda: other.open_session(GREEDY, prefix=WarmState.load(warm_file)),
                 lambda: WarmState.load(warm_file, other)):
        with pytest.raises(VoiceError) as info:
            load()
        assert f"its {graph} sha256" in str(info.value) and "Dia2Runtime.warm(prefix).save" in str(info.value)


def test_a_version_1_warm_state_is_refused_with_the_way_to_remake_it(warm_file, tmp_path):
    path = _rewarm(warm_file, tmp_path, lambda m: m.update(version=1))
    with pytest.raises(VoiceError, match="version 1 records only the codec encoder's and tokenizer's hashes"):
        WarmState.load(path)


WARM_CASES = {
    "NaN rows": (lambda a: dict(k_rows=np.where(np.arange(a["k_rows"].size).reshape(a["k_rows"].shape) == 5, np.nan,
                                                a["k_rows"]).astype(np.float32)), "NaN or infinite"),
    "rows of another model": (lambda a: dict(k_rows=a["k_rows"][:1], v_rows=a["v_rows"][:1]), "cache rows"),
    "rows of another dtype": (lambda a: dict(k_rows=a["k_rows"].astype(np.float16),
                                             v_rows=a["v_rows"].astype(np.float16)), "cache rows"),
    "mismatched members": (lambda a: dict(v_rows=a["v_rows"][:, :, :, :1]), "mismatched shapes"),
    "edited tokens": (lambda a: dict(tokens=a["tokens"] + 1), "step tokens are not what its plan gives"),
    "codes out of range": (lambda a: dict(codes=a["codes"] + 64), "must lie in [0, 64)"),
    "rows bomb": (None, "may be compressed"),
}


@pytest.mark.parametrize("case", list(WARM_CASES), ids=list(WARM_CASES))
def test_crafted_warm_states_are_refused_in_one_line(runtime, warm_file, tmp_path, case):
    make, fragment = WARM_CASES[case]
    meta, arrays = _warm_parts(warm_file)
    if make is None:
        rows = np.zeros((2, 2, 2, 40_000, 16), np.float32)  # 20 MiB of zeros, deflated to a few KB
        tokens = np.zeros((40_000, 2, 7), np.int64)
        path = _npz(tmp_path / "bomb.warm", {**arrays, "k_rows": rows, "v_rows": rows, "tokens": tokens,
                                             "meta": np.array(json.dumps(meta))}, compress=True)
    else:
        path = _rewarm(warm_file, tmp_path, **make(arrays))
    with pytest.raises(VoiceError) as info:
        runtime.open_session(GREEDY, prefix=WarmState.load(path, runtime))
    assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)
    if case != "rows bomb":  # without the runtime at load, the session refuses it
        try:
            warm = WarmState.load(path)
        except VoiceError as exc:
            assert fragment in str(exc)
        else:
            with pytest.raises(VoiceError) as info:
                runtime.open_session(GREEDY, prefix=warm)
            assert fragment in str(info.value)


# --- words files ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["fifo", "deep", "NaN", "huge integer", "too large", "not UTF-8"])
def test_crafted_words_files_are_one_line(runtime, tmp_path, case):
    path = tmp_path / "words.json"
    if case == "fifo":
        os.mkfifo(path)
    elif case == "deep":
        path.write_text("[" * 10_000 + "]" * 10_000)
    elif case == "NaN":
        path.write_text('[{"word": "hi", "start": NaN, "end": 1}]')
    elif case == "huge integer":
        path.write_text('[{"word": "hi", "start": ' + "9" * 5000 + ', "end": 1}]')
    elif case == "too large":
        with open(path, "wb") as f:
            f.truncate(MAX_WORDS_BYTES + 1)
    else:
        path.write_bytes(b'[{"word": "\xff"}]')
    with pytest.raises(VoiceError) as info:
        runtime.voice(CLIP, path, 1)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
