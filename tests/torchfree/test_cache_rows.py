"""The backbone's K/V cache grows in ROW_STEP rows as it is written, and a step reads only those."""

from __future__ import annotations

import numpy as np
import pytest

from dia2_trt.runtime import Dia2Runtime
from dia2_trt.runtime.backends import OrtBinding
from dia2_trt.runtime.params import GenerationParams
from dia2_trt.runtime.step import KVCache

from .conftest import FIXTURE, edit_manifest

GREEDY = dict(text_temperature=0.0, audio_temperature=0.0)


def _fill(cache: KVCache, rows: range, seed: int) -> dict:
    """Write random values at ``rows`` of every layer view; returns what was written, by (kind, layer)."""
    rng, written = np.random.default_rng(seed), {}
    for kind in ("k", "v"):
        for i in range(2):
            view = cache.layer(kind, i)
            values = rng.standard_normal((*view.shape[:2], len(rows), view.shape[3])).astype(np.float32)
            view[:, :, rows.start:rows.stop] = values
            written[kind, i] = values
    return written


def test_growing_keeps_every_row_and_zeroes_the_new_ones():
    cache = KVCache(2, (2, 3, 200, 4), np.dtype(np.float32), grows=True)
    assert cache.rows == KVCache.ROW_STEP and cache.layer("k", 1).shape == (2, 3, KVCache.ROW_STEP, 4)
    first = _fill(cache, range(0, 50), seed=0)
    assert cache.make_room(50) is False  # fits: nothing moves
    assert cache.make_room(65) is True and cache.rows == 2 * KVCache.ROW_STEP
    second = _fill(cache, range(50, 65), seed=1)
    assert cache.make_room(200) is True and cache.rows == 200  # the capacity caps the last step
    for (kind, i), values in first.items():
        view = cache.layer(kind, i)
        assert view.shape == (2, 3, 200, 4)
        np.testing.assert_array_equal(view[:, :, :50], values)
        np.testing.assert_array_equal(view[:, :, 50:65], second[kind, i])
        assert not view[:, :, 65:].any()
    with pytest.raises(IndexError, match="past the capacity 200"):
        cache.make_room(201)
    # a new utterance: back to the first rows (what they hold is masked until written)
    assert cache.restart() is True and cache.layer("k", 0).shape == (2, 3, KVCache.ROW_STEP, 4)
    assert cache.restart() is False


def test_a_fixed_size_binding_gets_the_whole_capacity():
    cache = KVCache(1, (2, 1, 100, 4), np.dtype(np.float32), grows=False)
    assert cache.rows == 100 and cache.make_room(100) is False


def test_tokens_are_the_same_whether_the_cache_grows_or_not(monkeypatch):
    """The growing cache (ORT) and a capacity-sized one (as TensorRT binds it) speak the same tokens,
    greedy and sampled, and the growing one reads only the rows it has grown to."""
    script = "[S1] Hello there, how are you? [S2] I am fine, thanks."
    monkeypatch.setattr(KVCache, "ROW_STEP", 8)  # the fixture's utterances are short: grow often
    grown = Dia2Runtime.load(FIXTURE, threads=1, max_streams=1)
    capacity = grown.manifest.cache_capacity
    results = [grown.speak(script, GenerationParams(seed=4, **kw)) for kw in (GREEDY, {})]
    (stepper,) = grown.solo._free
    assert 8 < stepper.cache.rows < capacity and stepper.cache.rows % 8 == 0
    grown.speak("[S1] Hi.", GenerationParams(seed=4, **GREEDY))  # the same stepper, restarted and grown less
    assert stepper.cache.rows < capacity
    assert stepper.backbone.spec.dims["cache_rows"] == capacity
    monkeypatch.setattr(OrtBinding, "resizable", False)
    fixed = Dia2Runtime.load(FIXTURE, threads=1, max_streams=1)
    for kw, result in zip((GREEDY, {}), results):
        again = fixed.speak(script, GenerationParams(seed=4, **kw))
        assert np.array_equal(again.tokens, result.tokens)
    assert fixed.solo._free[0].cache.rows == capacity


def test_a_backbone_without_a_row_bound_is_refused(artifact_copy):
    from dia2_trt.runtime.artifacts import ArtifactError, load_manifest

    edit_manifest(artifact_copy, lambda raw: raw["graphs"]["backbone"].pop("dims"))
    with pytest.raises(ArtifactError, match="cache_rows"):
        load_manifest(artifact_copy, verify=False)
