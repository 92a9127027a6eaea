"""Parity on the real vocabularies: text 49280, audio 2050, 32 codebooks, delays 16/18.

``data/golden_real_vocab.json`` holds the tokens and timestamps of nari-labs/dia2's
``Dia2.generate`` (the real code: greedy, CPU, float32, cfg_scale 2) on
``models.tiny.build_real_vocab_checkpoint(seed=...)`` for the script listed. The
PyTorch port must reproduce it exactly, and so must ``dia2-rt speak``'s runtime,
unless the first decision where it departs is measured to be a near-tie.

Near-tie rule (``export/accuracy.py: Decision.near_tie``). Each greedy pick takes the
best conditional logit among the guided top-k. ONNX Runtime and torch evaluate the
same formulas in another op order (MLAS vs MKL GEMM blocking, MatMul-Softmax-MatMul vs
SDPA; and MLAS's blocking depends on the CPU's instruction set), so their logits differ
by fp32 rounding: measured on this checkpoint over the golden run's 3828 decisions, at
most 2.7e-6 of the step's largest |logit| (median 5.3e-7; AVX-512 Xeon). Where the runtime
departs, the test replays the artifacts teacher-forced through the reference's run and,
at the first decision they pick otherwise, measures

* the error e = max |ORT - torch| over that step's raw CFG-pair logits, and
* the flip margin m: twice the smallest logits error that could change torch's pick
  (the top-2 gap among the kept entries, or the guided top-k boundary; ``_margin``).

It is a near-tie, and tolerated (xfail, with the numbers), only if e is rounding
(e <= ROUNDING_REL = 1e-4 x the largest |logit|: 17x the worst of 24,651 measured
decisions, 5.8e-6) and m <= 2e (so that error can flip the pick). Any other departure
is a defect and fails, with the same numbers: a wrong RoPE position, formula, dtype or
filter moves logits by far more than rounding. A departure whose
teacher-forced replay agrees everywhere is a defect of the runtime loop, not of a graph.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dia2_trt.export.accuracy import ROUNDING_REL, Decision, first_divergence  # noqa: E402
from dia2_trt.runtime.params import GenerationParams  # noqa: E402

GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_real_vocab.json").read_text())
GREEDY = dict(text_temperature=0.0, audio_temperature=0.0)


@pytest.fixture(scope="module")
def real_vocab(tmp_path_factory):
    """seed -> (checkpoint files, reference loop); built once per module."""
    from dia2_trt.export.reference_run import reference_loop
    from dia2_trt.models.sources import resolve_checkpoint
    from dia2_trt.models.tiny import build_real_vocab_checkpoint

    cache = {}

    def get(seed: int):
        if seed not in cache:
            files = resolve_checkpoint(checkpoint=build_real_vocab_checkpoint(
                tmp_path_factory.mktemp(f"real-vocab-{seed}") / "ckpt", seed=seed))
            cache[seed] = files, reference_loop(files)[0]
        return cache[seed]

    return get


@pytest.fixture(scope="module")
def real_vocab_artifacts(real_vocab, tmp_path_factory):
    from dia2_trt.export.build import BuildOptions, build_artifacts

    cache = {}

    def get(seed: int) -> Path:
        if seed not in cache:
            out = tmp_path_factory.mktemp(f"real-vocab-art-{seed}") / "artifacts"
            build_artifacts(real_vocab(seed)[0], out, BuildOptions())
            cache[seed] = out
        return cache[seed]

    return get


def _case_id(case: dict) -> str:
    return f"seed{case['seed']}-cfg{case['cfg_scale']}"


def _params(case: dict) -> GenerationParams:
    return GenerationParams(cfg_scale=case["cfg_scale"], **GREEDY)


@pytest.mark.parametrize("case", GOLDEN, ids=_case_id)
def test_reference_port_equals_nari_labs_dia2_on_the_real_vocabulary(real_vocab, case):
    _, loop = real_vocab(case["seed"])
    assert loop.cfg.data.text_vocab_size == 49280 and loop.cfg.data.audio_channels == 32
    result = loop.run(case["script"], _params(case))
    assert result.tokens.tolist() == case["tokens"]
    assert [[w, s] for w, s in result.timestamps] == case["timestamps"]


@pytest.mark.slow  # one real-vocabulary export (~1-2 min on 2 cores), then a teacher-forced replay on departure
@pytest.mark.parametrize("case", GOLDEN, ids=_case_id)
def test_runtime_equals_nari_labs_dia2_on_the_real_vocabulary(real_vocab, real_vocab_artifacts, case):
    from dia2_trt.runtime import Dia2Runtime

    artifacts = real_vocab_artifacts(case["seed"])
    result = Dia2Runtime.load(artifacts, threads=1).speak(case["script"], _params(case))
    if result.tokens.tolist() == case["tokens"]:
        assert [[w, s] for w, s in result.timestamps] == case["timestamps"]
        return
    with _torch_threads(1):
        found = first_divergence(artifacts, real_vocab(case["seed"])[1], case["script"], _params(case))
    if found is None:
        pytest.fail("the runtime's tokens differ from the reference's, yet the teacher-forced replay "
                    "picks as torch does everywhere: a defect of the runtime loop")
    if found.near_tie:
        pytest.xfail(found.describe())
    pytest.fail(found.describe())


class _torch_threads:
    def __init__(self, count: int) -> None:
        self.count = count

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.count)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


# --- the rule itself, on numbers with known answers ------------------------------------------


def _decision(gap: float, error: float, scale: float = 4.0, flip: float | None = None) -> Decision:
    return Decision(63, 2, 7, 9, gap, -gap, error, scale, gap if flip is None else flip)


def test_a_flip_inside_rounding_error_is_a_near_tie():
    d = _decision(gap=2e-6, error=3e-6)
    assert d.rounding and d.near_tie and not d.agree
    assert d.describe().startswith("near-tie at step 63 codebook 2")


def test_a_flip_with_room_to_spare_is_a_defect():
    """The margin is ten times what the measured error could move: rounding did not flip it."""
    d = _decision(gap=3e-5, error=3e-6)
    assert d.rounding and not d.near_tie
    assert d.describe().startswith("defect at step 63 codebook 2 (flip margin 3e-05)")


def test_an_error_beyond_rounding_is_a_defect_even_on_a_tiny_margin():
    """A wrong formula moves logits by much more than fp32 rounding: never excused as a tie."""
    d = _decision(gap=1e-3, error=0.2)
    assert not d.rounding and not d.near_tie
    assert d.describe().startswith("defect")
    assert ROUNDING_REL * d.scale < 0.2


def test_first_divergence_finds_a_broken_head_and_calls_it_a_defect(tiny_checkpoint, tiny_artifacts, tmp_path):
    """A depformer head off by a visible amount: the teacher-forced replay names that codebook, a defect."""
    import shutil

    import onnx
    from onnx import numpy_helper

    from dia2_trt.export.accuracy import _head_outputs
    from dia2_trt.export.reference_run import reference_loop
    from dia2_trt.models.sources import resolve_checkpoint
    from dia2_trt.runtime.artifacts import sha256

    from conftest import SCRIPTS

    loop = reference_loop(resolve_checkpoint(checkpoint=tiny_checkpoint))[0]
    params = GenerationParams(**GREEDY)
    art = tmp_path / "broken"
    shutil.copytree(tiny_artifacts, art)
    (art / ".verified.json").unlink(missing_ok=True)
    graph = art / "depformer.onnx"
    model = onnx.load(str(graph))
    matmul = next(n for n in model.graph.node if n.output[0] == _head_outputs(graph)[1])
    head = next(t for t in model.graph.initializer if t.name == matmul.input[1])  # codebook 2's head
    values = numpy_helper.to_array(head)
    head.CopyFrom(numpy_helper.from_array(values + np.float32(0.5) * np.sign(values), head.name))
    onnx.save(model, str(graph))
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["graphs"]["depformer"]["sha256"] = sha256(graph)  # a consistent, wrong artifact
    (art / "manifest.json").write_text(json.dumps(manifest))
    with _torch_threads(1):
        assert first_divergence(tiny_artifacts, loop, SCRIPTS["dialogue"], params) is None
        found = first_divergence(art, loop, SCRIPTS["dialogue"], params)
    assert found is not None and found.channel == 2 and not found.near_tie
    assert found.describe().startswith("defect at step")
