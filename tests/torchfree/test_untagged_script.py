"""A script without a speaker tag is spoken as nari-labs/dia2 speaks it: as speaker 1.

``data/golden_untagged.json`` holds the real reference code's greedy tokens and word timestamps
for untagged scripts on the checkpoint the committed fixture was exported from (how it was
made is in the file's ``about``). The Python API and ``dia2-rt speak`` must reproduce them token
for token; ``tests/test_serve_openai.py`` holds the server to the same samples.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dia2_trt.runtime import Dia2Runtime
from dia2_trt.runtime.params import GenerationParams

from .conftest import DATA, FIXTURE

GOLDEN = json.loads((DATA / "golden_untagged.json").read_text())["cases"]
GREEDY = dict(text_temperature=0.0, audio_temperature=0.0)


@pytest.fixture(scope="module")
def runtime() -> Dia2Runtime:
    return Dia2Runtime.load(FIXTURE, threads=1)


@pytest.mark.parametrize("case", GOLDEN, ids=lambda case: case["name"])
def test_api_speaks_untagged_text_as_the_reference(runtime, case):
    result = runtime.speak(case["script"], GenerationParams(cfg_scale=case["cfg_scale"], **GREEDY))
    assert result.tokens.tolist() == case["tokens"]
    assert [[w, s] for w, s in result.timestamps] == case["timestamps"]


def test_untagged_first_word_carries_speaker_1(runtime):
    # The reference inserts speaker 1's token before the word's own tokens (no "[S1] " spelled, so not
    # the tokens of "[S1] Hello", which carry the space).
    untagged = runtime.parse("Hello there")
    assert untagged[0].tokens == [runtime.manifest.token_ids.spk1, *runtime.tokenizer.encode("Hello")]
    assert untagged[1].tokens == runtime.tokenizer.encode("there")


def test_incremental_session_agrees_with_the_whole(runtime):
    case = GOLDEN[0]
    session = runtime.open_session(GenerationParams(cfg_scale=case["cfg_scale"], **GREEDY))
    for word in case["script"].split(" "):
        session.feed(word + " ")
    session.close()
    list(session)
    assert session.result is not None and session.result.tokens.tolist() == case["tokens"]


def test_cli_speaks_untagged_text_as_the_reference(tmp_path):
    case = GOLDEN[0]
    tokens = tmp_path / "tokens.json"
    done = subprocess.run([sys.executable, "-m", "dia2_trt.runtime", "speak", "--artifacts", str(FIXTURE),
                           "--temperature", "0", "--threads", "1", "--quiet", "--out", str(tmp_path / "out.wav"),
                           "--tokens-out", str(tokens), case["script"]], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(tokens.read_text()) == {"tokens": case["tokens"], "timestamps": case["timestamps"]}
