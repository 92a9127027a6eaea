"""Sessions own their state: concurrent sessions on one runtime, cancel, the backend seam, API checks.

Runs on the committed tiny fixture with the base install only (no torch).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from dia2_trt.runtime import (
    ArtifactError,
    AudioChunk,
    Dia2Runtime,
    GenerationParams,
    ScriptError,
    Session,
    SpeakResult,
    TruncationWarning,
)
from dia2_trt.runtime.backends import OrtBackend
from dia2_trt.runtime.frames import StopRule

from .conftest import FIXTURE

SCRIPTS = [
    "[S1] Hello there, how are you? [S2] I'm fine, thanks.",
    '[S1] Good morning. <break time="0.5s"/> [S2] Good night, my friend! [S1] See you tomorrow.',
    "[S2] Oh no!",
]
GREEDY = GenerationParams(text_temperature=0.0, audio_temperature=0.0)
SAMPLED = [GenerationParams(seed=seed) for seed in (1, 2, 3)]


@pytest.fixture(scope="module")
def runtime():
    return Dia2Runtime.load(FIXTURE, threads=1)


@pytest.fixture(scope="module")
def solo(runtime):
    """solo(script index, params) -> the SpeakResult of that utterance run alone, memoised."""
    cache = {}

    def get(script: int, params: GenerationParams) -> SpeakResult:
        key = script, params
        if key not in cache:
            cache[key] = runtime.speak(SCRIPTS[script], params)
        return cache[key]

    return get


def assert_same(result: SpeakResult, expected: SpeakResult) -> None:
    np.testing.assert_array_equal(result.tokens, expected.tokens)
    np.testing.assert_array_equal(result.pcm, expected.pcm)
    assert result.timestamps == expected.timestamps
    assert result.frames == expected.frames


# --- sessions in parallel -----------------------------------------------------------


def _speak_in_threads(runtime, jobs: list[tuple[int, GenerationParams]]):
    """Each job's speak() in its own thread, started together; returns their results."""
    barrier = threading.Barrier(len(jobs))
    results, errors = [None] * len(jobs), []

    def work(i: int) -> None:
        script, params = jobs[i]
        try:
            barrier.wait()
            results[i] = runtime.speak(SCRIPTS[script], params)
        except BaseException as exc:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("trial", range(3))
@pytest.mark.parametrize("kind", ["greedy", "sampled"])
def test_two_threads_get_their_solo_outputs(runtime, solo, kind, trial):
    if kind == "greedy":
        jobs = [(trial % 3, GREEDY), ((trial + 1) % 3, GREEDY)]
    else:  # the same script with different seeds, and different scripts
        jobs = [(trial % 2, SAMPLED[trial]), (trial % 2 if trial < 2 else 2, SAMPLED[(trial + 1) % 3])]
    results = _speak_in_threads(runtime, jobs)
    for (script, params), result in zip(jobs, results):
        assert_same(result, solo(script, params))


def test_threads_really_overlap(runtime, solo):
    """The parallel test above means something only if both loops run at the same time."""
    events, lock = [], threading.Lock()

    def record(name):
        def progress(p):
            with lock:
                events.append(name)
        return progress

    sessions = [runtime.stream(SCRIPTS[1], GREEDY, progress=record(i)) for i in range(2)]
    threads = [threading.Thread(target=lambda s=s: list(s)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    switches = sum(a != b for a, b in zip(events, events[1:]))
    assert switches >= 2, "the two sessions ran one after the other"
    for s in sessions:
        assert_same(s.result, solo(1, GREEDY))


def test_interleaved_sessions_keep_their_own_state(runtime, solo):
    """Two sessions stepped alternately from one thread (an older one is no longer superseded)."""
    a = runtime.open_session(GREEDY)
    b = runtime.open_session(SAMPLED[0])
    a.feed(SCRIPTS[0])
    b.feed(SCRIPTS[2])
    a.close()
    b.close()
    ia, ib = iter(a), iter(b)
    chunks = {id(a): [], id(b): []}
    while not (a.done and b.done):
        for session, it in ((a, ia), (b, ib)):
            chunk = next(it, None)
            if chunk is not None:
                chunks[id(session)].append(chunk)
    assert_same(a.result, solo(0, GREEDY))
    assert_same(b.result, solo(2, SAMPLED[0]))
    np.testing.assert_array_equal(np.concatenate([c.pcm for c in chunks[id(a)]]), a.result.pcm)


class _SerialBackend:
    """ONNX Runtime graphs declared non-concurrent; counts how many runs overlap per graph."""

    name = "serial"

    def __init__(self) -> None:
        self.inner, self.active, self.peak, self.lock = OrtBackend(threads=1), {}, {}, threading.Lock()

    def load(self, spec):
        graph = self.inner.load(spec)
        backend = self

        class Serial:
            concurrent = False

            def __init__(self):
                self.spec = spec

            def binding(self):
                inner = graph.binding()
                inner_run = inner.run

                def run(feeds):
                    with backend.lock:
                        backend.active[spec.name] = backend.active.get(spec.name, 0) + 1
                        backend.peak[spec.name] = max(backend.peak.get(spec.name, 0), backend.active[spec.name])
                    try:
                        return inner_run(feeds)
                    finally:
                        with backend.lock:
                            backend.active[spec.name] -= 1

                inner.run = run
                return inner

        return Serial()


def test_backend_without_concurrency_makes_sessions_take_turns(solo):
    backend = _SerialBackend()
    runtime = Dia2Runtime.load(FIXTURE, backend=backend)
    results = _speak_in_threads(runtime, [(0, GREEDY), (1, SAMPLED[1]), (2, GREEDY)])
    for (script, params), result in zip([(0, GREEDY), (1, SAMPLED[1]), (2, GREEDY)], results):
        assert_same(result, solo(script, params))
    assert backend.peak["backbone"] == backend.peak["depformer"] == backend.peak["codec_decoder"] == 1


# --- the backend seam -------------------------------------------------------------


class _RecordingBackend:
    """Loads through ONNX Runtime and records every graph loaded and every run per graph."""

    name = "recording"

    def __init__(self) -> None:
        self.inner, self.loaded, self.runs = OrtBackend(threads=1), [], {}

    def load(self, spec):
        self.loaded.append(spec.name)
        graph = self.inner.load(spec)
        recorder = self

        class Recorded:
            concurrent = True

            def __init__(self):
                self.spec = spec

            def binding(self):
                inner = graph.binding()
                inner_run = inner.run

                def run(feeds):
                    recorder.runs[spec.name] = recorder.runs.get(spec.name, 0) + 1
                    return inner_run(feeds)

                inner.run = run
                return inner

        return Recorded()


def test_every_graph_goes_through_the_backend(solo):
    backend = _RecordingBackend()
    runtime = Dia2Runtime.load(FIXTURE, backend=backend)
    # the encoder loads on first use: a runtime speaking without audio prompts never holds it
    assert sorted(backend.loaded) == ["backbone", "codec_decoder", "depformer"]
    result = runtime.speak(SCRIPTS[0], GREEDY)
    assert_same(result, solo(0, GREEDY))
    assert backend.runs["backbone"] == backend.runs["depformer"] == result.frames
    assert backend.runs["codec_decoder"] == result.tokens.shape[1]  # one codec run per aligned frame
    codes = runtime.encode(result.pcm)
    assert "codec_encoder" in backend.loaded and backend.runs["codec_encoder"] == 1
    assert codes.shape == (runtime.manifest.audio_channels, result.tokens.shape[1])


# --- cancel -------------------------------------------------------------------------


def test_cancel_mid_stream_frees_the_state(runtime, solo):
    session = runtime.stream(SCRIPTS[1], GREEDY)
    idle = len(runtime.states)
    first = next(iter(session))
    assert isinstance(first, AudioChunk)
    session.cancel()
    assert list(session) == [] and session.cancelled and not session.done and session.result is None
    assert len(runtime.states) == idle + 1  # back in the pool for the next session
    with pytest.raises(RuntimeError, match="cancelled"):
        session.feed("[S1] more ")
    assert_same(runtime.speak(SCRIPTS[1], GREEDY), solo(1, GREEDY))  # the reused state starts clean


def test_cancel_from_another_thread_stops_at_the_next_frame(runtime, solo):
    idle = len(runtime.states)
    frames = []

    def progress(p):
        frames.append(p.frame)
        if p.frame == 10:  # mid-frame, as a server's disconnect handler would, from its own thread
            canceller = threading.Thread(target=session.cancel)
            canceller.start()
            canceller.join()

    session = runtime.stream(SCRIPTS[1], GREEDY, progress=progress)
    list(session)
    assert frames[-1] == 10 and session.cancelled and session.result is None
    assert len(runtime.states) == max(idle, 1)  # its state is back in the pool
    assert_same(runtime.speak(SCRIPTS[1], GREEDY), solo(1, GREEDY))


def test_cancel_before_running(runtime):
    idle = len(runtime.states)
    session = runtime.open_session(GREEDY)
    assert len(runtime.states) == max(idle - 1, 0)
    session.cancel()
    session.cancel()  # twice is harmless
    assert len(runtime.states) == max(idle - 1, 0) + 1
    assert list(session) == []


# --- feed and argument checks -----------------------------------------------------------


def test_rejected_feed_keeps_nothing(runtime, solo):
    session = runtime.open_session(GREEDY)
    with pytest.raises(ScriptError, match="unknown tag"):
        session.feed("[S1] Hello <laugh> there ")
    session.feed(SCRIPTS[0])
    session.close()
    list(session)
    assert_same(session.result, solo(0, GREEDY))


def test_a_script_of_tags_alone_is_refused_at_close(runtime):
    """The API refuses what the CLIs refuse: nothing to say would still speak the lead-in."""
    for script in ("[S1]", '[S2] <break time="1s"/>'):
        with pytest.raises(ScriptError, match="no words"):
            runtime.speak(script, GREEDY)


@pytest.mark.parametrize("call,error,message", [
    (lambda rt: rt.speak(None), TypeError, "text must be a str, got NoneType"),
    (lambda rt: rt.speak(b"[S1] hi"), TypeError, "got bytes"),
    (lambda rt: rt.stream(42), TypeError, "got int"),
    (lambda rt: rt.speak("[S1] hi", {"seed": 1}), TypeError, "params must be GenerationParams"),
    (lambda rt: rt.speak("[S1] hi", GREEDY, progress="bar"), TypeError, "progress must be callable"),
    (lambda rt: rt.open_session().feed(None), TypeError, "text must be a str"),
])
def test_wrong_types_raise_at_the_call(runtime, call, error, message):
    with pytest.raises(error, match=message):
        call(runtime)


@pytest.mark.parametrize("kwargs,error,message", [
    ({"cfg_scale": "2"}, TypeError, "cfg scale must be a number, got str"),
    ({"text_temperature": None}, TypeError, "text temperature must be a number"),
    ({"seed": True}, TypeError, "seed must be an integer, got bool"),
    ({"audio_top_k": 5.0}, TypeError, "audio top k must be an integer, got float"),
    ({"text_temperature": float("nan")}, ValueError, "text temperature must be finite"),
    ({"audio_temperature": float("inf")}, ValueError, "audio temperature must be finite"),
    ({"cfg_scale": float("nan")}, ValueError, "cfg scale must be finite"),
    ({"cfg_scale": 0.0}, ValueError, "cfg scale must be positive"),
    ({"text_temperature": -0.1}, ValueError, "text temperature must be >= 0"),
    ({"seed": -1}, ValueError, "seed must be >= 0"),
    ({"seed": 2**63}, ValueError, "seed must be at most 2\\*\\*63 - 1"),
    ({"text_top_k": 2**63}, ValueError, "text top k must be at most"),
    ({"cfg_filter_k": -1}, ValueError, "cfg filter k must be >= 0"),
    ({"initial_padding": -2}, ValueError, "initial padding must be >= 0"),
])
def test_params_are_checked_when_made(kwargs, error, message):
    with pytest.raises(error, match=message):
        GenerationParams(**kwargs)


def test_params_accept_numpy_numbers_and_the_int64_edge():
    p = GenerationParams(text_top_k=2**63 - 1, seed=np.int64(2**63 - 1), cfg_scale=np.float32(1.5), text_temperature=1)
    assert p.text_top_k == 2**63 - 1 and type(p.seed) is int and p.seed == 2**63 - 1
    assert type(p.cfg_scale) is float and p.cfg_scale == 1.5 and type(p.text_temperature) is float


def test_huge_top_k_runs(runtime):
    result = runtime.speak(SCRIPTS[2], GenerationParams(text_top_k=2**63 - 1, audio_top_k=2**63 - 1, seed=4))
    assert result.frames > 0 and not result.truncated


# --- the front door -----------------------------------------------------------------


def test_public_names():
    import dia2_trt.runtime as rt

    for name in ("Dia2Runtime", "GenerationParams", "AudioChunk", "SpeakResult", "Session", "Progress",
                 "ArtifactError", "ScriptError", "TruncationWarning"):
        assert name in rt.__all__ and getattr(rt, name) is not None
    assert sorted(rt.__all__) == sorted(rt._EXPORTS)  # the spelled-out list and the lazy map agree
    assert issubclass(TruncationWarning, UserWarning) and issubclass(ArtifactError, ValueError)
    assert Session.__module__ == "dia2_trt.runtime.session"
    with pytest.raises(AttributeError):
        rt.NoSuchName  # noqa: B018


def test_chunks_carry_their_sample_rate(runtime):
    chunks = [c for c in runtime.stream(SCRIPTS[2], GREEDY) if c.pcm.size]
    assert chunks and all(c.sample_rate == runtime.sample_rate for c in chunks)
    assert chunks[0].seconds == chunks[0].pcm.size / runtime.sample_rate


def test_speak_never_loads_the_benchmark(tmp_path):
    """dia2-rt speak, in a fresh interpreter: neither the benchmark harness nor torch/matplotlib load."""
    out = tmp_path / "a.wav"
    code = textwrap.dedent(f"""
        import sys
        from dia2_trt.runtime.cli import main
        main(["speak", "[S1] Hello there.", "--artifacts", {str(FIXTURE)!r}, "--out", {str(out)!r},
              "--quiet", "--threads", "1"], standalone_mode=False)
        banned = [m for m in sys.modules if m.startswith("dia2_trt.benchmarks")
                  or m.split(".")[0] in ("torch", "matplotlib", "psutil")]
        assert not banned, banned
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    assert out.stat().st_size > 0


def test_bench_is_listed_and_loads_on_demand():
    from click.testing import CliRunner

    from dia2_trt.runtime.cli import main

    listing = CliRunner().invoke(main, ["--help"])
    assert listing.exit_code == 0 and "bench" in listing.output and "speak" in listing.output
    help_text = CliRunner().invoke(main, ["bench", "--help"])
    assert help_text.exit_code == 0 and "--artifacts" in help_text.output


# --- the stopping rule ------------------------------------------------------------------


def test_stop_rule_is_a_pure_value():
    rule = StopRule.start(capacity=20, delays=[0, 2, 3], max_padding=6, initial_padding=2, new_word=3)
    assert rule.flush_tail == 9 and not rule.stops_before(0) and rule.stops_before(19)
    after = rule.after(0, main=5, end_step=None)
    assert rule.last_step == -1 and rule.columns == 1  # unchanged
    assert after.last_step == 0 and after.columns == 2 and after.first_word_frame is None and after.truncated
    worded = after.after(4, main=3, end_step=None).after(5, main=3, end_step=None)
    assert worded.first_word_frame == 2 and worded.crop == 2  # the first new word only, less the lead-in
    ended = worded.after(6, main=1, end_step=6)
    assert ended.eos_cutoff == 15 and ended.after(7, 1, 7).eos_cutoff == 15  # the first end mark counts
    assert not ended.stops_before(14) and ended.stops_before(15)
    full = ended
    for t in range(7, 15):
        full = full.after(t, 1, 6)
    assert not full.truncated and full.columns == 16
    assert StopRule.start(5, [0], 0, 0, 3).after(3, 1, None).columns == 5  # never past the buffer


def test_truncation_still_warns(runtime, monkeypatch):
    monkeypatch.setattr(runtime, "frames_needed", lambda entries, params: 0)
    with pytest.warns(TruncationWarning):
        result = runtime.speak("[S1] " + "hello there friend " * 40, GREEDY)
    assert result.truncated and result.frames == runtime.manifest.max_context_steps
