"""The audio-prefix path on the committed fixture, torch-free: the reference's outputs for the
default tiny checkpoint (``data/voices/golden_prefix.json``, see tests/test_voices.py) come out of
the runtime with only the base install, step-wise and through the prefill graph, from raw clips
and from voice files."""

from __future__ import annotations

import hashlib
import json

import pytest

from dia2_trt.runtime import Dia2Runtime, GenerationParams
from dia2_trt.runtime.audio import load_mono
from dia2_trt.runtime.voice import load_voice, save_voice

from .conftest import DATA, FIXTURE

VOICES = DATA / "voices"
GOLDEN = json.loads((VOICES / "golden_prefix.json").read_text())
CASES = [c for c in GOLDEN["cases"] if (c["variant"], c["seed"]) == ("default", 0)]
GREEDY = GenerationParams(text_temperature=0.0, audio_temperature=0.0)


def _words(clip: str):
    return VOICES / (clip.split(".")[0] + ".words.json")


@pytest.fixture(scope="module")
def runtime() -> Dia2Runtime:
    return Dia2Runtime.load(FIXTURE)


def _voices(runtime, case):
    return [runtime.voice(VOICES / clip, _words(clip), slot) if clip else None
            for slot, clip in ((1, case["speaker_1"]), (2, case["speaker_2"]))]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'2spk' if c['speaker_2'] else '1spk'}-"
                                                      f"{'kept' if c['include_prefix'] else 'trimmed'}")
def test_prefix_tokens_equal_the_reference_without_torch(runtime, case, tmp_path):
    prefix = runtime.prefix(*_voices(runtime, case), include_prefix=case["include_prefix"])
    for prefill in (True, False):
        result = runtime.speak(case["script"], GREEDY, prefix=prefix, prefill=prefill)
        assert result.tokens.tolist() == case["tokens"]
        assert [[w, s] for w, s in result.timestamps] == case["timestamps"]
    for slot, voice in enumerate(_voices(runtime, case), start=1):
        if voice is not None:
            save_voice(voice, tmp_path / f"{slot}.voice")
    files = [load_voice(tmp_path / f"{slot}.voice") if (tmp_path / f"{slot}.voice").exists() else None
             for slot in (1, 2)]
    again = runtime.speak(case["script"], GREEDY, prefix=runtime.prefix(*files, include_prefix=case["include_prefix"]))
    assert again.tokens.tolist() == case["tokens"]
    # Torch-free by construction in .ci/run's base venv (import torch fails there); in the full
    # suite other tests have loaded torch, so tests/test_voices.py checks it in a subprocess.


@pytest.mark.parametrize("enc", [e for e in GOLDEN["encodings"] if (e["variant"], e["seed"]) == ("default", 0)],
                         ids=lambda e: e["clip"])
def test_encoder_codes_equal_the_reference_without_torch(runtime, enc):
    pcm = load_mono(VOICES / enc["clip"], runtime.sample_rate)
    assert hashlib.sha256(pcm.tobytes()).hexdigest() == enc["pcm_sha256"]
    assert runtime.encode(pcm).tolist() == enc["codes"]
