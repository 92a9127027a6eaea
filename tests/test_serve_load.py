"""dia2-rt serve under bounded load, as a real subprocess on a loopback port.

A lighter run of benchmarks/serve_load.py (whose functions drive it): 32 concurrent clients
over 2 workers get their solo audio or a clean 503; 50 clients hanging up mid-stream leave
no busy worker; RSS after 300 requests stays within 10% of after 30; SIGTERM lets an
in-flight stream finish. No timing assertions: the figures are the benchmark's to report.
"""

from __future__ import annotations

import asyncio
import json
import signal

import pytest

pytest.importorskip("fastapi", reason="needs the [serve] extra")
httpx = pytest.importorskip("httpx", reason="needs the [serve-test] extra")
pytest.importorskip("psutil", reason="needs the [dev] extra")

from dia2_trt.benchmarks import serve_load as load  # noqa: E402
from dia2_trt.runtime import GenerationParams  # noqa: E402
from dia2_trt.runtime.audio import pcm16  # noqa: E402

WORKERS, QUEUE, CLIENTS = 2, 6, 32


@pytest.fixture(scope="module")
def server(artifacts):
    process = load.ServerProcess(artifacts, WORKERS, QUEUE).wait_ready()
    yield process
    process.stop()


def test_concurrent_clients_get_their_solo_audio_or_a_clean_503(server, artifacts):
    solo = load.solo_audio(artifacts)
    outcomes = asyncio.run(load.burst(server.url, CLIENTS))
    served = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status == 503]
    assert len(served) + len(refused) == CLIENTS, [o.status for o in outcomes]
    assert len(served) >= WORKERS and refused  # 32 at once cannot all fit 2 workers + 6 queue places
    for outcome in served:
        assert outcome.body == solo[outcome.key], outcome.key
    for outcome in refused:
        assert int(outcome.retry_after) >= 1
        error = json.loads(outcome.body)["error"]
        assert error["type"] == "server_busy" and "busy" in error["message"]
    health = server.health()
    assert (health["busy"], health["queued"]) == (0, 0)


def test_clients_hanging_up_mid_stream_leave_no_busy_worker(server):
    before = server.metrics()
    statuses = asyncio.run(load.hang_up_after_first_chunk(server.url, 50))
    assert set(statuses) <= {"200", "503"} and statuses.get("200", 0) >= WORKERS
    assert load.wait_idle(server) == 0
    after = server.metrics()
    key = 'dia2_requests_total{endpoint="speech",outcome="%s"}'
    # Every stream that started was cancelled, none ran to its end.
    assert after[key % "cancelled"] - before.get(key % "cancelled", 0) == statuses["200"]
    assert after.get(key % "ok", 0) == before.get(key % "ok", 0)
    assert after["dia2_busy_workers"] == 0 and after["dia2_queue_depth"] == 0


def test_rss_after_300_requests_is_within_10_percent_of_after_30(server):
    growth = load.rss_growth(server, 300, WORKERS)
    assert growth["ratio"] <= 1.10, growth


def test_sigterm_lets_an_in_flight_stream_finish(artifacts, runtime):
    expected = pcm16(runtime.speak(load.LONG, GenerationParams()).pcm)
    process = load.ServerProcess(artifacts, 1, 0, "--shutdown-grace", "30").wait_ready()
    try:
        body = {"model": "dia2", "input": load.LONG, "voice": "alloy", "response_format": "pcm"}
        with httpx.stream("POST", f"{process.url}/v1/audio/speech", json=body, timeout=60) as response:
            chunks = response.iter_raw()
            first = next(chunks)
            process.proc.send_signal(signal.SIGTERM)
            audio = first + b"".join(chunks)
        assert audio == expected
        with pytest.raises(httpx.TransportError):  # no longer listening
            httpx.get(f"{process.url}/healthz", timeout=5)
        # uvicorn re-raises the SIGTERM it handled once it has shut down.
        assert process.proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        process.stop()
