"""A pooled generation state and stepper carry nothing from one session to the next, however the
first ended.

Each test runs a session A that ends badly on a runtime (NaN in its graph outputs, an exception
mid-frame, a cancel, a poisoned state), then a session B on the same runtime, and requires B's
tokens, timestamps and PCM bytes to be exactly those of B on a fresh runtime. The faults are
injected by wrapping one binding of the pooled stepper (its graphs, cache and codec state), as a
graph or device failure would show up. Before scrubbing on reset, B after a NaN-row session came
out different: a step masks the rows past its length with weight exactly 0, and 0 * NaN is NaN.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from dia2_trt.runtime import Dia2Runtime, GenerationParams, SpeakResult
from dia2_trt.runtime.backends import OrtBinding
from dia2_trt.runtime.session import Session
from dia2_trt.runtime.voice import load_voice, save_voice

from .conftest import DATA, FIXTURE

A_SCRIPT = "[S1] This first one runs long enough to write many cache rows, and then it fails. [S2] Ouch."
B_SCRIPT = "[S1] Hello there. [S2] Fine, thanks."
PARAMS = [GenerationParams(seed=3), GenerationParams(text_temperature=0.0, audio_temperature=0.0)]
FAULT_FRAME = 12
VOICES = DATA / "voices"


class Injected(RuntimeError):
    """The failure a test injects."""


class Faulty:
    """A binding that runs its graph, then at run ``at`` (and after) poisons its outputs with NaN
    (``nan``), poisons its carried state (``state``), or raises (``raise``)."""

    def __init__(self, inner, at: int, mode: str) -> None:
        self.inner, self.at, self.mode, self.runs = inner, at, mode, 0
        self.spec, self.resizable = inner.spec, inner.resizable
        self.bind, self.write_rows, self.reset_state = inner.bind, inner.write_rows, inner.reset_state
        self.set_dims = inner.set_dims

    def run(self, feeds):
        self.runs += 1
        if self.runs >= self.at and self.mode == "raise":
            raise Injected(f"injected failure at run {self.runs}")
        out = self.inner.run(feeds)
        if self.runs >= self.at:
            if self.mode == "nan":
                for value in out.values():
                    if value.dtype.kind == "f":
                        value.fill(np.nan)
            elif self.mode == "state":
                for name, _ in self.spec.state:
                    buffer = self.inner.state(name)
                    buffer.fill(np.nan if buffer.dtype.kind == "f" else 7)
        return out


def _fresh(script: str, params: GenerationParams, **prefix) -> SpeakResult:
    return Dia2Runtime.load(FIXTURE, threads=1).speak(script, params, **prefix)


def assert_same(result: SpeakResult, expected: SpeakResult) -> None:
    np.testing.assert_array_equal(result.tokens, expected.tokens)
    assert result.pcm.tobytes() == expected.pcm.tobytes()
    assert result.timestamps == expected.timestamps and result.frames == expected.frames


@pytest.fixture(params=[1, 4], ids=["own-stepper", "batched"])
def runtime(request) -> Dia2Runtime:
    """A runtime stepping each session on its own stepper, or every session in one batch."""
    return Dia2Runtime.load(FIXTURE, threads=1, max_streams=request.param)


def _idle(runtime: Dia2Runtime) -> bool:
    """Every session's state (and stepper, or batch slot) is back."""
    if runtime.engine is not None:
        return len(runtime.states) == 1 and runtime.engine.stats().busy == 0
    return len(runtime.states) == 1 and len(runtime.solo) == 1


def _binding(stepper, graph: str):
    return stepper.decoders[0] if graph == "codec_decoder" else getattr(stepper, graph)


def _set_binding(stepper, graph: str, binding) -> None:
    if graph == "codec_decoder":
        stepper.decoders[0] = binding
    else:
        setattr(stepper, graph, binding)


def _faulty_state(runtime: Dia2Runtime, graph: str, mode: str, at: int = FAULT_FRAME):
    """Put a stepper whose ``graph`` binding fails into the pool (the next session takes it); returns
    (stepper, undo) where undo() puts the real binding back."""
    stepper = _stepper(runtime)
    inner = _binding(stepper, graph)
    _set_binding(stepper, graph, Faulty(inner, at, mode))

    def undo():
        _set_binding(stepper, graph, inner)

    return stepper, undo


def _stepper(runtime: Dia2Runtime):
    """The stepper the next session runs on: the batch's (it takes slot 0), or the pooled one."""
    if runtime.engine is not None:
        return runtime.engine.stepper
    stepper = runtime.solo.take()
    runtime.solo.give_back(stepper)
    return stepper


def _has_nan(stepper) -> bool:
    return any(np.isnan(stepper.cache.layer(kind, i)).any() for kind in ("k", "v")
               for i in range(len(stepper.cache_names)))


@pytest.mark.parametrize("params", PARAMS, ids=["sampled", "greedy"])
def test_nan_rows_of_a_finished_session_do_not_reach_the_next(runtime, params):
    state, undo = _faulty_state(runtime, "backbone", "nan")
    try:  # NaN logits: the text sampler falls back to id 0 (as the reference does) and the loop goes on
        runtime.speak(A_SCRIPT, params)
    except RuntimeError as exc:  # until the depformer, reading NaN, makes a code the codec refuses
        assert "the model's outputs are not finite" in str(exc)
    undo()
    assert _has_nan(state), "the fault must leave NaN rows for this test to mean anything"
    b = runtime.speak(B_SCRIPT, params)
    assert _stepper(runtime) is state and _idle(runtime)  # B ran on A's stepper
    assert_same(b, _fresh(B_SCRIPT, params))


@pytest.mark.parametrize("graph", ["backbone", "depformer", "codec_decoder"])
def test_an_exception_mid_frame_leaves_nothing_behind(runtime, graph):
    """NaN rows first, then a graph raises mid-frame: the exception reaches the caller, the state
    goes back to the pool, and the next session does not see any of it."""
    params = PARAMS[0]
    state = _stepper(runtime)
    real = {name: _binding(state, name) for name in ("backbone", "depformer", "codec_decoder")}
    # The codec decodes frame k at step k + 2 (the largest delay is 3): NaN from step 2 on, its 2nd run raises.
    state.backbone = Faulty(real["backbone"], 3 if graph == "codec_decoder" else FAULT_FRAME - 3, "nan")
    if graph == "backbone":
        state.backbone = Faulty(state.backbone, FAULT_FRAME, "raise")
    elif graph == "depformer":
        state.depformer = Faulty(real["depformer"], FAULT_FRAME, "raise")
    else:
        state.decoders[0] = Faulty(real["codec_decoder"], 2, "raise")
    with pytest.raises(Injected):
        runtime.speak(A_SCRIPT, params)
    for name, binding in real.items():
        _set_binding(state, name, binding)
    assert _idle(runtime) and _has_nan(state)
    assert_same(runtime.speak(B_SCRIPT, params), _fresh(B_SCRIPT, params))


def test_poisoned_codec_state_does_not_reach_the_next_session(runtime):
    params = PARAMS[0]
    state, undo = _faulty_state(runtime, "codec_decoder", "state", at=3)
    runtime.speak(A_SCRIPT, params)
    undo()
    assert np.isnan(state.decoders[0].state(state.decoders[0].spec.state[0][0])).all()
    assert_same(runtime.speak(B_SCRIPT, params), _fresh(B_SCRIPT, params))


def test_a_session_cancelled_mid_way_leaves_nothing_behind(runtime):
    params = PARAMS[0]
    state, undo = _faulty_state(runtime, "backbone", "nan")
    seen = []

    def progress(p):
        seen.append(p.frame)
        if p.frame == FAULT_FRAME + 4:
            session.cancel()  # from the callback: mid-frame, the loop ends itself

    session = runtime.stream(A_SCRIPT, params, progress)
    chunks = list(session)
    undo()
    assert session.cancelled and not session.done and seen[-1] == FAULT_FRAME + 4 and chunks is not None
    assert _has_nan(state) and _idle(runtime)
    assert_same(runtime.speak(B_SCRIPT, params), _fresh(B_SCRIPT, params))


def test_a_session_cancelled_from_another_thread_leaves_nothing_behind(runtime):
    params = PARAMS[0]
    state, undo = _faulty_state(runtime, "backbone", "nan")
    session = runtime.open_session(params)
    session.feed(A_SCRIPT)  # input left open: the session waits for words after the script
    for _ in session:
        pass
    worker = threading.Thread(target=session.cancel)
    worker.start()
    worker.join()
    undo()
    assert session.cancelled and _has_nan(state) and _idle(runtime)
    assert_same(runtime.speak(B_SCRIPT, params), _fresh(B_SCRIPT, params))


def test_every_buffer_of_a_pooled_state_is_scrubbed(runtime):
    """Whatever a pooled state holds -- the whole cache storage, not only the rows in view, the
    codec's streaming state, the step buffers, the random generator -- the next session starts clean."""
    params = PARAMS[0]
    runtime.speak(A_SCRIPT, params)
    (state,), stepper = runtime.states._free, _stepper(runtime)
    for storage in stepper.cache._storage.values():
        storage.fill(np.nan)
    stepper.rows_written[0] = stepper.cache.capacity  # what a session that wrote every row leaves
    for name, _ in stepper.decoders[0].spec.state:
        buffer = stepper.decoders[0].state(name)
        buffer.fill(np.nan if buffer.dtype.kind == "f" else 99)
    state.tokens.fill(10**6)
    state.audio.fill(-7)
    state.noise.fill(np.nan)
    state.rng.random(1000)
    assert_same(runtime.speak(B_SCRIPT, params), _fresh(B_SCRIPT, params))


def test_a_fixed_size_cache_is_scrubbed_too(monkeypatch):
    """The capacity-sized cache (as TensorRT binds it) zeroes the rows a session wrote and binds again."""
    monkeypatch.setattr(OrtBinding, "resizable", False)
    runtime, params = Dia2Runtime.load(FIXTURE, threads=1, max_streams=1), PARAMS[0]
    state, undo = _faulty_state(runtime, "backbone", "nan")
    runtime.speak(A_SCRIPT, params)
    undo()
    assert state.cache.rows == runtime.manifest.cache_capacity and _has_nan(state)
    assert_same(runtime.speak(B_SCRIPT, params), _fresh(B_SCRIPT, params))


def test_a_failed_warm_state_session_leaves_nothing_behind(runtime, tmp_path):
    """With a restored warm state: A fails after its warm-up; B from the same warm state equals B
    on a fresh runtime from the same file."""
    voice = runtime.voice(VOICES / "s1_24k_mono.flac", VOICES / "s1_24k_mono.words.json", 1)
    save_voice(voice, tmp_path / "a.voice")
    warm = runtime.warm(runtime.prefix(load_voice(tmp_path / "a.voice")))
    warm.save(tmp_path / "a.warm")
    params = PARAMS[0]
    state, undo = _faulty_state(runtime, "backbone", "nan", at=3)
    state.depformer = Faulty(state.depformer, FAULT_FRAME, "raise")
    with pytest.raises(Injected):
        runtime.speak(A_SCRIPT, params, prefix=warm)
    undo()
    state.depformer = state.depformer.inner
    b = runtime.speak(B_SCRIPT, params, prefix=warm)
    fresh = Dia2Runtime.load(FIXTURE, threads=1)
    from dia2_trt.runtime.prefix import WarmState

    assert_same(b, fresh.speak(B_SCRIPT, params, prefix=WarmState.load(tmp_path / "a.warm", fresh)))


def test_a_session_that_fails_to_start_gives_its_state_back(runtime, monkeypatch):
    def broken(self):
        raise Injected("the prefix could not start")

    voice = runtime.voice(VOICES / "s1_24k_mono.flac", VOICES / "s1_24k_mono.words.json", 1)
    monkeypatch.setattr(Session, "_start_prefix", broken)
    with pytest.raises(Injected):
        runtime.speak(B_SCRIPT, PARAMS[0], prefix=runtime.prefix(voice))
    assert len(runtime.states) == 1


def test_a_state_given_back_twice_is_pooled_once(runtime):
    state = runtime.states.take()
    runtime.states.give_back(state)
    runtime.states.give_back(state)
    assert len(runtime.states) == 1
    first, second = runtime.states.take(), runtime.states.take()
    assert first is state and second is not state  # two sessions never share one state
