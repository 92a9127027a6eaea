"""The batch engine on the committed fixture: streams stepped together each give their solo output.

Sessions opened from many threads on a runtime of ``max_streams`` > 1 share one graph call per
graph per frame; each must speak exactly what it speaks alone (tokens, word times, frames),
greedy and seeded, with text arriving late, with voices, whoever joins or leaves the batch.
"""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest

from dia2_trt.runtime import Dia2Runtime, GenerationParams

from .batch_runs import GREEDY, SCRIPTS, Plan, differences, run_together, solo
from .conftest import DATA, FIXTURE


@pytest.fixture(scope="module")
def alone() -> Dia2Runtime:
    return Dia2Runtime.load(FIXTURE, threads=1, max_streams=1)


@pytest.fixture(scope="module")
def batched() -> Dia2Runtime:
    return Dia2Runtime.load(FIXTURE, threads=1, max_streams=4)


def test_the_fixture_is_batch_capable(batched, alone):
    assert batched.manifest.max_streams >= 4 and batched.engine is not None and alone.engine is None


def test_streams_started_at_different_frames_each_give_their_solo_tokens(batched, alone):
    plans = [Plan(SCRIPTS[0], GREEDY, 0), Plan(SCRIPTS[1], GenerationParams(seed=7), 3),
             Plan(SCRIPTS[2], GenerationParams(seed=1, cfg_scale=1.0), 9, word_by_word=True),
             Plan(SCRIPTS[3], GenerationParams(seed=5, audio_top_k=3, text_temperature=0.5), 14)]
    results = run_together(batched, plans)
    for plan, result in zip(plans, results):
        assert differences(result, solo(alone, plan)) == [], plan
    stats = batched.engine.stats()
    assert stats.streams_stepped > stats.frames  # frames really were shared


def test_more_sessions_than_slots_wait_for_one(batched, alone):
    plans = [Plan(SCRIPTS[i % 4], GenerationParams(seed=i)) for i in range(6)]
    results = run_together(batched, plans)
    for plan, result in zip(plans, results):
        assert differences(result, solo(alone, plan)) == []
    assert batched.engine.stats().busy == 0


def test_voices_and_warm_states_mixed_in(batched, alone):
    voice = alone.voice(DATA / "voices" / "s1_24k_mono.flac", DATA / "voices" / "s1_24k_mono.words.json", 1)
    plans = [Plan(SCRIPTS[0], GenerationParams(seed=2), 0, prefix_kind="voice"),
             Plan(SCRIPTS[1], GREEDY, 2),
             Plan(SCRIPTS[2], GenerationParams(seed=3), 5, prefix_kind="warm"),
             Plan(SCRIPTS[3], GREEDY, 7, prefix_kind="voice")]
    results = run_together(batched, plans, voice)
    for plan, result in zip(plans, results):
        assert differences(result, solo(alone, plan, voice)) == [], plan


def test_a_cancelled_stream_frees_its_slot_and_the_others_go_on(batched, alone):
    long = Plan(SCRIPTS[1] * 2, GenerationParams(seed=9))
    session = batched.open_session(long.params)
    session.feed(long.script)  # input left open
    done = threading.Event()
    results = {}

    def other():
        results["b"] = batched.speak(SCRIPTS[0], GREEDY)
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    next(iter(session), None)
    session.cancel()
    assert list(session) == [] and session.cancelled and not session.done
    thread.join(120)
    assert done.is_set()
    np.testing.assert_array_equal(results["b"].tokens, alone.speak(SCRIPTS[0], GREEDY).tokens)
    assert batched.engine.stats().busy == 0


def test_a_session_waiting_for_text_does_not_stall_the_batch(batched, alone):
    waiting = batched.open_session(GREEDY)
    waiting.feed("[S1] Hello there, how")  # the model soon wants words it does not have yet
    for _ in waiting:
        pass
    result = batched.speak(SCRIPTS[2], GREEDY)  # runs to its end while the other idles in its slot
    np.testing.assert_array_equal(result.tokens, alone.speak(SCRIPTS[2], GREEDY).tokens)
    waiting.feed(" are you?")
    waiting.close()
    while not waiting.done:
        for _ in waiting:
            pass
    assert waiting.result is not None
    np.testing.assert_array_equal(waiting.result.tokens,
                                  alone.speak("[S1] Hello there, how are you?", GREEDY).tokens)


def test_sessions_dropped_unfinished_give_their_slots_back(alone):
    """A caller that drops a session without closing or cancelling it (a seated one waiting for
    text, and one still in line) frees its slot once the session is collected: the engine holds
    sessions weakly, so every slot serves new sessions again and their tokens are their solo ones."""
    runtime = Dia2Runtime.load(FIXTURE, threads=1, max_streams=2)
    dropped = [runtime.open_session(GREEDY) for _ in range(3)]  # two seated, one in line
    for session in dropped:
        session.feed("[S1] Hello there, how")  # never closed: the seated ones park for more text
    for seated in dropped[:2]:  # each runs until it waits for text (the engine holds none mid-frame)
        for _ in seated:
            pass
    assert runtime.engine.stats().busy == 2 and runtime.engine.stats().waiting == 1
    del dropped, session, seated
    gc.collect()  # a session and its loop form a cycle: the cycle collector finalizes them
    deadline = time.monotonic() + 30
    while runtime.engine.stats().busy and time.monotonic() < deadline:  # freed at the engine's next frame
        time.sleep(0.01)
    assert runtime.engine.stats().busy == 0 and runtime.engine.stats().waiting == 0
    results = [runtime.speak(SCRIPTS[i], GREEDY) for i in (2, 0)]
    for i, result in zip((2, 0), results):
        np.testing.assert_array_equal(result.tokens, alone.speak(SCRIPTS[i], GREEDY).tokens)
    stats = runtime.engine.stats()
    assert stats.busy == 0 and stats.waiting == 0
    runtime.close()


def test_max_streams_is_checked(tmp_path):
    with pytest.raises(ValueError, match="positive integer"):
        Dia2Runtime.load(FIXTURE, max_streams=0)
    from dia2_trt.runtime import ArtifactError

    with pytest.raises(ArtifactError, match="--max-streams 65"):
        Dia2Runtime.load(FIXTURE, max_streams=65)
