"""``dia2-rt serve --max-streams 8``: one batch for every request, each answer its solo run.

The real command in a subprocess on a loopback port (benchmarks/serve_load.py's ServerProcess),
on the committed tiny fixture. Solo runs come from a runtime of this process loaded with
``max_streams=1`` (each session stepped alone), so an equal answer means sharing the batch
changed nothing. The slot tests hold slots with WebSocket streams that have sent part of
their script: a stream waiting for text keeps its slot, so "all slots busy" is a fact the
test makes, not a race it hopes to win. No timing assertions.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="needs the [serve] extra")
httpx = pytest.importorskip("httpx", reason="needs the [serve-test] extra")
pytest.importorskip("websockets", reason="needs the [serve-test] extra")

from dia2_trt.benchmarks import serve_load as load  # noqa: E402
from dia2_trt.runtime.audio import pcm16  # noqa: E402
from dia2_trt.runtime.serve.schema import GenerationFields  # noqa: E402

from serve_support import speech_body, wait_until, ws_speak  # noqa: E402

SLOTS, QUEUE = 8, 1
VOICES = Path(__file__).resolve().parent / "data" / "voices"
SCRIPTS = (
    "[S1] Hello there, how are you? [S2] I am fine, thanks.",
    '[S1] Wait for it. <break time="0.4s"/> Now. [S2] Okay!',
    "[S2] Just one speaker, talking quite a while about nothing in particular.",
    "[S1] Short one. [S2] Shorter.",
    "[S1] Numbers: one, two, three, four. [S2] Five, six.",
    "[S2] Is anybody there? [S1] Only me, as usual.",
    "[S1] The batch steps every stream at once. [S2] And none of them notice.",
    "[S1] Last of the eight.",
)
# (transport, extra request fields): greedy and sampled, one registered voice, different seeds.
REQUESTS = (
    ("http", {"seed": 1}),
    ("ws", {"seed": 2, "temperature": 0.7, "top_k": 30}),
    ("http", {"seed": 3, "voice": "anna"}),
    ("ws", {"temperature": 0}),
    ("http", {"seed": 5, "cfg_scale": 1.5}),
    ("ws", {"seed": 6}),
    ("http", {"temperature": 0}),
    ("ws", {"seed": 8, "top_k": 10}),
)


@pytest.fixture(scope="module")
def voice_file(runtime, tmp_path_factory) -> Path:
    from dia2_trt.runtime.voice import save_voice

    path = tmp_path_factory.mktemp("voices") / "anna.voice"
    save_voice(runtime.voice(VOICES / "s1_24k_mono.flac", VOICES / "s1_24k_mono.words.json", 1), path)
    return path


@pytest.fixture(scope="module")
def server(artifacts, voice_file):
    process = load.ServerProcess(artifacts, 0, QUEUE, "--voice", f"anna={voice_file}",
                                 max_streams=SLOTS).wait_ready()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def solo(artifacts):
    """Each session stepped alone in its caller's thread: the reference every answer must equal."""
    from dia2_trt.runtime import Dia2Runtime

    runtime = Dia2Runtime.load(artifacts, threads=1, max_streams=1)
    assert runtime.engine is None
    return runtime


def solo_run(solo, text: str, fields: dict, voice_file: Path):
    from dia2_trt.runtime.voice import load_voice

    params = GenerationFields.model_validate(fields).params()  # the server's own mapping of the fields
    prefix = solo.prefix(load_voice(voice_file)) if fields.get("voice") == "anna" else None
    return solo.speak(text, params, prefix=prefix)


def engine(server) -> dict[str, float]:
    figures = server.metrics()
    return {name: figures[f"dia2_engine_{name}"] for name in
            ("slots", "busy_slots", "waiting_sessions", "frames_total", "streams_stepped_total",
             "frame_seconds_total")}


async def _http(url: str, text: str, fields: dict) -> bytes:
    async with httpx.AsyncClient(timeout=120) as client:
        response = await client.post(f"{url}/v1/audio/speech", json=speech_body(text, **fields))
    assert response.status_code == 200, response.text
    return response.content


async def _staggered(server) -> list:
    """The eight requests, each started 30 ms after the one before (WebSockets fed in pieces)."""
    tasks = []
    for i, ((transport, fields), text) in enumerate(zip(REQUESTS, SCRIPTS)):
        if transport == "http":
            tasks.append(asyncio.ensure_future(_http(server.url, text, fields)))
        else:
            pieces = [text[j:j + 7] for j in range(0, len(text), 7)]
            start = {**fields, "include_tokens": True}
            tasks.append(asyncio.ensure_future(ws_speak(server.url.replace("http", "ws") + "/v1/stream",
                                                        pieces, start)))
        if i < len(REQUESTS) - 1:
            await asyncio.sleep(0.03)
    return await asyncio.gather(*tasks)


def test_eight_staggered_streams_each_give_their_solo_run(server, solo, voice_file):
    health = server.health()
    assert (health["workers"], health["max_streams"]) == (SLOTS, SLOTS)
    before = engine(server)
    answers = asyncio.run(_staggered(server))
    for (transport, fields), text, answer in zip(REQUESTS, SCRIPTS, answers):
        expected = solo_run(solo, text, fields, voice_file)
        if transport == "http":
            assert answer == pcm16(expected.pcm), (text, fields)
        else:
            assert answer["close_code"] == 1000, answer["close_reason"]
            assert np.array_equal(np.asarray(answer["done"]["tokens"]), expected.tokens), (text, fields)
            assert answer["audio"] == pcm16(expected.pcm), (text, fields)
    after = engine(server)
    frames = after["frames_total"] - before["frames_total"]
    stepped = after["streams_stepped_total"] - before["streams_stepped_total"]
    assert after["slots"] == SLOTS and after["busy_slots"] == 0 and after["waiting_sessions"] == 0
    assert frames > 0 and after["frame_seconds_total"] > before["frame_seconds_total"]
    # Overlapping streams shared frames: more streams stepped than frames run.
    assert stepped > frames, (stepped, frames)


async def _hold(url: str, text: str):
    """A WebSocket stream that has sent the start of its script and waits to send the rest: it keeps
    its slot. Returns the open connection."""
    from websockets.asyncio.client import connect

    ws = await connect(url, max_size=2**24, open_timeout=20)
    await ws.send(json.dumps({"type": "start", "seed": 1}))
    await ws.send(json.dumps({"type": "text", "text": text}))
    return ws


async def _until(predicate, seconds: float = 30.0) -> None:
    await asyncio.to_thread(wait_until, predicate, seconds)


async def _full_then_freed(server) -> dict:
    ws_url = server.url.replace("http", "ws") + "/v1/stream"
    holders = [await _hold(ws_url, "[S1] Hold this slot for a while, please, and") for _ in range(SLOTS)]
    out = {}
    try:
        await _until(lambda: server.health()["busy"] == SLOTS and engine(server)["busy_slots"] == SLOTS)
        queued = asyncio.ensure_future(_http(server.url, SCRIPTS[0], {"seed": 11}))
        await _until(lambda: server.health()["queued"] == QUEUE)
        async with httpx.AsyncClient(timeout=60) as client:
            refused = await client.post(f"{server.url}/v1/audio/speech", json=speech_body(SCRIPTS[1]))
        out["refused"] = refused
        out["queued_done_before_cancel"] = queued.done()
        holders[0].transport.abort()  # the client goes away mid-script: its slot is the queued request's
        out["queued_body"] = await asyncio.wait_for(queued, 60)
        out["engine_after"] = engine(server)
    finally:
        for ws in holders[1:]:
            # Aborted, not closed: these clients never read their audio, so their own read backpressure
            # would hide the server's close reply and each close would wait out close_timeout (10 s).
            ws.transport.abort()
    return out


def test_a_disconnect_frees_its_slot_for_the_queued_request_and_past_that_503(server, solo):
    key = 'dia2_requests_total{endpoint="stream",outcome="cancelled"}'
    cancelled_before = server.metrics().get(key, 0.0)
    out = asyncio.run(_full_then_freed(server))
    refused = out["refused"]
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "server_busy"
    assert not out["queued_done_before_cancel"]
    expected = solo_run(solo, SCRIPTS[0], {"seed": 11}, Path())
    assert out["queued_body"] == pcm16(expected.pcm)
    assert out["engine_after"]["slots"] == SLOTS
    assert load.wait_idle(server) == 0
    wait_until(lambda: engine(server)["busy_slots"] == 0)
    assert server.metrics().get(key, 0.0) - cancelled_before == SLOTS


def test_an_unbatched_runtime_reports_one_stream_and_no_engine_figures(solo):
    from dia2_trt.runtime.serve.app import create_app

    from serve_support import live_server

    with live_server(create_app([solo] * 2)) as live:
        assert httpx.post(f"{live.url}/v1/audio/speech", json=speech_body(SCRIPTS[3]), timeout=60).status_code == 200
        health = httpx.get(f"{live.url}/healthz").json()
        text = httpx.get(f"{live.url}/metrics").text
    assert (health["workers"], health["max_streams"]) == (2, 1)
    assert "dia2_engine_" not in text and "dia2_requests_total" in text


def test_the_demo_at_slash_demo_shares_the_apis_batch(runtime, solo):
    """``serve --demo``: the Gradio page's /speak and an API request step on one engine, the runtime's."""
    pytest.importorskip("gradio", reason="needs the [demo] extra")
    gradio_client = pytest.importorskip("gradio_client", reason="needs the [demo] extra")
    import soundfile as sf

    from dia2_trt.runtime import GenerationParams
    from dia2_trt.runtime.serve.app import create_app
    from dia2_trt.runtime.serve.command import _mount_demo

    from serve_support import live_server

    app = create_app([runtime] * runtime.max_streams)
    out_dir = _mount_demo(app, [runtime] * runtime.max_streams, [])
    engine = runtime.engine
    expected = solo.speak(SCRIPTS[0], GenerationParams.from_options(seed=5))
    with live_server(app) as live:
        before = engine.stats()
        client = gradio_client.Client(f"{live.url}/demo/", verbose=False)
        wav = client.predict(SCRIPTS[0], 5, None, 2.0, api_name="/speak")
        after_demo = engine.stats()
        response = httpx.post(f"{live.url}/v1/audio/speech", json=speech_body(SCRIPTS[0], seed=5), timeout=60)
        after_api = engine.stats()
        scraped = load_metrics(httpx.get(f"{live.url}/metrics").text)
    assert not out_dir.exists()  # the app's shutdown removed the demo's WAVs
    samples, rate = sf.read(wav, dtype="int16")  # gradio_client's own copy
    assert rate == runtime.sample_rate and samples.tobytes() == pcm16(expected.pcm)
    assert response.status_code == 200 and response.content == pcm16(expected.pcm)
    # Each request's frames were stepped by the API's engine: both its counters moved by at least
    # that request's frames, and /metrics reads that same engine.
    assert after_demo.streams_stepped - before.streams_stepped >= expected.frames
    assert after_api.streams_stepped - after_demo.streams_stepped >= expected.frames
    assert scraped["dia2_engine_frames_total"] >= after_api.frames


def load_metrics(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_demo_with_an_api_key_is_a_usage_error(artifacts):
    from click.testing import CliRunner

    from dia2_trt.runtime.cli import main

    result = CliRunner().invoke(main, ["serve", "--artifacts", str(artifacts), "--demo", "--api-key", "k" * 20,
                                       "--port", "1"])
    assert result.exit_code == 2 and "--demo" in result.output and "Traceback" not in result.output


def test_max_streams_loads_one_batched_runtime_for_every_slot(artifacts):
    from dia2_trt.runtime.serve.command import _load

    slots = _load(str(artifacts), 2, 4, "onnxruntime", 1)  # --max-streams replaces --workers
    assert len(slots) == 4 and all(slot is slots[0] for slot in slots)
    assert slots[0].max_streams == 4 and slots[0].engine.stats().slots == 4
