"""The batch engine on a 16-codebook checkpoint: eight streams, different scripts started at
different frames, greedy and seeded, with a voice prefix and a restored warm state mixed in, each
exactly its solo run. The runtime never loads torch (a subprocess checks ``sys.modules``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dia2_trt.runtime import Dia2Runtime, GenerationParams

from conftest import FIXTURE
from torchfree.batch_runs import GREEDY, SCRIPTS, Plan, differences, run_together, solo

DATA = FIXTURE.parent

PLANS = [
    Plan(SCRIPTS[0], GREEDY, 0),
    Plan(SCRIPTS[1], GenerationParams(seed=11), 1),
    Plan(SCRIPTS[2], GenerationParams(seed=3, cfg_scale=1.0), 3, word_by_word=True),
    Plan(SCRIPTS[3], GREEDY, 4, prefix_kind="voice"),
    Plan(SCRIPTS[4], GenerationParams(seed=5, audio_top_k=4, text_temperature=0.6), 6),
    Plan(SCRIPTS[5], GenerationParams(seed=2), 8, prefix_kind="warm"),
    Plan(SCRIPTS[6], GREEDY, 11, word_by_word=True),
    Plan(SCRIPTS[7], GenerationParams(seed=9, cfg_filter_k=3), 13),
]


@pytest.fixture(scope="module")
def artifacts(artifacts_factory):
    return artifacts_factory("codebooks16", 0, "fp32", prefix_frames=40)  # shared with test_dead_columns


def test_eight_streams_each_give_their_solo_tokens(artifacts):
    alone = Dia2Runtime.load(artifacts, threads=2, max_streams=1)
    batched = Dia2Runtime.load(artifacts, threads=2, max_streams=8)
    assert batched.manifest.audio_channels == 16
    voice = alone.voice(DATA / "voices" / "s1_24k_mono.flac", DATA / "voices" / "s1_24k_mono.words.json", 1)
    results = run_together(batched, PLANS, voice)
    for plan, result in zip(PLANS, results):
        assert differences(result, solo(alone, plan, voice)) == [], plan
    stats = batched.engine.stats()
    assert stats.streams_stepped / stats.frames > 3  # most frames stepped many streams at once


def test_batched_runtime_never_loads_torch(artifacts):
    code = ("import sys, json; from dia2_trt.runtime import Dia2Runtime, GenerationParams\n"
            f"rt = Dia2Runtime.load({str(artifacts)!r}, max_streams=4)\n"
            "import threading\n"
            "out = []\n"
            "ts = [threading.Thread(target=lambda i=i: out.append(rt.speak('[S1] Hi there. [S2] Hello.', "
            "GenerationParams(seed=i)).frames)) for i in range(4)]\n"
            "[t.start() for t in ts]; [t.join() for t in ts]\n"
            "print(json.dumps({'torch': 'torch' in sys.modules, 'runs': len(out)}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"torch": False, "runs": 4}
