"""Bad input and faults: every refusal is a 4xx (or a close frame) with a reason, and the server keeps serving."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="needs the [serve] extra")
httpx = pytest.importorskip("httpx", reason="needs the [serve-test] extra")

from dia2_trt.runtime import GenerationParams  # noqa: E402
from dia2_trt.runtime.serve.app import ServeConfig, create_app  # noqa: E402
from dia2_trt.runtime.serve.voices import VoiceRegistry, VoiceRegistryError  # noqa: E402
from dia2_trt.runtime.serve.workers import Limits  # noqa: E402

from serve_support import LiveServer, free_port, live_server, pcm16, speech_body, wait_until, ws_speak  # noqa: E402

TEXT = "[S1] Hello there. [S2] Hi!"
LONG = "[S1] " + " ".join(["word"] * 17) + " [S2] " + " ".join(["again"] * 17)  # ~110 of tiny's 160 frames
FAIL_SEED, CUT_SEED, SLOW_SEED = 666, 667, 668  # seeds the fault-injecting session openers react to


class _CutOff:
    """A session that dies after its first audio chunk."""

    def __init__(self, session) -> None:
        self._session = session

    def __getattr__(self, name):
        return getattr(self._session, name)

    def __iter__(self):
        for chunk in self._session:
            yield chunk
            raise RuntimeError("injected failure after the first chunk")


def plain_session(runtime, params, voices, progress, chunking=None):
    return runtime.open_session(params, progress=progress, chunking=chunking)


def faulty_session(runtime, params, voices, progress, chunking=None):
    """plain_session, except that two seeds fail: one before any audio, one after the first chunk."""
    if params.seed == FAIL_SEED:
        raise RuntimeError("injected failure before any audio")
    session = plain_session(runtime, params, voices, progress, chunking)
    return _CutOff(session) if params.seed == CUT_SEED else session


@pytest.fixture(scope="module")
def runtimes(runtime):
    return [runtime] * 2  # two workers over one loaded runtime


@pytest.fixture(scope="module")
def server(runtimes):
    config = ServeConfig(max_queue=4, limits=Limits(seconds=60, max_chars=2000, idle_seconds=2.0), max_body_bytes=8192)
    with live_server(create_app(runtimes, config, open_session=faulty_session), ws_max_size=8192) as live:
        yield live


@pytest.fixture(scope="module")
def expected(runtime) -> bytes:
    return pcm16(runtime.speak(TEXT, GenerationParams()).pcm)


def _still_serving(server, expected: bytes) -> None:
    response = httpx.post(f"{server.url}/v1/audio/speech", json=speech_body(TEXT), timeout=60)
    assert response.status_code == 200 and response.content == expected
    wait_until(lambda: httpx.get(f"{server.url}/healthz").json()["busy"] == 0)


BAD_BODIES = {
    "empty input": (speech_body(""), 400, "input"),
    "blank input": (speech_body("   "), 400, "input"),
    "unknown speaker tag": (speech_body("[S3] Hello there."), 400, "input"),
    "unknown tag": (speech_body("[S1] Hi <laugh> there."), 400, "input"),
    "unknown voice": (speech_body(TEXT, voice="bob"), 400, "voice"),
    "unknown voice 2": (speech_body(TEXT, voice_2="nobody"), 400, "voice_2"),
    "unknown format": (speech_body(TEXT, response_format="aac"), 400, "response_format"),
    "bogus format": (speech_body(TEXT, response_format="exe"), 400, "response_format"),
    "bad stream format": (speech_body(TEXT, stream_format="video"), 400, "stream_format"),
    "missing model": ({"input": TEXT, "voice": "alloy"}, 400, "model"),
    "unknown field": (speech_body(TEXT, volume=11), 400, "volume"),
    "negative temperature": (speech_body(TEXT, temperature=-1), 400, "temperature"),
    "huge temperature": (speech_body(TEXT, text_temperature=1e9), 400, "text_temperature"),
    "negative top_k": (speech_body(TEXT, top_k=-5), 400, "top_k"),
    "zero cfg": (speech_body(TEXT, cfg_scale=0), 400, "cfg_scale"),
    "negative seed": (speech_body(TEXT, seed=-1), 400, "seed"),
    "string seed": (speech_body(TEXT, seed="abc"), 400, "seed"),
    "speed": (speech_body(TEXT, speed=2.0), 400, "speed"),
    "too many chars": (speech_body("[S1] " + "la " * 900), 400, "input"),
    "past the context": (speech_body("[S1] " + " ".join(["word"] * 600)), 400, "input"),
    "json list": ([TEXT], 400, None),
    # NaN and Infinity are not JSON: refused by the parser, before any field is looked at
    "NaN temperature": ('{"model": "dia2", "input": "[S1] Hi.", "voice": "alloy", "temperature": NaN}', 400, None),
    "infinite cfg": ('{"model": "dia2", "input": "[S1] Hi.", "voice": "alloy", "cfg_scale": Infinity}', 400, None),
    # 1e999 parses to infinity: the body's parser refuses it, as NaN and Infinity, before any field
    "overflowing cfg": ('{"model": "dia2", "input": "[S1] Hi.", "voice": "alloy", "cfg_scale": 1e999}', 400, None),
}
JSON = {"content-type": "application/json"}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_json_bodies_are_400_in_openai_shape(server, case):
    body, status, param = BAD_BODIES[case]
    content = body if isinstance(body, str) else json.dumps(body)  # a str is raw JSON (NaN and Infinity)
    response = httpx.post(f"{server.url}/v1/audio/speech", content=content, headers=JSON, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


@pytest.mark.parametrize("content", [b"not json", b"\xff\xfe\x00garbage", b'{"model": "dia2", "input": ', b""])
def test_non_json_bodies_are_400(server, content):
    response = httpx.post(f"{server.url}/v1/audio/speech", content=content,
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "not valid JSON" in message or "not UTF-8" in message, message


def test_oversized_bodies_are_413_declared_or_chunked(server, expected):
    big = json.dumps(speech_body("[S1] " + "x" * 20_000)).encode()
    declared = httpx.post(f"{server.url}/v1/audio/speech", content=big, headers=JSON, timeout=30)
    assert declared.status_code == 413 and "8192 bytes" in declared.json()["error"]["message"]
    chunked = httpx.post(f"{server.url}/v1/audio/speech", content=iter([big[:4000], big[4000:]]), headers=JSON,
                         timeout=30)
    assert chunked.status_code == 413
    _still_serving(server, expected)


def test_failures_inside_generation_leave_the_server_serving(server, expected):
    before = httpx.post(f"{server.url}/v1/audio/speech", json=speech_body(TEXT, seed=FAIL_SEED), timeout=30)
    assert before.status_code == 500
    assert before.json()["error"] == {"message": "generation failed: RuntimeError", "type": "server_error",
                                      "param": None, "code": None}
    # After the first chunk the status is already sent: the chunked body is cut off, not ended cleanly.
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(f"{server.url}/v1/audio/speech", json=speech_body(LONG, seed=CUT_SEED), timeout=30)
    _still_serving(server, expected)
    assert 'dia2_requests_total{endpoint="speech",outcome="error"} 2.0' in httpx.get(f"{server.url}/metrics").text


def slow_session(runtime, params, voices, progress, chunking=None):
    """With SLOW_SEED, frames take at least 40 ms, so a 1 s limit strikes mid-utterance on any machine."""

    def crawl(report):
        time.sleep(0.04)
        progress(report)

    return plain_session(runtime, params, voices, crawl if params.seed == SLOW_SEED else progress)


def test_time_limit_stops_a_generation_and_frees_its_worker(runtimes, expected):
    config = ServeConfig(max_queue=2, limits=Limits(seconds=1.0))
    with live_server(create_app(runtimes[:1], config, open_session=slow_session)) as server:
        with pytest.raises(httpx.RemoteProtocolError):  # ~100 frames > 4 s: cut off after the first audio
            httpx.post(f"{server.url}/v1/audio/speech", json=speech_body(LONG, seed=SLOW_SEED), timeout=30)
        slow = asyncio.run(ws_speak(server.ws_url, ["[S1] Hello there"], end=False))
        assert slow["close_code"] == 1013 and "limit" in slow["close_reason"]
        wait_until(lambda: httpx.get(f"{server.url}/healthz").json()["busy"] == 0)
        assert httpx.post(f"{server.url}/v1/audio/speech", json=speech_body(TEXT), timeout=30).content == expected
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'dia2_requests_total{endpoint="speech",outcome="timeout"} 1.0' in metrics


def test_shutdown_cancels_streams_past_the_grace_period(runtimes):
    """With no grace left, an in-flight stream is cut off and its generation stops at the next frame."""
    app = create_app(runtimes[:1], ServeConfig(shutdown_grace=0), open_session=slow_session)
    server = LiveServer(app, grace=0).start()
    try:
        with httpx.stream("POST", f"{server.url}/v1/audio/speech", timeout=30,
                          json=speech_body(LONG, seed=SLOW_SEED)) as response:
            chunks = response.iter_raw()
            next(chunks)
            stopper = threading.Thread(target=server.stop)
            stopper.start()
            with pytest.raises(httpx.RemoteProtocolError):
                for _ in chunks:
                    pass
        stopper.join(timeout=30)
        assert not stopper.is_alive()
    finally:
        server.stop()
    pool = server.state.pool
    assert pool.closing and (pool.busy, pool.admitted) == (0, 0)
    count = server.state.metrics.registry.get_sample_value
    assert count("dia2_requests_total", {"endpoint": "speech", "outcome": "cancelled"}) == 1
    assert count("dia2_requests_total", {"endpoint": "speech", "outcome": "ok"}) is None


async def _raw_ws(url: str, messages: list) -> tuple[int, str, list]:
    """Send raw frames (str or bytes) and collect what comes back until the server closes."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    received = []
    async with connect(url, open_timeout=20) as ws:
        try:
            for message in messages:
                await ws.send(message)
            async for message in ws:
                received.append(message)
        except ConnectionClosed:
            pass
        return ws.close_code, ws.close_reason, received


START = json.dumps({"type": "start"})
TEXT_MSG = json.dumps({"type": "text", "text": TEXT})
BAD_SOCKETS = {
    "binary garbage first": ([b"\x00\xff garbage"], 1003, "binary"),
    "binary garbage later": ([START, TEXT_MSG, b"\x89PNG\r\n"], 1003, "binary"),
    "not json": (["{nope"], 1007, "JSON"),
    "json list": (["[1, 2]"], 1008, "object"),
    "no start": ([TEXT_MSG], 1008, "first message"),
    "bad start field": ([json.dumps({"type": "start", "temperature": -3})], 1008, "temperature"),
    "unknown start field": ([json.dumps({"type": "start", "colour": "red"})], 1008, "colour"),
    "unknown voice": ([json.dumps({"type": "start", "voice": "bob"})], 1008, "bob"),
    "unknown message": ([START, json.dumps({"type": "dance"})], 1008, "unexpected"),
    "text after end": ([START, TEXT_MSG, json.dumps({"type": "end"}), TEXT_MSG], 1008, None),
    "text not a string": ([START, json.dumps({"type": "text", "text": 5})], 1008, "unexpected"),
    "unknown tag": ([START, json.dumps({"type": "text", "text": "[S3] Hello there friend. "}),
                     json.dumps({"type": "end"})], 1008, "unknown tag"),
    # mostly spaces: past the character limit while the words still fit the tiny model's context,
    # so only the length limit can refuse it (500 words tripped the context check first at times)
    "too long": ([START] + [json.dumps({"type": "text", "text": "[S1] la" + " " * 1500})] * 2, 1008, "2000 characters"),
    "oversized message": ([START, json.dumps({"type": "text", "text": "a" * 10_000})], 1009, None),
}


@pytest.mark.parametrize("case", list(BAD_SOCKETS))
def test_bad_socket_messages_close_with_a_reason(server, expected, case):
    messages, code, reason = BAD_SOCKETS[case]
    close_code, close_reason, received = asyncio.run(_raw_ws(server.ws_url, messages))
    if case == "text after end" and close_code == 1000:
        return  # the utterance can finish before the stray message is read: also a clean outcome
    assert close_code == code, (close_code, close_reason)
    if reason:
        assert reason in close_reason
    errors = [json.loads(m) for m in received if isinstance(m, str) and json.loads(m)["type"] == "error"]
    assert code == 1009 or errors, received  # uvicorn itself refuses oversized frames, with no event


def test_server_survives_all_the_bad_sockets(server, expected):
    for messages, _, _ in BAD_SOCKETS.values():
        asyncio.run(_raw_ws(server.ws_url, messages))
    _still_serving(server, expected)
    good = asyncio.run(ws_speak(server.ws_url, [TEXT]))
    assert good["close_code"] == 1000 and good["audio"] == expected


def test_voice_registry(tmp_path):
    voice = tmp_path / "anna.voice"
    voice.write_bytes(b"voice data")
    registry = VoiceRegistry.from_options([f"anna={voice}"])
    assert registry.resolve("anna").path == voice.resolve()
    for name in ("default", "alloy", "nova", None):
        assert not registry.resolve(name).conditioned
    with pytest.raises(VoiceRegistryError, match="unknown voice 'bob'.*anna"):
        registry.resolve("bob")
    bad = {"anna": "NAME=FILE", f"x={tmp_path}": "not a file", f"y={tmp_path / 'missing'}": "not a file",
           f"alloy={voice}": "reserved", f"../z={voice}": "voice name", f"anna={voice}": "twice"}
    for option, message in bad.items():
        with pytest.raises(VoiceRegistryError, match=message):
            VoiceRegistry.from_options([f"anna={voice}", option] if message == "twice" else [option])
    loaded = VoiceRegistry.from_options([f"anna={voice}"], loader=lambda path: path.read_bytes())
    assert loaded.resolve("anna").prefix == b"voice data"

    def refuse(path):
        raise ValueError("made for other artifacts")

    with pytest.raises(VoiceRegistryError, match="voice 'anna': made for other artifacts"):
        VoiceRegistry.from_options([f"anna={voice}"], loader=refuse)


def test_cli_refuses_bad_setups_with_one_line(artifacts, tmp_path):
    from click.testing import CliRunner

    from dia2_trt.runtime.cli import main

    voice = tmp_path / "anna.voice"
    voice.write_bytes(b"voice data")
    cases = {
        ("--voice", "anna"): "expected NAME=FILE",
        ("--voice", f"anna={tmp_path / 'missing.voice'}"): "is not a file",
        ("--voice", f"anna={voice}"): "not a voice file",
        ("--port", "0"): "0 is not in the range",
        ("--workers", "0"): "0 is not in the range",
    }
    port = ["--port", str(free_port())]  # 8000 may be anyone's on a shared machine
    for args, message in cases.items():
        result = CliRunner().invoke(main, ["serve", "--artifacts", str(artifacts), *port, *args])
        assert result.exit_code != 0
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], result.output
    missing = CliRunner().invoke(main, ["serve", "--artifacts", str(tmp_path / "nope"), *port])
    assert missing.exit_code == 1 and missing.output.startswith("Error:") and len(missing.output.splitlines()) == 1


def test_cli_loads_the_weights_once_for_all_workers(artifacts):
    from dia2_trt.runtime.serve.command import _load

    slots = _load(str(artifacts), 3, None, "onnxruntime", 1)
    assert len(slots) == 3 and all(slot is slots[0] for slot in slots)


def test_serve_without_the_extra_says_which_to_install(artifacts):
    import subprocess
    import sys

    code = ("import sys; sys.modules['uvicorn'] = None; from dia2_trt.runtime.cli import main; "
            f"main(['serve', '--artifacts', {str(artifacts)!r}])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.startswith("Error: dia2-rt serve needs the [serve] extra") and done.stderr.count("\n") == 1
