"""Many sessions on one batched runtime, each against its solo run (used by both test tiers).

A ``Plan`` is one stream: its script, parameters, prefix, how its text arrives (all at once or
word by word) and the engine frame it starts at. ``run_together`` starts every plan's session
from its own thread on one runtime, at its frame, and returns each result; ``solo`` runs a plan
alone on a runtime of one stream, the reference every batched result must equal token for token
and sample for sample.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from dia2_trt.runtime import Dia2Runtime, GenerationParams, SpeakResult

GREEDY = GenerationParams(text_temperature=0.0, audio_temperature=0.0)
# Different scripts for the streams of a batch (one per slot of an 8-slot runtime).
SCRIPTS = [
    "[S1] Hello there, how are you? [S2] I am fine, thanks.",
    "[S2] Just one speaker, talking a while about nothing in particular.",
    "[S1] Wait. [S2] Okay!",
    "[S1] The quick brown fox jumps over the lazy dog. [S2] Again?",
    "[S1] Would you like to hear a story? [S2] Yes, please tell me one.",
    "[S2] Good morning. [S1] Good evening, my friend.",
    "[S1] Speak slowly, please. [S2] One, two, three.",
    "[S1] It was a bright cold day in April.",
]


@dataclass
class Plan:
    script: str
    params: GenerationParams = field(default_factory=GenerationParams)
    start_frame: int = 0  # the engine frame after which the session opens
    word_by_word: bool = False  # feed one word at a time, pausing between words
    prefix: object = None  # a Prefix or WarmState of the runtime it runs on (see ``prefix_for``)
    prefix_kind: str = ""  # "voice" or "warm": made on each runtime by ``prefix_for``


def prefix_for(runtime: Dia2Runtime, plan: Plan, voice):
    if not plan.prefix_kind:
        return None
    prefix = runtime.prefix(voice)
    return runtime.warm(prefix) if plan.prefix_kind == "warm" else prefix


def speak(runtime: Dia2Runtime, plan: Plan, voice=None) -> SpeakResult:
    prefix = prefix_for(runtime, plan, voice)
    session = runtime.open_session(plan.params, prefix=prefix)
    if not plan.word_by_word:
        session.feed(plan.script)
    else:
        for word in plan.script.split():
            session.feed(word + " ")
            for _ in session:  # what the words so far allow, then it waits for more
                pass
            time.sleep(0.002)  # others run meanwhile; this stream idles in its slot
    session.close()
    while not session.done:
        for _ in session:
            pass
    assert session.result is not None
    return session.result


def solo(runtime: Dia2Runtime, plan: Plan, voice=None) -> SpeakResult:
    return speak(runtime, plan, voice)


def run_together(runtime: Dia2Runtime, plans: list[Plan], voice=None, timeout: float = 600.0) -> list[SpeakResult]:
    """Every plan's session from a thread of its own on ``runtime``, each opening at its frame."""
    assert runtime.engine is not None, "a batched runtime (max_streams > 1)"
    results: list[SpeakResult | BaseException | None] = [None] * len(plans)

    def run(i: int, plan: Plan) -> None:
        try:
            deadline = time.monotonic() + timeout
            while runtime.engine.stats().frames < plan.start_frame and time.monotonic() < deadline:
                time.sleep(0.001)
            results[i] = speak(runtime, plan, voice)
        except BaseException as exc:  # reported by the caller
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, plan)) for i, plan in enumerate(plans)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    assert all(isinstance(r, SpeakResult) for r in results)
    return results  # type: ignore[return-value]


def differences(batched: SpeakResult, alone: SpeakResult) -> list[str]:
    """What differs between a batched stream's result and its solo run (tokens, words, frames, audio)."""
    out = []
    if batched.tokens.shape != alone.tokens.shape or (batched.tokens != alone.tokens).any():
        out.append(f"tokens {batched.tokens.shape} vs {alone.tokens.shape}")
    if batched.timestamps != alone.timestamps:
        out.append("timestamps")
    if batched.frames != alone.frames:
        out.append(f"frames {batched.frames} vs {alone.frames}")
    if not np.array_equal(batched.pcm, alone.pcm):  # the codec's rows are exact too, batched or not
        out.append("pcm")
    return out
