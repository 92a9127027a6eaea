"""dia2-rt serve on tiny artifacts: a real server on a loopback port, driven by real clients.

The audio a request returns must equal ``dia2-rt speak``'s, sample for sample, with the
same text, seed and parameters: over plain HTTP (pcm, wav, flac, SSE) and through the
official OpenAI client; the WebSocket, fed the script in small pieces, must give the
tokens of the whole script.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="needs the [serve] extra")
httpx = pytest.importorskip("httpx", reason="needs the [serve-test] extra")

from dia2_trt.runtime import GenerationParams  # noqa: E402
from dia2_trt.runtime.serve.app import ServeConfig, create_app  # noqa: E402

from serve_support import live_server, pcm16, speech_body, split_wav, ws_speak  # noqa: E402

TEXT = "[S1] Hello there, how are you? [S2] I am fine, thanks."
LONG = ("[S1] This is a longer script, so that generation takes a while and the first audio can be heard "
        "long before the last word. [S2] Indeed it is, and it keeps going for quite some time yet.")
# Sampled, not greedy, with every extra set: the request must reproduce the CLI run exactly.
EXTRAS = {"seed": 7, "temperature": 0.7, "top_k": 30, "cfg_scale": 1.5}
CLI_EXTRAS = ["--seed", "7", "--temperature", "0.7", "--top-k", "30", "--cfg", "1.5"]
GREEDY = GenerationParams(text_temperature=0.0, audio_temperature=0.0)


@pytest.fixture(scope="module")
def server(runtime):
    with live_server(create_app([runtime] * 2, ServeConfig(max_queue=4))) as live:
        yield live


@pytest.fixture(scope="module")
def solo(runtime):
    """Reference runs, on the runtime the server shares (its sessions are independent)."""
    return runtime


@pytest.fixture(scope="module")
def cli_pcm(artifacts) -> bytes:
    """``dia2-rt speak --out -`` (raw s16le on stdout) of TEXT with EXTRAS."""
    from click.testing import CliRunner

    from dia2_trt.runtime.cli import main

    result = CliRunner().invoke(main, ["speak", "--artifacts", str(artifacts), "--out", "-", "--quiet",
                                       *CLI_EXTRAS, TEXT])
    assert result.exit_code == 0, result.output
    assert len(result.stdout_bytes) > 4800  # a real utterance, not an empty one
    return result.stdout_bytes


def _post(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/audio/speech", json=body, timeout=60)


@pytest.mark.parametrize("response_format", ["pcm", "wav"])
def test_http_speech_equals_cli_sample_for_sample(server, cli_pcm, response_format):
    response = _post(server, speech_body(TEXT, response_format=response_format, **EXTRAS))
    assert response.status_code == 200, response.text
    audio = response.content
    if response_format == "wav":
        assert response.headers["content-type"] == "audio/wav"
        rate, audio = split_wav(audio)
        assert rate == server.state.sample_rate
    assert audio == cli_pcm


def test_whole_file_format_decodes_to_the_cli_samples(server, cli_pcm):
    import soundfile as sf

    response = _post(server, speech_body(TEXT, response_format="flac", **EXTRAS))
    assert response.status_code == 200, response.text
    samples, rate = sf.read(io.BytesIO(response.content), dtype="int16")
    assert rate == server.state.sample_rate
    assert samples.tobytes() == cli_pcm


def test_openai_client_streaming_speech_equals_cli(server, cli_pcm):
    openai = pytest.importorskip("openai", reason="needs the [serve-test] extra")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-checked", max_retries=0, timeout=60)
    for response_format in ("pcm", "wav"):
        with client.audio.speech.with_streaming_response.create(
                model="dia2", voice="alloy", input=TEXT, response_format=response_format,
                extra_body=EXTRAS) as response:
            audio = b"".join(response.iter_bytes())
        if response_format == "wav":
            audio = split_wav(audio)[1]
        assert audio == cli_pcm, response_format
    with client.audio.speech.with_streaming_response.create(
            model="dia2", voice="alloy", input=TEXT, response_format="pcm", stream_format="sse",
            extra_body=EXTRAS) as response:
        events = [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]
    deltas = [base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta"]
    assert b"".join(deltas) == cli_pcm and events[-1]["type"] == "speech.audio.done"


def test_sse_deltas_join_to_the_cli_audio(server, cli_pcm):
    events = []
    with httpx.stream("POST", f"{server.url}/v1/audio/speech", timeout=60,
                      json=speech_body(TEXT, stream_format="sse", **EXTRAS)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    deltas = [event for event in events if event["type"] == "speech.audio.delta"]
    assert len(deltas) > 1  # streamed as generated, not one blob at the end
    assert b"".join(base64.b64decode(event["audio"]) for event in deltas) == cli_pcm
    done = events[-1]
    assert done["type"] == "speech.audio.done"
    assert done["usage"]["input_tokens"] > 0 and done["usage"]["output_tokens"] > 0
    assert done["usage"]["total_tokens"] == done["usage"]["input_tokens"] + done["usage"]["output_tokens"]


def test_first_bytes_arrive_before_generation_ends(server, solo):
    """When the first body bytes are in, the worker is still generating and most audio is still to come."""
    expected = pcm16(solo.speak(LONG, GenerationParams(seed=3)).pcm)
    with httpx.stream("POST", f"{server.url}/v1/audio/speech", json=speech_body(LONG, seed=3),
                      timeout=60) as response:
        assert response.status_code == 200
        chunks = response.iter_raw()
        first = next(chunks)
        busy_then = httpx.get(f"{server.url}/healthz").json()["busy"]
        body = first + b"".join(chunks)
    assert body == expected
    assert busy_then >= 1
    assert 0 < len(first) < len(body) / 2


def test_websocket_pieces_give_the_whole_texts_tokens(server, solo):
    whole = solo.speak(TEXT, GREEDY)
    pieces = [TEXT[i:i + 3] for i in range(0, len(TEXT), 3)]  # splits words and tags alike
    start = {"temperature": 0, "include_tokens": True}
    streamed = asyncio.run(ws_speak(server.ws_url, pieces, start))
    at_once = asyncio.run(ws_speak(server.ws_url, [TEXT], start))
    for run in (streamed, at_once):
        assert run["close_code"] == 1000, run["close_reason"]
        assert np.array_equal(np.asarray(run["done"]["tokens"]), whole.tokens)
        assert run["audio"] == pcm16(whole.pcm)
    events = streamed["events"]
    assert events[0] == {"type": "ready", "sample_rate": server.state.sample_rate, "encoding": "pcm_s16le",
                         "channels": 1}
    words = [(w["word"], w["start"]) for e in events if e["type"] == "words" for w in e["words"]]
    assert words == [(w, round(s, 4)) for w, s in whole.timestamps]
    done = streamed["done"]
    assert done["ttfa"] > 0 and done["rtf"] > 0 and done["frames"] == whole.frames
    assert done["audio_seconds"] == pytest.approx(whole.audio_seconds, abs=1e-3)


def test_health_metrics_voices_and_page(server):
    assert _post(server, speech_body(TEXT)).status_code == 200
    health = httpx.get(f"{server.url}/healthz").json()
    assert health == {"status": "ok", "workers": 2, "busy": 0, "queued": 0, "max_queue": 4,
                      "max_streams": server.state.runtime.max_streams, "sample_rate": server.state.sample_rate}
    metrics = httpx.get(f"{server.url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'dia2_requests_total{endpoint="speech",outcome="ok"}' in text
    for name in ("dia2_queue_depth", "dia2_busy_workers", "dia2_time_to_first_audio_seconds_count",
                 "dia2_real_time_factor_count", "dia2_audio_seconds_total", "dia2_engine_frames_total"):
        assert name in text, name
    count = next(line for line in text.splitlines() if line.startswith("dia2_time_to_first_audio_seconds_count"))
    assert float(count.split()[-1]) >= 1
    assert httpx.get(f"{server.url}/v1/voices").json() == {"voices": [{"name": "default", "conditioned": False}]}
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and 'id="play"' in page.text and 'src="/app.js"' in page.text
    assert "/v1/stream" in httpx.get(f"{server.url}/app.js").text


def test_the_cli_loads_no_web_stack_until_serve_runs():
    import subprocess
    import sys

    code = ("import sys, dia2_trt.runtime.cli; "
            "print(sorted(m for m in ('fastapi', 'starlette', 'uvicorn', 'prometheus_client', 'pydantic') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_registered_voice_speaks_as_the_runtime_does_with_that_prefix(runtime, tmp_path):
    """A --voice file conditions the request exactly as the runtime's own prefix path does."""
    from dia2_trt.runtime.serve.command import _voices
    from dia2_trt.runtime.voice import load_voice, save_voice

    data = Path(__file__).resolve().parent / "data" / "voices"
    path = tmp_path / "anna.voice"
    save_voice(runtime.voice(data / "s1_24k_mono.flac", data / "s1_24k_mono.words.json", 1), path)
    params = GenerationParams(seed=4)
    expected = pcm16(runtime.speak(TEXT, params, prefix=runtime.prefix(load_voice(path))).pcm)
    plain = pcm16(runtime.speak(TEXT, params).pcm)
    app = create_app([runtime] * 2, voices=_voices([f"anna={path}"], runtime))
    with live_server(app) as server:
        listed = httpx.get(f"{server.url}/v1/voices").json()["voices"]
        assert {"name": "anna", "conditioned": True} in listed
        for _ in range(2):  # the second request starts from the pair's cached warm state
            response = _post(server, speech_body(TEXT, voice="anna", seed=4))
            assert response.status_code == 200 and response.content == expected
        streamed = asyncio.run(ws_speak(server.ws_url, [TEXT[:9], TEXT[9:]], {"voice": "anna", "seed": 4}))
        assert streamed["audio"] == expected
        assert _post(server, speech_body(TEXT, seed=4)).content == plain != expected
        lone = _post(server, speech_body(TEXT, voice="alloy", voice_2="anna"))
        assert lone.status_code == 400 and lone.json()["error"]["param"] == "voice_2"


def test_chunk_sizes_are_the_requests_and_the_audio_the_same(server, cli_pcm):
    """first_chunk_frames / chunk_frames (Dia2 extras) group the frames; the audio stays the CLI's."""
    frame_bytes = 2 * server.state.runtime.manifest.samples_per_frame
    with httpx.stream("POST", f"{server.url}/v1/audio/speech", timeout=60,
                      json=speech_body(TEXT, stream_format="sse", first_chunk_frames=6, chunk_frames=4,
                                       **EXTRAS)) as response:
        assert response.status_code == 200
        events = [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]
    deltas = [base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta"]
    sizes = [len(d) // frame_bytes for d in deltas if d]
    assert sizes[0] == 6 and all(n == 4 for n in sizes[1:-1]) and 1 <= sizes[-1] <= 4
    assert b"".join(deltas) == cli_pcm
    refused = _post(server, speech_body(TEXT, first_chunk_frames=0))
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "first_chunk_frames"
