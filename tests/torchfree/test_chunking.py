"""Chunking: a session groups its frames into chunks of the sizes asked, and nothing else changes."""

from __future__ import annotations

import numpy as np
import pytest

from dia2_trt.runtime import Chunking, Dia2Runtime
from dia2_trt.runtime.params import GenerationParams

from .conftest import FIXTURE

SCRIPT = "[S1] Hello there, how are you? [S2] I am fine, thanks."


@pytest.fixture(scope="module", params=[1, 3], ids=["solo", "batched"])
def runtime(request) -> Dia2Runtime:
    return Dia2Runtime.load(FIXTURE, threads=1, max_streams=request.param)


def _chunks(runtime, chunking=None):
    session = runtime.stream(SCRIPT, GenerationParams(seed=4), chunking=chunking)
    return list(session), session.result


@pytest.mark.parametrize(("first", "frames"), [(5, 3), (1, 4), (250, 1)])
def test_chunks_hold_the_frames_asked_and_the_same_audio_and_words(runtime, first, frames):
    plain, expected = _chunks(runtime)
    grouped, result = _chunks(runtime, Chunking(first, frames))
    per_frame = runtime.manifest.samples_per_frame
    assert all(c.pcm.size in (0, per_frame) for c in plain)  # one frame each by default
    sizes = [c.pcm.size // per_frame for c in grouped if c.pcm.size]
    total = expected.pcm.size // per_frame
    later = sizes[1:] or [frames]  # one chunk: the first holds it all
    assert sizes[0] == min(first, total) and all(n == frames for n in later[:-1]) and 1 <= later[-1] <= frames
    assert sum(sizes) == total
    assert np.concatenate([c.pcm for c in grouped]).tobytes() == expected.pcm.tobytes()
    assert [w for c in grouped for w in c.words] == [w for c in plain for w in c.words] == expected.timestamps
    assert np.array_equal(result.tokens, expected.tokens) and result.pcm.tobytes() == expected.pcm.tobytes()


def test_a_session_fed_word_by_word_keeps_its_chunk_sizes(runtime):
    """Waiting for text flushes nothing early: chunks still fill up (the last one excepted)."""
    session = runtime.open_session(GenerationParams(seed=4), chunking=Chunking(4, 4))
    chunks = []
    for word in SCRIPT.split():
        session.feed(word + " ")
        chunks += list(session)
    session.close()
    chunks += list(session)
    per_frame = runtime.manifest.samples_per_frame
    sizes = [c.pcm.size // per_frame for c in chunks if c.pcm.size]
    assert all(n == 4 for n in sizes[:-1]) and 1 <= sizes[-1] <= 4
    assert np.concatenate([c.pcm for c in chunks]).tobytes() == session.result.pcm.tobytes()


@pytest.mark.parametrize("bad", [0, 251, -1, 2.0, True, "3"])
def test_bad_chunk_sizes_are_refused_in_one_line(bad):
    with pytest.raises(ValueError, match=r"^first_frames must be an integer in 1\.\.250, got .*$"):
        Chunking(bad)


def test_open_session_takes_only_a_chunking(runtime):
    with pytest.raises(TypeError, match="chunking must be a Chunking"):
        runtime.open_session(GenerationParams(), chunking=4)
