"""The depformer is skipped while every codebook is inside its delay: the output is exactly what a
run that computed those dead columns gives (tokens, word times, PCM bytes), seeded and greedy, with
and without an audio prefix; and the skipped calls are really skipped."""

from __future__ import annotations

import pytest

from dia2_trt.runtime import Dia2Runtime, GenerationParams
from dia2_trt.runtime import session as session_module

from conftest import FIXTURE

DATA = FIXTURE.parent

SCRIPT = "[S1] Hello there, how are you? [S2] I am fine, thanks."
PARAMS = [GenerationParams(seed=5), GenerationParams(text_temperature=0.0, audio_temperature=0.0)]


@pytest.fixture(scope="module")
def runtime(artifacts_factory) -> Dia2Runtime:
    """A checkpoint whose delays (4..6) leave the first three columns dead, as the real 16/18 leave 15
    (the batch engine's 16-codebook build: one export for both)."""
    return Dia2Runtime.load(artifacts_factory("codebooks16", 0, "fp32", prefix_frames=40), threads=1,
                            max_streams=1)


def _run(runtime, params, monkeypatch, skip: bool, prefix=None):
    """(result, depformer calls made) with the skip on, or off (every column computed, as before)."""
    original = session_module.Session.__init__
    calls = []

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if not skip:
            self._first_live = 0

    stepper_frame = runtime.solo.take()
    runtime.solo.give_back(stepper_frame)
    counted = stepper_frame.depformer_frame

    def depformer_frame(batch):
        calls.append(len(batch))
        return counted(batch)

    monkeypatch.setattr(session_module.Session, "__init__", init)
    monkeypatch.setattr(stepper_frame, "depformer_frame", depformer_frame)
    try:
        return runtime.speak(SCRIPT, params, prefix=prefix), len(calls)
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("params", PARAMS, ids=["seeded", "greedy"])
@pytest.mark.parametrize("with_prefix", [False, True], ids=["fresh", "prefix"])
def test_skipping_dead_columns_changes_nothing(runtime, params, with_prefix, monkeypatch):
    prefix = None
    if with_prefix:
        voice = runtime.voice(DATA / "voices" / "s1_24k_mono.flac", DATA / "voices" / "s1_24k_mono.words.json", 1)
        prefix = runtime.prefix(voice)
    skipped, skipped_calls = _run(runtime, params, monkeypatch, True, prefix)
    full, full_calls = _run(runtime, params, monkeypatch, False, prefix)
    assert (skipped.tokens == full.tokens).all() and skipped.timestamps == full.timestamps
    assert skipped.pcm.tobytes() == full.pcm.tobytes()
    dead = min(runtime.manifest.delays) - 1  # steps 0 .. min(delay) - 2 write a dead column
    start = prefix.plan.frames - 1 if prefix else 0
    assert full_calls - skipped_calls == max(dead - start, 0)
    if not with_prefix:
        assert skipped_calls < full_calls


def test_a_recorded_run_replays_with_its_dead_steps(runtime):
    """The calibration and accuracy recorder sees no depformer call for the dead steps: the trace
    still has every step's text tokens (the next step's tokens carry them) and marks where the
    recorded audio starts, and the artifacts' own replay reproduces every live step."""
    from dia2_trt.export.accuracy import accuracy_report
    from dia2_trt.export.replay import record

    artifacts = runtime.manifest.root
    (trace,) = record(artifacts, [SCRIPT], PARAMS[1])
    assert trace.first_live == min(runtime.manifest.delays) - 1
    assert len(trace.text_tokens) == len(trace.audio_tokens) == trace.steps
    assert (trace.audio_tokens[:trace.first_live] == -1).all() and (trace.audio_tokens[trace.first_live:] >= 0).all()
    report = accuracy_report(artifacts, artifacts, SCRIPT, echo=lambda line: None)
    assert report["reference_replay_agreement"] == 1.0 and report["passed"]
