"""A new user's first ten minutes: what the terminal says, how fast the first answers come, what works.

Each test holds one thing a first run met: noise from random weights said as such, `dia2-export -h`
without torch, an offline hub answered from one probe instead of a minute of retries, a PASS/FAIL
line from `validate --against`, mp3/opus from `speak`, and `--mimi` / `--tokenizer` overrides for a
checkpoint that names its codec or tokenizer by an absolute path.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dia2_trt.models import sources
from dia2_trt.models.sources import CheckpointError, resolve_checkpoint
from dia2_trt.models.tiny import build_tiny_checkpoint

from hardening_support import copy_with_negated_action_head

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "tiny-artifacts"
SCRIPT = "[S1] Hello there, how are you? [S2] I am fine, thanks."
HEAVY = ("torch", "transformers", "onnx")


def _export(args, env=None, code="") -> subprocess.CompletedProcess:
    """`dia2-export ARGS` in a fresh interpreter; the last stdout line lists the heavy modules it imported."""
    wrapper = ("import atexit, sys\n"
               f"atexit.register(lambda: print(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
               f"{code}\nsys.argv = ['dia2-export', *{list(args)!r}]\n"
               "from dia2_trt.export.entry import main\nmain()\n")
    return subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


def _speak(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dia2_trt.runtime", "speak", "--artifacts", str(FIXTURE), *args],
                          capture_output=True, timeout=300)


# --- dia2-export -h -----------------------------------------------------------------------------


@pytest.mark.parametrize("args,code", [(["-h"], 0), (["build", "-h"], 0), (["validate", "--help"], 0),
                                       (["build", "--no-such-option"], 2), (["calibrate", "-h"], 0)])
def test_help_and_usage_errors_import_no_torch(args, code):
    done = _export(args)
    assert done.returncode == code, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"  # torch/transformers/onnx never loaded
    if code == 0:
        assert "Usage: dia2-export" in done.stdout


def test_build_constants_shown_without_torch_are_the_builds():
    from dia2_trt.export import build, cli

    assert cli.DEFAULT_OPSET == build.DEFAULT_OPSET and cli.BUILD_PRECISIONS == build.BUILD_PRECISIONS
    assert cli.DEFAULT_MAX_STREAMS == build.DEFAULT_MAX_STREAMS


def test_missing_export_extra_inside_a_command_is_one_line(monkeypatch, capsys):
    """The heavy imports now happen inside the command: a missing torch is still the one-line hint."""
    import builtins

    from dia2_trt.export import entry

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch'", name="torch")  # as for any torch.x
        return real_import(name, *args, **kwargs)

    for module in [m for m in sys.modules if m == "dia2_trt.export.build"]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setattr(builtins, "__import__", no_torch)
    monkeypatch.setattr(sys, "argv", ["dia2-export", "build", "--size", "tiny", "--out", "/nonexistent/x"])
    with pytest.raises(SystemExit) as exit_info:
        entry.main()
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "Error: this command needs the [export] extra (no module 'torch'): pip install 'dia2-trt[export]'"]


# --- offline hub --------------------------------------------------------------------------------


def test_unreachable_hub_is_one_line_from_one_probe(tmp_path):
    """Nothing listens on port 9: before, huggingface_hub retried each file 5 times with backoff
    (70 s, a 'Retrying' line each); now one refused connect makes the lookup cache-only."""
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": ""}
    done = _export(["build", "--size", "1B", "--out", str(tmp_path / "out")], env=env)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1
    assert lines == ["Error: config.json of nari-labs/Dia2-1B is not in the Hugging Face cache and the hub could "
                     "not be reached (127.0.0.1:9: Connection refused); check the network or run "
                     "`hf download nari-labs/Dia2-1B`"]
    assert done.stdout.strip().splitlines()[-1] == "[]"  # said before importing torch
    assert not (tmp_path / "out").exists()


def test_probe_goes_through_the_https_proxy(monkeypatch):
    tried = []

    def connect(address, timeout):
        tried.append((address, timeout))
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    sources.hub_unreachable.cache_clear()
    try:
        assert sources.hub_unreachable() == "proxy.example:3128: Network is unreachable"
    finally:
        sources.hub_unreachable.cache_clear()
    assert tried == [(("proxy.example", 3128), sources.PROBE_TIMEOUT)]


# --- validate --against: PASS / FAIL --------------------------------------------------------------


def test_validate_against_says_pass_or_fail(tmp_path):
    same = _export(["validate", str(FIXTURE), "--against", str(FIXTURE), "--report", str(tmp_path / "a.json")])
    assert same.returncode == 0, same.stderr
    assert same.stdout.splitlines()[0] == f"PASS: fp32 {FIXTURE} vs fp32 {FIXTURE}"
    copy_with_negated_action_head(FIXTURE, tmp_path / "broken")
    broken = _export(["validate", str(tmp_path / "broken"), "--against", str(FIXTURE),
                      "--report", str(tmp_path / "b.json")])
    assert broken.returncode == 1
    assert broken.stdout.splitlines()[0].startswith(f"FAIL: fp32 {tmp_path / 'broken'} vs fp32 {FIXTURE}: action")


# --- speak: mp3 / opus, and noise said as noise ---------------------------------------------------


@pytest.mark.parametrize("ext", ["mp3", "opus"])
def test_speak_writes_the_servers_encodings(tmp_path, ext):
    from dia2_trt.runtime.serve.audio import FORMATS, available_formats, encode_whole

    if ext not in available_formats():
        pytest.skip(f"this libsndfile ({sf.__libsndfile_version__}) has no {ext} encoder")
    from dia2_trt.runtime import Dia2Runtime
    from dia2_trt.runtime.params import GenerationParams

    out = tmp_path / f"hello.{ext}"
    assert _speak("--quiet", "--out", str(out), SCRIPT).returncode == 0
    runtime = Dia2Runtime.load(FIXTURE)
    pcm = runtime.speak(SCRIPT, GenerationParams.from_options(seed=0, top_k=50, cfg_scale=2.0, cfg_filter_k=50)).pcm
    served = tmp_path / f"served.{ext}"
    served.write_bytes(encode_whole(FORMATS[ext], pcm, runtime.sample_rate))  # what the server sends
    decoded, decoded_rate = sf.read(out)
    # Byte-equal for MP3; an Ogg stream has a random serial number, so Opus is compared decoded.
    assert np.array_equal(decoded, sf.read(served)[0]) and (ext != "mp3" or out.read_bytes() == served.read_bytes())
    assert decoded_rate == runtime.sample_rate and abs(len(decoded) - len(pcm)) < decoded_rate // 10


def test_speak_refuses_an_unknown_extension_first(tmp_path):
    done = _speak("--out", str(tmp_path / "hello.aac"), SCRIPT)
    assert done.returncode == 1 and list(tmp_path.iterdir()) == []
    assert done.stderr.decode().splitlines() == [
        f"Error: {tmp_path / 'hello.aac'}: unknown audio format (use .wav, .flac, .ogg, .mp3 or .opus, "
        "or '-' for raw PCM)"]


def test_random_weights_are_said_to_speak_noise(tmp_path):
    done = _speak("--out", str(tmp_path / "hello.wav"), SCRIPT)
    pcm, _ = sf.read(tmp_path / "hello.wav")
    assert np.mean(np.abs(pcm) >= 0.999) > 0.2  # the tiny's full-scale noise (the golden data stays as it is)
    note = "note: expect noise: these artifacts come from the tiny checkpoint, random weights; " \
           "for speech build --size 1B or --size 2B"
    assert note in done.stderr.decode().splitlines()
    assert note not in _speak("--quiet", "--out", str(tmp_path / "q.wav"), SCRIPT).stderr.decode()


def test_which_sources_are_random():
    from dia2_trt.runtime.cli import _random_checkpoint
    from dia2_trt.runtime.manifest import SourceInfo

    assert _random_checkpoint(SourceInfo(None, "/root/.cache/dia2-trt/tiny-v1-seed0", "/x/mimi", {}))
    assert _random_checkpoint(SourceInfo(None, None, None, {}))  # the committed fixture
    assert not _random_checkpoint(SourceInfo("nari-labs/Dia2-2B", "/hf/snap", "kyutai/mimi", {}))
    assert not _random_checkpoint(SourceInfo(None, "/models/my-dia2", "kyutai/mimi", {}))


# --- --mimi / --tokenizer -------------------------------------------------------------------------


@pytest.fixture()
def absolute_assets(tmp_path) -> tuple[Path, Path, Path]:
    """A checkpoint whose config names its Mimi and tokenizer by absolute paths outside it."""
    ckpt = build_tiny_checkpoint(tmp_path / "ckpt", seed=0)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "tok").mkdir(parents=True)
    shutil.move(ckpt / "mimi", elsewhere / "mimi")
    for name in sources.TOKENIZER_FILES:
        if (ckpt / name).exists():
            shutil.move(ckpt / name, elsewhere / "tok" / name)
    config = json.loads((ckpt / "config.json").read_text())
    config["assets"] = {"tokenizer": str(elsewhere / "tok"), "mimi": str(elsewhere / "mimi")}
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt, elsewhere / "mimi", elsewhere / "tok"


def test_absolute_asset_paths_are_refused_with_the_option_to_use(absolute_assets):
    ckpt, mimi, tok = absolute_assets
    with pytest.raises(CheckpointError, match=r"names directory '.*/tok', outside its directory; .* pass "
                                              r"--tokenizer DIR_OR_REPO to name it yourself"):
        resolve_checkpoint(checkpoint=ckpt)
    with pytest.raises(CheckpointError, match=r"names directory '.*/mimi', .* pass --mimi DIR_OR_REPO"):
        resolve_checkpoint(checkpoint=ckpt, tokenizer=str(tok))


def test_overrides_replace_what_the_checkpoint_names(absolute_assets):
    ckpt, mimi, tok = absolute_assets
    files = resolve_checkpoint(checkpoint=ckpt, mimi=str(mimi), tokenizer=str(tok))
    assert files.mimi_ref == str(mimi.resolve()) and files.tokenizer_dir == tok.resolve()
    hub = resolve_checkpoint(checkpoint=ckpt, mimi="kyutai/mimi", tokenizer=str(tok))
    assert hub.mimi_ref == "kyutai/mimi"  # a hub id, fetched when the codec loads
    with pytest.raises(CheckpointError, match=r"--mimi .*/missing: no such directory"):
        resolve_checkpoint(checkpoint=ckpt, mimi=str(ckpt.parent / "missing"), tokenizer=str(tok))
    with pytest.raises(CheckpointError, match="no tokenizer"):
        resolve_checkpoint(checkpoint=ckpt, mimi=str(mimi), tokenizer=str(mimi))


def test_build_with_overrides_speaks_like_the_checkpoint_with_its_own(absolute_assets, tiny_artifacts, tmp_path):
    """The same weights, codec and tokenizer reached through --mimi/--tokenizer: the same graphs."""
    ckpt, mimi, tok = absolute_assets
    refused = _export(["build", "--checkpoint", str(ckpt), "--out", str(tmp_path / "refused")])
    assert refused.returncode == 1 and "pass --tokenizer DIR_OR_REPO" in refused.stderr.strip().splitlines()[-1]
    out = tmp_path / "out"
    done = _export(["build", "--checkpoint", str(ckpt), "--mimi", str(mimi), "--tokenizer", str(tok),
                    "--out", str(out)])
    assert done.returncode == 0, done.stderr
    ours = json.loads((out / "manifest.json").read_text())
    theirs = json.loads((tiny_artifacts / "manifest.json").read_text())
    assert {k: g["sha256"] for k, g in ours["graphs"].items()} == {k: g["sha256"] for k, g in theirs["graphs"].items()}
