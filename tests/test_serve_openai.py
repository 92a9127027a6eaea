"""dia2-rt serve as an OpenAI drop-in: what Open WebUI, SillyTavern and the ``openai`` SDK call.

A real server on a loopback port (the committed tiny fixture), driven by the official client
where one exists: the model and voice lists, the API key, CORS (off unless asked for), the
request fields Dia2 cannot honour (``speed``, ``instructions``), every response format OpenAI
lists, and plain-text ``input`` without a speaker tag, spoken as nari-labs/dia2 speaks it.
"""

from __future__ import annotations

import asyncio
import io
import json
import wave
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="needs the [serve] extra")
httpx = pytest.importorskip("httpx", reason="needs the [serve-test] extra")
openai = pytest.importorskip("openai", reason="needs the [serve-test] extra")

from dia2_trt.runtime import GenerationParams  # noqa: E402
from dia2_trt.runtime.serve.app import ServeConfig, create_app  # noqa: E402
from dia2_trt.runtime.serve.voices import OPENAI_VOICES  # noqa: E402

from serve_support import live_server, pcm16, speech_body, split_wav, ws_speak  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
TEXT = "[S1] Hello there, how are you? [S2] I am fine, thanks."
UNTAGGED = json.loads((DATA / "golden_untagged.json").read_text())["cases"]
GREEDY = {"temperature": 0}
KEY = "sk-test-0123456789"
# Every response_format OpenAI's speech endpoint lists (2025).
OPENAI_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")


@pytest.fixture(scope="module")
def voice_file(runtime, tmp_path_factory) -> Path:
    from dia2_trt.runtime.voice import save_voice

    path = tmp_path_factory.mktemp("voices") / "anna.voice"
    save_voice(runtime.voice(DATA / "voices" / "s1_24k_mono.flac", DATA / "voices" / "s1_24k_mono.words.json", 1),
               path)
    return path


@pytest.fixture(scope="module")
def server(runtime, voice_file):
    from dia2_trt.runtime.serve.command import _voices

    app = create_app([runtime] * 2, ServeConfig(max_queue=4), _voices([f"anna={voice_file}"], runtime))
    with live_server(app) as live:
        yield live


@pytest.fixture(scope="module")
def keyed(runtime):
    with live_server(create_app([runtime], ServeConfig(api_key=KEY))) as live:
        yield live


def _post(server, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/audio/speech", json=body, timeout=60, **kwargs)


# --- lists --------------------------------------------------------------------------------------


def test_openai_client_lists_and_retrieves_models(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "dia2" and "tts-1" in ids
    assert client.models.retrieve("tts-1-hd").id == "tts-1-hd"


def test_voice_lists_hold_registered_default_and_openai_names(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    voices = client.get("/audio/voices", cast_to=object)["voices"]  # Open WebUI's shape: {"voices": [{id, name}]}
    by_id = {v["id"]: v for v in voices}
    assert by_id["anna"]["conditioned"] is True and by_id["default"]["conditioned"] is False
    assert OPENAI_VOICES <= set(by_id) and by_id["alloy"]["alias_of"] == "default"
    assert all(v["name"] == v["id"] for v in voices)
    models = httpx.get(f"{server.url}/v1/audio/models").json()["models"]
    assert {"id": "dia2", "name": "dia2"} in models


# --- the API key --------------------------------------------------------------------------------


def test_api_key_is_required_everywhere_but_healthz(keyed):
    for path in ("/v1/models", "/v1/audio/voices", "/v1/voices", "/metrics", "/"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            refused = httpx.get(f"{keyed.url}{path}", headers=headers)
            assert refused.status_code == 401, (path, headers)
            assert refused.json()["error"]["code"] == "invalid_api_key"
            assert refused.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{keyed.url}{path}", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(f"{keyed.url}/healthz").status_code == 200
    unkeyed = _post(keyed, speech_body(TEXT))
    assert unkeyed.status_code == 401 and keyed.state.pool.busy == 0


def test_openai_client_with_and_without_the_key(keyed):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="wrong").models.list()
    client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=KEY)
    assert "dia2" in [m.id for m in client.models.list()]
    speech = client.audio.speech.create(model="dia2", voice="alloy", input=TEXT, response_format="pcm")
    assert len(speech.content) > 4800


def test_websocket_needs_the_key_too(keyed):
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as refused:
        asyncio.run(ws_speak(keyed.ws_url, ["[S1] Hi there. "]))
    assert refused.value.response.status_code == 401


# --- CORS ---------------------------------------------------------------------------------------

PREFLIGHT = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


def test_cors_is_off_by_default(server):
    preflight = httpx.options(f"{server.url}/v1/audio/speech", headers=PREFLIGHT)
    assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers


def test_cors_origins_answer_preflights_and_keep_the_key(runtime):
    config = ServeConfig(api_key=KEY, cors_origins=("http://app.example",))
    with live_server(create_app([runtime], config)) as live:
        preflight = httpx.options(f"{live.url}/v1/audio/speech", headers=PREFLIGHT)
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        origin = {"Origin": "http://app.example"}
        refused = httpx.get(f"{live.url}/v1/models", headers=origin)
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "http://app.example"
        allowed = httpx.get(f"{live.url}/v1/models", headers={**origin, "Authorization": f"Bearer {KEY}"})
        assert allowed.status_code == 200
        other = httpx.get(f"{live.url}/v1/models", headers={"Origin": "http://evil.example",
                                                              "Authorization": f"Bearer {KEY}"})
        assert other.status_code == 403 and "access-control-allow-origin" not in other.headers


# --- fields Dia2 cannot honour, formats ---------------------------------------------------------


@pytest.mark.parametrize("speed", [0.25, 2.0, 4.0, 5.0])
def test_speed_other_than_one_is_one_clear_line(server, speed):
    refused = _post(server, speech_body(TEXT, speed=speed))
    error = refused.json()["error"]
    assert refused.status_code == 400 and error["param"] == "speed"
    assert "only 1.0" in error["message"] and "\n" not in error["message"]
    assert _post(server, speech_body(TEXT, speed=1.0, **GREEDY)).status_code == 200


def test_instructions_are_accepted_ignored_and_said_so(server):
    plain = _post(server, speech_body(TEXT, **GREEDY))
    instructed = _post(server, speech_body(TEXT, instructions="Speak cheerfully.", **GREEDY))
    assert instructed.status_code == 200 and instructed.headers["x-dia2-ignored"] == "instructions"
    assert "x-dia2-ignored" not in plain.headers
    assert instructed.content == plain.content


@pytest.mark.parametrize("fmt", OPENAI_FORMATS)
def test_every_openai_format_is_served_or_refused_naming_the_supported(server, fmt):
    import soundfile as sf

    response = _post(server, speech_body(TEXT, response_format=fmt, **GREEDY))
    served = server.state.formats
    if fmt not in served:
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == "response_format"
        assert error["message"].endswith("supported: " + ", ".join(served)) and "\n" not in error["message"]
        return
    assert response.status_code == 200
    if fmt == "pcm":
        assert len(response.content) > 4800
    else:
        audio, rate = sf.read(io.BytesIO(response.content))
        assert rate == 24000 and audio.size > 2400


def test_streamed_wav_reads_in_common_readers(server):
    """The header's sizes say "unknown" (0xFFFFFFFF): libsndfile and Python's wave read to the end."""
    import soundfile as sf

    body = _post(server, speech_body(TEXT, response_format="wav", **GREEDY)).content
    rate, pcm = split_wav(body)
    audio, sf_rate = sf.read(io.BytesIO(body), dtype="int16")
    assert sf_rate == rate == 24000 and audio.tobytes() == pcm
    with wave.open(io.BytesIO(body)) as reader:
        assert reader.getframerate() == 24000 and reader.readframes(-1) == pcm


# --- untagged input -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", UNTAGGED, ids=lambda case: case["name"])
def test_untagged_input_is_spoken_as_the_reference_speaks_it(server, runtime, case):
    """Token-identical to nari-labs/dia2 (golden): the WebSocket's tokens, and the HTTP samples are
    those of the runtime run whose tokens tests/torchfree/test_untagged_script.py holds to the golden."""
    greedy = GenerationParams(text_temperature=0.0, audio_temperature=0.0, cfg_scale=case["cfg_scale"])
    solo = runtime.speak(case["script"], greedy)
    assert solo.tokens.tolist() == case["tokens"]
    body = speech_body(case["script"], cfg_scale=case["cfg_scale"], **GREEDY)
    response = _post(server, body)
    assert response.status_code == 200 and response.content == pcm16(solo.pcm)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    sdk = client.audio.speech.create(model="tts-1", voice="alloy", input=case["script"], response_format="pcm",
                                     extra_body={"cfg_scale": case["cfg_scale"], **GREEDY})
    assert sdk.content == response.content
    streamed = asyncio.run(ws_speak(server.ws_url, [case["script"]],
                                    {"include_tokens": True, "cfg_scale": case["cfg_scale"], **GREEDY}))
    assert streamed["done"]["tokens"] == case["tokens"]
    assert np.frombuffer(streamed["audio"], dtype="<i2").tobytes() == response.content
