"""dia2-export's outputs never replace its inputs (issue 22, item 3), and the files it reads first
are checked for type and size: each refusal is one ``Error:`` line before any work, nothing left."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from snapshots import snapshot

FIXTURE = Path(__file__).resolve().parent / "data" / "tiny-artifacts"
SCRIPT = "[S1] Hello there. [S2] Hi."


def _refused(tmp_path: Path, args, *needles: str) -> str:
    from click.testing import CliRunner

    from dia2_trt.calibration.cli import main

    before = snapshot(tmp_path)
    done = CliRunner().invoke(main, [str(a) for a in args])
    lines = done.stderr.strip().splitlines()
    assert done.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), (done.exit_code, done.stderr)
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert snapshot(tmp_path) == before
    return lines[0]


@pytest.fixture
def work(tmp_path) -> Path:
    shutil.copytree(FIXTURE, tmp_path / "art")
    (tmp_path / "s.txt").write_text(SCRIPT)
    return tmp_path


@pytest.mark.parametrize("link", [False, True])
def test_reference_tokens_out_is_not_its_script(work, link):
    out = work / "s.txt"
    if link:
        os.link(work / "s.txt", work / "h.json")
        out = work / "h.json"
    _refused(work, ["reference", "--size", "tiny", "--input", work / "s.txt", "--tokens-out", out],
             "same file as the script --input")


@pytest.mark.parametrize("name", ["manifest.json", "depformer.onnx", "tokenizer/tokenizer.json"])
def test_validate_report_never_replaces_an_artifact_file(work, name):
    _refused(work, ["validate", work / "art", "--size", "tiny", "--report", work / "art" / name],
             "same file as the artifact file")


def test_validate_report_hard_linked_to_an_artifact_file_is_refused(work):
    os.link(work / "art" / "manifest.json", work / "report.json")
    _refused(work, ["validate", work / "art", "--report", work / "report.json"], "same file as the artifact file")


def test_validate_report_that_is_a_symbolic_link_is_refused(work):
    (work / "keep.json").write_text("keep")
    (work / "l.json").symlink_to(work / "keep.json")
    _refused(work, ["validate", work / "art", "--report", work / "l.json"], "is a symbolic link")
    assert (work / "l.json").is_symlink() and (work / "keep.json").read_text() == "keep"


def test_accuracy_report_is_not_its_script(work):
    _refused(work, ["validate", work / "art", "--against", work / "art", "--script", work / "s.txt",
                    "--report", work / "s.txt"], "same file as the --script file")


def test_calibrate_refuses_a_fifo_of_scripts_without_waiting(work):
    os.mkfifo(work / "scripts.txt")
    _refused(work, ["calibrate", work / "art", "--scripts", work / "scripts.txt", "--precision", "int8-qdq",
                    "--out", work / "q"], "calibration scripts", "not a regular file")


def test_calibrate_out_never_holds_its_fp32_artifacts(work):
    (work / "scripts.txt").write_text(SCRIPT + "\n")
    _refused(work, ["calibrate", work / "art", "--scripts", work / "scripts.txt", "--precision", "int8-qdq",
                    "--out", work, "--overwrite"], "fp32 artifact directory")


def test_engines_timing_cache_is_not_an_artifact_file(work):
    _refused(work, ["engines", work / "art", "--timing-cache", work / "art" / "manifest.json"],
             "same file as the artifact file")
