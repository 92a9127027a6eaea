"""Hostile and careless use (issue 11): nothing destroyed, no checkpoint code run, every bad input one line."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dia2_trt.runtime.artifacts import FORMAT
from dia2_trt.runtime.script import MAX_SCRIPT_BYTES, ScriptError, check_complete_script, check_script

REPO = Path(__file__).resolve().parents[1]


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _invoke(main, args, input=None):
    from click.testing import CliRunner

    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def _one_error_line(done, code: int | None = None) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.exit_code != 0 and (code is None or done.exit_code == code), (done.exit_code, done.stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    return lines[0]


def _rt(args, input=None):
    from dia2_trt.runtime.cli import main

    return _invoke(main, args, input)


def _export(args, input=None):
    from dia2_trt.export.cli import main

    return _invoke(main, args, input)


# --- --overwrite never destroys what it did not create ---------------------------


@pytest.fixture
def fake_export(monkeypatch):
    """build_artifacts with the export replaced by writing a manifest: the directory handling is the same."""
    from dia2_trt.export import build

    def write(files, tmp, options, progress):
        (tmp / "manifest.json").write_text(json.dumps({"format": FORMAT, "new": True}))
        return {}

    monkeypatch.setattr(build, "_build_into", write)
    monkeypatch.setattr(build, "load_manifest", lambda *args, **kwargs: None)  # the fake manifest is no artifact
    return build


@pytest.fixture
def checkpoint_files(tiny_checkpoint):
    from dia2_trt.models.sources import resolve_checkpoint

    return resolve_checkpoint(checkpoint=tiny_checkpoint)


def test_overwrite_keeps_an_unrelated_directory(tmp_path, tiny_checkpoint):
    important = tmp_path / "important"
    important.mkdir()
    (important / "thesis.tex").write_text("years of work")
    line = _one_error_line(_export(["build", "--checkpoint", tiny_checkpoint, "--out", important, "--overwrite"]))
    assert "holds no dia2-trt artifacts" in line
    assert (important / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["important"]


@pytest.mark.parametrize("where", ["itself", "inside", "parent"])
def test_overwrite_keeps_the_checkpoint(tmp_path, tiny_checkpoint, where):
    checkpoint = tmp_path / "parent" / "ckpt"
    shutil.copytree(tiny_checkpoint, checkpoint)
    for decoy in (checkpoint, checkpoint.parent):  # even where they look like artifact directories
        (decoy / "manifest.json").write_text(json.dumps({"format": FORMAT}))
    before = _tree(tmp_path)
    out = {"itself": checkpoint, "inside": checkpoint / "art", "parent": checkpoint.parent}[where]
    line = _one_error_line(_export(["build", "--checkpoint", checkpoint, "--out", out, "--overwrite"]))
    assert "checkpoint" in line
    assert _tree(tmp_path) == before


def test_overwrite_checks_a_symlinked_checkpoint(tmp_path, tiny_checkpoint, checkpoint_files, fake_export):
    link = tmp_path / "link"
    link.symlink_to(tiny_checkpoint, target_is_directory=True)
    with pytest.raises(fake_export.BuildError, match="is the checkpoint"):
        fake_export.build_artifacts(checkpoint_files, link, fake_export.BuildOptions(overwrite=True))
    assert (tiny_checkpoint / "config.json").is_file()


def test_out_dot_is_refused_before_any_work(tmp_path, monkeypatch, fake_export):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(fake_export.BuildError, match="holds no dia2-trt artifacts"):
        fake_export.check_request(Path("."), fake_export.BuildOptions(overwrite=True))
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "manifest.json").write_text(json.dumps({"format": FORMAT}))
    with pytest.raises(fake_export.BuildError, match="current directory"):
        fake_export.check_request(Path("."), fake_export.BuildOptions(overwrite=True))
    with pytest.raises(fake_export.BuildError, match="root directory"):
        fake_export.check_request(Path("/"), fake_export.BuildOptions(overwrite=True))


def test_overwrite_replaces_an_artifact_directory_only(tmp_path, checkpoint_files, fake_export):
    out = tmp_path / "art"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": FORMAT, "old": True}))
    decoy = tmp_path / ".art.old"  # the name the old code renamed to and then deleted
    decoy.mkdir()
    (decoy / "keep").write_text("mine")
    fake_export.build_artifacts(checkpoint_files, out, fake_export.BuildOptions(overwrite=True))
    assert json.loads((out / "manifest.json").read_text())["new"]
    assert (decoy / "keep").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".art.old", "art"]


def test_symlinked_out_replaces_its_target(tmp_path, checkpoint_files, fake_export):
    target = tmp_path / "real"
    target.mkdir()
    (target / "manifest.json").write_text(json.dumps({"format": FORMAT}))
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    fake_export.build_artifacts(checkpoint_files, link, fake_export.BuildOptions(overwrite=True))
    assert link.is_symlink() and json.loads((target / "manifest.json").read_text())["new"]


def test_failed_build_removes_the_parents_it_created(tmp_path, checkpoint_files, monkeypatch, fake_export):
    def boom(*args):
        raise RuntimeError("export failed")

    monkeypatch.setattr(fake_export, "_build_into", boom)
    (tmp_path / "existing").mkdir()
    with pytest.raises(RuntimeError, match="export failed"):
        fake_export.build_artifacts(checkpoint_files, tmp_path / "existing" / "a" / "b" / "out",
                                    fake_export.BuildOptions())
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["existing"]


def test_benchmark_checkpoint_helper_never_deletes_a_user_directory(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from checkpoints import ensure_2b_checkpoint

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.bin").write_bytes(b"precious")
    with pytest.raises(ValueError, match="not a finished 2B-topology checkpoint"):
        ensure_2b_checkpoint(mine)
    assert (mine / "data.bin").read_bytes() == b"precious"


# --- no code from a checkpoint ------------------------------------------------


def _checkpoint_with_code(src: Path, dst: Path, tokenizer_class: str) -> Path:
    shutil.copytree(src, dst)
    marker = dst.parent / "PWNED"
    (dst / "evil_tokenizer.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", "evil_tokenizer.EvilTokenizer"]}
    config["tokenizer_class"] = tokenizer_class
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return marker


@pytest.mark.parametrize("tokenizer_class", ["EvilTokenizer", "PreTrainedTokenizerFast"])
def test_checkpoint_tokenizer_code_never_runs(tmp_path, tiny_checkpoint, tokenizer_class):
    from dia2_trt.models import tokens

    ckpt = tmp_path / "ckpt"
    marker = _checkpoint_with_code(tiny_checkpoint, ckpt, tokenizer_class)
    try:
        tokens.check_tokenizer(ckpt)  # a stock class named beside the auto_map loads as that class
    except tokens.UntrustedTokenizer as exc:
        assert tokenizer_class == "EvilTokenizer" and "never runs code" in str(exc)
    else:
        assert tokenizer_class == "PreTrainedTokenizerFast"
    assert not marker.exists()


def test_build_refuses_checkpoint_code_with_one_line(tmp_path, tiny_checkpoint):
    ckpt = tmp_path / "ckpt"
    marker = _checkpoint_with_code(tiny_checkpoint, ckpt, "EvilTokenizer")
    done = _export(["build", "--checkpoint", ckpt, "--out", tmp_path / "art"])
    assert done.exit_code == 1 and "Traceback" not in done.output
    assert done.stderr.splitlines()[-1].startswith("Error: ") and "never runs code" in done.stderr.splitlines()[-1]
    assert not marker.exists() and not (tmp_path / "art").exists()


@pytest.mark.parametrize("assets", [
    {"config": "../elsewhere/config.json"},
    {"weights": "/etc/passwd"},
    {"tokenizer": "../"},
    {"mimi": "../../mimi"},
    {"tokenizer": "~/tok"},
])
def test_paths_named_by_a_checkpoint_stay_inside_it(tmp_path, tiny_checkpoint, assets):
    from dia2_trt.models.sources import CheckpointError, resolve_checkpoint

    ckpt = tmp_path / "inner" / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    shutil.copytree(tiny_checkpoint, tmp_path / "elsewhere")
    (ckpt / "dia2_assets.json").write_text(json.dumps(assets))
    with pytest.raises(CheckpointError, match="outside its directory") as info:
        resolve_checkpoint(checkpoint=ckpt)
    assert "\n" not in str(info.value)


def test_config_assets_stay_inside_the_checkpoint(tmp_path, tiny_checkpoint):
    from dia2_trt.models.sources import CheckpointError, resolve_checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["assets"]["mimi"] = str(tiny_checkpoint / "mimi")
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="outside its directory"):
        resolve_checkpoint(checkpoint=ckpt)


# --- scripts --------------------------------------------------------------------


@pytest.mark.parametrize("script,message", [
    ('[S1] a <break time="1x5s"/> b', "unknown tag"),
    ('[S1] a <break time="' + "9" * 400 + 's"/> b', "longer than any model context"),
    ('[S1] a <break time="4000s"/> b', "longer than any model context"),
    ("[S1] hello <break time=", "unmatched '<'"),
    ("[S1] hello [S2 there", "unmatched '['"),
    ("[S1] a > b", "unmatched '>'"),
    ("[S1] <<<<", "unmatched '<'"),
])
def test_bad_tags_are_refused(script, message):
    with pytest.raises(ScriptError, match=re.escape(message)):
        check_script(script)


@pytest.mark.parametrize("script", ["[S1]", "[S1] [S2]", '[S1] <break time="1s"/>', "  [S2]  \n"])
def test_a_script_without_words_is_refused(script):
    check_script(script)  # a prefix may still be waiting for its words
    with pytest.raises(ScriptError, match="no words"):
        check_complete_script(script)


def test_break_times_still_parse():
    from dia2_trt.runtime.script import parse_script
    from dia2_trt.runtime.state_machine import TokenIds

    ids = TokenIds(new_word=2, pad=3, bos=1, zero=7, spk1=5, spk2=6, audio_pad=0, audio_bos=0)
    text = '[S1] a <break time="1.5s"/> b <break time="2s"/> c <break time="0.s"/>'
    check_complete_script(text)
    entries = parse_script([text], lambda w: [9] * len(w), ids, frame_rate=10.0)
    assert [(e.text, e.padding) for e in entries][1:] == [("", 15), ("b", 1), ("", 20), ("c", 1)]  # "0.s": none


def test_huge_inputs_are_refused_at_once(tmp_path):
    """10 MB of text took minutes of quadratic parsing before "too long"; /dev/zero never ended.
    The artifact directory does not exist: the refusal must come before anything is loaded."""
    huge = tmp_path / "huge.txt"
    huge.write_text("[S1] " + "hello there friend " * (10_000_000 // 19))
    hostile = ["[S1] " + "<" * (MAX_SCRIPT_BYTES // 4 - 8), "[S1] " + "a" * (MAX_SCRIPT_BYTES // 4 - 8),
               "[S1] " + " " * (MAX_SCRIPT_BYTES // 4 - 8) + "x"]
    started = time.perf_counter()
    for source in (["--input", huge], ["--input", "/dev/zero"]):
        line = _one_error_line(_rt(["speak", *source, "--artifacts", tmp_path / "missing", "--out", tmp_path / "o.wav"]))
        assert "too long" in line
    for text in hostile:  # just under the limit: linear scans, refused or accepted quickly
        try:
            check_complete_script(text)
        except ScriptError:
            pass
    assert time.perf_counter() - started < 5.0  # quadratic parsing took minutes; linear is milliseconds
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.txt"]


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


def _prefix_by_walking_back(text: str) -> str:
    """The engine's original definition: cut at the last whitespace, then before the last open bracket, repeatedly."""
    match = re.search(r"\s(?=\S*\Z)", text)
    prefix = text[: match.start()] if match else ""
    while True:
        opened = [at for o, c in (("<", ">"), ("[", "]")) if (at := prefix.rfind(o)) > prefix.rfind(c)]
        if not opened:
            return prefix
        prefix = prefix[: max(opened)]


def test_complete_prefix_is_the_walk_back_in_one_pass():
    import random

    from dia2_trt.runtime.script import complete_prefix

    rng = random.Random(0)
    for _ in range(20000):
        text = "".join(rng.choice("ab <>[]\n") for _ in range(rng.randint(0, 14)))
        assert complete_prefix(text) == _prefix_by_walking_back(text), repr(text)
    assert complete_prefix('[S1] Hi <break time="1s"/> there <break ti') == '[S1] Hi <break time="1s"/> there '


def test_real_vocab_checkpoint_helper_refuses_a_user_directory(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from checkpoints import ensure_real_vocab_checkpoint

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep")
    with pytest.raises(ValueError, match="not a finished real-vocabulary checkpoint"):
        ensure_real_vocab_checkpoint(mine)
    assert (mine / "thesis.tex").read_text() == "keep"
