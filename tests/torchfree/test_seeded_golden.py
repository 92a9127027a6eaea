"""Seeded runs give the tokens they gave before: a change of the graphs may not move a seed's audio.

``data/tiny-seeded.json`` holds the runtime's own seeded tokens on the committed fixture, recorded
before the depformer sampled from one TopK (round 5), for settings that take each of its branches:
the defaults, no cut (top_k 0), guidance off, the filter off, a filter of TOPK_MAX (64) and one past
it (the full sort), and a small k at a high temperature. Regenerating the fixture must keep them.
"""

from __future__ import annotations

import json

import pytest

from dia2_trt.runtime import Dia2Runtime
from dia2_trt.runtime.params import GenerationParams

from .conftest import DATA, FIXTURE

SEEDED = json.loads((DATA / "tiny-seeded.json").read_text())


@pytest.fixture(scope="module", params=[1, 3], ids=["solo", "batched"])
def runtime(request) -> Dia2Runtime:
    return Dia2Runtime.load(FIXTURE, threads=1, max_streams=request.param)


@pytest.mark.parametrize("case", SEEDED["cases"], ids=lambda c: ",".join(f"{k}={v}" for k, v in c["options"].items()))
def test_a_seed_gives_the_tokens_it_gave(runtime, case):
    result = runtime.speak(SEEDED["script"], GenerationParams.from_options(**case["options"]))
    assert result.tokens.tolist() == case["tokens"]
