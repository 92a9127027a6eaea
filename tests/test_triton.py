"""Dia2 on a real Triton Inference Server: ``dia2-rt triton-repo`` writes the repository for the
committed tiny fixture, ``dia2-rt triton-serve`` runs the tritonserver of the ``[triton]`` extra on
loopback ports (one server for the module, stopped at teardown, killed if it will not stop), and
tritonclient streams from it over gRPC.

Skipped where the extra is missing. nvidia-pytriton pins numpy < 2 (its Python-backend stub misreads
BYTES inputs under numpy 2), so `.ci/run` runs this module in the base venv with the extra added,
not in the full venv.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from serve_support import LOOPBACK, free_port, wait_until

pytest.importorskip("tritonclient.grpc", reason="the [triton] extra is missing (pip install 'dia2-trt[triton]')")
if importlib.util.find_spec("pytriton") is None:
    pytest.skip("the [triton] extra is missing: no nvidia-pytriton (tritonserver)", allow_module_level=True)
if int(np.__version__.split(".")[0]) >= 2:
    pytest.skip("tritonserver 2.51's Python backend needs numpy < 2 (the [triton] extra's venv has it)",
                allow_module_level=True)

from dia2_trt.runtime import GenerationParams  # noqa: E402
from dia2_trt.runtime.audio import pcm16  # noqa: E402
from dia2_trt.runtime.triton.client import TritonRequestError, TritonSpeech  # noqa: E402
from dia2_trt.runtime.voice import load_voice, save_voice  # noqa: E402

CLI = [sys.executable, "-c", "from dia2_trt.runtime.cli import main; main()"]
VOICE_DATA = Path(__file__).resolve().parent / "data" / "voices"
DIALOGUE = "[S1] Hello there, how are you? [S2] I am fine, thanks."
LONG = "[S1] This is a longer script for many frames. [S2] This is a longer script for many frames."
STARTUP_SECONDS = 120.0


class Triton:
    """``dia2-rt triton-serve`` in a subprocess: a hard ``timeout`` ends it even if this process dies
    unnoticed, and tritonserver dies with it (PR_SET_PDEATHSIG)."""

    def __init__(self, repo: Path, log: Path) -> None:
        self.http, self.grpc, self.metrics_port = free_port(), free_port(), free_port()
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            ["timeout", "-s", "TERM", "-k", "10", "1800", *CLI, "triton-serve", "--repo", str(repo),
             "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics_port)],
            stdout=self._log, stderr=subprocess.STDOUT)
        self.log = log

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc}"

    def get(self, port: int, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{port}{path}", timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except OSError:
            return 0, ""

    def wait_ready(self) -> Triton:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"tritonserver exited ({self.proc.returncode}): {self.log.read_text()[-3000:]}")
            return self.get(self.http, "/v2/health/ready")[0] == 200

        wait_until(ready, STARTUP_SECONDS, step=0.2)
        return self

    def metric(self, name: str, **labels: str) -> float:
        """One sample of the metrics endpoint, by name and (a subset of) its labels."""
        for line in self.get(self.metrics_port, "/metrics")[1].splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no {name}{labels} on the metrics endpoint")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def voices(runtime, tmp_path_factory) -> dict[str, Path]:
    """anna (speaker 1) and ben (speaker 2), made from the committed clips with the fixture's encoder."""
    folder = tmp_path_factory.mktemp("voices")
    made = {}
    for name, clip, speaker in (("anna", "s1_24k_mono", 1), ("ben", "s2_44k_stereo", 2)):
        made[name] = folder / f"{name}.voice"
        save_voice(runtime.voice(VOICE_DATA / f"{clip}.flac", VOICE_DATA / f"{clip}.words.json", speaker),
                   made[name])
    return made


@pytest.fixture(scope="module")
def server(artifacts, voices, tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton") / "repo"
    subprocess.run([*CLI, "triton-repo", "--artifacts", str(artifacts), "--out", str(repo), "--threads", "1",
                    "--max-streams", "6", *[f"--voice={name}={path}" for name, path in voices.items()]],
                   check=True, capture_output=True, timeout=120)
    triton = Triton(repo, repo.parent / "tritonserver.log")
    try:
        yield triton.wait_ready()
    finally:
        triton.stop()


def stream(server: Triton, text: str, params: dict | None = None) -> tuple[bytes, list, int]:
    """(s16le audio, [[word, seconds], ...], responses with audio) of one streamed request."""
    with TritonSpeech(server.grpc_url) as client:
        chunks = list(client.stream(text, params))
    audio = b"".join(pcm.astype("<i2").tobytes() for pcm, _ in chunks)
    return audio, [word for _, words in chunks for word in words], len(chunks)


def test_health_ready_and_model_ready(server):
    assert server.get(server.http, "/v2/health/ready")[0] == 200
    assert server.get(server.http, "/v2/health/live")[0] == 200
    assert server.get(server.http, "/v2/models/dia2/ready")[0] == 200
    status, body = server.get(server.http, "/v2/models/dia2/config")
    assert status == 200 and json.loads(body)["model_transaction_policy"]["decoupled"] is True


def test_stream_equals_speak_cli_sample_for_sample(server, artifacts, voices, tmp_path):
    """A sampled seed and every extra set: the streamed samples and words are `dia2-rt speak --out -`'s."""
    params = {"seed": 7, "temperature": 0.9, "audio_temperature": 0.7, "top_k": 20, "cfg_scale": 1.5,
              "cfg_filter_k": 30, "voice": "anna", "voice_2": "ben"}
    stamps = tmp_path / "words.json"
    cli = subprocess.run([*CLI, "speak", "--artifacts", str(artifacts), "--out", "-", "--quiet", "--threads", "1",
                          "--seed", "7", "--temperature", "0.9", "--audio-temperature", "0.7", "--top-k", "20",
                          "--cfg", "1.5", "--cfg-filter-k", "30", "--voice-1", str(voices["anna"]),
                          "--voice-2", str(voices["ben"]), "--timestamps-out", str(stamps), DIALOGUE],
                         capture_output=True, timeout=300, check=True)
    audio, words, responses = stream(server, DIALOGUE, params)
    assert len(cli.stdout) > 0 and audio == cli.stdout
    assert words == json.loads(stamps.read_text())
    assert responses > 1  # streamed, not sent whole


def test_six_concurrent_streams_each_equal_their_solo_run(server, runtime, voices):
    cases = [(DIALOGUE, {"seed": s}) for s in range(3)] + [
        ("[S2] Just one speaker, talking for a while.", {"seed": 3, "text_temperature": 0.5}),
        (DIALOGUE, {"seed": 4, "temperature": 0}),
        (DIALOGUE, {"seed": 5, "voice": "anna"}),
    ]
    expected = []
    for text, params in cases:
        options = {k: v for k, v in params.items() if k != "voice"}
        prefix = runtime.prefix(load_voice(voices["anna"])) if "voice" in params else None
        expected.append(pcm16(runtime.speak(text, GenerationParams.from_options(**options), prefix=prefix).pcm))
    results: list = [None] * len(cases)
    barrier = threading.Barrier(len(cases))

    def one(i: int) -> None:
        barrier.wait(timeout=30)
        results[i] = stream(server, *cases[i])[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert [r == e for r, e in zip(results, expected)] == [True] * len(cases)


@pytest.mark.parametrize(("text", "params", "message"), [
    ("", None, "text: empty"),
    ("   ", {"seed": 1}, "text: empty"),
    (DIALOGUE, "{not json", "params"),
    (DIALOGUE, {"seed": True}, "params.seed: expected an integer"),
    (DIALOGUE, {"speed": 2}, "params.speed: unknown field"),
    (DIALOGUE, {"cfg_scale": 0}, "cfg scale must be positive"),
    (DIALOGUE, {"voice": "nobody"}, "params.voice: unknown voice 'nobody'"),
    (DIALOGUE, {"voice_2": "ben"}, "params.voice_2: speaker 2's voice needs a voice for speaker 1"),
    ("[S1] <b>bold</b>", None, "text: unknown tag"),
    ("[S1] " + "word " * 400, None, "text: the script is too long"),
], ids=["empty", "blank", "bad-json", "bool-seed", "unknown-field", "cfg-zero", "unknown-voice", "lone-voice-2",
        "bad-tag", "too-long"])
def test_bad_input_is_one_error_response_then_the_model_answers(server, text, params, message):
    with TritonSpeech(server.grpc_url) as client:
        with pytest.raises(TritonRequestError) as caught:
            list(client.stream(text, params))
        error = str(caught.value)
        assert message in error and "\n" not in error and "Traceback" not in error
        audio = b"".join(pcm.tobytes() for pcm, _ in client.stream("[S1] Hi there.", {"seed": 1}))
    assert len(audio) > 0


def test_cancelled_stream_stops_and_the_model_keeps_serving(server, runtime):
    full = runtime.speak(LONG, GenerationParams(seed=1)).audio_seconds
    before = {o: server.metric("dia2_streams_total", outcome=o) for o in ("cancelled", "done")}
    audio_before = server.metric("dia2_audio_seconds_total")
    client = TritonSpeech(server.grpc_url)
    chunks = client.stream(LONG, {"seed": 1})
    next(chunks)
    client.cancel()
    wait_until(lambda: server.metric("dia2_streams_total", outcome="cancelled") == before["cancelled"] + 1, 60)
    assert server.metric("dia2_streams_active") == 0
    assert server.metric("dia2_audio_seconds_total") - audio_before < full  # it stopped before the end
    assert server.metric("dia2_streams_total", outcome="done") == before["done"]
    assert len(stream(server, "[S1] Hi there.", {"seed": 2})[0]) > 0


def test_metrics_endpoint_counts_streams(server, runtime):
    done = server.metric("dia2_streams_total", outcome="done")
    bad = server.metric("dia2_streams_total", outcome="bad_request")
    seconds = server.metric("dia2_audio_seconds_total")
    success = server.metric("nv_inference_request_success", model="dia2")
    audio, _, _ = stream(server, DIALOGUE, {"seed": 9})
    with TritonSpeech(server.grpc_url) as client, pytest.raises(TritonRequestError):
        list(client.stream("", None))
    assert server.metric("dia2_streams_total", outcome="done") == done + 1
    assert server.metric("dia2_streams_total", outcome="bad_request") == bad + 1
    streamed = server.metric("dia2_audio_seconds_total") - seconds
    assert streamed == pytest.approx(len(audio) / 2 / runtime.sample_rate)
    assert server.metric("nv_inference_request_success", model="dia2") > success  # Triton's own series beside ours
