"""Hostile and careless use (issue 11) of ``dia2-export build``: --overwrite and a failed build never destroy
what they did not create, nor do the benchmarks' checkpoint helpers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dia2_trt.runtime.artifacts import FORMAT

from hardening_support import _export, _one_error_line, _tree

REPO = Path(__file__).resolve().parents[1]


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


def test_real_vocab_checkpoint_helper_refuses_a_user_directory(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from checkpoints import ensure_real_vocab_checkpoint

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep")
    with pytest.raises(ValueError, match="not a finished real-vocabulary checkpoint"):
        ensure_real_vocab_checkpoint(mine)
    assert (mine / "thesis.tex").read_text() == "keep"
