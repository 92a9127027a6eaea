"""Hostile and careless use (issue 11) of the command lines' inputs and outputs: ``dia2-rt speak`` and
``dia2-export reference`` refuse bad numbers, scripts, stdin and output paths in one line, leaving nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hardening_support import _export, _one_error_line, _rt, _tree

# --- dia2-rt speak inputs and outputs ------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["--temperature", "nan"], "not a finite number"),
    (["--temperature", "inf"], "not a finite number"),
    (["--audio-temperature", "-inf"], "not a finite number"),
    (["--cfg", "nan"], "not a finite number"),
    (["--cfg", "inf"], "not a finite number"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**63)], "--seed"),
    (["--top-k", str(2**63)], "--top-k"),
    (["--cfg-filter-k", str(2**64)], "--cfg-filter-k"),
    (["--threads", "100000"], "--threads"),
])
def test_speak_refuses_bad_numbers(tiny_artifacts, tmp_path, args, message):
    line = _one_error_line(_rt(["speak", "[S1] Hello.", "--artifacts", tiny_artifacts, "--out", tmp_path / "o.wav",
                                *args]), code=2)
    assert message in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script,message", [
    ('[S1] a <break time="1x5s"/> b', "unknown tag"),
    ('[S1] a <break time="' + "1" * 400 + 's"/>', "longer than any model context"),
    ("[S1] hello [S2 there", "unmatched"),
    ("[S1]", "no words"),
    ('[S2] <break time="1s"/>', "no words"),
    ("[S1] caf\udce9", "not UTF-8"),  # how Python hands over an undecodable argv byte
])
def test_speak_refuses_bad_scripts(tiny_artifacts, tmp_path, script, message):
    line = _one_error_line(_rt(["speak", script, "--artifacts", tiny_artifacts, "--out", tmp_path / "o.wav"]))
    assert message in line
    assert list(tmp_path.iterdir()) == []


def test_speak_refuses_non_utf8_stdin(tiny_artifacts, tmp_path):
    line = _one_error_line(_rt(["speak", "--artifacts", tiny_artifacts, "--out", tmp_path / "o.wav"],
                               input=b"[S1] caf\xe9 au lait"))
    assert "stdin is not UTF-8" in line


def test_speak_refuses_clashing_or_protected_outputs(tiny_artifacts, tmp_path):
    base = ["speak", "[S1] Hello.", "--artifacts", tiny_artifacts]
    same = tmp_path / "same.wav"
    assert "name the same file" in _one_error_line(_rt([*base, "--out", same, "--tokens-out", same]))
    assert "name the same file" in _one_error_line(
        _rt([*base, "--out", "-", "--tokens-out", tmp_path / "t.json", "--timestamps-out", tmp_path / "t.json"]))
    for option, name in (("--out", "x.wav"), ("--tokens-out", "manifest.json")):
        args = [*base, "--out", tmp_path / "o.wav", option, tiny_artifacts / name]
        assert "inside the artifact directory" in _one_error_line(_rt(args))
    assert "cannot write to /proc" in _one_error_line(_rt([*base, "--out", "/proc/o.wav"]))
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # stands in for /dev/null: renaming over it would replace the device node
    assert "not a regular file" in _one_error_line(_rt([*base, "--out", "-", "--tokens-out", fifo]))
    fifo.unlink()
    assert list(tmp_path.iterdir()) == []
    assert not (tiny_artifacts / "x.wav").exists()


def test_outputs_are_written_together_or_not_at_all(tiny_artifacts, tmp_path, monkeypatch):
    from dia2_trt.runtime import cli

    def failing(document):
        def write(tmp):
            raise OSError(28, "No space left on device")
        return write

    monkeypatch.setattr(cli, "_json_writer", failing)
    done = _rt(["speak", "[S1] Hello.", "--artifacts", tiny_artifacts, "--out", tmp_path / "o.wav",
                "--tokens-out", tmp_path / "t.json", "--quiet", "--temperature", "0"])
    assert "No space left on device" in _one_error_line(done)
    assert list(tmp_path.iterdir()) == []  # no audio, no temporary files


def _speak_to(stdout, tiny_artifacts):
    return subprocess.run([sys.executable, "-m", "dia2_trt.runtime", "speak", "[S1] Hello there.", "--artifacts",
                           str(tiny_artifacts), "--out", "-", "--quiet", "--temperature", "0"],
                          stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120)


def test_disk_full_on_stdout_is_one_line(tiny_artifacts):
    with open("/dev/full", "wb") as full:
        done = _speak_to(full, tiny_artifacts)
    assert done.returncode == 1 and done.stderr.splitlines() == [
        "Error: cannot write audio to stdout: No space left on device"], done.stderr


def test_closed_stdout_is_one_line(tiny_artifacts):
    reader, writer = os.pipe()
    os.close(reader)
    try:
        done = _speak_to(writer, tiny_artifacts)
    finally:
        os.close(writer)
    assert done.returncode == 1 and done.stderr.splitlines() == [
        "Error: cannot write audio to stdout: the reader closed it"], done.stderr


# --- dia2-export reference inputs -------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["--temperature", "nan"], "not a finite number"),
    (["--cfg", "inf"], "not a finite number"),
    (["--seed", "-3"], "--seed"),
])
def test_reference_refuses_bad_numbers(tmp_path, args, message):
    script = tmp_path / "s.txt"
    script.write_text("[S1] Hello.")
    line = _one_error_line(_export(["reference", "--size", "tiny", "--input", script, "--tokens-out",
                                    tmp_path / "t.json", *args]), code=2)
    assert message in line


def test_reference_refuses_outputs_inside_the_checkpoint(tmp_path, tiny_checkpoint):
    script = tmp_path / "s.txt"
    script.write_text("[S1] Hello.")
    before = _tree(tiny_checkpoint)
    line = _one_error_line(_export(["reference", "--checkpoint", tiny_checkpoint, "--input", script,
                                    "--tokens-out", tiny_checkpoint / "config.json"]))
    assert "inside the checkpoint directory" in line and _tree(tiny_checkpoint) == before


def test_reference_refuses_non_utf8_stdin(tmp_path):
    line = _one_error_line(_export(["reference", "--size", "tiny", "--input", "-", "--tokens-out",
                                    tmp_path / "t.json"], input=b"[S1] \xff\xfe"))
    assert "not UTF-8" in line
