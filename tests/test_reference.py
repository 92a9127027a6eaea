"""The PyTorch reference loop against outputs of the real nari-labs/dia2 code.

``data/golden_reference.json`` was produced by running nari-labs/dia2's
``Dia2.generate`` (greedy, CPU, float32) on the tiny checkpoints that
``models/tiny.py`` builds (variant, seed as listed). If the tiny format
changes (``TINY_FORMAT``), those outputs must be regenerated with the real code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from dia2_trt.export.reference_run import reference_loop
from dia2_trt.models.sources import resolve_checkpoint
from dia2_trt.runtime.params import GenerationParams

from conftest import SCRIPTS

GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_reference.json").read_text())
GREEDY = dict(text_temperature=0.0, audio_temperature=0.0)


@pytest.fixture(scope="module")
def loops(checkpoint_factory):
    cache = {}

    def get(variant: str, seed: int):
        if (variant, seed) not in cache:
            cache[variant, seed] = reference_loop(resolve_checkpoint(checkpoint=checkpoint_factory(variant, seed)))[0]
        return cache[variant, seed]

    return get


def _case_id(case: dict) -> str:
    return f"{case['variant']}-{case['seed']}-{case['script']}-cfg{case['cfg_scale']}"


@pytest.mark.parametrize("case", GOLDEN, ids=_case_id)
def test_greedy_reference_loop_equals_nari_labs_dia2(loops, case):
    loop = loops(case["variant"], case["seed"])
    result = loop.run(SCRIPTS[case["script"]], GenerationParams(cfg_scale=case["cfg_scale"], **GREEDY))
    assert result.tokens.tolist() == case["tokens"]
    assert [[w, s] for w, s in result.timestamps] == case["timestamps"]


def test_greedy_is_deterministic_and_reaches_the_end(loops):
    loop = loops("default", 0)
    params = GenerationParams(**GREEDY)
    first, second = loop.run(SCRIPTS["dialogue"], params), loop.run(SCRIPTS["dialogue"], params)
    assert first.tokens.tolist() == second.tokens.tolist()
    assert first.frames < loop.cfg.runtime.max_context_steps, "never reached the end of the script"
    assert [w for w, _ in first.timestamps] == SCRIPTS["dialogue"].replace("[S1] ", "").replace("[S2] ", "").split()


def test_sampling_is_seeded(loops):
    loop = loops("default", 0)
    a = loop.run(SCRIPTS["dialogue"], GenerationParams(seed=5))
    b = loop.run(SCRIPTS["dialogue"], GenerationParams(seed=5))
    c = loop.run(SCRIPTS["dialogue"], GenerationParams(seed=6))
    assert a.tokens.tolist() == b.tokens.tolist() != c.tokens.tolist()


def test_reference_cli_writes_tokens_and_audio(tiny_checkpoint, tmp_path):
    script = tmp_path / "script.txt"
    script.write_text(SCRIPTS["dialogue"])
    tokens, wav = tmp_path / "tokens.json", tmp_path / "out.wav"
    result = subprocess.run(
        [sys.executable, "-m", "dia2_trt.export", "reference", "--checkpoint", str(tiny_checkpoint),
         "--input", str(script), "--temperature", "0", "--tokens-out", str(tokens), "--out", str(wav)],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr
    data = json.loads(tokens.read_text())
    case = ("default", 0, "dialogue", 2.0)
    golden = next(c for c in GOLDEN if (c["variant"], c["seed"], c["script"], c["cfg_scale"]) == case)
    assert data == {"tokens": golden["tokens"], "timestamps": golden["timestamps"]}
    pcm, rate = sf.read(wav)
    assert rate == 24000 and len(pcm) == 1920 * len(golden["tokens"][0])


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("[S3] Hello there", "unknown tag"),
    ("[S1] Hello <laugh> there", "unknown tag"),
])
def test_reference_cli_rejects_bad_scripts(tiny_checkpoint, tmp_path, text, message):
    script = tmp_path / "script.txt"
    script.write_text(text)
    tokens = tmp_path / "tokens.json"
    result = subprocess.run(
        [sys.executable, "-m", "dia2_trt.export", "reference", "--checkpoint", str(tiny_checkpoint),
         "--input", str(script), "--tokens-out", str(tokens)], capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("Error:") and message in result.stderr
    assert not tokens.exists()
