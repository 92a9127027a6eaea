"""The depformer's one-TopK sampler (graphs.guided_sample) picks what sample(guide(...)) picks.

Both run as one ONNX graph on ONNX Runtime, where TopK breaks ties by the lower index (torch's
eager topk does not promise that, so the comparison is made on the exported graph). Logits with
heavy ties, every kind of row (filtered, guidance off, filter off, greedy, cut past TOPK_MAX) and
uniform numbers up to 1 go through both; the batches are built so that both of guided_sample's
branches (the candidates, the full sort) are taken.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from dia2_trt.export.graphs import TOPK_MAX, guide, guided_sample, sample, sample_candidates

NAMES = ["logits", "uniform", "temperature", "top_k", "cfg_scale", "filter_k"]
STREAMS = 3


class _Both(torch.nn.Module):
    def forward(self, logits, uniform, temperature, top_k, cfg_scale, filter_k):
        args = (logits, uniform, temperature, top_k, cfg_scale, filter_k)
        _, whole = sample_candidates(*args)
        reference = sample(guide(logits, cfg_scale, filter_k), uniform, temperature, top_k)
        return guided_sample(*args), reference, whole.all()


@pytest.fixture(scope="module", params=[70, 2050], ids=["vocab70", "vocab2050"])
def both(request, tmp_path_factory):
    vocab = request.param
    example = (torch.zeros(2 * STREAMS, vocab), torch.rand(STREAMS), torch.ones(STREAMS),
               torch.full((STREAMS,), 50), torch.full((STREAMS,), 2.0), torch.full((STREAMS,), 50))
    path = tmp_path_factory.mktemp("sampler") / "both.onnx"
    torch.onnx.export(_Both(), example, str(path), dynamo=True, opset_version=20, input_names=NAMES,
                      output_names=["fast", "reference", "whole"])
    return vocab, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _feeds(rng, vocab, *, ties: bool, easy: bool) -> dict:
    logits = rng.standard_normal((2 * STREAMS, vocab)) * 3
    if ties:  # integers, and on some rows only even ones: long runs of equal values
        logits = np.round(logits / rng.choice([1, 2])) * 2
    feeds = {
        "logits": logits.astype(np.float32), "uniform": rng.random(STREAMS, dtype=np.float32),
        "temperature": rng.choice(np.array([0.0, 0.8, 1.3], np.float32), STREAMS),
        "top_k": rng.choice([0, 1, 5, 50, TOPK_MAX - 1, TOPK_MAX, TOPK_MAX + 1, vocab], STREAMS).astype(np.int64),
        "cfg_scale": rng.choice(np.array([1.0, 2.0, 0.3, 3.0], np.float32), STREAMS),
        "filter_k": rng.choice([0, 1, 10, 50, TOPK_MAX - 1, TOPK_MAX, TOPK_MAX + 1], STREAMS).astype(np.int64),
    }
    if easy:  # the defaults: every row fits the candidates unless its values tie
        feeds["top_k"][:], feeds["filter_k"][:], feeds["cfg_scale"][:] = 50, 50, 2.0
    if rng.random() < 0.2:
        feeds["uniform"][0] = 1.0  # clamped below 1 by both
    return feeds


def test_one_topk_sampler_picks_what_guide_then_sample_picks(both):
    vocab, session = both
    rng = np.random.default_rng(0)
    branches = []
    for trial in range(240):
        feeds = _feeds(rng, vocab, ties=trial % 2 == 1, easy=trial % 4 == 0)
        fast, reference, whole = session.run(None, feeds)
        np.testing.assert_array_equal(fast, reference, err_msg=f"trial {trial}: {feeds}")
        branches.append(bool(whole))
    # both branches ran, and the defaults without ties take the candidates
    assert 0 < sum(branches) < len(branches)
    assert all(branches[trial] for trial in range(0, 240, 8))  # easy and tie-free


def test_rows_without_filter_and_greedy_padding_keep_the_fast_branch(both):
    """The engine pads a batch with greedy, unguided rows of zero logits (all tied): they must not
    send the whole batch to the full sort."""
    vocab, session = both
    rng = np.random.default_rng(1)
    feeds = _feeds(rng, vocab, ties=False, easy=True)
    feeds["logits"][4:] = 0.0  # stream 2: the padding row
    feeds["temperature"][2], feeds["top_k"][2], feeds["cfg_scale"][2], feeds["filter_k"][2] = 0.0, 1, 1.0, 0
    fast, reference, whole = session.run(None, feeds)
    np.testing.assert_array_equal(fast, reference)
    assert whole and fast[2] == 0  # the lowest id of the all-equal row
