"""``dia2-rt triton-repo`` and the Triton model's request checks, without Triton (base install only):
the repository it writes, what it refuses (one line, nothing left behind), the settings read back
as the model reads them, and every bad request refused in one line before a session opens."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from dia2_trt.runtime import Dia2Runtime
from dia2_trt.runtime.cli import main
from dia2_trt.runtime.serve.voices import VoiceRegistry
from dia2_trt.runtime.triton.repo import MODEL_PY
from dia2_trt.runtime.triton.request import BadRequest, plan
from dia2_trt.runtime.triton.settings import Settings
from dia2_trt.runtime.voice import load_voice, save_voice

from .conftest import DATA, FIXTURE


def _repo(*args: str):
    return CliRunner().invoke(main, ["triton-repo", "--artifacts", str(FIXTURE), *args])


def _parameters(config: str) -> dict:
    """config.pbtxt's parameters as Triton hands them to the model (JSON: {key: {string_value}})."""
    pairs = re.findall(r'parameters \{ key: "(\w+)" value \{ string_value: "((?:[^"\\]|\\.)*)" \} \}', config)
    return {"parameters": {key: {"string_value": value.replace('\\"', '"').replace("\\\\", "\\")}
                           for key, value in pairs}}


@pytest.fixture(scope="module")
def runtime() -> Dia2Runtime:
    return Dia2Runtime.load(FIXTURE, threads=1)


@pytest.fixture(scope="module")
def voice_file(runtime, tmp_path_factory):
    path = tmp_path_factory.mktemp("v") / "anna.voice"
    save_voice(runtime.voice(DATA / "voices" / "s1_24k_mono.flac", DATA / "voices" / "s1_24k_mono.words.json", 1),
               path)
    return path


def test_repo_is_a_decoupled_python_model_that_reads_its_settings_back(tmp_path, voice_file):
    result = _repo("--out", str(tmp_path / "repo"), "--instances", "2", "--max-streams", "3", "--threads", "1",
                   f"--voice=anna={voice_file}")
    assert result.exit_code == 0, result.output
    model = tmp_path / "repo" / "dia2"
    config = (model / "config.pbtxt").read_text()
    assert "model_transaction_policy { decoupled: true }" in config
    assert 'backend: "python"' in config and "count: 2 kind: KIND_CPU" in config
    assert (model / "1" / "model.py").read_text() == MODEL_PY
    assert (model / "1" / "voices" / "anna.voice").read_bytes() == voice_file.read_bytes()
    settings = Settings.from_config(_parameters(config), model / "1")
    assert settings.artifacts_dir == FIXTURE.resolve()
    assert (settings.max_streams, settings.thread_count, settings.verify) == (3, 1, True)
    assert sorted(p.name for p in tmp_path.joinpath("repo").iterdir()) == ["dia2"]  # no staging folder left


def test_copied_artifacts_are_found_relative_to_the_version_folder(tmp_path):
    assert _repo("--out", str(tmp_path / "repo"), "--copy-artifacts", "--model-name", "tts").exit_code == 0
    model = tmp_path / "repo" / "tts"
    settings = Settings.from_config(_parameters((model / "config.pbtxt").read_text()), model / "1")
    assert settings.artifacts_dir == model / "1" / "artifacts"
    assert (settings.artifacts_dir / "manifest.json").read_bytes() == (FIXTURE / "manifest.json").read_bytes()


@pytest.mark.parametrize(("args", "message"), [
    (["--model-name", "../up"], "--model-name '../up'"),
    (["--voice", "nameless"], "expected NAME=FILE"),
    (["--voice", "default=x.voice"], "reserved"),
    (["--voice", "anna=/nonexistent.voice"], "is not a file"),
])
def test_refusals_are_one_line_and_leave_nothing(tmp_path, args, message):
    out = tmp_path / "new" / "repo"
    result = _repo("--out", str(out), *args)
    assert result.exit_code == 1 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists()


def test_an_existing_model_folder_is_never_replaced(tmp_path):
    assert _repo("--out", str(tmp_path)).exit_code == 0
    marker = tmp_path / "dia2" / "config.pbtxt"
    before = marker.read_bytes()
    result = _repo("--out", str(tmp_path))
    assert result.exit_code == 1 and "already exists" in result.output and marker.read_bytes() == before


def test_not_a_voice_file_is_refused(tmp_path):
    junk = tmp_path / "junk.voice"
    junk.write_bytes(b"not a voice")
    result = _repo("--out", str(tmp_path / "repo"), f"--voice=x={junk}")
    assert result.exit_code == 1 and "voice 'x'" in result.output and not (tmp_path / "repo").exists()


@pytest.mark.parametrize(("text", "params", "message"), [
    (None, None, "text: missing"),
    (b"\xff\xfe", None, "text: not UTF-8"),
    ("  ", None, "text: empty"),
    ("[S1] Hi.", b"[1, 2]", "params: expected a JSON object"),
    ("[S1] Hi.", b'{"seed": 1.5}', "params.seed: expected an integer"),
    ("[S1] Hi.", b'{"temperature": "hot"}', "params.temperature: expected a number"),
    ("[S1] Hi.", b'{"top_k": -1}', "top k must be >= 0"),
    ("[S1] Hi.", b'{"seed": 1e999}', "params"),
    ("[S1] Hi.", b'{"voice": 7}', "params.voice: expected a voice name"),
    ("[S1] Hi.", b'{"voice_2": "anna"}', "params.voice_2: speaker 2's voice needs a voice for speaker 1"),
    ("[S1] a] b", None, "text:"),
    ("[S1] Hi.", b'{"first_chunk_frames": 0}', "params: first_frames must be an integer in 1..250"),
    ("[S1] Hi.", b'{"chunk_frames": 2.5}', "params.chunk_frames: expected an integer"),
])
def test_bad_requests_are_one_line(runtime, voice_file, text, params, message):
    registry = VoiceRegistry.from_options([f"anna={voice_file}"], loader=load_voice)
    with pytest.raises(BadRequest) as caught:
        plan(text, params, registry, runtime, 4096)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_good_request_maps_the_extras_as_speak_does(runtime, voice_file):
    registry = VoiceRegistry.from_options([f"anna={voice_file}"], loader=load_voice)
    checked = plan(b"[S1] Hi.", b'{"seed": 3, "temperature": 0.9, "audio_temperature": 0.7, "top_k": 20, '
                                b'"cfg_scale": 1.5, "cfg_filter_k": 30, "voice": "anna", "voice_2": null, '
                                b'"first_chunk_frames": 5, "chunk_frames": 2}',
                   registry, runtime, 4096)
    p = checked.params
    assert (p.seed, p.text_temperature, p.audio_temperature, p.text_top_k, p.audio_top_k, p.cfg_scale,
            p.cfg_filter_k) == (3, 0.9, 0.7, 20, 20, 1.5, 30)
    assert [v.name for v in checked.voices] == ["anna", "default"]
    assert (checked.chunking.first_frames, checked.chunking.frames) == (5, 2)
