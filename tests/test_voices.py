"""Audio prefixes, voice files and warm states against outputs of the real nari-labs/dia2 code.

``data/voices/golden_prefix.json`` was produced by running nari-labs/dia2's
``Dia2.generate(prefix_speaker_1=..., prefix_speaker_2=..., include_prefix=...)``
greedily (CPU, float32) on the tiny checkpoints ``models/tiny.py`` builds, with
its whisper transcription replaced by the ``*.words.json`` timings next to the
clips (each clip's words, post-processed as the reference post-processes
whisper's). It also holds the reference's prefix plans (entries, new-word steps),
its resampled pcm's hash and ``MimiModel.encode`` codes per clip. If the tiny
format changes, regenerate it with the real code.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dia2_trt.runtime import Dia2Runtime
from dia2_trt.runtime.audio import AudioError, load_mono, resample_linear
from dia2_trt.runtime.params import GenerationParams
from dia2_trt.runtime.prefix import WarmState
from dia2_trt.runtime.transcribe import transcribe
from dia2_trt.runtime.voice import (
    VoiceError,
    Word,
    build_plan,
    load_voice,
    parse_words,
    read_words,
    save_voice,
    words_to_entries,
)

DATA = Path(__file__).parent / "data" / "voices"
GOLDEN = json.loads((DATA / "golden_prefix.json").read_text())
GREEDY = dict(text_temperature=0.0, audio_temperature=0.0)
PREFIX_FRAMES = 48  # room for the longest golden prefix (33 frames)


def _words_file(clip: str) -> Path:
    return DATA / (clip.split(".")[0] + ".words.json")


def _case_id(case: dict) -> str:
    speakers = "2spk" if case["speaker_2"] else "1spk"
    return f"{case['variant']}-{case['seed']}-{speakers}-{'kept' if case['include_prefix'] else 'trimmed'}"


@pytest.fixture(scope="module")
def runtimes(artifacts_factory):
    cache = {}

    def get(variant: str, seed: int) -> Dia2Runtime:
        if (variant, seed) not in cache:
            cache[variant, seed] = Dia2Runtime.load(artifacts_factory(variant, seed, prefix_frames=PREFIX_FRAMES))
        return cache[variant, seed]

    return get


def _prefix(runtime: Dia2Runtime, case: dict):
    voices = [runtime.voice(DATA / clip, _words_file(clip), slot) if clip else None
              for slot, clip in ((1, case["speaker_1"]), (2, case["speaker_2"]))]
    return runtime.prefix(*voices, include_prefix=case["include_prefix"])


def _same(result, case) -> None:
    assert result.tokens.tolist() == case["tokens"]
    assert [[w, s] for w, s in result.timestamps] == case["timestamps"]


# --- token identity with the reference -------------------------------------------------


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=_case_id)
def test_prefix_generation_equals_nari_labs_dia2(runtimes, case):
    runtime = runtimes(case["variant"], case["seed"])
    prefix = _prefix(runtime, case)
    plan = case["plan"]
    assert [[e.text, e.tokens, e.padding] for e in prefix.plan.entries] == plan["entries"]
    assert prefix.plan.new_word_steps == plan["new_word_steps"] and prefix.frames == plan["aligned_frames"]
    params = GenerationParams(cfg_scale=case["cfg_scale"], **GREEDY)
    for prefill in (True, False):  # the prefill graph keeps greedy parity with the step-wise warm-up
        _same(runtime.speak(case["script"], params, prefix=prefix, prefill=prefill), case)


@pytest.mark.parametrize("enc", GOLDEN["encodings"], ids=lambda e: f"{e['variant']}-{e['seed']}-{e['clip']}")
def test_audio_in_and_encoder_codes_equal_the_reference(runtimes, enc):
    runtime = runtimes(enc["variant"], enc["seed"])
    pcm = load_mono(DATA / enc["clip"], runtime.sample_rate)
    assert pcm.dtype == np.float32 and pcm.size == enc["samples"]
    assert hashlib.sha256(pcm.tobytes()).hexdigest() == enc["pcm_sha256"]  # resampling is bit-exact
    assert runtime.encode(pcm).tolist() == enc["codes"]


def test_resampler_is_torch_interpolate_bit_for_bit():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for n, src, dst in [(44100, 44100, 24000), (31, 44100, 24000), (20800, 16000, 24000), (300001, 11025, 24000),
                        (123457, 96000, 24000), (48000, 48000, 24000)]:
        audio = (rng.standard_normal(n) * rng.choice([1e-3, 1.0, 10.0], n)).astype(np.float32)
        size = max(1, int(round(n * dst / src)))
        theirs = torch.nn.functional.interpolate(torch.from_numpy(audio)[None, None], size=size, mode="linear",
                                                 align_corners=False)[0, 0].numpy()
        assert np.array_equal(resample_linear(audio, src, dst), theirs), (n, src, dst)


# --- voice files and warm states ------------------------------------------------------


TWO = next(c for c in GOLDEN["cases"] if c["speaker_2"] and not c["include_prefix"] and c["variant"] == "default")


def test_voice_files_give_the_tokens_of_the_raw_prefix(runtimes, tmp_path):
    runtime = runtimes("default", 0)
    for slot, clip in ((1, TWO["speaker_1"]), (2, TWO["speaker_2"])):
        save_voice(runtime.voice(DATA / clip, _words_file(clip), slot), tmp_path / f"{slot}.voice")
    voices = [load_voice(tmp_path / f"{slot}.voice") for slot in (1, 2)]
    result = runtime.speak(TWO["script"], GenerationParams(**GREEDY), prefix=runtime.prefix(*voices))
    _same(result, TWO)


def test_a_voice_moves_to_the_other_speaker_slot(runtimes):
    runtime = runtimes("default", 0)
    as_two = runtime.voice(DATA / TWO["speaker_1"], _words_file(TWO["speaker_1"]), 2)
    as_one = runtime.voice(DATA / TWO["speaker_1"], _words_file(TWO["speaker_1"]), 1)
    assert runtime.prefix(as_two).plan.entries == runtime.prefix(as_one).plan.entries


def test_voice_from_other_artifacts_is_refused(runtimes):
    voice = runtimes("default", 0).voice(DATA / TWO["speaker_1"], _words_file(TWO["speaker_1"]), 1)
    with pytest.raises(VoiceError, match="other artifacts"):
        runtimes("full", 1).prefix(voice)


@pytest.mark.parametrize("prefill", [True, False], ids=["prefill", "step"])
def test_restored_warm_state_equals_a_fresh_warm_up(runtimes, tmp_path, prefill):
    runtime = runtimes("default", 0)
    case = next(c for c in GOLDEN["cases"] if c["speaker_2"] and c["include_prefix"] and c["variant"] == "default")
    prefix = _prefix(runtime, case)
    warm = runtime.warm(prefix, prefill=prefill)
    assert 0 < warm.frames <= prefix.frames
    warm.save(tmp_path / "pair.warm")
    params = GenerationParams(**GREEDY)
    for restored in (warm, WarmState.load(tmp_path / "pair.warm")):
        _same(runtime.speak(case["script"], params, prefix=restored, include_prefix=True, prefill=prefill), case)
    # one warm state serves other scripts too, exactly as a fresh warm-up would
    other = "[S2] Good night, and see you tomorrow."
    fresh = runtime.speak(other, params, prefix=prefix)
    again = runtime.speak(other, params, prefix=warm, include_prefix=True)
    assert again.tokens.tolist() == fresh.tokens.tolist() and again.timestamps == fresh.timestamps


def test_a_finished_turn_is_the_next_turns_prefix(runtimes):
    runtime = runtimes("default", 0)
    params = GenerationParams(**GREEDY)
    first = runtime.speak("[S1] Hello there, how are you? [S2] Fine, thanks.", params)
    voice = runtime.turn_voice(first.tokens, first.timestamps)
    assert np.array_equal(voice.codes, first.tokens)  # no re-encoding
    assert [w.text for w in voice.words] == [w for w, _ in first.timestamps]  # no transcription
    second = runtime.speak("[S1] Good to hear.", params, prefix=first)
    assert second.tokens.tolist() == runtime.speak("[S1] Good to hear.", params,
                                                   prefix=runtime.prefix(voice)).tokens.tolist()
    assert [w for w, _ in second.timestamps] == ["Good", "to", "hear."]  # the previous turn is trimmed
    with pytest.raises(VoiceError, match="rows of codes"):
        runtime.turn_voice(first.tokens[:2], first.timestamps)


# --- the reference's word -> entry rules ------------------------------------------------


def _encode(text: str) -> list[int]:
    return [len(part) for part in text.split()]  # one token per space-separated piece


def test_words_to_entries_follows_the_reference():
    words = [Word("Hello", 0.2, 0.45), Word("big", 0.2, 0.3), Word("world", 2.0, 2.6)]
    entries, steps = words_to_entries(words, _encode, "[S1]", 12.5)
    # 0.2 s = frame 2.5 -> 2 (half to even); the tag is spelled before the first word only
    assert steps == [1, 4, 24]
    assert [e.tokens for e in entries] == [[4, 5], [3], [5]]
    # frames up to the next start (the last word: its end, 2.6 s = 32.5 -> 32), minus one
    assert [e.padding for e in entries] == [2, 19, 6]


def test_plan_offsets_and_speaker_2_needs_speaker_1():
    from dia2_trt.runtime.voice import Voice

    one = Voice(1, np.zeros((2, 10), np.int64), [], [], [0, 5])
    two = Voice(2, np.ones((2, 4), np.int64), [], [], [1])
    plan = build_plan(one, two)
    assert plan.new_word_steps == [3, 8, 11] and plan.codes.shape == (2, 14)
    with pytest.raises(VoiceError, match="speaker 1"):
        build_plan(None, two)
    assert build_plan(None) is None


@pytest.mark.parametrize("raw, message", [
    ({"word": "a"}, "JSON list"),
    ([{"word": "a", "start": 0.1}], '"end"'),
    ([{"word": 3, "start": 0.1, "end": 0.2}], "string"),
    ([{"word": "a", "start": -1, "end": 0.2}], "non-negative"),
    ([{"word": "a", "start": 0.5, "end": 0.2}], "before it starts"),
    ([{"word": "a", "start": 0.5, "end": 0.6}, {"word": "b", "start": 0.1, "end": 0.2}], "before the previous"),
    ([{"word": "a", "start": 0.5, "end": 3.0}], "past the end"),
])
def test_bad_words_are_one_line_errors(raw, message):
    with pytest.raises(VoiceError, match=message) as info:
        parse_words(raw, duration=1.0)
    assert "\n" not in str(info.value)


def test_words_are_stripped_like_whisper_output(tmp_path):
    words = '[{"word": " Hi", "start": 0, "end": 0.2}, {"word": " ", "start": 0.2, "end": 0.3}]'
    (tmp_path / "w.json").write_text(words)
    assert read_words(tmp_path / "w.json") == [Word("Hi", 0.0, 0.2)]


def test_transcribe_adapter_with_a_stand_in_model():
    class _Word:
        def __init__(self, word, start, end):
            self.word, self.start, self.end = word, start, end

    class _Segment:
        def __init__(self, words):
            self.words = words

    class StandIn:
        def transcribe(self, path, language=None, word_timestamps=False):
            assert word_timestamps, "faster-whisper gives words only with word_timestamps=True"
            return iter([_Segment([_Word(" Hello", 0.1, 0.4)]), _Segment([_Word(" there.", 0.5, 0.9)])]), None

    assert transcribe(StandIn(), "clip.wav", duration=1.0) == [Word("Hello", 0.1, 0.4), Word("there.", 0.5, 0.9)]
    with pytest.raises(VoiceError, match="past the end"):
        transcribe(StandIn(), "clip.wav", duration=0.5)


def test_unreadable_and_empty_audio(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.int16), 24000)
    for name, message in (("bad.wav", "cannot read audio"), ("empty.wav", "empty"), ("none.wav", "no such")):
        with pytest.raises(AudioError, match=message):
            load_mono(tmp_path / name, 24000)


# --- command line, torch-free --------------------------------------------------------

_NO_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, _Block())
from dia2_trt.runtime.cli import main
sys.argv = ["dia2-rt", *sys.argv[1:]]
try:
    main()
finally:
    banned = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")
              or m.startswith(("dia2_trt.models", "dia2_trt.export", "dia2_trt.calibration"))]
    assert not banned, banned
"""


def _rt(*args):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(_NO_TORCH), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def _prefix_args(case: dict) -> list[str]:
    args = ["--prefix-speaker-1", DATA / case["speaker_1"], "--prefix-words-1", _words_file(case["speaker_1"])]
    if case["speaker_2"]:
        args += ["--prefix-speaker-2", DATA / case["speaker_2"], "--prefix-words-2", _words_file(case["speaker_2"])]
    return args + (["--include-prefix"] if case["include_prefix"] else [])


def test_cli_prefix_and_voice_files_without_torch(artifacts_factory, tmp_path):
    art = artifacts_factory("default", 0, prefix_frames=PREFIX_FRAMES)
    common = ["speak", "--artifacts", art, TWO["script"], "--temperature", "0", "--quiet"]
    done = _rt(*common, *_prefix_args(TWO), "--out", tmp_path / "a.wav", "--tokens-out", tmp_path / "a.json")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "a.json").read_text()) == {"tokens": TWO["tokens"], "timestamps": TWO["timestamps"]}
    for slot, clip in ((1, TWO["speaker_1"]), (2, TWO["speaker_2"])):
        done = _rt("voice", "create", DATA / clip, "--artifacts", art, "--speaker", slot,
                   "--words", _words_file(clip), "--out", tmp_path / f"{slot}.voice")
        assert done.returncode == 0, done.stderr
    done = _rt(*common, "--voice-1", tmp_path / "1.voice", "--voice-2", tmp_path / "2.voice", "--step-warmup",
               "--out", tmp_path / "b.wav", "--tokens-out", tmp_path / "b.json")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "b.json").read_text() == (tmp_path / "a.json").read_text()
    pcm, rate = sf.read(tmp_path / "b.wav")
    assert rate == 24000 and len(pcm) == 1920 * len(TWO["tokens"][0])
    # the next conversation turn, from the first one's --tokens-out
    done = _rt("speak", "--artifacts", art, "[S2] Sounds good.", "--temperature", "0", "--quiet",
               "--prefix-turn", tmp_path / "a.json", "--out", tmp_path / "c.wav", "--tokens-out", tmp_path / "c.json")
    assert done.returncode == 0, done.stderr
    runtime = Dia2Runtime.load(art)
    previous = runtime.turn_voice(np.asarray(TWO["tokens"]), [tuple(x) for x in TWO["timestamps"]])
    expected = runtime.speak("[S2] Sounds good.", GenerationParams(**GREEDY), prefix=runtime.prefix(previous))
    assert json.loads((tmp_path / "c.json").read_text())["tokens"] == expected.tokens.tolist()


def _bad_inputs(tmp_path: Path) -> dict[str, list]:
    clip, words = DATA / TWO["speaker_1"], _words_file(TWO["speaker_1"])
    (tmp_path / "bad.flac").write_bytes(b"not audio")
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.int16), 24000)
    (tmp_path / "malformed.json").write_text('[{"word": "a",')
    unordered = '[{"word": "a", "start": 0.5, "end": 0.6}, {"word": "b", "start": 0.1, "end": 0.2}]'
    (tmp_path / "order.json").write_text(unordered)
    (tmp_path / "past.json").write_text('[{"word": "a", "start": 0.5, "end": 9.0}]')
    long_clip = tmp_path / "long.wav"
    sf.write(long_clip, np.zeros(24000 * 20, np.int16), 24000)  # 250 frames > the cache's 209 rows
    (tmp_path / "long.json").write_text('[{"word": "Hello", "start": 0.5, "end": 1.0}]')
    return {
        "cannot read audio": ["--prefix-speaker-1", tmp_path / "bad.flac", "--prefix-words-1", words],
        "empty": ["--prefix-speaker-1", tmp_path / "empty.wav", "--prefix-words-1", words],
        "malformed JSON": ["--prefix-speaker-1", clip, "--prefix-words-1", tmp_path / "malformed.json"],
        "before the previous": ["--prefix-speaker-1", clip, "--prefix-words-1", tmp_path / "order.json"],
        "past the end": ["--prefix-speaker-1", clip, "--prefix-words-1", tmp_path / "past.json"],
        "speaker 1 prefix too": ["--prefix-speaker-2", clip, "--prefix-words-2", words],
        "not a voice file": ["--voice-1", tmp_path / "malformed.json"],
        "at most": ["--prefix-speaker-1", long_clip, "--prefix-words-1", tmp_path / "long.json"],
        "faster-whisper": ["--prefix-speaker-1", clip],
    }


def test_cli_bad_prefix_input_is_one_line_and_writes_nothing(artifacts_factory, tmp_path):
    from click.testing import CliRunner

    from dia2_trt.runtime.cli import main

    art = artifacts_factory("default", 0, prefix_frames=PREFIX_FRAMES)
    other = Dia2Runtime.load(artifacts_factory("full", 1, prefix_frames=PREFIX_FRAMES))
    save_voice(other.voice(DATA / TWO["speaker_1"], _words_file(TWO["speaker_1"]), 1), tmp_path / "other.voice")
    cases = {**_bad_inputs(tmp_path), "other artifacts": ["--voice-1", tmp_path / "other.voice"]}
    for message, args in cases.items():
        out = tmp_path / "out.wav"
        result = CliRunner().invoke(main, ["speak", "--artifacts", str(art), "[S1] Hi.", "--out", str(out),
                                           "--tokens-out", str(tmp_path / "t.json"), *map(str, args)],
                                    standalone_mode=False)
        assert result.exception is not None and message in str(result.exception), (message, result.output)
        assert "\n" not in str(result.exception).strip()
        assert not out.exists() and not (tmp_path / "t.json").exists()
    result = CliRunner().invoke(main, ["voice", "create", str(tmp_path / "bad.flac"), "--artifacts", str(art),
                                       "--speaker", "1", "--words", str(_words_file(TWO["speaker_1"])),
                                       "--out", str(tmp_path / "x.voice")], standalone_mode=False)
    assert "cannot read audio" in str(result.exception) and not (tmp_path / "x.voice").exists()


def test_bench_prefix_compares_the_three_warm_ups(artifacts_factory, tmp_path):
    from click.testing import CliRunner

    from dia2_trt.runtime.cli import main

    art = artifacts_factory("default", 0, prefix_frames=PREFIX_FRAMES)
    result = CliRunner().invoke(main, ["bench", "--prefix", "--artifacts", str(art), "--prefix-seconds", "3",
                                       "--repeats", "1", "--text", "[S1] Hello there. [S2] Hi.",
                                       "--out", str(tmp_path)], standalone_mode=False)
    assert result.exception is None, result.output
    report = json.loads((tmp_path / "prefix_bench.json").read_text())
    assert set(report["median_s"]) == {"step", "prefill", "warm"} and report["prefix_frames"] == 38
    assert 0 < report["script_free_frames"] <= report["prefix_frames"]
    assert all(len(v) == 1 and v[0] > 0 for v in report["time_to_first_audio_s"].values())
